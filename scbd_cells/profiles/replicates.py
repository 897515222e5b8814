"""Profiles: the mean embedding of each group of cells (guide x well, well, gene x well).

Shared by ``evaluate`` (replicate profiles for copairs' mAP) and ``export`` (profiles for
pycytominer and copairs). Labels are factorised through their categories and cells are
summed in row chunks, so a backed 1 M-cell file is never loaded whole and memory holds a
few integers a cell besides the groups kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError
from scbd_cells.data.store import did_you_mean
from scbd_cells.profiles.aggregate import check_no_missing, factorize_labels

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


def obs_column(adata: Any, key: str, what: str) -> pd.Series:
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


def batch_column(adata: Any, batch_key: str) -> str:
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


def cell_groups(adata: Any, keys: list[str], *, what: dict[str, str] | None = None) -> CellGroups:
    """Group the cells by the distinct combinations of the obs columns ``keys``.

    Parameters
    ----------
    adata
        Cell-level AnnData (in memory or backed) or a
        :class:`~scbd_cells.evaluation.cells.CellsFile`.
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


def _embedding(adata: Any, use_rep: str) -> Any:
    if use_rep == "X":
        if adata.X is None:
            raise DataError("The embedding has no X; name an obsm key with --key.")
        return adata.X
    if use_rep not in adata.obsm:
        raise DataError(
            f"The embedding has no obsm key {use_rep!r} (keys: "
            f"{', '.join(adata.obsm.keys()) or 'none'}). Pick one of those (or 'X') with --key."
        )
    return adata.obsm[use_rep]


def group_means(
    adata: Any, groups: CellGroups, *, use_rep: str = "X", chunk_size: int = ROW_CHUNK
) -> np.ndarray:
    """(n_groups, D) float32 mean of the cells of each group, read ``chunk_size`` rows at a time."""
    import scipy.sparse as sp

    data = _embedding(adata, use_rep)
    n_obs, width = int(data.shape[0]), int(data.shape[1])
    n_groups = len(groups.labels)
    sums = np.zeros((n_groups, width), dtype=np.float64)
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        codes = groups.codes[start:stop]
        used = np.flatnonzero(codes >= 0)
        if used.size == 0:
            continue
        block = data[start:stop]
        if hasattr(block, "toarray"):
            block = block.toarray()
        indicator = sp.csr_matrix(
            (np.ones(used.size), (codes[used], used)), shape=(n_groups, stop - start)
        )
        sums += indicator @ np.asarray(block, dtype=np.float64)
    counts = np.bincount(groups.codes[groups.codes >= 0], minlength=n_groups)
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
