"""The store: create_store / open_store, the read API, layout, split, statistics, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scbd_cells.core.errors import DataError, InputError, StoreError
from scbd_cells.data import schema
from scbd_cells.data.store import (
    ChannelStats,
    StoreWriter,
    create_store,
    finalise_obs,
    label_table,
    open_store,
    partial_path_of,
)

GENES = ["ATP5", "nontargeting", "POLR2", "RPL3", "SDHA"]


def make_cells(n: int = 300, *, seed: int = 0, size: int = 8, channels: int = 3):
    """Random uint16 images and a table with genes, guides, plates, wells and metadata."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60_000, size=(n, channels, size, size), dtype=np.uint16)
    genes = rng.choice(GENES, size=n, p=[0.15, 0.4, 0.15, 0.2, 0.1])
    table = pd.DataFrame(
        {
            "cell_id": [f"cell{i:04d}" for i in range(n)],
            "gene": genes,
            "guide": [f"{g}_{k}" for g, k in zip(genes, rng.integers(1, 3, n), strict=True)],
            "plate": rng.choice(["P1", "P2"], n),
            "well": rng.choice(["A01", "B02", "C03"], n),
            "area": rng.normal(100, 10, n),
            "phase": pd.Categorical(rng.choice(["G1", "S"], n), categories=["G1", "S", "M"]),
        }
    )
    return images, table


@pytest.fixture
def cells():
    return make_cells()


@pytest.fixture
def store(cells, tmp_path: Path):
    images, table = cells
    return create_store(
        tmp_path / "s.zarr",
        images=images,
        obs=table,
        channel_names=["dna", "actin", "tubulin"],
        perturbation_column="gene",
        guide_column="guide",
        control="nontargeting",
        chunk_cells=16,
    )


def test_attributes_and_fingerprint(store) -> None:
    assert store.format_version == schema.STORE_FORMAT_VERSION
    assert (store.n_cells, store.n_channels, store.image_size) == (300, 3, (8, 8))
    assert store.dtype == np.uint16 and store.images.dtype == np.uint16
    assert store.images.shape == (300, 3, 8, 8)
    assert isinstance(store.images[3:7], np.ndarray)
    assert store.channel_names == ["dna", "actin", "tubulin"]
    assert store.control == "nontargeting"
    fingerprint = store.fingerprint()
    assert set(fingerprint) == {"n_channels", "image_size", "dtype", "channel_names", "store_id"}
    assert fingerprint["dtype"] == "uint16" and fingerprint["image_size"] == [8, 8]
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert store.provenance["version"]
    assert store.path.name == "s.zarr"


def test_obs_labels_match_the_table(cells, store) -> None:
    _, table = cells
    obs = store.obs
    assert list(obs.columns[:5]) == [
        schema.CELL_ID,
        schema.PERTURBATION,
        schema.GUIDE,
        schema.BATCH,
        schema.SPLIT,
    ]
    assert {"gene", "plate", "well", "area"} <= set(obs.columns)
    assert list(obs.index) == list(obs[schema.CELL_ID]) and obs.index.is_unique
    for name in (schema.PERTURBATION, schema.GUIDE, schema.BATCH, schema.SPLIT):
        assert isinstance(obs[name].dtype, pd.CategoricalDtype)
    source = table.set_index("cell_id").loc[obs.index]
    assert (obs[schema.PERTURBATION].astype(str).to_numpy() == source["gene"].to_numpy()).all()
    assert (obs[schema.GUIDE].astype(str).to_numpy() == source["guide"].to_numpy()).all()
    expected_batch = (source["plate"] + "_" + source["well"]).to_numpy()
    assert (obs[schema.BATCH].astype(str).to_numpy() == expected_batch).all()
    np.testing.assert_allclose(obs["area"].to_numpy(), source["area"].to_numpy())
    assert obs["phase"].cat.categories.tolist() == ["G1", "S", "M"]  # vocabulary kept
    assert (obs["phase"].astype(str).to_numpy() == source["phase"].astype(str).to_numpy()).all()
    assert sorted(obs.index) == sorted(table["cell_id"])


