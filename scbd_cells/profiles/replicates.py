"""Profiles: label columns and the mean embedding of each group of cells (guide x well, ...).

Shared by ``aggregate_profiles`` (guides and genes), ``evaluate`` (replicate profiles for
copairs' mAP) and ``export`` (profiles for pycytominer and copairs). The one place that
reads a label column (:func:`obs_column`) or a representation by key
(:func:`representation`) and says what is missing. Labels are factorised through their
categories and cells are summed in row chunks, so a backed 1 M-cell file is never loaded
whole and memory holds a few integers a cell besides the groups kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError
from scbd_cells.data import schema
from scbd_cells.data.store import did_you_mean

if TYPE_CHECKING:
    import anndata

    from scbd_cells.profiles.cells import Cells

log = logging.getLogger(__name__)

ROW_CHUNK = 65536


@dataclass(frozen=True)
class CellGroups:
    """Which group each cell belongs to, for the distinct combinations of some obs columns.

    Attributes
    ----------
    codes
        (n_cells,) int64 group of each cell, ``-1`` for a cell in no kept group.
    labels
        One row per group: the obs columns (plain ``str``) in the order given, sorted by
        them, and ``n_cells``.
    """

    codes: np.ndarray
    labels: pd.DataFrame

    def keep(self, groups: np.ndarray) -> CellGroups:
        """Only the groups at positions ``groups`` (sorted, renumbered ``0..len-1``)."""
        groups = np.sort(np.asarray(groups, dtype=np.int64))
        mapping = np.full(len(self.labels) + 1, -1, dtype=np.int64)
        mapping[groups] = np.arange(len(groups))
        codes = mapping[self.codes]  # code -1 reads mapping[-1] == -1
        return CellGroups(codes=codes, labels=self.labels.iloc[groups].reset_index(drop=True))


def obs_column(adata: anndata.AnnData | Cells, key: str, what: str) -> pd.Series:
    """``adata.obs[key]``, or a one-paragraph error naming the columns there are."""
    if key not in adata.obs.columns:
        raise DataError(
            f"The embedding has no {what} column {key!r} in obs (columns: "
            f"{', '.join(map(str, list(adata.obs.columns)[:12]))}). "
            f"{did_you_mean(key, list(adata.obs.columns))}Embed from a store with "
            f"`scbd-cells embed` (which copies the store's cell table), or name the column "
            f"with the {what} option."
        )
    return adata.obs[key]


def check_no_missing(adata: anndata.AnnData | Cells, key: str, *, what: str) -> None:
    """Refuse a label column with missing values (NaN), naming the rows that lack one.

    Read as text, a missing label would become a batch (or group) named ``"nan"``,
    silently pooling unrelated cells.
    """
    missing = np.flatnonzero(pd.isna(adata.obs[key]).to_numpy())
    if not len(missing):
        return
    if isinstance(adata.obs, pd.DataFrame):
        names = [str(adata.obs.index[i]) for i in missing[:5]]
    else:  # a lazily read cells file (ObsColumns)
        names = adata.obs.names_at(missing[:5])
    shown = ", ".join(map(repr, names)) + (
        f" and {len(missing) - 5:,} more" if len(missing) > 5 else ""
    )
    raise DataError(
        f"The {what} column {key!r} is missing for {len(missing):,} of {adata.n_obs:,} cells "
        f"(rows {shown}). Fill in their {what} label, or drop those cells first (e.g. "
        f"adata[adata.obs[{key!r}].notna()].copy())."
    )


def factorize_labels(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``pd.factorize(values.astype(str).to_numpy(), sort=True)`` without a string per cell.

    A categorical column (what ``embed`` writes) is factorised through its categories, so
    memory holds its codes and one int64 per cell rather than a Python string per cell
    (about 70 bytes); other columns take the string path. Missing values become ``"nan"``
    as ``astype(str)`` makes them in pandas 2.
    """
    if not isinstance(values.dtype, pd.CategoricalDtype):
        return pd.factorize(values.astype(str).to_numpy(), sort=True)
    codes = values.cat.codes.to_numpy().astype(np.int64)
    labels = values.cat.categories.astype(str).to_numpy(dtype=object)
    if (codes < 0).any():
        labels = np.append(labels, "nan")
        codes[codes < 0] = len(labels) - 1
    used = np.bincount(codes, minlength=len(labels)) > 0
    label_codes, names = pd.factorize(labels[used], sort=True)  # two categories may read alike
    mapping = np.full(len(labels), -1, dtype=np.int64)
    mapping[used] = label_codes
    return mapping[codes], names


def representation(
    adata: anndata.AnnData | Cells, key: str, *, source: str = "The embedding"
) -> Any:
    """``X`` (``key="X"``) or ``obsm[key]`` as stored, or the one error naming the keys there are.

    ``source`` names the file in the message.
    """
    keys = ", ".join(map(str, adata.obsm.keys())) or "none"
    makers = (
        f"`scbd-cells embed` writes z_c as X and z_s as {schema.OBSM_BATCH_EMBEDDING!r}; "
        f"`scbd-cells baseline` writes the PCA as X and {schema.OBSM_PCA!r}, the features as "
        f"{schema.OBSM_FEATURES!r}"
    )
    if key == "X":
        if adata.X is None:
            raise DataError(
                f"{source} has no X. Name the embedding's obsm key with --key (keys: {keys}); "
                f"{makers}."
            )
        return adata.X
    if key not in adata.obsm:
        raise DataError(
            f"{source} has no obsm key {key!r} (keys: {keys}). Choose one of them or 'X' with "
            f"--key ({makers})."
        )
    return adata.obsm[key]


