"""Data safety: nothing lost, nothing silently wrong, no traceback for a plain mistake.

Each test is a case of docs/reliability.md, on a real filesystem (``tmp_path``), with
real subprocesses for races and signals. Full and read-only disks are small tmpfs
mounts (root only; elsewhere a read-only folder is made with chmod).
"""

from __future__ import annotations

import json
import os
import shutil
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
import torch
from stores import FAST, cli, well_store

from scbd_cells import baseline, embed, evaluate, ingest, open_store, train
from scbd_cells.core.errors import CheckpointError, DataError, InputError, StoreError
from scbd_cells.data.store import create_store, partial_path_of
from scbd_cells.training.checkpoint import load_checkpoint, save_checkpoint

# --------------------------------------------------------------------------- helpers


def cli_process(*args: object, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scbd_cells", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        **kwargs,
    )


def small_store(path: Path, *, n_wells: int = 4, seed: int = 0) -> Path:
    """8 perturbations (one the control) x ``n_wells`` wells x 6 cells; chunks of 16 cells."""
    return well_store(path, n_wells=n_wells, seed=seed, control="nontargeting", chunk_cells=16)


def crops_screen(root: Path, *, n: int = 24, dtype=np.uint16) -> Path:
    """A small crops table with 2-channel TIFFs; returns the table path."""
    rng = np.random.default_rng(0)
    (root / "crops").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = rng.integers(1, 1000, size=(2, 8, 8)).astype(dtype)
        tifffile.imwrite(root / f"crops/{i}.tif", image, photometric="minisblack")
        rows.append(
            {
                "cell_id": f"{i:05d}",
                "image_path": f"crops/{i}.tif",
                "gene": ["g1", "g2", "nontargeting"][i % 3],
                "plate": "P1",
                "well": ["A01", "B01"][i % 2],
            }
        )
    table_path = root / "cells.csv"
    pd.DataFrame(rows).to_csv(table_path, index=False)
    return table_path


