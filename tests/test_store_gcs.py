"""Stores on Google Cloud Storage, against a real GCS JSON-API server (gcp-storage-emulator).

The emulator runs in a thread on 127.0.0.1 on a free port; gcsfs finds it through
``STORAGE_EMULATOR_HOST``, the variable Google's own client libraries read, and scbd-cells
passes no endpoint or credentials itself. The S3 tests (tests/test_store_s3.py) cover the
readers' damage checks in depth; here the same code is run end to end through gcsfs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from test_store_s3 import (
    TRAIN,
    _files,
    _free_port,
    _ingest_arguments,
    _objects,
    _run,
    ingest_crops,
)
from typer.testing import CliRunner

from scbd_cells.cli import app
from scbd_cells.core.errors import InputError, StoreError
from scbd_cells.data.store import open_store

emulator = pytest.importorskip("gcp_storage_emulator.server")
gcsfs = pytest.importorskip("gcsfs")

BUCKET = "lab"


class _Requests(logging.Handler):
    """The emulator's request lines ("POST /upload/...?...ifGenerationMatch=0 HTTP/1.1")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def gcs() -> Iterator[_Requests]:
    """A local GCS server with one bucket, found through STORAGE_EMULATOR_HOST."""
    monkeypatch = pytest.MonkeyPatch()
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    requests = _Requests()
    server_log = logging.getLogger("gcp_storage_emulator")
    server_log.addHandler(requests)
    server_log.setLevel(logging.INFO)
    server_log.propagate = False  # one line per request: kept here, not in the test's log
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    # gcsfs asks google-auth for credentials and falls back to anonymous access
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    yield requests
    server.stop()
    server_log.removeHandler(requests)
    monkeypatch.undo()


def _fs() -> gcsfs.GCSFileSystem:
    return gcsfs.GCSFileSystem()


def test_ingest_to_gcs_uploads_the_same_store_and_every_command_reads_it(
    gcs: _Requests, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"gs://{BUCKET}/ingested/screen.zarr"
    gcs.lines.clear()
    table, staging, output = ingest_crops(url, tmp_path, monkeypatch)
    assert f"-> {url}" in output
    assert list(staging.iterdir()) == []  # the staging folder is removed
    local = tmp_path / "local.zarr"
    _run(_ingest_arguments(table, str(local)))
    remote = _objects(_fs(), f"{BUCKET}/ingested/screen.zarr")
    files = _files(local)
    assert sorted(remote) == sorted(files)
    assert all(remote[name] == files[name] for name in files if name.startswith("images/c/"))
    assert remote["obs.parquet"] == files["obs.parquet"]
    assert json.loads(remote["zarr.json"])["attributes"]["provenance"]["arguments"]["out"] == url
    # every object was written create-only (GCS refuses it where the key exists; the
    # emulator does not enforce it, so what is checked here is what was asked of it)
    uploads = [line for line in gcs.lines if "/upload/" in line]
    assert len(uploads) == len(files)
    assert all("ifGenerationMatch=0" in line for line in uploads), uploads[:3]

    info = json.loads(_run(["info", url, "--json", "--verify"]))
    assert info["n_cells"] == 160 and info["damaged_ranges"] == []
    np.testing.assert_array_equal(open_store(url).images[:], open_store(local).images[:])
    rows = np.array([150, 3, 77, 3, 120, 12, 40, 99, 9])
    np.testing.assert_array_equal(open_store(url).read(rows), open_store(local).read(rows))
    run_dir = tmp_path / "run"
    _run(["train", url, "--out", str(run_dir), *TRAIN])
    _run(["embed", str(run_dir), url, "--out", str(tmp_path / "cells.h5ad")])
    _run(["baseline", url, "--out", str(tmp_path / "baseline.h5ad"), "--nucleus-channel", "ch0"])
    cells = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert list(cells.obs_names) == list(open_store(local).obs.index)
    assert cells.uns["scbd"]["store"] == url

    # a chunk object gone is damage naming its cells, as on S3 and on a local disk
    _fs().rm(f"{BUCKET}/ingested/screen.zarr/images/c/0/0/0/0")
    with pytest.raises(StoreError, match="cells 0"):
        open_store(url).read(np.array([130]))
    result = CliRunner().invoke(app, ["info", url, "--verify"])
    assert isinstance(result.exception, StoreError), result.output
    assert "cells 0-159" in str(result.exception)


def test_ingest_to_gcs_is_refused_where_objects_exist_and_deletes_nothing(
    gcs: _Requests, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    table = tmp_path / "cells.csv"
    table.write_text("gene,plate,well,image_path\n")
    fs = _fs()
    fs.pipe(f"{BUCKET}/taken.zarr/notes.txt", b"someone else's")
    for extra in ([], ["--overwrite"]):
        arguments = [*_ingest_arguments(table, f"gs://{BUCKET}/taken.zarr"), *extra]
        result = CliRunner().invoke(app, arguments)
        assert isinstance(result.exception, InputError), result.output  # exit 2 under main()
        assert "never deletes" in str(result.exception), result.exception
    assert _objects(fs, f"{BUCKET}/taken.zarr") == {"notes.txt": b"someone else's"}
    assert list(tmp_path.iterdir()) == [table]  # no local gs: folder
    with pytest.raises(StoreError, match="No store at gs://lab/none.zarr"):
        open_store(f"gs://{BUCKET}/none.zarr")