def test_read_returns_the_requested_rows_in_order(cells, store) -> None:
    images, table = cells
    row_of = {cell: i for i, cell in enumerate(table["cell_id"])}
    source_rows = np.array([row_of[cell] for cell in store.obs.index])
    rng = np.random.default_rng(1)
    for indices in (
        rng.integers(0, 300, 50),  # random, with repeats
        np.arange(40, 90),  # contiguous, crossing chunks
        np.array([299, 0, 17, 16, 15]),  # unsorted, chunk borders
        np.array([5]),
    ):
        np.testing.assert_array_equal(store.read(indices), images[source_rows[indices]])
    np.testing.assert_array_equal(store.images[10:20], images[source_rows[10:20]])
    assert store.read(np.array([], dtype=np.int64)).shape == (0, 3, 8, 8)
    with pytest.raises(InputError):
        store.read([300])


def test_cells_are_grouped_by_perturbation_and_shuffled_within(store) -> None:
    ranges = store.class_ranges()
    assert sorted(ranges) == sorted(GENES)
    perturbation = store.obs[schema.PERTURBATION].astype(str).to_numpy()
    starts = sorted(ranges.values())
    assert starts[0][0] == 0 and starts[-1][1] == store.n_cells
    assert all(a[1] == b[0] for a, b in zip(starts, starts[1:], strict=False))
    for name, (start, stop) in ranges.items():
        assert (perturbation[start:stop] == name).all()
    # within a class the table order is shuffled (wells mix), deterministically
    rows = store.obs["cell_id"].str[4:].astype(int).to_numpy()
    start, stop = ranges["nontargeting"]
    assert not (np.diff(rows[start:stop]) > 0).all()


def test_codes(store) -> None:
    codes, categories = store.codes(schema.PERTURBATION)
    assert codes.dtype == np.int32 and codes.shape == (store.n_cells,)
    assert categories == sorted(GENES)
    labels = np.asarray(categories)[codes]
    assert (labels == store.obs[schema.PERTURBATION].astype(str).to_numpy()).all()
    batch_codes, batches = store.codes(schema.BATCH)
    assert len(batches) == 6 and batch_codes.max() == 5
    well_codes, wells = store.codes("well")  # a plain metadata column
    assert wells == ["A01", "B02", "C03"]
    assert (np.asarray(wells)[well_codes] == store.obs["well"].to_numpy()).all()
    with pytest.raises(InputError, match="no column"):
        store.codes("nope")


def test_labels_are_read_without_the_rest_of_the_cell_table(store) -> None:
    fresh = open_store(store.path)
    codes, categories = fresh.codes(schema.PERTURBATION)
    split = fresh.labels[schema.SPLIT]
    assert "obs" not in fresh.__dict__  # training's reads leave the whole table unread
    assert list(fresh.labels.columns) == [schema.PERTURBATION, schema.GUIDE, schema.BATCH,
                                          schema.SPLIT]  # fmt: skip
    whole = open_store(store.path)
    expected_codes, expected_categories = whole.codes(schema.PERTURBATION)
    np.testing.assert_array_equal(codes, expected_codes)
    assert categories == expected_categories
    assert split.equals(whole.obs[schema.SPLIT].reset_index(drop=True))
    assert isinstance(split.dtype, pd.CategoricalDtype)
    read_after = open_store(store.path)
    read_after.obs  # noqa: B018 (the whole table first: labels come from it)
    for labels in (whole.labels, read_after.labels):
        assert labels.equals(whole.obs[list(labels.columns)].reset_index(drop=True))


