"""Stores on object storage, read against a real S3 HTTP server (moto's server mode).

The server runs in a thread on 127.0.0.1 on a free port; boto3, s3fs and zarr talk HTTP
to it with credentials and the endpoint from the standard environment variables only.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from stores import well_store
from typer.testing import CliRunner

from scbd_cells.cli import app
from scbd_cells.core.errors import InputError, StoreError
from scbd_cells.data.store import open_store

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

SECRET = "Sc8dTestSecret-7f3a9c"  # must appear in no log and no file written
BUCKET = "lab"
TRAIN = [
    "--encoder", "tiny", "--steps", "2", "--classes-per-batch", "4", "--cells-per-class", "4",
    "--val-every", "2", "--z-dim", "4", "--workers", "0", "--device", "cpu",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A local S3 server with one bucket; credentials and endpoint set in the environment."""
    monkeypatch = pytest.MonkeyPatch()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "scbd-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    monkeypatch.undo()


@pytest.fixture(scope="module")
def uploaded(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny local store and its copy on the S3 server."""
    local = well_store(tmp_path_factory.mktemp("s3") / "screen.zarr", chunk_cells=8)
    url = f"s3://{BUCKET}/screens/screen.zarr"
    s3fs.S3FileSystem().put(str(local), url[len("s3://") :], recursive=True)
    return local, url


def _copy(url: str, name: str) -> str:
    """A second copy of the uploaded store on the server, to damage."""
    target = f"s3://{BUCKET}/screens/{name}.zarr"
    s3fs.S3FileSystem().copy(url, target, recursive=True)
    return target


def _run(arguments: list[str]) -> str:
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, (arguments, result.output, result.exception)
    return result.output


def test_open_store_reads_the_same_cells_as_the_local_copy(uploaded: tuple[Path, str]) -> None:
    local_path, url = uploaded
    local, remote = open_store(local_path), open_store(url)
    assert remote.path == url
    assert remote.store_id == local.store_id
    np.testing.assert_array_equal(remote.images[:], local.images[:])
    rows = np.array([190, 3, 77, 3, 150, 12, 40, 99, 120, 180, 60, 25])  # > 8 runs: scattered
    np.testing.assert_array_equal(remote.read(rows), local.read(rows))
    np.testing.assert_array_equal(remote.read(rows[:2]), local.read(rows[:2]))
    assert remote.obs.equals(local.obs)
    assert remote.rejected.equals(local.rejected)
    assert remote.verify() == []
    summary = remote.summary()
    assert summary["path"] == url
    assert summary["size_bytes"] == local.summary()["size_bytes"]


def test_cli_info_train_embed_baseline_read_a_store_on_s3(
    uploaded: tuple[Path, str], tmp_path: Path
) -> None:
    local_path, url = uploaded
    info = json.loads(_run(["info", url, "--json", "--verify"]))
    assert info["n_cells"] == open_store(local_path).n_cells
    assert info["damaged_ranges"] == []
    run_dir = tmp_path / "run"
    # --verbose: debug logging, shown in the output the secret is looked for in
    logs = [_run(["-v", "info", url])]
    logs.append(_run(["-v", "train", url, "--out", str(run_dir), *TRAIN]))
    logs.append(_run(["-v", "embed", str(run_dir), url, "--out", str(tmp_path / "cells.h5ad")]))
    logs.append(_run(["-v", "baseline", url, "--out", str(tmp_path / "baseline.h5ad")]))
    assert "INFO" in logs[1]  # the log is in the output
    cells = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert list(cells.obs_names) == list(open_store(local_path).obs.index)
    assert cells.uns["scbd"]["store"] == url
    # the secret is in the environment, and nowhere in what was printed, logged or written
    assert all(SECRET not in text for text in logs)
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) > 3
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path


def test_a_missing_or_moved_chunk_on_s3_is_damage_naming_its_cells(
    uploaded: tuple[Path, str],
) -> None:
    _, url = uploaded
    fs = s3fs.S3FileSystem()
    moved = _copy(url, "moved")
    fs.copy(f"{moved}/images/c/0/0/0/0", f"{moved}/images/c/2/0/0/0")  # chunk 0 at chunk 2's place
    store = open_store(moved)
    with pytest.raises(StoreError, match=r"cells 16-23 cannot be read.*not the chunk written"):
        store.images[16:24]
    assert store.verify() == [(16, 24)]
    missing = _copy(url, "missing")
    fs.rm(f"{missing}/images/c/1/0/0/0")
    with pytest.raises(StoreError, match=r"cells 8-15 cannot be read.*missing"):
        open_store(missing).read(np.arange(0, 20))


def test_missing_and_unfinished_stores_on_s3_say_so(uploaded: tuple[Path, str]) -> None:
    _, url = uploaded
    with pytest.raises(StoreError, match="No store at s3://lab/none.zarr"):
        open_store(f"s3://{BUCKET}/none.zarr")
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{BUCKET}/half.zarr.partial/zarr.json", b"{}")
    with pytest.raises(StoreError, match="unfinished"):
        open_store(f"s3://{BUCKET}/half.zarr")
    with pytest.raises(InputError, match="s3:// or gs://|s3://, gs://"):
        open_store("http://example.org/screen.zarr")


def _ingest_arguments(table: Path, out: str) -> list[str]:
    return [
        "ingest", str(table), "--out", out, "--perturbation-column", "gene", "--workers", "1",
        "--split-fractions", "0.5,0.4,0.1",  # enough validation controls for train's well probe
    ]  # fmt: skip


def _objects(fs: object, key: str) -> dict[str, bytes]:
    """``{path inside the store: bytes}`` of every object under ``bucket/key``."""
    fs.invalidate_cache()
    return {name[len(key) + 1 :]: fs.cat_file(name) for name in fs.find(key)}


def _files(folder: Path) -> dict[str, bytes]:
    """``{path inside the folder: bytes}`` of every file of a local store."""
    files = (path for path in folder.rglob("*") if path.is_file())
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in files}


def _staging_under(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp folder, where ingest builds a store before uploading it, in tmp_path."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))  # what TMPDIR sets at start-up
    return folder


def ingest_crops(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``ingest -v`` of 160 crops to ``url``: the table, the staging folder and the output."""
    from test_ingest import write_crops

    staging = _staging_under(tmp_path, monkeypatch)
    table, _ = write_crops(tmp_path / "screen", n=160)
    return table, staging, _run(["-v", *_ingest_arguments(table, url)])


def test_ingest_to_s3_uploads_the_same_store_as_a_local_ingest(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{BUCKET}/ingested/screen.zarr"
    table, staging, output = ingest_crops(url, tmp_path, monkeypatch)
    assert f"-> {url}" in output and SECRET not in output
    assert list(staging.iterdir()) == []  # the staging folder is removed
    info = json.loads(_run(["info", url, "--json", "--verify"]))
    assert info["n_cells"] == 160 and info["damaged_ranges"] == []
    _run(["train", url, "--out", str(tmp_path / "run"), *TRAIN])
    local = tmp_path / "local.zarr"
    _run(_ingest_arguments(table, str(local)))
    remote = _objects(s3fs.S3FileSystem(), f"{BUCKET}/ingested/screen.zarr")
    files = _files(local)
    assert sorted(remote) == sorted(files)
    chunks = [name for name in files if name.startswith("images/c/")]
    assert len(chunks) >= 1
    assert all(remote[name] == files[name] for name in chunks)
    assert remote["obs.parquet"] == files["obs.parquet"]
    recorded = json.loads(remote["zarr.json"])["attributes"]["provenance"]
    assert recorded["arguments"]["out"] == url  # not the staging folder
    assert str(staging) not in remote["zarr.json"].decode()
    assert all(SECRET.encode() not in content for content in remote.values())
    np.testing.assert_array_equal(open_store(url).images[:], open_store(local).images[:])


def test_ingest_to_s3_is_refused_where_objects_exist_and_deletes_nothing(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    table = tmp_path / "cells.csv"
    table.write_text("gene,plate,well,image_path\n")
    fs = s3fs.S3FileSystem()
    for key in ("taken.zarr/notes.txt", "half.zarr.partial/zarr.json"):
        fs.pipe(f"{BUCKET}/{key}", b"someone else's")
        target = f"s3://{BUCKET}/{key.split('.zarr')[0]}.zarr"
        for extra in ([], ["--overwrite"]):
            result = CliRunner().invoke(app, [*_ingest_arguments(table, target), *extra])
            assert isinstance(result.exception, InputError), result.output  # exit 2 under main()
            assert "never deletes" in str(result.exception), result.exception
            assert fs.cat_file(f"{BUCKET}/{key}") == b"someone else's"
    assert _objects(fs, f"{BUCKET}/taken.zarr") == {"notes.txt": b"someone else's"}
    assert list(tmp_path.iterdir()) == [table]  # no local s3: folder


def test_an_upload_without_its_root_zarr_json_is_refused_as_unfinished(
    uploaded: tuple[Path, str],
) -> None:
    _, url = uploaded
    half = _copy(url, "half_uploaded")
    s3fs.S3FileSystem().rm(f"{half}/zarr.json")
    with pytest.raises(StoreError, match="unfinished: objects are under it but not its root"):
        open_store(half)


def test_an_object_written_by_another_during_the_upload_stops_it_before_the_root(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_ingest import write_crops

    from scbd_cells.data import object_store

    _staging_under(tmp_path, monkeypatch)
    table, _ = write_crops(tmp_path / "screen", n=20)
    url = f"s3://{BUCKET}/raced/screen.zarr"
    fs = s3fs.S3FileSystem()
    check = object_store._check_only_ours

    def another_writer_first(*args: object) -> None:
        fs.pipe(f"{BUCKET}/raced/screen.zarr/images/extra", b"x")
        check(*args)

    monkeypatch.setattr(object_store, "_check_only_ours", another_writer_first)
    result = CliRunner().invoke(app, _ingest_arguments(table, url))
    assert isinstance(result.exception, StoreError), result.output
    assert "images/extra" in str(result.exception)
    left = _objects(fs, f"{BUCKET}/raced/screen.zarr")
    assert "zarr.json" not in left and left["images/extra"] == b"x"  # nothing deleted
    with pytest.raises(StoreError, match="unfinished"):
        open_store(url)


def test_the_loader_reads_a_store_on_s3_with_tensorstore(uploaded: tuple[Path, str]) -> None:
    from scbd_cells.data.loader import CellReader

    local_path, url = uploaded
    remote, local = open_store(url), open_store(local_path)
    reader = CellReader(remote, cache_gb=0.0, backend="tensorstore")
    assert reader.backend == "tensorstore"
    rows = np.array([150, 3, 77, 3, 190, 12])
    np.testing.assert_array_equal(reader.read(rows), local.read(rows))
    moved = _copy(url, "moved_ts")
    fs = s3fs.S3FileSystem()
    fs.copy(f"{moved}/images/c/0/0/0/0", f"{moved}/images/c/2/0/0/0")
    damaged = CellReader(open_store(moved), cache_gb=0.0, backend="tensorstore")
    with pytest.raises(StoreError, match=r"cells 16-23 cannot be read.*not the chunk written"):
        damaged.read(np.array([17, 40]))


def test_without_s3fs_the_error_names_the_extra(
    uploaded: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import fsspec  # noqa: F401 (loads fsspec.registry)

    _, url = uploaded
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    # fsspec keeps the classes it imported: forget s3's so that it imports s3fs again
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(InputError, match=r"pip install 'scbd-cells\[s3\]'"):
        open_store(url)


def test_a_key_taken_by_another_writer_is_never_overwritten(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_ingest import write_crops

    from scbd_cells.data import object_store

    _staging_under(tmp_path, monkeypatch)
    table, _ = write_crops(tmp_path / "screen", n=20)
    url = f"s3://{BUCKET}/taken_during/screen.zarr"
    fs = s3fs.S3FileSystem()
    verify = object_store._verify

    def another_writer_first(*args: object, **kwargs: object) -> None:
        verify(*args, **kwargs)  # after the start's check, before the upload
        fs.pipe(f"{BUCKET}/taken_during/screen.zarr/obs.parquet", b"theirs")

    monkeypatch.setattr(object_store, "_verify", another_writer_first)
    result = CliRunner().invoke(app, _ingest_arguments(table, url))
    assert isinstance(result.exception, StoreError), result.output
    assert "Nothing was deleted" in str(result.exception)
    left = _objects(fs, f"{BUCKET}/taken_during/screen.zarr")
    assert left["obs.parquet"] == b"theirs"  # If-None-Match: their object stays
    assert "zarr.json" not in left


def test_a_rerun_uploads_the_store_a_killed_run_left_on_the_local_disk(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_ingest import write_crops

    from scbd_cells import ingest
    from scbd_cells.data.object_store import staging_path

    staging = _staging_under(tmp_path, monkeypatch)
    table, _ = write_crops(tmp_path / "screen", n=20)
    url = f"s3://{BUCKET}/rerun/screen.zarr"
    staged = staging_path(url)
    assert staged.parent.parent == staging and staged.name == "screen.zarr"
    arguments = _ingest_arguments(table, url)
    options = {"perturbation_column": "gene", "workers": 1, "split_fractions": [0.5, 0.4, 0.1]}
    ingest(table, out=staged, **options)  # a run killed after building, before uploading
    store_id = open_store(staged).store_id
    output = _run(arguments)
    assert "Ingested" in output and f"-> {url}" in output
    assert open_store(url).store_id == store_id  # the staged store, not a second ingest
    assert list(staging.iterdir()) == []


def _killed_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str) -> tuple:
    """A store staged for ``s3://lab/KEY/screen.zarr`` with part of it uploaded, as a run
    killed during its upload leaves it: the table, the URL, the staged store and the names
    uploaded."""
    from test_ingest import write_crops

    from scbd_cells import ingest
    from scbd_cells.data.object_store import staging_path

    _staging_under(tmp_path, monkeypatch)
    table, _ = write_crops(tmp_path / "screen", n=20)
    url = f"s3://{BUCKET}/{key}/screen.zarr"
    staged = staging_path(url)
    options = {"perturbation_column": "gene", "workers": 1, "split_fractions": [0.5, 0.4, 0.1]}
    ingest(table, out=staged, **options)
    uploaded = ["images/zarr.json", "images/c/0/0/0/0", "obs.parquet"]
    fs = s3fs.S3FileSystem()
    for name in uploaded:
        fs.put_file(str(staged / name), f"{BUCKET}/{key}/screen.zarr/{name}")
    return table, url, staged, uploaded


def test_a_rerun_finishes_an_upload_a_killed_run_left(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table, url, staged, uploaded = _killed_upload(tmp_path, monkeypatch, "killed_upload")
    store_id = open_store(staged).store_id
    files = _files(staged)
    with pytest.raises(StoreError, match="unfinished"):
        open_store(url)
    output = _run(["-v", *_ingest_arguments(table, url)])
    assert "Resuming the upload" in output and f"-> {url}" in output
    assert f"Uploading {len(files) - len(uploaded)} objects" in output
    assert open_store(url).store_id == store_id
    remote = _objects(s3fs.S3FileSystem(), f"{BUCKET}/killed_upload/screen.zarr")
    assert sorted(remote) == sorted(files)
    assert all(remote[name] == files[name] for name in files if name != "zarr.json")
    assert not staged.exists()


def test_a_killed_upload_with_an_object_changed_is_refused_and_kept(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table, url, staged, _ = _killed_upload(tmp_path, monkeypatch, "changed_upload")
    fs = s3fs.S3FileSystem()
    key = f"{BUCKET}/changed_upload/screen.zarr/images/c/0/0/0/0"
    changed = bytes(255 - byte for byte in fs.cat_file(key))  # same size, other bytes
    fs.pipe_file(key, changed)
    result = CliRunner().invoke(app, _ingest_arguments(table, url))
    assert isinstance(result.exception, InputError), result.output
    assert "is taken" in str(result.exception) and "images/c/0/0/0/0" in str(result.exception)
    assert "obs.parquet" not in str(result.exception)  # the objects equal to ours are not named
    assert fs.cat_file(key) == changed  # nothing overwritten or deleted
    assert not fs.exists(f"{BUCKET}/changed_upload/screen.zarr/zarr.json")
    assert staged.is_dir()  # the staged store is kept for a rerun
