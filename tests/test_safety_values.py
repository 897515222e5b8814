"""Data safety for values and requests: no silent NaN, no unbounded request, the cause named.

Cases of docs/reliability.md (issue 21): non-finite profiles refused by every writer,
ComBat's preconditions, missing batch labels, requests larger than the data, a disk that
fills up during embed (a real small tmpfs, root only: skipped elsewhere), and messages
that name the real cause.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from stores import FAST, cli, well_store

from scbd_cells import train


def mount_tmpfs(path: Path, *, size: str) -> None:
    """A real small filesystem at ``path``; the test is skipped where none can be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(
            "a full disk is tested on a small tmpfs, which only root can mount here: "
            f"{result.stderr.decode().strip() or 'mount failed'}"
        )


@pytest.fixture
def small_disk(tmp_path: Path):
    """An 8 MiB tmpfs, unmounted after the test."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, size="8m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, run folder): 192 cells, 4 training steps."""
    root = tmp_path_factory.mktemp("values")
    store_path = well_store(root / "s.zarr", control="nontargeting", chunk_cells=16)
    train(store_path, out=root / "run", steps=4, val_every=2, **FAST)
    return store_path, root / "run"


def cells_file(path: Path, *, n_wells: int = 3, per_well: int = 6, seed: int = 0) -> Path:
    """A lab's cell-level AnnData: 5 features, gene / guide / well / batch in obs."""
    rng = np.random.default_rng(seed)
    n = n_wells * per_well
    obs = pd.DataFrame(
        {
            "perturbation": [["nontargeting", "g1", "g2"][i % 3] for i in range(n)],
            "guide": [f"sg{i % 6}" for i in range(n)],
            "plate": "P1",
            "well": [f"W{i // per_well}" for i in range(n)],
        },
        index=[f"c{i}" for i in range(n)],
    )
    obs["batch"] = obs["plate"] + "_" + obs["well"]
    adata = ad.AnnData(X=rng.normal(size=(n, 5)).astype(np.float32), obs=obs)
    adata.write_h5ad(path)
    return path


# --------------------------------------------------------------------------- 4. full disk


@pytest.fixture(scope="module")
def trained_4k(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, run): 4,096 cells, so that embed's encoder output (1.3 MiB) outgrows HDF5's
    1 MiB reserve and chunk cache, as a real screen's does."""
    root = tmp_path_factory.mktemp("values_4k")
    store_path = well_store(root / "s.zarr", cells_per_well=128)
    train(store_path, out=root / "run", steps=2, val_every=2, **FAST)
    return store_path, root / "run"


FILL_THE_DISK = """
import os
import sys
from scbd_cells.profiles import anndata_io
from scbd_cells.cli import main

disk, when = {disk!r}, {when!r}

def fill():  # another process takes all the room left on the disk
    handle = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(handle, b"\\1" * 4096)
    except OSError:
        os.close(handle)

real_write, real_write_any, calls = anndata_io.CellsWriter.write, anndata_io.write_any, []

def write_then_fill(self, start, values):
    calls.append(start)
    if when == "batch" and len(calls) == 2:
        fill()
    return real_write(self, start, values)

def skeleton_then_fill(adata, path):
    real_write_any(adata, path)
    if when == "skeleton":
        fill()

anndata_io.CellsWriter.write = write_then_fill
anndata_io.write_any = skeleton_then_fill
sys.argv = ["scbd-cells", "embed", {run!r}, {store!r}, "--out", os.path.join(disk, "cells.h5ad"),
            "--representation", "encoder", "--batch-size", "512"]
main()
"""


def embed_filling(disk: Path, store_path: Path, run_dir: Path, *, when: str):
    script = FILL_THE_DISK.format(
        disk=str(disk), when=when, run=str(run_dir), store=str(store_path)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env
    )