def test_split_is_seeded_and_stratified(cells, tmp_path: Path) -> None:
    images, table = cells
    table = pd.concat([table] * 10, ignore_index=True)
    table["cell_id"] = [f"c{i}" for i in range(len(table))]
    labelled = label_table(table, perturbation_column="gene", guide_column="guide")
    first = finalise_obs(labelled.obs, split_fractions=(0.8, 0.05, 0.15), seed=3)
    again = finalise_obs(labelled.obs, split_fractions=(0.8, 0.05, 0.15), seed=3)
    other = finalise_obs(labelled.obs, split_fractions=(0.8, 0.05, 0.15), seed=4)
    pd.testing.assert_frame_equal(first, again)
    assert not (first.index == other.index).all()
    fractions = first[schema.SPLIT].value_counts(normalize=True)
    assert abs(fractions["train"] - 0.8) < 0.02 and abs(fractions["test"] - 0.15) < 0.02
    for _, group in first.groupby(schema.PERTURBATION, observed=True):
        share = group[schema.SPLIT].value_counts(normalize=True)
        assert abs(share["test"] - 0.15) < 0.03  # every class is split in proportion
    with pytest.raises(InputError, match="fractions"):
        finalise_obs(labelled.obs, split_fractions=(0.5, 0.2, 0.2), seed=0)


def test_channel_stats_match_numpy_over_the_train_split(cells, store) -> None:
    images, table = cells
    row_of = {cell: i for i, cell in enumerate(table["cell_id"])}
    train = store.obs[store.obs[schema.SPLIT] == "train"].index
    pixels = images[[row_of[c] for c in train]].transpose(1, 0, 2, 3).reshape(3, -1)
    stats = store.channel_stats
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=1), rtol=1e-9)
    np.testing.assert_array_equal(stats["min"], pixels.min(axis=1))
    np.testing.assert_array_equal(stats["max"], pixels.max(axis=1))
    for name, q in (("p01", 1), ("p99", 99)):
        expected = np.percentile(pixels, q, axis=1, method="inverted_cdf")
        np.testing.assert_array_equal(stats[name], expected)


