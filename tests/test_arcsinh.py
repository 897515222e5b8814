"""train --normalize arcsinh: the official SCBD code's transform, exactly, at train and embed time.

The reference is the official code's ``Funk22Dataset.transforms`` (scbd/data/funk22.py of
github.com/Genentech/SCBD): ``T.Compose([T.Resize((32, 32)), Arcsinh(), T.Normalize(7., 7.)])``
on each cell's uint16 (C, H, W) tensor. It is written out here twice, independently of
``scbd_cells``: in numpy (an antialiased bilinear resize as PIL and torchvision define it, the
cast back to uint16, arcsinh, (x - 7) / 7), and with torchvision's own transforms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from scbd_cells.data.store import create_store, open_store
from scbd_cells.model.preprocess import ArcsinhPreprocessor, preprocessor_for
from scbd_cells.training.checkpoint import (
    load_checkpoint,
    load_trained,
    normalize_of,
    save_checkpoint,
)


def numpy_resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an antialiased bilinear resize (PIL's triangle filter).

    Output pixel i is centred at (i + 0.5) * scale in input coordinates; when shrinking,
    the triangle's support widens by the scale (the antialiasing), and the weights of each
    output pixel are normalised to sum to 1.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), n_in)
        inputs = np.arange(low, high)
        w = np.maximum(0.0, 1.0 - np.abs((inputs + 0.5 - centre) / support))
        weights[i, low:high] = w / w.sum()
    return weights


def official_transform_numpy(cell: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The official transform of one uint16 (C, H, W) cell; also the resized float values."""
    resized = cell.astype(np.float64)
    if cell.shape[-2:] != (size, size):
        rows = numpy_resize_weights(cell.shape[-2], size)
        columns = numpy_resize_weights(cell.shape[-1], size)
        resized = np.einsum("ih,chw,jw->cij", rows, resized, columns)
        pixels = np.trunc(resized)  # Resize returns uint16 for a uint16 input: the cast truncates
    else:
        pixels = resized  # Resize returns a crop of the requested size unchanged
    return (np.arcsinh(pixels) - 7.0) / 7.0, resized


def official_transform_torchvision(cell: np.ndarray, size: int) -> torch.Tensor:
    """The official code's transform with torchvision, as funk22.py builds it."""
    import torchvision.transforms as T

    transform = T.Compose([T.Resize((size, size)), torch.arcsinh, T.Normalize(7.0, 7.0)])
    return transform(torch.tensor(cell))