def mount_tmpfs(path: Path, *, size: str, read_only: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root?): {result.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB filesystem (tmpfs): outputs there run out of room."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, size="2m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder nobody can write to: a read-only tmpfs as root, else chmod 0555."""
    folder = tmp_path / "read_only"
    if os.geteuid() == 0:
        mount_tmpfs(folder, size="1m", read_only=True)
        yield folder
        subprocess.run(["umount", "-l", str(folder)], check=False)
    else:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, run folder): a small store and 4 training steps on it."""
    root = tmp_path_factory.mktemp("safety")
    store_path = small_store(root / "s.zarr")
    train(store_path, out=root / "run", steps=4, val_every=2, **FAST)
    return store_path, root / "run"


@pytest.fixture
def store_copy(trained, tmp_path: Path) -> Path:
    """A copy of the small store, to damage."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(trained[0], copy)
    return copy


# --------------------------------------------------------------------------- 1. ownership


def test_evaluate_refuses_a_folder_that_holds_its_input(trained, tmp_path, write_corum, capsys):
    store_path, run_dir = trained
    project = tmp_path / "proj"
    project.mkdir()
    cells = embed(run_dir, store_path, out=project / "cells.h5ad").out_path
    (project / "notes.txt").write_text("my notes")
    corum = write_corum(tmp_path / "corum.txt", {"c1": ["gene_1", "gene_2"]})
    code, output = cli(capsys, "evaluate", cells, "--corum", corum, "--out", project,
                       "--overwrite")  # fmt: skip
    assert code == 2 and "contains an input" in output and "Traceback" not in output
    assert (project / "notes.txt").read_text() == "my notes" and cells.is_file()


def test_evaluate_overwrite_replaces_only_its_own_files(trained, tmp_path, write_corum, capsys):
    store_path, run_dir = trained
    cells = embed(run_dir, store_path, out=tmp_path / "cells.h5ad").out_path
    corum = write_corum(tmp_path / "corum.txt", {"c1": ["gene_1", "gene_2"]})
    report = tmp_path / "report"
    evaluate([cells], corum=corum, out=report)
    (report / "notes.txt").write_text("mine")
    code, output = cli(capsys, "evaluate", cells, "--corum", corum, "--out", report)
    assert code == 2 and "--overwrite" in output  # ours: the message offers --overwrite
    evaluate([cells], corum=corum, out=report, overwrite=True)
    assert (report / "notes.txt").read_text() == "mine" and (report / "metrics.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("years of work")
    code, output = cli(capsys, "evaluate", cells, "--corum", corum, "--out", foreign,
                       "--overwrite")  # fmt: skip
    assert code == 2 and "not a scbd-cells report folder" in output
    assert "--overwrite to replace" not in output  # never suggested for what is not ours
    assert (foreign / "thesis.docx").read_text() == "years of work"


@pytest.mark.parametrize("command", ["embed", "baseline"])
def test_an_output_that_is_the_input_store_is_refused(trained, store_copy, command, capsys):
    _, run_dir = trained
    before = sorted(p.relative_to(store_copy) for p in store_copy.rglob("*"))
    args = [run_dir, store_copy] if command == "embed" else [store_copy]
    code, output = cli(capsys, command, *args, "--out", store_copy, "--overwrite")
    assert code == 2 and "is an input of this command" in output
    assert sorted(p.relative_to(store_copy) for p in store_copy.rglob("*")) == before
    open_store(store_copy)  # still a store


def test_ingest_overwrite_leaves_a_foreign_zarr_group_alone(tmp_path: Path) -> None:
    table_path = crops_screen(tmp_path)
    foreign = tmp_path / "other.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (foreign / "lab-data.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="Zarr group that scbd-cells did not write"):
        ingest(table_path, out=foreign, perturbation_column="gene", overwrite=True)
    assert (foreign / "lab-data.bin").stat().st_size == 100


def test_ingest_leaves_a_users_partial_folder_alone(tmp_path: Path) -> None:
    table_path = crops_screen(tmp_path)
    partial = partial_path_of(tmp_path / "s.zarr")
    partial.mkdir()
    (partial / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an unfinished store written by scbd-cells"):
        ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene")
    assert (partial / "keep.txt").read_text() == "mine"


def test_demo_and_simulate_keep_files_they_did_not_write(tmp_path: Path) -> None:
    from scbd_cells import simulate

    screen = tmp_path / "screen"
    simulate(screen, preset="tiny", seed=0)
    (screen / "my_annotations.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="Pass --overwrite"):
        simulate(screen, preset="tiny", seed=0)
    simulate(screen, preset="tiny", seed=1, overwrite=True)
    assert (screen / "my_annotations.csv").read_text() == "a,b\n"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "truth.json").write_text("{}")  # a file name is no proof of ownership
    with pytest.raises(InputError, match="left alone even with --overwrite"):
        simulate(plain, preset="tiny", overwrite=True)
    assert (plain / "truth.json").read_text() == "{}"


# --------------------------------------------------------------------------- 2. one writer


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the first process ended before {path} appeared: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear")
        time.sleep(0.05)


def test_two_ingests_into_one_store(tmp_path: Path) -> None:
    table_path = crops_screen(tmp_path, n=300)
    out = tmp_path / "s.zarr"
    command = [sys.executable, "-m", "scbd_cells", "-q", "ingest", str(table_path), "--out",
               str(out), "--perturbation-column", "gene"]  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(partial_path_of(out), first)
    first.send_signal(signal.SIGSTOP)  # paused mid-write, holding the lock
    try:
        second = subprocess.run(command, capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and "being written by another scbd-cells process" in (
        second.stderr
    )
    assert open_store(out).n_cells == 300  # finished, whole


def test_two_trainings_into_one_run_folder(trained, tmp_path: Path) -> None:
    store_path, _ = trained
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        from scbd_cells import train
        train({str(store_path)!r}, out={str(run)!r}, steps=100000, val_every=1000,
              **{FAST!r})
        """
    )
    first = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "config.yaml", first)
        second = cli_process("train", store_path, "--out", run, "--alpha", "5", "--steps", "2",
                             "--encoder", "tiny", "--device", "cpu")  # fmt: skip
        assert second.returncode == 2
        assert "being written by another scbd-cells process" in second.stderr
    finally:
        first.kill()
        first.communicate()
    # the killed run's lock does not block: a new run in the same folder starts
    assert train(store_path, out=run, resume=(run / "checkpoints" / "last.pt").exists(),
                 steps=2, **FAST).step >= 2  # fmt: skip


