"""Data safety around paths: links, locks, chunks in their place, outputs inside inputs, ownership.

Issue 21 rows 1, 2, 5, 9, 10, 11 and the "files written" row of issue 23; docs/reliability.md
lists each case with its test.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from stores import FAST, well_store

from scbd_cells import embed, open_store, train
from scbd_cells.core.errors import InputError, StoreError
from scbd_cells.core.outputs import (
    MARKER_NAME,
    atomic_path,
    check_output,
    kind_of,
    lock_path_of,
    output_lock,
    ownership_dir,
    prepare_folder,
    publish,
    remove_owned,
    temporary_name,
    write_marker,
    write_text_atomic,
)
from scbd_cells.profiles.anndata_io import write_anndata


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, run folder): a small store and 2 training steps on it."""
    root = tmp_path_factory.mktemp("paths")
    store_path = well_store(root / "s.zarr", control="nontargeting", chunk_cells=16)
    train(store_path, out=root / "run", steps=2, val_every=2, **FAST)
    return store_path, root / "run"


def _cells(n: int = 12, *, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical([f"g{i % 3}" for i in range(n)]),
            "guide": pd.Categorical([f"g{i % 3}_1" for i in range(n)]),
            "batch": pd.Categorical([f"w{i % 2}" for i in range(n)]),
        },
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=rng.normal(size=(n, 4)).astype(np.float32), obs=obs)
    adata.uns["scbd"] = {"command": "test", "version": "0"}
    return adata


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (not following links) and its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


# --------------------------------------------------------------------------- row 1: links

FOLDER_KINDS = {  # kind -> (entries its marker lists, a folder entry, a file entry)
    "run": (["checkpoints", "logs", "config.yaml", "metrics.csv"], "checkpoints", "config.yaml"),
    "report": (["metrics.json", "report.md", "figures", "tables"], "figures", "report.md"),
    "screen": (["images", "fields", "cells.csv", "truth.json"], "images", "cells.csv"),
    "demo": (["run", "embeddings", "report.md"], "run", "report.md"),
    "pictures": (["grids", "channels", "index.csv"], "grids", "index.csv"),
    "sweep": (["runs", "embeddings", "sweep.csv"], "embeddings", "sweep.csv"),
}


def _elsewhere(root: Path) -> Path:
    """A folder outside every output, with a lab's files and a run of its own."""
    folder = root / "elsewhere"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "plate1.csv").write_text("months of imaging\n")
    (folder / "notes.txt").write_text("mine\n")
    run = folder / "other_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"weights")
    (run / "config.yaml").write_text("alpha: 1\n")
    write_marker(run, kind="run", entries=["checkpoints", "config.yaml"])
    return folder


def _folder_output(out: Path, kind: str) -> None:
    """A marked folder output of ``kind``, with a real subfolder and file for each entry."""
    entries, _, _ = FOLDER_KINDS[kind]
    prepare_folder(out, kind=kind, overwrite=False, entries=entries)
    for name in entries:
        if "." in name:
            (out / name).write_text(f"{name} of the output\n")
        else:
            (out / name).mkdir()
            (out / name / "part.bin").write_bytes(b"output")


@pytest.mark.parametrize("kind", sorted(FOLDER_KINDS))
def test_deleting_a_folder_output_never_follows_a_link(tmp_path: Path, kind: str) -> None:
    """Links at every level of a marked folder: the links go, their targets stay whole."""
    elsewhere = _elsewhere(tmp_path)
    before = _snapshot(elsewhere)
    out = tmp_path / "out"
    _folder_output(out, kind)
    _, folder_entry, file_entry = FOLDER_KINDS[kind]
    # level 1: an entry the marker lists is now a link (to a folder, to a file)
    shutil.rmtree(out / folder_entry)
    (out / folder_entry).symlink_to(elsewhere / "data")
    (out / file_entry).unlink()
    (out / file_entry).symlink_to(elsewhere / "notes.txt")
    # level 2: inside a real entry folder, a link to the lab's folder
    entries, _, _ = FOLDER_KINDS[kind]
    inner = next(out / name for name in entries if "." not in name and name != folder_entry)
    (inner / "linked").symlink_to(elsewhere, target_is_directory=True)
    # the top level: the output itself reached through a link is never replaced or deleted
    link = tmp_path / "out_link"
    link.symlink_to(out, target_is_directory=True)
    assert kind_of(link) == kind  # looked at through the link (a run resumes through one)
    with pytest.raises(InputError, match="symbolic link"):
        check_output(link, kind=kind, overwrite=True)
    with pytest.raises(InputError, match="symbolic link"):
        remove_owned(link, kind=kind)
    assert (out / MARKER_NAME).is_file()

    prepare_folder(out, kind=kind, overwrite=True, entries=entries)  # what --overwrite does
    assert _snapshot(elsewhere) == before  # nothing outside the output was touched
    assert not (out / folder_entry).is_symlink() and not (out / folder_entry).exists()
    assert not (out / file_entry).exists() and not inner.exists()