def test_a_disk_that_fills_up_during_embed_does_not_crash_it(
    trained_4k, small_disk: Path, tmp_path: Path, capsys
) -> None:
    """The embeddings' room is taken when the file is created: a later fill changes nothing.

    Before, HDF5 held the batches in its caches and failed to write them when the file was
    closed: the message, ~25 lines of h5py "Exception ignored", then a segfault (exit 139).
    """
    store_path, run_dir = trained_4k
    result = embed_filling(small_disk, store_path, run_dir, when="batch")
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
    assert (small_disk / "filler").stat().st_size > 3 * 2**20  # the fill did happen
    code, _ = cli(
        capsys, "embed", run_dir, store_path, "--out", tmp_path / "reference.h5ad",
        "--representation", "encoder", "--batch-size", "512",
    )  # fmt: skip
    assert code == 0
    written, reference = ad.read_h5ad(small_disk / "cells.h5ad"), ad.read_h5ad(
        tmp_path / "reference.h5ad"
    )
    assert written.n_obs == 4096
    np.testing.assert_array_equal(written.X, reference.X)
    for key in reference.obsm:
        np.testing.assert_array_equal(written.obsm[key], reference.obsm[key])


def test_a_disk_full_before_the_embeddings_have_room_is_a_message(
    trained_4k, small_disk: Path
) -> None:
    """Filled right after the cell table is written: the message, exit 1, nothing left."""
    store_path, run_dir = trained_4k
    result = embed_filling(small_disk, store_path, run_dir, when="skeleton")
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Not enough room for" in result.stderr and str(small_disk / "cells.h5ad") in (
        result.stderr.replace("\n", "")
    )
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
    assert "bug" not in result.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# --------------------------------------------------------------------------- 3. non-finite


def test_combat_refuses_a_batch_of_one_cell(tmp_path: Path, capsys) -> None:
    """ComBat gave NaN for every value (exit 0); now the small batch is named."""
    path = cells_file(tmp_path / "cells.h5ad")
    adata = ad.read_h5ad(path)
    lonely = adata[:1].copy()
    lonely.obs_names = ["lonely"]
    lonely.obs["batch"] = "P1_W9"
    ad.concat([adata, lonely], merge="same").write_h5ad(path)
    out = tmp_path / "combat.h5ad"
    code, output = cli(capsys, "correct", path, "--method", "combat", "--out", out)
    assert code == 1 and "'P1_W9'" in output and "at least 2 cells" in output
    assert not out.exists()
    # a batch label unique to each cell: every batch is too small
    code, output = cli(
        capsys, "correct", path, "--method", "combat", "--batch-key", "guide,well", "--out", out
    )
    assert code == 1 and "at least 2 cells" in output and not out.exists()


def test_combat_refuses_constant_features(tmp_path: Path, capsys) -> None:
    path = cells_file(tmp_path / "cells.h5ad")
    adata = ad.read_h5ad(path)
    adata.X = np.ones_like(adata.X)
    adata.write_h5ad(path)
    out = tmp_path / "combat.h5ad"
    code, output = cli(capsys, "correct", path, "--method", "combat", "--out", out)
    assert code == 1 and "constant" in output and not out.exists()


def test_no_anndata_is_written_with_nan_or_inf(tmp_path: Path) -> None:
    """The one AnnData writer (correct, baseline, embed's profiles) refuses non-finite rows."""
    from scbd_cells.core.errors import DataError
    from scbd_cells.profiles.anndata_io import write_anndata

    adata = ad.read_h5ad(cells_file(tmp_path / "cells.h5ad"))
    adata.X[3, 1] = np.nan
    adata.obsm["X_pca"] = np.zeros((adata.n_obs, 2), dtype=np.float32)
    out = tmp_path / "out.h5ad"
    with pytest.raises(DataError, match=r"1 of 18 rows of its X .*rows c3\)"):
        write_anndata(adata, out, overwrite=False)
    adata.X[3, 1] = 0
    adata.obsm["X_pca"][[5, 7]] = np.inf
    with pytest.raises(DataError, match=r"obsm\['X_pca'\] .*rows c5, c7"):
        write_anndata(adata, out, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]


# --------------------------------------------------------------------------- 7. missing labels


