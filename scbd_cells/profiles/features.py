"""Baseline: CellProfiler-style per-cell features from the store's crops, then PCA (the reference).

The conventional pipeline the paper compares SCBD with: hand-crafted
measurements of each cell, standardised (over all cells: no batch correction;
or, with ``normalize="batch"``, within each well, the usual CellProfiler
post-processing), then reduced by PCA. Per crop:

- segmentation: Otsu threshold (as ``skimage.filters.threshold_otsu``) of the
  nucleus channel (nucleus mask) and of the sum of the channels scaled by
  their store-wide 99th percentile (cell mask);
- shape of both masks: area, perimeter, compactness, eccentricity, major and
  minor axis length (from second moments, as ``skimage.measure.regionprops``),
  distance of the centroid from the crop centre;
- per channel intensity: mean, std, 10/50/90th percentile, max, mean in the
  nucleus, in the cell and in the background, integrated in the cell, and
  nucleus/cytoplasm ratio;
- per channel texture: Haralick features of the grey-level co-occurrence matrix
  (8 levels over the channel's store-wide 1st..99th percentile range, distance
  1, angles 0 and 90 degrees, symmetric, averaged over angles) -- contrast,
  dissimilarity, homogeneity, energy, correlation, as ``skimage.feature.graycoprops``.

Everything is computed on whole batches with numpy (tests check it against
scikit-image crop by crop), streamed from the store.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.core.outputs import check_free_space, location_text, locks_output, read_recorded
from scbd_cells.core.progress import progress_bar
from scbd_cells.data import schema

if TYPE_CHECKING:
    import anndata as ad

    from scbd_cells.data.store import Store

log = logging.getLogger(__name__)

OTSU_BINS = 64
GLCM_LEVELS = 8
NUCLEUS_CHANNEL_NAMES = ("dna", "dapi", "hoechst", "nucleus", "nuclei")
SHAPE_FEATURES = (
    "area",
    "perimeter",
    "compactness",
    "eccentricity",
    "major_axis",
    "minor_axis",
    "centre_distance",
)
INTENSITY_FEATURES = (
    "mean",
    "std",
    "p10",
    "p50",
    "p90",
    "max",
    "mean_nucleus",
    "mean_cell",
    "mean_background",
    "integrated_cell",
    "nucleus_cytoplasm_ratio",
)
TEXTURE_FEATURES = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")


@dataclass(frozen=True)
class BaselineResult:
    """What :func:`baseline` wrote.

    Attributes
    ----------
    out_path
        The AnnData file.
    n_cells
        Cells embedded.
    n_features
        Measurements per cell before PCA.
    n_components
        PCA dimensions (``X``).
    explained_variance
        Share of the standardised features' variance the components keep.
    """

    out_path: Path
    n_cells: int
    n_features: int
    n_components: int
    explained_variance: float


def otsu_thresholds(images: np.ndarray, *, nbins: int = OTSU_BINS) -> np.ndarray:
    """Otsu threshold of each image in a batch, (B, H, W) -> (B,), as skimage's threshold_otsu.

    Each image gets a histogram of ``nbins`` bins over its own min..max; the
    threshold is the bin centre that maximises the between-class variance.
    """
    flat = images.reshape(len(images), -1).astype(np.float64)
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    width = np.where(high > low, (high - low) / nbins, 1.0)
    bins = np.clip(((flat - low) / width).astype(np.int64), 0, nbins - 1)
    offsets = np.arange(len(flat))[:, None] * nbins
    hist = np.bincount((bins + offsets).ravel(), minlength=len(flat) * nbins)
    hist = hist.reshape(len(flat), nbins).astype(np.float64)
    centres = low + width * (np.arange(nbins) + 0.5)  # (B, nbins)
    weight1 = np.cumsum(hist, axis=1)
    weight2 = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    mean1 = np.cumsum(hist * centres, axis=1) / np.maximum(weight1, 1e-12)
    mean2 = (np.cumsum((hist * centres)[:, ::-1], axis=1) / np.maximum(weight2[:, ::-1], 1e-12))[
        :, ::-1
    ]
    variance = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    best = np.argmax(variance, axis=1)
    return np.where(high[:, 0] > low[:, 0], centres[np.arange(len(flat)), best], low[:, 0])


def shape_features(masks: np.ndarray) -> np.ndarray:
    """Shape measurements of a batch of binary masks (B, H, W) -> (B, len(SHAPE_FEATURES))."""
    n, height, width = masks.shape
    m = masks.astype(np.float64)
    area = m.sum(axis=(1, 2))
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    interior = (
        padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    )
    perimeter = (masks & ~interior).sum(axis=(1, 2)).astype(np.float64)
    rows = np.arange(height, dtype=np.float64)[None, :, None]
    cols = np.arange(width, dtype=np.float64)[None, None, :]
    safe_area = np.maximum(area, 1.0)
    centre_r = (m * rows).sum(axis=(1, 2)) / safe_area
    centre_c = (m * cols).sum(axis=(1, 2)) / safe_area
    dr = rows - centre_r[:, None, None]
    dc = cols - centre_c[:, None, None]
    # regionprops' inertia tensor: second central moments / area
    mu_rr = (m * dr**2).sum(axis=(1, 2)) / safe_area
    mu_cc = (m * dc**2).sum(axis=(1, 2)) / safe_area
    mu_rc = (m * dr * dc).sum(axis=(1, 2)) / safe_area
    spread = np.sqrt(((mu_rr - mu_cc) / 2) ** 2 + mu_rc**2)
    eigen_major = (mu_rr + mu_cc) / 2 + spread
    eigen_minor = np.maximum((mu_rr + mu_cc) / 2 - spread, 0.0)
    major = 4 * np.sqrt(eigen_major)
    minor = 4 * np.sqrt(eigen_minor)
    eccentricity = np.sqrt(np.maximum(1 - eigen_minor / np.maximum(eigen_major, 1e-12), 0.0))
    compactness = perimeter**2 / (4 * np.pi * safe_area)
    centre_distance = np.hypot(centre_r - (height - 1) / 2, centre_c - (width - 1) / 2)
    features = np.stack(
        [area, perimeter, compactness, eccentricity, major, minor, centre_distance], axis=1
    )
    features[area == 0] = 0.0
    return features


def glcm(levels: np.ndarray, *, n_levels: int = GLCM_LEVELS) -> np.ndarray:
    """Symmetric, normalised co-occurrence matrices at distance 1, angles 0 and 90 degrees.

    ``levels`` (B, H, W) integers in [0, n_levels); returns (B, n_levels, n_levels, 2)
    like ``skimage.feature.graycomatrix(..., [1], [0, pi/2], symmetric=True, normed=True)``.
    """
    n = len(levels)
    offsets = np.arange(n)[:, None] * n_levels * n_levels
    out = np.empty((n, n_levels, n_levels, 2))
    pairs = (
        (levels[:, :, :-1], levels[:, :, 1:]),  # angle 0: right neighbour
        (levels[:, :-1, :], levels[:, 1:, :]),  # angle 90: neighbour below (skimage's convention)
    )
    for angle, (first, second) in enumerate(pairs):
        codes = first.reshape(n, -1) * n_levels + second.reshape(n, -1) + offsets
        counts = np.bincount(codes.ravel(), minlength=n * n_levels * n_levels)
        counts = counts.reshape(n, n_levels, n_levels).astype(np.float64)
        counts = counts + counts.transpose(0, 2, 1)
        out[..., angle] = counts / np.maximum(counts.sum(axis=(1, 2), keepdims=True), 1e-12)
    return out


def haralick(matrices: np.ndarray) -> np.ndarray:
    """Texture measurements of GLCMs (B, L, L, A) -> (B, len(TEXTURE_FEATURES)), mean over A."""
    n_levels = matrices.shape[1]
    i = np.arange(n_levels, dtype=np.float64)[None, :, None, None]
    j = np.arange(n_levels, dtype=np.float64)[None, None, :, None]
    contrast = (matrices * (i - j) ** 2).sum(axis=(1, 2))
    dissimilarity = (matrices * np.abs(i - j)).sum(axis=(1, 2))
    homogeneity = (matrices / (1 + (i - j) ** 2)).sum(axis=(1, 2))
    energy = np.sqrt((matrices**2).sum(axis=(1, 2)))
    mean_i = (matrices * i).sum(axis=(1, 2))
    mean_j = (matrices * j).sum(axis=(1, 2))
    std_i = np.sqrt((matrices * (i - mean_i[:, None, None]) ** 2).sum(axis=(1, 2)))
    std_j = np.sqrt((matrices * (j - mean_j[:, None, None]) ** 2).sum(axis=(1, 2)))
    covariance = (matrices * (i - mean_i[:, None, None]) * (j - mean_j[:, None, None])).sum(
        axis=(1, 2)
    )
    flat = (std_i < 1e-15) | (std_j < 1e-15)  # skimage: correlation 1 for a constant image
    correlation = np.where(flat, 1.0, covariance / np.maximum(std_i * std_j, 1e-30))
    per_angle = np.stack([contrast, dissimilarity, homogeneity, energy, correlation], axis=1)
    return per_angle.mean(axis=2)


def quantise(images: np.ndarray, low: np.ndarray, high: np.ndarray, n_levels: int) -> np.ndarray:
    """(B, C, H, W) -> integer levels in [0, n_levels) over each channel's [low, high] range."""
    scale = (images - low[None, :, None, None]) / (high - low)[None, :, None, None]
    return np.clip((scale * n_levels).astype(np.int64), 0, n_levels - 1)


