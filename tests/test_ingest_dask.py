"""Ingest on a dask.distributed cluster: the single-machine path's store, byte for byte.

The clusters are local (``LocalCluster``, 2 processes of one thread): one started by this
module (its address passed as ``--scheduler tcp://...``, shut down after the module even
when a test fails) and those ``--scheduler local:2`` starts and stops itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from test_ingest import write_crops, write_fields

from scbd_cells import ingest, open_store
from scbd_cells.core.errors import InputError, StoreError
from scbd_cells.data import store as store_module
from scbd_cells.data.dask_cluster import LOCAL_SCHEDULER_OPTIONS, check_shared
from scbd_cells.data.store import partial_path_of

distributed = pytest.importorskip("distributed")

# what legitimately differs between two ingests of the same table into the same path (also
# between two single-machine runs with different --workers): the time and the store's id
PROVENANCE = [("provenance", "created"), ("store_id",)]


@pytest.fixture(scope="module")
def scheduler() -> str:
    """The address of a 2-process local cluster, closed after the module whatever happens.

    The nanny sets OMP_NUM_THREADS=1 (and more) in this process's environment; it is put
    back afterwards, or later tests' subprocesses would run torch on another thread count.
    """
    saved = dict(os.environ)
    try:
        with distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs=LOCAL_SCHEDULER_OPTIONS,
        ) as cluster:
            yield cluster.scheduler_address
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 cells per chunk, 16 per block (the client decides the geometry): many of each."""
    monkeypatch.setattr(store_module, "_CHUNK_TARGET_BYTES", 8 * 600)
    monkeypatch.setattr(store_module, "_BLOCK_TARGET_BYTES", 16 * 600)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store by relative path; the attributes without ``PROVENANCE``."""
    files = {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}
    document = json.loads(files.pop("zarr.json"))
    for keys in PROVENANCE:
        parent = document["attributes"]
        for key in keys[:-1]:
            parent = parent[key]
        del parent[keys[-1]]
    files["zarr.json"] = json.dumps(document, sort_keys=True).encode()
    return files


def assert_same_store(path: Path, reference: Path) -> None:
    ours, theirs = store_files(path), store_files(reference)
    assert sorted(ours) == sorted(theirs)
    assert any(name.startswith("images/c") for name in ours)  # chunk files were compared
    different = [name for name in ours if ours[name] != theirs[name]]
    assert different == []


def single_machine_reference(out: Path, **options) -> Path:
    """Ingest on this machine's processes, then move the store aside (same path for both)."""
    ingest(out=out, workers=2, **options)
    reference = out.with_name("reference.zarr")
    out.rename(reference)
    return reference


def test_crops_on_a_cluster_equal_the_single_machine_store_and_bad_rows(
    tmp_path: Path, scheduler: str, small_blocks: None
) -> None:
    table_path, _ = write_crops(tmp_path, n=120, seed=1)
    table = pd.read_csv(table_path)
    (tmp_path / table.loc[3, "image_path"]).unlink()  # table-level: a missing file
    (tmp_path / table.loc[40, "image_path"]).write_bytes(b"II*\x00 not a tiff")  # found writing
    (tmp_path / table.loc[77, "image_path"]).write_bytes(b"II*\x00 not a tiff either")
    out = tmp_path / "s.zarr"
    options = dict(
        table_path=table_path, perturbation_column="gene", guide_column="guide", skip_bad=True
    )
    reference = single_machine_reference(out, **options)
    ingest(out=out, workers=1, **options)  # what two single-machine runs leave identical
    assert_same_store(out, reference)
    out.rename(tmp_path / "one-worker.zarr")

    result = ingest(out=out, scheduler=scheduler, **options)

    assert result.n_cells == 117 and result.n_rejected == 3
    rejected = open_store(out).rejected
    assert rejected["row"].tolist() == [3, 40, 77]
    assert rejected["reason"].str.contains("file not found|cannot read").all()
    assert_same_store(out, reference)
    assert open_store(out).layout["block_cells"] == 16  # several blocks, several tasks


def test_fields_with_border_cells_on_local_cluster_equal_the_single_machine_store(
    tmp_path: Path, small_blocks: None
) -> None:
    table_path, _ = write_fields(tmp_path, n_fields=4, cells_per_field=15, seed=2)
    table = pd.read_csv(table_path)
    (tmp_path / table.loc[0, "field_path"]).write_bytes(b"II*\x00 broken field")  # 15 bad rows
    out = tmp_path / "s.zarr"
    options = dict(
        table_path=table_path,
        perturbation_column="gene",
        fov_column="field_path",
        x_column="x",
        y_column="y",
        crop_size=9,
        skip_bad=True,
    )
    reference = single_machine_reference(out, **options)

    environment = dict(os.environ)
    result = ingest(out=out, scheduler="local:2", **options)

    # the nanny's OMP_NUM_THREADS=1 for its workers must not stay in this process
    assert dict(os.environ) == environment
    assert result.n_border > 0 and result.n_rejected == 15
    reasons = open_store(out).rejected["reason"]
    assert reasons.str.startswith("border").sum() == result.n_border
    assert_same_store(out, reference)


