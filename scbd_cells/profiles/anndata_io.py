"""AnnData files: every .h5ad / .zarr scbd-cells writes goes through here.

- :func:`write_anndata` writes an in-memory AnnData under a temporary name and renames
  it into place (``baseline``, ``correct``, guide and gene profiles);
- :class:`CellsWriter` writes a cells file incrementally: the skeleton (obs, var, uns)
  first, then ``X`` / ``obsm`` batch by batch, checking the free space before each
  (``embed``);
- :func:`check_output_path` is the ownership rule for AnnData outputs
  (:mod:`scbd_cells.core.outputs`); :func:`store_obs_for_anndata` the store's cell table as
  ``obs``, :func:`store_label_columns` the columns its labels came from.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError, DiskFullError, InputError
from scbd_cells.core.outputs import (
    check_free_space,
    check_output,
    free_bytes,
    publish,
    remove_temporary,
    temporary_name,
)
from scbd_cells.data import schema

if TYPE_CHECKING:
    import anndata

    from scbd_cells.data.store import Store

OUTPUT_SUFFIXES = (".h5ad", ".zarr")


def check_output_path(out_path: Path, *, overwrite: bool, inputs: Sequence[Any] = ()) -> None:
    """Refuse an output of unknown type, one that is an input, or one scbd-cells may not replace.

    An existing output is replaced only with ``overwrite`` and only if it is an
    AnnData that scbd-cells wrote (``uns["scbd"]``); see :mod:`scbd_cells.core.outputs`.
    """
    if out_path.suffix not in OUTPUT_SUFFIXES:
        raise InputError(
            f"Output {out_path} must end in .h5ad or .zarr (the AnnData format is chosen by "
            "the extension)."
        )
    check_output(out_path, kind="anndata", overwrite=overwrite, inputs=inputs)


def store_obs_for_anndata(store: Store) -> pd.DataFrame:
    """The store's cell table ready for AnnData: str index, text columns categorical."""
    obs = store.obs.copy()
    obs.index = pd.Index(obs.index.astype(str), dtype=object)
    for column in obs.columns:
        values = obs[column]
        if column == schema.CELL_ID:
            # dtype=object: pandas 3 would infer its str dtype, which anndata 0.12 will not write
            obs[column] = pd.Series(
                values.astype(str).to_numpy(dtype=object), index=obs.index, dtype=object
            )
        elif not (
            isinstance(values.dtype, pd.CategoricalDtype)
            or pd.api.types.is_numeric_dtype(values)
            or pd.api.types.is_bool_dtype(values)
        ):
            # text as the table held it; an empty field stays missing (not the text "nan")
            text = values.astype(str).where(values.notna())
            obs[column] = pd.Categorical(text.to_numpy(dtype=object))
        elif isinstance(values.dtype, pd.CategoricalDtype):
            obs[column] = values.cat.rename_categories([str(c) for c in values.cat.categories])
    return obs


def store_label_columns(store: Store) -> dict[str, Any]:
    """``uns["scbd"]["label_columns"]``: the table columns ingest made the labels from.

    ``{"perturbation": str, "guide": str (if given), "batch": [str, ...]}`` from the
    store's recorded ingest arguments (``--perturbation-column``, ``--guide-column``,
    ``--batch-columns``), so that ``export`` finds the plate and the well whatever their
    names; ``{}`` for a store that does not record them.
    """
    arguments = store.provenance.get("arguments") or {}
    if not arguments.get("perturbation_column"):
        return {}
    found: dict[str, Any] = {"perturbation": str(arguments["perturbation_column"])}
    if arguments.get("guide_column"):
        found["guide"] = str(arguments["guide_column"])
    found["batch"] = [str(name) for name in arguments.get("batch_columns") or []]
    return found


def without_none(options: dict) -> dict:
    """JSON-like ``options`` without the unset (None) ones, which not every AnnData writes."""
    return {key: value for key, value in json.loads(json.dumps(options, default=str)).items()
            if value is not None}  # fmt: skip


def anndata_bytes(obs: pd.DataFrame, n_values: int) -> int:
    """An upper estimate of an AnnData file's size: ``n_values`` float32 values plus ``obs``."""
    return 4 * n_values + int(obs.memory_usage(deep=True).sum())


def temporary_path(out_path: Path) -> Path:
    """A hidden temporary name beside ``out_path`` (``core.outputs.temporary_name``)."""
    return temporary_name(out_path)


def remove_path(path: Path) -> None:
    remove_temporary(path)


def move_into_place(tmp_path: Path, out_path: Path, *, overwrite: bool) -> None:
    """Put a finished AnnData in place, replacing only one scbd-cells wrote, and record it."""
    publish(tmp_path, out_path, kind="anndata", overwrite=overwrite)


@contextmanager
def _quiet_zarr_consolidation() -> Iterator[None]:
    # anndata consolidates zarr v3 metadata, which zarr flags as outside the v3 spec; the
    # files still read back with anndata and zarr (tested), so this one warning is not useful.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield


def _plain_strings(adata: anndata.AnnData) -> None:
    """Text in obs and var as plain object strings, in place, before writing.

    pandas 3 gives text columns and indexes its ``str`` dtype; anndata writes those as
    nullable-string groups (and 0.12 only when allowed), which anndata < 0.11 and this
    package's own streaming reader (``evaluation/cells.py``) cannot read. Object strings
    are written as plain string datasets by every anndata version.
    """
    for frame in (adata.obs, adata.var):
        if isinstance(frame.index.dtype, pd.StringDtype):
            frame.index = pd.Index(
                frame.index.to_numpy(dtype=object), dtype=object, name=frame.index.name
            )
        for column in frame.columns:
            if isinstance(frame[column].dtype, pd.StringDtype):
                frame[column] = pd.Series(
                    frame[column].to_numpy(dtype=object), index=frame.index, dtype=object
                )


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _bad(values: np.ndarray) -> np.ndarray:
    """NaN, infinite, or (float64) beyond float32's range: infinite once stored as float32."""
    with np.errstate(invalid="ignore"):
        return ~(np.abs(values) <= FLOAT32_MAX)


def non_finite_rows(values: Any) -> np.ndarray:
    """Rows of ``values`` (dense or sparse, 2-D) holding NaN, infinity, or beyond float32.

    Profiles are stored and read as float32, where a float64 value beyond about
    ±3.4e38 becomes infinite: such rows count as non-finite too.
    """
    import scipy.sparse as sp

    if sp.issparse(values):
        coo = values.tocoo()
        return np.unique(coo.row[_bad(coo.data)])
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.number):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(_bad(array.reshape(len(array), -1)).any(axis=1))


def rows_named(names: Sequence[Any], rows: np.ndarray, *, limit: int = 5) -> str:
    """``"c3, c9, c12 and 4 more"``: the first rows of ``rows`` by name."""
    shown = ", ".join(str(names[int(i)]) for i in rows[:limit])
    return shown + (f" and {len(rows) - limit:,} more" if len(rows) > limit else "")


def check_finite(adata: anndata.AnnData, *, shown_as: Path) -> None:
    """Refuse to write profiles that hold NaN or infinity, naming the rows and the array.

    Every AnnData scbd-cells writes goes through here (:func:`write_any`): a
    correction, a PCA or an aggregation that produced non-finite values is an
    error, never a file that looks finished.
    """
    arrays = [("X", adata.X), *((f"obsm[{k!r}]", v) for k, v in adata.obsm.items())]
    for name, values in arrays:
        if values is None or isinstance(values, pd.DataFrame):
            continue
        rows = non_finite_rows(values)
        if len(rows):
            raise DataError(
                f"{shown_as} was not written: {len(rows):,} of {adata.n_obs:,} rows of its "
                f"{name} are NaN, infinite or beyond float32's range (±3.4e38) (rows "
                f"{rows_named(adata.obs_names, rows)}). "
                "scbd-cells does not write non-finite profiles: check the input for NaN or "
                "infinite values (numpy.isfinite) and drop or impute those rows, or choose "
                "another method."
            )


def write_any(adata: anndata.AnnData, path: Path, *, shown_as: Path | None = None) -> None:
    """Write ``adata`` to ``path`` (by extension); refused if it holds NaN or infinity.

    ``shown_as`` is the output named in messages (``path`` may be a temporary name).
    """
    check_finite(adata, shown_as=shown_as or path)
    _plain_strings(adata)
    if path.suffix == ".zarr":
        import anndata as ad

        # zarr v3 (the store's format too); anndata < 0.11 has no such setting
        if hasattr(ad.settings, "zarr_write_format"):
            options = {"zarr_write_format": 3}
            if hasattr(ad.settings, "auto_shard_zarr_v3"):
                options["auto_shard_zarr_v3"] = False  # small chunks suit row reads
            with ad.settings.override(**options), _quiet_zarr_consolidation():
                adata.write_zarr(path)
        else:
            adata.write_zarr(path)
    else:
        adata.write_h5ad(path)