def segment(
    images: np.ndarray, *, nucleus_channel: int, channel_high: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus and cell masks of a batch of crops (B, C, H, W) -> two (B, H, W) booleans.

    Nucleus: above the Otsu threshold of the nuclear stain. Cell: above the Otsu threshold
    of the sum of the channels scaled by their store-wide 99th percentile, or in the nucleus.
    """
    images = images.astype(np.float32)
    nucleus_image = images[:, nucleus_channel]
    nucleus = nucleus_image > otsu_thresholds(nucleus_image)[:, None, None]
    scaled_sum = (images / channel_high[None, :, None, None]).sum(axis=1)
    cell = (scaled_sum > otsu_thresholds(scaled_sum)[:, None, None]) | nucleus
    return nucleus, cell


def cell_features(
    images: np.ndarray,
    *,
    nucleus_channel: int,
    channel_low: np.ndarray,
    channel_high: np.ndarray,
) -> np.ndarray:
    """All measurements of a batch of crops (B, C, H, W) -> (B, n_features) float32."""
    images = images.astype(np.float32)
    n, n_channels = images.shape[:2]
    nucleus, cell = segment(images, nucleus_channel=nucleus_channel, channel_high=channel_high)
    background = ~cell
    cytoplasm = cell & ~nucleus

    def masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        count = mask.sum(axis=(1, 2))
        return np.where(count > 0, (values * mask).sum(axis=(1, 2)) / np.maximum(count, 1), 0.0)

    columns = [shape_features(nucleus), shape_features(cell)]
    levels = quantise(images, channel_low, channel_high, GLCM_LEVELS)
    flat = images.reshape(n, n_channels, -1)
    quantiles = np.percentile(flat, [10, 50, 90], axis=2)  # (3, B, C)
    for c in range(n_channels):
        channel = images[:, c]
        mean_nucleus = masked_mean(channel, nucleus)
        mean_cytoplasm = masked_mean(channel, cytoplasm)
        intensity = np.stack(
            [
                flat[:, c].mean(axis=1),
                flat[:, c].std(axis=1),
                quantiles[0, :, c],
                quantiles[1, :, c],
                quantiles[2, :, c],
                flat[:, c].max(axis=1),
                mean_nucleus,
                masked_mean(channel, cell),
                masked_mean(channel, background),
                (channel * cell).sum(axis=(1, 2)),
                mean_nucleus / np.maximum(mean_cytoplasm, 1e-6),
            ],
            axis=1,
        )
        columns += [intensity, haralick(glcm(levels[:, c]))]
    return np.concatenate(columns, axis=1).astype(np.float32)


# CellProfiler-style names (compartment_category_feature[_channel]) so that pycytominer's
# feature inference finds them; "Crop*" marks measurements of the whole crop, which
# CellProfiler does not make per object.
_SHAPE_NAMES = (
    "Area", "Perimeter", "Compactness", "Eccentricity", "MajorAxisLength", "MinorAxisLength",
    "DistanceFromCropCentre",
)  # fmt: skip
_INTENSITY_NAMES = (
    "Cells_CropIntensity_Mean", "Cells_CropIntensity_Std", "Cells_CropIntensity_P10",
    "Cells_CropIntensity_P50", "Cells_CropIntensity_P90", "Cells_CropIntensity_Max",
    "Nuclei_Intensity_MeanIntensity", "Cells_Intensity_MeanIntensity",
    "Cells_CropIntensity_MeanBackground", "Cells_Intensity_IntegratedIntensity",
    "Nuclei_Intensity_NucleusCytoplasmRatio",
)  # fmt: skip
_TEXTURE_NAMES = ("Contrast", "Dissimilarity", "Homogeneity", "Energy", "Correlation")


def feature_names(channel_names: list[str]) -> list[str]:
    """Names of the :func:`cell_features` columns, in order (CellProfiler-style)."""
    names = [f"Nuclei_AreaShape_{f}" for f in _SHAPE_NAMES]
    names += [f"Cells_AreaShape_{f}" for f in _SHAPE_NAMES]
    for channel in channel_names:
        names += [f"{stem}_{channel}" for stem in _INTENSITY_NAMES]
        names += [f"Cells_CropTexture_{f}_{channel}_1_8" for f in _TEXTURE_NAMES]
    return names


def _nucleus_channel(channel_names: list[str], requested: str | None) -> int:
    if requested is not None:
        if requested not in channel_names:
            raise InputError(
                f"--nucleus-channel {requested!r} is not a channel of the store "
                f"({', '.join(channel_names)}). Name one of those."
            )
        return channel_names.index(requested)
    lower = [c.lower() for c in channel_names]
    for name in NUCLEUS_CHANNEL_NAMES:
        if name in lower:
            return lower.index(name)
    raise InputError(
        "Which channel shows the nuclei? None of the store's channels "
        f"({', '.join(channel_names)}) "
        f"is named like a nuclear stain ({', '.join(NUCLEUS_CHANNEL_NAMES)}), and segmenting on "
        "the wrong one would measure nonsense. Name it with --nucleus-channel (e.g. "
        f"--nucleus-channel {channel_names[0]}), or give the channels names at ingest "
        "(--channel-names)."
    )


@locks_output("out")
def baseline(
    store_path: str | Path,
    *,
    out: str | Path,
    n_components: int = 64,
    nucleus_channel: str | None = None,
    batch_size: int = 4096,
    normalize: str = "store",
    features: str = "handcrafted",
    reference: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> BaselineResult:
    """CellProfiler-style features of every cell in a store, standardised and reduced by PCA.

    Parameters
    ----------
    store_path
        A store made by ``scbd-cells ingest``.
    out
        Output AnnData (``.h5ad``, or ``.zarr`` by extension): ``X`` = PCA of the standardised
        features (float32), ``obsm["X_features"]`` = the standardised features,
        ``obs`` = the store's cell table, ``uns["scbd"]`` = provenance.
    n_components
        PCA dimensions (the paper's 64; fewer if there are fewer features).
    nucleus_channel
        Channel to segment nuclei on (default: one named dna/dapi/hoechst/nucleus).
    batch_size
        Cells measured at a time.
    normalize
        ``store`` (default, no batch correction): each feature standardised over all
        cells; ``batch``: within each batch label (well), which removes per-well
        shifts of the measurements (as ``train --normalize batch`` does for the pixels).
    features
        ``handcrafted`` (default: the numpy measurements above, 78 for four channels) or
        ``cellprofiler`` (CellProfiler's own size/shape, intensity and texture
        measurements of nucleus and cell with cp-measure, :mod:`scbd_cells.profiles.cellprofiler`;
        a measurement undefined for a cell, e.g. texture of a tiny nucleus, is set to the
        feature's mean before standardising).
    reference
        An earlier baseline (e.g. of the training plates) to measure this store *in its
        space*, for profiles that can be put beside the reference's and mapped onto a
        correction fitted on it (``correct --reference``): the reference's channel ranges
        (segmentation and texture), its feature means and standard deviations (with
        ``normalize="store"``), its PCA loadings and its nucleus channel, none refitted.
        ``features`` and ``normalize`` must be the reference's.
    seed
        Seeds the PCA solver.
    overwrite
        Replace an existing output.

    Returns
    -------
    BaselineResult
    """
    from scbd_cells.profiles.anndata_io import write_anndata

    store, out_path, reference_path = _open_inputs(
        store_path, out, reference, normalize=normalize, features=features, overwrite=overwrite
    )
    space = _measuring_space(
        store, reference_path, features=features, normalize=normalize,
        nucleus_channel=nucleus_channel, n_components=n_components,
    )  # fmt: skip
    measured = _measure_store(
        store, space, features, out_path=out_path, batch_size=batch_size, n_components=n_components
    )
    scaling = _standardise_store(measured.values, store, normalize=normalize, fitted=space.fitted)
    projection = _project(scaling.values, space.fitted, n_components=n_components, seed=seed)
    adata = _baseline_anndata(measured, scaling, projection)
    adata.uns[schema.UNS_SCBD] = _provenance(
        store, store_path, space, measured, scaling, projection, features=features,
        normalize=normalize, seed=seed, reference_path=reference_path,
    )  # fmt: skip
    write_anndata(adata, out_path, overwrite=overwrite)
    log.info("Baseline: %d cells x %d features -> PCA %d (%.0f%% variance) -> %s", store.n_cells,
             len(measured.names), projection.components, 100 * projection.explained, out_path)
    return BaselineResult(
        out_path=out_path, n_cells=store.n_cells, n_features=len(measured.names),
        n_components=projection.components, explained_variance=projection.explained,
    )  # fmt: skip


def _open_inputs(
    store_path: str | Path,
    out: str | Path,
    reference: str | Path | None,
    *,
    normalize: str,
    features: str,
    overwrite: bool,
) -> tuple[Store, Path, Path | None]:
    """The store, the output path and the reference's, after checking the options and paths."""
    from scbd_cells.data.store import open_store
    from scbd_cells.profiles.anndata_io import check_output_path

    if normalize not in ("batch", "store"):
        raise InputError(f"--normalize must be batch or store; found {normalize!r}.")
    if features not in FEATURE_SETS:
        raise InputError(
            f"--features must be one of {', '.join(FEATURE_SETS)}; found {features!r}."
        )
    out_path = Path(out)
    reference_path = Path(reference) if reference is not None else None
    inputs = [store_path] if reference_path is None else [store_path, reference_path]
    check_output_path(out_path, overwrite=overwrite, inputs=inputs)
    return open_store(store_path), out_path, reference_path


class _MeasuringSpace(NamedTuple):
    """How :func:`baseline` measures: the reference's transforms (if any) and channel ranges."""

    fitted: ReferenceSpace | None
    nucleus_at: int  # the nucleus channel's index
    low: np.ndarray  # (C,) each channel's 1st percentile
    high: np.ndarray  # (C,) 99th percentile, above ``low``


def _measuring_space(
    store: Store,
    reference_path: Path | None,
    *,
    features: str,
    normalize: str,
    nucleus_channel: str | None,
    n_components: int,
) -> _MeasuringSpace:
    """The reference baseline's space, else the store's channel ranges."""
    fitted = None
    if reference_path is not None:
        fitted = _reference_space(
            reference_path, channel_names=store.channel_names, features=features,
            normalize=normalize, nucleus_channel=nucleus_channel,
        )  # fmt: skip
        nucleus_channel = fitted.nucleus_channel
        if n_components != len(fitted.pca_components):
            log.info(
                "Baseline: the reference's PCA has %d components; --n-components %d is not used",
                len(fitted.pca_components), n_components,
            )  # fmt: skip
    nucleus_at = _nucleus_channel(store.channel_names, nucleus_channel)
    if fitted is not None:
        low, high = fitted.channel_low, fitted.channel_high
    else:
        stats = store.channel_stats
        low = np.array(stats["p01"], dtype=np.float32)
        high = np.array(stats["p99"], dtype=np.float32)
        high = np.where(high > low, high, low + 1)
    return _MeasuringSpace(fitted, nucleus_at, low, high)


class _Measured(NamedTuple):
    values: np.ndarray  # (N, F) float32, in store order
    names: list[str]  # F feature names
    obs: pd.DataFrame  # the store's cell table, for the AnnData


def _measure_store(
    store: Store,
    space: _MeasuringSpace,
    feature_set: str,
    *,
    out_path: Path,
    batch_size: int,
    n_components: int,
) -> _Measured:
    """Every cell's measurements, batch by batch (the output's free space checked first)."""
    from scbd_cells.data.loader import iter_cells
    from scbd_cells.profiles.anndata_io import anndata_bytes, store_obs_for_anndata

    names = feature_names(store.channel_names) if feature_set == "handcrafted" else None
    features = None
    obs = store_obs_for_anndata(store)
    with progress_bar(unit="cells") as bar:
        task = bar.add_task("Measuring cells", total=store.n_cells)
        for indices, images in iter_cells(
            store, np.arange(store.n_cells), batch_size=batch_size, workers=1
        ):
            values, names = _measure(
                images, feature_set, nucleus_channel=space.nucleus_at, channel_low=space.low,
                channel_high=space.high, channel_names=store.channel_names, names=names,
            )  # fmt: skip
            if features is None:  # the feature count is known from the first batch on
                # X and obsm["X_pca"] hold the PCA, obsm["X_features"] the features
                size = store.n_cells * (len(names) + 2 * n_components)
                check_free_space(out_path, anndata_bytes(obs, size))
                features = np.empty((store.n_cells, len(names)), dtype=np.float32)
            features[indices] = values
            bar.advance(task, len(indices))
    if feature_set == "cellprofiler":
        _fill_undefined(features)
    return _Measured(features, names, obs)


class _Scaling(NamedTuple):
    values: np.ndarray  # (N, F) the standardised features
    mean: np.ndarray | None  # (F,) what was subtracted; None when standardised per batch
    std: np.ndarray | None  # (F,) what it was divided by


def _standardise_store(
    features: np.ndarray, store: Store, *, normalize: str, fitted: ReferenceSpace | None
) -> _Scaling:
    """The features standardised (in place) per batch label, by the reference, or over all."""
    feature_mean = feature_std = None
    if normalize == "batch":
        codes, _ = store.codes(schema.BATCH)
        for code in np.unique(codes):
            rows = np.flatnonzero(codes == code)
            features[rows] = _standardised(features[rows])
    elif fitted is not None:
        feature_mean, feature_std = fitted.feature_mean, fitted.feature_std
        features -= feature_mean
        features /= feature_std
    else:
        feature_mean = features.mean(axis=0, dtype=np.float64).astype(np.float32)
        spread = features.std(axis=0, dtype=np.float64)
        feature_std = np.where(spread > 0, spread, 1.0).astype(np.float32)
        features = _standardised(features)
    return _Scaling(features, feature_mean, feature_std)


class _Projection(NamedTuple):
    reduced: np.ndarray  # (N, components) float32
    mean: np.ndarray  # (F,) float32 PCA mean
    loadings: np.ndarray  # (components, F) float32
    variance: np.ndarray  # (components,)
    variance_ratio: np.ndarray  # (components,)
    components: int

    @property
    def explained(self) -> float:
        return float(np.sum(self.variance_ratio))


def _project(
    features: np.ndarray, fitted: ReferenceSpace | None, *, n_components: int, seed: int
) -> _Projection:
    """PCA of the features: fitted here, or the reference's loadings (as sklearn's transform)."""
    from sklearn.decomposition import PCA

    if fitted is not None:
        pca_mean, pca_components = fitted.pca_mean, fitted.pca_components
        reduced = ((features - pca_mean) @ pca_components.T).astype(np.float32)
        variance = reduced.var(axis=0, dtype=np.float64, ddof=1)
        variance_ratio = variance / max(float(features.var(axis=0, ddof=1).sum()), 1e-12)
        return _Projection(
            reduced, pca_mean, pca_components, variance, variance_ratio, len(pca_components)
        )
    components = min(n_components, features.shape[1], features.shape[0])
    # copy=False: the covariance_eigh solver reads the features without changing them,
    # so no second N x F matrix; the projection is float32 already (no copy either).
    pca = PCA(n_components=components, svd_solver="covariance_eigh", random_state=seed, copy=False)
    reduced = pca.fit_transform(features).astype(np.float32, copy=False)
    return _Projection(
        reduced,
        pca.mean_.astype(np.float32),
        pca.components_.astype(np.float32),
        pca.explained_variance_,
        pca.explained_variance_ratio_,
        components,
    )


def _baseline_anndata(
    measured: _Measured, scaling: _Scaling, projection: _Projection
) -> ad.AnnData:
    """``X`` and ``obsm["X_pca"]`` the PCA, ``obsm["X_features"]`` the standardised features."""
    import anndata

    var = pd.DataFrame(index=[f"PC{i + 1}" for i in range(projection.components)])
    adata = anndata.AnnData(X=projection.reduced, obs=measured.obs, var=var)
    adata.obsm[schema.OBSM_FEATURES] = scaling.values
    adata.obsm[schema.OBSM_PCA] = projection.reduced  # where scanpy looks for a PCA
    adata.uns["pca"] = {  # as scanpy.pp.pca writes it
        "variance": np.asarray(projection.variance, dtype=np.float32),
        "variance_ratio": np.asarray(projection.variance_ratio, dtype=np.float32),
        "params": {"zero_center": True, "use_highly_variable": False},
    }
    return adata


def _provenance(
    store: Store,
    store_path: str | Path,
    space: _MeasuringSpace,
    measured: _Measured,
    scaling: _Scaling,
    projection: _Projection,
    *,
    features: str,
    normalize: str,
    seed: int,
    reference_path: Path | None,
) -> dict[str, Any]:
    """``uns["scbd"]``: what was measured how, and the space another store can be put in."""
    from scbd_cells.profiles.anndata_io import store_label_columns

    # what puts another store's cells into this baseline's space (baseline --reference)
    recorded_space = {
        "channel_names": list(store.channel_names),
        "channel_low": np.asarray(space.low, dtype=np.float32),
        "channel_high": np.asarray(space.high, dtype=np.float32),
        "pca_mean": projection.mean,
        "pca_components": projection.loadings,
    }
    if scaling.mean is not None:
        recorded_space.update(feature_mean=scaling.mean, feature_std=scaling.std)
    return {
        "kind": "baseline",
        "store": location_text(store_path),
        "store_id": store.store_id,
        "control": store.control or "",
        schema.UNS_LABEL_COLUMNS: store_label_columns(store),
        "method": (
            "CellProfiler-style intensity, shape and Haralick texture features"
            if features == "handcrafted"
            else "CellProfiler measurements (cp-measure): size/shape, intensity, texture"
        )
        + f", standardised per {'batch label' if normalize == 'batch' else 'store'}, PCA",
        "features": features,
        "normalize": normalize,
        "feature_names": measured.names,
        "nucleus_channel": store.channel_names[space.nucleus_at],
        "n_components": projection.components,
        "explained_variance": projection.explained,
        "seed": seed,
        "version": _version(),
        **recorded_space,
        "space_id": space_id(features, normalize, recorded_space),
        "reference": str(reference_path.resolve()) if reference_path is not None else "",
    }


FEATURE_SETS = ("handcrafted", "cellprofiler")


def space_id(feature_set: str, normalize: str, space: dict[str, Any]) -> str:
    """A fingerprint of what places cells in a baseline's space (16 hex digits).

    Two baselines share it when they measure with the same channel ranges, standardise
    with the same statistics (or each within its wells) and project with the same loadings:
    a baseline and those made with ``reference=`` it. ``correct --reference`` compares it.
    """
    digest = hashlib.sha256(f"{feature_set}|{normalize}|".encode())
    for name in sorted(space):
        value = space[name]
        digest.update(name.encode())
        if isinstance(value, np.ndarray):
            digest.update(np.ascontiguousarray(value, dtype=np.float32).tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ReferenceSpace:
    """What :func:`baseline` reuses from a reference baseline (``reference=``)."""

    nucleus_channel: str
    channel_low: np.ndarray
    channel_high: np.ndarray
    feature_mean: np.ndarray | None
    feature_std: np.ndarray | None
    pca_mean: np.ndarray
    pca_components: np.ndarray


def _reference_space(
    path: Path,
    *,
    channel_names: list[str],
    features: str,
    normalize: str,
    nucleus_channel: str | None,
) -> ReferenceSpace:
    """The reference baseline's transforms, checked against this store and these options."""
    recorded = read_recorded(path, what="The reference baseline")
    if recorded.get("kind") != "baseline" or "pca_components" not in recorded:
        raise DataError(
            f"{path} is not a baseline that records its space (found kind "
            f"{recorded.get('kind') or 'none'!r}). Pass as --reference the output of "
            "`scbd-cells baseline` on the reference plates (made with this version: older "
            "baselines do not record their loadings; run it again)."
        )
    for option, value in (("features", features), ("normalize", normalize)):
        if str(recorded.get(option)) != value:
            raise InputError(
                f"The reference baseline {path} was made with --{option} "
                f"{recorded.get(option)}; this one asks for --{option} {value}. Profiles "
                f"are comparable only when measured alike: pass --{option} "
                f"{recorded.get(option)}."
            )
    recorded_channels = [str(c) for c in np.asarray(recorded.get("channel_names", [])).ravel()]
    if recorded_channels != list(channel_names):
        raise DataError(
            f"The reference baseline {path} measured channels {recorded_channels}; this store "
            f"has {list(channel_names)}. Ingest the new plate with the same --channel-names, "
            "in the same order."
        )
    recorded_nucleus = str(recorded.get("nucleus_channel", ""))
    if nucleus_channel is not None and nucleus_channel != recorded_nucleus:
        raise InputError(
            f"The reference baseline {path} segmented nuclei on {recorded_nucleus!r}; this one "
            f"asks for {nucleus_channel!r}. Leave out --nucleus-channel to use the reference's."
        )

    def array(name: str) -> np.ndarray | None:
        return None if name not in recorded else np.asarray(recorded[name], dtype=np.float32)

    return ReferenceSpace(
        nucleus_channel=recorded_nucleus,
        channel_low=array("channel_low"),
        channel_high=array("channel_high"),
        feature_mean=array("feature_mean"),
        feature_std=array("feature_std"),
        pca_mean=array("pca_mean"),
        pca_components=array("pca_components"),
    )


def _measure(
    images: np.ndarray,
    feature_set: str,
    *,
    nucleus_channel: int,
    channel_low: np.ndarray,
    channel_high: np.ndarray,
    channel_names: list[str],
    names: list[str] | None,
) -> tuple[np.ndarray, list[str]]:
    """One batch's measurements (B, F) float32 and the feature names."""
    if feature_set == "handcrafted":
        values = cell_features(
            images, nucleus_channel=nucleus_channel, channel_low=channel_low,
            channel_high=channel_high,
        )
        return values, list(names or feature_names(channel_names))
    from scbd_cells.profiles.cellprofiler import measure_batch

    nucleus, cell = segment(images, nucleus_channel=nucleus_channel, channel_high=channel_high)
    height, width = nucleus.shape[1:]
    centre = np.zeros((height, width), dtype=bool)
    centre[height // 2 - 1 : height // 2 + 2, width // 2 - 1 : width // 2 + 2] = True
    empty = ~nucleus.any(axis=(1, 2))
    nucleus[empty] = centre
    cell |= nucleus
    measured = measure_batch(
        images, nucleus=nucleus, cell=cell, channel_low=channel_low, channel_high=channel_high,
        channel_names=channel_names,
    )
    if names is not None and list(measured) != names:
        raise RuntimeError("cp-measure returned different features for two batches")
    return np.stack(list(measured.values()), axis=1).astype(np.float32), list(measured)


def _fill_undefined(features: np.ndarray) -> None:
    """NaN / infinite measurements set to their feature's mean (0 where none is finite)."""
    bad = ~np.isfinite(features)
    if not bad.any():
        return
    columns = np.flatnonzero(bad.any(axis=0))
    for column in columns:
        values = features[:, column]
        finite = np.isfinite(values)
        values[~finite] = values[finite].mean() if finite.any() else 0.0
    log.info("Baseline: %d undefined measurements in %d features set to the feature's mean",
             int(bad.sum()), len(columns))


def _standardised(features: np.ndarray) -> np.ndarray:
    """Columns shifted to mean 0 and scaled to std 1 (constant columns only shifted), in place."""
    mean = features.mean(axis=0, dtype=np.float64)
    std = features.std(axis=0, dtype=np.float64)
    features -= mean.astype(np.float32)
    features /= np.where(std > 0, std, 1.0).astype(np.float32)
    return features


def _version() -> str:
    from scbd_cells import __version__

    return __version__