def test_sweep_overwrite_with_a_run_linked_from_elsewhere_keeps_that_run(tmp_path: Path) -> None:
    """The issue's case: SWEEP/runs/alpha_1 is a link to a run elsewhere; --overwrite."""
    from scbd_cells.training.sweeping import _mark, _open_sweep_folder

    elsewhere = _elsewhere(tmp_path)
    before = _snapshot(elsewhere)
    out = tmp_path / "sweep"
    _open_sweep_folder(out, overwrite=False, inputs=[])
    (out / "runs" / "alpha_1").symlink_to(elsewhere / "other_run", target_is_directory=True)
    _mark(out / "runs", ["alpha_1"])
    (out / "runs" / "alpha_0" / "checkpoints").mkdir(parents=True)
    write_marker(out / "runs" / "alpha_0", kind="run", entries=["checkpoints"])
    _mark(out / "runs", ["alpha_0"])
    assert _open_sweep_folder(out, overwrite=True, inputs=[]) is False
    assert _snapshot(elsewhere) == before  # the linked run keeps its checkpoints and config
    assert kind_of(elsewhere / "other_run") == "run"
    assert not (out / "runs" / "alpha_1").is_symlink()  # the link went, as a link
    assert not (out / "runs" / "alpha_0").exists()


def test_a_marker_or_zarr_json_reached_through_a_link_is_not_ownership(tmp_path: Path) -> None:
    """A folder whose marker (or store metadata) is a link to another's is not scbd-cells'."""
    real = tmp_path / "real_report"
    prepare_folder(real, kind="report", overwrite=False, entries=["report.md"])
    store = well_store(tmp_path / "s.zarr", chunk_cells=16)
    for name, target in ((MARKER_NAME, real / MARKER_NAME), ("zarr.json", store / "zarr.json")):
        foreign = tmp_path / f"foreign_{name}"
        foreign.mkdir()
        (foreign / "results.csv").write_text("a lab's table\n")
        (foreign / name).symlink_to(target)
        assert kind_of(foreign) is None
        for kind in ("report", "store"):
            with pytest.raises(InputError, match="left alone even with --overwrite"):
                check_output(foreign, kind=kind, overwrite=True)
        assert (foreign / "results.csv").read_text() == "a lab's table\n"


def test_deleting_a_store_or_an_anndata_folder_never_follows_a_link(tmp_path: Path) -> None:
    elsewhere = _elsewhere(tmp_path)
    before = _snapshot(elsewhere)
    store = well_store(tmp_path / "s.zarr", chunk_cells=16)
    zarr_cells = tmp_path / "cells.zarr"
    write_anndata(_cells(), zarr_cells, overwrite=False)
    for path, kind in ((store, "store"), (zarr_cells, "anndata")):
        (path / "linked_folder").symlink_to(elsewhere, target_is_directory=True)
        (path / "X").mkdir(exist_ok=True)
        (path / "X" / "deeper").symlink_to(elsewhere / "data", target_is_directory=True)
        link = tmp_path / f"{path.name}.link"
        link.symlink_to(path, target_is_directory=True)
        with pytest.raises(InputError, match="symbolic link"):
            check_output(link, kind=kind, overwrite=True)
        if kind == "store":  # ingest, which resolves --out, refuses it too
            from scbd_cells import ingest

            with pytest.raises(InputError, match="symbolic link"):
                ingest(tmp_path / "cells.csv", out=link, perturbation_column="gene",
                       overwrite=True)  # fmt: skip
        remove_owned(path, kind=kind)
        assert not path.exists()
    assert _snapshot(elsewhere) == before


