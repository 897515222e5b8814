"""Outputs: what every writing command checks before it writes, the one lock it holds, and how
it puts a file in place.

Three rules keep a lab's data safe (docs/reliability.md):

- **Ownership.** ``--overwrite`` and the clean-up of unfinished outputs delete
  only what scbd-cells wrote. A folder it wrote (run, report, simulated screen,
  demo, pictures, sweep) holds a ``.scbd-cells.json`` marker listing the entries
  the command wrote; a store carries its format attribute. A file (an AnnData
  ``.h5ad`` or ``.zarr``, an exported table) cannot list its own content, so its
  record lives in one place outside the lab's folders, the user's state folder
  (:func:`ownership_dir`): the resolved path it was written as, its size,
  modification time and inode, and a SHA-256 of its content. A copy, a file made
  from one (it inherits ``uns["scbd"]``) or one edited since matches no record
  and is not scbd-cells' to replace. Anything else is refused, naming the path and
  what is there. Deletion never follows a symbolic link: a link inside an output
  is removed as a link, and an output that is itself a link is never replaced.
- **Inputs are never outputs.** An output may not be, contain, or lie inside one
  of the command's inputs.
- **One writer.** A command holds an exclusive OS lock (``flock`` through
  ``filelock``) on its output, named after the output's resolved path, for its
  whole run; a second one, under any name of the same output, exits at once. The
  kernel drops the lock when the process dies, so a killed run never blocks the
  rerun. The lock file ``.NAME.lock`` beside the output is removed when the command
  ends (while still held, so two writers can never lock two different files).

Every file a command writes goes through :func:`atomic_path` (or its shorthands
:func:`write_text_atomic`, :func:`write_bytes_atomic`): written under a hidden
temporary name beside it, flushed to disk, renamed into place; created by the
writer itself, so it follows the umask like any other file of the user's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from scbd_cells import __version__
from scbd_cells.core.errors import DiskFullError, InputError
from scbd_cells.core.rank import is_rank_zero

log = logging.getLogger(__name__)

MARKER_NAME = ".scbd-cells.json"
LOCK_SUFFIX = ".lock"

# what each kind is called in messages
KIND_NAMES = {
    "store": "a scbd-cells store",
    "anndata": "an AnnData written by scbd-cells",
    "run": "a scbd-cells training run folder",
    "report": "a scbd-cells report folder",
    "screen": "a simulated screen written by scbd-cells",
    "demo": "a scbd-cells demo folder",
    "table": "a profile table exported by scbd-cells",
    "pictures": "a folder of scbd-cells reconstruct pictures",
    "sweep": "a scbd-cells alpha sweep folder",
}
#: Outputs whose ownership is recorded in :func:`ownership_dir` (they cannot hold a marker).
FILE_KINDS = ("anndata", "table")
ANNDATA_SUFFIXES = (".h5ad", ".zarr")
_UNS_KEY = "scbd"  # schema.UNS_SCBD; kept here so this module imports nothing heavy
# A second writer waits this long for the lock before it is told the output is busy: long
# enough to ride out the moment when the first one removes the lock file and lets go.
_LOCK_WAIT_S = 0.25


# --------------------------------------------------------------------------- what is there


#: URL schemes of object storage a store can be read from (docs/scaling.md, "Stores on object
#: storage"); every other path is a local one.
OBJECT_STORAGE_SCHEMES = ("s3", "gs")


def object_url(path: str | os.PathLike | None) -> str | None:
    """``path`` as an object-storage URL (``s3://bucket/key``, no trailing ``/``), or None.

    Only a ``str`` can be a URL: ``Path("s3://b/k")`` has already lost a slash. The
    functions of this module work on local paths; callers route URLs around them.
    """
    if not isinstance(path, str) or "://" not in path:
        return None
    scheme = path.split("://", 1)[0].lower()
    if scheme not in OBJECT_STORAGE_SCHEMES:
        raise InputError(
            f"{path} is a {scheme}:// URL; scbd-cells reads stores from local paths and from "
            f"{', '.join(f'{name}://' for name in OBJECT_STORAGE_SCHEMES)} URLs only."
        )
    return path.rstrip("/")


def location_text(path: str | os.PathLike) -> str:
    """What provenance records for an input: its URL, or its resolved local path."""
    return object_url(path) or str(Path(path).resolve())


def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``; None when missing, unreadable, or a symbolic link.

    A marker or ``zarr.json`` reached through a link could make a folder look like one of
    scbd-cells' outputs when it is not, so links are never read as markers.
    """
    if path.is_symlink():
        return None
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def read_marker(folder: Path) -> dict | None:
    """The ``.scbd-cells.json`` marker of a folder scbd-cells wrote, or None."""
    marker = _read_json(Path(folder) / MARKER_NAME)
    if marker is None or marker.get("kind") not in KIND_NAMES:
        return None
    return marker


def _is_store(path: Path) -> bool:
    from scbd_cells.data import schema

    attributes = (_read_json(path / "zarr.json") or {}).get("attributes") or {}
    return attributes.get("format") == schema.STORE_FORMAT


def _has_scbd_provenance(path: Path) -> bool:
    """Whether an AnnData file or ``.zarr`` folder carries ``uns["scbd"]`` (written by us once)."""
    if path.is_dir():
        return (path / "uns" / _UNS_KEY / "zarr.json").is_file()
    try:
        import h5py

        with h5py.File(path, "r") as handle:
            return f"uns/{_UNS_KEY}" in handle
    except (OSError, ValueError):
        return False


def kind_of(path: str | os.PathLike) -> str | None:
    """What scbd-cells wrote at ``path`` (a key of :data:`KIND_NAMES`), or None.

    None means: nothing there, or something scbd-cells did not write (or whose
    marker or record is gone, or which changed since), which no command may delete.
    A ``path`` that is a symbolic link is looked at through the link (a run or a sweep
    may be continued through one); only deletion refuses links.
    """
    path = Path(path)
    if path.is_file():
        return _recorded_kind(path) or _legacy_table_kind(path)
    if not path.is_dir():
        return None
    marker = read_marker(path)
    if marker is not None:
        return str(marker["kind"])
    if _is_store(path):
        return "store"
    return _recorded_kind(path)


def describe(path: Path) -> str:
    """What a person would want to know about something in the way of an output."""
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    if path.suffix in ANNDATA_SUFFIXES and _has_scbd_provenance(path):
        return (
            'an AnnData with scbd-cells\' provenance (uns["scbd"]) that is not a file '
            "scbd-cells wrote there: a copy, a file made from one, one changed since, or one "
            "written by another user or before scbd-cells kept records of its files"
        )
    if path.is_file():
        return f"a file of {path.stat().st_size:,} bytes"
    if path.is_dir():
        entries = sorted(child.name for child in path.iterdir())
        if not entries:
            return "an empty folder"
        if (path / "zarr.json").is_file():
            return f"a Zarr group that scbd-cells did not write ({len(entries)} entries)"
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        return f"a folder of {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown})"
    return "something that is neither a file nor a folder"


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


# --------------------------------------------------------------------------- checks


def check_not_input(out_path: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is, contains, or lies inside one of the command's inputs.

    Paths are compared resolved, so a symbolic link does not hide an input.
    """
    out_resolved = Path(out_path).resolve()
    for source in inputs:
        if source is None or object_url(source) is not None:
            continue  # an input on object storage is never a local output
        source_resolved = Path(source).resolve()
        if source_resolved == out_resolved or out_resolved in source_resolved.parents:
            relation = "is" if source_resolved == out_resolved else "contains"
            raise InputError(
                f"The output {out_path} {relation} an input of this command ({source}); "
                "writing there could destroy it. Choose another --out."
            )
        if source_resolved in out_resolved.parents:
            raise InputError(
                f"The output {out_path} lies inside an input of this command ({source}); an "
                "output never goes inside an input (it could damage it, and it would go when "
                f"the input is replaced). Choose a --out outside {source}."
            )


def _refuse_link(path: Path, *, doing: str) -> None:
    if path.is_symlink():
        raise InputError(
            f"The output {path} is a symbolic link (to {os.readlink(path)}); scbd-cells "
            f"never {doing} through a link. Give the target itself as --out, or remove the "
            "link yourself."
        )


def check_output(
    out_path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> bool:
    """Check that a command may write ``out_path``; True if an earlier output will be replaced.

    Parameters
    ----------
    out_path
        The output (file or folder).
    kind
        What the command writes there (a key of :data:`KIND_NAMES`).
    overwrite
        Whether the user allowed replacing an earlier output of the same kind.
    inputs
        The command's inputs; the output may neither be, contain nor lie inside one.

    Raises
    ------
    InputError
        The output is an input, holds one or lies in one; it exists and ``overwrite`` is
        false; it exists and scbd-cells did not write it (as ``kind``), which is refused
        even with ``overwrite``; or it is a symbolic link and would be replaced.
    """
    out_path = Path(out_path)
    check_not_input(out_path, inputs)
    if not out_path.exists() and not out_path.is_symlink():
        return False
    if kind != "anndata" and _is_empty_dir(out_path):
        return False
    found = kind_of(out_path)
    if found != kind:
        what = KIND_NAMES[found] if found else describe(out_path)
        even = " even with --overwrite" if overwrite else ""
        raise InputError(
            f"The output {out_path} already exists and is {what}, not {KIND_NAMES[kind]}; "
            f"scbd-cells only replaces what it wrote itself, so it is left alone{even}. "
            "Choose another --out, or move it away yourself."
        )
    if not overwrite:
        raise InputError(
            f"The output {out_path} already exists ({KIND_NAMES[kind]}). Pass --overwrite to "
            "replace it, or choose another --out."
        )
    _refuse_link(out_path, doing="replaces or deletes")
    return True


# --------------------------------------------------------------------------- folder markers


def write_marker(folder: Path, *, kind: str, entries: Iterable[str], **extra: object) -> None:
    """Mark ``folder`` as written by scbd-cells, listing the entries the command wrote."""
    payload = {
        "kind": kind,
        "entries": sorted(set(entries)),
        "version": __version__,
        **extra,
    }
    write_text_atomic(Path(folder) / MARKER_NAME, json.dumps(payload, indent=1) + "\n")


def prepare_folder(
    folder: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool,
    entries: Iterable[str],
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Make an output folder ready: checked, an earlier output of ``kind`` removed, marked.

    Returns the folder. Raises :class:`InputError` as :func:`check_output` does,
    or when the folder cannot be created or written.
    """
    folder = Path(folder)
    if check_output(folder, kind=kind, overwrite=overwrite, inputs=inputs):
        remove_owned(folder, kind=kind)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_marker(folder, kind=kind, entries=entries)
    except OSError as error:
        raise writable_folder_error(folder, error) from error
    return folder


# --------------------------------------------------------------------------- file records


def ownership_dir() -> Path:
    """Where scbd-cells records the files it wrote: the user's state folder, ``owned/``.

    ``~/.local/state/scbd-cells/owned`` on Linux (``$XDG_STATE_HOME`` if set),
    ``~/Library/Application Support/scbd-cells/owned`` on macOS (platformdirs).
    """
    import platformdirs

    return platformdirs.user_state_path("scbd-cells") / "owned"


def _record_path(resolved: Path) -> Path:
    return ownership_dir() / f"{hashlib.sha256(os.fsencode(resolved)).hexdigest()[:40]}.json"


def _tree_files(folder: Path) -> list[tuple[str, os.stat_result]]:
    """Every file under ``folder`` (links not followed), sorted by relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            found.append((full.relative_to(folder).as_posix(), full.lstat()))
    return found


def _identity(path: Path) -> dict:
    """Size, modification time and inode of a file, or of a folder's files taken together."""
    if path.is_dir():
        files = _tree_files(path)
        return {
            "size": sum(stat.st_size for _, stat in files),
            "mtime_ns": max((stat.st_mtime_ns for _, stat in files), default=0),
            "inode": path.stat().st_ino,
        }
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, _stat_key: tuple) -> str:
    # _stat_key (device, inode, size, mtime, ctime) makes a cached digest stale on any change
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's (relative paths and bytes, links as links)."""
    path = Path(path)
    if not path.is_dir():
        stat = path.stat()
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        return _file_sha256(str(path), key)
    digest = hashlib.sha256()
    for relative, stat in _tree_files(path):
        full = path / relative
        digest.update(relative.encode() + b"\0")
        if full.is_symlink():
            digest.update(b"link\0" + os.fsencode(os.readlink(full)) + b"\0")
        else:
            key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            digest.update(bytes.fromhex(_file_sha256(str(full), key)))
    return digest.hexdigest()


def record_owned(path: Path, *, kind: str) -> None:
    """Record that scbd-cells wrote the file (or AnnData ``.zarr`` folder) ``path`` as ``kind``.

    The record names the resolved path and what is there now (:func:`_identity`, content
    SHA-256). A record that cannot be written is a warning: the file stays, but
    ``--overwrite`` will then refuse to replace it.
    """
    resolved = Path(path).resolve()
    record = {
        "kind": kind,
        "path": str(resolved),
        **_identity(resolved),
        "sha256": content_sha256(resolved),
        "version": __version__,
    }
    record_path = _record_path(resolved)
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record_path, json.dumps(record, indent=1) + "\n")
    except OSError as error:
        log.warning(
            "Could not record in %s that scbd-cells wrote %s (%s): the file is complete, but "
            "--overwrite will not replace it; delete it yourself when it is no longer needed.",
            ownership_dir(), path, error.strerror or error,
        )  # fmt: skip


