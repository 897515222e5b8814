"""Loader: class-balanced training batches and in-order cell streams, read fast from the store.

Two readers serve two access patterns:

- :class:`BalancedLoader` turns the sampler's global batches (store rows,
  grouped by class) into :class:`Batch` tensors on the training device. Rank
  ``r`` of ``world_size`` reads only its slice of the global batch. Reads run on
  background threads (zarr decompression releases the GIL), land in pinned host
  memory and are copied to the device without blocking. Images stay integer
  until the model's ``Preprocessor`` turns them into normalised floats on the
  device; uint16 is widened to int32 on the device (torch cannot index uint16
  CUDA tensors in every version we support).
- :func:`iter_cells` streams cells in the order given, a bounded number of
  pieces ahead, for validation and embedding.

Both read through :class:`CellReader`, which keeps an in-memory copy of the
images when they fit the ``cache_gb`` budget and otherwise reads sorted,
de-duplicated rows through tensorstore (or zarr-python), whose decoded-chunk
cache then gets the budget. A sampler that draws each class's cells segment by
segment (:meth:`~scbd_cells.data.sampler.BalancedBatchSampler.use_segments`, the
``--sampling segments`` of ``train``) is read instead through a
:class:`SegmentReader` when the images do not fit the budget, so that a decoded
chunk serves a class for many batches instead of one cell.

Which cells are drawn is the sampler's choice alone (store, seed, options): the
memory budget picks how they are read, never what is read.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from scbd_cells.core.errors import InputError
from scbd_cells.data import schema
from scbd_cells.data.sampler import BalancedBatchSampler, arrays_as_tensors

if TYPE_CHECKING:
    from scbd_cells.data.store import Store

logger = logging.getLogger(__name__)

# Rows per piece when copying a store into memory: large contiguous reads.
_CACHE_PIECE_BYTES = 256 * 2**20
# A segment (the unit SegmentReader decodes and keeps) spans whole chunks, about this many bytes
# of pixels: 1 MiB, the store's default chunk (docs/performance.md, "Larger than the cache budget").
_SEGMENT_TARGET_BYTES = 1 << 20


def segment_cells_of(store: Store) -> int:
    """Rows per segment of ``store``: whole chunks, about 1 MiB of pixels.

    A function of the store's chunking and image size only, so a sampler in segment mode
    draws the same batches on any machine.
    """
    n_cells = max(1, int(store.images.shape[0]))
    cell_bytes = max(1, _images_nbytes(store) // n_cells)
    chunk = int(getattr(store.images, "chunks", (1,))[0] or 1)
    return chunk * max(1, round(_SEGMENT_TARGET_BYTES / (chunk * cell_bytes)))


class Batch(NamedTuple):
    """One rank's share of a class-balanced batch, on the training device.

    Attributes
    ----------
    images
        ``(b, C, H, W)`` integer tensor (the store's dtype; uint16 widened to
        int32, uint32 to int64), not yet normalised.
    perturbation
        ``(b,)`` long perturbation codes (``store.codes("perturbation")``).
    batch
        ``(b,)`` long batch codes (``store.codes("batch")``).
    indices
        ``(b,)`` long store rows of the cells.
    """

    images: torch.Tensor
    perturbation: torch.Tensor
    batch: torch.Tensor
    indices: torch.Tensor


def _images_nbytes(store: Store) -> int:
    shape = store.images.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(store.images.dtype).itemsize


def _fits(nbytes: int, cache_gb: float) -> bool:
    """Whether images of ``nbytes`` fit a cache budget of ``cache_gb`` (10^9 bytes; 0 = none)."""
    return cache_gb > 0 and nbytes <= cache_gb * 1e9


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The signed dtype that holds ``dtype`` and that every torch op supports."""
    if dtype == torch.uint16:
        return torch.int32
    if dtype == torch.uint32:
        return torch.int64
    return dtype


