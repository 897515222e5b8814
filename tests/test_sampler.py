"""Sampler: exact batch shape, the class distribution over many draws, small classes, resume."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scbd_cells.core.errors import InputError
from scbd_cells.data.sampler import BalancedBatchSampler, equal_allocation


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
    small_draws = []
    for _ in range(400):
        indices = sampler.next_indices()
        assert indices.shape == (8,)
        small, large = indices[codes[indices] == 0], indices[codes[indices] == 1]
        assert len(small) == 4 and len(large) == 4  # the small class still fills its group
        assert set(small.tolist()) <= {0, 1}  # only its own cells, so some repeat
        assert len(set(large.tolist())) == 4  # a class with enough cells never repeats one
        small_draws.extend(small.tolist())
    # with replacement, uniform over its two cells: each about half of the 1,600 draws
    share = np.mean(np.asarray(small_draws) == 0)
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / len(small_draws))


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


# --- stratified draws: each class's cells spread evenly over its batch labels ------------


def _one_at_a_time(counts: list[int], total: int) -> list[int]:
    """Reference: hand out draws one by one to the open group with the fewest (earliest)."""
    quota = [0] * len(counts)
    for _ in range(total):
        open_groups = [g for g in range(len(counts)) if quota[g] < counts[g]]
        quota[min(open_groups, key=lambda g: (quota[g], g))] += 1
    return quota


def test_equal_allocation_equals_one_at_a_time_reference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        counts = rng.integers(1, 12, size=rng.integers(1, 9))
        total = int(rng.integers(0, counts.sum() + 1))
        found = equal_allocation(counts, total)
        assert found.tolist() == _one_at_a_time(counts.tolist(), total), (counts, total)
    with pytest.raises(ValueError):
        equal_allocation(np.array([1, 2]), 4)


def _wells_and_codes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2,000 store rows: 10 classes, 2 wells at random; class 3 has only 12 % in well 1."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 10, 2000)
    wells = rng.integers(0, 2, 2000)
    wells[codes == 3] = rng.random(int((codes == 3).sum())) < 0.12
    return codes, wells.astype(np.int64)


def test_stratified_batches_hold_the_batch_labels_equally() -> None:
    codes, wells = _wells_and_codes()
    rows = np.arange(len(codes))[::2]  # a subset: codes of every store row
    uniform = BalancedBatchSampler(codes, rows, classes_per_batch=8, cells_per_class=16, seed=0)
    stratified = BalancedBatchSampler(
        codes, rows, classes_per_batch=8, cells_per_class=16, seed=0, batch_codes=wells
    )
    assert stratified.stratified and not uniform.stratified
    imbalance = {"uniform": [], "stratified": []}
    for name, sampler in (("uniform", uniform), ("stratified", stratified)):
        for _ in range(300):
            indices = sampler.next_indices()
            assert set(indices.tolist()) <= set(rows.tolist())
            for block in indices.reshape(8, 16):
                assert len(set(codes[block].tolist())) == 1
                assert len(set(block.tolist())) == 16  # distinct cells within a class
                if name == "stratified":
                    counts = np.bincount(wells[block], minlength=2)
                    class_rows = rows[codes[rows] == codes[block[0]]]
                    expected = equal_allocation(np.bincount(wells[class_rows], minlength=2), 16)
                    assert sorted(counts) == sorted(expected)
            imbalance[name].append(abs(int(np.sum(wells[indices] == 0)) - 64))
    # class 3 has fewer than 8 well-1 cells among the rows: its blocks are the only unequal ones
    assert np.mean(imbalance["stratified"]) < 2.5
    assert np.mean(imbalance["uniform"]) > 4


def test_stratified_draw_is_uniform_within_class_and_label() -> None:
    """Each (class, label) group's cells are drawn equally often (chi-square)."""
    codes = np.repeat([0, 1], [40, 40])
    wells = np.tile(np.repeat([0, 1], [10, 30]), 2)  # per class: 10 cells in well 0, 30 in 1
    sampler = BalancedBatchSampler(
        codes, np.arange(80), classes_per_batch=2, cells_per_class=4, seed=5, batch_codes=wells
    )
    draws = np.concatenate([sampler.next_indices() for _ in range(3000)])
    counts = np.bincount(draws, minlength=80)
    for group in (np.arange(0, 10), np.arange(10, 40), np.arange(40, 50), np.arange(50, 80)):
        assert counts[group].sum() == 3000 * 2  # 2 of each class's 4 cells from each well
        assert stats.chisquare(counts[group]).pvalue > 0.001


def test_stratified_sampler_resumes_exactly() -> None:
    codes, wells = _wells_and_codes()
    rows = np.arange(len(codes))
    first = BalancedBatchSampler(
        codes, rows, classes_per_batch=4, cells_per_class=6, seed=7, batch_codes=wells
    )
    for _ in range(3):
        first.next_indices()
    state = first.state_dict()
    expected = [first.next_indices() for _ in range(4)]
    resumed = BalancedBatchSampler(
        codes, rows, classes_per_batch=4, cells_per_class=6, seed=0, batch_codes=wells
    )
    resumed.load_state_dict(state)
    for batch in expected:
        np.testing.assert_array_equal(resumed.next_indices(), batch)


def test_stratified_segment_draws_take_turns_between_labels() -> None:
    """Reading whole segments, a segment's cells queue with the labels taking turns.

    Blocks can still be unequal where a segment's cells of one label run out (its tail),
    but far fewer than without stratifying; every cell is still drawn once per pass.
    """
    codes, wells = _wells_and_codes()
    codes[codes == 3] = 4  # leave out the lopsided class
    order = np.argsort(codes, kind="stable")  # a store sorted by class, as ingest writes it
    codes, wells = codes[order], wells[order]
    unequal, seen = {}, []
    for batch_codes in (None, wells):
        sampler = BalancedBatchSampler(
            codes,
            np.arange(len(codes)),
            classes_per_batch=4,
            cells_per_class=16,
            seed=2,
            batch_codes=batch_codes,
        )
        sampler.use_segments(500)
        found = []
        for _ in range(300):
            indices = sampler.next_indices()
            if batch_codes is not None:
                seen.append(indices)
            for block in indices.reshape(4, 16):
                assert len(set(block.tolist())) == 16
                found.append(abs(int(np.sum(wells[block] == 0)) - 8) > 1)
        unequal[batch_codes is not None] = np.mean(found)
    assert unequal[True] < 0.15 and unequal[True] < unequal[False] / 3, unequal
    drawn = np.concatenate(seen)
    for k in np.unique(codes):
        members = drawn[codes[drawn] == k]
        first_pass = members[: int(np.sum(codes == k))]
        assert len(set(first_pass.tolist())) == len(first_pass)