def _forget_owned(path: Path) -> None:
    with contextlib.suppress(OSError):
        _record_path(Path(path).resolve()).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _legacy_marker_path(path).unlink(missing_ok=True)


def _recorded_kind(path: Path) -> str | None:
    """The kind scbd-cells recorded for the file at ``path``, if it is still that very file."""
    resolved = path.resolve()
    record = _read_json(_record_path(resolved))
    if record is None or record.get("path") != str(resolved):
        return None
    if record.get("kind") not in FILE_KINDS:
        return None
    if any(record.get(key) != value for key, value in _identity(resolved).items()):
        return None  # replaced, moved or edited since scbd-cells wrote it
    if record.get("sha256") != content_sha256(resolved):
        return None
    return str(record["kind"])


def _legacy_marker_path(path: Path) -> Path:
    # scbd-cells < 0.2 marked an exported table with PARENT/.NAME.scbd-cells.json
    return path.parent / f".{path.name}.scbd-cells.json"


def _legacy_table_kind(path: Path) -> str | None:
    """A table marked by an earlier scbd-cells and unchanged since (size and mtime as marked)."""
    marker = _read_json(_legacy_marker_path(path))
    if marker is None or marker.get("kind") != "table":
        return None
    stat = path.stat()
    if marker.get("size") != stat.st_size or marker.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return "table"


