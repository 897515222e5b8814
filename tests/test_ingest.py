"""Ingest: every input form gives the source pixels exactly; bad input is named; kills resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from scbd_cells import ingest, open_store
from scbd_cells.cli import app
from scbd_cells.core.errors import DataError, InputError, StoreError
from scbd_cells.data import schema
from scbd_cells.data.store import partial_path_of

GENES = ["ACTB", "nontargeting", "TUBB", "POLR2A"]


def screen_table(n: int, *, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    genes = rng.choice(GENES, size=n)
    return pd.DataFrame(
        {
            "cell_id": [f"c{i:03d}" for i in range(n)],
            "gene": genes,
            "guide": [f"{g}_{k}" for g, k in zip(genes, rng.integers(1, 3, n), strict=True)],
            "plate": rng.choice(["P1", "P2"], n),
            "well": rng.choice(["A01", "B01"], n),
            "area": np.round(rng.normal(100, 10, n), 3),
        }
    )


def write_crops(
    root: Path,
    *,
    n: int = 40,
    channels: int = 3,
    size: int = 10,
    form: str = "tif_chw",
    seed: int = 0,
) -> tuple[Path, dict[str, np.ndarray]]:
    """A crops screen: cells.csv plus one file per cell (or per cell and channel).

    Returns the table path and ``{cell_id: (C, H, W) pixels}`` as written.
    """
    rng = np.random.default_rng(seed)
    table = screen_table(n, seed=seed)
    (root / "crops").mkdir(parents=True, exist_ok=True)
    pixels: dict[str, np.ndarray] = {}
    dtype = np.uint8 if form == "png_rgb" else np.uint16
    for i, cell_id in enumerate(table["cell_id"]):
        image = rng.integers(0, np.iinfo(dtype).max, size=(channels, size, size), dtype=dtype)
        pixels[cell_id] = image
        if form == "tif_chw":
            tifffile.imwrite(root / f"crops/{cell_id}.tif", image, photometric="minisblack")
        elif form == "tif_hwc":
            tifffile.imwrite(
                root / f"crops/{cell_id}.tif", np.moveaxis(image, 0, -1), photometric="rgb"
            )
        elif form == "npy":
            np.save(root / f"crops/{cell_id}.npy", image)
        elif form == "png_rgb":
            Image.fromarray(np.moveaxis(image, 0, -1)).save(root / f"crops/{cell_id}.png")
        elif form == "channels":
            for channel in range(channels):
                tifffile.imwrite(
                    root / f"crops/{cell_id}_ch{channel}.tif",
                    image[channel],
                    photometric="minisblack",
                )
                table.loc[i, f"ch{channel}_path"] = f"crops/{cell_id}_ch{channel}.tif"
        elif form == "png16":
            Image.fromarray(image[0]).save(root / f"crops/{cell_id}.png")
            pixels[cell_id] = image[:1]
        else:
            raise ValueError(form)
    suffix = {"npy": "npy", "png_rgb": "png", "png16": "png"}.get(form, "tif")
    if form != "channels":
        table.insert(1, "image_path", [f"crops/{c}.{suffix}" for c in table["cell_id"]])
    table_path = root / "cells.csv"
    table.to_csv(table_path, index=False)
    return table_path, pixels


def write_fields(
    root: Path,
    *,
    n_fields: int = 3,
    cells_per_field: int = 12,
    channels: int = 2,
    shape: tuple[int, int] = (40, 36),
    per_channel: bool = False,
    seed: int = 0,
) -> tuple[Path, dict[str, np.ndarray]]:
    """Fields of view with centroids; returns the table path and ``{field key: (C, H, W)}``."""
    rng = np.random.default_rng(seed)
    (root / "fields").mkdir(parents=True, exist_ok=True)
    table = screen_table(n_fields * cells_per_field, seed=seed)
    fields: dict[str, np.ndarray] = {}
    paths: list[list[str]] = []
    xs, ys = [], []
    for f in range(n_fields):
        field = rng.integers(0, 65_000, size=(channels, *shape), dtype=np.uint16)
        fields[f"f{f}"] = field
        if per_channel:
            names = [f"fields/f{f}_ch{c}.tif" for c in range(channels)]
            for c, name in enumerate(names):
                tifffile.imwrite(root / name, field[c], photometric="minisblack")
        else:
            names = [f"fields/f{f}.tif"]
            tifffile.imwrite(root / names[0], field, photometric="minisblack")
        paths.extend([names] * cells_per_field)
        # centroids anywhere in the field, a few with .5 to exercise rounding
        xs.extend(np.round(rng.uniform(0, shape[1] - 1, cells_per_field), 1))
        ys.extend(np.round(rng.uniform(0, shape[0] - 1, cells_per_field), 1))
    columns = [f"ch{c}_path" for c in range(channels)] if per_channel else ["field_path"]
    for c, column in enumerate(columns):
        table[column] = [names[c] for names in paths]
    table["field"] = [f"f{i // cells_per_field}" for i in range(len(table))]
    table["x"], table["y"] = xs, ys
    table_path = root / "cells.csv"
    table.to_csv(table_path, index=False)
    return table_path, fields


def store_pixels(store_path: Path) -> dict[str, np.ndarray]:
    store = open_store(store_path)
    images = store.read(np.arange(store.n_cells))
    return dict(zip(store.obs.index, images, strict=True))


def assert_labels_match(store_path: Path, table: pd.DataFrame) -> None:
    obs = open_store(store_path).obs
    source = table.set_index("cell_id").loc[obs.index]
    assert (obs[schema.PERTURBATION].astype(str).to_numpy() == source["gene"].to_numpy()).all()
    assert (obs[schema.GUIDE].astype(str).to_numpy() == source["guide"].to_numpy()).all()
    batch = (source["plate"].astype(str) + "_" + source["well"].astype(str)).to_numpy()
    assert (obs[schema.BATCH].astype(str).to_numpy() == batch).all()
    for column in {"area", "tile", "x", "y"} & set(table.columns):  # metadata carried along
        np.testing.assert_allclose(obs[column].to_numpy(), source[column].to_numpy())


# ---------------------------------------------------------------------------
# input forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "table_format", "workers"),
    [
        ("tif_chw", "csv", 2),
        ("tif_hwc", "tsv", 1),
        ("npy", "parquet", 2),
        ("png_rgb", "csv", 1),
        ("png16", "csv", 1),
        ("channels", "csv", 2),
    ],
)
def test_crops_equal_source_pixels(
    tmp_path: Path, form: str, table_format: str, workers: int
) -> None:
    table_path, pixels = write_crops(tmp_path, form=form)
    table = pd.read_csv(table_path)
    if table_format == "tsv":
        table_path = tmp_path / "cells.tsv"
        table.to_csv(table_path, sep="\t", index=False)
    elif table_format == "parquet":
        table_path = tmp_path / "cells.parquet"
        table.to_parquet(table_path)
    options = (
        {"channel_columns": ["ch0_path", "ch1_path", "ch2_path"]} if form == "channels" else {}
    )
    result = ingest(
        table_path,
        out=tmp_path / "s.zarr",
        perturbation_column="gene",
        guide_column="guide",
        control="nontargeting",
        workers=workers,
        **options,
    )
    assert result.n_cells == len(pixels) and result.n_rejected == 0
    stored = store_pixels(tmp_path / "s.zarr")
    assert stored.keys() == pixels.keys()
    for cell_id, image in pixels.items():
        assert stored[cell_id].dtype == image.dtype
        np.testing.assert_array_equal(stored[cell_id], image)
    assert_labels_match(tmp_path / "s.zarr", table)
    # statistics gathered from the workers equal numpy's over the train cells
    store = open_store(tmp_path / "s.zarr")
    train = store.obs.index[store.obs[schema.SPLIT] == "train"]
    pixels = np.stack([pixels[c] for c in train]).transpose(1, 0, 2, 3).reshape(len(image), -1)
    np.testing.assert_allclose(store.channel_stats["mean"], pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(store.channel_stats["std"], pixels.std(axis=1), rtol=1e-9)
    expected_p99 = np.percentile(pixels, 99, axis=1, method="inverted_cdf")
    np.testing.assert_array_equal(store.channel_stats["p99"], expected_p99)
    if form == "channels":
        assert result.channel_names == ["ch0", "ch1", "ch2"]


@pytest.mark.parametrize("per_channel", [False, True])
def test_fields_cut_crops_with_rint_and_skip_border_cells(
    tmp_path: Path, per_channel: bool
) -> None:
    table_path, fields = write_fields(tmp_path, per_channel=per_channel)
    table = pd.read_csv(table_path)
    options = (
        {"fov_channel_columns": ["ch0_path", "ch1_path"]}
        if per_channel
        else {"fov_column": "field_path"}
    )
    size = 9
    result = ingest(
        table_path,
        out=tmp_path / "s.zarr",
        perturbation_column="gene",
        guide_column="guide",
        x_column="x",
        y_column="y",
        crop_size=size,
        channel_names=["dna", "actin"],
        workers=2,
        **options,
    )
    expected = {}
    for row in table.itertuples():
        field = fields[row.field]
        top, left = int(np.rint(row.y)) - size // 2, int(np.rint(row.x)) - size // 2
        if (
            top >= 0
            and left >= 0
            and top + size <= field.shape[1]
            and left + size <= field.shape[2]
        ):
            expected[row.cell_id] = field[:, top : top + size, left : left + size]
    assert 0 < len(expected) < len(table)  # some border cells exist in this layout
    assert result.n_border == len(table) - len(expected) and result.n_cells == len(expected)
    stored = store_pixels(tmp_path / "s.zarr")
    assert stored.keys() == expected.keys()
    for cell_id, crop in expected.items():
        np.testing.assert_array_equal(stored[cell_id], crop)
    store = open_store(tmp_path / "s.zarr")
    assert store.channel_names == ["dna", "actin"]
    rejected = store.rejected
    assert len(rejected) == result.n_border and rejected["reason"].str.startswith("border").all()
    assert_labels_match(tmp_path / "s.zarr", table[table["cell_id"].isin(list(expected))])


def test_simulated_crops_equal_tifffile_reads(tiny_screen: Path, tiny_store: Path) -> None:
    table = pd.read_csv(tiny_screen / "cells.csv", dtype={"cell_id": str})
    store = open_store(tiny_store)
    assert store.n_cells == len(table) and store.control == schema.CONTROL_LABEL
    paths = table.set_index("cell_id")["image_path"]
    images = store.read(np.arange(store.n_cells))
    for cell_id, image in zip(store.obs.index, images, strict=True):
        np.testing.assert_array_equal(image, tifffile.imread(tiny_screen / paths[cell_id]))
    assert_labels_match(tiny_store, table)


def test_simulated_fields_equal_tifffile_reads(
    tmp_path: Path, tiny_screen: Path, tiny_store: Path
) -> None:
    from scbd_cells import simulate

    simulate(tmp_path / "fields", preset="tiny", layout="fields", seed=0)
    table = pd.read_csv(tmp_path / "fields" / "cells.csv", dtype={"cell_id": str})
    columns = [f"{name}_path" for name in schema.SIM_CHANNELS]
    crop = open_store(tiny_store).image_size[0]
    result = ingest(
        tmp_path / "fields" / "cells.csv",
        out=tmp_path / "f.zarr",
        perturbation_column="gene",
        guide_column="guide",
        control="nontargeting",
        fov_channel_columns=columns,
        x_column="x",
        y_column="y",
        crop_size=crop,
        workers=2,
    )
    assert result.channel_names == list(schema.SIM_CHANNELS)
    assert result.n_cells + result.n_border == len(table)
    store = open_store(tmp_path / "f.zarr")
    rows = table.set_index("cell_id")
    cache: dict[str, np.ndarray] = {}
    for cell_id, image in zip(store.obs.index, store.read(np.arange(store.n_cells)), strict=True):
        row = rows.loc[cell_id]
        for column in columns:
            path = str(row[column])
            if path not in cache:
                cache[path] = tifffile.imread(tmp_path / "fields" / path)
        field = np.stack([cache[str(row[column])] for column in columns])
        top, left = int(np.rint(row["y"])) - crop // 2, int(np.rint(row["x"])) - crop // 2
        np.testing.assert_array_equal(image, field[:, top : top + crop, left : left + crop])
    # the simulator's crops are the same windows
    crops = store_pixels(tiny_store)
    for cell_id, image in zip(store.obs.index[:50], store.read(np.arange(50)), strict=True):
        np.testing.assert_array_equal(image, crops[cell_id])
    assert_labels_match(tmp_path / "f.zarr", table)


def test_resize_averages_areas_and_keeps_dtype(tmp_path: Path) -> None:
    table_path, pixels = write_crops(tmp_path, n=12, size=12)
    result = ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene", resize=6)
    assert result.image_size == (6, 6)
    stored = store_pixels(tmp_path / "s.zarr")
    for cell_id, image in pixels.items():
        expected = np.rint(image.reshape(3, 6, 2, 6, 2).astype(np.float64).mean(axis=(2, 4)))
        assert stored[cell_id].dtype == np.uint16
        np.testing.assert_array_equal(stored[cell_id], expected)


def test_existing_store_needs_overwrite(tmp_path: Path) -> None:
    table_path, _ = write_crops(tmp_path, n=8)
    first = ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene")
    assert not first.already_complete
    first_id = open_store(tmp_path / "s.zarr").store_id
    again = ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene")
    assert again.already_complete and again.n_cells == first.n_cells
    assert open_store(tmp_path / "s.zarr").store_id == first_id  # untouched
    with pytest.raises(InputError, match=r"seed \(0 then, 1 now\).*--overwrite"):
        ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene", seed=1)
    table = pd.read_csv(table_path)
    table.loc[0, "gene"] = "other"
    table.to_csv(table_path, index=False)
    with pytest.raises(InputError, match="table's content"):
        ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene")
    ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene", overwrite=True)
    assert open_store(tmp_path / "s.zarr").store_id != first_id


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def _missing_file(root: Path, table: pd.DataFrame) -> dict:
    for row in (3, 7):
        (root / table.loc[row, "image_path"]).unlink()
    return {"rows": [3, 7], "match": "file not found"}


def _corrupt_tiff(root: Path, table: pd.DataFrame) -> dict:
    (root / table.loc[5, "image_path"]).write_bytes(b"II*\x00 this is not a tiff")
    return {"rows": [5], "match": "cannot read"}


def _truncated_tiff(root: Path, table: pd.DataFrame) -> dict:
    path = root / table.loc[9, "image_path"]
    path.write_bytes(path.read_bytes()[:300])  # the header survives, the pixels do not
    return {"rows": [9], "match": "cannot read"}


def _wrong_channel_count(root: Path, table: pd.DataFrame) -> dict:
    tifffile.imwrite(
        root / table.loc[4, "image_path"],
        np.zeros((2, 10, 10), np.uint16),
        photometric="minisblack",
    )
    return {"rows": [4], "match": "wrong channel count"}


def _mismatched_size(root: Path, table: pd.DataFrame) -> dict:
    tifffile.imwrite(
        root / table.loc[6, "image_path"],
        np.zeros((3, 12, 12), np.uint16),
        photometric="minisblack",
    )
    return {"rows": [6], "match": "mismatched crop size"}


def _null_labels(root: Path, table: pd.DataFrame) -> dict:
    table.loc[[2, 11], "gene"] = None
    return {"rows": [2, 11], "match": "null"}


def _duplicate_ids(root: Path, table: pd.DataFrame) -> dict:
    table.loc[8, "cell_id"] = table.loc[1, "cell_id"]
    return {"rows": [8], "match": "repeats cell ids", "reason": "duplicate cell id"}


@pytest.mark.parametrize(
    "damage",
    [
        _missing_file,
        _corrupt_tiff,
        _truncated_tiff,
        _wrong_channel_count,
        _mismatched_size,
        _null_labels,
        _duplicate_ids,
    ],
)
def test_bad_rows_are_named_or_skipped(tmp_path: Path, damage) -> None:
    table_path, pixels = write_crops(tmp_path, n=24)
    table = pd.read_csv(table_path)
    expected = damage(tmp_path, table)
    table.to_csv(table_path, index=False)
    out = tmp_path / "s.zarr"
    with pytest.raises(DataError, match=expected["match"]) as error:
        ingest(table_path, out=out, perturbation_column="gene", channel_names=["a", "b", "c"])
    message = str(error.value)
    for row in expected["rows"]:
        assert f"row {row}" in message or f"rows {row}" in message or f", {row}" in message
    assert "--skip-bad" in message
    assert not out.exists()
    with pytest.raises(StoreError):
        open_store(out)

    result = ingest(
        table_path,
        out=out,
        perturbation_column="gene",
        channel_names=["a", "b", "c"],
        skip_bad=True,
    )
    store = open_store(out)
    assert result.n_rejected == len(expected["rows"]) == len(store.rejected)
    assert store.rejected["row"].tolist() == expected["rows"]
    reason = expected.get("reason", expected["match"])
    assert store.rejected["reason"].str.contains(reason, case=False).all()
    assert store.n_cells == len(table) - len(expected["rows"])
    stored = store_pixels(out)
    for cell_id, image in stored.items():
        np.testing.assert_array_equal(image, pixels[cell_id])


def test_table_level_problems(tmp_path: Path) -> None:
    table_path, _ = write_crops(tmp_path, n=10)
    out = tmp_path / "s.zarr"
    with pytest.raises(InputError, match="no column 'gene_symbol'"):
        ingest(table_path, out=out, perturbation_column="gene_symbol", skip_bad=True)
    with pytest.raises(InputError, match="control label 'NTC'"):
        ingest(table_path, out=out, perturbation_column="gene", control="NTC", skip_bad=True)
    with pytest.raises(InputError, match="no column 'plate_id'"):
        ingest(table_path, out=out, perturbation_column="gene", batch_columns=["plate_id"])
    with pytest.raises(InputError, match="exactly one of"):
        ingest(
            table_path,
            out=out,
            perturbation_column="gene",
            image_column="image_path",
            fov_column="image_path",
        )
    empty = tmp_path / "empty.csv"
    pd.read_csv(table_path).head(0).to_csv(empty, index=False)
    with pytest.raises(DataError, match="empty"):
        ingest(empty, out=out, perturbation_column="gene", skip_bad=True)
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        ingest(tmp_path / "blank.csv", out=out, perturbation_column="gene")
    assert not out.exists() and not partial_path_of(out).exists()


def test_centroid_outside_the_image(tmp_path: Path) -> None:
    table_path, _ = write_fields(tmp_path)
    table = pd.read_csv(table_path)
    table.loc[4, "x"] = 500.0
    table.loc[7, "y"] = -3.0
    table.to_csv(table_path, index=False)
    options = dict(
        perturbation_column="gene", fov_column="field_path", x_column="x", y_column="y", crop_size=5
    )
    with pytest.raises(DataError, match="centroid outside the image") as error:
        ingest(table_path, out=tmp_path / "s.zarr", **options)
    assert "row 4" in str(error.value) and "row 7" in str(error.value)
    assert not (tmp_path / "s.zarr").exists()
    result = ingest(table_path, out=tmp_path / "s.zarr", skip_bad=True, **options)
    rejected = open_store(tmp_path / "s.zarr").rejected
    assert result.n_rejected == 2
    assert rejected[rejected["reason"].str.contains("centroid")]["row"].tolist() == [4, 7]


def test_cli_exit_code_and_info(tmp_path: Path) -> None:
    table_path, _ = write_crops(tmp_path, n=16)
    (tmp_path / "crops" / "c003.tif").unlink()
    command = [
        sys.executable,
        "-m",
        "scbd_cells",
        "ingest",
        str(table_path),
        "--out",
        str(tmp_path / "s.zarr"),
        "--perturbation-column",
        "gene",
        "--control",
        "nontargeting",
    ]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "row 3" in failed.stderr and "Traceback" not in failed.stderr
    done = subprocess.run([*command, "--skip-bad"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shown = CliRunner().invoke(app, ["info", str(tmp_path / "s.zarr"), "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    store = open_store(tmp_path / "s.zarr")
    assert summary["n_cells"] == 15 == store.n_cells and summary["n_rejected"] == 1
    assert summary["format_version"] == schema.STORE_FORMAT_VERSION
    assert sum(summary["splits"].values()) == 15
    counts = store.obs[schema.PERTURBATION].value_counts()
    assert summary["cells_per_perturbation"]["max"] == counts.max()
    assert summary["control_cells"] == counts["nontargeting"]
    assert "provenance" not in summary and store.provenance["command"].startswith(
        "scbd-cells ingest"
    )
    table = CliRunner().invoke(app, ["info", str(tmp_path / "s.zarr")])
    assert table.exit_code == 0 and "perturbations" in table.output


# ---------------------------------------------------------------------------
# crash and resume
# ---------------------------------------------------------------------------

_KILLABLE = textwrap.dedent(
    """
    import sys, time
    import scbd_cells.data.store as store
    store._CHUNK_TARGET_BYTES = 8 * 600  # 8 cells per chunk
    store._BLOCK_TARGET_BYTES = 16 * 600  # 16 cells per block: many blocks to resume
    record_block = store.StoreWriter.record_block

    def slow_record_block(self, block, stats):
        record_block(self, block, stats)
        time.sleep(0.15)

    store.StoreWriter.record_block = slow_record_block
    from scbd_cells import ingest
    ingest(sys.argv[1], out=sys.argv[2], perturbation_column="gene", guide_column="guide")
    """
)


def test_killed_ingest_resumes_with_every_cell_once(tmp_path: Path) -> None:
    table_path, pixels = write_crops(tmp_path, n=240, seed=3)
    out = tmp_path / "s.zarr"
    written = partial_path_of(out) / "written_blocks.txt"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(table_path), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        if written.exists() and len(written.read_text().split()) >= 3:
            break
        time.sleep(0.02)
    running = process.poll() is None
    if running:
        os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()  # also closes the pipe
    assert running, stderr.decode()
    n_written = len(written.read_text().split())
    assert 3 <= n_written < 15  # killed midway
    with pytest.raises(StoreError, match="unfinished"):
        open_store(out)

    result = ingest(table_path, out=out, perturbation_column="gene", guide_column="guide")
    assert result.resumed
    store = open_store(out)
    assert store.layout["block_cells"] == 16  # the interrupted run's geometry was kept
    assert sorted(store.obs.index) == sorted(pixels) and store.obs.index.is_unique
    stored = store_pixels(out)
    for cell_id, image in pixels.items():
        np.testing.assert_array_equal(stored[cell_id], image)
    assert not partial_path_of(out).exists()


@pytest.mark.parametrize(
    "options",
    [
        {"photometric": "minisblack"},
        {"photometric": "minisblack", "byteorder": ">"},
        {"photometric": "minisblack", "compression": "zlib"},
        {"photometric": "rgb", "planarconfig": "contig"},
        {"photometric": "minisblack", "rowsperstrip": 3},
    ],
)
def test_tiff_reads_equal_tifffile(tmp_path: Path, options: dict) -> None:
    """The template fast path for same-structure TIFFs gives tifffile's pixels, or steps aside."""
    from scbd_cells.data.ingest import read_image

    rng = np.random.default_rng(0)
    shape = (8, 9, 3) if options["photometric"] == "rgb" else (3, 8, 9)
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.tif"
        # same length, different text: the header differs, the file size does not
        tifffile.imwrite(
            path, rng.integers(0, 65535, shape, dtype=np.uint16), description=f"cell {i}", **options
        )
        paths.append(path)
    for path in paths * 2:
        expected = tifffile.imread(path)
        pixels = read_image(path)
        assert pixels.dtype == expected.dtype and pixels.dtype.isnative
        np.testing.assert_array_equal(pixels, expected)