@pytest.mark.parametrize(
    "command",
    [
        ["correct", "--method", "harmony"],
        ["correct", "--method", "center-scale"],
        ["correct", "--method", "combat"],
        ["export", "--level", "well"],
        ["evaluate"],
    ],
    ids=["harmony", "center-scale", "combat", "export", "evaluate"],
)
def test_missing_batch_labels_are_an_error_naming_the_rows(
    tmp_path: Path, capsys, write_corum, command: list[str]
) -> None:
    """Missing batch labels were pooled into a well named "nan" (ComBat: a LinAlgError)."""
    path = cells_file(tmp_path / "cells.h5ad", n_wells=4)
    adata = ad.read_h5ad(path)
    adata.obs["batch"] = pd.Categorical(adata.obs["batch"].astype(object).where(
        ~adata.obs_names.isin(["c2", "c11"]), None
    ))  # fmt: skip
    adata.write_h5ad(path)
    suffix = {"export": "parquet", "evaluate": ""}.get(command[0], "h5ad")
    out = tmp_path / (f"out.{suffix}" if suffix else "report")
    extra = []
    if command[0] == "evaluate":
        extra = ["--corum", write_corum(tmp_path / "corum.txt", {"c": ["g1", "g2"]})]
    code, output = cli(capsys, command[0], path, *command[1:], *extra, "--out", out)
    assert code == 1, output
    assert "'batch' is missing for 2 of 24 cells" in output and "'c2', 'c11'" in output
    assert not out.exists()


# --------------------------------------------------------------------------- 8. export


@pytest.mark.parametrize("level", ["cell", "guide"])
def test_export_refuses_nan_values_naming_the_cells(tmp_path: Path, capsys, level: str) -> None:
    path = cells_file(tmp_path / "cells.h5ad")
    adata = ad.read_h5ad(path)
    adata.X[[4, 9], 2] = [np.nan, np.inf]
    adata.write_h5ad(path)
    out = tmp_path / "profiles.parquet"
    code, output = cli(capsys, "export", path, "--level", level, "--out", out)
    assert code == 1 and "2 of 18 cells (cells c4, c9)" in output, output
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "cells.h5ad"
    ]


def test_export_refuses_an_empty_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "empty.h5ad"
    empty = ad.read_h5ad(cells_file(tmp_path / "cells.h5ad"))[:0].copy()
    empty.write_h5ad(path)
    out = tmp_path / "profiles.parquet"
    code, output = cli(capsys, "export", path, "--level", "well", "--out", out)
    assert code == 1 and "no profiles to export: 0 cells" in output and not out.exists()


def test_export_refuses_a_guide_key_that_is_gene_by_well(tmp_path: Path, capsys) -> None:
    path = cells_file(tmp_path / "cells.h5ad")
    adata = ad.read_h5ad(path)
    obs = adata.obs.astype(str)
    adata.obs["gene_well"] = obs["perturbation"] + "@" + obs["well"]
    adata.write_h5ad(path)
    out = tmp_path / "profiles.parquet"
    code, output = cli(
        capsys, "export", path, "--level", "guide", "--guide-key", "gene_well", "--out", out
    )
    assert code == 1 and "'gene_well' holds 9 values, each in a single well" in output, output
    assert not out.exists()
    # the real guide column (each guide in every well) is exported
    code, output = cli(capsys, "export", path, "--level", "guide", "--out", out)
    assert code == 0 and len(pd.read_parquet(out)) == 18


# --------------------------------------------------------------------------- 6. requests


def test_reconstruct_refuses_more_cells_than_the_store_holds(trained, tmp_path, capsys) -> None:
    """--cells 5000 on a small store took 8 GB and minutes before being killed."""
    store_path, run_dir = trained
    out = tmp_path / "pictures"
    code, output = cli(capsys, "reconstruct", run_dir, store_path, "--out", out, "--cells", 5000)
    assert code == 2 and "--cells 5,000" in output and "holds 192 cells" in output, output
    assert "Use --cells 64 or fewer" in output and not out.exists()