# --------------------------------------------------------------------------- deleting


def remove_owned(path: str | os.PathLike, *, kind: str) -> None:
    """Delete an earlier output of ``kind``, and nothing scbd-cells did not write.

    A store, an AnnData or a table goes whole. A marked folder loses the entries its
    marker lists (each removed by the same rule if it is itself marked) and the
    marker; what else a person put there stays, and so does the folder then. A
    symbolic link is never followed: one inside the output is removed as a link (its
    target stays untouched), and an output that is itself a link is refused.
    """
    path = Path(path)
    _refuse_link(path, doing="deletes")
    found = kind_of(path)
    if found != kind:  # checked again at the moment of deleting
        raise InputError(
            f"Not removing {path}: it is {KIND_NAMES[found] if found else describe(path)}, "
            f"not {KIND_NAMES[kind]}."
        )
    if path.is_file():
        path.unlink()
        _forget_owned(path)
        return
    marker = read_marker(path)
    if marker is None:  # a store or an AnnData .zarr: all of it is ours
        shutil.rmtree(path)  # removes links inside as links, never their targets
        _forget_owned(path)
        return
    for name in marker.get("entries", []):
        if Path(name).name != name or name in ("", ".", ".."):
            continue  # a marker names direct children only
        _remove_entry(path / name)
    (path / MARKER_NAME).unlink(missing_ok=True)
    left = sorted(child.name for child in path.iterdir())
    if left:
        log.info("Kept %d entries in %s that scbd-cells did not write: %s", len(left), path,
                 ", ".join(left[:5]))  # fmt: skip
    else:
        path.rmdir()


