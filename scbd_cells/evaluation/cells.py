"""Evaluate: a lazy, read-only view of a cell-level AnnData file (``.h5ad`` or ``.zarr``).

``anndata.read_h5ad(backed="r")`` leaves ``X`` on disk but reads all of ``obs`` (every
column and the index) and every ``obsm`` array into memory, and ``anndata.read_zarr``
reads everything. For a 1 M-cell ``embed`` output (z_c in ``X``, z_s in ``obsm``, the
store's cell table with a unique id and image path per cell) that is about 0.6–1 kB a
cell before any work. Evaluation needs two or three ``obs`` columns and one array, read
in row chunks, so :func:`open_cells` opens the file with h5py / zarr, reads an ``obs``
column only when it is asked for, and hands out the on-disk arrays, which
:func:`scbd_cells.profiles.aggregate.aggregate_profiles` and :func:`read_rows` slice a chunk at a
time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError, InputError

log = logging.getLogger(__name__)

ROW_CHUNK = 65536


def _read_elem(element: Any) -> Any:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(element)


def _sparse_dataset(element: Any) -> Any:
    try:
        from anndata.io import sparse_dataset
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset
    return sparse_dataset(element)


def _encoding(element: Any) -> str:
    return str(element.attrs.get("encoding-type", ""))


def _array(element: Any) -> Any | None:
    """An on-disk array that slices by rows: dense as it is, CSR/CSC through anndata."""
    encoding = _encoding(element)
    if encoding in ("csr_matrix", "csc_matrix"):
        return _sparse_dataset(element)
    if hasattr(element, "shape") and hasattr(element, "dtype") and encoding in ("", "array"):
        return element
    return None  # a data frame or another element that is not an embedding


class ObsColumns:
    """``obs`` read one column at a time: ``columns`` lists them, ``[name]`` reads one.

    Columns read are kept (a categorical column costs its codes: 1–4 bytes a cell).
    """

    def __init__(self, group: Any) -> None:
        self._group = group
        order = group.attrs.get("column-order", [])
        self.columns = pd.Index([str(name) for name in np.atleast_1d(np.asarray(order))])
        self._read: dict[str, pd.Series] = {}

    def add(self, name: str, values: pd.Series) -> None:
        """Add a column computed in memory (e.g. a batch label joined from several columns)."""
        self._read[name] = pd.Series(np.asarray(values), name=name)
        if name not in self.columns:
            self.columns = self.columns.append(pd.Index([name]))

    def names_at(self, positions: np.ndarray) -> list[str]:
        """The obs names (cell ids) of the rows at ``positions``, for messages."""
        index = np.asarray(_read_elem(self._group[self._group.attrs["_index"]]))
        return [str(name) for name in index[np.asarray(positions, dtype=np.int64)]]

    def __getitem__(self, name: str) -> pd.Series:
        if name not in self.columns:
            raise KeyError(name)
        if name not in self._read:
            self._read[name] = pd.Series(_read_elem(self._group[name]), name=name)
        return self._read[name]


class CellsFile:
    """The parts of a cells AnnData that evaluation reads, without loading it.

    Attributes
    ----------
    cells_path
        The file.
    obs
        :class:`ObsColumns` (``columns`` and ``[name] -> pandas.Series``).
    X
        The on-disk ``X`` (h5py dataset, zarr array or anndata sparse dataset), or None.
    obsm
        ``{key: on-disk array}`` for the array-valued ``obsm`` entries.
    n_obs, n_vars
        Cells and ``X`` columns.
    control
        ``uns["scbd"]["control"]`` when the file records it, else None.
    """

    def __init__(self, cells_path: Path, root: Any) -> None:
        self.cells_path = cells_path
        self._root = root
        obs = root["obs"]
        self.obs = ObsColumns(obs)
        self.n_obs = int(obs[obs.attrs["_index"]].shape[0])
        self.X = _array(root["X"]) if "X" in root else None
        var = root["var"] if "var" in root else None
        self.n_vars = (
            int(var[var.attrs["_index"]].shape[0])
            if var is not None and "_index" in var.attrs
            else (int(self.X.shape[1]) if self.X is not None else 0)
        )
        self.obsm: dict[str, Any] = {}
        if "obsm" in root:
            for key in root["obsm"].keys():
                array = _array(root["obsm"][key])
                if array is not None:
                    self.obsm[str(key)] = array
        self.control = self._control(root)
        self.isbacked = True

    @staticmethod
    def _control(root: Any) -> str | None:
        try:
            value = _read_elem(root["uns"]["scbd"]["control"])
        except (KeyError, TypeError, ValueError):
            return None
        return str(value) if value else None

    @property
    def var_names(self) -> list[str]:
        """The names of ``X``'s columns (``var`` index), or ``[]``."""
        try:
            var = self._root["var"]
            return [str(name) for name in _read_elem(var[var.attrs["_index"]])]
        except (KeyError, TypeError, ValueError):
            return []

    def provenance(self) -> dict[str, Any]:
        """``uns["scbd"]`` (what scbd-cells recorded when it wrote the file), or ``{}``."""
        try:
            value = _read_elem(self._root["uns"]["scbd"])
        except (KeyError, TypeError, ValueError):
            return {}
        return dict(value) if isinstance(value, dict) else {}

    def close(self) -> None:
        """Close the file (h5py); zarr groups hold no handle."""
        if hasattr(self._root, "close"):
            self._root.close()


