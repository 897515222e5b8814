"""Evaluate: CORUM complex prediction from gene profiles (paper appendix A.3).

Cosine similarity of every pair of genes present in the complex file is the
prediction that the two genes share a complex. For each integer percentile p
(80..99 by default) a pair is predicted positive when its similarity is at or
above the p-th percentile of all pair similarities or at or below the
(100 - p)-th. Precision and recall against "share a complex" trace a curve;
its area (trapezoid rule over recall) is the summary number, and the recall at
p = 95 (the two-tailed 5 % / 95 % threshold) is reported beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from scbd_cells.core.errors import DataError
from scbd_cells.evaluation.complexes import Complexes

log = logging.getLogger(__name__)

DEFAULT_PERCENTILES = tuple(range(80, 100))


@dataclass(frozen=True)
class CorumResult:
    """The CORUM precision-recall curve of one embedding.

    Attributes
    ----------
    percentiles
        The p of each point of the curve.
    precision, recall
        Precision and recall at each p.
    auprc
        Area under the curve: trapezoid rule over the points from p = 99 down to p = 80
        (recall increasing). Not normalised by the recall range it spans.
    recall_5_95
        Recall at the two-tailed 5 % / 95 % threshold (p = 95).
    n_genes
        Genes both profiled and in the complex file.
    n_pairs, n_positive_pairs
        Gene pairs, and those sharing a complex.
    """

    percentiles: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    auprc: float
    recall_5_95: float
    n_genes: int
    n_pairs: int
    n_positive_pairs: int


def cosine_similarity_pairs(profiles: np.ndarray) -> np.ndarray:
    """Cosine similarity of every unordered pair (i < j) of rows, in ``triu_indices`` order."""
    profiles = np.asarray(profiles, dtype=np.float64)
    norms = np.linalg.norm(profiles, axis=1, keepdims=True)
    unit = profiles / np.where(norms > 0, norms, 1.0)  # a zero profile is similar to nothing
    rows, cols = np.triu_indices(len(profiles), k=1)
    return (unit @ unit.T)[rows, cols]


def two_tailed_predictions(similarity: np.ndarray, percentile: float) -> np.ndarray:
    """Pairs predicted positive: similarity >= p-th percentile or <= (100 - p)-th percentile."""
    upper = np.percentile(similarity, percentile)
    lower = np.percentile(similarity, 100 - percentile)
    return (similarity >= upper) | (similarity <= lower)


def pr_area(precision: np.ndarray, recall: np.ndarray, percentiles: np.ndarray) -> float:
    """Trapezoid area under the curve, walking from the strictest threshold (largest p) down.

    A lower threshold predicts a superset of pairs, so recall never decreases
    along that walk; ties in recall keep this order.
    """
    order = np.argsort(-np.asarray(percentiles), kind="stable")
    return float(np.trapezoid(np.asarray(precision)[order], np.asarray(recall)[order]))


def corum_pr(
    profiles: np.ndarray,
    genes: list[str],
    complexes: Complexes,
    *,
    percentiles: tuple[int, ...] = DEFAULT_PERCENTILES,
) -> CorumResult:
    """The paper's CORUM precision-recall curve for one set of gene profiles.

    Parameters
    ----------
    profiles
        (n_genes, D) gene profiles (control-subtracted and standardised, as
        :func:`scbd_cells.profiles.aggregate.aggregate_profiles` makes them).
    genes
        Gene symbol of each row.
    complexes
        The complexes (from :func:`scbd_cells.evaluation.complexes.read_complexes`).
    percentiles
        The thresholds p; 95 must be among them for ``recall_5_95``.

    Raises
    ------
    DataError
        Fewer than two profiled genes are in the complex file, or no pair shares a complex.
    """
    genes = [str(g) for g in genes]
    keep = np.array([g in complexes.genes for g in genes], dtype=bool)
    n_genes = int(keep.sum())
    if n_genes < 2:
        example = ", ".join(sorted(genes)[:3])
        raise DataError(
            f"The complexes file {complexes.path} shares {n_genes} gene(s) with the embedding "
            f"({len(genes)} genes, e.g. {example}); CORUM evaluation needs at least two. Check "
            "that both use the same gene symbols (case, species) and that the perturbation "
            "column holds gene symbols."
        )
    kept = [g for g, k in zip(genes, keep, strict=True) if k]
    similarity = cosine_similarity_pairs(np.asarray(profiles)[keep])
    rows, cols = np.triu_indices(n_genes, k=1)
    truth = complexes.share_complex(kept)[rows, cols]
    n_positive = int(truth.sum())
    if n_positive == 0:
        raise DataError(
            f"No two of the {n_genes} profiled genes found in {complexes.path} share a "
            "complex, so recall is undefined. Profile more genes of each complex."
        )
    precision, recall = [], []
    for p in percentiles:
        predicted = two_tailed_predictions(similarity, p)
        true_positive = np.count_nonzero(predicted & truth)
        precision.append(true_positive / max(np.count_nonzero(predicted), 1))
        recall.append(true_positive / n_positive)
    precision_arr, recall_arr = np.array(precision), np.array(recall)
    percentiles_arr = np.asarray(percentiles)
    at_95 = np.flatnonzero(percentiles_arr == 95)
    recall_5_95 = (
        float(recall_arr[at_95[0]])
        if at_95.size
        else float(np.count_nonzero(two_tailed_predictions(similarity, 95) & truth) / n_positive)
    )
    return CorumResult(
        percentiles=percentiles_arr,
        precision=precision_arr,
        recall=recall_arr,
        auprc=pr_area(precision_arr, recall_arr, percentiles_arr),
        recall_5_95=recall_5_95,
        n_genes=n_genes,
        n_pairs=int(similarity.size),
        n_positive_pairs=n_positive,
    )
