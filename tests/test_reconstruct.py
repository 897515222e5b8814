"""reconstruct: grids of originals, reconstructions and swaps from the decoder, and index.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread
from typer.testing import CliRunner

from scbd_cells import reconstruct, train
from scbd_cells.cli import app
from scbd_cells.core.errors import CheckpointError, InputError
from scbd_cells.core.outputs import MARKER_NAME, kind_of
from scbd_cells.data import schema
from scbd_cells.data.store import open_store
from scbd_cells.embedding.reconstruction import OUTPUT_FILES, decode, encode_cells
from scbd_cells.training.checkpoint import load_trained

# The tiny encoder with a narrow decoder: seconds on a CPU.
FAST = {
    "encoder": "tiny",
    "classes_per_batch": 8,
    "cells_per_class": 4,
    "val_batches": 1,
    "val_every": 10,
    "log_every": 5,
    "workers": 0,
    "device": "cpu",
    "z_dim": 8,
    "steps": 30,
    "lr": 3e-3,
}


@pytest.fixture(scope="module")
def decoder_run(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with the decoder, its first decoder layers amplified.

    In 30 steps the decoder learns little more than the mean cell: its output moves by
    ~1e-5 between cells. Scaling the first layer of each branch makes the pictures depend
    on z_c and z_s visibly, as a trained decoder's do, which is what tests of the grids'
    wiring need (the training itself is tested in test_the_decoder_changes_no_embedding).
    """
    from scbd_cells.training.checkpoint import load_checkpoint, save_checkpoint

    run_dir = tmp_path_factory.mktemp("reconstruct") / "run"
    train(tiny_store, out=run_dir, decoder=True, decoder_width=8, decoder_lr=1e-2, **FAST)
    for which in ("best", "last"):
        path = run_dir / "checkpoints" / f"{which}.pt"
        checkpoint = load_checkpoint(path)
        for branch in ("decoder_perturbation", "decoder_batch"):
            checkpoint["model"][f"{branch}.0.weight"] *= 1000
        save_checkpoint(checkpoint, path)
    return run_dir


@pytest.fixture(scope="module")
def pictures(decoder_run: Path, tiny_store: Path, tmp_path_factory: pytest.TempPathFactory):
    out_dir = tmp_path_factory.mktemp("pictures") / "pics"
    return reconstruct(decoder_run, tiny_store, out=out_dir, cells=3, seed=0, which="last")


def _inputs_by_hand(trained, store, rows: np.ndarray) -> np.ndarray:
    """The model's input for store rows, from the store and the run's preprocessor."""
    preprocessor = trained.preprocessor_for(store)
    codes = torch.from_numpy(np.asarray(store.codes(schema.BATCH)[0], dtype=np.int64)[rows])
    pixels = torch.from_numpy(store.read(rows).astype(np.float32))
    return preprocessor(pixels, codes).numpy()


def test_grids_exist_with_the_stated_shapes(pictures, tiny_store: Path) -> None:
    out_dir = pictures.out_dir
    written = sorted(p.name for p in out_dir.iterdir() if p.name != MARKER_NAME)
    assert written == sorted(OUTPUT_FILES)
    assert kind_of(out_dir) == "pictures"  # marked as scbd-cells' own (docs/reliability.md)
    for path in [*pictures.figure_paths.values(), *pictures.channel_figure_paths.values()]:
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 200  # a real picture, not a stub
    store = open_store(tiny_store)
    n_wells = store.obs[schema.BATCH].nunique()  # 4 in tiny
    p = len(pictures.perturbations)
    assert pictures.perturbations[0] == "nontargeting" and p == 5  # control + 4 chosen
    grids = pictures.grids
    assert grids["reconstructions"].images.shape == (p, 2 * 3, 4, 32, 32)
    # a header row of z_s donors (one per other well, at most --wells), then one cell per
    # perturbation: original, reconstruction, then each donor's z_s
    assert grids["swap_well"].images.shape == (1 + p, 2 + (n_wells - 1), 4, 32, 32)
    # a header row of z_c donors (one per non-control perturbation), then a control cell per well
    assert grids["swap_perturbation"].images.shape == (1 + n_wells, 2 + (p - 1), 4, 32, 32)
    assert not np.isnan(grids["reconstructions"].images).any()
    for name in ("swap_well", "swap_perturbation"):
        empty = np.isnan(grids[name].images).all(axis=(2, 3, 4))
        assert np.argwhere(empty).tolist() == [[0, 0], [0, 1]]  # above original, reconstruction


