"""Outputs: what every writing command checks before it writes, and the one lock it holds.

Three rules keep a lab's data safe (docs/reliability.md):

- **Ownership.** ``--overwrite`` and the clean-up of unfinished outputs delete
  only what scbd-cells wrote, recognised by its own marker: a store's format
  attribute, an AnnData's ``uns["scbd"]``, or a ``.scbd-cells.json`` marker in a
  folder (run, report, simulated screen, demo) that lists the entries the
  command wrote. Anything else is refused, naming the path and what is there.
- **Inputs are never outputs.** An output may not be, or contain, one of the
  command's inputs.
- **One writer.** A command holds an exclusive OS lock (``flock`` through
  ``filelock``) on its output for its whole run; a second one exits at once. The
  kernel drops the lock when the process dies, so a killed run never blocks the
  rerun. The lock file is ``.NAME.lock`` beside the output and is left in place
  (removing it would let two writers lock two different files).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from scbd_cells import __version__
from scbd_cells.errors import DiskFullError, InputError

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
ANNDATA_SUFFIXES = (".h5ad", ".zarr")
_UNS_KEY = "scbd"  # schema.UNS_SCBD; kept here so this module imports nothing heavy


# --------------------------------------------------------------------------- what is there


def _read_json(path: Path) -> dict | None:
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


def _h5ad_has_scbd(path: Path) -> bool:
    try:
        import h5py

        with h5py.File(path, "r") as handle:
            return f"uns/{_UNS_KEY}" in handle
    except (OSError, ValueError):
        return False


def read_recorded(path: str | os.PathLike, *, what: str) -> dict:
    """What scbd-cells recorded in an AnnData file (its ``uns["scbd"]``), or ``{}``.

    Reads that element only, never ``X``, ``obs`` or ``obsm`` (a reference file may hold
    millions of cells). ``what`` names the file in the errors ("The reference baseline").
    """
    from scbd_cells.errors import DataError

    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist. Pass an AnnData scbd-cells wrote.")
    try:
        try:
            from anndata.io import read_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import read_elem
        if path.suffix == ".zarr":
            import zarr

            root = zarr.open_group(path, mode="r")
            uns = root["uns"] if "uns" in root else {}
            found = read_elem(uns[_UNS_KEY]) if _UNS_KEY in uns else {}
        else:
            import h5py

            with h5py.File(path, "r") as handle:
                key = f"uns/{_UNS_KEY}"
                found = read_elem(handle[key]) if key in handle else {}
    except Exception as error:  # h5py/zarr/anndata raise many types for a bad file
        raise DataError(
            f"Could not read {what.lower()} {path} as AnnData ({type(error).__name__}: {error})."
        ) from None
    return dict(found) if isinstance(found, dict) else {}


def kind_of(path: str | os.PathLike) -> str | None:
    """What scbd-cells wrote at ``path`` (a key of :data:`KIND_NAMES`), or None.

    None means: nothing there, or something scbd-cells did not write (or whose
    marker is gone), which no command may delete.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".h5ad" and _h5ad_has_scbd(path):
            return "anndata"
        return _file_marker_kind(path)
    if not path.is_dir():
        return None
    marker = read_marker(path)
    if marker is not None:
        return str(marker["kind"])
    if _is_store(path):
        return "store"
    if path.suffix == ".zarr" and (path / "uns" / _UNS_KEY / "zarr.json").is_file():
        return "anndata"
    return None


