"""Ingest into a store on object storage: built on a local disk, verified, then uploaded.

``ingest --out s3://bucket/key.zarr`` (or ``gs://``) runs the local ingest into a
hidden staging folder, checks every chunk as ``info --verify`` does, and uploads
the store with the commit object last (docs/scaling.md, "Stores on object storage"):

1. refused at once when any object exists under ``key.zarr/`` or
   ``key.zarr.partial/`` (no ``--overwrite``: scbd-cells never deletes on object
   storage), unless every one is a byte-for-byte copy of a file of the store this
   URL's staging folder holds: an upload a killed run left, which the rerun finishes;
2. every chunk object, the cell table and the array metadata, then the ownership
   marker where the store has one, then the group's root ``zarr.json``: a reader
   sees no store (:func:`~scbd_cells.data.store.open_store` refuses a prefix without
   root ``zarr.json`` as unfinished) or a whole one;
3. each object is written only if its key is free (S3: ``If-None-Match: *``; GCS:
   ``ifGenerationMatch=0``), and the prefix is listed again just before the root
   ``zarr.json``: objects this run did not upload abort it, and nothing is deleted.

Credentials and endpoint come from the environment of s3fs (botocore) or gcsfs only.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scbd_cells.core.errors import DiskFullError, InputError, StoreError
from scbd_cells.core.outputs import MARKER_NAME
from scbd_cells.data.store import PARTIAL_SUFFIX, _filesystem, open_store, unreachable

if TYPE_CHECKING:
    from scbd_cells.data.ingest import IngestResult

log = logging.getLogger(__name__)

STAGING_PREFIX = ".scbd-cells-upload-"  # + a digest of the URL, under the system temp folder
ROOT_METADATA = "zarr.json"  # the group's metadata: the commit object, uploaded last
_SHOWN = 5  # keys named in a message


def staging_path(url: str) -> Path:
    """The local folder a store for ``url`` is built in: the same for the same URL, so that
    rerunning a killed command resumes there (``TMPDIR`` chooses the disk)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"{STAGING_PREFIX}{digest}" / url.rsplit("/", 1)[-1]


def ingest_to_url(
    run_ingest: Callable[..., IngestResult], table_path: Any, url: str, options: dict
) -> IngestResult:
    """``run_ingest(table_path, out=STAGED, **options)``, then upload the store to ``url``.

    Raises
    ------
    InputError
        ``overwrite`` was asked for, or objects already exist under the store's key that
        are not an unfinished upload of the store staged for ``url`` (which is finished).
    StoreError
        The staged store fails verification, or the upload failed or met objects it
        did not write (nothing is deleted on object storage).
    """
    if options.get("overwrite"):
        raise InputError(
            f"--overwrite is refused for {url}: scbd-cells never deletes on object storage. "
            "Remove the old store with your storage's tools, or choose another --out."
        )
    fs = _filesystem(url)
    staged = staging_path(url)
    found = _objects_under(fs, url)
    if found:
        _check_resumable(fs, url, staged, found)
        log.info(
            "Resuming the upload to %s: %d object(s) a killed run uploaded are byte-for-byte "
            "the store built in %s.", url, len(found), staged,
        )  # fmt: skip
    staged.parent.mkdir(parents=True, exist_ok=True)
    log.info("Building the store for %s in %s before uploading it.", url, staged)
    try:
        result = run_ingest(table_path, out=staged, **options)
    except DiskFullError as error:
        raise DiskFullError(
            f"{error} (The store for {url} is built in {staged.parent} before its upload: "
            "set TMPDIR to a folder on a disk with room, then rerun the command.)"
        ) from error
    _verify(staged, url, workers=int(options.get("workers") or 2))
    _upload(fs, staged, url, present=set(found))
    shutil.rmtree(staged.parent)
    return dataclasses.replace(result, store_path=url, already_complete=False)


def _verify(staged: Path, url: str, *, workers: int) -> None:
    """Every chunk of the staged store reads back with its checksum (``info --verify``)."""
    damaged = open_store(staged).verify(workers=workers)
    if damaged:
        cells = sum(stop - start for start, stop in damaged)
        raise StoreError(
            f"The store built for {url} in {staged} is damaged ({cells:,} cells cannot be "
            "read back); nothing was uploaded. Check that disk, then remove that folder and "
            "rerun the command."
        )


def _check_resumable(fs: Any, url: str, staged: Path, found: dict[str, int]) -> None:
    """Objects under the key are allowed only as an unfinished upload of the staged store.

    Every one must be a byte-for-byte copy of a file of the complete store in ``staged``
    (the same URL's staging folder), and the root ``zarr.json`` must not be among them: the
    rerun then uploads only what is missing, still create-only, so what it commits is the
    staged store whatever wrote those objects.

    Raises
    ------
    InputError
        Anything else is under the key (nothing is deleted or overwritten).
    """
    base, partial = _keys(url)
    files = _staged_files(staged) if (staged / ROOT_METADATA).is_file() else {}
    theirs = [
        key
        for key in sorted(found)
        if key.startswith(partial)
        or key == f"{base}/{ROOT_METADATA}"
        or key[len(base) + 1 :] not in files
        or not _same_bytes(fs, key, files[key[len(base) + 1 :]])
    ]
    if theirs:
        raise InputError(
            f"{url} is taken: {_listed(theirs)} already exist(s) under it. scbd-cells writes "
            "a store on object storage only under an empty key (or finishes its own killed "
            "upload) and never deletes there: choose another --out, or remove those objects "
            "with your storage's tools."
        )