def _cells(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint16 crops with the range of a microscope: background, bright cells, a few zeros."""
    rng = np.random.default_rng(seed)
    cells = rng.gamma(2.0, 400.0, size=(n, 4, size, size)) + 100
    cells[:, :, :3, :3] = 0  # dark corners: arcsinh's steep part
    cells[0, 1, 10:20, 10:20] = 60_000  # near saturation
    return cells.clip(0, 65535).astype(np.uint16)


def test_crops_at_the_model_size_match_numpy_exactly() -> None:
    cells = _cells(3, 32)
    ours = ArcsinhPreprocessor(image_size=32)(torch.from_numpy(cells.astype(np.int32)))
    expected = np.stack([official_transform_numpy(cell, 32)[0] for cell in cells])
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-7)
    assert ours.dtype == torch.float32 and ours.shape == (3, 4, 32, 32)


def test_resized_crops_match_numpy_and_torchvision() -> None:
    """100 px crops to 32 px, as the paper's screen: the resize, the cast back, the arcsinh."""
    cells = _cells(4, 100, seed=1)
    # the loader hands uint16 stores over as int32 (few uint16 kernels, none on CUDA)
    ours = ArcsinhPreprocessor(image_size=32)(torch.from_numpy(cells.astype(np.int32))).numpy()
    for cell, got in zip(cells, ours, strict=True):
        expected, resized = official_transform_numpy(cell, 32)
        # Pixels whose resized value lies within 1e-3 of an integer may truncate either way
        # between float32 and float64; all others must agree to float32 precision.
        clear = np.abs(resized - np.round(resized)) > 1e-3
        assert clear.mean() > 0.99
        np.testing.assert_allclose(got[clear], expected[clear], rtol=0, atol=1e-6)
        off_by_one = np.abs(np.sinh(got * 7 + 7) - np.sinh(expected * 7 + 7))
        assert off_by_one.max() < 1.01  # at most one intensity step anywhere
        # torchvision's own transforms, float32 all the way as in the official code
        torch.testing.assert_close(
            torch.from_numpy(got), official_transform_torchvision(cell, 32), rtol=0, atol=1e-6
        )


def test_float_pixels_are_not_truncated() -> None:
    cells = _cells(2, 40, seed=2).astype(np.float32) + 0.25
    ours = ArcsinhPreprocessor(image_size=20)(torch.from_numpy(cells)).numpy()
    rows = numpy_resize_weights(40, 20)
    resized = np.einsum("ih,nchw,jw->ncij", rows, cells.astype(np.float64), rows)
    np.testing.assert_allclose(ours, (np.arcsinh(resized) - 7) / 7, rtol=0, atol=1e-6)


def test_preprocessor_for_arcsinh_ignores_statistics() -> None:
    chosen = preprocessor_for(
        None, channel_stats={"mean": [1.0], "std": [2.0]}, image_size=16, batch_stats=None,
        normalize="arcsinh",
    )  # fmt: skip
    assert isinstance(chosen, ArcsinhPreprocessor) and chosen.image_size == 16
    with pytest.raises(ValueError, match="normalize"):
        preprocessor_for(None, channel_stats={}, image_size=16, batch_stats=None, normalize="x")


def _store(path: Path) -> Path:
    """6 perturbations x 3 wells x 6 cells: 2 channels of 16 px uint16, wells unlike in light."""
    rng = np.random.default_rng(0)
    rows, images = [], []
    for perturbation in range(6):
        for well in range(3):
            for cell in range(6):
                image = rng.gamma(2.0, 300.0 * (1 + well), size=(2, 16, 16)) + 50
                image[perturbation % 2, 4:12, 4:12] *= 1 + perturbation // 2
                images.append(image.clip(0, 65535).astype(np.uint16))
                rows.append(
                    {
                        "cell_id": f"p{perturbation}w{well}c{cell}",
                        "gene": f"g{perturbation}",
                        "plate": "P1",
                        "well": f"W{well}",
                    }
                )
    create_store(
        path, images=np.stack(images), obs=pd.DataFrame(rows), channel_names=["dna", "actin"],
        perturbation_column="gene", split_fractions=(0.6, 0.2, 0.2), seed=0,
    )  # fmt: skip
    return path


def test_train_records_arcsinh_and_embed_applies_it(tmp_path: Path) -> None:
    import anndata as ad

    from scbd_cells import embed, train

    store_path = _store(tmp_path / "screen.zarr")
    result = train(
        store_path, out=tmp_path / "run", normalize="arcsinh", image_size=8, steps=2,
        val_every=2, encoder="tiny", classes_per_batch=6, cells_per_class=3, z_dim=8,
        val_batches=1, workers=0, device="cpu",
    )  # fmt: skip
    checkpoint = load_checkpoint(result.best_checkpoint_path)
    assert checkpoint["normalize"] == "arcsinh" and checkpoint["batch_channel_stats"] is None
    trained = load_trained(tmp_path / "run")
    assert trained.normalize == "arcsinh"

    # embed's X is the model applied to the official transform of the raw pixels (16 -> 8 px)
    store = open_store(store_path)
    raw = store.read(np.arange(store.n_cells))
    inputs = np.stack([official_transform_numpy(cell, 8)[0] for cell in raw]).astype(np.float32)
    with torch.inference_mode():
        expected = trained.model(torch.from_numpy(inputs)).z_perturbation.numpy()
    cells = ad.read_h5ad(embed(tmp_path / "run", store_path, out=tmp_path / "cells.h5ad",
                               device="cpu").out_path)  # fmt: skip
    np.testing.assert_allclose(cells.X, expected, atol=1e-5)
    assert cells.uns["scbd"]["config"]["normalize"] == "arcsinh"


def test_checkpoints_from_before_the_entry_keep_their_transform(tmp_path: Path) -> None:
    """No ``normalize`` entry: per-well statistics mean batch, none mean store."""
    assert normalize_of({"batch_channel_stats": {"labels": []}}) == "batch"
    assert normalize_of({"batch_channel_stats": None}) == "store"
    assert normalize_of({}) == "store"
    assert normalize_of({"normalize": "arcsinh", "batch_channel_stats": None}) == "arcsinh"

    from scbd_cells import train

    store_path = _store(tmp_path / "screen.zarr")
    train(
        store_path, out=tmp_path / "run", steps=1, val_every=1, encoder="tiny",
        classes_per_batch=6, cells_per_class=3, z_dim=8, val_batches=1, workers=0, device="cpu",
    )  # fmt: skip
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    dropped = ("normalize", "version", "package_version")
    old = {k: v for k, v in load_checkpoint(best).items() if k not in dropped}
    save_checkpoint(old, best)
    trained = load_trained(tmp_path / "run")
    assert trained.normalize == "batch" and trained.batch_stats is not None
