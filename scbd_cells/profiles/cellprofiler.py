"""Baseline: CellProfiler's own measurements with cp-measure (``--features cellprofiler``).

cp-measure (Muñoz et al., CellProfiler's measurement modules as Python functions) measures
two objects per crop, on masks from the baseline's documented simple segmentation
(:func:`scbd_cells.profiles.features.segment`: Otsu threshold of the nuclear stain -> ``Nuclei``;
Otsu threshold of the summed, p99-scaled channels, or the nucleus -> ``Cells``; an empty
nucleus falls back to the crop's central 3 x 3 pixels and an empty cell to its nucleus):

- ``MeasureObjectSizeShape`` of both objects (CellProfiler's basic set, ``calculate_advanced``
  off; the position features ``Center_*`` and ``BoundingBox*`` are dropped: a crop is
  centred on its cell);
- ``MeasureObjectIntensity`` of each channel in both objects;
- ``MeasureTexture`` (Haralick) of each channel in both objects, scale 3, 8 grey levels
  (CellProfiler 2's fixed value), four directions.

Each channel is scaled to [0, 1] over the store-wide 1st..99th percentile range first
(cp-measure's texture maps [0, 1] to grey levels without looking at the image, so a cell's
numbers do not depend on which other cells share its batch). To call cp-measure once per
batch rather than once per cell, the crops of a batch are tiled into one labelled mosaic
(every measurement is per label, so neighbours in the mosaic do not interact). Names are
CellProfiler's: ``{Nuclei|Cells}_{AreaShape|Intensity|Texture}_{Feature}[_{Channel}]``.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np

log = logging.getLogger(__name__)

TEXTURE_SCALE = 3
TEXTURE_LEVELS = 8
OBJECTS = ("Nuclei", "Cells")
POSITION_FEATURES = (
    "Center_X",
    "Center_Y",
    "BoundingBoxMinimum_X",
    "BoundingBoxMaximum_X",
    "BoundingBoxMinimum_Y",
    "BoundingBoxMaximum_Y",
)


def _measurements() -> dict:
    try:
        from cp_measure.bulk import get_core_measurements
    except ImportError:
        from scbd_cells.core.errors import InputError

        raise InputError(
            "--features cellprofiler needs cp-measure, which is not installed. Install it "
            "with `pip install 'scbd-cells[cellprofiler]'` (or `pip install cp-measure`)."
        ) from None
    return get_core_measurements()


def mosaic(crops: np.ndarray) -> np.ndarray:
    """Tile (B, H, W) crops into one (G*H, G*W) image, G = ceil(sqrt(B)), row by row."""
    n, height, width = crops.shape
    side = max(1, math.ceil(math.sqrt(n)))
    out = np.zeros((side * height, side * width), dtype=crops.dtype)
    for k in range(n):
        row, col = divmod(k, side)
        out[row * height : (row + 1) * height, col * width : (col + 1) * width] = crops[k]
    return out


def _labels(masks: np.ndarray) -> np.ndarray:
    """(B, H, W) boolean masks -> one mosaic of labels 1..B (crop k's mask labelled k + 1)."""
    numbers = np.arange(1, len(masks) + 1, dtype=np.int32)[:, None, None]
    numbered = masks.astype(np.int32) * numbers
    return mosaic(numbered)


def _ordered(values: dict, n: int) -> dict[str, np.ndarray]:
    out = {}
    for name, column in values.items():
        column = np.asarray(column, dtype=np.float64)
        if column.shape != (n,):
            raise RuntimeError(f"cp-measure returned {column.shape} values of {name} for {n} cells")
        out[name] = column
    return out


def measure_batch(
    images: np.ndarray,
    *,
    nucleus: np.ndarray,
    cell: np.ndarray,
    channel_low: np.ndarray,
    channel_high: np.ndarray,
    channel_names: list[str],
) -> dict[str, np.ndarray]:
    """CellProfiler measurements of a batch of crops: ``{feature name: (B,) values}``.

    Parameters
    ----------
    images
        (B, C, H, W) crops.
    nucleus, cell
        (B, H, W) boolean masks, each non-empty.
    channel_low, channel_high
        (C,) store-wide 1st and 99th percentiles of each channel.
    channel_names
        Channel names, for the feature names.
    """
    functions = _measurements()
    n = len(images)
    labels = {"Nuclei": _labels(nucleus), "Cells": _labels(cell)}
    scaled = np.clip(
        (images.astype(np.float32) - channel_low[None, :, None, None])
        / (channel_high - channel_low)[None, :, None, None],
        0.0,
        1.0,
    )
    features: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty texture directions -> NaN
        for obj in OBJECTS:
            shape = functions["sizeshape"](labels[obj], None, calculate_advanced=False)
            for name, values in _ordered(shape, n).items():
                if name not in POSITION_FEATURES:
                    features[f"{obj}_AreaShape_{name}"] = values
        for c, channel in enumerate(channel_names):
            pixels = mosaic(scaled[:, c])
            for obj in OBJECTS:
                intensity = functions["intensity"](labels[obj], pixels)
                for name, values in _ordered(intensity, n).items():
                    category, _, feature = name.partition("_")
                    features[f"{obj}_{category}_{feature}_{channel}"] = values
                texture = functions["texture"](
                    labels[obj], pixels, scale=TEXTURE_SCALE, gray_levels=TEXTURE_LEVELS
                )
                for name, values in _ordered(texture, n).items():
                    feature, _, suffix = name.partition("_")
                    features[f"{obj}_Texture_{feature}_{channel}_{suffix}"] = values
    return features