def test_a_killed_ingest_leaves_no_lock_behind(tmp_path: Path) -> None:
    table_path = crops_screen(tmp_path, n=300)
    out = tmp_path / "s.zarr"
    process = subprocess.Popen(
        [sys.executable, "-m", "scbd_cells", "-q", "ingest", str(table_path), "--out", str(out),
         "--perturbation-column", "gene"],  # fmt: skip
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(partial_path_of(out), process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    result = ingest(table_path, out=out, perturbation_column="gene")
    assert result.n_cells == 300 and open_store(out).n_cells == 300


# --------------------------------------------------------------------------- 3. as written


def test_ids_and_labels_are_kept_as_the_strings_written(tmp_path: Path) -> None:
    table_path = crops_screen(tmp_path, n=12)
    table = pd.read_csv(table_path, dtype=str)
    table["plate"] = "007"
    table.loc[3, "cell_id"] = ""
    table.loc[5, "gene"] = "NA"  # a label, not a missing value
    table.to_csv(table_path, index=False)
    ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene", skip_bad=True)
    obs = open_store(tmp_path / "s.zarr").obs
    expected = [f"{i:05d}" for i in range(12) if i != 3]
    assert sorted(obs["cell_id"]) == expected  # 00001 stays 00001, no 1.0
    assert set(obs["batch"].astype(str)) == {"007_A01", "007_B01"}
    assert "NA" in set(obs["perturbation"].astype(str))
    assert list(open_store(tmp_path / "s.zarr").rejected["reason"]) == ["null cell id"]


def test_a_deleted_chunk_is_an_error_naming_its_cells(trained, store_copy, capsys) -> None:
    _, run_dir = trained
    (store_copy / "images" / "c" / "3" / "0" / "0" / "0").unlink()  # cells 48-63
    store = open_store(store_copy)
    with pytest.raises(StoreError, match="cells 48-63 cannot be read"):
        store.read(np.arange(40, 60))
    code, output = cli(capsys, "info", store_copy, "--verify")
    assert code == 1 and "cells 48-63" in output
    with pytest.raises(StoreError, match="cells 48-63"):
        embed(run_dir, store_copy, out=store_copy.parent / "cells.h5ad")
    assert not (store_copy.parent / "cells.h5ad").exists()
    with pytest.raises(StoreError, match="cells 48-63"):
        baseline(store_copy, out=store_copy.parent / "baseline.h5ad")
    with pytest.raises(StoreError, match="cells 48-63"):
        train(store_copy, out=store_copy.parent / "run", steps=40, **{**FAST, "cache_gb": 1.0})


def test_a_bit_flip_is_an_error_naming_its_cells(store_copy, capsys) -> None:
    chunk = store_copy / "images" / "c" / "5" / "0" / "0" / "0"  # cells 80-95
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="cells 80-95 cannot be read.*checksum"):
        open_store(store_copy).images[:]
    code, output = cli(capsys, "info", store_copy, "--verify")
    assert code == 1 and "cells 80-95" in output and "Traceback" not in output
    code, output = cli(capsys, "info", store_copy)  # without --verify: metadata only, fine
    assert code == 0


def test_every_chunk_is_written_even_an_all_zero_one(tmp_path: Path) -> None:
    images = np.zeros((64, 1, 4, 4), np.uint16)
    images[32:] = 7
    obs = pd.DataFrame({"gene": ["a"] * 32 + ["b"] * 32, "plate": "p", "well": "w"})
    store = create_store(tmp_path / "s.zarr", images=images, obs=obs, channel_names=["x"],
                         perturbation_column="gene", chunk_cells=16)  # fmt: skip
    chunk_files = sorted((tmp_path / "s.zarr" / "images" / "c").iterdir())
    assert len(chunk_files) == 4  # zarr's default would leave the two zero chunks out
    assert store.verify() == []
    assert store.attributes["n_blank"] == 32


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("shape", "cells in images/zarr.json: 1,440"),
        ("obs_deleted", r"cell table .*obs.parquet cannot be read"),
        ("obs_truncated", r"cell table .*obs.parquet cannot be read"),
    ],
)
def test_a_store_that_contradicts_itself_is_refused(store_copy, edit, match, capsys) -> None:
    if edit == "shape":
        metadata_path = store_copy / "images" / "zarr.json"
        metadata = json.loads(metadata_path.read_text())
        metadata["shape"][0] = 1440
        metadata_path.write_text(json.dumps(metadata))
    elif edit == "obs_deleted":
        (store_copy / "obs.parquet").unlink()
    else:
        obs = store_copy / "obs.parquet"
        obs.write_bytes(obs.read_bytes()[:100])
    with pytest.raises(StoreError, match=match):
        open_store(store_copy)
    code, output = cli(capsys, "info", store_copy)
    assert code == 1 and "Traceback" not in output


