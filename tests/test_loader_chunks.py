"""Stores larger than the cache budget: segment reads and the segment-mode sampler.

The loader then decodes whole store segments (runs of chunks) and the sampler
takes each class's cells segment by segment. These tests check that the
batches keep the paper's contract (class balance, no repeated cell, train rows
only, every cell reachable, seeded, exact resume, rank slices) and that a
class's cells in a batch come from as many wells as uniform sampling gives.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from scbd_cells.core.errors import InputError
from scbd_cells.data import loader as loader_module
from scbd_cells.data.loader import BalancedLoader, SegmentReader, segment_cells_of
from scbd_cells.data.sampler import BalancedBatchSampler
from scbd_cells.data.store import create_store


def _table(n_genes: int, per_gene: np.ndarray, n_wells: int, seed: int) -> pd.DataFrame:
    """Cells grouped by gene and, within a gene, sorted by well (as an input table often is)."""
    rng = np.random.default_rng(seed)
    genes, wells = [], []
    for gene in range(n_genes):
        n = int(per_gene[gene])
        genes += [f"g{gene:02d}"] * n
        wells += sorted(f"w{w:02d}" for w in rng.integers(0, n_wells, n))
    return pd.DataFrame({"gene": genes, "plate": "p1", "well": wells})


@pytest.fixture(scope="module")
def chunked_store(tmp_path_factory: pytest.TempPathFactory):
    """1,200 cells of 9 genes (20..300 cells), 8 wells, 1 x 32 x 32 uint16, chunks of 16 cells.

    A cell is 2 KiB, so with a segment target of 64 KiB a segment is 32 cells (two chunks).
    Pixel (0, 0, 0) holds the cell's table row (0 for gene g00, whose pixels are all zero),
    so tests can check what was read.
    """
    per_gene = np.array([20, 60, 90, 120, 150, 180, 200, 80, 300])
    obs = _table(9, per_gene, 8, seed=0)
    images = np.random.default_rng(1).integers(0, 4000, (len(obs), 1, 32, 32), dtype=np.uint16)
    images[:, 0, 0, 0] = np.arange(len(obs))
    images[:20] = 0  # gene g00 (store rows 0-19): chunk 0 is all zero (and written all the same)
    path = tmp_path_factory.mktemp("chunked") / "store.zarr"
    return create_store(
        path,
        images=images,
        obs=obs,
        channel_names=["dna"],
        perturbation_column="gene",
        split_fractions=(0.7, 0.1, 0.2),
        chunk_cells=16,
    )


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module, "_SEGMENT_TARGET_BYTES", 64 * 1024)


def _train_rows(store) -> np.ndarray:
    return np.flatnonzero(store.obs["split"].astype(str).to_numpy() == "train")


def _sampler(store, *, seed: int, classes: int = 4, cells: int = 8) -> BalancedBatchSampler:
    codes, _ = store.codes("perturbation")
    return BalancedBatchSampler(
        codes, _train_rows(store), classes_per_batch=classes, cells_per_class=cells, seed=seed
    )


def _loader(store, *, seed: int, segments: bool = True, **kwargs) -> BalancedLoader:
    """A loader whose sampler draws segment by segment (``train --sampling segments``)."""
    kwargs.setdefault("cache_gb", 0.5 * store.images.nbytes / 1e9)  # does not fit
    sampler = _sampler(store, seed=seed)
    if segments:
        sampler.use_segments(segment_cells_of(store), world_size=kwargs.get("world_size", 1))
    return BalancedLoader(store, sampler, device="cpu", **kwargs)


# -- reading segments -------------------------------------------------------------------


@pytest.mark.parametrize("shards", [False, True])
def test_segment_reader_returns_any_rows_in_order(tmp_path, small_segments, shards) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60000, (300, 1, 32, 32), dtype=np.uint16)
    obs = pd.DataFrame({"gene": ["a"] * 40 + ["b"] * 260, "plate": "p", "well": "w"})
    images[:40] = 0  # class "a" (store rows 0-39): all-zero chunks, written and read back
    store = create_store(
        tmp_path / "s.zarr",
        images=images,
        obs=obs,
        channel_names=["x"],
        perturbation_column="gene",
        chunk_cells=4 if shards else 16,
        shard_cells=64 if shards else None,
    )
    reader = SegmentReader(store, budget_gb=1e-5, workers=1)  # room for a few segments only
    assert reader.segment_cells == 32
    assert reader.backend == "tensorstore"
    everything = store.images[:]
    np.testing.assert_array_equal(reader.read(np.arange(300)), everything)
    np.testing.assert_array_equal(reader.read(np.arange(37, 293)), everything[37:293])
    for _ in range(5):
        rows = rng.integers(0, 300, 50)
        np.testing.assert_array_equal(reader.read(rows), everything[rows])
    assert reader.kept_bytes <= reader.budget_bytes  # nothing in flight: within the budget


def test_auto_mode_reads_segments_only_when_the_store_does_not_fit(chunked_store) -> None:
    nbytes = chunked_store.images.nbytes
    with _loader(chunked_store, seed=0, cache_gb=2 * nbytes / 1e9) as fits:
        assert fits.backend == "memory"
    with _loader(chunked_store, seed=0) as larger:
        assert larger.backend == "chunks"
        assert larger.sampler.segment_cells == larger.reader.segment_cells
    with _loader(chunked_store, seed=0, segments=False) as rows:
        assert rows.backend in ("tensorstore", "zarr")  # a cells sampler is never switched
        assert rows.sampler.segment_cells is None
    with _loader(chunked_store, seed=0, cache_gb=0.0) as no_budget:
        assert no_budget.backend in ("tensorstore", "zarr")  # no budget: row reads, as before
    with _loader(chunked_store, seed=0, cache_gb=2 * nbytes / 1e9, backend="chunks") as forced:
        assert forced.backend == "chunks"


@pytest.mark.parametrize("segments", [False, True])
def test_the_cache_budget_never_changes_the_batches(chunked_store, segments) -> None:
    """Same store, seed and sampling: the same cells and pixels, whatever --cache-gb."""
    nbytes = chunked_store.images.nbytes
    drawn = {}
    for name, cache_gb in (("fits", 2 * nbytes / 1e9), ("half", nbytes / 2e9), ("none", 0.0)):
        with _loader(chunked_store, seed=4, segments=segments, cache_gb=cache_gb) as loader:
            batches = [next(loader) for _ in range(12)]
        drawn[name] = (
            np.stack([b.indices.numpy() for b in batches]),
            np.stack([b.images.numpy() for b in batches]),
        )
    for name in ("half", "none"):
        np.testing.assert_array_equal(drawn[name][0], drawn["fits"][0])
        np.testing.assert_array_equal(drawn[name][1], drawn["fits"][1])


# -- batches ------------------------------------------------------------------------------


def test_batches_are_balanced_unique_train_only_and_reach_every_cell(chunked_store, small_segments):
    codes, _ = chunked_store.codes("perturbation")
    train = _train_rows(chunked_store)
    table_row = chunked_store.obs["table_row"].to_numpy()
    pixels_row = np.where(table_row < 20, 0, table_row)
    seen: set[int] = set()
    with _loader(chunked_store, seed=0, workers=2, prefetch=3) as loader:
        assert loader.backend == "chunks"
        for _ in range(150):
            batch = next(loader)
            rows = batch.indices.numpy()
            assert rows.shape == (32,)
            assert len(np.unique(rows)) == 32  # no class here is smaller than 8 train cells
            groups = codes[rows].reshape(4, 8)
            assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 4
            assert np.isin(rows, train).all()
            np.testing.assert_array_equal(batch.perturbation.numpy(), codes[rows])
            np.testing.assert_array_equal(batch.images[:, 0, 0, 0].numpy(), pixels_row[rows])
            seen.update(rows.tolist())
        decoded = loader.reader.decoded_segments
    assert seen == set(train.tolist())  # 4,800 draws cover each of the ~840 train cells
    # about one decode per cell: a 32-row segment holds ~22 train cells, and each is used
    # (row reads would decode a chunk for nearly every cell drawn)
    assert 150 * 32 / decoded > 16


def test_segment_draw_keeps_the_class_distribution(chunked_store) -> None:
    """One class per batch: class k is drawn with probability n_k / n (chi-square)."""
    from scipy import stats

    codes, _ = chunked_store.codes("perturbation")
    sampler = _sampler(chunked_store, seed=3, classes=1, cells=4)
    sampler.use_segments(32)
    draws = np.array([codes[sampler.next_indices()[0]] for _ in range(3000)])
    train_counts = np.bincount(codes[_train_rows(chunked_store)], minlength=9)
    expected = train_counts / train_counts.sum() * len(draws)
    assert stats.chisquare(np.bincount(draws, minlength=9), expected).pvalue > 0.001


def test_small_classes_keep_sampling_with_replacement() -> None:
    codes = np.repeat([0, 1, 2], [3, 40, 40])
    sampler = BalancedBatchSampler(
        codes, np.arange(83), classes_per_batch=3, cells_per_class=8, seed=0
    )
    sampler.use_segments(16)
    for _ in range(20):
        rows = sampler.next_indices()
        assert rows.shape == (24,)
        small = rows[codes[rows] == 0]
        assert len(small) == 8 and set(small.tolist()) <= {0, 1, 2}
        for k in (1, 2):
            assert len(np.unique(rows[codes[rows] == k])) == 8


def test_single_segment_class_never_repeats_a_cell_across_a_pass_boundary() -> None:
    codes = np.repeat([0, 1], [10, 10])  # each class is one segment of 10 rows
    sampler = BalancedBatchSampler(
        codes, np.arange(20), classes_per_batch=2, cells_per_class=8, seed=1
    )
    sampler.use_segments(32)
    for _ in range(100):
        rows = sampler.next_indices()
        assert len(np.unique(rows)) == 16


def test_order_is_reproducible_per_seed(chunked_store, small_segments) -> None:
    def first(seed: int, **kwargs) -> np.ndarray:
        with _loader(chunked_store, seed=seed, **kwargs) as loader:
            return np.stack([next(loader).indices.numpy() for _ in range(8)])

    same = first(5, workers=2)
    np.testing.assert_array_equal(same, first(5, workers=0))
    assert not np.array_equal(same, first(6))


def test_resume_equals_an_uninterrupted_run(chunked_store, small_segments) -> None:
    with _loader(chunked_store, seed=4, prefetch=3) as loader:
        expected = [next(loader) for _ in range(40)]
    with _loader(chunked_store, seed=4, prefetch=3) as loader:
        for _ in range(17):
            next(loader)
        state = loader.state_dict()
    buffer = io.BytesIO()
    torch.save({"sampler": state}, buffer)  # as in a checkpoint
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["sampler"]
    with _loader(chunked_store, seed=99, prefetch=3) as resumed:
        resumed.load_state_dict(state)
        for want in expected[17:]:
            got = next(resumed)
            np.testing.assert_array_equal(got.indices.numpy(), want.indices.numpy())
            np.testing.assert_array_equal(got.images.numpy(), want.images.numpy())


def test_ranks_read_disjoint_slices_of_one_global_batch(chunked_store, small_segments) -> None:
    with _loader(chunked_store, seed=2) as single:
        global_batches = [next(single).indices.numpy() for _ in range(30)]
    codes, _ = chunked_store.codes("perturbation")
    parts = []
    for rank in range(2):
        with _loader(chunked_store, seed=2, rank=rank, world_size=2) as loader:
            parts.append([next(loader).indices.numpy() for _ in range(30)])
    home = 0
    for step in range(30):
        joined = np.concatenate([parts[0][step], parts[1][step]])
        assert len(np.unique(joined)) == 32
        # the same cells as one process draws, class groups ordered by home rank
        np.testing.assert_array_equal(np.sort(joined), np.sort(global_batches[step]))
        home += sum(int((codes[parts[r][step]] % 2 == r).sum()) for r in range(2))
    assert home / (30 * 32) > 0.75  # most classes land on their home rank


def test_resume_under_another_budget_keeps_the_segment_draw(chunked_store, small_segments) -> None:
    with _loader(chunked_store, seed=4) as loader:
        expected = [next(loader).indices.numpy() for _ in range(12)]
    with _loader(chunked_store, seed=4) as loader:
        for _ in range(5):
            next(loader)
        state = loader.state_dict()
    with _loader(chunked_store, seed=4, cache_gb=1.0) as memory:  # now it fits
        assert memory.backend == "memory"
        memory.load_state_dict(state)
        for want in expected[5:]:
            np.testing.assert_array_equal(next(memory).indices.numpy(), want)


def test_repeated_rows_are_refused_in_segment_mode() -> None:
    sampler = BalancedBatchSampler(
        np.zeros(4, int), np.array([0, 1, 1, 2]), classes_per_batch=1, cells_per_class=2, seed=0
    )
    with pytest.raises(InputError, match="distinct"):
        sampler.use_segments(2)


# -- wells: batches must not correlate a class with a well ------------------------------------


def _mean_wells_per_group(sampler: BalancedBatchSampler, wells: np.ndarray, n: int) -> float:
    per_group = []
    for _ in range(n):
        groups = sampler.next_indices().reshape(sampler.classes_per_batch, -1)
        per_group += [len(np.unique(wells[group])) for group in groups]
    return float(np.mean(per_group))


def test_a_class_cells_come_from_as_many_wells_as_under_uniform_sampling(tmp_path) -> None:
    """Statistical (seeded): segment draws see as many wells per class group as uniform draws.

    The input table lists each gene's cells sorted by well, as plate-by-plate
    pipelines do; the store shuffles the cells within each class at ingest, so a
    32-row segment is a random sample of its class. The same check on the
    unshuffled order shows what it guards against: there a segment holds one or
    two wells.
    """
    per_gene = np.full(6, 640)
    obs = _table(6, per_gene, 16, seed=2)
    images = np.zeros((len(obs), 1, 2, 2), np.uint8)
    store = create_store(
        tmp_path / "wells.zarr", images=images, obs=obs, channel_names=["x"],
        perturbation_column="gene", chunk_cells=32,
    )  # fmt: skip
    codes, _ = store.codes("perturbation")
    wells = store.obs["well"].astype(str).to_numpy()
    rows = _train_rows(store)

    def sampler(seed: int) -> BalancedBatchSampler:
        return BalancedBatchSampler(codes, rows, classes_per_batch=3, cells_per_class=8, seed=seed)

    uniform = _mean_wells_per_group(sampler(0), wells, 300)
    segmented = sampler(0)
    segmented.use_segments(32)
    by_segments = _mean_wells_per_group(segmented, wells, 300)
    # 900 groups each: the standard error of either mean is about 0.03 wells
    assert abs(by_segments - uniform) < 0.2, (by_segments, uniform)

    # Power: the same draw on an unshuffled layout (rows of a class sorted by well)
    unshuffled = wells.copy()
    for k in np.unique(codes):
        members = np.flatnonzero(codes == k)
        unshuffled[members] = np.sort(wells[members])
    segmented = sampler(0)
    segmented.use_segments(32)
    assert _mean_wells_per_group(segmented, unshuffled, 300) < uniform - 2
