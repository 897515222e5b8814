"""Baseline features: vectorised measurements equal scikit-image's crop by crop; the output."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from skimage.feature import graycomatrix, graycoprops
from skimage.filters import threshold_otsu
from skimage.measure import regionprops

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.profiles.features import (
    baseline,
    cell_features,
    feature_names,
    glcm,
    haralick,
    otsu_thresholds,
    shape_features,
)


def _blobs(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images = np.empty((n, size, size))
    for k in range(n):
        r, c = rng.uniform(8, size - 8, 2)
        a, b = rng.uniform(3, 7, 2)
        images[k] = 1000 * (((rows - r) / a) ** 2 + ((cols - c) / b) ** 2 < 1)
        images[k] += rng.normal(200, 60, (size, size))
    return images


def test_otsu_matches_skimage() -> None:
    images = _blobs(6)
    ours = otsu_thresholds(images)
    for k, image in enumerate(images):
        assert ours[k] == pytest.approx(threshold_otsu(image, nbins=64), rel=1e-9)


def test_shape_matches_regionprops() -> None:
    masks = _blobs(6) > 600
    ours = shape_features(masks)
    for k, mask in enumerate(masks):
        (region,) = regionprops(mask.astype(np.uint8))
        assert ours[k, 0] == region.area
        assert ours[k, 3] == pytest.approx(region.eccentricity, abs=1e-6)
        assert ours[k, 4] == pytest.approx(region.axis_major_length, rel=1e-6)
        assert ours[k, 5] == pytest.approx(region.axis_minor_length, rel=1e-6)


def test_haralick_matches_graycoprops() -> None:
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 8, size=(4, 16, 16))
    levels[1] = 3  # a constant crop
    ours = haralick(glcm(levels))
    for k, image in enumerate(levels):
        matrix = graycomatrix(
            image.astype(np.uint8), [1], [0, np.pi / 2], levels=8, symmetric=True, normed=True
        )
        np.testing.assert_allclose(glcm(levels[k : k + 1])[0], matrix[:, :, 0, :], atol=1e-12)
        for j, prop in enumerate(
            ["contrast", "dissimilarity", "homogeneity", "energy", "correlation"]
        ):
            assert ours[k, j] == pytest.approx(graycoprops(matrix, prop).mean(), abs=1e-9)


def test_cell_features_shape_and_finite() -> None:
    images = np.stack([_blobs(5, seed=s) for s in range(2)], axis=1).astype(np.uint16)
    values = cell_features(
        images,
        nucleus_channel=0,
        channel_low=np.zeros(2, np.float32),
        channel_high=np.full(2, 1500, np.float32),
    )
    assert values.shape == (5, len(feature_names(["a", "b"])))
    assert np.isfinite(values).all()


def _store(
    tmp_path: Path,
    *,
    name: str = "s.zarr",
    seed: int = 0,
    gain: dict[str, float] | None = None,
    channel_names: tuple[str, ...] = ("actin", "dna", "tubulin"),
) -> Path:
    from scbd_cells.data.store import create_store

    rng = np.random.default_rng(seed)
    n = 240
    gain = gain or {"A01": 1.0, "A02": 1.6, "B01": 0.7}
    wells = np.repeat(list(gain), n // 3)
    blobs = np.stack([_blobs(n, seed=s + 3 * seed) for s in range(3)], axis=1)
    images = np.clip(blobs * np.array([gain[w] for w in wells])[:, None, None, None], 0, 60000)
    genes = rng.choice(["g1", "g2", "g3", "nontargeting"], size=n)
    obs = pd.DataFrame(
        {
            "cell_id": [f"c{i}" for i in range(n)],
            "gene": genes,
            "guide": [f"{g}_{rng.integers(2)}" for g in genes],
            "plate": "P1",
            "well": wells,
        }
    )
    path = tmp_path / name
    create_store(
        path,
        images=images.astype(np.uint16),
        obs=obs,
        channel_names=list(channel_names),
        perturbation_column="gene",
        guide_column="guide",
        control="nontargeting",
    )
    return path


def test_baseline_writes_anndata(tmp_path: Path, entries) -> None:
    store_path = _store(tmp_path)
    result = baseline(store_path, out=tmp_path / "baseline.h5ad", n_components=16)
    adata = ad.read_h5ad(result.out_path)
    assert adata.shape == (240, 16) and adata.X.dtype == np.float32
    assert adata.obsm["X_features"].shape == (240, result.n_features)
    assert adata.uns["scbd"]["nucleus_channel"] == "dna"
    assert {"perturbation", "guide", "batch"} <= set(adata.obs.columns)
    assert isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype)
    again = baseline(store_path, out=tmp_path / "again.zarr", n_components=16)
    np.testing.assert_array_equal(ad.read_zarr(again.out_path).X, adata.X)
    with pytest.raises(InputError, match="already exists"):
        baseline(store_path, out=tmp_path / "baseline.h5ad")
    assert entries(tmp_path) == ["again.zarr", "baseline.h5ad", "s.zarr"]


def test_baseline_pca_equals_sklearn_with_copy(tmp_path: Path) -> None:
    """The PCA reads the features without copying them and gives sklearn's copying result."""
    from sklearn.decomposition import PCA

    result = baseline(_store(tmp_path), out=tmp_path / "baseline.h5ad", n_components=12)
    adata = ad.read_h5ad(result.out_path)
    features = np.asarray(adata.obsm["X_features"])
    np.testing.assert_allclose(features.mean(axis=0), 0, atol=1e-5)  # still standardised
    pca = PCA(n_components=12, svd_solver="covariance_eigh", random_state=0)  # copy=True
    np.testing.assert_array_equal(adata.X, pca.fit_transform(features.copy()).astype(np.float32))
    assert result.explained_variance == float(pca.explained_variance_ratio_.sum())


