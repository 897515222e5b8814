"""Cells in: one typed reader for every cell-level and profile file the commands take.

:func:`open_cells` opens an AnnData (``.h5ad`` or ``.zarr``) or a pycytominer profile table
(``.parquet``, ``.csv``) as a :class:`Cells`: ``obs``, ``n_obs``, a representation by key
(:meth:`Cells.rep`), label columns (:meth:`Cells.labels`) and what scbd-cells recorded when
it wrote the file (:meth:`Cells.provenance`). ``evaluate``, ``correct`` and ``export`` read
their inputs through it; ``embed`` reads back the cells it wrote to aggregate them.

An AnnData is not loaded: ``anndata.read_h5ad(backed="r")`` leaves ``X`` on disk but reads
all of ``obs`` (every column and the index) and every ``obsm`` array into memory, and
``anndata.read_zarr`` reads everything. For a 1 M-cell ``embed`` output (z_c in ``X``, z_s in
``obsm``, the store's cell table with a unique id and image path per cell) that is about
0.6–1 kB a cell before any work. The commands need two or three ``obs`` columns and one
array, read in row chunks, so the file is opened with h5py / zarr, an ``obs`` column is
read only when it is asked for, and the arrays stay on disk, which
:func:`scbd_cells.profiles.replicates.group_means` and :func:`read_rows` slice a chunk at a
time. A profile table, and an AnnData older than AnnData's element encoding (< 0.7), are
read with pandas / anndata instead (in memory; a legacy ``.h5ad`` backed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.data import schema
from scbd_cells.profiles.profile_tables import is_profile_table, read_profile_table
from scbd_cells.profiles.replicates import obs_column, representation

if TYPE_CHECKING:
    import anndata

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


class Cells:
    """A cell-level (or profile-level) file as the commands read it.

    Made by :func:`open_cells`, on an AnnData file opened lazily (h5py / zarr) or on an
    AnnData in memory (a profile table, a legacy file).

    Attributes
    ----------
    path
        The file.
    obs
        :class:`ObsColumns` (``columns`` and ``[name] -> pandas.Series``) for a lazily
        opened file, the ``obs`` DataFrame otherwise.
    X
        ``X`` (on disk: h5py dataset, zarr array or anndata sparse dataset), or None.
    obsm
        ``{key: array}`` for the array-valued ``obsm`` entries.
    n_obs, n_vars
        Cells (rows) and ``X`` columns.
    """

    def __init__(
        self,
        path: Path,
        *,
        obs: ObsColumns | pd.DataFrame,
        X: Any,  # noqa: N803 (AnnData's name)
        obsm: dict[str, Any],
        n_obs: int,
        n_vars: int,
        root: Any = None,
        adata: anndata.AnnData | None = None,
    ) -> None:
        self.path = path
        self.obs = obs
        self.X = X
        self.obsm = obsm
        self.n_obs = n_obs
        self.n_vars = n_vars
        self._root = root  # the open h5py file / zarr group of a lazily read file
        self._adata = adata  # the AnnData of a file read with anndata or pandas

    @classmethod
    def _on_disk(cls, path: Path, root: Any) -> Cells:
        obs = root["obs"]
        X = _array(root["X"]) if "X" in root else None  # noqa: N806 (AnnData's name)
        var = root["var"] if "var" in root else None
        n_vars = (
            int(var[var.attrs["_index"]].shape[0])
            if var is not None and "_index" in var.attrs
            else (int(X.shape[1]) if X is not None else 0)
        )
        obsm: dict[str, Any] = {}
        if "obsm" in root:
            for key in root["obsm"].keys():
                array = _array(root["obsm"][key])
                if array is not None:
                    obsm[str(key)] = array
        n_obs = int(obs[obs.attrs["_index"]].shape[0])
        return cls(
            path, obs=ObsColumns(obs), X=X, obsm=obsm, n_obs=n_obs, n_vars=n_vars, root=root
        )

    @classmethod
    def _in_memory(cls, path: Path, adata: anndata.AnnData) -> Cells:
        return cls(
            path,
            obs=adata.obs,
            X=adata.X,
            obsm={str(key): adata.obsm[key] for key in adata.obsm.keys()},
            n_obs=int(adata.n_obs),
            n_vars=int(adata.n_vars),
            adata=adata,
        )

    def rep(self, key: str) -> Any:
        """``X`` (``key="X"``) or ``obsm[key]``, as stored; one error when it is not there."""
        return representation(self, key, source=str(self.path))

    def labels(self, key: str, what: str) -> pd.Series:
        """The obs column ``key``; an error naming the columns there are when it is missing."""
        return obs_column(self, key, what)

    @property
    def var_names(self) -> list[str]:
        """The names of ``X``'s columns (``var`` index), or ``[]``."""
        if self._adata is not None:
            return [str(name) for name in self._adata.var_names]
        try:
            var = self._root["var"]
            return [str(name) for name in _read_elem(var[var.attrs["_index"]])]
        except (KeyError, TypeError, ValueError):
            return []

    def provenance(self) -> dict[str, Any]:
        """``uns["scbd"]`` (what scbd-cells recorded when it wrote the file), or ``{}``."""
        if self._adata is not None:
            found = self._adata.uns.get(schema.UNS_SCBD, {})
        else:
            try:
                found = _read_elem(self._root["uns"][schema.UNS_SCBD])
            except (KeyError, TypeError, ValueError):
                found = {}
        return dict(found) if isinstance(found, dict) else {}

    @property
    def control(self) -> str | None:
        """``uns["scbd"]["control"]`` when the file records it, else None."""
        found = self.provenance().get("control")
        return str(found) if found else None

    def to_anndata(self) -> anndata.AnnData:
        """The whole file as an in-memory AnnData (for the commands that need every value)."""
        import anndata as ad

        if self._adata is not None:
            return self._adata.to_memory() if self._adata.isbacked else self._adata
        try:
            if self.path.suffix == ".zarr":
                return ad.read_zarr(self.path)
            return ad.read_h5ad(self.path)
        except Exception as error:  # anndata/h5py/zarr raise many types for a bad file
            raise _unreadable(self.path, error) from None

    def close(self) -> None:
        """Close the file (h5py, a backed AnnData); zarr groups and tables hold no handle."""
        if self._root is not None and hasattr(self._root, "close"):
            self._root.close()
        if self._adata is not None and self._adata.isbacked:
            self._adata.file.close()

    def __enter__(self) -> Cells:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _open_root(path: Path) -> Any:
    if path.suffix == ".zarr":
        import zarr

        return zarr.open_group(path, mode="r")
    import h5py

    return h5py.File(path, "r")