def describe(path: Path) -> str:
    """What a person would want to know about something in the way of an output."""
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
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
    """Refuse an output that is, or contains, one of the command's inputs."""
    out_resolved = Path(out_path).resolve()
    for source in inputs:
        if source is None:
            continue
        source_resolved = Path(source).resolve()
        if source_resolved == out_resolved or out_resolved in source_resolved.parents:
            relation = "is" if source_resolved == out_resolved else "contains"
            raise InputError(
                f"The output {out_path} {relation} an input of this command ({source}); "
                "writing there could destroy it. Choose another --out."
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
        The command's inputs; the output may neither be nor contain one.

    Raises
    ------
    InputError
        The output is an input or holds one; it exists and ``overwrite`` is
        false; or it exists and scbd-cells did not write it (as ``kind``), which
        is refused even with ``overwrite``.
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
    return True


# --------------------------------------------------------------------------- markers


def file_marker_path(path: Path) -> Path:
    """``PARENT/.NAME.scbd-cells.json``: the marker of a plain file (a CSV or Parquet table)."""
    return path.parent / f".{path.name}.scbd-cells.json"


def write_file_marker(path: Path, *, kind: str) -> None:
    """Mark a plain file as written by scbd-cells: its size and modification time, as now.

    A file edited or replaced since no longer matches, so it is no longer scbd-cells' to
    replace.
    """
    stat = path.stat()
    marker = {"kind": kind, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "version": __version__}  # fmt: skip
    file_marker_path(path).write_text(json.dumps(marker) + "\n")


def _file_marker_kind(path: Path) -> str | None:
    marker = _read_json(file_marker_path(path))
    if marker is None or marker.get("kind") not in KIND_NAMES:
        return None
    stat = path.stat()
    if marker.get("size") != stat.st_size or marker.get("mtime_ns") != stat.st_mtime_ns:
        return None  # changed since scbd-cells wrote it
    return str(marker["kind"])



def write_marker(folder: Path, *, kind: str, entries: Iterable[str], **extra: object) -> None:
    """Mark ``folder`` as written by scbd-cells, listing the entries the command wrote."""
    payload = {
        "kind": kind,
        "entries": sorted(set(entries)),
        "version": __version__,
        **extra,
    }
    temporary = folder / f"{MARKER_NAME}.tmp"
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(temporary, folder / MARKER_NAME)


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


def remove_owned(path: str | os.PathLike, *, kind: str) -> None:
    """Delete an earlier output of ``kind``, and nothing scbd-cells did not write.

    A store or an AnnData goes whole. A marked folder loses the entries its
    marker lists (each removed by the same rule if it is itself marked) and the
    marker; what else a person put there stays, and so does the folder then.
    """
    path = Path(path)
    found = kind_of(path)
    if found != kind:  # checked again at the moment of deleting
        raise InputError(
            f"Not removing {path}: it is {KIND_NAMES[found] if found else describe(path)}, "
            f"not {KIND_NAMES[kind]}."
        )
    if path.is_file():
        path.unlink()
        file_marker_path(path).unlink(missing_ok=True)
        return
    marker = read_marker(path)
    if marker is None:  # a store or an AnnData .zarr: all of it is ours
        shutil.rmtree(path)
        return
    for name in marker.get("entries", []):
        entry = path / name
        if Path(name).name != name or name in ("", ".", ".."):
            continue  # a marker names direct children only
        inner = kind_of(entry) if entry.is_dir() else None
        if inner is not None:
            remove_owned(entry, kind=inner)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    (path / MARKER_NAME).unlink(missing_ok=True)
    left = sorted(child.name for child in path.iterdir())
    if left:
        log.info("Kept %d entries in %s that scbd-cells did not write: %s", len(left), path,
                 ", ".join(left[:5]))  # fmt: skip
    else:
        path.rmdir()


# --------------------------------------------------------------------------- lock


def lock_path_of(out_path: Path) -> Path:
    """``PARENT/.NAME.lock``: the lock file of an output."""
    out_path = Path(out_path)
    return out_path.parent / f".{out_path.name}{LOCK_SUFFIX}"


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

    A full disk met inside the block becomes a :class:`DiskFullError` that names
    the output and the room left.

    Raises
    ------
    InputError
        Another process holds the lock, or the output's folder cannot be written.
    DiskFullError
        The disk filled up while the output was written.
    """
    from filelock import FileLock, Timeout

    out_path = Path(out_path)
    lock_path = lock_path_of(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path, timeout=0)
        lock.acquire()
    except Timeout:
        raise InputError(
            f"{out_path} is being written by another scbd-cells process (it holds the lock "
            f"{lock_path}). Wait for it to finish, or choose another --out."
        ) from None
    except OSError as error:
        raise writable_folder_error(out_path.parent, error) from None
    try:
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
            if target is None or int(os.environ.get("RANK", "0")) != 0:
                return function(*args, **kwargs)
            with output_lock(Path(target)):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