@pytest.mark.parametrize("kind", ["anndata", "table"])
def test_a_file_output_reached_through_a_link_is_never_replaced(tmp_path: Path, kind) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if kind == "anndata":
        target = elsewhere / "cells.h5ad"
        write_anndata(_cells(), target, overwrite=False)
    else:
        target = elsewhere / "profiles.csv"
        with atomic_path(target, kind="table") as tmp:
            tmp.write_text("Metadata_Plate,f1\np,1\n")
    before = target.read_bytes()
    link = tmp_path / target.name
    link.symlink_to(target)
    assert kind_of(target) == kind
    with pytest.raises(InputError, match="symbolic link"):
        check_output(link, kind=kind, overwrite=True)
    with pytest.raises(InputError, match="symbolic link"):
        remove_owned(link, kind=kind)
    assert target.read_bytes() == before and link.is_symlink()
    # a folder link above the output is only part of the address given: the file there is
    # replaced as the file it is, and nothing else
    via = tmp_path / "via"
    via.symlink_to(elsewhere, target_is_directory=True)
    assert check_output(via / target.name, kind=kind, overwrite=True) is True
    remove_owned(via / target.name, kind=kind)
    assert not target.exists() and via.is_symlink() and link.is_symlink()


# --------------------------------------------------------------------------- row 2: locks


def test_one_lock_for_every_name_of_an_output(tmp_path: Path) -> None:
    run = tmp_path / "r2"
    run.mkdir()
    (tmp_path / "r2link").symlink_to(run, target_is_directory=True)
    (tmp_path / "above").symlink_to(tmp_path, target_is_directory=True)
    names = [run, tmp_path / "r2link", tmp_path / "above" / "r2", tmp_path / "." / "r2"]
    assert len({lock_path_of(name) for name in names}) == 1
    with output_lock(run) as lock_path:
        for name in names[1:]:
            with pytest.raises(InputError, match="being written by another"), output_lock(name):
                pass
        assert lock_path.exists()
    assert not lock_path.exists()  # gone when the command ends: nothing left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["above", "r2", "r2link"]


def test_two_trainings_on_one_folder_one_through_a_link(trained, tmp_path: Path) -> None:
    """The issue's case: `train --out r2` running, `train --out r2link --resume` exits at once."""
    store_path, _ = trained
    run = tmp_path / "r2"
    link = tmp_path / "r2link"
    link.symlink_to(run, target_is_directory=True)
    script = textwrap.dedent(
        f"""
        from scbd_cells import train
        train({str(store_path)!r}, out={str(run)!r}, steps=100000, val_every=2, **{FAST!r})
        """
    )
    first = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "last.pt").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first training saved no checkpoint"
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, "-m", "scbd_cells", "train", str(store_path), "--out", str(link),
             "--resume", "--alpha", "5", "--steps", "4", "--device", "cpu"],  # fmt: skip
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2, second.stderr
        assert "being written by another scbd-cells process" in second.stderr
        assert not (run / "option_history.yaml").exists()  # the second changed nothing
    finally:
        first.kill()
        first.communicate()


def test_a_sweep_through_a_link_waits_for_the_one_running(tiny_store: Path, tmp_path) -> None:
    from scbd_cells import sweep

    out = tmp_path / "sweep"
    out.mkdir()
    (tmp_path / "sweep_link").symlink_to(out, target_is_directory=True)
    with output_lock(out), pytest.raises(InputError, match="being written by another"):
        sweep(tiny_store, out=tmp_path / "sweep_link", corum=tmp_path / "c.txt", alpha=[0],
              overwrite=True)  # fmt: skip


# --------------------------------------------------------------------------- row 5: chunks


def _chunk(store: Path, index: int) -> Path:
    return store / "images" / "c" / str(index) / "0" / "0" / "0"


@pytest.mark.parametrize("shards", [False, True])
def test_a_chunk_moved_to_another_place_is_an_error_naming_its_cells(
    trained, tmp_path: Path, shards: bool, capsys
) -> None:
    from scbd_cells.cli import main
    from scbd_cells.data.loader import CellReader, SegmentReader
    from scbd_cells.data.store import create_store

    store = tmp_path / "s.zarr"
    if shards:  # shards of 32 cells (two chunks of 16): a shard file is the unit moved
        rng = np.random.default_rng(0)
        obs = pd.DataFrame({"gene": [f"g{i % 4}" for i in range(128)], "plate": "p",
                            "well": [f"w{i % 2}" for i in range(128)]})  # fmt: skip
        create_store(store, images=rng.integers(0, 900, (128, 2, 8, 8)).astype(np.uint16),
                     obs=obs, channel_names=["a", "b"], perturbation_column="gene",
                     chunk_cells=16, shard_cells=32)  # fmt: skip
        moved, cells = 1, "cells 32-63"
    else:
        well_store(store, chunk_cells=16)
        moved, cells = 3, "cells 48-63"
    shutil.copyfile(_chunk(store, moved + 1), _chunk(store, moved))  # a valid chunk, wrong place
    opened = open_store(store)
    with pytest.raises(StoreError, match=f"{cells} cannot be read.*not the chunk written"):
        opened.read(np.arange(40, 60))
    unit = 32 if shards else 16
    assert opened.verify() == [(moved * unit, (moved + 1) * unit)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["scbd-cells", "info", str(store), "--verify"])
        with pytest.raises(SystemExit) as exit_:
            main()
    assert exit_.value.code == 1 and cells in capsys.readouterr().err
    # the loader's tensorstore paths do not go through zarr-python: checked there too
    reader = CellReader(opened, backend="tensorstore")
    assert reader.backend == "tensorstore"
    with pytest.raises(StoreError, match=cells):
        reader.read(np.arange(40, 60))
    segments = SegmentReader(open_store(store), budget_gb=0.01)
    with pytest.raises(StoreError, match=cells):
        segments.read(np.arange(40, 60))
    # the other chunks read as before
    assert opened.read(np.arange(0, 16)).shape == (16, 2, *opened.image_size)
    if not shards:  # the commands that read every cell stop, naming the cells
        from scbd_cells import baseline

        with pytest.raises(StoreError, match=cells):
            embed(trained[1], store, out=tmp_path / "cells.h5ad", device="cpu", workers=0)
        with pytest.raises(StoreError, match=cells):
            baseline(store, out=tmp_path / "baseline.h5ad")
        assert not (tmp_path / "cells.h5ad").exists() and not (tmp_path / "baseline.h5ad").exists()


