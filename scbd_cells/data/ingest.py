"""Ingest: a cells table plus crops or fields of view -> a validated, resumable Zarr store.

Three passes, each cheap compared with the next:

1. the table: label columns, nulls, duplicate ids, the control label, image
   columns, missing files, centroids (fields: one header read per field);
2. a probe of the first few images fixes the reference (channels, size, dtype);
3. the write: cells in store order (grouped by perturbation), block by block;
   each worker (a local process, or a Dask worker with ``scheduler``) reads a
   run of whole chunks, resizes it if asked, writes it and returns its
   statistics. Fields of view are read once each and all their cells cut out
   into a scratch file first, because store order scatters a field's cells
   over the whole store.

An image that fails in pass 3 (corrupt data, wrong channel count, another
size) stops the ingest with the rows named, or with ``skip_bad`` is recorded
and the ingest starts again without it. docs/store.md describes the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shlex
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
)
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from scbd_cells import __version__
from scbd_cells.core.config import IngestOptions, validated
from scbd_cells.core.errors import DataError, InputError, StoreError
from scbd_cells.core.outputs import check_not_input, check_output, kind_of, output_lock
from scbd_cells.core.progress import progress_bar
from scbd_cells.data import cellprofiler_tables, dask_cluster, schema
from scbd_cells.data.ome_zarr import describe_ome_zarr, is_ome_zarr, read_ome_zarr
from scbd_cells.data.store import (
    TABLE_ROW,
    ChannelStats,
    StoreWriter,
    check_partial,
    check_split_fractions,
    did_you_mean,
    finalise_obs,
    label_table,
    open_store,
    write_cells,
)

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

DEFAULT_IMAGE_COLUMN = "image_path"
SCRATCH_FILE = "crops.scratch.npy"
FIELDS_DONE_FILE = "fields_done.txt"
_PROBE_ROWS = 16  # readable images (or fields) that fix the reference
_PROBE_LIMIT = 256  # rows tried for them
_TASK_CELLS = 256  # cells per worker task
_BLOCKS_IN_FLIGHT = 1  # blocks queued behind the one being finished
_MAX_REPLANS = 3
_MAX_ROWS_IN_MESSAGE = 5


@dataclass(frozen=True)
class IngestResult:
    """What ingest wrote.

    Attributes
    ----------
    store_path
        The finished store.
    n_cells
        Cells in the store.
    n_rejected
        Input rows left out because they were bad (``skip_bad``), listed in the
        store's ``rejected.csv``.
    n_border
        Cells skipped because their crop would leave the field of view (fields only).
    channel_names, image_size, dtype
        What each stored cell looks like.
    seconds, cells_per_second
        Wall time of the whole ingest and its throughput.
    resumed
        Whether an interrupted ingest was continued.
    already_complete
        The same table and options had already been ingested into the store: nothing was done.
    n_blank
        Cells whose every pixel is zero (kept, but worth a look).
    """

    store_path: Path
    n_cells: int
    n_rejected: int
    n_border: int
    channel_names: list[str]
    image_size: tuple[int, int]
    dtype: str
    seconds: float
    cells_per_second: float
    resumed: bool
    already_complete: bool = False
    n_blank: int = 0


@dataclass(frozen=True)
class IngestSpec:
    """Everything that decides a store's content: the table and the options (not the workers).

    Attributes are :class:`~scbd_cells.core.config.IngestOptions` fields as the store
    records them (tuples, absolute paths as text); ``table`` is absolute.
    """

    table: Path
    perturbation_column: str
    guide_column: str | None
    batch_columns: tuple[str, ...]
    control: str | None
    image_column: str | None
    channel_columns: tuple[str, ...] | None
    fov_column: str | None
    fov_channel_columns: tuple[str, ...] | None
    x_column: str | None
    y_column: str | None
    crop_size: int | None
    channel_names: tuple[str, ...] | None
    resize: int | None
    split_fractions: tuple[float, float, float]
    seed: int
    skip_bad: bool
    image_root: str | None = None
    image_table: str | None = None
    channels: tuple[str, ...] | None = None
    cell_id_column: str | None = None
    mask_column: str | None = None
    mask_neighbours: str | None = None  # set with mask_column only
    label_column: str | None = None

    @classmethod
    def from_options(cls, table_path: Path, options: IngestOptions) -> IngestSpec:
        """The spec of ``options`` (checked :class:`IngestOptions`) for an absolute table."""
        content = {f.name: getattr(options, f.name) for f in dataclasses.fields(cls)[1:]}
        for name in ("channel_columns", "fov_channel_columns", "channel_names", "channels"):
            content[name] = content[name] or None  # () as None
        for name in ("image_root", "image_table"):
            content[name] = str(Path(content[name]).resolve()) if content[name] else None
        content["split_fractions"] = check_split_fractions(options.split_fractions)
        content["mask_neighbours"] = options.mask_neighbours if options.mask_column else None
        return cls(table=table_path, **content)

    def options(self) -> dict:
        """The options as JSON values (what a store records to recognise a rerun)."""
        options = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name != "table"
        }
        return json.loads(json.dumps(options))

    def command(self, out_path: Path) -> str:
        """The ``scbd-cells ingest`` command line that gives this spec (for provenance)."""
        words = ["scbd-cells", "ingest", str(self.table), "--out", str(out_path)]
        for name, value in self.options().items():
            flag = "--" + name.replace("_", "-")
            if value is None or value is False:
                continue
            if value is True:
                words.append(flag)
            else:
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                words += [flag, text]
        return shlex.join(words)


class ImageSource(Protocol):
    """Where the cells' pixels come from: crop files (one per cell, or per cell and channel)
    or fields of view with centroids. Ingest calls the methods in this order.
    """

    columns: list[str]  # the image path columns
    per_channel: bool  # one file per channel
    reference: _Reference | None  # what every cell looks like (set by probe)
    first_path: str | None  # a file the reference was read from (set by probe)
    border_rows: list[int]  # table rows whose crop leaves its field (set by check)

    def check(self, rows: np.ndarray) -> dict[int, str]:
        """Table-level problems (missing files, null paths or centroids): ``{row: reason}``."""

    def probe(self, rows: np.ndarray) -> None:
        """Set ``reference`` from the first readable images; raise ``_ImageFailures`` if none."""

    def scan(self, rows: np.ndarray) -> dict[int, str]:
        """Read every listed cell's image; return the failures."""

    def fill(
        self, writer: StoreWriter, table_rows: np.ndarray, *, resize: int | None, bar, task
    ) -> None:
        """Write every pending block of the store; raise ``_ImageFailures`` for bad images."""


class _ImageFailures(Exception):
    """Some cells' images could not be used: ``{table row: reason}``."""

    def __init__(self, failures: dict[int, str]) -> None:
        super().__init__(f"{len(failures)} image failures")
        self.failures = failures


class _BadImage(Exception):
    """One image is unusable; the message is the reason."""


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------


def read_table(table_path: Path, *, text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read a cells table: CSV, TSV (``.tsv``, ``.tab``, ``.txt``; gzip allowed) or Parquet.

    ``text_columns`` (ids, labels, batch columns) and every ``Metadata_*`` column of a
    CSV/TSV are read as the strings the file holds: ``00001`` stays ``00001``, ``NA``
    stays ``NA``, and only an empty field is null. Other columns are parsed as pandas does.
    """
    name = table_path.name.lower().removesuffix(".gz")
    if not table_path.is_file():
        raise InputError(
            f"No cells table at {table_path}. Pass the path of a CSV, TSV or Parquet file."
        )
    try:
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(table_path)
        separator = "\t" if name.endswith((".tsv", ".tab", ".txt")) else ","
        if name.endswith((".tsv", ".tab", ".txt", ".csv")):
            table = pd.read_csv(table_path, sep=separator, low_memory=False)
            metadata = filter(cellprofiler_tables.is_metadata_column, table.columns)
            wanted = dict.fromkeys([*text_columns, *metadata])
            text = [column for column in wanted if column in table.columns]
            if text:  # again, as text: the first pass may have re-typed them (00001 -> 1)
                table[text] = pd.read_csv(
                    table_path, sep=separator, usecols=text, dtype=str, keep_default_na=False,
                    na_values=[""],
                )[text]  # fmt: skip
            return table
    except pd.errors.EmptyDataError as error:
        raise DataError(
            f"The cells table {table_path} is empty (no header, no rows). "
            "Expected one row per cell."
        ) from error
    except Exception as error:  # parser errors of pandas / pyarrow
        raise DataError(
            f"Cannot read the cells table {table_path}: {error}. Check its format."
        ) from error
    raise InputError(
        f"Unknown table format {table_path.name!r}: expected .csv, .tsv/.tab/.txt or .parquet."
    )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


class _TiffTemplate:
    """Reads uncompressed TIFFs that share one file's structure without parsing them again.

    A pipeline writes all its crops with the same header: same size, same tags,
    pixels at the same offsets. Parsing a small TIFF with tifffile costs about
    0.4 ms, ten times the read itself. The first file of each size is parsed
    with tifffile; a later file of that size whose every byte outside the pixel
    data equals the first file's has, byte for byte, the same structure, so its
    pixels are the bytes at those offsets. The template is only used if this
    decoding reproduces tifffile's on the first file; anything else (compressed
    files, other headers) goes through tifffile.
    """

    def __init__(self, path: str | os.PathLike, content: bytes) -> None:
        import tifffile

        self.usable = False
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            pages = list(series.pages)
            if not pages or any(
                page is None or page.compression != 1 or page.predictor != 1 for page in pages
            ):
                return
            segments = [
                (int(offset), int(count))
                for page in pages
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)
            ]
            self.shape = tuple(series.shape)
            self.dtype = np.dtype(series.dtype).newbyteorder(tiff.byteorder)
            expected = series.asarray()
        self.size = len(content)
        self.segments = segments
        cursor, self.gaps = 0, []
        for offset, count in sorted(segments):
            if offset < cursor:
                return  # overlapping strips: leave it to tifffile
            self.gaps.append((cursor, offset))
            cursor = offset + count
        self.gaps.append((cursor, self.size))
        self.header = [content[a:b] for a, b in self.gaps]
        decoded = self.decode(content)
        self.usable = decoded is not None and np.array_equal(decoded, expected)

    def decode(self, content: bytes) -> np.ndarray | None:
        """The pixels if ``content`` has this template's structure, else None."""
        if len(content) != self.size:
            return None
        for (a, b), header in zip(self.gaps, self.header, strict=True):
            if content[a:b] != header:
                return None
        data = b"".join(content[offset : offset + count] for offset, count in self.segments)
        if len(data) != int(np.prod(self.shape)) * self.dtype.itemsize:
            return None
        return (
            np.frombuffer(data, self.dtype).reshape(self.shape).astype(self.dtype.newbyteorder("="))
        )