def _remove_entry(entry: Path) -> None:
    """Remove one entry a folder's marker lists (it may have become a link since)."""
    if entry.is_symlink():
        entry.unlink()  # the link only
    elif entry.is_dir():
        inner = kind_of(entry)
        if inner is not None:
            remove_owned(entry, kind=inner)
        else:
            shutil.rmtree(entry)
    elif entry.exists():
        entry.unlink()
        _forget_owned(entry)


# --------------------------------------------------------------------------- writing files


def temporary_name(path: Path) -> Path:
    """A hidden, unused name beside ``path`` to write it under: ``.STEM.tmp-XXXXXXXX.SUFFIX``.

    Nothing is created: the writer creates the file (or folder), so it gets the
    permissions the umask gives any new file. The suffix is kept for writers that choose
    the format by it.
    """
    path = Path(path)
    while True:
        candidate = path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate


def remove_temporary(path: Path) -> None:
    """Remove a temporary output (file or folder) if it is there; links as links."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(
    tmp_path: Path, out_path: Path, *, kind: str | None = None, overwrite: bool = False
) -> None:
    """Rename a finished temporary file (or folder) into place: the last step of every write.

    A file is flushed to disk first. With ``kind`` (an output a person named: an AnnData,
    a table) an earlier output there is checked again and removed, as
    :func:`check_output` and :func:`remove_owned` allow, and the new file's ownership is
    recorded (:func:`record_owned`). Without it, ``out_path`` is a file inside one of
    scbd-cells' own folders and is simply replaced.
    """
    tmp_path, out_path = Path(tmp_path), Path(out_path)
    if tmp_path.is_file():
        _fsync_file(tmp_path)
    if kind is not None and (out_path.exists() or out_path.is_symlink()):
        check_output(out_path, kind=kind, overwrite=overwrite)  # again, just before
        remove_owned(out_path, kind=kind)
    os.replace(tmp_path, out_path)
    if kind in FILE_KINDS:
        record_owned(out_path, kind=kind)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, kind: str | None = None, overwrite: bool = False
) -> Iterator[Path]:
    """A temporary name to write ``path`` under; put in place when the block ends without error.

    The one way scbd-cells writes a file: a crash or an error leaves the earlier file
    (or none) and no temporary one; see :func:`publish` for ``kind`` and ``overwrite``.
    """
    path = Path(path)
    tmp_path = temporary_name(path)
    try:
        yield tmp_path
        publish(tmp_path, path, kind=kind, overwrite=overwrite)
    except BaseException:
        remove_temporary(tmp_path)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp_path, open(tmp_path, "xb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`)."""
    write_bytes_atomic(path, text.encode())


