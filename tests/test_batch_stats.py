"""Per-well channel statistics and per-well normalisation, against numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from scbd_cells.core.errors import DataError
from scbd_cells.data.batch_stats import BatchChannelStats, batch_channel_stats
from scbd_cells.data.store import create_store, open_store
from scbd_cells.model.preprocess import Preprocessor, preprocessor_for


@pytest.fixture(scope="module")
def well_store(tmp_path_factory: pytest.TempPathFactory):
    """600 cells in 3 wells with their own gain and offset, 2 channels, small chunks."""
    rng = np.random.default_rng(3)
    n = 600
    wells = np.array(["A01", "A02", "B01"])[rng.integers(0, 3, n)]
    gain = {"A01": 1.0, "A02": 1.6, "B01": 0.7}
    offset = {"A01": 100, "A02": 400, "B01": 250}
    base = rng.gamma(2.0, 300.0, size=(n, 2, 8, 8))
    images = np.stack([base[i] * gain[w] + offset[w] for i, w in enumerate(wells)])
    obs = pd.DataFrame(
        {
            "cell_id": [f"c{i}" for i in range(n)],
            "gene": np.array(["g1", "g2", "g3", "nt"])[np.arange(n) % 4],
            "guide": [f"s{i % 8}" for i in range(n)],
            "plate": "P1",
            "well": wells,
        }
    )
    path = tmp_path_factory.mktemp("wells") / "screen.zarr"
    create_store(
        path,
        images=np.rint(images).astype(np.uint16),
        obs=obs,
        channel_names=["dna", "actin"],
        perturbation_column="gene",
        guide_column="guide",
        control="nt",
        chunk_cells=16,
    )
    return open_store(path)


def _numpy_stats(store) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images = store.read(np.arange(store.n_cells)).astype(np.float64)
    codes, labels = store.codes("batch")
    mean = np.stack([images[codes == c].mean(axis=(0, 2, 3)) for c in range(len(labels))])
    std = np.stack([images[codes == c].std(axis=(0, 2, 3)) for c in range(len(labels))])
    return mean, std, [str(label) for label in labels]


def test_exact_when_the_store_fits(well_store) -> None:
    stats = batch_channel_stats(well_store)
    mean, std, labels = _numpy_stats(well_store)
    assert stats.labels == labels
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(stats.std, std, rtol=1e-8)
    assert stats.n_cells.sum() == well_store.n_cells


def test_sampled_whole_chunks_are_seeded_and_close(well_store) -> None:
    stats = batch_channel_stats(well_store, cells_per_batch=60, seed=1)
    again = batch_channel_stats(well_store, cells_per_batch=60, seed=1)
    np.testing.assert_array_equal(stats.mean, again.mean)
    assert (stats.n_cells >= 60).all() and stats.n_cells.sum() < well_store.n_cells
    mean, std, _ = _numpy_stats(well_store)
    # 60+ cells x 64 pixels: within a few percent of the full-store values
    np.testing.assert_allclose(stats.mean, mean, rtol=0.06)
    np.testing.assert_allclose(stats.std, std, rtol=0.12)
    with pytest.raises(ValueError, match="at least 1"):
        batch_channel_stats(well_store, cells_per_batch=0)


def test_per_well_preprocessing_removes_gain_and_offset(well_store) -> None:
    stats = batch_channel_stats(well_store)
    preprocessor = preprocessor_for(
        well_store.codes("batch")[1],
        channel_stats=well_store.channel_stats,
        image_size=8,
        batch_stats=stats,
    )
    codes, _ = well_store.codes("batch")
    images = well_store.read(np.arange(well_store.n_cells)).astype(np.int32)
    out = preprocessor(torch.from_numpy(images), torch.from_numpy(codes.astype(np.int64)))
    mean, std, _ = _numpy_stats(well_store)
    expected = (images - mean[codes][:, :, None, None]) / std[codes][:, :, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
    # every well now has mean 0 and std 1 per channel: the well's brightness is gone
    for code in range(3):
        well = out.numpy()[codes == code]
        np.testing.assert_allclose(well.mean(axis=(0, 2, 3)), 0, atol=1e-4)
        np.testing.assert_allclose(well.std(axis=(0, 2, 3)), 1, atol=1e-4)
    with pytest.raises(ValueError, match="batch codes"):
        preprocessor(torch.from_numpy(images[:2]))


def test_store_mode_and_bad_statistics(well_store) -> None:
    plain = Preprocessor(well_store.channel_stats, image_size=8)
    images = torch.from_numpy(well_store.read(np.arange(4)).astype(np.int32))
    codes = torch.zeros(4, dtype=torch.int64)
    torch.testing.assert_close(plain(images), plain(images, codes))  # codes are ignored
    assert plain.batch_mean is None
    with pytest.raises(ValueError, match="both"):
        Preprocessor(well_store.channel_stats, image_size=8, batch_mean=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"\(n_batches, 2\)"):
        Preprocessor(
            well_store.channel_stats,
            image_size=8,
            batch_mean=np.zeros((3, 5)),
            batch_std=np.ones((3, 5)),
        )
    stats = batch_channel_stats(well_store)
    round_trip = BatchChannelStats.from_dict(stats.to_dict())
    np.testing.assert_array_equal(round_trip.mean, stats.mean)
    with pytest.raises(DataError, match="P9_Z99"):
        stats.rows_for(["P9_Z99"])


class _CountingStore:
    """A store that counts the rows read from it."""

    def __init__(self, store) -> None:
        self._store, self.rows_read = store, 0

    def read(self, rows):
        self.rows_read += len(rows)
        return self._store.read(rows)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_rare_well_is_read_row_by_row_not_by_scanning(tmp_path) -> None:
    rng = np.random.default_rng(5)
    n = 2000
    wells = np.where(rng.random(n) < 0.005, "C01", np.where(rng.random(n) < 0.5, "A01", "A02"))
    n_rare = int((wells == "C01").sum())
    assert 3 <= n_rare <= 30
    obs = pd.DataFrame(
        {
            "cell_id": [f"c{i}" for i in range(n)],
            "gene": np.array(["g1", "g2", "nt"])[np.arange(n) % 3],
            "guide": [f"s{i % 6}" for i in range(n)],
            "plate": "P1",
            "well": wells,
        }
    )
    images = rng.integers(0, 1000, size=(n, 1, 4, 4)).astype(np.uint16)
    images[wells == "C01"] += 3000  # the rare well is much brighter
    path = tmp_path / "rare.zarr"
    create_store(
        path,
        images=images,
        obs=obs,
        channel_names=["dna"],
        perturbation_column="gene",
        guide_column="guide",
        control="nt",
        chunk_cells=16,
    )
    store = _CountingStore(open_store(path))
    stats = batch_channel_stats(store, cells_per_batch=50)
    # every cell of the rare well, and far less than the whole store
    rare = stats.labels.index("P1_C01")
    assert stats.n_cells[rare] == n_rare
    assert store.rows_read < n / 4
    mean, _, _ = _numpy_stats(store)
    np.testing.assert_allclose(stats.mean[rare], mean[rare], rtol=1e-10)