_TIFF_TEMPLATES: dict[int, _TiffTemplate | None] = {}


def _read_tiff(path: str | os.PathLike) -> np.ndarray:
    import tifffile

    with open(path, "rb") as handle:
        content = handle.read()
    template = _TIFF_TEMPLATES.get(len(content))
    if template is not None:
        pixels = template.decode(content)
        if pixels is not None:
            return pixels
    elif len(content) not in _TIFF_TEMPLATES and len(_TIFF_TEMPLATES) < 64:
        try:
            candidate = _TiffTemplate(path, content)
        except Exception:  # unreadable: tifffile below reports why
            candidate = None
        _TIFF_TEMPLATES[len(content)] = candidate if candidate and candidate.usable else None
    return tifffile.imread(io.BytesIO(content))


# Pillow modes whose values are not stain intensities
_NOT_INTENSITY_MODES = {
    "RGBA": "its 4th channel is transparency",
    "LA": "its 2nd channel is transparency",
    "PA": "it holds palette indices and transparency",
    "P": "it holds palette indices",
}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Pixels of a TIFF (OME-TIFF: the first series, full size), NPY or PNG (any format Pillow
    reads) file, or of an OME-Zarr image folder (level 0, as (C, H, W)), as stored.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".tif", ".tiff"):
        pixels = _read_tiff(path)
    elif suffix == ".npy":
        pixels = np.load(path, allow_pickle=False)
    elif is_ome_zarr(path):  # after the file suffixes: no extra stat per crop file
        pixels = read_ome_zarr(path)
    else:
        from PIL import Image

        with Image.open(path) as image:
            if image.mode in _NOT_INTENSITY_MODES:
                raise _BadImage(
                    f"{path} is a {image.mode} image: {_NOT_INTENSITY_MODES[image.mode]}, not a "
                    "stain's intensity. Save crops as grey-level files (one channel each, or a "
                    "multi-page TIFF)"
                )
            pixels = np.asarray(image)
    if pixels.size == 0:  # tifffile returns an empty array for some corrupt files
        raise _BadImage(f"cannot read the image {path}: no pixels (empty or corrupt file)")
    return pixels


def image_header_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape of an image without decoding its pixels (TIFF, NPY, OME-Zarr; Pillow formats)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".tif", ".tiff", ".npy") and is_ome_zarr(path):
        return describe_ome_zarr(path).chw_shape
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            return tuple(tiff.series[0].shape)
    if suffix == ".npy":
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    from PIL import Image

    with Image.open(path) as image:
        bands = len(image.getbands())
        width, height = image.size
        return (height, width) if bands == 1 else (height, width, bands)


def to_chw(array: np.ndarray, n_channels: int | None) -> np.ndarray:
    """Put a 2-D or 3-D image in (C, H, W) order.

    A 3-D image is (C, H, W) if its first axis has ``n_channels`` entries,
    else (H, W, C) if its last one does; with ``n_channels`` unknown, the
    shorter of the first and last axes is the channel axis (ties: first).
    """
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise _BadImage(f"has shape {array.shape}; expected (C, H, W), (H, W, C) or (H, W)")
    if n_channels is None:
        return array if array.shape[0] <= array.shape[-1] else np.moveaxis(array, -1, 0)
    if array.shape[0] == n_channels:
        return array
    if array.shape[-1] == n_channels:
        return np.moveaxis(array, -1, 0)
    raise _BadImage(
        f"has shape {array.shape}: wrong channel count, no axis has {n_channels} channels"
    )


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights resizing one axis: area overlap when shrinking, linear when enlarging.

    Shrinking: output pixel i averages the input interval ``[i, i + 1) * n_in / n_out``,
    each input pixel weighted by its overlap (exact area averaging, also for
    non-integer factors). Enlarging: linear interpolation between pixel
    centres (``align_corners=False``), edges clamped.
    """
    weights = np.zeros((n_out, n_in))
    scale = n_in / n_out
    if n_out <= n_in:
        for i in range(n_out):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
                weights[i, j] = min(hi, j + 1) - max(lo, j)
        return weights / scale
    centres = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
    left = np.floor(centres).astype(int)
    right = np.minimum(left + 1, n_in - 1)
    fraction = centres - left
    weights[np.arange(n_out), left] += 1 - fraction
    weights[np.arange(n_out), right] += fraction
    return weights


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (n, C, H, W) images to (n, C, size, size), keeping the dtype.

    Shrinking averages areas (anti-aliased by construction; for integer
    factors the mean of each ``k x k`` block); enlarging is bilinear. Both
    are separable matrix products in float64; integer results are rounded
    (half to even) and clipped to the dtype's range.
    """
    height, width = images.shape[-2:]
    if (height, width) == (size, size) or len(images) == 0:
        return images
    rows = _resize_matrix(height, size)  # (size, H)
    columns = _resize_matrix(width, size)  # (size, W)
    out = rows @ images.astype(np.float64) @ columns.T  # (n, C, size, size)
    if images.dtype.kind in "ui":
        info = np.iinfo(images.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(images.dtype)


# ---------------------------------------------------------------------------
# image sources
# ---------------------------------------------------------------------------


def _resolve(value: object, base_dir: Path) -> str:
    """An image path from the table, relative ones against ``base_dir`` (as str: cheap)."""
    return os.path.join(base_dir, str(value))


def _column_paths(table: pd.DataFrame, column: str, base_dir: Path) -> list[str | None]:
    """The image paths of a path column, resolved (None where the table has none)."""
    return [None if pd.isna(v) else _resolve(v, base_dir) for v in table[column]]


def _parallel_map(function: Callable, items: Sequence, workers: int) -> list:
    """``map`` over threads (cheap I/O-bound checks: file existence, headers)."""
    if workers <= 1 or len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def _image_exists(path: str) -> bool:
    """A file, or an OME-Zarr image (a folder holding a Zarr group)."""
    return os.path.isfile(path) or is_ome_zarr(path)


def _not_a_file(path: str) -> str:
    """Why ``path`` is not an image file: a folder, or nothing there."""
    if os.path.isdir(path):
        return f"a folder, not an image file: {path}"
    return f"file not found: {path}"


def _files_exist(paths: list[str], workers: int) -> list[bool]:
    """:func:`_image_exists` for many paths, in batches over threads (network disks wait)."""
    batches = [paths[i : i + 4096] for i in range(0, len(paths), 4096)]
    results = _parallel_map(lambda batch: [_image_exists(p) for p in batch], batches, workers)
    return [exists for batch in results for exists in batch]


def _executor(workers: int) -> Executor:
    """Where cells are read and written: one thread, or ``workers`` processes.

    Reading small files, checking them and computing statistics is mostly
    Python and holds the GIL, so parallel work uses processes; ``forkserver``
    because the parent runs zarr's event-loop thread, which ``fork`` would
    copy mid-flight.
    """
    if workers <= 1:
        return ThreadPoolExecutor(1)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_exit_with, initargs=(os.getpid(),)
    )


