"""Sampler: exact batch shape, the class distribution over many draws, small classes, resume."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scbd_cells.data.sampler import BalancedBatchSampler
from scbd_cells.errors import InputError


def _imbalanced_codes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Store rows 0..N-1 with 20 classes of sizes 3..300 (class 0 has only 3 cells)."""
    sizes = np.array([3, *np.linspace(20, 300, 19).astype(int)])
    codes = np.repeat(np.arange(20), sizes)
    rng = np.random.default_rng(seed)
    rng.shuffle(codes)  # classes need not be contiguous in the store
    return codes, sizes


def test_batches_have_exact_classes_and_sizes() -> None:
    codes, _ = _imbalanced_codes()
    train_rows = np.arange(len(codes))[::2]  # a subset of rows: codes of every store row
    sampler = BalancedBatchSampler(
        codes, train_rows, classes_per_batch=7, cells_per_class=5, seed=0
    )
    allowed = set(train_rows.tolist())
    for _ in range(200):
        indices = sampler.next_indices()
        assert indices.dtype == np.int64 and indices.shape == (35,)
        assert set(indices.tolist()) <= allowed
        groups = codes[indices].reshape(7, 5)  # grouped by class
        assert (groups == groups[:, :1]).all()
        assert len(set(groups[:, 0].tolist())) == 7  # distinct classes
        for group_rows in indices.reshape(7, 5):
            if codes[group_rows[0]] != 0:  # classes with >= 5 train cells: no repeats
                assert len(set(group_rows.tolist())) == 5


def test_aligned_codes_are_accepted() -> None:
    codes, _ = _imbalanced_codes()
    rows = np.arange(100, 100 + len(codes))  # codes aligned with these rows
    sampler = BalancedBatchSampler(codes, rows, classes_per_batch=3, cells_per_class=2, seed=0)
    indices = sampler.next_indices()
    assert ((indices >= 100) & (indices < 100 + len(codes))).all()
    assert (codes[indices - 100].reshape(3, 2) == codes[indices - 100].reshape(3, 2)[:, :1]).all()


def test_one_class_per_batch_follows_class_distribution() -> None:
    """With one class per batch, each class is drawn with probability n_k / n (chi-square)."""
    codes, sizes = _imbalanced_codes()
    sampler = BalancedBatchSampler(
        codes, np.arange(len(codes)), classes_per_batch=1, cells_per_class=2, seed=3
    )
    draws = np.array([codes[sampler.next_indices()[0]] for _ in range(4000)])
    observed = np.bincount(draws, minlength=20)
    expected = sizes / sizes.sum() * len(draws)
    assert stats.chisquare(observed, expected).pvalue > 0.001


def test_several_classes_follow_successive_sampling_reference() -> None:
    """Inclusion frequencies equal an independent pure-Python successive-sampling reference."""
    codes, sizes = _imbalanced_codes()
    sampler = BalancedBatchSampler(
        codes, np.arange(len(codes)), classes_per_batch=5, cells_per_class=1, seed=4
    )
    n_draws = 3000
    observed = np.zeros(20)
    for _ in range(n_draws):
        observed[np.unique(codes[sampler.next_indices()])] += 1

    import random

    reference_rng = random.Random(0)
    expected = np.zeros(20)
    n_reference = 20000
    for _ in range(n_reference):
        remaining = list(range(20))
        weights = [float(s) for s in sizes]
        for _ in range(5):
            k = reference_rng.choices(range(len(remaining)), weights=weights)[0]
            expected[remaining.pop(k)] += 1
            weights.pop(k)
    expected_frequency = expected / n_reference
    observed_frequency = observed / n_draws
    # binomial standard error of the observed frequency, plus the reference's own
    error = np.sqrt(expected_frequency * (1 - expected_frequency) / n_draws)
    assert np.all(np.abs(observed_frequency - expected_frequency) < 4 * error + 0.01)
    # and the draw is weighted: the largest class is drawn far more often than the smallest
    assert observed_frequency[19] > 5 * observed_frequency[0]


def test_small_class_is_sampled_with_replacement() -> None:
    codes = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    sampler = BalancedBatchSampler(
        codes, np.arange(8), classes_per_batch=2, cells_per_class=4, seed=0
    )
    assert sampler.n_small_classes == 1
    indices = sampler.next_indices()
    assert indices.shape == (8,)
    assert sorted(set(indices[codes[indices] == 0].tolist())) in ([0], [1], [0, 1])


def test_same_seed_same_batches_and_exact_resume() -> None:
    codes, _ = _imbalanced_codes()
    rows = np.arange(len(codes))
    first = BalancedBatchSampler(codes, rows, classes_per_batch=4, cells_per_class=3, seed=7)
    second = BalancedBatchSampler(codes, rows, classes_per_batch=4, cells_per_class=3, seed=7)
    for _ in range(5):
        np.testing.assert_array_equal(first.next_indices(), second.next_indices())
    state = first.state_dict()
    assert all(isinstance(v, (int, str)) for v in state.values())
    expected = [first.next_indices() for _ in range(3)]
    resumed = BalancedBatchSampler(codes, rows, classes_per_batch=4, cells_per_class=3, seed=0)
    resumed.load_state_dict(state)
    for batch in expected:
        np.testing.assert_array_equal(resumed.next_indices(), batch)
    assert resumed.batches_drawn == 8


def test_too_many_classes_per_batch_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="--classes-per-batch 3 or fewer"):
        BalancedBatchSampler(
            np.array([0, 1, 2]), np.arange(3), classes_per_batch=4, cells_per_class=2, seed=0
        )