def open_cells(cells_path: Path) -> CellsFile | None:
    """Open a cells AnnData lazily; None when it predates AnnData's element encoding (< 0.7)."""
    if cells_path.suffix == ".zarr":
        import zarr

        root = zarr.open_group(cells_path, mode="r")
    else:
        import h5py

        root = h5py.File(cells_path, "r")
    try:
        if "obs" not in root or _encoding(root["obs"]) != "dataframe":
            if hasattr(root, "close"):
                root.close()
            return None
        return CellsFile(cells_path, root)
    except BaseException:
        if hasattr(root, "close"):
            root.close()
        raise


def read_rows(data: Any, positions: np.ndarray, *, chunk_size: int = ROW_CHUNK) -> np.ndarray:
    """``data[positions]`` as float32, for sorted ``positions``, reading one row chunk at a time.

    Works on numpy arrays, h5py datasets, zarr arrays and anndata sparse datasets; holds
    at most one chunk of ``chunk_size`` rows besides the result.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and np.any(np.diff(positions) < 0):
        raise ValueError("positions must be sorted")
    width = int(data.shape[1])
    out = np.empty((len(positions), width), dtype=np.float32)
    n_rows = int(data.shape[0])
    done = 0
    for start in range(0, n_rows, chunk_size):
        low, high = np.searchsorted(positions, [start, start + chunk_size])
        if low == high:
            continue
        picked = positions[low:high]
        block = data[int(picked[0]) : int(picked[-1]) + 1]
        if hasattr(block, "toarray"):
            block = block.toarray()
        out[done : done + len(picked)] = np.asarray(block)[picked - picked[0]]
        done += len(picked)
    if done != len(positions):
        raise IndexError(f"positions beyond the {n_rows} rows of the array")
    return out


@dataclass(frozen=True)
class ValueCheck:
    """What :func:`check_values` found in an embedding matrix.

    Attributes
    ----------
    n_nonfinite
        NaN, infinite or beyond-float32 entries (infinite once read as float32).
    n_constant_columns, n_columns
        Columns whose finite values are all equal (zero variance), and all columns.
    """

    n_nonfinite: int
    n_constant_columns: int
    n_columns: int

    @property
    def constant(self) -> bool:
        """Every column constant: every cell has the same embedding."""
        return self.n_constant_columns == self.n_columns


def check_values(data: Any, *, chunk_size: int = ROW_CHUNK) -> ValueCheck:
    """Count non-finite entries and constant columns, one row chunk at a time (bounded memory)."""
    n_rows, width = (int(size) for size in data.shape)
    low = np.full(width, np.inf)
    high = np.full(width, -np.inf)
    nonfinite = 0
    for start in range(0, n_rows, chunk_size):
        block = data[start : start + chunk_size]
        block = np.asarray(block.toarray() if hasattr(block, "toarray") else block, np.float64)
        with np.errstate(invalid="ignore"):  # beyond float32: infinite once read as float32
            finite = np.abs(block) <= np.finfo(np.float32).max
        nonfinite += int(block.size - np.count_nonzero(finite))
        low = np.minimum(low, np.where(finite, block, np.inf).min(axis=0, initial=np.inf))
        high = np.maximum(high, np.where(finite, block, -np.inf).max(axis=0, initial=-np.inf))
    constant = int(np.count_nonzero(~(high > low)))
    return ValueCheck(n_nonfinite=nonfinite, n_constant_columns=constant, n_columns=width)


def read_embedding(path: Path) -> Any:
    """Open a cell-level AnnData (``.h5ad`` or ``.zarr``) without loading it, or read a table.

    Returns a :class:`~scbd_cells.evaluation.cells.CellsFile` (obs columns read when
    asked, ``X`` / ``obsm`` sliced from disk); a file older than AnnData's element encoding
    is read with anndata instead (``.h5ad`` backed, ``.zarr`` in memory); a pycytominer
    profile table (``.parquet``, ``.csv``) as an in-memory AnnData
    (:func:`scbd_cells.profiles.profile_tables.read_profile_table`).
    """
    import anndata as ad

    from scbd_cells.profiles.profile_tables import is_profile_table, read_profile_table

    if is_profile_table(path):
        return read_profile_table(path)
    if not path.exists():
        raise InputError(
            f"Embedding {path} does not exist. Make one with `scbd-cells embed RUN_DIR "
            "STORE.zarr --out cells.h5ad` or `scbd-cells baseline STORE.zarr --out baseline.h5ad`."
        )
    try:
        cells = open_cells(path)
        if cells is not None:
            return cells
        if path.suffix == ".zarr":
            return ad.read_zarr(path)
        return ad.read_h5ad(path, backed="r")
    except Exception as error:  # anndata/h5py/zarr raise many types for a bad file
        raise DataError(
            f"Could not read {path} as AnnData ({type(error).__name__}: {error}). Expected an "
            ".h5ad or .zarr file written by `scbd-cells embed` or `scbd-cells baseline`."
        ) from None


def close_all(datasets: list[Any]) -> None:
    """Close the files behind ``datasets`` (CellsFile or backed AnnData); others are left."""
    for adata in datasets:
        if isinstance(adata, CellsFile):
            adata.close()
        elif getattr(adata, "isbacked", False):
            adata.file.close()