def write_anndata(adata: anndata.AnnData, out_path: Path, *, overwrite: bool) -> None:
    """Write AnnData (``.h5ad`` or ``.zarr``) under a temporary name, then rename into place."""
    check_output_path(out_path, overwrite=overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temporary_path(out_path)
    try:
        write_any(adata, tmp_path, shown_as=out_path)
        move_into_place(tmp_path, out_path, overwrite=overwrite)
    except BaseException:
        remove_path(tmp_path)
        raise


class CellsWriter:
    """Writes a cells AnnData skeleton, then fills ``X`` / ``obsm`` arrays batch by batch.

    HDF5 cannot recover from a full disk: a write or close that fails for want
    of room leaves the library in a state that crashes the interpreter (h5py's
    objects, finalised later, print "Exception ignored" and the process ends in
    a segfault). So an ``.h5ad``'s arrays are given all their room on disk when
    they are created (contiguous, allocated and zero-filled at once) and the
    file is flushed: the batches then only overwrite blocks the file already
    owns, and closing has nothing left to write. A disk that fills up before
    that point fails while the file is being created; :meth:`abort` then
    truncates the file to nothing before closing it, so that HDF5's last
    writes find room, and the caller removes it. A 1 MiB reserve file beside
    the output, deleted before closing, is kept as a further margin. Zarr
    writes each chunk as a file, so the free space is checked before each
    batch instead.
    """

    RESERVE_BYTES = 1 << 20

    def __init__(
        self,
        path: Path,
        *,
        obs: pd.DataFrame,
        widths: dict[str, int],
        uns: dict,
        shown_as: Path | None = None,
    ):
        import anndata as ad

        self.path = path
        self.shown_as = shown_as or path  # the output named in messages (path is temporary)
        self.cell_ids = obs.index
        self.remaining_bytes = 4 * len(obs) * sum(widths.values())
        self.reserve_path = path.with_name(path.name + ".reserve")
        if path.suffix == ".h5ad":
            _reserve(self.reserve_path, self.RESERVE_BYTES)
        key_x = widths["X"]
        var = pd.DataFrame(index=[f"z{i}" for i in range(key_x)])
        skeleton = ad.AnnData(obs=obs, var=var, uns=uns)
        write_any(skeleton, path)
        n_cells = len(obs)
        chunk = max(1, min(n_cells, 65536))
        if path.suffix == ".zarr":
            import zarr

            self.root = zarr.open_group(path, mode="r+")
            obsm = self.root["obsm"]

            def create(group, name, width):
                array = group.create_array(
                    name, shape=(n_cells, width), dtype="float32", chunks=(chunk, width)
                )
                array.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                return array
        else:
            import h5py

            self.root = h5py.File(path, "r+")
            obsm = self.root.require_group("obsm")
            allocate_now = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            allocate_now.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)

            def create(group, name, width):
                # contiguous, allocated and zero-filled now: later writes need no new room
                array = group.create_dataset(
                    name, shape=(n_cells, width), dtype="float32", dcpl=allocate_now,
                    fill_time="alloc",
                )  # fmt: skip
                array.attrs["encoding-type"] = "array"
                array.attrs["encoding-version"] = "0.2.0"
                return array

        try:
            self.arrays = {
                key: create(self.root if key == "X" else obsm, key, width)
                for key, width in widths.items()
            }
            if path.suffix == ".h5ad":
                self.root.flush()  # headers and zero-filled arrays on disk while room is known
                self.remaining_bytes = 0
        except BaseException as error:
            self.abort()
            if "errno = 28" in str(error):  # h5py reports ENOSPC as ValueError or RuntimeError
                raise DiskFullError(
                    f"Not enough room for {self.shown_as}: the disk filled up while its "
                    f"{self.remaining_bytes / 2**20:,.1f} MiB of embeddings were being allocated "
                    f"({(free_bytes(path.parent) or 0) / 2**20:,.1f} MiB free now); nothing was "
                    "left behind. "
                    "Free some space or choose a --out on another disk."
                ) from None
            raise

    def write(self, start: int, values: dict[str, np.ndarray]) -> None:
        for key, block in values.items():
            rows = non_finite_rows(block)
            if len(rows):
                raise DataError(
                    f"{self.shown_as} was not written: {len(rows):,} cells of {key} are NaN, "
                    "infinite or beyond float32's range (cells "
                    f"{rows_named(self.cell_ids, start + rows)})."
                )
        if self.remaining_bytes:
            check_free_space(self.shown_as, self.remaining_bytes)
        for key, block in values.items():
            self.arrays[key][start : start + len(block)] = block
            if self.remaining_bytes:
                self.remaining_bytes -= block.nbytes

    def close(self) -> None:
        if self.path.suffix == ".zarr":
            import zarr

            with _quiet_zarr_consolidation():  # the arrays added after anndata's consolidation
                zarr.consolidate_metadata(self.path)
        else:
            self.reserve_path.unlink(missing_ok=True)  # room for HDF5's last metadata writes
            self.arrays = {}
            root, self.root = self.root, None
            if root is not None:
                root.close()

    def abort(self) -> None:
        """Close an unfinished file so that it can be removed, whatever room the disk has.

        An ``.h5ad`` is truncated to nothing first: the file is discarded anyway, and
        its freed blocks give HDF5 room for what it writes when closing (a close that
        fails on a full disk would crash the interpreter later). The caller removes it.
        """
        if self.path.suffix == ".zarr":
            return
        self.reserve_path.unlink(missing_ok=True)
        self.arrays = {}
        root, self.root = self.root, None
        if root is None:
            return
        with contextlib.suppress(OSError):
            os.truncate(self.path, 0)
        with contextlib.suppress(Exception):  # the file is discarded: only a clean close counts
            root.close()
        gc.collect()  # h5py objects held by the failed frames go now, while the file is closed

    def finish(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        """``__exit__``-style: close the file after a clean run, :meth:`abort` after an error."""
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def _reserve(path: Path, n_bytes: int) -> None:
    """A file that really occupies ``n_bytes`` on disk (not a sparse or compressible one)."""
    with open(path, "wb") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, n_bytes)
        except (AttributeError, OSError):  # no fallocate here: random bytes do not compress
            handle.write(os.urandom(n_bytes))