@dataclass(frozen=True)
class _Workers:
    """Who reads and writes the cells: this machine's processes, or a Dask cluster's workers.

    ``threads`` check files and headers on this machine either way (I/O-bound);
    with ``client`` (a ``dask.distributed.Client``) the cluster runs the tasks
    that read cells and write the store, else ``threads`` local processes do.
    """

    threads: int
    client: Client | None = None

    def executor(self) -> Executor:
        if self.client is None:
            return _executor(self.threads)
        return dask_cluster.executor(self.client)

    def check_shared(self, paths: list[str]) -> None:
        """A cluster's workers must see ``paths`` (this machine's processes always do)."""
        if self.client is not None:
            dask_cluster.check_shared(self.client, paths)


def _exit_with(parent_pid: int) -> None:
    """Worker initialiser: leave when the ingest process is gone (e.g. killed with SIGKILL).

    A pool worker whose parent was killed would otherwise wait for work forever
    (it holds its own end of the task queue), and keep the forkserver alive.
    """

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
                with open(f"/proc/{parent_pid}/stat") as stat:  # Linux: a zombie is gone too
                    gone = stat.read().rsplit(")", 1)[1].split()[0] == "Z"
            except (ProcessLookupError, PermissionError):  # PermissionError: pid reused
                gone = True
            except OSError:  # no /proc (macOS): os.kill alone decides
                gone = False
            if gone:
                os._exit(1)

    threading.Thread(target=watch, name="scbd-exit-with-parent", daemon=True).start()


def _failure_of(function: Callable, *args) -> tuple[object | None, str | None]:
    """Run ``function``; return (result, None) or (None, reason) for an unusable image."""
    try:
        return function(*args), None
    except _BadImage as error:
        return None, str(error)
    except FileNotFoundError as error:
        return None, f"file not found: {error.filename or error}"
    except IsADirectoryError as error:
        return None, f"a folder, not an image file: {error.filename or error}"
    except Exception as error:  # decoders raise many types for corrupt files
        return None, f"cannot read the image ({type(error).__name__}: {error})"


@dataclass(frozen=True)
class _Reference:
    """What every cell must look like: (C, H, W) before resizing, and dtype."""

    n_channels: int
    height: int
    width: int
    dtype: np.dtype


@dataclass(frozen=True)
class _CropSpec:
    """How to read one crop; small and picklable, sent with every task."""

    per_channel: bool
    n_channels: int | None
    columns: tuple[str, ...]
    reference: _Reference | None = None
    resize: int | None = None


def _load_crop(paths: tuple[str, ...], spec: _CropSpec) -> np.ndarray:
    """(C, H, W) pixels of one cell as stored (not yet checked against the reference)."""
    if not spec.per_channel:
        return to_chw(read_image(paths[0]), spec.n_channels)
    planes = []
    for path, column in zip(paths, spec.columns, strict=True):
        plane = np.squeeze(read_image(path))
        if plane.ndim != 2:
            raise _BadImage(
                f"{path} has shape {plane.shape}: wrong channel count, expected one channel per "
                f"file in column {column!r}"
            )
        planes.append(plane)
    if len({plane.shape for plane in planes}) > 1:
        raise _BadImage(f"its channel files differ in size: {[p.shape for p in planes]}")
    if len({plane.dtype for plane in planes}) > 1:
        raise _BadImage(f"its channel files differ in dtype: {[p.dtype.name for p in planes]}")
    return np.stack(planes)


def _checked_crop(paths: tuple[str, ...], spec: _CropSpec) -> np.ndarray:
    """One cell's (C, H, W) pixels, checked against (and cast to) the reference."""
    image = _load_crop(paths, spec)
    reference = spec.reference
    if image.shape[0] != reference.n_channels:
        raise _BadImage(
            f"has {image.shape[0]} channels (shape {image.shape}); wrong channel count, "
            f"expected {reference.n_channels}"
        )
    if image.shape[1:] != (reference.height, reference.width):
        raise _BadImage(
            f"is {image.shape[1]}x{image.shape[2]} px; mismatched crop size, the other crops "
            f"are {reference.height}x{reference.width}"
        )
    return _as_reference_dtype(image, reference.dtype, what="has")


def _as_reference_dtype(pixels: np.ndarray, dtype: np.dtype, *, what: str) -> np.ndarray:
    """``pixels`` in the screen's dtype; another bit depth is a bad image, never cast silently.

    A uint8 crop in a uint16 screen would be stored at 1/256 of its intensity:
    silently wrong. Only the byte order may differ (it is converted).
    """
    if pixels.dtype == dtype:
        return pixels
    if pixels.dtype.newbyteorder("=") != np.dtype(dtype).newbyteorder("="):
        raise _BadImage(
            f"{what} dtype {pixels.dtype.name} but the screen's images are {np.dtype(dtype).name}: "
            "another bit depth would be stored at the wrong intensity scale; convert the file, or "
            "leave it out with --skip-bad"
        )
    return pixels.astype(dtype)


def _read_crop_batch(
    items: list[tuple[int, tuple[str, ...]]], spec: _CropSpec, keep: bool
) -> tuple[np.ndarray | None, dict[int, str]]:
    """Read a batch of cells ``[(table row, paths)]`` (a worker task).

    Returns the stacked, resized images (None if any failed or ``keep`` is
    false) and ``{table row: reason}`` for the cells that failed.
    """
    images, failures = [], {}
    for row, paths in items:
        image, reason = _failure_of(_checked_crop, paths, spec)
        if reason is None:
            images.append(image)
        else:
            failures[row] = reason
    if failures or not keep or not images:
        return None, failures
    stacked = np.stack(images)
    return (resize_images(stacked, spec.resize) if spec.resize else stacked), failures


class _CropSource:
    """One file per cell (``image_column``) or one per cell and channel (``channel_columns``)."""

    def __init__(
        self,
        *,
        columns: list[str],
        paths: list[list[str | None]],
        per_channel: bool,
        n_channels: int | None,
        workers: _Workers,
    ) -> None:
        self.columns = columns
        self.per_channel = per_channel
        self.n_channels = len(columns) if per_channel else n_channels
        self.workers = workers
        self.paths_of_row = list(zip(*paths, strict=True))
        self.reference: _Reference | None = None
        self.first_path: str | None = None
        self.border_rows: list[int] = []  # crops never leave a field

    def spec(self, resize: int | None = None) -> _CropSpec:
        return _CropSpec(
            self.per_channel, self.n_channels, tuple(self.columns), self.reference, resize
        )

    def _items(self, rows: np.ndarray) -> list[tuple[int, tuple[str, ...]]]:
        return [(int(row), self.paths_of_row[row]) for row in rows]

    def check(self, rows: np.ndarray) -> dict[int, str]:
        """Table-level problems: empty paths and missing files."""
        bad: dict[int, str] = {}
        unique = list(dict.fromkeys(p for row in rows for p in self.paths_of_row[row] if p))
        exists = dict(zip(unique, _files_exist(unique, self.workers.threads), strict=True))
        for row in rows:
            for column, path in zip(self.columns, self.paths_of_row[row], strict=True):
                if path is None:
                    bad.setdefault(int(row), f"no image path in column {column!r}")
                elif not exists[path]:
                    bad.setdefault(int(row), _not_a_file(path))
        return bad

    def probe(self, rows: np.ndarray) -> None:
        """Fix the reference shape and dtype from the first readable images (the most common)."""
        looks: Counter = Counter()
        failures: dict[int, str] = {}
        spec = self.spec()
        for row, paths in self._items(rows[:_PROBE_LIMIT]):
            image, reason = _failure_of(_load_crop, paths, spec)
            if reason is not None:
                failures[row] = reason
            else:
                looks[(*image.shape, image.dtype.str)] += 1
                self.first_path = self.first_path or paths[0]
                if looks.total() == _PROBE_ROWS:
                    break
        if not looks:
            raise _ImageFailures(failures)
        n_channels, height, width, dtype = looks.most_common(1)[0][0]
        self.reference = _Reference(n_channels, height, width, np.dtype(dtype))

    def scan(self, rows: np.ndarray) -> dict[int, str]:
        """Read every listed cell; return the failures."""
        spec = self.spec()
        failures: dict[int, str] = {}
        with self.workers.executor() as pool:
            pieces = np.array_split(rows, max(1, math.ceil(len(rows) / _TASK_CELLS)))
            tasks = [pool.submit(_read_crop_batch, self._items(p), spec, False) for p in pieces]
            for future in tasks:
                failures.update(future.result()[1])
        return failures

    def fill(
        self, writer: StoreWriter, table_rows: np.ndarray, *, resize: int | None, bar, task
    ) -> None:
        """Write every pending block; each worker reads, writes and summarises whole chunks."""
        spec = self.spec(resize)
        bar.advance(task, sum(b - a for a, b in map(writer.block_bounds, writer.done_blocks)))

        def submit(pool: Executor, start: int, stop: int) -> Future:
            return pool.submit(
                _ingest_crops,
                self._items(table_rows[start:stop]),
                spec,
                writer.images_path,
                start,
                writer.train_mask[start:stop],
                writer.store_id,
            )

        _run_blocks(writer, submit, workers=self.workers, bar=bar, task=task)