def test_baseline_normalize_per_well_against_pandas(tmp_path: Path) -> None:
    """--normalize batch standardises every feature within each well (pandas groupby),
    --normalize store (the default) over all cells; both measure the same raw features."""
    store_path = _store(tmp_path)
    per_well = ad.read_h5ad(
        baseline(store_path, out=tmp_path / "well.h5ad", n_components=8, normalize="batch").out_path
    )
    whole = ad.read_h5ad(baseline(store_path, out=tmp_path / "store.h5ad", n_components=8).out_path)
    assert per_well.uns["scbd"]["normalize"] == "batch"
    assert whole.uns["scbd"]["normalize"] == "store"
    wells = per_well.obs["batch"].astype(str).to_numpy()
    table = pd.DataFrame(np.asarray(whole.obsm["X_features"], dtype=np.float64))
    grouped = table.groupby(wells)
    expected = (table - grouped.transform("mean")) / grouped.transform("std", ddof=0).replace(0, 1)
    got = np.asarray(per_well.obsm["X_features"], dtype=np.float64)
    np.testing.assert_allclose(got, expected.to_numpy(), atol=2e-4)
    with pytest.raises(InputError, match="batch or store"):
        baseline(store_path, out=tmp_path / "bad.h5ad", normalize="plate")


def test_cellprofiler_mosaic_equals_cp_measure_crop_by_crop() -> None:
    """Tiling a batch into one label image measures each cell as cp-measure does alone."""
    from cp_measure.bulk import get_core_measurements

    from scbd_cells.profiles.cellprofiler import measure_batch
    from scbd_cells.profiles.features import segment

    images = np.stack([_blobs(5, seed=s) for s in range(2)], axis=1).astype(np.uint16)
    low, high = np.zeros(2, np.float32), np.full(2, 1500, np.float32)
    nucleus, cell = segment(images, nucleus_channel=0, channel_high=high)
    batch = measure_batch(
        images, nucleus=nucleus, cell=cell, channel_low=low, channel_high=high,
        channel_names=["DNA", "Actin"],
    )
    assert "Nuclei_AreaShape_Area" in batch and "Cells_Intensity_MeanIntensity_Actin" in batch
    for position in ("Center_X", "Center_Y", "BoundingBoxMinimum_X", "BoundingBoxMaximum_Y"):
        assert f"Nuclei_AreaShape_{position}" not in batch  # a crop's place in the mosaic
    core = get_core_measurements()
    scaled = np.clip(images.astype(np.float32) / 1500, 0, 1)
    for k in range(5):
        alone = core["intensity"](cell[k].astype(np.int32), scaled[k, 1])
        assert batch["Cells_Intensity_MeanIntensity_Actin"][k] == pytest.approx(
            alone["Intensity_MeanIntensity"][0], rel=1e-6
        )
        texture = core["texture"](nucleus[k].astype(np.int32), scaled[k, 0], scale=3,
                                  gray_levels=8)
        assert batch["Nuclei_Texture_Contrast_DNA_3_00_8"][k] == pytest.approx(
            texture["Contrast_3_00_8"][0], rel=1e-6, nan_ok=True
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # form factor of a 1-px object
            shape = core["sizeshape"](nucleus[k].astype(np.int32), None, calculate_advanced=False)
        assert batch["Nuclei_AreaShape_Area"][k] == shape["Area"][0]


def test_baseline_cellprofiler_features(tmp_path: Path) -> None:
    store_path = _store(tmp_path)
    result = baseline(
        store_path, out=tmp_path / "cp.h5ad", n_components=16, features="cellprofiler"
    )
    adata = ad.read_h5ad(result.out_path)
    names = list(adata.uns["scbd"]["feature_names"])
    assert adata.uns["scbd"]["features"] == "cellprofiler"
    assert names[0].startswith("Nuclei_AreaShape_") and len(names) == result.n_features
    assert np.isfinite(adata.obsm["X_features"]).all()
    np.testing.assert_array_equal(adata.obsm["X_pca"], adata.X)
    with pytest.raises(InputError, match="--features"):
        baseline(store_path, out=tmp_path / "x.h5ad", features="deep")


def test_handcrafted_names_are_cellprofiler_style() -> None:
    names = feature_names(["DNA", "Actin"])
    assert len(names) == len(set(names)) == 14 + 2 * 16
    prefixes = ("Nuclei_", "Cells_", "Cytoplasm_")
    assert all(name.startswith(prefixes) for name in names)  # pycytominer's compartments


def test_baseline_reference_measures_a_new_store_in_its_space(tmp_path: Path) -> None:
    """``reference=``: a new plate measured with the reference's channel ranges, standardised
    with its feature means and deviations and projected with its PCA loadings, checked
    against the measurements redone by hand and sklearn's PCA refitted on the reference."""
    from sklearn.decomposition import PCA

    from scbd_cells.data.store import open_store

    old_store = _store(tmp_path)
    new_store = _store(tmp_path, name="new.zarr", seed=1, gain={"C01": 2.2, "C02": 1.9, "D01": 2.5})
    made = baseline(old_store, out=tmp_path / "old.h5ad", n_components=8)
    reference = ad.read_h5ad(made.out_path)
    again = ad.read_h5ad(
        baseline(old_store, out=tmp_path / "again.h5ad", reference=tmp_path / "old.h5ad").out_path
    )
    np.testing.assert_array_equal(again.obsm["X_features"], reference.obsm["X_features"])
    np.testing.assert_allclose(again.X, reference.X, atol=1e-4)
    assert again.uns["scbd"]["space_id"] == reference.uns["scbd"]["space_id"]

    new = ad.read_h5ad(
        baseline(new_store, out=tmp_path / "new.h5ad", reference=tmp_path / "old.h5ad").out_path
    )
    assert new.uns["scbd"]["space_id"] == reference.uns["scbd"]["space_id"]
    assert new.uns["scbd"]["reference"] == str((tmp_path / "old.h5ad").resolve())
    # by hand: the old store's ranges (p01/p99) and raw-feature statistics, applied to the new
    stats = open_store(old_store).channel_stats
    low = np.array(stats["p01"], np.float32)
    high = np.array(stats["p99"], np.float32)
    high = np.where(high > low, high, low + 1)

    def raw(store_path: Path) -> np.ndarray:
        images = np.asarray(open_store(store_path).images[:], dtype=np.float32)
        return cell_features(images, nucleus_channel=1, channel_low=low, channel_high=high)

    old_raw = raw(old_store).astype(np.float64)
    mean, std = old_raw.mean(axis=0), old_raw.std(axis=0)
    expected = (raw(new_store) - mean) / np.where(std > 0, std, 1.0)
    np.testing.assert_allclose(new.obsm["X_features"], expected, atol=1e-4)
    pca = PCA(n_components=8, svd_solver="covariance_eigh", random_state=0)
    pca.fit(np.asarray(reference.obsm["X_features"]))
    np.testing.assert_allclose(new.X, pca.transform(np.asarray(new.obsm["X_features"])), atol=1e-4)
    # the new plate's own baseline is another space (its own ranges, statistics and PCA)
    own = ad.read_h5ad(baseline(new_store, out=tmp_path / "own.h5ad", n_components=8).out_path)
    assert own.uns["scbd"]["space_id"] != reference.uns["scbd"]["space_id"]
    assert np.abs(own.X - new.X).max() > 0.1


def test_baseline_reference_must_match(tmp_path: Path) -> None:
    old_store = _store(tmp_path)
    baseline(old_store, out=tmp_path / "old.h5ad", n_components=8)
    with pytest.raises(InputError, match="--normalize store"):
        baseline(old_store, out=tmp_path / "x.h5ad", normalize="batch",
                 reference=tmp_path / "old.h5ad")  # fmt: skip
    other = _store(tmp_path, name="other.zarr", channel_names=("actin", "dna", "mito"))
    with pytest.raises(DataError, match="same --channel-names"):
        baseline(other, out=tmp_path / "x.h5ad", reference=tmp_path / "old.h5ad")
    ad.AnnData(X=np.zeros((3, 2), np.float32)).write_h5ad(tmp_path / "plain.h5ad")
    with pytest.raises(DataError, match="not a baseline that records its space"):
        baseline(old_store, out=tmp_path / "x.h5ad", reference=tmp_path / "plain.h5ad")
    with pytest.raises(InputError, match="does not exist"):
        baseline(old_store, out=tmp_path / "x.h5ad", reference=tmp_path / "nope.h5ad")
    assert not (tmp_path / "x.h5ad").exists()
    per_well = baseline(old_store, out=tmp_path / "well.h5ad", normalize="batch", n_components=8)
    new_store = _store(tmp_path, name="new.zarr", seed=1)
    mapped = baseline(new_store, out=tmp_path / "new_well.h5ad", normalize="batch",
                      reference=per_well.out_path)  # fmt: skip
    assert (
        ad.read_h5ad(mapped.out_path).uns["scbd"]["space_id"]
        == ad.read_h5ad(per_well.out_path).uns["scbd"]["space_id"]
    )
