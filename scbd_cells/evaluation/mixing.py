"""Evaluate: how well the wells mix in a cell embedding (scIB's batch-correction metrics).

Four numbers on a seeded subsample of cells, each in [0, 1], higher = better mixed, as the
scIB benchmark (Luecken et al. 2022) and the JUMP batch-correction benchmark define them:

- **iLISI**: the local inverse Simpson index of the well labels in each cell's
  neighbourhood (its 90 nearest other cells, Gaussian weights at perplexity 30, as
  Harmony's ``compute_lisi``), median over cells, scaled to ``(iLISI - 1) / (n_wells - 1)``;
- **silhouette of batch**: within each perturbation, ``1 - |silhouette|`` of the well
  labels (cosine), averaged per perturbation, then over perturbations;
- **graph connectivity**: within each perturbation, the share of its cells in the largest
  connected component of the 15-nearest-neighbour graph, averaged over perturbations;
- **kBET acceptance**: the share of cells whose 50 nearest neighbours' well counts pass a
  chi-square test (alpha 0.05) against the wells' overall frequencies. In a pooled screen
  every well holds the same library of perturbations, so the global test applies (scIB's
  per-label kBET exists for data sets whose batches differ in composition).

Neighbours are exact (``sklearn.neighbors.NearestNeighbors``, Euclidean, each cell its own
first neighbour), computed once and shared; ``tests/test_mixing.py`` checks every number
against ``scib-metrics`` on the same neighbours (and iLISI also against harmonypy's
``compute_lisi``). Neither runs here: importing scib-metrics loads jax (about 0.2 GB and
5 s per process), and harmonypy's LISI searches its own neighbours (50 s for 10,000 cells
on 2 shared cores, against about 1 s for the Gaussian search below).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_MIXING_CELLS = 10_000
LISI_PERPLEXITY = 30
KBET_NEIGHBORS = 50
CONNECTIVITY_NEIGHBORS = 15
KBET_ALPHA = 0.05
# pairwise distances in 64 MB pieces (sklearn's default of 1 GB would set evaluate's peak)
WORKING_MEMORY_MB = 64


@dataclass(frozen=True)
class MixingResult:
    """Batch-mixing metrics of one embedding (higher = better mixed).

    Attributes
    ----------
    ilisi, silhouette_batch, graph_connectivity, kbet
        The four metrics, each in [0, 1].
    n_cells
        Cells in the subsample they were computed on.
    """

    ilisi: float
    silhouette_batch: float
    graph_connectivity: float
    kbet: float
    n_cells: int


def nearest_neighbors(embedding: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean neighbours, each cell first in its own list: (indices, distances)."""
    import sklearn
    from sklearn.neighbors import NearestNeighbors

    with sklearn.config_context(working_memory=WORKING_MEMORY_MB):
        model = NearestNeighbors(n_neighbors=n_neighbors).fit(embedding)
        distances, indices = model.kneighbors(embedding)
    return indices, distances