def _ingest_crops(
    items: list[tuple[int, tuple[str, ...]]],
    spec: _CropSpec,
    images_path: Path,
    start: int,
    train: np.ndarray,
    store_id: str,
) -> tuple[dict[int, str], ChannelStats | None, int]:
    """Read a run of cells and store them (a worker task): (failures, statistics, cells)."""
    images, failures = _read_crop_batch(items, spec, keep=True)
    if failures or images is None:
        return failures, None, 0
    stats = write_cells(images_path, start, images, train=train, store_id=store_id)
    return {}, stats, len(images)


def _store_scratch(
    scratch_path: Path, start: int, stop: int, images_path: Path, train: np.ndarray, store_id: str
) -> tuple[dict[int, str], ChannelStats, int]:
    """Copy scratch crops ``start:stop`` into the store (a worker task)."""
    scratch = np.load(scratch_path, mmap_mode="r")
    images = np.ascontiguousarray(scratch[start:stop])
    stats = write_cells(images_path, start, images, train=train, store_id=store_id)
    return {}, stats, len(images)


def _run_blocks(writer: StoreWriter, submit: Callable, *, workers: _Workers, bar, task) -> None:
    """Write every pending block as chunk-aligned worker tasks; record each finished block.

    ``submit(pool, start, stop)`` starts one task for store rows ``start:stop``
    returning ``(failures, stats, cells)``. The next block's tasks are queued
    while this block's finish, so the workers never wait for the parent.
    """
    step = writer.write_unit * max(1, _TASK_CELLS // writer.write_unit)
    pool = workers.executor()
    try:
        in_flight: deque = deque()
        for block in writer.pending_blocks():
            start, stop = writer.block_bounds(block)
            tasks = [submit(pool, a, min(a + step, stop)) for a in range(start, stop, step)]
            in_flight.append((block, tasks))
            while len(in_flight) > _BLOCKS_IN_FLIGHT:
                _record_block(writer, *in_flight.popleft(), bar, task)
        while in_flight:
            _record_block(writer, *in_flight.popleft(), bar, task)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _record_block(writer: StoreWriter, block: int, tasks: list[Future], bar, task) -> None:
    failures: dict[int, str] = {}
    stats = ChannelStats(writer.image_shape[0], writer.dtype)
    for future in tasks:
        task_failures, task_stats, cells = future.result()
        failures.update(task_failures)
        if task_stats is not None:
            stats.merge(task_stats)
            bar.advance(task, cells)
    if failures:
        raise _ImageFailures(failures)
    writer.record_block(block, stats)


@dataclass(frozen=True)
class _FieldSpec:
    """How to read one field of view and cut its cells; sent with every task.

    With a label image (``masks``), a field's key ends with the mask's path.
    """

    per_channel: bool
    n_channels: int | None
    dtype: np.dtype | None = None
    crop_size: int = 0
    resize: int | None = None
    masks: bool = False
    mask_neighbours: str = "zero"


def _load_field(field: tuple[str, ...], shape: tuple[int, ...], spec: _FieldSpec) -> np.ndarray:
    """(C, H, W) pixels of a field, checked against its header ``shape``."""
    images = field[:-1] if spec.masks else field
    if spec.per_channel:
        planes = [np.squeeze(read_image(path)) for path in images]
        if len({plane.dtype for plane in planes}) > 1:
            raise _BadImage(f"the channel files of {os.path.basename(field[0])} differ in dtype")
        pixels = np.stack(planes)
    else:
        pixels = to_chw(read_image(images[0]), spec.n_channels)
    if pixels.shape != tuple(shape):
        raise _BadImage(
            f"{os.path.basename(field[0])} decodes to {pixels.shape}, its header says {shape}"
        )
    return pixels


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """A label image as (H, W) integers (0 = background; a leading axis of 1 is dropped)."""
    labels = np.squeeze(read_image(path))
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise _BadImage(
            f"the mask {os.path.basename(path)} is not a label image: shape {labels.shape}, dtype "
            f"{labels.dtype.name} (expected one plane of integer labels, 0 = background)"
        )
    return labels


def _cut_field(
    index: int,
    field: tuple[str, ...],
    shape: tuple[int, ...],
    tops: np.ndarray,
    lefts: np.ndarray,
    labels: np.ndarray | None,
    spec: _FieldSpec,
    keep: bool,
) -> tuple[int, np.ndarray | None, str | None]:
    """Read one field and cut (and resize) its cells' crops (a worker task).

    With a label image and ``mask_neighbours="zero"``, the pixels of other objects
    (labels other than 0 and the cell's own) are set to 0 in each cell's crop.
    """

    def cut() -> np.ndarray:
        pixels = _as_reference_dtype(
            _load_field(field, shape, spec), spec.dtype, what=f"{os.path.basename(field[0])} has"
        )
        size = spec.crop_size
        crops = np.stack(
            [pixels[:, t : t + size, s : s + size] for t, s in zip(tops, lefts, strict=True)]
        )  # (n, C, S, S)
        if spec.masks and spec.mask_neighbours == "zero":
            mask = read_label_image(field[-1])
            windows = np.stack(
                [mask[t : t + size, s : s + size] for t, s in zip(tops, lefts, strict=True)]
            )  # (n, S, S)
            own = labels.astype(windows.dtype)[:, None, None]
            neighbours = (windows != 0) & (windows != own)
            crops = np.where(neighbours[:, None], np.zeros((), crops.dtype), crops)
        return resize_images(crops, spec.resize) if spec.resize else crops

    crops, reason = _failure_of(cut)
    return index, crops if keep else None, reason


def _mask_centroids(
    mask_path: str, labels: np.ndarray, field_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Centroids (y, x) of ``labels`` in a label image, and the positions that fail.

    The centroid is the mean row and column of the label's pixels (CellProfiler's
    ``Location_Center``). A label absent from the image, or a mask of another size than
    its field, is a failure of that position.
    """
    from scipy import ndimage

    y = np.full(len(labels), np.nan)
    x = np.full(len(labels), np.nan)
    mask = read_label_image(mask_path)
    if mask.shape != tuple(field_size):
        reason = (
            f"the mask {os.path.basename(mask_path)} is {mask.shape[0]}x{mask.shape[1]} px, its "
            f"field {field_size[0]}x{field_size[1]} px (a label image must share the field's grid)"
        )
        return y, x, dict.fromkeys(range(len(labels)), reason)
    present = set(np.unique(mask).tolist()) - {0}  # labels may be sparse (any integers)
    failures: dict[int, str] = {}
    wanted = sorted({int(label) for label in labels if int(label) in present})
    centres = dict(zip(wanted, ndimage.center_of_mass(np.ones(mask.shape), mask, wanted),
                       strict=True))  # fmt: skip
    for position, label in enumerate(labels):
        if int(label) in present:
            y[position], x[position] = centres[int(label)]
        else:
            failures[position] = f"label {label:g} is not in the mask {os.path.basename(mask_path)}"
    return y, x, failures


@dataclass(frozen=True)
class _Masks:
    """Label images for the fields: a path and the row's own label per table row."""

    paths: list[str | None]
    labels: np.ndarray  # float: NaN where the table has no label
    label_column: str
    neighbours: str


class _FieldSource:
    """Fields of view (one multi-channel file, or one file per channel) with cell centroids.

    Centroids come from the ``x``/``y`` columns or, with label images and no columns,
    from the labels themselves.
    """

    def __init__(
        self,
        *,
        columns: list[str],
        paths: list[list[str | None]],
        per_channel: bool,
        n_channels: int | None,
        x: np.ndarray | None,
        y: np.ndarray | None,
        x_column: str | None,
        y_column: str | None,
        crop_size: int,
        masks: _Masks | None,
        workers: _Workers,
    ) -> None:
        self.columns = columns
        self.per_channel = per_channel
        self.n_channels = len(columns) if per_channel else n_channels
        self.crop_size = crop_size
        self.workers = workers
        self.masks = masks
        keys = zip(*paths, *([masks.paths] if masks else []), strict=True)
        self.field_of_row = [None if None in key else key for key in keys]
        n_rows = len(self.field_of_row)
        self.x = x if x is not None else np.full(n_rows, np.nan)
        self.y = y if y is not None else np.full(n_rows, np.nan)
        self.x_column, self.y_column = x_column, y_column
        self.shapes: dict[tuple, tuple[int, int, int]] = {}
        self.reference: _Reference | None = None
        self.first_path: str | None = None
        self.border_rows: list[int] = []

    def _field_shape(self, field: tuple[str, ...]) -> tuple[int, int, int]:
        field = field[:-1] if self.masks else field  # the images, without the label image
        if self.per_channel:
            shapes = [tuple(s for s in image_header_shape(path) if s != 1) for path in field]
            if any(len(shape) != 2 for shape in shapes):
                raise _BadImage(
                    f"field files {[str(p) for p in field]} are not all single-channel: {shapes}"
                )
            if len(set(shapes)) > 1:
                raise _BadImage(
                    f"the channel files of field {os.path.basename(field[0])} differ in size: "
                    f"{shapes}"
                )
            return (len(field), *shapes[0])
        shape = image_header_shape(field[0])
        return to_chw(np.empty(shape, np.uint8), self.n_channels).shape

    def _check_masks(self, rows: list[int]) -> dict[int, str]:
        """Rows without a label, or whose label is not in their mask; centroids from the masks.

        Every label image is read once here (the centroids decide which cells are at
        the border before anything is written).
        """
        masks = self.masks
        bad: dict[int, str] = {}
        by_field: dict[tuple, list[int]] = {}
        for row in rows:
            label = masks.labels[row]
            if np.isfinite(label) and label >= 1 and label == int(label):
                by_field.setdefault(self.field_of_row[row], []).append(row)
            else:
                bad[row] = (
                    f"no object label (column {masks.label_column!r} holds {label:g}; expected "
                    "the object's label in the mask, an integer >= 1)"
                )

        def centroids(field: tuple) -> tuple:
            labels = masks.labels[by_field[field]]
            return _failure_of(_mask_centroids, field[-1], labels, self.shapes[field][1:])

        fields = list(by_field)
        for field, (found, reason) in zip(
            fields, _parallel_map(centroids, fields, self.workers.threads), strict=True
        ):
            members = by_field[field]
            if reason is not None:
                bad.update(dict.fromkeys(members, f"{os.path.basename(field[-1])}: {reason}"))
                continue
            y, x, failures = found
            for position, row in enumerate(members):
                if position in failures:
                    bad[row] = failures[position]
                elif self.x_column is None:
                    self.y[row], self.x[row] = y[position], x[position]
        return bad

    def crop_origin(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-left pixel of each cell's crop: ``rint(y) - S // 2``, ``rint(x) - S // 2``."""
        half = self.crop_size // 2
        return np.rint(self.y[rows]).astype(np.int64) - half, np.rint(self.x[rows]).astype(
            np.int64
        ) - half

    def check(self, rows: np.ndarray) -> dict[int, str]:
        """Missing or unreadable field files, null or outside centroids; border cells counted."""
        bad: dict[int, str] = {}
        fields = sorted({self.field_of_row[r] for r in rows} - {None})
        missing = {}
        for field in fields:
            absent = [p for p in field if not _image_exists(p)]
            if absent:
                missing[field] = _not_a_file(absent[0])
        readable = [field for field in fields if field not in missing]
        shapes = _parallel_map(
            lambda field: _failure_of(self._field_shape, field), readable, self.workers.threads
        )
        for field, (shape, reason) in zip(readable, shapes, strict=True):
            if reason is None:
                self.shapes[field] = shape
            else:
                missing[field] = f"{os.path.basename(field[0])}: {reason}"
        if self.shapes:
            looks = Counter(shape[0] for shape in self.shapes.values())
            self.n_channels = self.n_channels or looks.most_common(1)[0][0]
        for row in rows:
            row = int(row)
            field = self.field_of_row[row]
            if field is None:
                bad[row] = f"no field path in column(s) {self.columns}"
            elif field in missing:
                bad[row] = missing[field]
            elif self.shapes[field][0] != self.n_channels:
                bad[row] = (
                    f"field {os.path.basename(field[0])} has {self.shapes[field][0]} channels; "
                    f"wrong channel count, expected {self.n_channels}"
                )
        if self.masks is not None:
            bad.update(self._check_masks([int(row) for row in rows if int(row) not in bad]))
        for row in rows:
            row = int(row)
            field = self.field_of_row[row]
            if row in bad:
                continue
            if not (np.isfinite(self.x[row]) and np.isfinite(self.y[row])):
                bad[row] = f"no centroid (null {self.x_column!r} / {self.y_column!r})"
            else:
                _, height, width = self.shapes[field]
                if not (0 <= self.x[row] < width and 0 <= self.y[row] < height):
                    bad[row] = (
                        f"centroid outside the image: ({self.x_column}={self.x[row]:g}, "
                        f"{self.y_column}={self.y[row]:g}) in a {height}x{width} px field"
                    )
        # crops that would leave their field: skipped and counted, not errors
        good = np.array([row for row in rows if int(row) not in bad], dtype=np.int64)
        if len(good):
            top, left = self.crop_origin(good)
            limits = np.array([self.shapes[self.field_of_row[r]][1:] for r in good])
            size = self.crop_size
            inside = (
                (top >= 0)
                & (left >= 0)
                & (top + size <= limits[:, 0])
                & (left + size <= limits[:, 1])
            )
            self.border_rows = good[~inside].tolist()
        return bad

    def spec(self, resize: int | None = None, *, dtype: np.dtype | None = None) -> _FieldSpec:
        return _FieldSpec(
            self.per_channel,
            self.n_channels,
            dtype if dtype is not None else (self.reference.dtype if self.reference else None),
            self.crop_size,
            resize,
            masks=self.masks is not None,
            mask_neighbours=self.masks.neighbours if self.masks else "zero",
        )

    def probe(self, rows: np.ndarray) -> None:
        """Fix the reference from the field headers (the dtype from reading one field)."""
        failures: dict[int, str] = {}
        tried: set[tuple] = set()
        for row in rows[:_PROBE_LIMIT]:
            field = self.field_of_row[int(row)]
            if field in tried:
                continue
            tried.add(field)
            pixels, reason = _failure_of(_load_field, field, self.shapes[field], self.spec())
            if reason is None:
                shape = (self.n_channels, self.crop_size, self.crop_size)
                self.reference = _Reference(*shape, pixels.dtype)
                self.first_path = field[0]
                return
            failures[int(row)] = reason
            if len(tried) == _PROBE_ROWS:
                break
        raise _ImageFailures(failures)

    def _tasks(self, rows: np.ndarray) -> list[tuple[int, tuple, np.ndarray]]:
        """``[(field index, field, positions in rows)]``, fields in sorted order."""
        by_field: dict[tuple, list[int]] = {}
        for position, row in enumerate(rows):
            by_field.setdefault(self.field_of_row[int(row)], []).append(position)
        return [(i, field, np.asarray(by_field[field])) for i, field in enumerate(sorted(by_field))]

    def _run(self, rows: np.ndarray, tasks: list, spec: _FieldSpec, *, keep: bool) -> Iterator:
        """Cut the fields of ``tasks`` in parallel; yield ``(index, positions, crops, reason)``."""
        positions_of = {index: positions for index, _, positions in tasks}
        with self.workers.executor() as pool:
            futures = []
            for index, field, positions in tasks:
                top, left = self.crop_origin(rows[positions])
                labels = self.masks.labels[rows[positions]] if self.masks else None
                futures.append(
                    pool.submit(
                        _cut_field, index, field, self.shapes[field], top, left, labels, spec, keep
                    )
                )
            for future in as_completed(futures):
                index, crops, reason = future.result()
                yield index, positions_of[index], crops, reason

    def scan(self, rows: np.ndarray) -> dict[int, str]:
        """Read every field of the listed cells; return the failures (all cells of a bad field)."""
        failures: dict[int, str] = {}
        for _, positions, _, reason in self._run(rows, self._tasks(rows), self.spec(), keep=False):
            if reason:
                failures.update({int(rows[p]): reason for p in positions})
        return failures

    def fill(
        self, writer: StoreWriter, table_rows: np.ndarray, *, resize: int | None, bar, task
    ) -> None:
        """Cut every field once into a scratch array in store order, then write the blocks.

        Store order scatters a field's cells over the whole store, so the crops
        go to an uncompressed memory-mapped scratch file in the ``.partial``
        folder first (fields done are logged there, for resuming), then the
        blocks are written from it in order.
        """
        size = resize or self.crop_size
        shape = (len(table_rows), self.n_channels, size, size)
        scratch_path = writer.partial_path / SCRATCH_FILE
        done_path = writer.partial_path / FIELDS_DONE_FILE
        if writer.pending_blocks():
            mode = "r+" if scratch_path.exists() else "w+"
            scratch = np.lib.format.open_memmap(
                scratch_path, mode=mode, dtype=self.reference.dtype, shape=shape
            )
            done = set()
            if mode == "r+" and done_path.exists():
                done = {int(line) for line in done_path.read_text().split()}
            tasks = self._tasks(table_rows)
            bar.update(task, description="Cutting fields")
            bar.advance(task, sum(len(p) for i, _, p in tasks if i in done))
            todo = [item for item in tasks if item[0] not in done]
            failures: dict[int, str] = {}
            with open(done_path, "a") as done_log:
                for index, positions, crops, reason in self._run(
                    table_rows, todo, self.spec(resize), keep=True
                ):
                    if reason is not None:
                        failures.update({int(table_rows[p]): reason for p in positions})
                        continue
                    scratch[positions] = crops
                    # the memory map keeps the crops even if this process is killed now
                    done_log.write(f"{index}\n")
                    done_log.flush()
                    bar.advance(task, len(positions))
            if failures:
                raise _ImageFailures(failures)
            scratch.flush()
            del scratch

            def submit(pool: Executor, start: int, stop: int) -> Future:
                return pool.submit(
                    _store_scratch,
                    scratch_path,
                    start,
                    stop,
                    writer.images_path,
                    writer.train_mask[start:stop],
                    writer.store_id,
                )

            # second pass over the cells: show it as its own phase
            written = sum(b - a for a, b in map(writer.block_bounds, writer.done_blocks))
            bar.update(task, description="Writing", completed=written)
            _run_blocks(writer, submit, workers=self.workers, bar=bar, task=task)
        scratch_path.unlink(missing_ok=True)
        done_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------


def _image_failure_message(failures: dict[int, str], cell_ids: dict[int, str]) -> str:
    rows = sorted(failures)
    shown = "; ".join(
        f"row {row} (cell {cell_ids.get(row, '?')}): {failures[row]}"
        for row in rows[:_MAX_ROWS_IN_MESSAGE]
    )
    more = (
        f"; and {len(rows) - _MAX_ROWS_IN_MESSAGE} more" if len(rows) > _MAX_ROWS_IN_MESSAGE else ""
    )
    return (
        f"{len(rows)} cell image(s) cannot be used: {shown}{more}. Rows count from 0 (header "
        "excluded). Fix or replace those files, or fix their rows in the table, or pass --skip-bad "
        "to leave these cells out (they are then listed in rejected.csv inside the store)."
    )


def ingest(
    table_path: str | os.PathLike, *, out: str | os.PathLike, **options: Any
) -> IngestResult:
    """Turn a cells table and its images into a store (``scbd-cells ingest``).

    An unknown or ill-typed keyword is an :class:`~scbd_cells.core.errors.InputError`.

    Parameters
    ----------
    table_path
        Cells table (CSV, TSV or Parquet), one row per cell; relative image
        paths resolve against its folder (or ``image_root``). ``Metadata_*``
        columns are kept as the text the table holds. The cells are named by
        ``cell_id_column``, else a ``cell_id`` column, else
        ``<ImageNumber>_<ObjectNumber>`` (CellProfiler), else the row number.
    out
        The store to write (``STORE.zarr``); written as ``STORE.zarr.partial``
        and renamed when complete. Rerunning the same command after a crash
        resumes it.
    **options
        Any :class:`~scbd_cells.core.config.IngestOptions` field (its docstring says
        what each does), e.g. ``perturbation_column="gene"``, ``batch_columns=["plate",
        "well"]``, ``workers=4``; ``perturbation_column`` is required.

    Returns
    -------
    IngestResult
    """
    started = time.perf_counter()
    settings = validated(IngestOptions, options, command="ingest")
    mask_neighbours, workers, resize = settings.mask_neighbours, settings.workers, settings.resize
    overwrite, scheduler = settings.overwrite, settings.scheduler
    if overwrite and Path(out).is_symlink():  # never replaced through a link (docs/reliability.md)
        check_output(Path(out), kind="store", overwrite=True)
    table_path, out_path = Path(table_path).resolve(), Path(out).resolve()
    spec = IngestSpec.from_options(table_path, settings)
    if mask_neighbours not in schema.MASK_NEIGHBOURS_CHOICES:
        raise InputError(
            f"--mask-neighbours must be one of {', '.join(schema.MASK_NEIGHBOURS_CHOICES)}; "
            f"found {mask_neighbours!r}."
        )
    if workers < 1:
        raise InputError(f"--workers must be at least 1; found {workers}.")
    if resize is not None and resize < 1:
        raise InputError(f"--resize must be a positive number of pixels; found {resize}.")
    inputs = [table_path, *([Path(spec.image_table)] if spec.image_table else [])]
    check_not_input(out_path, inputs)
    with output_lock(out_path):
        table_sha256 = _tables_sha256(inputs)
        finished = _finished_ingest(out_path, spec.options(), table_sha256, overwrite=overwrite)
        if finished is not None:
            return finished
        check_output(out_path, kind="store", overwrite=overwrite)
        check_partial(out_path)
        record = {"table_sha256": table_sha256, "options": spec.options()}
        if scheduler is None:
            return _ingest(
                spec,
                out_path,
                record=record,
                workers=_Workers(workers),
                overwrite=overwrite,
                started=started,
            )
        with dask_cluster.connect(scheduler) as client:
            return _ingest(
                spec,
                out_path,
                record=record,
                workers=_Workers(workers, client),
                overwrite=overwrite,
                started=started,
            )


def _tables_sha256(paths: list[Path]) -> str:
    """SHA-256 of the cells table; with an image table, of both tables' digests in turn."""
    digests = [file_sha256(path) if path.is_file() else "" for path in paths]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _finished_ingest(
    out_path: Path, options: dict, table_sha256: str, *, overwrite: bool
) -> IngestResult | None:
    """The result of an identical ingest that already completed into ``out_path``, else None.

    A store from the same table (SHA-256) and options is "already complete"; one
    from another table or other options is refused (naming what differs). With
    ``overwrite`` neither applies: the store is rebuilt (e.g. after the image
    files changed under an unchanged table).
    """
    if overwrite or kind_of(out_path) != "store":
        return None
    try:
        store = open_store(out_path)
    except StoreError:
        return None  # unfinished or damaged: check_output and overwrite decide
    recorded = store.attributes.get("ingest") or {}
    differences = []
    if recorded.get("table_sha256") != table_sha256:
        differences.append("the cells table's content (SHA-256)")
    earlier = recorded.get("options") or {}
    for key in sorted(set(options) | set(earlier)):
        if options.get(key) != earlier.get(key):
            differences.append(f"{key} ({earlier.get(key)!r} then, {options.get(key)!r} now)")
    if not differences:
        log.info("%s is already complete (same table and options); nothing to do.", out_path)
        summary = store.summary()
        return IngestResult(
            store_path=out_path,
            n_cells=store.n_cells,
            n_rejected=summary["n_rejected"],
            n_border=summary["n_border"],
            channel_names=list(store.channel_names),
            image_size=store.image_size,
            dtype=store.dtype.name,
            seconds=0.0,
            cells_per_second=0.0,
            resumed=False,
            already_complete=True,
            n_blank=int(store.attributes.get("n_blank", 0)),
        )
    raise InputError(
        f"The store {out_path} was ingested from a different input: {'; '.join(differences)}. "
        "Pass --overwrite to replace it, or choose another --out."
    )


def _ingest(
    spec: IngestSpec,
    out_path: Path,
    *,
    record: dict,
    workers: _Workers,
    overwrite: bool,
    started: float,
) -> IngestResult:
    """Read, check and write (the lock is held and the output checked)."""
    table = _read_input_table(spec)
    spec = _with_default_image_column(spec, table)
    source = _make_source(table, spec, workers=workers)
    labelled = label_table(
        table,
        perturbation_column=spec.perturbation_column,
        guide_column=spec.guide_column,
        batch_columns=spec.batch_columns,
        control=spec.control,
        skip_bad=spec.skip_bad,
        cell_id_column=spec.cell_id_column,
    )
    cell_ids = dict(
        zip(labelled.obs[TABLE_ROW].tolist(), labelled.obs[schema.CELL_ID].tolist(), strict=True)
    )
    rejected = {row: reason for row, _, reason in labelled.rejected}
    rejected_ids = {row: cell_id for row, cell_id, _ in labelled.rejected}
    rows = labelled.obs[TABLE_ROW].to_numpy()
    problems = source.check(rows)
    _raise_or_reject(problems, rejected, cell_ids, spec.skip_bad)
    border = set(source.border_rows)
    if border:
        log.info(
            "Skipping %d cells whose %d px crop leaves the field of view.",
            len(border),
            spec.crop_size,
        )
    return _write_replanning(
        source, labelled.obs, out_path, spec=spec, record=record, rejected=rejected,
        rejected_ids=rejected_ids, cell_ids=cell_ids, border=border, workers=workers,
        overwrite=overwrite, started=started,
    )  # fmt: skip


def _write_replanning(
    source: ImageSource,
    labelled_obs: pd.DataFrame,
    out_path: Path,
    *,
    spec: IngestSpec,
    record: dict,
    rejected: dict[int, str],
    rejected_ids: dict[int, str],
    cell_ids: dict,
    border: set[int],
    workers: _Workers,
    overwrite: bool,
    started: float,
) -> IngestResult:
    """Write the usable cells; with ``skip_bad``, start over without images that fail on the way.

    ``rejected`` gains the rows whose images failed.
    """
    for _attempt in range(_MAX_REPLANS):
        keep = ~labelled_obs[TABLE_ROW].isin(set(rejected) | border).to_numpy()
        obs = labelled_obs[keep]
        if len(obs) == 0:
            raise DataError(
                "No usable cells are left after leaving out bad rows "
                f"({len(rejected)} rejected, {len(border)} at the border). "
                "Check the table and images."
            )
        try:
            source.probe(obs[TABLE_ROW].to_numpy())
            existing = next(p for p in out_path.parents if p.exists())  # --out's folder, if any
            workers.check_shared([source.first_path, str(existing)])
            return _write_store(
                source,
                obs,
                out_path,
                spec=spec,
                record=record,
                rejected=rejected,
                rejected_ids={**rejected_ids, **cell_ids},
                border=border,
                overwrite=overwrite,
                started=started,
            )
        except _ImageFailures as failures:
            if not spec.skip_bad or source.reference is None:
                message = _image_failure_message(failures.failures, cell_ids)
                if source.reference is None:
                    message = f"No image could be read among the first rows. {message}"
                raise DataError(message) from None
            log.warning(
                "%d cell images cannot be used; checking every image, "
                "then starting over without them.",
                len(failures.failures),
            )
            remaining = obs[TABLE_ROW].to_numpy()
            found = {**failures.failures, **source.scan(remaining)}
            rejected.update(found)
    raise DataError(
        "Images kept failing after leaving out the bad ones; check the files (are they changing?)."
    )


def _read_input_table(spec: IngestSpec) -> pd.DataFrame:
    """The cells table (joined with the image table), with a ``cell_id`` column if it can be built.

    Without ``--cell-id-column`` or a ``cell_id`` column, CellProfiler's ``ImageNumber``
    and ``ObjectNumber`` name each cell ``"<ImageNumber>_<ObjectNumber>"``.
    """
    text_columns = [schema.CELL_ID, spec.perturbation_column, *spec.batch_columns]
    text_columns += [name for name in (spec.guide_column, spec.cell_id_column) if name]
    table = read_table(spec.table, text_columns=text_columns)
    if spec.image_table:
        image_table = Path(spec.image_table)
        images = read_table(image_table, text_columns=text_columns)
        table = cellprofiler_tables.join_image_table(table, images, image_table=image_table)
    if spec.cell_id_column is None and schema.CELL_ID not in table.columns:
        numbered = cellprofiler_tables.numbered_cell_ids(table)
        if numbered is not None:
            log.info("Cell ids from ImageNumber and ObjectNumber: <image>_<object>.")
            table[schema.CELL_ID] = numbered
    return table


def _raise_or_reject(
    problems: dict[int, str], rejected: dict[int, str], cell_ids: dict, skip_bad: bool
) -> None:
    if not problems:
        return
    if not skip_bad:
        raise DataError(_image_failure_message(problems, cell_ids))
    log.warning(
        "Leaving out %d rows with unusable images (see rejected.csv in the store).", len(problems)
    )
    rejected.update(problems)


def _with_default_image_column(spec: IngestSpec, table: pd.DataFrame) -> IngestSpec:
    """The spec, with ``image_column`` set to ``image_path`` when nothing else names the images."""
    named = spec.image_column or spec.channel_columns or spec.fov_column or spec.fov_channel_columns
    if not named and DEFAULT_IMAGE_COLUMN in table.columns:
        return dataclasses.replace(spec, image_column=DEFAULT_IMAGE_COLUMN)
    return spec


def _make_source(table: pd.DataFrame, spec: IngestSpec, *, workers: _Workers) -> ImageSource:
    """Pick the image source from the options; check its columns exist."""
    pairs = cellprofiler_tables.image_pairs(table.columns)
    cellprofiler = _image_option(table, spec, pairs) == _CELLPROFILER_IMAGES
    base_dir = Path(spec.image_root) if spec.image_root else spec.table.parent
    columns, paths = _image_columns(
        table, spec, pairs, cellprofiler=cellprofiler, base_dir=base_dir
    )
    fields = bool(spec.fov_column or spec.fov_channel_columns or cellprofiler)
    per_channel = bool(spec.channel_columns or spec.fov_channel_columns or cellprofiler)
    names = spec.channel_names
    if per_channel and names and len(names) != len(columns):
        raise InputError(
            f"--channel-names gives {len(names)} names for {len(columns)} channel columns; "
            "give one name per channel column, in the same order."
        )
    if not fields:
        if spec.mask_column:
            raise InputError(
                "--mask-column needs fields of view (--fov-column, --fov-channel-columns or "
                "CellProfiler's image columns): a label image shares its field's grid."
            )
        return _CropSource(
            columns=columns,
            paths=paths,
            per_channel=per_channel,
            n_channels=len(names) if names else None,
            workers=workers,
        )
    return _field_source(
        table, spec, columns=columns, paths=paths, per_channel=per_channel, base_dir=base_dir,
        workers=workers,
    )  # fmt: skip


_CELLPROFILER_IMAGES = "--channels (CellProfiler PathName_/FileName_ pairs)"


def _image_option(
    table: pd.DataFrame, spec: IngestSpec, pairs: dict[str, tuple[str, str]]
) -> str:
    """The one option that says where the images are (CellProfiler's columns if none does)."""
    chosen = [
        name
        for name, value in (
            ("--image-column", spec.image_column),
            ("--channel-columns", spec.channel_columns),
            ("--fov-column", spec.fov_column),
            ("--fov-channel-columns", spec.fov_channel_columns),
        )
        if value
    ]
    if bool(spec.channels) or (not chosen and bool(pairs)):
        chosen.append(_CELLPROFILER_IMAGES)
    if len(chosen) != 1:
        hint = ""
        object_table = cellprofiler_tables.IMAGE_NUMBER in table.columns
        if not chosen and object_table and not spec.image_table:
            hint = (
                " The table looks like a CellProfiler object table: pass its per-image table "
                "(with the FileName_/PathName_ columns) with --image-table."
            )
        raise InputError(
            "Say where the images are with exactly one of --image-column (a crop file per cell), "
            "--channel-columns (a file per cell and channel), --fov-column or "
            "--fov-channel-columns "
            "(fields of view, with --x-column, --y-column, --crop-size), or --channels "
            "(CellProfiler's PathName_<image>/FileName_<image> columns); "
            f"found {chosen or 'none'}.{hint}"
        )
    return chosen[0]


def _image_columns(
    table: pd.DataFrame,
    spec: IngestSpec,
    pairs: dict[str, tuple[str, str]],
    *,
    cellprofiler: bool,
    base_dir: Path,
) -> tuple[list[str], list[list[str | None]]]:
    """The image (or channel) columns and each one's paths, per row of the table."""
    if cellprofiler:
        if not spec.channels:  # a label image saved beside the channels is no channel
            pairs = {name: pair for name, pair in pairs.items() if name != spec.mask_column}
        images = cellprofiler_tables.choose_images(pairs, spec.channels)
        columns = list(images)
        paths = [
            cellprofiler_tables.image_paths(table, pair, image_root=base_dir)
            for pair in images.values()
        ]
        log.info(
            "CellProfiler images read as channels: %s (choose and order them with --channels).",
            ", ".join(columns),
        )
        return columns, paths
    columns = (
        [spec.image_column]
        if spec.image_column
        else list(spec.channel_columns or spec.fov_channel_columns or [spec.fov_column])
    )
    missing = [name for name in columns if name not in table.columns]
    if missing:
        raise InputError(
            f"The cells table has no column {', '.join(map(repr, missing))}; its columns are "
            f"{list(table.columns)}. "
            f"{''.join(did_you_mean(name, list(table.columns)) for name in missing)}"
            "Name the image columns with the matching option."
        )
    return columns, [_column_paths(table, column, base_dir) for column in columns]


def _field_source(
    table: pd.DataFrame,
    spec: IngestSpec,
    *,
    columns: list[str],
    paths: list[list[str | None]],
    per_channel: bool,
    base_dir: Path,
    workers: _Workers,
) -> ImageSource:
    """Cells cropped from fields of view around their centroids (or their label images')."""
    masks = _masks_of(table, spec, base_dir=base_dir)
    x_column, y_column = _centroid_columns(table, spec, masks=masks)
    if not spec.crop_size:
        raise InputError("Fields of view need --crop-size: the side of each cell's crop in px.")
    if spec.crop_size < 1:
        raise InputError(
            f"--crop-size must be a positive number of pixels; found {spec.crop_size}."
        )

    def numbers(column: str | None) -> np.ndarray | None:
        if column is None:
            return None
        return pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)

    names = spec.channel_names
    return _FieldSource(
        columns=columns,
        paths=paths,
        per_channel=per_channel,
        n_channels=len(names) if names else None,
        x=numbers(x_column),
        y=numbers(y_column),
        x_column=x_column,
        y_column=y_column,
        crop_size=int(spec.crop_size),
        masks=masks,
        workers=workers,
    )


def _centroid_columns(
    table: pd.DataFrame, spec: IngestSpec, *, masks: _Masks | None
) -> tuple[str | None, str | None]:
    """The centroid columns: the options', else CellProfiler's ``Location_Center_X/Y``.

    (None, None) when the label images give the centroids.
    """
    if bool(spec.x_column) != bool(spec.y_column):
        raise InputError("Pass both --x-column and --y-column (centroid column and row, px).")
    if spec.x_column:
        missing = [name for name in (spec.x_column, spec.y_column) if name not in table.columns]
        if missing:
            raise InputError(
                f"The cells table has no column {', '.join(map(repr, missing))}; its columns "
                f"are {list(table.columns)}. "
                f"{''.join(did_you_mean(name, list(table.columns)) for name in missing)}"
                "Name the centroid columns with --x-column and --y-column."
            )
        return spec.x_column, spec.y_column
    found = cellprofiler_tables.centroid_columns(table.columns)
    if len(found) == 1:
        log.info("Centroids from CellProfiler's %s / %s.", *found[0])
        return found[0]
    if len(found) > 1:
        raise InputError(
            f"The table has the centroids of several objects: {found}. Choose the object "
            "whose cells to crop with --x-column and --y-column."
        )
    if masks is not None:
        log.info("Centroids from the label images (--mask-column %s).", spec.mask_column)
        return None, None
    raise InputError(
        "Fields of view need the cells' centroids: --x-column and --y-column (pixels, x = "
        "column, y = row), CellProfiler's Location_Center_X/Y columns, or label images "
        "(--mask-column)."
    )


def _masks_of(table: pd.DataFrame, spec: IngestSpec, *, base_dir: Path) -> _Masks | None:
    """The label images of ``--mask-column`` and each row's label, or None without masks.

    The column holds a path per row; for CellProfiler tables it may also name an
    object (``ObjectsPathName_<name>``/``ObjectsFileName_<name>``) or image pair.
    """
    if not spec.mask_column:
        return None
    name = spec.mask_column
    if name in table.columns:
        paths = _column_paths(table, name, base_dir)
    else:
        objects = cellprofiler_tables.image_pairs(table.columns, objects=True)
        pair = objects.get(name) or cellprofiler_tables.image_pairs(table.columns).get(name)
        if pair is None:
            raise InputError(
                f"--mask-column {name!r} is neither a column of the table nor a CellProfiler "
                "object or image name with PathName_/FileName_ columns. Name the column that "
                "holds each field's label image."
            )
        paths = cellprofiler_tables.image_paths(table, pair, image_root=base_dir)
    label_column = spec.label_column or cellprofiler_tables.OBJECT_NUMBER
    if label_column not in table.columns:
        raise InputError(
            f"--mask-column needs each row's label in the mask: the table has no column "
            f"{label_column!r}. Name it with --label-column (CellProfiler: ObjectNumber)."
        )
    labels = pd.to_numeric(table[label_column], errors="coerce").to_numpy(dtype=np.float64)
    return _Masks(
        paths=paths,
        labels=labels,
        label_column=label_column,
        neighbours=spec.mask_neighbours or "zero",
    )


def metadata_channel_names(path: str | os.PathLike, n_channels: int) -> list[str] | None:
    """Channel names an OME-TIFF, ImageJ TIFF or OME-Zarr records (None when none fit).

    OME-TIFF: the ``Name`` of each ``Channel`` element of the OME-XML; ImageJ: the
    ``Labels`` of a stack with one label per channel; OME-Zarr: ``omero.channels[*].label``.
    Only names that are unique and one per channel count.
    """
    if is_ome_zarr(path):
        try:
            found = describe_ome_zarr(path).channel_names
        except DataError:  # unreadable metadata: no names (the read reports why)
            return None
        return list(found) if found and len(found) == n_channels else None
    if os.path.splitext(path)[1].lower() not in (".tif", ".tiff"):
        return None
    import xml.etree.ElementTree as ElementTree

    import tifffile

    names: list[str] = []
    try:
        with tifffile.TiffFile(path) as tiff:
            if tiff.is_ome and tiff.ome_metadata:
                root = ElementTree.fromstring(tiff.ome_metadata)
                names = [
                    element.get("Name", "")
                    for element in root.iter()
                    if element.tag.rsplit("}", 1)[-1] == "Channel"
                ]
            elif tiff.is_imagej and tiff.imagej_metadata:
                labels = tiff.imagej_metadata.get("Labels") or []
                names = [str(label) for label in labels]
    except (OSError, ValueError, ElementTree.ParseError):  # unreadable metadata: no names
        return None
    names = [name.strip() for name in names]
    if len(names) != n_channels or not all(names) or len(set(names)) != n_channels:
        return None
    return names


def _default_channel_names(source: ImageSource) -> list[str]:
    """Names from the channel columns, else from the images' metadata, else ``ch0, ch1, ...``."""
    if not source.per_channel and source.first_path is not None:
        found = metadata_channel_names(source.first_path, source.reference.n_channels)
        if found is not None:
            log.info("Channel names from the image metadata of %s: %s", source.first_path,
                     ", ".join(found))  # fmt: skip
            return found
    if source.per_channel:
        names = []
        for column in source.columns:
            name = str(column)
            for suffix in ("_path", "_file", "_filename"):
                name = name.removesuffix(suffix)
            names.append(name)
        if len(set(names)) == len(names):
            return names
    log.warning(
        "No channel names given (--channel-names) or found in the images' metadata: naming the "
        "channels ch0..ch%d. Re-ingest with --channel-names to name the stains.",
        source.reference.n_channels - 1,
    )
    return [f"ch{i}" for i in range(source.reference.n_channels)]


def _write_store(
    source: ImageSource,
    obs: pd.DataFrame,
    out_path: Path,
    *,
    spec: IngestSpec,
    record: dict,
    rejected: dict[int, str],
    rejected_ids: dict[int, str],
    border: set[int],
    overwrite: bool,
    started: float,
) -> IngestResult:
    reference = source.reference
    resize = spec.resize
    names = list(spec.channel_names) if spec.channel_names else _default_channel_names(source)
    if len(names) != reference.n_channels:
        raise InputError(
            f"--channel-names gives {len(names)} names but the images have {reference.n_channels} "
            "channels; give one name per channel."
        )
    store_obs = finalise_obs(obs, split_fractions=spec.split_fractions, seed=spec.seed)
    table_rows = store_obs[TABLE_ROW].to_numpy()
    height, width = (resize, resize) if resize else (reference.height, reference.width)
    writer = StoreWriter(
        out_path,
        obs=store_obs,
        image_shape=(reference.n_channels, height, width),
        dtype=reference.dtype,
        channel_names=names,
        control=spec.control,
        split_fractions=spec.split_fractions,
        seed=spec.seed,
        provenance=_store_provenance(spec, out_path, record),
        plan_key=_plan_key(spec, record, rejected, reference),
        overwrite=overwrite,
    )
    resumed = bool(writer.done_blocks) or (writer.partial_path / FIELDS_DONE_FILE).exists()
    with progress_bar(unit="cells") as bar:
        task = bar.add_task("Ingesting", total=writer.n_cells)
        source.fill(writer, table_rows, resize=resize, bar=bar, task=task)
    writer.finish(
        rejected=_rejected_rows(rejected, rejected_ids, border),
        extra={
            "n_rejected": len(rejected),
            "n_border": len(border),
            "source_image_size": [reference.height, reference.width],
            "ingest": record,
            **({schema.MASK_NEIGHBOURS: spec.mask_neighbours} if spec.mask_neighbours else {}),
        },
    )
    seconds = time.perf_counter() - started
    return IngestResult(
        store_path=out_path,
        n_cells=writer.n_cells,
        n_rejected=len(rejected),
        n_border=len(border),
        channel_names=names,
        image_size=(height, width),
        dtype=reference.dtype.name,
        seconds=seconds,
        cells_per_second=writer.n_cells / seconds if seconds > 0 else math.inf,
        resumed=resumed,
        n_blank=writer.stats.n_blank,
    )


def _plan_key(
    spec: IngestSpec, record: dict, rejected: dict[int, str], reference: _Reference
) -> str:
    """What a partial store must have been planned with to be resumed (a SHA-256)."""
    plan = {
        "arguments": {"table": str(spec.table), **spec.options()},
        "table_sha256": record["table_sha256"],
        "rejected": sorted(rejected),
        "reference": [reference.n_channels, reference.height, reference.width, reference.dtype.str],
        "format_version": schema.STORE_FORMAT_VERSION,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def _store_provenance(spec: IngestSpec, out_path: Path, record: dict) -> dict:
    """The command and input that made the store, for its attributes."""
    return {
        "command": spec.command(out_path),
        "arguments": {"table": str(spec.table), "out": str(out_path), **spec.options()},
        "table": str(spec.table),
        "table_sha256": record["table_sha256"],
        "version": __version__,
        "created": pd.Timestamp.now(tz="UTC").isoformat(),
    }


def _rejected_rows(
    rejected: dict[int, str], rejected_ids: dict[int, str], border: set[int]
) -> list[tuple[int, str, str]]:
    """``(table row, cell id, reason)`` of every row left out, sorted (``rejected.csv``)."""
    rows = [(row, rejected_ids.get(row, ""), reason) for row, reason in sorted(rejected.items())]
    rows += [
        (row, rejected_ids.get(row, ""), "border: the crop leaves the field of view")
        for row in sorted(border)
    ]
    return sorted(rows)