def test_index_matches_the_pictures(pictures, decoder_run: Path, tiny_store: Path) -> None:
    """Every panel is what index.csv says: the cell's model input, or the decoder's image
    from the z_c and z_s of the cells named (computed here without reconstruct's helpers)."""
    index = pd.read_csv(pictures.index_path, dtype={"cell_id": str})
    store = open_store(tiny_store)
    obs = store.obs
    for column in ("cell_id", "perturbation", "guide", "batch", "split"):
        expected = obs[column].astype(str).to_numpy()[index["store_row"]]
        assert (index[column].astype(str).to_numpy() == expected).all(), column
    assert set(index["role"]) == {"original", "reconstruction", "z_c", "z_s"}
    assert (index["split"] == "test").all()  # pictures come from the held-out test cells

    trained = load_trained(decoder_run, which="last", device="cpu")
    rows = np.unique(index["store_row"])
    inputs = _inputs_by_hand(trained, store, rows)
    with torch.inference_mode():
        output = trained.model(torch.from_numpy(inputs))
    at = {row: i for i, row in enumerate(rows)}
    for (grid, row, column), panel in index.groupby(["grid", "row", "column"]):
        image = pictures.grids[grid].images[row, column]
        roles = dict(zip(panel["role"], panel["store_row"], strict=True))
        if "original" in roles:
            np.testing.assert_allclose(image, inputs[at[roles["original"]]], atol=1e-5)
            continue
        z_c_row = roles.get("reconstruction", roles.get("z_c"))
        z_s_row = roles.get("reconstruction", roles.get("z_s"))
        with torch.inference_mode():
            expected = trained.model.decode(
                output.z_perturbation[at[z_c_row]][None], output.z_batch[at[z_s_row]][None]
            )[0].numpy()
        np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-4)
    # swap_well: each column's z_s comes from the donor drawn above it, from another well
    swap_well = index[index["grid"] == "swap_well"]
    donors = swap_well[swap_well["row"] == 0].set_index("column")
    for column, group in swap_well[swap_well["role"] == "z_s"].groupby("column"):
        assert set(group["store_row"]) == {donors.loc[column, "store_row"]}
    home = swap_well.loc[swap_well["role"] == "z_c", "batch"].mode()[0]
    assert donors["batch"].is_unique and home not in set(donors["batch"])


def test_a_swap_changes_the_image_and_a_self_swap_does_not(pictures, decoder_run, tiny_store):
    trained = load_trained(decoder_run, which="last", device="cpu")
    store = open_store(tiny_store)
    batch = store.obs[schema.BATCH].astype(str).to_numpy()
    a = 0
    b = int(np.flatnonzero(batch != batch[a])[0])
    encoded = encode_cells(trained, store, [a, b, 7, 300])
    z_c, z_s = encoded.z_perturbation, encoded.z_batch
    ia, ib = encoded.position([a, b])
    own = decode(trained, z_c[[ia]], z_s[[ia]])[0]
    # a cell's z_c with its own z_s, decoded among other pairs: its reconstruction, unchanged
    mixed = decode(trained, z_c[[ib, ia, ia]], z_s[[ia, ib, ia]])
    np.testing.assert_allclose(mixed[2], own, rtol=1e-5, atol=1e-4)
    # another well's z_s (or another cell's z_c) changes the picture
    assert np.abs(mixed[1] - own).max() > 1e-2
    assert np.abs(mixed[0] - own).max() > 1e-2
    # in the figures too: each swap column differs from the row's own reconstruction
    grid = pictures.grids["swap_well"].images
    for row in range(1, grid.shape[0]):
        for column in range(2, grid.shape[1]):
            assert np.abs(grid[row, column] - grid[row, 1]).max() > 1e-2