_KILLABLE = textwrap.dedent(
    """
    import sys, time
    import scbd_cells.data.store as store
    store._CHUNK_TARGET_BYTES = 8 * 600  # 8 cells per chunk
    store._BLOCK_TARGET_BYTES = 16 * 600  # 16 cells per block: many blocks to resume
    record_block = store.StoreWriter.record_block

    def slow_record_block(self, block, stats):
        record_block(self, block, stats)
        time.sleep(0.3)

    store.StoreWriter.record_block = slow_record_block
    from scbd_cells import ingest
    if __name__ == "__main__":
        ingest(sys.argv[1], out=sys.argv[2], perturbation_column="gene", scheduler="local:2")
    """
)


def test_killed_client_resumes_to_the_single_machine_store(
    tmp_path: Path, scheduler: str, small_blocks: None
) -> None:
    table_path, _ = write_crops(tmp_path, n=240, seed=3)
    out = tmp_path / "s.zarr"
    reference = single_machine_reference(out, table_path=table_path, perturbation_column="gene")
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    written = partial_path_of(out) / "written_blocks.txt"
    process = subprocess.Popen(
        [sys.executable, str(script), str(table_path), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its cluster's processes too, for the clean-up below
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            if written.exists() and len(written.read_text().split()) >= 3:
                break
            time.sleep(0.02)
        running = process.poll() is None
        cluster_processes = psutil.Process(process.pid).children(recursive=True) if running else []
        if running:
            os.kill(process.pid, signal.SIGKILL)  # the client only: its workers must notice
        _, stderr = process.communicate()
        assert running, stderr.decode()
        _, alive = psutil.wait_procs(cluster_processes, timeout=30)
        assert alive == []  # a killed client's local cluster does not linger
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    n_written = len(written.read_text().split())
    assert 3 <= n_written < 15  # killed midway
    with pytest.raises(StoreError, match="unfinished"):
        open_store(out)

    result = ingest(table_path, out=out, perturbation_column="gene", scheduler=scheduler)

    assert result.resumed and result.n_cells == 240
    assert not partial_path_of(out).exists()
    assert_same_store(out, reference)


def test_tasks_of_a_killed_worker_run_again_to_the_same_store(
    tmp_path: Path, scheduler: str, small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    table_path, _ = write_crops(tmp_path, n=240, seed=4)
    out = tmp_path / "s.zarr"
    reference = single_machine_reference(out, table_path=table_path, perturbation_column="gene")
    with distributed.Client(scheduler) as client:
        before = set(client.run(os.getpid).values())
        victim = min(before)
        record_block = store_module.StoreWriter.record_block

        def record_then_kill(self, block: int, stats) -> None:
            record_block(self, block, stats)
            if block == 2:  # the next block's tasks are on the workers now
                os.kill(victim, signal.SIGKILL)

        monkeypatch.setattr(store_module.StoreWriter, "record_block", record_then_kill)
        result = ingest(table_path, out=out, perturbation_column="gene", scheduler=scheduler)
        client.wait_for_workers(2, timeout=60)  # its nanny starts another one
        after = set(client.run(os.getpid).values())

    assert victim not in after and len(after) == 2
    assert result.n_cells == 240
    assert_same_store(out, reference)


def test_without_distributed_the_message_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table_path, _ = write_crops(tmp_path, n=8)
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    out = tmp_path / "s.zarr"
    with pytest.raises(InputError, match=re.escape('pip install "scbd-cells[dask]"')) as error:
        ingest(table_path, out=out, perturbation_column="gene", scheduler="local:2")
    assert error.value.exit_code == 2  # a usage error: one paragraph, no traceback
    assert not out.exists() and not partial_path_of(out).exists()


def test_workers_that_do_not_see_the_files_are_refused(tmp_path: Path, scheduler: str) -> None:
    with distributed.Client(scheduler) as client:
        check_shared(client, [str(tmp_path)])  # both workers see it: no error
        with pytest.raises(InputError, match="every worker mounts") as error:
            check_shared(client, [str(tmp_path), str(tmp_path / "elsewhere.tif")])
    message = str(error.value)
    assert message.count("lacks") == 2 and message.count("elsewhere.tif") == 2  # both workers


@pytest.mark.parametrize("scheduler", ["local:0", "local", "local:two"])
def test_a_malformed_local_cluster_is_a_usage_error(tmp_path: Path, scheduler: str) -> None:
    table_path, _ = write_crops(tmp_path, n=8)
    with pytest.raises(InputError, match="local:N"):
        ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene", scheduler=scheduler)