SMALL_RUN = ["--encoder", "tiny", "--device", "cpu", "--steps", 1, "--val-every", 1,
             "--classes-per-batch", 6, "--workers", 0]  # fmt: skip


def test_train_refuses_an_image_size_far_beyond_the_crops(trained, tmp_path, capsys) -> None:
    """--image-size 4096 on small crops tried a 36 GB allocation (4096 would still be
    tried if this check broke: 64 px, over 4 x the 12 px crops, is refused as well)."""
    store_path, _ = trained
    out = tmp_path / "run"
    code, output = cli(capsys, "train", store_path, "--out", out, "--image-size", 64, *SMALL_RUN)
    assert code == 2 and "--image-size 64" in output and "12 px" in output, output
    assert "at most 48" in output and not out.exists()
    code, _ = cli(capsys, "train", store_path, "--out", out, "--image-size", 48, *SMALL_RUN)
    assert code == 0


# --------------------------------------------------------------------------- 14. cells per class


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_one_cell_per_class_is_refused(trained, tmp_path, capsys, command, write_corum) -> None:
    """With one cell of each class in a batch, SupCon has no positive pair."""
    store_path, _ = trained
    out = tmp_path / "out"
    extra = ["--corum", write_corum(tmp_path / "c.txt", {"c": ["gene_1", "gene_2"]})]
    code, output = cli(
        capsys, command, store_path, "--out", out, "--cells-per-class", 1, *SMALL_RUN,
        *(extra if command == "sweep" else []),
    )  # fmt: skip
    assert code == 2 and "cells_per_class" in output and "greater than or equal to 2" in output
    assert not out.exists()


# --------------------------------------------------------------------------- 12. internal errors


def test_reconstruct_with_a_malformed_device_is_a_usage_error(trained, tmp_path, capsys) -> None:
    store_path, run_dir = trained
    out = tmp_path / "pictures"
    code, output = cli(
        capsys, "reconstruct", run_dir, store_path, "--out", out, "--device", "cuda:x"
    )
    assert code == 2 and "'cuda:x'" in output and "bug" not in output, output


@pytest.fixture
def unknown_codec_store(trained, tmp_path: Path) -> Path:
    """A copy of the store whose images/zarr.json names a codec zarr does not know."""
    import json
    import shutil

    copy = tmp_path / "codec.zarr"
    shutil.copytree(trained[0], copy)
    metadata_path = copy / "images" / "zarr.json"
    text = metadata_path.read_text()
    assert '"name": "blosc"' in text
    metadata_path.write_text(text.replace('"name": "blosc"', '"name": "blosc9"'))
    json.loads(metadata_path.read_text())
    return copy


@pytest.mark.parametrize("command", ["info", "embed", "baseline", "train"])
def test_an_unknown_codec_in_the_store_is_a_store_error(
    trained, unknown_codec_store, tmp_path, capsys, command
) -> None:
    run_dir = trained[1]
    args = {
        "info": [unknown_codec_store],
        "embed": [run_dir, unknown_codec_store, "--out", tmp_path / "cells.h5ad"],
        "baseline": [unknown_codec_store, "--out", tmp_path / "baseline.h5ad"],
        "train": [unknown_codec_store, "--out", tmp_path / "run", "--encoder", "tiny"],
    }[command]
    code, output = cli(capsys, command, *args)
    assert code == 1 and "cannot read" in output and "blosc9" in output, output
    assert "bug" not in output


def test_float64_values_beyond_float32_are_refused(tmp_path: Path, capsys, write_corum) -> None:
    """1e300 became inf when read as float32: evaluate failed as a bug, export wrote inf."""
    path = cells_file(tmp_path / "cells.h5ad")
    adata = ad.read_h5ad(path)
    adata.X = adata.X.astype(np.float64)
    adata.X[3, 1] = 1e300
    adata.write_h5ad(path)
    corum = write_corum(tmp_path / "corum.txt", {"c": ["g1", "g2"]})
    code, output = cli(capsys, "evaluate", path, "--corum", corum, "--out", tmp_path / "report")
    assert code == 1 and "1 NaN or infinite values (float64 beyond" in output, output
    assert "bug" not in output
    out = tmp_path / "cells.parquet"
    code, output = cli(capsys, "export", path, "--level", "cell", "--out", out)
    assert code == 1 and "beyond-float32" in output and "(cells c3)" in output, output
    assert not out.exists()