@pytest.mark.parametrize("case", ["uint8_in_uint16", "rgba_png"])
def test_an_image_unlike_the_screens_is_a_bad_row(tmp_path: Path, case: str) -> None:
    from PIL import Image

    table_path = crops_screen(tmp_path)
    if case == "uint8_in_uint16":
        tifffile.imwrite(tmp_path / "crops/5.tif", np.full((2, 8, 8), 200, np.uint8))
        match = "dtype uint8 but the screen's images are uint16"
    else:
        Image.new("RGBA", (8, 8), (10, 20, 30, 255)).save(tmp_path / "crops/5.png")
        table = pd.read_csv(table_path, dtype=str)
        table.loc[5, "image_path"] = "crops/5.png"
        table.to_csv(table_path, index=False)
        match = "RGBA image: its 4th channel is transparency"
    with pytest.raises(DataError, match=match):
        ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene")
    result = ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene",
                    skip_bad=True)  # fmt: skip
    assert result.n_rejected == 1 and result.n_cells == 23
    assert list(open_store(tmp_path / "s.zarr").rejected["row"]) == [5]


def test_all_zero_images_are_counted(tmp_path: Path, capsys) -> None:
    table_path = crops_screen(tmp_path)
    for i in (2, 7, 11):
        tifffile.imwrite(tmp_path / f"crops/{i}.tif", np.zeros((2, 8, 8), np.uint16))
    code, output = cli(capsys, "ingest", table_path, "--out", tmp_path / "s.zarr",
                       "--perturbation-column", "gene")  # fmt: skip
    assert code == 0 and "3 cells are entirely zero" in output
    assert open_store(tmp_path / "s.zarr").summary()["n_blank"] == 3


def test_a_constant_embedding_is_flagged(trained, tmp_path, write_corum, capsys) -> None:
    import anndata as ad

    store_path, run_dir = trained
    cells = embed(run_dir, store_path, out=tmp_path / "cells.h5ad").out_path
    adata = ad.read_h5ad(cells)
    adata.X = np.zeros_like(adata.X)
    adata.write_h5ad(tmp_path / "zeros.h5ad")
    corum = write_corum(tmp_path / "corum.txt", {"c1": ["gene_1", "gene_2"]})
    code, output = cli(capsys, "evaluate", tmp_path / "zeros.h5ad", "--corum", corum, "--out",
                       tmp_path / "report")  # fmt: skip
    assert code == 0 and "every cell of zeros has the same embedding" in output, output
    assert "every cell of zeros" in (tmp_path / "report" / "report.md").read_text()
    assert "every cell of zeros" in (tmp_path / "report" / "report.html").read_text()
    assert "zeros" in json.loads((tmp_path / "report" / "metrics.json").read_text())["warnings"]
    adata.X[3, 2] = np.nan
    adata.write_h5ad(tmp_path / "nan.h5ad")
    code, output = cli(capsys, "evaluate", tmp_path / "nan.h5ad", "--corum", corum, "--out",
                       tmp_path / "report2")  # fmt: skip
    assert code == 1 and "1 NaN or infinite values" in output and "Traceback" not in output


