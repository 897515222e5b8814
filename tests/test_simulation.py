"""Simulator: batch effect and biology are real, output is deterministic, bad input fails."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from scbd_cells.core.errors import InputError
from scbd_cells.data.schema import CONTROL_LABEL, SIM_CHANNELS
from scbd_cells.sim.screen import read_crops, simulate, tiff_bytes

# A screen smaller than ``tiny`` for the tests that write several screens.
SMALL = dict(preset="tiny", n_genes=6, n_complexes=2, cells_per_guide=6, control_cells_per_guide=6)


def _load(screen: Path) -> tuple[pd.DataFrame, np.ndarray]:
    table = pd.read_csv(screen / "cells.csv")
    images = np.stack([tifffile.imread(screen / path) for path in table["image_path"]])
    return table, images


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_tiny_screen_files(tiny_screen: Path) -> None:
    table, images = _load(tiny_screen)
    truth = json.loads((tiny_screen / "truth.json").read_text())
    assert list(table.columns) == [
        *["cell_id", "image_path", "gene", "guide", "plate", "well", "tile", "x", "y"]
    ]
    assert images.dtype == np.uint16 and images.shape[1:] == (4, 32, 32)
    assert truth["channels"] == list(SIM_CHANNELS)
    assert 1000 <= len(table) <= 2000
    # Pooled screen: every well holds every gene; the control has many guides and the most cells.
    per_well = table.groupby(["plate", "well"])["gene"].nunique()
    assert (per_well == table["gene"].nunique()).all() and len(per_well) >= 4
    counts = table["gene"].value_counts()
    assert counts.idxmax() == CONTROL_LABEL
    assert table.loc[table["gene"] == CONTROL_LABEL, "guide"].str.startswith("nontargeting_").all()
    assert set(table.loc[table["gene"] == "GENE0001", "guide"]) == {"GENE0001_1", "GENE0001_2"}
    # CORUM 5.x: tab-separated, snake_case header, ';'-separated subunits, Human rows.
    complexes = pd.read_csv(tiny_screen / "complexes.txt", sep="\t")
    assert {"complex_id", "complex_name", "organism", "subunits_gene_name"} <= set(
        complexes.columns
    )
    human = complexes[complexes["organism"] == "Human"]
    assert len(human) == truth["parameters"]["n_complexes"]
    for members, (_name, info) in zip(
        human["subunits_gene_name"], truth["complexes"].items(), strict=True
    ):
        assert members.split(";") == info["members"]
    # Some genes have no effect at all, and some guides barely work.
    norms = [gene["effect_norm"] for gene in truth["genes"].values()]
    assert 0 < sum(n == 0 for n in norms) < len(norms)
    assert len(truth["wells"]) == len(per_well)


def _simple_stats(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), images.shape[1], -1).astype(np.float32)
    percentiles = [np.percentile(flat, q, axis=-1) for q in (5, 50, 95)]
    return np.concatenate([flat.mean(-1), flat.std(-1), *percentiles], axis=1)


def test_batch_effect_is_real(tiny_screen: Path) -> None:
    """A linear model on per-cell intensity statistics predicts the well far above chance."""
    table, images = _load(tiny_screen)
    well = (table["plate"] + "_" + table["well"]).to_numpy()
    train_x, test_x, train_y, test_y = train_test_split(
        _simple_stats(images), well, test_size=0.4, random_state=0, stratify=well
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    accuracy = model.fit(train_x, train_y).score(test_x, test_y)
    chance = 1 / len(set(well))
    assert accuracy > 3 * chance, (accuracy, chance)


def test_batch_strength_zero_removes_most_of_it(tmp_path: Path) -> None:
    """Without technical effects the well is much harder to predict (the effect is the wells')."""
    screen = simulate(tmp_path / "screen", batch_strength=0.0, seed=1, **SMALL).out_dir
    table, images = _load(screen)
    well = (table["plate"] + "_" + table["well"]).to_numpy()
    train_x, test_x, train_y, test_y = train_test_split(
        _simple_stats(images), well, test_size=0.4, random_state=0, stratify=well
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    accuracy = model.fit(train_x, train_y).score(test_x, test_y)
    assert accuracy < 2 * (1 / len(set(well))), accuracy


def test_biology_is_real(tiny_screen: Path) -> None:
    """Gene profiles (mean per-cell features minus control) are closer within complexes."""
    table, images = _load(tiny_screen)
    flat = images.reshape(len(images), 4, -1).astype(np.float32)
    features = pd.DataFrame(
        np.log1p(np.concatenate([flat.mean(-1), flat.std(-1), np.percentile(flat, 99, -1)], 1))
    )
    # Standardise within each well, as an analyst would (and so that wells do not dominate).
    well = (table["plate"] + "_" + table["well"]).to_numpy()
    features = features.groupby(well).transform(lambda col: (col - col.mean()) / col.std())
    genes = features.groupby(table["gene"].to_numpy()).mean()
    profiles = genes.drop(CONTROL_LABEL) - genes.loc[CONTROL_LABEL]
    unit = profiles.to_numpy() / np.linalg.norm(profiles.to_numpy(), axis=1, keepdims=True)
    similarity = unit @ unit.T

    complexes = pd.read_csv(tiny_screen / "complexes.txt", sep="\t")
    human = complexes[complexes["organism"] == "Human"]
    complex_of = {
        gene: name
        for name, members in zip(human["complex_name"], human["subunits_gene_name"], strict=True)
        for gene in members.split(";")
    }
    labels = np.array([complex_of.get(gene, f"alone:{gene}") for gene in profiles.index])
    upper = np.triu_indices(len(labels), 1)

    def same_minus_other(labels: np.ndarray) -> float:
        same = (labels[:, None] == labels[None, :])[upper]
        return float(similarity[upper][same].mean() - similarity[upper][~same].mean())

    observed = same_minus_other(labels)
    rng = np.random.default_rng(0)
    null = np.array([same_minus_other(rng.permutation(labels)) for _ in range(1000)])
    # With effect_strength=0 the difference stays below ~0.25 (p > 0.05) on seeds 0-3.
    assert observed > 0.35, observed
    assert (null >= observed).mean() < 0.02


def test_same_seed_same_bytes_and_workers_do_not_matter(tmp_path: Path) -> None:
    one = simulate(tmp_path / "one", seed=3, **SMALL).out_dir
    two = simulate(tmp_path / "two", seed=3, workers=2, **SMALL).out_dir
    other = simulate(tmp_path / "other", seed=4, **SMALL).out_dir
    hashes = _hashes(one)
    assert len(hashes) > 50
    assert hashes == _hashes(two)
    different = _hashes(other)
    changed = [name for name in hashes if hashes[name] != different.get(name)]
    assert "cells.csv" in changed and "truth.json" in changed
    assert sum(name.endswith(".tif") for name in changed) > 0.9 * sum(
        name.endswith(".tif") for name in hashes
    )


def test_holdout_plates_get_effects_unlike_the_others(tmp_path: Path) -> None:
    """The last plate's wells get technical effects outside the other plates' ranges; every
    cell, guide and training-plate image stays as in the same screen without a held-out plate."""
    plain = simulate(tmp_path / "plain", seed=2, plates=3, **SMALL)
    held = simulate(tmp_path / "held", seed=2, plates=3, holdout_plates=1, **SMALL)
    plain_truth = json.loads(plain.truth_path.read_text())
    truth = json.loads(held.truth_path.read_text())
    assert "holdout" not in plain_truth and "holdout_plates" not in plain_truth["parameters"]
    assert truth["holdout"]["plates"] == ["plate3"] and truth["parameters"]["holdout_plates"] == 1

    table, plain_table = pd.read_csv(held.cells_path), pd.read_csv(plain.cells_path)
    assert "holdout" not in plain_table.columns
    assert (table["holdout"] == (table["plate"] == "plate3")).all()
    pd.testing.assert_frame_equal(table.drop(columns="holdout"), plain_table)

    wells = truth["wells"]
    new = [effect for name, effect in wells.items() if name.startswith("plate3_")]
    seen = [effect for name, effect in wells.items() if not name.startswith("plate3_")]
    assert len(new) == 2 and len(seen) == 4
    for key in ("blur_sigma", "gradient", "vignetting", "read_noise", "shot_noise"):
        assert min(e[key] for e in new) > max(e[key] for e in seen), key
    # gain and background: shifted (by e^(+-0.5) and +250 counts), so far out in the tails
    def mean_of(effects: list[dict], key: str, transform=np.asarray) -> float:
        return float(np.mean([transform(e[key]) for e in effects]))

    def log_gain(gain: list[float]) -> np.ndarray:
        return np.abs(np.log(gain))

    assert mean_of(new, "gain", log_gain) > 2 * mean_of(seen, "gain", log_gain)
    assert mean_of(new, "offset") > mean_of(seen, "offset") + 150
    assert [wells[name] for name in wells if not name.startswith("plate3_")] == [
        plain_truth["wells"][name] for name in wells if not name.startswith("plate3_")
    ]

    plain_hashes, held_hashes = _hashes(plain.out_dir), _hashes(held.out_dir)
    for name, digest in held_hashes.items():
        if name.endswith(".tif"):
            assert (digest == plain_hashes[name]) == ("plate3_" not in name), name


def test_tiff_bytes_equal_tifffile() -> None:
    image = np.random.default_rng(0).integers(0, 65535, size=(4, 20, 20), dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, photometric="minisblack")
    assert tiff_bytes(image) == buffer.getvalue()
    assert np.array_equal(tifffile.imread(io.BytesIO(tiff_bytes(image))), image)


def test_fields_layout_matches_crops(tmp_path: Path) -> None:
    """Ingest's crop at (round(y), round(x)) of a field equals the crops-layout TIFF."""
    crops_dir = simulate(tmp_path / "crops", seed=5, **SMALL).out_dir
    fields = simulate(tmp_path / "fields", seed=5, layout="fields", preview=True, **SMALL)
    table = pd.read_csv(fields.cells_path)
    assert [f"{c}_path" for c in SIM_CHANNELS] == list(table.columns[1:5])
    assert fields.preview_path is not None and fields.preview_path.stat().st_size > 10_000
    field = tifffile.imread(fields.out_dir / table.loc[0, "dna_path"])
    height, width = field.shape
    size = 32
    top = table["y"].round().astype(int) - size // 2
    left = table["x"].round().astype(int) - size // 2
    inside = (top >= 0) & (left >= 0) & (top + size <= height) & (left + size <= width)
    # Most cells are inside; a few sit at the border and ingest will skip them.
    assert 0.9 * len(table) < inside.sum() <= len(table)
    ids = table.loc[inside, "cell_id"].to_numpy()[:40]
    from_fields = read_crops(fields.out_dir, ids)
    from_crops = read_crops(crops_dir, ids)
    assert np.array_equal(from_fields, from_crops)
    # The cell is where the table says: its nucleus is the brightest DNA at the crop centre.
    dna = from_fields[:, SIM_CHANNELS.index("dna")].astype(np.float32)
    centre = dna[:, size // 2 - 2 : size // 2 + 3, size // 2 - 2 : size // 2 + 3].mean(axis=(1, 2))
    corners = np.concatenate([dna[:, :4, :4], dna[:, -4:, -4:]], axis=1).mean(axis=(1, 2))
    assert (centre > 2 * corners).all()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--n-genes", "0"], "n_genes"),
        (["--n-genes", "4", "--n-complexes", "5"], "complexes"),
        (["--crop-size", "8"], "crop_size"),
        (["--cells-per-guide", "-3"], "cells_per_guide"),
        (["--preset", "huge"], "preset"),
        (["--layout", "tiles"], "layout"),
        (["--holdout-plates", "2"], "holdout_plates"),
        (["--holdout-plates", "-1"], "holdout_plates"),
    ],
)
def test_bad_input_exits_with_2(tmp_path: Path, arguments: list[str], message: str) -> None:
    from scbd_cells.cli import app, main

    runner = CliRunner()
    result = runner.invoke(app, ["simulate", str(tmp_path / "out"), "--preset", "tiny", *arguments])
    if message in ("preset", "layout"):  # a fixed choice: the command line names the choices
        assert result.exit_code == 2 and f"'--{message}'" in result.output
        with pytest.raises(InputError, match=message):  # and the library says it too
            simulate(tmp_path / "out", **{message: arguments[1]})
    else:
        assert isinstance(result.exception, InputError) and message in str(result.exception)
    assert not (tmp_path / "out" / "cells.csv").exists()
    # Through the console entry point: exit code 2 and a one-line message, no traceback.
    import sys

    argv = sys.argv
    sys.argv = ["scbd-cells", "simulate", str(tmp_path / "out"), "--preset", "tiny", *arguments]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2


def test_non_empty_out_dir_is_refused(tmp_path: Path) -> None:
    out_dir = tmp_path / "screen"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"already exists and is a folder of 1 entry \(notes"):
        simulate(out_dir, **SMALL)
    # Even with overwrite, a folder that is not a simulated screen is left alone.
    with pytest.raises(InputError, match="not a simulated screen"):
        simulate(out_dir, overwrite=True, **SMALL)
    assert (out_dir / "notes.txt").read_text() == "mine"
    screen = tmp_path / "screen2"
    simulate(screen, **SMALL)
    result = CliRunner().invoke(
        __import__("scbd_cells.cli", fromlist=["app"]).app,
        ["simulate", str(screen), "--preset", "tiny", "--n-genes", "6", "--n-complexes", "2"],
    )
    assert isinstance(result.exception, InputError)
    first = (screen / "truth.json").read_bytes()
    simulate(screen, overwrite=True, seed=9, **SMALL)
    assert (screen / "truth.json").read_bytes() != first


def test_edge_sizes(tmp_path: Path) -> None:
    """No complexes, one well, the smallest crop: still a valid screen."""
    result = simulate(
        tmp_path / "screen",
        n_complexes=0,
        plates=1,
        wells_per_plate=1,
        crop_size=16,
        **{k: v for k, v in SMALL.items() if k != "n_complexes"},
    )
    table, images = _load(result.out_dir)
    assert images.shape[1:] == (4, 16, 16) and len(table) == result.n_cells
    complexes = pd.read_csv(result.complexes_path, sep="\t")
    assert complexes.empty and "subunits_gene_name" in complexes.columns