def _staged_files(staged: Path) -> dict[str, Path]:
    """``{name inside the store: local file}`` of the staged store."""
    files = (path for path in staged.rglob("*") if path.is_file())
    return {path.relative_to(staged).as_posix(): path for path in files}


def _same_bytes(fs: Any, key: str, path: Path) -> bool:
    """Whether the object at ``key`` holds exactly ``path``'s bytes.

    The object's MD5 (an S3 ETag of a single-part upload, GCS's ``md5Hash``) settles it when
    it matches; otherwise (a multipart ETag, server-side encryption) the object is read back.
    """
    info = fs.info(key)
    if int(info.get("size") or 0) != path.stat().st_size:
        return False
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    etag = str(info.get("ETag") or "").strip('"')  # S3
    md5_hash = base64.b64encode(digest.digest()).decode()  # GCS's md5Hash
    if etag == digest.hexdigest() or info.get("md5Hash") == md5_hash:
        return True
    return fs.cat_file(key) == path.read_bytes()


def _keys(url: str) -> tuple[str, str]:
    """The object keys (``bucket/key.zarr``) of the store and of its unfinished sibling."""
    path = url.split("://", 1)[1]
    return path, path + PARTIAL_SUFFIX


def _objects_under(fs: Any, url: str) -> dict[str, int]:
    """``{key: size}`` of every object at or under the store's key and its ``.partial`` key."""
    fs.invalidate_cache()  # s3fs caches listings: a listing must be today's
    found: dict[str, int] = {}
    try:
        for path in _keys(url):
            found.update(
                (key, int(info.get("size") or 0))
                for key, info in fs.find(path, detail=True).items()
                if key == path or key.startswith(path + "/")
            )
    except Exception as error:  # botocore: no credentials, access denied, endpoint unreachable
        raise unreachable(url, error, doing="list") from None
    return found


def _listed(keys: dict[str, int] | list[str]) -> str:
    names = sorted(keys)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _upload(fs: Any, staged: Path, url: str, *, present: set[str]) -> None:
    """Upload the staged store: the data and array metadata, the marker, then the root last.

    ``present``: keys a killed run already uploaded (checked equal by
    :func:`_check_resumable`), not sent again.
    """
    files = _staged_files(staged)
    base = _keys(url)[0]
    first = [
        name
        for name in files
        if name not in (ROOT_METADATA, MARKER_NAME) and f"{base}/{name}" not in present
    ]
    expected = {f"{base}/{name}": path.stat().st_size for name, path in files.items()}
    # the root metadata records the command and --out: the URL, not the staging folder
    root = (staged / ROOT_METADATA).read_text()
    root = root.replace(json.dumps(str(staged))[1:-1], url).encode()
    expected[f"{base}/{ROOT_METADATA}"] = len(root)
    # an object is written only where none is (docs/scaling.md): s3fs sends If-None-Match: *,
    # gcsfs ifGenerationMatch=0
    exclusive = {"mode": "create"}
    log.info("Uploading %d objects to %s (root zarr.json last).", len(files) - len(present), url)
    try:
        if first:
            fs.put([str(files[name]) for name in first], [f"{base}/{name}" for name in first],
                   **exclusive)  # fmt: skip
        if MARKER_NAME in files and f"{base}/{MARKER_NAME}" not in present:
            fs.put_file(str(files[MARKER_NAME]), f"{base}/{MARKER_NAME}", **exclusive)
        _check_only_ours(fs, url, expected, ROOT_METADATA)
        fs.pipe_file(f"{base}/{ROOT_METADATA}", root, **exclusive)
    except StoreError:
        raise
    except Exception as error:  # botocore, network, a key taken by another writer
        raise StoreError(
            f"Uploading the store to {url} failed ({type(error).__name__}: {error}). Nothing "
            f"was deleted: what was uploaded stays under {url}/ without its root zarr.json, "
            "which readers refuse as unfinished. Rerun the same command: it uploads what is "
            f"missing of the store built in {staged} (kept until the upload is done)."
        ) from error
    log.info("Uploaded %s.", url)


def _check_only_ours(fs: Any, url: str, expected: dict[str, int], last: str) -> None:
    """Just before the commit object: under the prefix are exactly the objects uploaded."""
    found = _objects_under(fs, url)
    final = f"{_keys(url)[0]}/{last}"
    foreign = [key for key, size in found.items() if expected.get(key) != size or key == final]
    missing = [key for key in expected if key not in found and key != final]
    if foreign or missing:
        what = "; ".join(
            part
            for part in (
                foreign and f"objects this run did not upload (or changed): {_listed(foreign)}",
                missing and f"objects it uploaded are gone: {_listed(missing)}",
            )
            if part
        )
        raise StoreError(
            f"Another writer is at {url}: {what}. The upload stopped before the root "
            "zarr.json, so readers refuse the store as unfinished; nothing was deleted. "
            f"Sort out the objects under {url}/ with your storage's tools, then rerun."
        )