def lisi(
    indices: np.ndarray,
    distances: np.ndarray,
    labels: np.ndarray,
    *,
    perplexity: float = LISI_PERPLEXITY,
    tol: float = 1e-5,
    max_tries: int = 50,
) -> np.ndarray:
    """Local inverse Simpson index of each cell (Korsunsky et al. 2019), all cells at once.

    ``indices`` / ``distances``: (n_cells, k) neighbours *without* the cell itself. For each
    cell a Gaussian bandwidth is searched (bisection on beta, at most ``max_tries`` steps)
    so that the weights' entropy is ``log(perplexity)``; LISI = 1 / sum over labels of the
    squared label weights (1 = one label around the cell, n = n labels evenly). A cell
    whose weights all vanish gets -1, as in scib-metrics.
    """
    codes, names = pd.factorize(np.asarray(labels).astype(str), sort=True)
    distances = np.asarray(distances, dtype=np.float64)
    n_cells = len(distances)
    target = np.log(perplexity)

    def entropy(beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        weights = np.exp(-distances * beta[:, None])
        total = weights.sum(axis=1)
        safe = np.where(total > 0, total, 1.0)
        h = np.where(
            total > 0, np.log(safe) + beta * (distances * weights).sum(axis=1) / safe, 0.0
        )
        return h, weights / safe[:, None]

    beta = np.ones(n_cells)
    low = np.full(n_cells, -np.inf)
    high = np.full(n_cells, np.inf)
    h, weights = entropy(beta)
    diff = h - target
    for _ in range(max_tries):
        active = np.abs(diff) >= tol
        if not active.any():
            break
        up = active & (diff > 0)
        down = active & (diff <= 0)
        new_beta = beta.copy()
        new_beta[up] = np.where(np.isinf(high[up]), beta[up] * 2, (beta[up] + high[up]) / 2)
        new_beta[down] = np.where(np.isinf(low[down]), beta[down] / 2, (beta[down] + low[down]) / 2)
        low[up] = beta[up]
        high[down] = beta[down]
        beta = new_beta
        h_new, weights_new = entropy(beta)
        h[active], weights[active] = h_new[active], weights_new[active]
        diff = h - target
    per_label = np.zeros((n_cells, len(names)))
    np.add.at(per_label, (np.repeat(np.arange(n_cells), indices.shape[1]), codes[indices].ravel()),
              weights.ravel())
    simpson = np.where(h == 0, -1.0, (per_label**2).sum(axis=1))
    return 1.0 / simpson


def ilisi(indices: np.ndarray, distances: np.ndarray, batches: np.ndarray) -> float:
    """Scaled iLISI: ``(median LISI - 1) / (n_batches - 1)`` over neighbours without self."""
    n_batches = len(np.unique(np.asarray(batches).astype(str)))
    values = lisi(indices, distances, batches)
    return float((np.nanmedian(values) - 1) / (n_batches - 1))


def kbet_acceptance(
    indices: np.ndarray, batches: np.ndarray, *, alpha: float = KBET_ALPHA
) -> float:
    """Share of cells whose neighbours' batch counts pass a chi-square test of the global mix."""
    from scipy.stats import chi2

    codes, names = pd.factorize(np.asarray(batches).astype(str), sort=True)
    n_batches = len(names)
    expected_share = np.bincount(codes, minlength=n_batches) / len(codes)
    neighbour_codes = codes[indices]  # (n_cells, k)
    observed = np.stack([np.bincount(row, minlength=n_batches) for row in neighbour_codes])
    expected = expected_share * indices.shape[1]
    statistic = ((observed - expected) ** 2 / expected).sum(axis=1)
    p_values = chi2.sf(statistic, df=n_batches - 1)
    return float(np.mean(p_values >= alpha))


def graph_connectivity(indices: np.ndarray, labels: np.ndarray) -> float:
    """Mean over labels of the largest connected component's share of the label's cells."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n_cells, k = indices.shape
    graph = sp.csr_matrix(
        (np.ones(n_cells * k), indices.ravel(), np.arange(0, n_cells * k + 1, k)),
        shape=(n_cells, n_cells),
    )
    labels = np.asarray(labels).astype(str)
    shares = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        _, component = connected_components(graph[rows][:, rows], connection="strong")
        shares.append(np.bincount(component).max() / len(rows))
    return float(np.mean(shares))


def silhouette_batch(embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """scIB's batch silhouette: per label ``mean(1 - |s|)`` of the batch labels (cosine).

    Labels whose cells all sit in one batch, or each in its own, are skipped (silhouette
    is undefined there), as scIB does.
    """
    import sklearn
    from sklearn.metrics import silhouette_samples

    labels = np.asarray(labels).astype(str)
    batches = np.asarray(batches).astype(str)
    per_label = []
    with sklearn.config_context(working_memory=WORKING_MEMORY_MB):
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            n_batches = len(np.unique(batches[rows]))
            if n_batches == 1 or n_batches == len(rows):
                continue
            scores = silhouette_samples(embedding[rows], batches[rows], metric="cosine")
            per_label.append(np.mean(1 - np.abs(scores)))
    if not per_label:
        return float("nan")
    return float(np.mean(per_label))


def batch_mixing(embedding: np.ndarray, batches: np.ndarray, labels: np.ndarray) -> MixingResult:
    """The four batch-mixing metrics of a (subsampled) cell embedding.

    Parameters
    ----------
    embedding
        (n_cells, D) cell embedding (the caller subsamples, seeded).
    batches
        (n_cells,) well (batch) of each cell.
    labels
        (n_cells,) perturbation of each cell: silhouette and connectivity are taken within
        each perturbation, so that a perturbation's own effect does not count as a batch.

    Raises
    ------
    DataError
        Fewer than two batches, or too few cells for the neighbourhoods.
    """
    embedding = np.asarray(embedding, dtype=np.float32)
    batches = np.asarray(batches).astype(str)
    n_batches = len(np.unique(batches))
    needed = 3 * LISI_PERPLEXITY + 2
    if n_batches < 2 or len(batches) < needed:
        raise DataError(
            f"Batch-mixing metrics need at least two batches and {needed} cells; found "
            f"{n_batches} batch(es) and {len(batches)} cells. Check the batch column."
        )
    indices, distances = nearest_neighbors(embedding, 3 * LISI_PERPLEXITY + 1)  # self + 90
    return MixingResult(
        ilisi=ilisi(indices[:, 1:], distances[:, 1:], batches),
        silhouette_batch=silhouette_batch(embedding, labels, batches),
        graph_connectivity=graph_connectivity(indices[:, :CONNECTIVITY_NEIGHBORS], labels),
        kbet=kbet_acceptance(indices[:, :KBET_NEIGHBORS], batches),
        n_cells=len(batches),
    )