def test_interrupted_fields_ingest_resumes_from_its_scratch(tmp_path: Path, monkeypatch) -> None:
    """Fields: an ingest stopped after cutting the fields resumes without cutting them again."""
    import scbd_cells.data.ingest as ingest_module

    table_path, _ = write_fields(tmp_path, n_fields=4)
    options = dict(
        perturbation_column="gene", fov_column="field_path", x_column="x", y_column="y", crop_size=7
    )
    reference = ingest(table_path, out=tmp_path / "reference.zarr", **options)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the blocks were written

    monkeypatch.setattr(ingest_module, "_store_scratch", crash)
    with pytest.raises(KeyboardInterrupt):
        ingest(table_path, out=tmp_path / "s.zarr", **options)
    partial = partial_path_of(tmp_path / "s.zarr")
    assert len((partial / "fields_done.txt").read_text().split()) == 4
    monkeypatch.undo()
    cut = []
    monkeypatch.setattr(ingest_module, "_cut_field", lambda *a: cut.append(a) or (None, None, None))
    result = ingest(table_path, out=tmp_path / "s.zarr", **options)
    assert result.resumed and cut == []  # no field was read again
    assert result.n_cells == reference.n_cells
    np.testing.assert_array_equal(
        open_store(tmp_path / "s.zarr").images[:], open_store(tmp_path / "reference.zarr").images[:]
    )
    assert not partial.exists()


def test_nothing_readable_is_an_error_even_with_skip_bad(tmp_path: Path) -> None:
    table_path, _ = write_crops(tmp_path, n=6)
    for path in (tmp_path / "crops").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="No image could be read"):
        ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene", skip_bad=True)
    for path in (tmp_path / "crops").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="No usable cells"):
        ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene", skip_bad=True)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(("height", "width", "size"), [(10, 10, 4), (9, 7, 5), (12, 12, 12)])
def test_resize_is_exact_area_averaging(height: int, width: int, size: int) -> None:
    """Non-integer factors: equal to averaging a finely replicated image over each output cell."""
    from scbd_cells.data.ingest import resize_images

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 60_000, (2, 3, height, width))  # float: no rounding to compare
    # replicate each pixel size x size times: every output cell is then a whole block
    fine = images.repeat(size, axis=2).repeat(size, axis=3)
    expected = fine.reshape(2, 3, size, height, size, width).mean(axis=(3, 5))
    resized = resize_images(images, size)
    assert resized.dtype == np.float64
    np.testing.assert_allclose(resized, expected, rtol=1e-12)