# --------------------------------------------------------------------------- lock


def lock_path_of(out_path: Path) -> Path:
    """``PARENT/.NAME.lock`` beside the output's resolved path: the lock file of an output.

    Every name of one output (through a symbolic link to it or to a folder above it)
    gives the same lock file.
    """
    out_path = Path(out_path)
    resolved = out_path.resolve()
    if not resolved.parent.is_dir():  # a link to a place that does not exist yet
        resolved = out_path.parent.resolve() / out_path.name
    return resolved.parent / f".{resolved.name}{LOCK_SUFFIX}"


def writable_folder_error(folder: Path, error: OSError) -> InputError:
    """The message for an output folder that cannot be written."""
    blocking = next((path for path in (folder, *folder.parents) if path.is_file()), None)
    reason = f"{blocking} is a file" if blocking else error.strerror or str(error)
    return InputError(
        f"Cannot write in the folder {folder} ({reason}). Choose a --out in a folder you can "
        "write to."
    )


def free_bytes(path: Path) -> int | None:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return shutil.disk_usage(existing).free if existing is not None else None


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def check_free_space(out_path: Path, needed_bytes: int) -> None:
    """Refuse to start writing ``needed_bytes`` (an estimate) where the disk has less room.

    Some writers (HDF5) cannot recover from a full disk mid-write; finding out
    first is the only safe way.
    """
    free = free_bytes(Path(out_path))
    margin = needed_bytes // 10 + (1 << 20)  # HDF5/zarr metadata and obs encoding
    if free is not None and free < needed_bytes + margin:
        raise DiskFullError(
            f"Not enough room for {out_path}: it needs about {_mib(needed_bytes)}, and that disk "
            f"has {_mib(free)} free. Free some space or choose a --out on another disk."
        )


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # HDF5 (h5py) reports a failed write as RuntimeError with the C errno in its text
    return isinstance(error, RuntimeError) and "errno = 28" in str(error)