def _open_anndata(path: Path) -> Cells:
    """An AnnData file as :class:`Cells`: lazily, or with anndata when it predates its encoding."""
    import anndata as ad

    root = _open_root(path)
    try:
        if "obs" in root and _encoding(root["obs"]) == "dataframe":
            return Cells._on_disk(path, root)
    except BaseException:
        if hasattr(root, "close"):
            root.close()
        raise
    if hasattr(root, "close"):
        root.close()
    # older than AnnData's element encoding (< 0.7): anndata reads it (.h5ad backed)
    adata = ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path, backed="r")
    return Cells._in_memory(path, adata)


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(
        f"Could not read {path} as AnnData ({type(error).__name__}: {error}). Expected an "
        ".h5ad or .zarr file written by `scbd-cells embed` or `scbd-cells baseline`."
    )


def open_cells(path: str | Path) -> Cells:
    """Open a cell-level AnnData (``.h5ad``, ``.zarr``) or a pycytominer profile table.

    An AnnData is opened without loading it (obs columns read when asked, ``X`` / ``obsm``
    sliced from disk); a profile table (``.parquet``, ``.csv``, ``.csv.gz``) is read in
    memory (:func:`scbd_cells.profiles.profile_tables.read_profile_table`). Close the
    result (or use it as a context manager).

    Raises
    ------
    InputError
        The file does not exist.
    DataError
        It cannot be read as AnnData.
    """
    path = Path(path)
    if is_profile_table(path):
        return Cells._in_memory(path, read_profile_table(path))
    if not path.exists():
        raise InputError(
            f"{path} does not exist. Make cells with `scbd-cells embed RUN_DIR STORE.zarr "
            "--out cells.h5ad` or `scbd-cells baseline STORE.zarr --out baseline.h5ad`, or "
            "pass another tool's cell-level AnnData (.h5ad, .zarr) or a pycytominer table "
            "(.parquet, .csv)."
        )
    try:
        return _open_anndata(path)
    except Exception as error:  # anndata/h5py/zarr raise many types for a bad file
        raise _unreadable(path, error) from None


def read_recorded(path: str | Path, *, what: str) -> dict[str, Any]:
    """What scbd-cells recorded in an AnnData file (its ``uns["scbd"]``), or ``{}``.

    Reads that element only, never ``X``, ``obs`` or ``obsm`` (a reference file may hold
    millions of cells). ``what`` names the file in the errors ("The reference baseline").
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist. Pass an AnnData scbd-cells wrote.")
    with open_cells(path) as cells:
        return cells.provenance()


def close_all(datasets: list[Cells]) -> None:
    """Close the files behind ``datasets``."""
    for cells in datasets:
        cells.close()


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