def batch_column(adata: anndata.AnnData | Cells, batch_key: str) -> str:
    """The obs column that holds the batch label: ``batch_key``, or a comma list joined.

    ``"plate,well"`` names the batch by several columns, as ``ingest --batch-columns``
    does: their values joined with ``_`` become a new column ``plate_well``, whose
    name is returned.
    """
    parts = [part.strip() for part in batch_key.split(",") if part.strip()]
    for part in parts:
        if part in adata.obs.columns:
            check_no_missing(adata, part, what="batch")
    if len(parts) <= 1:
        return batch_key.strip()
    joined = obs_column(adata, parts[0], "batch").astype(str).reset_index(drop=True)
    for part in parts[1:]:
        joined = joined + "_" + obs_column(adata, part, "batch").astype(str).reset_index(drop=True)
    name = "_".join(parts)
    if isinstance(adata.obs, pd.DataFrame):
        adata.obs[name] = joined.to_numpy()
    else:  # a lazily read cells file (ObsColumns)
        adata.obs.add(name, joined)
    return name


def cell_groups(
    adata: anndata.AnnData | Cells, keys: list[str], *, what: dict[str, str] | None = None
) -> CellGroups:
    """Group the cells by the distinct combinations of the obs columns ``keys``.

    Parameters
    ----------
    adata
        Cell-level AnnData (in memory or backed) or
        :class:`~scbd_cells.profiles.cells.Cells`.
    keys
        obs columns; their values are compared as strings.
    what
        For error messages: the option that names each column (e.g. ``{"batch": "batch"}``).
    """
    what = what or {}
    combined = np.zeros(adata.n_obs, dtype=np.int64)
    names: list[np.ndarray] = []
    for key in keys:
        codes, labels = factorize_labels(obs_column(adata, key, what.get(key, key)))
        combined = combined * len(labels) + codes
        names.append(np.asarray(labels, dtype=object))
    distinct, inverse = np.unique(combined, return_inverse=True)
    del combined
    columns: dict[str, np.ndarray] = {}
    rest = distinct
    for key, labels in zip(reversed(keys), reversed(names), strict=True):
        rest, code = np.divmod(rest, len(labels))
        columns[key] = labels[code].astype(str)
    table = pd.DataFrame({key: columns[key] for key in keys})
    table["n_cells"] = np.bincount(inverse, minlength=len(distinct)).astype(np.int64)
    return CellGroups(codes=inverse.astype(np.int64, copy=False), labels=table)


def group_sums(
    data: Any, codes: np.ndarray, n_groups: int, *, chunk_size: int = ROW_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """(n_groups, D) float64 sum of the rows of each group, and the group sizes.

    ``data`` is read ``chunk_size`` rows at a time (numpy, h5py, zarr or anndata sparse);
    a row whose code is ``-1`` is in no group. Written by hand rather than with
    ``pandas.DataFrame.groupby`` or ``scanpy.get.aggregate``: both take the whole matrix in
    memory, where a backed 1 M-cell file holds one chunk at a time here.
    """
    import scipy.sparse as sp

    n_obs, width = int(data.shape[0]), int(data.shape[1])
    sums = np.zeros((n_groups, width), dtype=np.float64)
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        chunk_codes = codes[start:stop]
        used = np.flatnonzero(chunk_codes >= 0)
        if used.size == 0:
            continue
        block = data[start:stop]
        if hasattr(block, "toarray"):
            block = block.toarray()
        indicator = sp.csr_matrix(
            (np.ones(used.size), (chunk_codes[used], used)), shape=(n_groups, stop - start)
        )
        sums += indicator @ np.asarray(block, dtype=np.float64)
    counts = np.bincount(codes[codes >= 0], minlength=n_groups)
    return sums, counts


def group_means(
    adata: anndata.AnnData | Cells,
    groups: CellGroups,
    *,
    use_rep: str = "X",
    chunk_size: int = ROW_CHUNK,
) -> np.ndarray:
    """(n_groups, D) float32 mean of the cells of each group, read ``chunk_size`` rows at a time."""
    data = representation(adata, use_rep)
    sums, counts = group_sums(data, groups.codes, len(groups.labels), chunk_size=chunk_size)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def cap_groups(
    labels: pd.DataFrame, *, by: str, max_groups: int | None, seed: int
) -> np.ndarray:
    """Positions of at most ``max_groups`` rows of ``labels`` for each value of ``by``, seeded.

    Groups are drawn without replacement within each value; the positions come back sorted.
    """
    positions = np.arange(len(labels))
    if max_groups is None:
        return positions
    rng = np.random.default_rng(seed)
    kept = []
    codes, _ = pd.factorize(labels[by].to_numpy(), sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for members in np.split(order, bounds):
        if len(members) > max_groups:
            members = rng.choice(members, size=max_groups, replace=False)
        kept.append(members)
    return np.sort(np.concatenate(kept)) if kept else positions[:0]