def test_same_seed_same_cells_and_named_perturbations(decoder_run, tiny_store, tmp_path, pictures):
    again = reconstruct(
        decoder_run, tiny_store, out=tmp_path / "again", cells=3, seed=0, which="last"
    )
    pd.testing.assert_frame_equal(pd.read_csv(again.index_path), pd.read_csv(pictures.index_path))
    named = reconstruct(
        decoder_run,
        tiny_store,
        out=tmp_path / "named",
        cells=2,
        perturbations=["GENE0003", "GENE0001"],
        wells=2,
        seed=1,
    )
    assert named.perturbations == ["nontargeting", "GENE0003", "GENE0001"]
    assert named.grids["reconstructions"].images.shape[:2] == (3, 4)
    assert named.grids["swap_well"].images.shape[:2] == (4, 4)
    with pytest.raises(InputError, match="GENE9999"):
        reconstruct(decoder_run, tiny_store, out=tmp_path / "x", perturbations=["GENE9999"])


def test_cli_and_output_folder_rules(decoder_run, tiny_store, tmp_path: Path) -> None:
    runner = CliRunner()
    out_dir = tmp_path / "pics"
    command = ["reconstruct", str(decoder_run), str(tiny_store), "--out", str(out_dir)]
    result = runner.invoke(app, [*command, "--cells", "2", "--wells", "2"])
    assert result.exit_code == 0, result.output
    assert (out_dir / "swap_well.png").exists() and (out_dir / "index.csv").exists()
    with pytest.raises(InputError, match="--overwrite"):
        reconstruct(decoder_run, tiny_store, out=out_dir)
    (out_dir / "notes.txt").write_text("mine")
    reconstruct(decoder_run, tiny_store, out=out_dir, cells=1, wells=1, overwrite=True)
    assert (out_dir / "notes.txt").read_text() == "mine"  # only reconstruct's files replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="left alone"):
        reconstruct(decoder_run, tiny_store, out=foreign, overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["data.csv"]


def test_run_without_decoder_names_the_option(tiny_store: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    train(tiny_store, out=run_dir, **dict(FAST, steps=2))
    with pytest.raises(CheckpointError, match="--decoder"):
        reconstruct(run_dir, tiny_store, out=tmp_path / "pics")
    assert not (tmp_path / "pics").exists()  # nothing written before the check
    command = ["reconstruct", str(run_dir), str(tiny_store), "--out", str(tmp_path / "pics")]
    result = subprocess.run(
        [sys.executable, "-m", "scbd_cells", *command], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "--decoder" in result.stderr and "Traceback" not in result.stderr


def test_the_decoder_changes_no_embedding(tiny_store: Path, tmp_path: Path) -> None:
    """Trained on detached embeddings, at its own learning rate, the decoder leaves every
    encoder and head weight bit for bit as in the same run without it (so adding --decoder
    to a run, e.g. the demo's, changes none of its numbers)."""
    from scbd_cells.training.checkpoint import load_checkpoint

    options = dict(FAST, steps=12, lr=3e-3)
    plain = train(tiny_store, out=tmp_path / "plain", **options)
    with_decoder = train(
        tiny_store, out=tmp_path / "decoder", decoder=True, decoder_width=8, decoder_lr=1e-2,
        **options,
    )  # fmt: skip
    assert plain.best_val_loss == with_decoder.best_val_loss
    for which in ("best", "last"):
        a = load_checkpoint(tmp_path / "plain" / "checkpoints" / f"{which}.pt")
        b = load_checkpoint(tmp_path / "decoder" / "checkpoints" / f"{which}.pt")
        assert a["step"] == b["step"]
        assert any(key.startswith("decoder_") for key in b["model"])
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (which, key)
    optimizer = load_checkpoint(tmp_path / "decoder" / "checkpoints" / "last.pt")["optimizer"]
    assert [group["lr"] for group in optimizer["param_groups"]] == [3e-3, 1e-2]
    metrics = pd.read_csv(tmp_path / "decoder" / "metrics.csv")
    assert metrics["reconstruction"].notna().any()