def test_a_checkpoint_with_nan_weights_stops_embed(trained, tmp_path: Path) -> None:
    store_path, run_dir = trained
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name] = torch.full_like(checkpoint["model"][name], float("nan"))
    save_checkpoint(checkpoint, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite"):
        embed(tmp_path / "nan.pt", store_path, out=tmp_path / "cells.h5ad")
    assert not (tmp_path / "cells.h5ad").exists()


def test_a_model_that_gives_nan_stops_embed(trained, tmp_path, monkeypatch) -> None:
    from scbd_cells.model.scbd import SCBDModel

    store_path, run_dir = trained
    real_forward = SCBDModel.forward

    def nan_forward(self, images):
        output = real_forward(self, images)
        output.z_perturbation[0] = float("nan")
        return output

    monkeypatch.setattr(SCBDModel, "forward", nan_forward)
    with pytest.raises(DataError, match="non-finite .* embeddings for cells 0-"):
        embed(run_dir, store_path, out=tmp_path / "cells.h5ad", workers=0)
    assert list(tmp_path.iterdir()) == []  # no temporary file, and the lock file went too


# --------------------------------------------------------------------------- Ctrl-C, resume


def _weights(checkpoint_path: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(checkpoint_path)
    state = {f"model.{k}": v for k, v in checkpoint["model"].items()}
    for index, values in checkpoint["optimizer"]["state"].items():
        state.update({f"adam.{index}.{k}": v for k, v in values.items()})
    return state


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(trained, tmp_path: Path) -> None:
    store_path, _ = trained
    total = 40
    train(store_path, out=tmp_path / "whole", steps=total, val_every=5, **FAST)
    interrupted = tmp_path / "interrupted"
    script = textwrap.dedent(
        f"""
        from scbd_cells import train
        train({str(store_path)!r}, out={str(interrupted)!r}, steps=100000, val_every=5,
              **{FAST!r})
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    _wait_for(interrupted / "checkpoints" / "last.pt", process)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = process.communicate(timeout=120)
    stopped_at = int(load_checkpoint(interrupted / "checkpoints" / "last.pt")["step"])
    assert 5 <= stopped_at < total, stderr
    train(store_path, out=interrupted, resume=True, steps=total)
    whole, resumed = _weights(tmp_path / "whole" / "checkpoints" / "last.pt"), _weights(
        interrupted / "checkpoints" / "last.pt"
    )
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key


def test_resume_refuses_a_new_model_shape_and_records_other_changes(trained, tmp_path):
    store_path, _ = trained
    run = tmp_path / "run"
    train(store_path, out=run, steps=2, val_every=1, **{**FAST, "alpha": 0.0})
    for option, value in (("z_dim", 16), ("encoder", "resnet18"), ("cells_per_class", 2)):
        with pytest.raises(InputError, match=f"--{option.replace('_', '-')} "):
            train(store_path, out=run, resume=True, steps=4, **{option: value})
    train(store_path, out=run, resume=True, steps=4, alpha=5.0)
    history = (run / "option_history.yaml").read_text()
    assert "step: 2" in history and "alpha:\n    - 0.0\n    - 5.0" in history
    assert load_checkpoint(run / "checkpoints" / "last.pt")["option_history"][0]["step"] == 2


def test_a_duplicated_yaml_key_is_refused(trained, tmp_path: Path) -> None:
    store_path, _ = trained
    (tmp_path / "options.yaml").write_text("alpha: 1\nsteps: 2\nalpha: 5\n")
    with pytest.raises(InputError, match="the key 'alpha' is given twice"):
        train(store_path, out=tmp_path / "run", config_path=tmp_path / "options.yaml", **FAST)
    assert not (tmp_path / "run").exists()


def test_a_corrupt_metrics_file_does_not_stop_a_resume(trained, tmp_path: Path) -> None:
    store_path, _ = trained
    run = tmp_path / "run"
    train(store_path, out=run, steps=2, val_every=1, **FAST)
    (run / "metrics.csv").write_bytes(b"\x00\xff garbage \x00")
    result = train(store_path, out=run, resume=True, steps=4)
    assert result.step == 4
    assert (run / "metrics.csv.unreadable").read_bytes() == b"\x00\xff garbage \x00"
    assert pd.read_csv(run / "metrics.csv")["step"].max() == 4


# --------------------------------------------------------------------------- 4. no traceback


@pytest.mark.parametrize("command", ["train", "embed"])
def test_a_bad_device_is_a_message(trained, tmp_path, command, capsys) -> None:
    store_path, run_dir = trained
    if command == "train":
        args = ["train", store_path, "--out", tmp_path / "r", "--device", "cuda:x"]
    else:
        args = ["embed", run_dir, store_path, "--out", tmp_path / "c.h5ad", "--device", "cuda:x"]
    code, output = cli(capsys, *args)
    assert code == 2 and "cuda:x" in output and "Traceback" not in output


def test_a_json_complexes_file_is_a_message(trained, tmp_path, capsys) -> None:
    store_path, run_dir = trained
    cells = embed(run_dir, store_path, out=tmp_path / "cells.h5ad").out_path
    corum = tmp_path / "corum.json"
    corum.write_text('[{"ComplexName": "x", "subunits(Gene name)": "A;B"}]\n')
    code, output = cli(capsys, "evaluate", cells, "--corum", corum, "--out", tmp_path / "r")
    assert code == 1 and "looks like JSON" in output and "Traceback" not in output


@pytest.mark.parametrize("command", ["ingest", "embed", "baseline", "evaluate", "train"])
def test_a_read_only_output_folder_is_a_message(
    trained, tmp_path, read_only_dir, write_corum, command, capsys
) -> None:
    store_path, run_dir = trained
    out = read_only_dir / "out"
    args = {
        "ingest": ["ingest", crops_screen(tmp_path), "--perturbation-column", "gene"],
        "embed": ["embed", run_dir, store_path],
        "baseline": ["baseline", store_path],
        "evaluate": ["evaluate", tmp_path / "cells.h5ad", "--corum",
                     write_corum(tmp_path / "corum.txt", {"c": ["gene_1", "gene_2"]})],
        "train": ["train", store_path, "--encoder", "tiny", "--steps", "1"],
    }[command]  # fmt: skip
    if command == "evaluate":
        embed(run_dir, store_path, out=tmp_path / "cells.h5ad")
    suffix = {"ingest": ".zarr", "embed": ".h5ad", "baseline": ".h5ad"}.get(command, "")
    code, output = cli(capsys, *args, "--out", f"{out}{suffix}")
    assert code == 2 and "Cannot write in the folder" in output and "Traceback" not in output


def test_a_full_disk_stops_ingest_with_a_message(small_disk: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "crops").mkdir()
    rows = []
    for i in range(600):  # 600 x 2 x 64 x 64 noisy uint16: ~9 MiB, more than the disk holds
        image = rng.integers(0, 65535, (2, 64, 64), dtype=np.uint16)
        tifffile.imwrite(tmp_path / f"crops/{i}.tif", image)
        rows.append({"image_path": f"crops/{i}.tif", "gene": f"g{i % 3}", "plate": "p",
                     "well": f"w{i % 2}"})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "cells.csv", index=False)
    result = cli_process("ingest", tmp_path / "cells.csv", "--out", small_disk / "s.zarr",
                         "--perturbation-column", "gene")  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "disk filled up while writing" in result.stderr and "s.zarr" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # what is left is the resumable partial store, nothing else (the lock file went too)
    assert sorted(p.name for p in small_disk.iterdir()) == ["s.zarr.partial"]


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_embed_on_a_full_disk_is_a_message(trained, small_disk, suffix) -> None:
    store_path, run_dir = trained
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 64 * 1024))  # leave 64 KiB
    result = cli_process("embed", run_dir, store_path, "--out", small_disk / f"cells{suffix}")
    assert result.returncode == 1 and "Not enough room" in result.stderr, result.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_verbose_adds_the_traceback(tmp_path: Path, capsys) -> None:
    code, output = cli(capsys, "info", tmp_path / "missing.zarr")
    assert code == 1 and "Traceback" not in output
    code, output = cli(capsys, "--verbose", "info", tmp_path / "missing.zarr")
    assert code == 1 and "Traceback" in output and "No store at" in output