def test_a_store_without_chunk_places_reads_and_a_damaged_list_is_refused(
    tmp_path: Path, caplog
) -> None:
    store = well_store(tmp_path / "s.zarr", chunk_cells=16)
    expected = open_store(store).images[:]
    metadata = json.loads((store / "zarr.json").read_text())
    record = metadata["attributes"]["chunk_checksums"]
    # a damaged list is refused when the store is opened (not every chunk called moved)
    listing = store / record["file"]
    good = listing.read_bytes()
    listing.write_bytes(good[:-4] + bytes(4))
    with pytest.raises(StoreError, match="list of chunk checksums .* SHA-256"):
        open_store(store)
    listing.write_bytes(good)
    # a store written before the places were recorded: read as before, --verify says so
    del metadata["attributes"]["chunk_checksums"]
    (store / "zarr.json").write_text(json.dumps(metadata))
    listing.unlink()
    old = open_store(store)
    np.testing.assert_array_equal(old.images[:], expected)
    assert old.verify() == []
    assert "before scbd-cells recorded where each chunk belongs" in caplog.text


# --------------------------------------------------------------------------- row 9: sweeps


def test_a_sweep_rerun_on_another_store_is_refused_naming_both(tmp_path: Path, monkeypatch):
    from scbd_cells.training import sweeping

    first = well_store(tmp_path / "a.zarr", chunk_cells=16, seed=0)
    second = well_store(tmp_path / "b.zarr", chunk_cells=16, seed=1)
    corum = tmp_path / "complexes.txt"
    corum.write_text("complex_id\tcomplex_name\torganism\tsubunits_gene_name\n0\tc\tHuman\tg1;g2\n")
    out = tmp_path / "sweep"
    # the first sweep begins, then stops in its first training (as after Ctrl-C)
    monkeypatch.setattr(sweeping, "_train_stage", lambda *args, **kwargs: True)
    assert sweeping.sweep(first, out=out, corum=corum, alpha=[0], **FAST).interrupted
    with pytest.raises(InputError, match="begun on the store .*a.zarr.* gives .*b.zarr") as error:
        sweeping.sweep(second, out=out, corum=corum, alpha=[0], **FAST)
    assert open_store(first).store_id in str(error.value)
    assert open_store(second).store_id in str(error.value)
    # the same store under another name (a link) continues; --overwrite starts over on b
    (tmp_path / "a_link.zarr").symlink_to(first, target_is_directory=True)
    assert sweeping.sweep(tmp_path / "a_link.zarr", out=out, corum=corum, alpha=[0],
                          **FAST).interrupted  # fmt: skip
    assert sweeping.sweep(second, out=out, corum=corum, alpha=[0], overwrite=True,
                          **FAST).interrupted  # fmt: skip


# --------------------------------------------------------------------------- row 10: inside