def test_float_images_keep_dtype_and_sampled_percentiles() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(5, 2, size=(40, 2, 16, 16)).astype(np.float32)
    stats = ChannelStats(2, np.float32)
    stats.update(images[:25])
    stats.update(images[25:])
    result = stats.result()
    pixels = images.transpose(1, 0, 2, 3).reshape(2, -1)
    np.testing.assert_allclose(result["mean"], pixels.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(result["std"], pixels.std(axis=1), rtol=1e-5)
    np.testing.assert_allclose(result["p99"], np.percentile(pixels, 99, axis=1), atol=0.3)


def test_open_store_refuses_what_it_cannot_trust(store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="No store"):
        open_store(tmp_path / "missing.zarr")
    partial = partial_path_of(tmp_path / "half.zarr")
    partial.mkdir()
    with pytest.raises(StoreError, match="unfinished"):
        open_store(tmp_path / "half.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a Zarr"):
        open_store(tmp_path / "plain")
    metadata_path = store.path / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["attributes"]["format_version"] = 99
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(StoreError, match="version 99"):
        open_store(store.path)
    metadata["attributes"]["format_version"] = schema.STORE_FORMAT_VERSION
    metadata["attributes"]["complete"] = False
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(StoreError, match="unfinished"):
        open_store(store.path)


def test_existing_store_is_refused_unless_overwrite(cells, store) -> None:
    images, table = cells
    arguments = dict(
        images=images[:50],
        obs=table[:50],
        channel_names=["a", "b", "c"],
        perturbation_column="gene",
    )
    with pytest.raises(InputError, match="overwrite"):
        create_store(store.path, **arguments)
    replaced = create_store(store.path, overwrite=True, **arguments)
    assert replaced.n_cells == 50 and open_store(store.path).n_cells == 50
    assert not partial_path_of(store.path).exists()


def test_label_problems_raise(cells, tmp_path: Path) -> None:
    images, table = cells
    base = dict(images=images, channel_names=["a", "b", "c"], perturbation_column="gene")
    with pytest.raises(InputError, match="no column 'gene_symbol'"):
        create_store(
            tmp_path / "a.zarr", obs=table, **{**base, "perturbation_column": "gene_symbol"}
        )
    with pytest.raises(InputError, match="control label 'NTC'"):
        create_store(tmp_path / "b.zarr", obs=table, control="NTC", **base)
    bad = table.copy()
    bad.loc[[4, 9], "gene"] = None
    with pytest.raises(DataError, match="rows 4, 9"):
        create_store(tmp_path / "c.zarr", obs=bad, **base)
    with pytest.raises(InputError, match="channel names"):
        create_store(tmp_path / "d.zarr", obs=table, **{**base, "channel_names": ["a"]})
    assert not any(tmp_path.glob("*.zarr"))


def test_writer_resumes_blocks_and_statistics(cells, tmp_path: Path) -> None:
    """A writer reopened with the same plan keeps written blocks and rebuilds the statistics."""
    images, table = cells
    labelled = label_table(table, perturbation_column="gene")
    obs = finalise_obs(labelled.obs, split_fractions=(0.83, 0.02, 0.15), seed=0)
    ordered = images[obs["table_row"].to_numpy()]
    path = tmp_path / "r.zarr"

    def writer() -> StoreWriter:
        return StoreWriter(
            path,
            obs=obs,
            image_shape=(3, 8, 8),
            dtype=np.uint16,
            channel_names=["a", "b", "c"],
            control=None,
            split_fractions=(0.83, 0.02, 0.15),
            seed=0,
            provenance={},
            plan_key="plan-1",
            chunk_cells=8,
            block_cells=32,
        )

    first = writer()
    assert first.n_blocks == 10
    first.write_block(0, ordered[0:32])
    first.write_block(2, ordered[64:96])
    # "crash": reopen without finishing
    with pytest.raises(StoreError):
        open_store(path)
    second = writer()
    assert second.done_blocks == {0, 2}
    for block in second.pending_blocks():
        start, stop = second.block_bounds(block)
        second.write_block(block, ordered[start:stop])
    second.finish()
    store = open_store(path)
    np.testing.assert_array_equal(store.images[:], ordered)
    reference = create_store(
        tmp_path / "ref.zarr",
        images=images,
        obs=table,
        channel_names=["a", "b", "c"],
        perturbation_column="gene",
    )
    for name, values in reference.channel_stats.items():
        np.testing.assert_allclose(store.channel_stats[name], values, rtol=1e-12)


def test_writer_with_another_plan_starts_afresh(cells, tmp_path: Path) -> None:
    images, table = cells
    obs = finalise_obs(
        label_table(table, perturbation_column="gene").obs, split_fractions=(1, 0, 0), seed=0
    )
    arguments = dict(
        obs=obs,
        image_shape=(3, 8, 8),
        dtype=np.uint16,
        channel_names=["a", "b", "c"],
        control=None,
        split_fractions=(1, 0, 0),
        seed=0,
        provenance={},
        chunk_cells=8,
        block_cells=32,
    )
    first = StoreWriter(tmp_path / "p.zarr", plan_key="plan-1", **arguments)
    first.write_block(0, images[:32])
    assert StoreWriter(tmp_path / "p.zarr", plan_key="plan-1", **arguments).done_blocks == {0}
    assert StoreWriter(tmp_path / "p.zarr", plan_key="plan-2", **arguments).done_blocks == set()


def test_sharded_store_reads_the_same(cells, tmp_path: Path) -> None:
    images, table = cells
    store = create_store(
        tmp_path / "sharded.zarr",
        images=images,
        obs=table,
        channel_names=["a", "b", "c"],
        perturbation_column="gene",
        chunk_cells=8,
        shard_cells=32,
    )
    assert store.images.shards[0] == 32 and store.images.chunks[0] == 8
    row_of = {cell: i for i, cell in enumerate(table["cell_id"])}
    source_rows = np.array([row_of[cell] for cell in store.obs.index])
    indices = np.random.default_rng(0).integers(0, len(table), 64)
    np.testing.assert_array_equal(store.read(indices), images[source_rows[indices]])
