"""Loader: class-balanced batches on the device, rank slices, exact resume with prefetch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from scbd_cells.data.loader import BalancedLoader, Batch, CellReader, iter_cells


class ArrayStore:
    """A store stand-in over numpy (same read API as ``open_store``), for loader-only tests."""

    def __init__(self, n_classes: int = 6, cells_per_class: int = 20, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        n_cells = n_classes * cells_per_class
        self.images = rng.integers(0, 60000, size=(n_cells, 2, 4, 4), dtype=np.uint16)
        # Each image carries its own row in pixel (0, 0, 0) so tests can check what was read.
        self.images[:, 0, 0, 0] = np.arange(n_cells)
        self.perturbation = np.repeat(np.arange(n_classes), cells_per_class).astype(np.int32)
        self.batch = rng.integers(0, 3, size=n_cells).astype(np.int32)
        self.obs = pd.DataFrame({"perturbation": self.perturbation})
        self.n_reads = 0

    def read(self, indices: np.ndarray) -> np.ndarray:
        self.n_reads += 1
        assert np.all(np.diff(indices) > 0), "loader should read sorted unique rows"
        return self.images[indices]

    def codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        codes = {"perturbation": self.perturbation, "batch": self.batch}[column]
        return codes, [str(c) for c in np.unique(codes)]


class CountingSampler:
    """Deterministic stand-in sampler: seeded random rows, state = (seed, step)."""

    def __init__(self, n_cells: int, batch_size: int, seed: int) -> None:
        self.n_cells, self.batch_size, self.seed, self.step = n_cells, batch_size, seed, 0

    def next_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        return rng.integers(0, self.n_cells, size=self.batch_size).astype(np.int64)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = state["seed"], state["step"]


def _rows(batch: Batch) -> np.ndarray:
    return batch.images[:, 0, 0, 0].cpu().numpy()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cache_gb", [0.0, 1.0])
def test_batches_hold_the_sampled_cells_and_labels(workers: int, cache_gb: float) -> None:
    store = ArrayStore()
    sampler = CountingSampler(len(store.images), 12, seed=3)
    reference = CountingSampler(len(store.images), 12, seed=3)
    with BalancedLoader(store, sampler, device="cpu", workers=workers, cache_gb=cache_gb) as loader:
        for _ in range(5):
            batch = next(loader)
            expected = reference.next_indices()
            np.testing.assert_array_equal(batch.indices.numpy(), expected)
            np.testing.assert_array_equal(_rows(batch), expected)
            np.testing.assert_array_equal(batch.perturbation.numpy(), store.perturbation[expected])
            np.testing.assert_array_equal(batch.batch.numpy(), store.batch[expected])
            assert batch.images.dtype == torch.int32  # uint16 widened
            assert batch.perturbation.dtype == torch.long
            np.testing.assert_array_equal(
                batch.images.numpy(), store.images[expected].astype(np.int32)
            )


def test_ranks_get_disjoint_slices_that_make_the_global_batch() -> None:
    store = ArrayStore()
    world_size = 3
    loaders = [
        BalancedLoader(
            store,
            CountingSampler(len(store.images), 12, seed=5),
            device="cpu",
            rank=rank,
            world_size=world_size,
            workers=1,
        )
        for rank in range(world_size)
    ]
    reference = CountingSampler(len(store.images), 12, seed=5)
    for _ in range(3):
        parts = [next(loader).indices.numpy() for loader in loaders]
        assert all(len(part) == 4 for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), reference.next_indices())
    for loader in loaders:
        loader.close()


def test_global_batch_not_divisible_by_ranks_is_refused() -> None:
    from scbd_cells.core.errors import InputError

    store = ArrayStore()
    loader = BalancedLoader(
        store, CountingSampler(len(store.images), 10, seed=0), device="cpu", world_size=4
    )
    with pytest.raises(InputError, match="divisible"):
        next(loader)
    loader.close()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_is_exact_despite_prefetch(prefetch: int) -> None:
    store = ArrayStore()
    uninterrupted = BalancedLoader(
        store, CountingSampler(len(store.images), 8, seed=1), device="cpu", prefetch=prefetch
    )
    expected = [next(uninterrupted).indices.numpy() for _ in range(9)]
    uninterrupted.close()

    first = BalancedLoader(
        store, CountingSampler(len(store.images), 8, seed=1), device="cpu", prefetch=prefetch
    )
    seen = [next(first).indices.numpy() for _ in range(4)]
    state = first.state_dict()  # batches 5.. are prefetched but not consumed
    first.close()
    resumed = BalancedLoader(
        store, CountingSampler(len(store.images), 8, seed=99), device="cpu", prefetch=prefetch
    )
    resumed.load_state_dict(state)
    seen += [next(resumed).indices.numpy() for _ in range(5)]
    resumed.close()
    for got, want in zip(seen, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_load_state_dict_mid_stream_drops_prefetched_batches() -> None:
    store = ArrayStore()
    loader = BalancedLoader(
        store, CountingSampler(len(store.images), 8, seed=2), device="cpu", prefetch=3
    )
    next(loader)
    state = loader.state_dict()
    second = next(loader).indices.numpy()
    next(loader)
    loader.load_state_dict(state)
    np.testing.assert_array_equal(next(loader).indices.numpy(), second)
    loader.close()


def test_cell_reader_cache_and_store_agree_on_repeats_and_order() -> None:
    store = ArrayStore()
    rows = np.array([7, 3, 3, 100, 0, 7])
    cached = CellReader(store, cache_gb=1.0)
    assert cached.cached is not None
    uncached = CellReader(store, cache_gb=0.0)
    assert uncached.cached is None
    np.testing.assert_array_equal(cached.read(rows), store.images[rows])
    np.testing.assert_array_equal(uncached.read(rows), store.images[rows])
    tiny_budget = CellReader(store, cache_gb=store.images.nbytes / 2e9)
    assert tiny_budget.cached is None


@pytest.mark.parametrize("workers", [0, 3])
def test_iter_cells_yields_everything_in_order(workers: int) -> None:
    store = ArrayStore()
    order = np.random.default_rng(0).permutation(len(store.images))[:77]
    pieces = list(iter_cells(store, order, batch_size=10, workers=workers))
    assert [len(p[0]) for p in pieces] == [10] * 7 + [7]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), order)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), store.images[order])


def _balanced_loader(store: ArrayStore, *, seed: int, **kwargs) -> BalancedLoader:
    from scbd_cells.data.sampler import BalancedBatchSampler

    rows = np.arange(len(store.images))
    sampler = BalancedBatchSampler(
        store.perturbation, rows, classes_per_batch=3, cells_per_class=4, seed=seed
    )
    return BalancedLoader(store, sampler, device="cpu", **kwargs)


def test_real_sampler_batches_are_balanced_without_duplicates_and_reach_every_cell() -> None:
    store = ArrayStore(n_classes=6, cells_per_class=20)
    seen = set()
    with _balanced_loader(store, seed=0, workers=2, prefetch=3) as loader:
        for _ in range(200):
            batch = next(loader)
            rows = batch.indices.numpy()
            assert len(np.unique(rows)) == len(rows)  # every class has >= 4 cells
            _, counts = np.unique(batch.perturbation.numpy(), return_counts=True)
            assert counts.tolist() == [4, 4, 4]
            np.testing.assert_array_equal(batch.perturbation.numpy(), store.perturbation[rows])
            np.testing.assert_array_equal(_rows(batch), rows)
            seen.update(rows.tolist())
    assert seen == set(range(len(store.images)))


def test_real_sampler_order_is_reproducible_per_seed_and_slices_per_rank() -> None:
    store = ArrayStore()

    def first_batches(seed: int, **kwargs) -> list[np.ndarray]:
        with _balanced_loader(store, seed=seed, **kwargs) as loader:
            return [next(loader).indices.numpy() for _ in range(4)]

    same = first_batches(1, workers=2)
    np.testing.assert_array_equal(np.stack(same), np.stack(first_batches(1, workers=0)))
    assert not np.array_equal(np.stack(same), np.stack(first_batches(2)))
    rank_parts = [first_batches(1, rank=r, world_size=2) for r in range(2)]
    for step in range(4):
        np.testing.assert_array_equal(
            np.concatenate([rank_parts[0][step], rank_parts[1][step]]), same[step]
        )


def test_real_sampler_resume_through_loader_state() -> None:
    store = ArrayStore()
    with _balanced_loader(store, seed=4, prefetch=4) as loader:
        expected = [next(loader).indices.numpy() for _ in range(6)]
    with _balanced_loader(store, seed=4, prefetch=4) as loader:
        for _ in range(2):
            next(loader)
        state = loader.state_dict()
    with _balanced_loader(store, seed=123, prefetch=4) as loader:
        loader.load_state_dict(state)
        for want in expected[2:]:
            np.testing.assert_array_equal(next(loader).indices.numpy(), want)


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory):
    """A small zarr store from ``create_store`` (uint16, 6 genes, chunks of 16 cells)."""
    from scbd_cells.data.store import create_store

    rng = np.random.default_rng(0)
    n_cells = 240
    images = rng.integers(0, 65535, size=(n_cells, 2, 6, 6), dtype=np.uint16)
    obs = pd.DataFrame(
        {
            "gene": [f"g{k}" for k in rng.integers(0, 6, n_cells)],
            "plate": "p1",
            "well": [f"w{k}" for k in rng.integers(0, 4, n_cells)],
        }
    )
    path = tmp_path_factory.mktemp("loader_store") / "store.zarr"
    return create_store(
        path,
        images=images,
        obs=obs,
        channel_names=["a", "b"],
        perturbation_column="gene",
        chunk_cells=16,
    )


@pytest.mark.parametrize("backend", ["memory", "tensorstore", "zarr"])
def test_every_backend_reads_what_the_store_holds(real_store, backend: str) -> None:
    rows = np.array([5, 200, 5, 17, 16, 0, 239, 100])
    reader = CellReader(real_store, backend=backend)
    assert reader.backend == backend
    np.testing.assert_array_equal(reader.read(rows), real_store.images[:][rows])


def test_auto_backend_caches_only_within_budget(real_store) -> None:
    nbytes = real_store.images[:].nbytes
    assert CellReader(real_store, cache_gb=2 * nbytes / 1e9).backend == "memory"
    assert CellReader(real_store, cache_gb=nbytes / 2e9).backend in ("tensorstore", "zarr")


def test_loader_on_a_real_store_gives_store_labels(real_store) -> None:
    from scbd_cells.data.sampler import BalancedBatchSampler

    perturbation, _ = real_store.codes("perturbation")
    batch_codes, _ = real_store.codes("batch")
    sampler = BalancedBatchSampler(
        perturbation, np.arange(real_store.n_cells), classes_per_batch=4, cells_per_class=5, seed=0
    )
    images = real_store.images[:]
    with BalancedLoader(real_store, sampler, device="cpu", cache_gb=0.0) as loader:
        for _ in range(3):
            batch = next(loader)
            rows = batch.indices.numpy()
            np.testing.assert_array_equal(batch.images.numpy(), images[rows].astype(np.int32))
            np.testing.assert_array_equal(batch.perturbation.numpy(), perturbation[rows])
            np.testing.assert_array_equal(batch.batch.numpy(), batch_codes[rows])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cache_gb", [0.0, 1.0])
def test_cuda_batches_are_widened_correct_and_resumable(real_store, cache_gb: float) -> None:
    """On CUDA: pinned side-stream copies give int32 images equal to the store, in order."""
    from scbd_cells.data.sampler import BalancedBatchSampler

    perturbation, _ = real_store.codes("perturbation")
    images = real_store.images[:]

    def loader(seed: int) -> BalancedLoader:
        sampler = BalancedBatchSampler(
            perturbation, np.arange(real_store.n_cells), classes_per_batch=4, cells_per_class=6,
            seed=seed,
        )  # fmt: skip
        return BalancedLoader(real_store, sampler, device="cuda", cache_gb=cache_gb, prefetch=3)

    with loader(0) as first:
        batches = [next(first) for _ in range(5)]
        for batch in batches:
            assert batch.images.is_cuda and batch.images.dtype == torch.int32
            rows = batch.indices.cpu().numpy()
            np.testing.assert_array_equal(batch.images.cpu().numpy(), images[rows])
            index = batch.perturbation.argsort()  # CUDA indexing works on the widened images
            assert batch.images[index].shape == batch.images.shape
        state = first.state_dict()
        following = next(first).indices.cpu().numpy()
    with loader(1) as resumed:
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(resumed.__next__().indices.cpu().numpy(), following)