class CellReader:
    """Reads rows of a store's image array: from memory when the cache budget allows.

    Three paths, fastest first:

    - ``memory``: the images fit ``cache_gb``; they are copied once, in large
      contiguous pieces on ``workers`` threads, and rows are gathered from RAM.
    - ``tensorstore``: the store is read with tensorstore (C++, concurrent,
      decoded-chunk cache of ``cache_gb``), several times faster than
      zarr-python on scattered rows.
    - ``zarr``: ``store.read`` (sorted rows merged into whole-chunk reads).

    Parameters
    ----------
    store
        An open store (``open_store``).
    cache_gb
        Budget in GB (10^9 bytes) for an in-memory copy of the images; when
        they do not fit, the budget becomes tensorstore's chunk cache.
    workers
        Threads for the one-off copy into memory and for tensorstore's decoding.
    backend
        ``"auto"`` (as above), or force ``"memory"``, ``"tensorstore"`` or ``"zarr"``.
    share_local_ranks
        Under torchrun, keep one in-memory copy per node, in shared memory, for
        all the node's ranks (``cache_gb`` is then a per-node budget). Every rank
        must construct its reader at the same point (it synchronises them).
    """

    def __init__(
        self,
        store: Store,
        *,
        cache_gb: float = 0.0,
        workers: int = 2,
        backend: str = "auto",
        share_local_ranks: bool = False,
    ) -> None:
        if backend not in ("auto", "memory", "tensorstore", "zarr"):
            raise InputError(
                f"Expected backend auto, memory, tensorstore or zarr; found {backend!r}."
            )
        self.store = store
        self.nbytes = _images_nbytes(store)
        self.cached: np.ndarray | None = None
        self._tensorstore: Store = None
        self._shared_memory: Any = None
        fits = _fits(self.nbytes, cache_gb)
        if backend == "memory" or (backend == "auto" and fits):
            self.backend = "memory"
            if share_local_ranks and _local_world_size() > 1:
                self.cached = self._load_shared(max(1, workers))
            else:
                self.cached = self._load_all(max(1, workers))
            where = "node-shared memory" if self._shared_memory is not None else "memory"
            logger.info("Cached %.2f GB of images in %s", self.nbytes / 1e9, where)
            return
        if backend in ("auto", "tensorstore"):
            self._tensorstore = _open_tensorstore(store, cache_gb=cache_gb, workers=workers)
            if self._tensorstore is None and backend == "tensorstore":
                raise InputError(
                    "Expected tensorstore to be importable and the store on a local disk or "
                    "S3; "
                    "found neither. Install it with `pip install tensorstore` or use "
                    "backend='zarr'."
                )
        self.backend = "tensorstore" if self._tensorstore is not None else "zarr"
        if cache_gb > 0:
            logger.info(
                "Images (%.2f GB) exceed the cache budget (%.2f GB): reading from the store (%s)",
                self.nbytes / 1e9,
                cache_gb,
                self.backend,
            )

    def _load_shared(self, workers: int) -> np.ndarray:
        """Local rank 0 copies the images into POSIX shared memory; the node's ranks map it.

        The segment's name is removed as soon as every rank has mapped it, so the
        memory goes back to the system when the last rank exits (before that,
        Python's resource tracker removes it if the creating rank dies). If
        ``/dev/shm`` (as seen by rank 0) is too small, every rank keeps its own copy.
        """
        import shutil
        import uuid
        from multiprocessing import shared_memory

        import torch.distributed as dist

        from scbd_cells.core.distributed import barrier

        images = self.store.images
        shm_dir = Path("/dev/shm")
        room = shutil.disk_usage(shm_dir).free if shm_dir.is_dir() else 0
        decision = [uuid.uuid4().hex[:20], room > 1.05 * self.nbytes]
        dist.broadcast_object_list(decision, src=0)  # one name per job, same on every node
        if not decision[1]:
            logger.warning(
                "/dev/shm has %.1f GB free, less than the %.1f GB of images: each rank keeps "
                "its own copy (raise the shared-memory size, e.g. docker --shm-size).",
                room / 1e9,
                self.nbytes / 1e9,
            )
            return self._load_all(workers)
        name = f"scbd_{decision[0]}"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        size = max(1, self.nbytes)
        if local_rank == 0:
            segment = shared_memory.SharedMemory(name=name, create=True, size=size)
            self._load_all(workers, out=np.ndarray(images.shape, images.dtype, segment.buf))
        barrier()
        if local_rank != 0:
            segment = shared_memory.SharedMemory(name=name)
            _untrack(segment)
        barrier()
        if local_rank == 0:
            segment.unlink()
        self._shared_memory = segment  # keeps the mapping alive
        return np.ndarray(images.shape, images.dtype, segment.buf)

    def _load_all(self, workers: int, *, out: np.ndarray | None = None) -> np.ndarray:
        images = self.store.images
        n_cells = images.shape[0]
        row_bytes = max(1, self.nbytes // max(1, n_cells))
        step = max(1, _CACHE_PIECE_BYTES // row_bytes)
        chunk = int(getattr(images, "chunks", (1,))[0] or 1)
        step = max(chunk, step // chunk * chunk)  # whole chunks per piece
        if out is None:
            out = np.empty(images.shape, dtype=images.dtype)

        def copy_piece(start: int) -> None:
            stop = min(n_cells, start + step)
            out[start:stop] = images[start:stop]

        with ThreadPoolExecutor(workers, "scbd-cache") as executor:
            list(executor.map(copy_piece, range(0, n_cells, step)))
        return out

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images of ``indices`` (any order, repeats allowed), ``(len(indices), C, H, W)``."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.cached is not None:
            return self.cached[indices]
        if indices.size == 0:
            return np.empty((0, *self.store.images.shape[1:]), dtype=self.store.images.dtype)
        # Sorted unique rows let the store merge runs and read each chunk once.
        unique, inverse = np.unique(indices, return_inverse=True)
        if self._tensorstore is not None:
            self.store.images.check_placement(unique)  # tensorstore bypasses zarr's checks
            images = _tensorstore_read(
                self.store, self._tensorstore.oindex[unique], (int(unique[0]), int(unique[-1]) + 1)
            )
        else:
            images = self.store.read(unique)
        if unique.size == indices.size and np.array_equal(unique, indices):
            return images
        return images[inverse]


def _local_world_size() -> int:
    """Ranks on this node in a running process group (1 without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _untrack(segment: Any) -> None:
    """Stop Python's resource tracker from unlinking a segment this process only attached to.

    Before Python 3.13 an attaching process registers the segment too, and its
    tracker would unlink it (and warn) at exit; the creating rank owns it.
    """
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(segment._name, "shared_memory")
    except (ImportError, AttributeError, KeyError):
        pass


def _open_tensorstore(store: Store, *, cache_gb: float, workers: int) -> Any:
    """The store's image array opened with tensorstore, or None if that is not possible."""
    try:
        import tensorstore
    except ImportError:
        return None
    location = getattr(store, "path", "")
    if isinstance(location, str) and "://" in location:  # a store on object storage
        kvstore = _s3_kvstore(location)
        if kvstore is None:
            return None
        array_dir = f"{location}/images"
    else:
        array_dir = Path(location) / "images"
        if not (array_dir / "zarr.json").is_file():
            return None
        kvstore = {"driver": "file", "path": str(array_dir)}
    context = tensorstore.Context(
        {
            "cache_pool": {"total_bytes_limit": int(max(0.0, cache_gb) * 1e9)},
            "data_copy_concurrency": {"limit": max(1, workers)},
            "file_io_concurrency": {"limit": max(4, 2 * workers)},
        }
    )
    spec = {
        "driver": "zarr3",
        "kvstore": kvstore,
        "recheck_cached_data": False,  # a finished store is read-only
        "fill_missing_data_reads": False,  # every chunk is written: a missing one is damage
    }
    try:
        array = tensorstore.open(spec, open=True, read=True, context=context).result()
    except Exception as error:  # any failure just means: use zarr-python instead
        logger.debug("tensorstore cannot open %s (%s); using zarr", array_dir, error)
        return None
    if tuple(array.shape) != tuple(store.images.shape):
        return None
    return array


def _s3_kvstore(url: str) -> dict | None:
    """tensorstore's ``s3`` kvstore of a store's images at ``s3://bucket/key``; None otherwise.

    tensorstore reads the credentials itself (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_PROFILE, ~/.aws/credentials) but not a custom endpoint; the endpoint and region are
    the ones botocore resolves from the same environment and ~/.aws/config (AWS_ENDPOINT_URL,
    AWS_ENDPOINT_URL_S3, endpoint_url), so both readers reach the same server. The S3
    benchmark (benchmarks/store_s3.py) found tensorstore 2-5x faster than zarr-python
    with s3fs for the loader's reads.
    """
    if not url.startswith("s3://"):
        return None  # gs:// stores are read with zarr-python (gcsfs)
    try:
        import botocore.session

        client = botocore.session.get_session().create_client("s3")
    except Exception as error:  # no botocore, or an unreadable ~/.aws/config
        logger.debug("No S3 endpoint for tensorstore (%s); using zarr", error)
        return None
    bucket, _, key = url[len("s3://") :].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": f"{key}/images/"}
    endpoint, region = client.meta.endpoint_url, client.meta.region_name
    if endpoint and not endpoint.rstrip("/").endswith(".amazonaws.com"):
        spec["endpoint"] = endpoint  # S3-compatible storage; AWS itself tensorstore finds
    if region:
        spec["aws_region"] = region
    return spec


def _tensorstore_read(store: Store, read: Any, rows: tuple[int, int]) -> np.ndarray:
    """The result of a tensorstore read (a view or a pending read) of store rows ``rows``.

    A missing or damaged chunk becomes the store's :class:`~scbd_cells.core.errors.StoreError`
    naming the damaged cells (tensorstore checks chunks' CRC32C and refuses missing ones).
    """
    try:
        return (read.read() if hasattr(read, "read") else read).result()
    except Exception as error:
        raise store.images.read_error(rows, error) from error


class SegmentReader:
    """Reads store rows by decoding whole segments and keeping them, up to a byte budget.

    A segment is the run of rows ``[s * segment_cells, (s + 1) * segment_cells)``
    (whole chunks, about 1 MiB of pixels). A read decodes the segments its rows
    fall in, unless they are kept already, and gathers the rows; decoded
    segments are kept, least recently used dropped first, while they fit
    ``budget_gb``. Paired with a sampler in segment mode
    (:meth:`~scbd_cells.data.sampler.BalancedBatchSampler.use_segments`) each
    segment is decoded about once per pass over the class's cells.

    Parameters
    ----------
    store
        An open store.
    budget_gb
        Bytes (10^9) of decoded segments to keep. Segments in use by reads in
        flight are kept beyond it. Holding one segment per class avoids decoding
        any twice (:attr:`recommended_gb`).
    workers
        Decoding threads of the tensorstore fallback.

    Notes
    -----
    Segments are decoded with tensorstore (concurrently, checksums checked),
    or with zarr-python where tensorstore cannot open the store. Reads are
    thread-safe; a segment that two reads need at once is decoded once.
    """

    def __init__(self, store: Store, *, budget_gb: float, workers: int = 2) -> None:
        import threading
        from collections import OrderedDict

        self.store = store
        self.n_cells = int(store.images.shape[0])
        self.cell_bytes = max(1, _images_nbytes(store) // max(1, self.n_cells))
        self.segment_cells = segment_cells_of(store)
        self.segment_bytes = self.segment_cells * self.cell_bytes
        self.budget_bytes = int(max(0.0, budget_gb) * 1e9)
        self._tensorstore = _open_tensorstore(store, cache_gb=0.0, workers=workers)
        self.backend = "tensorstore" if self._tensorstore is not None else "zarr"
        self._lock = threading.Lock()
        # segment -> [Future of its decoded rows, reads holding it, bytes]; oldest use first
        self._kept: OrderedDict[int, list] = OrderedDict()
        self.kept_bytes = 0
        self.decoded_segments = 0  # segments decoded so far (statistics)

    def recommended_gb(self, n_segments: int) -> float:
        """Budget (GB) that keeps ``n_segments`` decoded segments (e.g. one per class)."""
        return n_segments * self.segment_bytes / 1e9

    def _decode(self, segments: Sequence[int]) -> list[np.ndarray]:
        bounds = [
            (s * self.segment_cells, min((s + 1) * self.segment_cells, self.n_cells))
            for s in segments
        ]
        if self._tensorstore is not None:
            for a, b in bounds:  # tensorstore bypasses zarr's checks of each chunk's place
                self.store.images.check_placement(np.arange(a, b))
            futures = [self._tensorstore[a:b].read() for a, b in bounds]  # decoded concurrently
            return [
                _tensorstore_read(self.store, future, bound)
                for future, bound in zip(futures, bounds, strict=True)
            ]
        return [self.store.images[a:b] for a, b in bounds]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images of ``indices`` (any order, repeats allowed), ``(len(indices), C, H, W)``."""
        indices = np.asarray(indices, dtype=np.int64)
        segment = indices // self.segment_cells
        order = np.argsort(segment, kind="stable")
        cuts = np.flatnonzero(np.diff(segment[order])) + 1
        bounds = np.concatenate([[0], cuts, [len(indices)]]).tolist()
        segments = segment[order[bounds[:-1]]].tolist() if len(indices) else []
        mine: list[tuple[int, list]] = []
        with self._lock:
            entries = []
            for s in segments:
                entry = self._kept.get(s)
                if entry is None:  # [decoded rows or None, reads holding it, bytes, Future]
                    entry = self._kept[s] = [None, 0, 0, Future()]
                    mine.append((s, entry))
                entry[1] += 1
                self._kept.move_to_end(s)
                entries.append(entry)
        try:
            if mine:
                self._fill(mine)
            out = np.empty((len(indices), *self.store.images.shape[1:]), self.store.images.dtype)
            for i, entry in enumerate(entries):
                rows = entry[0] if entry[0] is not None else entry[3].result()
                first, last = bounds[i], bounds[i + 1]
                positions = order[first:last]
                local = indices[positions] - segments[i] * self.segment_cells
                # positions ascend (stable sort): a run when a class's cells sit together
                if positions[-1] - positions[0] == last - first - 1:  # one copy, no temporary
                    np.take(rows, local, axis=0, out=out[positions[0] : positions[-1] + 1])
                else:
                    out[positions] = rows[local]
            return out
        finally:
            self._release(segments)

    def _fill(self, mine: list[tuple[int, list]]) -> None:
        try:
            decoded = self._decode([s for s, _ in mine])
        except BaseException as error:
            with self._lock:
                for _, entry in mine:
                    entry[3].set_exception(error)
                    entry[2] = -1  # failed: dropped when released, decoded again next time
            raise
        with self._lock:
            for (_, entry), rows in zip(mine, decoded, strict=True):
                entry[0], entry[2] = rows, rows.nbytes
                self.kept_bytes += rows.nbytes
                self.decoded_segments += 1
                entry[3].set_result(rows)

    def _release(self, segments: Sequence[int]) -> None:
        with self._lock:
            for s in segments:
                entry = self._kept.get(s)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] == 0 and entry[2] < 0:
                    del self._kept[s]
            if self.kept_bytes <= self.budget_bytes:
                return
            for s in [s for s, entry in self._kept.items() if entry[1] == 0]:
                _, _, nbytes, _ = self._kept.pop(s)
                self.kept_bytes -= nbytes
                if self.kept_bytes <= self.budget_bytes:
                    break


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device, non-blocking from pinned memory, widened to a safe integer dtype."""
    wide = _wide_dtype(host.dtype)
    if device.type == "cpu":
        return host.to(wide) if wide != host.dtype else host
    moved = host.to(device, non_blocking=True)
    return moved.to(wide) if wide != moved.dtype else moved


def images_to_device(images: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """Pixels read from a store, on ``device`` in a signed integer dtype every op supports.

    On CUDA the store's dtype is copied (from pinned memory, without blocking) and widened
    there (uint16 -> int32: half the bytes over the bus; torch cannot index uint16 CUDA
    tensors in every version we support); on the CPU it is widened in place.
    """
    device = torch.device(device)
    host = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == "cuda":
        host = host.pin_memory()
    return _to_device(host, device)


class BalancedLoader:
    """Endless class-balanced batches for one rank, prefetched on background threads.

    Parameters
    ----------
    store
        An open store.
    sampler
        A ``BalancedBatchSampler`` (or anything with ``next_indices()``,
        ``state_dict()`` and ``load_state_dict()``). Every rank must hold a
        sampler with the same seed: each draws the same global batch and reads
        only its own slice.
    device
        Where the batches go (``"cuda:0"``, ``"cpu"``, a ``torch.device``).
    rank, world_size
        This process's rank and the number of ranks; rank ``r`` gets the
        ``r``-th of ``world_size`` equal slices of each global batch.
    cache_gb
        In-memory cache budget for the images (see :class:`CellReader`).
    workers
        Background reader threads; 0 reads on the calling thread.
    prefetch
        Batches read ahead of the one being consumed (at least ``workers``).
    backend
        How the images are read (never which: that is the sampler's): ``"auto"``
        picks ``"memory"`` when the store fits ``cache_gb``; otherwise, for a
        sampler in segment mode (``sampler.segment_cells`` set, see
        :meth:`~scbd_cells.data.sampler.BalancedBatchSampler.use_segments`) and
        ``cache_gb > 0``, ``"chunks"``; otherwise row reads (``"tensorstore"``,
        else ``"zarr"``; see :class:`CellReader`). ``"chunks"``: a
        :class:`SegmentReader` keeps up to ``cache_gb`` of decoded store
        segments, about one chunk decode per cell when the sampler draws segment
        by segment.

    Notes
    -----
    ``state_dict()`` is the sampler's state *before* the first batch not yet
    handed out, so batches prefetched but never consumed are drawn again after
    ``load_state_dict()``: resuming gives exactly the batches an uninterrupted
    run would have given.

    One batch is always sent to the device ahead of the consumer; on CUDA its
    copy (pinned memory, non-blocking, on a side stream) runs while the
    current step computes, and the batch is ordered before the consumer's work
    when handed out.
    """

    def __init__(
        self,
        store: Store,
        sampler: Any,
        *,
        device: str | torch.device,
        rank: int = 0,
        world_size: int = 1,
        cache_gb: float = 0.0,
        workers: int = 2,
        prefetch: int = 2,
        backend: str = "auto",
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(
                f"Expected 0 <= rank < world_size, found rank={rank}, world_size={world_size}."
            )
        if workers < 0 or prefetch < 0:
            raise InputError(
                f"Expected workers >= 0 and prefetch >= 0, found {workers} and {prefetch}."
            )
        self.store = store
        self.sampler = sampler
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        if backend not in ("auto", "memory", "tensorstore", "zarr", "chunks"):
            raise InputError(
                f"Expected backend auto, memory, chunks, tensorstore or zarr; found {backend!r}."
            )
        fits = _fits(_images_nbytes(store), cache_gb)
        segments = getattr(sampler, "segment_cells", None) is not None
        self.reader: CellReader | SegmentReader
        if backend == "chunks" or (backend == "auto" and segments and not fits and cache_gb > 0):
            # the budget is per node, like the shared in-memory copy: each rank keeps its share
            local_ranks = _local_world_size() if world_size > 1 else 1
            self.reader = SegmentReader(
                store, budget_gb=cache_gb / local_ranks, workers=max(1, workers)
            )
            self._log_segments(sampler, world_size)
        else:
            if backend == "auto" and not fits and cache_gb > 0:
                logger.info(
                    "Images (%.2f GB) exceed the cache budget: reading rows through the chunk "
                    "cache. Drawing cells segment by segment (train --sampling segments) reads "
                    "such stores many times faster (docs/performance.md).",
                    _images_nbytes(store) / 1e9,
                )
            self.reader = CellReader(
                store,
                cache_gb=cache_gb,
                workers=max(1, workers),
                backend=backend,
                share_local_ranks=world_size > 1,
            )
        self.backend = "chunks" if isinstance(self.reader, SegmentReader) else self.reader.backend
        self.perturbation_codes = np.asarray(store.codes(schema.PERTURBATION)[0], dtype=np.int64)
        self.batch_codes = np.asarray(store.codes(schema.BATCH)[0], dtype=np.int64)
        self.workers = workers
        self.depth = max(prefetch, workers, 1) if workers > 0 else 1
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._executor = ThreadPoolExecutor(workers, "scbd-loader") if workers > 0 else None
        # (sampler state before drawing, pending host batch); oldest first.
        self._pending: deque[tuple[dict, Future | tuple]] = deque()
        # The next batch, already sent to the device (one ahead of the consumer).
        self._ready: tuple[dict, Batch] | None = None
        # The resume point kept by close(), which empties the queues that hold it.
        self._closed_state: dict | None = None
        self._stream = torch.cuda.Stream(device=self.device) if self._pin else None

    def _log_segments(self, sampler: Any, world_size: int) -> None:
        reader = self.reader
        n_classes = len(getattr(sampler, "classes", ()))
        # with several ranks a class's cells mostly go to its home rank (use_segments)
        needed = reader.recommended_gb(math.ceil(n_classes / world_size))
        local_ranks = _local_world_size() if world_size > 1 else 1
        logger.info(
            "Images (%.2f GB) exceed the cache budget: reading whole segments of %d cells "
            "(%s), keeping up to %.2f GB of them decoded",
            _images_nbytes(self.store) / 1e9,
            reader.segment_cells,
            reader.backend,
            reader.budget_bytes / 1e9,
        )
        if n_classes and reader.budget_bytes < needed * 1e9:
            logger.warning(
                "The cache budget (%.2f GB per rank) holds fewer decoded segments than the rank "
                "draws classes from (%d of %d, about %.2f GB for one segment each): segments of "
                "rarely drawn classes will be decoded more than once. Raise --cache-gb to %.3g "
                "or more for full speed.",
                reader.budget_bytes / 1e9,
                math.ceil(n_classes / world_size),
                n_classes,
                needed,
                1.25 * needed * local_ranks,
            )

    # -- sampling and reading ---------------------------------------------------------
    def _local_slice(self, global_indices: np.ndarray) -> np.ndarray:
        total = global_indices.shape[0]
        if total % self.world_size:
            raise InputError(
                f"Expected a global batch divisible by the {self.world_size} ranks, found "
                f"{total} cells. Choose classes_per_batch * cells_per_class divisible by "
                f"the number of processes."
            )
        size = total // self.world_size
        return global_indices[self.rank * size : (self.rank + 1) * size]

    def _read_host(self, indices: np.ndarray) -> tuple:
        images = self.reader.read(indices)
        if self.device.type == "cpu" and images.dtype in (np.uint16, np.uint32):
            # widen here, on the worker thread: numpy's cast is far faster than torch's
            images = images.astype(np.int32 if images.dtype == np.uint16 else np.int64)
        images = torch.from_numpy(np.ascontiguousarray(images))
        perturbation = torch.from_numpy(self.perturbation_codes[indices])
        batch = torch.from_numpy(self.batch_codes[indices])
        index_tensor = torch.from_numpy(indices)
        host = (images, perturbation, batch, index_tensor)
        if self._pin:
            host = tuple(t.pin_memory() for t in host)
        return host

    def _submit(self) -> None:
        state = self._sampler_state()
        indices = self._local_slice(np.asarray(self.sampler.next_indices(), dtype=np.int64))
        if self._executor is None:
            self._pending.append((state, self._read_host(indices)))
        else:
            self._pending.append((state, self._executor.submit(self._read_host, indices)))

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> BalancedLoader:
        return self

    def __next__(self) -> Batch:
        if self._ready is None:
            self._ready = self._next_on_device()
        _, batch = self._ready
        if self._stream is not None:
            # the batch was copied on the side stream: order it before this step's work
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            for tensor in batch:
                tensor.record_stream(current)
        # Copy the next batch now, so that on CUDA it travels while this step computes.
        self._ready = self._next_on_device()
        return batch

    def _next_on_device(self) -> tuple[dict, Batch]:
        """(sampler state before it, the next batch) sent to the device (side stream on CUDA)."""
        while len(self._pending) < self.depth:
            self._submit()
        state, pending = self._pending.popleft()
        host = pending.result() if isinstance(pending, Future) else pending
        # Start the next read before the copy, so the threads stay busy.
        while len(self._pending) < self.depth:
            self._submit()
        images, perturbation, batch, indices = host
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            on_device = Batch(
                images=_to_device(images, self.device),
                perturbation=perturbation.to(self.device, non_blocking=True),
                batch=batch.to(self.device, non_blocking=True),
                indices=indices.to(self.device, non_blocking=True),
            )
        return state, on_device

    # -- state ------------------------------------------------------------------------
    def _sampler_state(self) -> dict:
        """A private copy of the sampler's state (numpy arrays where it offers them: cheap)."""
        if isinstance(self.sampler, BalancedBatchSampler):
            return self.sampler.state_dict(as_tensors=False)  # fresh arrays, nothing shared
        return copy.deepcopy(self.sampler.state_dict())

    def _resume_point(self) -> dict:
        if self._ready is not None:
            return self._ready[0]
        if self._pending:
            return self._pending[0][0]
        if self._closed_state is not None:
            return self._closed_state
        return self._sampler_state()

    def state_dict(self) -> dict:
        """The sampler's state before the first batch not yet handed out (resume point).

        Also after :meth:`close`: closing drops the prefetched batches but keeps
        this point, so a checkpoint taken after Ctrl-C resumes exactly.
        """
        return arrays_as_tensors(copy.deepcopy(self._resume_point()))

    def load_state_dict(self, state: dict) -> None:
        """Restore the sampler and drop every prefetched batch (they are drawn again)."""
        self._drain()
        self._closed_state = None
        self.sampler.load_state_dict(copy.deepcopy(state))

    def _drain(self) -> None:
        self._ready = None
        for _, pending in self._pending:
            if isinstance(pending, Future):
                pending.cancel()
        for _, pending in self._pending:
            if isinstance(pending, Future) and not pending.cancelled():
                pending.exception()  # wait, so no read outlives the reset
        self._pending.clear()

    def close(self) -> None:
        """Stop the background threads (the loader cannot be used afterwards).

        :meth:`state_dict` still gives the resume point: the state before the
        first batch that was not handed out.
        """
        if self._closed_state is None:
            self._closed_state = self._resume_point()
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> BalancedLoader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def iter_cells(
    store: Store,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    workers: int = 2,
    cache_gb: float = 0.0,
    reader: CellReader | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(indices, images)`` pieces of ``batch_size`` cells, in the order given.

    Memory stays bounded: at most ``workers + 1`` pieces are held ahead of the
    consumer.

    Parameters
    ----------
    store
        An open store.
    indices
        Store rows to read, in the order to yield them.
    batch_size
        Cells per piece (the last piece may be smaller).
    workers
        Background reader threads; 0 reads on the calling thread.
    cache_gb
        In-memory cache budget (ignored when ``reader`` is given).
    reader
        A :class:`CellReader` to reuse (e.g. one holding the cache).
    rank, world_size
        Split the work across ranks (torchrun): the pieces are dealt round-robin,
        rank ``r`` reading pieces ``r, r + world_size, ...``. Every rank yields
        the same number of pieces (empty ones at the end where the pieces run
        out), so a collective per piece (e.g.
        :func:`scbd_cells.core.distributed.gather_pieces`) stays in step, and the
        pieces of one round, concatenated in rank order, are consecutive in
        ``indices``.

    Yields
    ------
    tuple
        ``(indices int64 (n,), images (n, C, H, W) in the store dtype)``.
    """
    if batch_size < 1:
        raise InputError(f"Expected batch_size >= 1, found {batch_size}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(
            f"Expected 0 <= rank < world_size, found rank={rank}, world_size={world_size}."
        )
    indices = np.asarray(indices, dtype=np.int64)
    if reader is None:
        reader = CellReader(store, cache_gb=cache_gb, workers=max(1, workers))
    n_pieces = math.ceil(indices.size / batch_size)
    n_rounds = math.ceil(n_pieces / world_size)
    pieces = (
        indices[piece * batch_size : (piece + 1) * batch_size]
        for piece in range(rank, n_rounds * world_size, world_size)
    )  # empty beyond the last piece
    if workers <= 0:
        for piece in pieces:
            yield piece, reader.read(piece)
        return
    with ThreadPoolExecutor(workers, "scbd-cells") as executor:
        ahead: deque[tuple[np.ndarray, Future]] = deque()
        for piece in pieces:
            ahead.append((piece, executor.submit(reader.read, piece)))
            if len(ahead) > workers:
                done_piece, future = ahead.popleft()
                yield done_piece, future.result()
        while ahead:
            done_piece, future = ahead.popleft()
            yield done_piece, future.result()