@contextlib.contextmanager
def output_lock(out_path: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive write lock of an output for the duration of the ``with`` block.

    The lock is named after the output's resolved path (:func:`lock_path_of`), and its
    file is removed when the block ends. A full disk met inside the block becomes a
    :class:`DiskFullError` that names the output and the room left.

    Raises
    ------
    InputError
        Another process holds the lock, or the output's folder cannot be written.
    DiskFullError
        The disk filled up while the output was written.
    """
    from filelock import FileLock, Timeout

    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = lock_path_of(out_path)
        lock = FileLock(lock_path, timeout=_LOCK_WAIT_S)
        lock.acquire()
    except Timeout:
        raise InputError(
            f"{out_path} is being written by another scbd-cells process (it holds the lock "
            f"{lock_path}). Wait for it to finish, or choose another --out."
        ) from None
    except OSError as error:
        raise writable_folder_error(out_path.parent, error) from None
    held = None
    try:
        held = os.stat(lock_path)  # this process holds the inode the path names now
        yield lock_path
    except Exception as error:
        if not _disk_full(error):
            raise
        free = free_bytes(out_path)
        raise DiskFullError(
            f"The disk filled up while writing {out_path} ({_mib(free or 0)} free there now). "
            "Free some space or choose a --out on another disk, then run the command again: "
            "ingest and train continue where they stopped; the other commands left no partial "
            "output."
        ) from error
    finally:
        # Removed while still held: a process waiting on this inode finds it unlinked when it
        # gets the lock, and filelock then opens a new file (never two writers at once).
        with contextlib.suppress(OSError):
            if held is not None and os.path.samestat(os.lstat(lock_path), held):
                lock_path.unlink()
        lock.release()


Function = TypeVar("Function", bound=Callable)


def locks_output(parameter: str = "out") -> Callable[[Function], Function]:
    """Decorate a command so that it holds :func:`output_lock` on its output for the whole call.

    ``parameter`` names the argument that holds the output path. Under torchrun
    (``RANK`` set) only rank 0, the one that writes, takes the lock.
    """

    def decorate(function: Function) -> Function:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: object, **kwargs: object) -> object:
            target = signature.bind_partial(*args, **kwargs).arguments.get(parameter)
            if target is None or not is_rank_zero():
                return function(*args, **kwargs)
            with output_lock(Path(target)):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