# --------------------------------------------------------------------------- 13. the cause named


def test_missing_perturbation_labels_are_named_as_missing(tmp_path: Path) -> None:
    """They were reported as "guide assigned to more than one perturbation"."""
    from scbd_cells import aggregate_profiles
    from scbd_cells.core.errors import DataError

    adata = ad.read_h5ad(cells_file(tmp_path / "cells.h5ad"))
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(object).where(
        adata.obs_names != "c4", None
    )
    with pytest.raises(DataError, match=r"'perturbation' is missing for 1 of 18 cells \(rows 'c4'"):
        aggregate_profiles(adata, control="nontargeting")


def test_a_store_without_its_images_array_is_named_damaged(trained, tmp_path, capsys) -> None:
    """It was reported as an unfinished ingest ("completion flag not set")."""
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(trained[0], copy)
    (copy / "images" / "zarr.json").unlink()
    code, output = cli(capsys, "info", copy)
    assert code == 1 and "images array is missing" in output and "completion flag" not in output


def test_a_gpu_number_is_named_as_given(trained, tmp_path, capsys) -> None:
    """--device cuda:7 was reported as 'cuda'."""
    code, output = cli(capsys, "train", trained[0], "--out", tmp_path / "run", "--device", "cuda:7")
    assert code == 2 and "cuda:7" in output, output


def test_a_file_without_cells_is_named_empty(tmp_path: Path, capsys) -> None:
    """correct on a 0-cell file said "one batch only"."""
    path = tmp_path / "empty.h5ad"
    ad.read_h5ad(cells_file(tmp_path / "cells.h5ad"))[:0].copy().write_h5ad(path)
    out = tmp_path / "out.h5ad"
    code, output = cli(capsys, "correct", path, "--method", "center-scale", "--out", out)
    assert code == 1 and "no profiles to correct: 0 cells" in output and not out.exists()


def test_a_folder_given_as_an_image_is_named_a_folder(tmp_path: Path) -> None:
    """It was reported as "file not found"."""
    import tifffile

    from scbd_cells import ingest
    from scbd_cells.core.errors import DataError

    (tmp_path / "crops").mkdir()
    rows = []
    for i in range(6):
        tifffile.imwrite(tmp_path / f"crops/{i}.tif", np.full((2, 8, 8), 100 + i, np.uint16))
        rows.append({"cell_id": str(i), "image_path": f"crops/{i}.tif", "gene": f"g{i % 2}",
                     "plate": "P1", "well": "A01"})  # fmt: skip
    (tmp_path / "crops" / "folder").mkdir()
    rows[3]["image_path"] = "crops/folder"
    table = tmp_path / "cells.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    with pytest.raises(DataError, match="a folder, not an image file"):
        ingest(table, out=tmp_path / "s.zarr", perturbation_column="gene")


def test_resuming_from_nan_weights_is_not_called_a_good_state(tmp_path: Path) -> None:
    """The resume failed at its first step, naming the NaN checkpoint "the last good state"."""
    import torch

    from scbd_cells.core.errors import CheckpointError
    from scbd_cells.training.checkpoint import load_checkpoint, save_checkpoint

    store_path = well_store(tmp_path / "s.zarr", control="nontargeting", chunk_cells=16)
    run_dir = tmp_path / "run"
    train(store_path, out=run_dir, steps=2, val_every=2, **FAST)
    last = run_dir / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(last)
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name] = torch.full_like(checkpoint["model"][name], float("nan"))
    save_checkpoint(checkpoint, last)
    with pytest.raises(CheckpointError, match="not a state training can continue from") as info:
        train(store_path, out=run_dir, steps=4, val_every=2, resume=True, **FAST)
    assert "last good state" not in str(info.value)