def test_an_output_inside_an_input_store_is_refused(trained, tmp_path: Path) -> None:
    store_path, run_dir = trained
    before = sorted(p.name for p in store_path.iterdir())
    with pytest.raises(InputError, match="lies inside an input"):
        train(store_path, out=store_path / "run", steps=1, **FAST)
    with pytest.raises(InputError, match="lies inside an input"):
        embed(run_dir, store_path, out=store_path / "x.h5ad", device="cpu")
    link = tmp_path / "store_link.zarr"
    link.symlink_to(store_path, target_is_directory=True)
    with pytest.raises(InputError, match="lies inside an input"):  # also through a link
        embed(run_dir, link, out=store_path / "x.h5ad", device="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "scbd_cells", "baseline", str(store_path), "--out",
         str(store_path / "images" / "b.h5ad")],  # fmt: skip
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "lies inside an input" in result.stderr
    assert sorted(p.name for p in store_path.iterdir()) == before
    assert not (store_path / "images" / "b.h5ad").exists()


# --------------------------------------------------------------------------- row 11: ownership


def test_ownership_names_the_file_it_was_written_as(tmp_path: Path) -> None:
    ours = tmp_path / "cells.h5ad"
    write_anndata(_cells(), ours, overwrite=False)
    assert kind_of(ours) == "anndata"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]  # no marker beside it
    assert list(ownership_dir().glob("*.json"))  # the record is kept outside the lab's folder

    # a user's file made from ours inherits uns["scbd"]: not ours
    derived = tmp_path / "cells_annotated.h5ad"
    mine = ad.read_h5ad(ours)
    mine.obs["cluster"] = "a"
    mine.write_h5ad(derived)
    assert "scbd" in ad.read_h5ad(derived).uns
    for path in (derived, tmp_path / "copy.h5ad"):
        if not path.exists():
            shutil.copy2(ours, path)  # a copy, same bytes and times
        before = path.read_bytes()
        assert kind_of(path) is None
        with pytest.raises(InputError, match=r"provenance \(uns\[\"scbd\"\]\).*even with"):
            write_anndata(_cells(seed=1), path, overwrite=True)
        assert path.read_bytes() == before

    # our own file rewritten in place by the user: no longer ours
    mine.write_h5ad(ours)
    assert kind_of(ours) is None
    with pytest.raises(InputError, match="left alone even with --overwrite"):
        write_anndata(_cells(seed=1), ours, overwrite=True)

    # edited with its size and modification time put back: the content digest tells
    fresh = tmp_path / "fresh.h5ad"
    write_anndata(_cells(), fresh, overwrite=False)
    times = fresh.stat()
    data = bytearray(fresh.read_bytes())
    data[-1] ^= 0xFF
    fresh.write_bytes(bytes(data))
    os.utime(fresh, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert kind_of(fresh) is None

    # what scbd-cells wrote and nobody touched is replaced, and the new file recorded
    untouched = tmp_path / "untouched.h5ad"
    write_anndata(_cells(), untouched, overwrite=False)
    write_anndata(_cells(seed=2), untouched, overwrite=True)
    assert kind_of(untouched) == "anndata"
    np.testing.assert_array_equal(ad.read_h5ad(untouched).X, _cells(seed=2).X)


def test_a_table_an_earlier_version_marked_is_still_replaced(tmp_path: Path) -> None:
    table = tmp_path / "profiles.csv"
    table.write_text("Metadata_Plate,f1\np,1\n")
    stat_ = table.stat()
    legacy = tmp_path / ".profiles.csv.scbd-cells.json"
    legacy.write_text(json.dumps({"kind": "table", "size": stat_.st_size,
                                  "mtime_ns": stat_.st_mtime_ns}))  # fmt: skip
    assert kind_of(table) == "table"
    with atomic_path(table, kind="table", overwrite=True) as tmp:
        tmp.write_text("Metadata_Plate,f1\np,2\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profiles.csv"]  # old marker gone
    assert kind_of(table) == "table"


# --------------------------------------------------------------------------- files written


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_files_follow_the_umask_and_leave_nothing_beside_them(tmp_path: Path, umask) -> None:
    from scbd_cells import export

    source = tmp_path / "cells.h5ad"
    previous = os.umask(umask)
    try:
        write_anndata(_cells(), source, overwrite=False)
        export(source, level="well", out=tmp_path / "wells.parquet")
        export(source, level="cell", out=tmp_path / "cells.csv")
        write_text_atomic(tmp_path / "notes.txt", "x")
    finally:
        os.umask(previous)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cells.csv", "cells.h5ad", "notes.txt", "wells.parquet"]  # no lock, no marker
    for name in names:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    write_text_atomic(path, "step\n1\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("step\n1\n2")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "step\n1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]
    name = temporary_name(path)
    assert name.parent == tmp_path and name.name.startswith(".metrics.tmp-") and not name.exists()
    with pytest.raises(InputError, match="not a profile table"):  # a kind is checked again
        tmp = temporary_name(path)
        tmp.write_text("x")
        publish(tmp, path, kind="table", overwrite=True)
