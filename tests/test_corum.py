"""CORUM PR protocol checked against sklearn and numpy on the same binary predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score
from sklearn.metrics.pairwise import cosine_similarity

from scbd_cells.errors import DataError
from scbd_cells.evaluation.complexes import read_complexes
from scbd_cells.evaluation.corum import corum_pr


@pytest.fixture
def complexes(tmp_path: Path):
    path = tmp_path / "c.tsv"
    path.write_text("c1\tG0 G1 G2 G3\nc2\tG4 G5 G6\nc3\tG7 G8 G9 G10 G11\nc4\tG3 G12\n")
    return read_complexes(path)


def test_matches_sklearn_and_trapezoid(complexes) -> None:
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(16)]  # G13..G15 are in no complex and are dropped
    profiles = rng.normal(size=(16, 8))
    profiles[:4] += 2 * rng.normal(size=8)  # c1 shares a direction
    result = corum_pr(profiles, genes, complexes)

    kept = profiles[:13]
    similarity = cosine_similarity(kept)
    rows, cols = np.triu_indices(13, k=1)
    pair_sim = similarity[rows, cols]
    groups = [{0, 1, 2, 3}, {4, 5, 6}, {7, 8, 9, 10, 11}, {3, 12}]
    truth = np.array(
        [any(i in g and j in g for g in groups) for i, j in zip(rows, cols, strict=True)]
    )
    assert result.n_genes == 13 and result.n_pairs == 78
    assert result.n_positive_pairs == truth.sum()
    for k, p in enumerate(range(80, 100)):
        hi, lo = np.percentile(pair_sim, p), np.percentile(pair_sim, 100 - p)
        predicted = (pair_sim >= hi) | (pair_sim <= lo)
        assert result.precision[k] == pytest.approx(
            precision_score(truth, predicted, zero_division=0)
        )
        assert result.recall[k] == pytest.approx(recall_score(truth, predicted))
    assert np.all(np.diff(result.recall[::-1]) >= 0)  # p = 99 -> 80: recall grows
    assert result.auprc == pytest.approx(np.trapezoid(result.precision[::-1], result.recall[::-1]))
    assert result.recall_5_95 == result.recall[15]


def test_signal_beats_noise(complexes) -> None:
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(13)]
    noise = rng.normal(size=(13, 16))
    signal = noise.copy()
    for members in ([0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]):
        signal[members] += 3 * rng.normal(size=16)
    assert (
        corum_pr(signal, genes, complexes).recall_5_95
        > corum_pr(noise, genes, complexes).recall_5_95
    )


def test_no_shared_genes(complexes) -> None:
    with pytest.raises(DataError, match="shares 0 gene"):
        corum_pr(np.ones((3, 4)), ["A", "B", "C"], complexes)
