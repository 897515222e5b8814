"""CUDA: what only a GPU can check. Skipped without one; benchmarks/gpu_suite.sh runs them.

The training loop and embed switch to bf16 autocast and channels_last on CUDA (no option),
and the images reach the device as int32 (torch has no CUDA indexing for uint16): these
tests check that the CUDA path trains, gives the CPU's embedding up to bf16 rounding, and
that every preprocessing gives the CPU's numbers on the device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_train_on_cuda_then_embed_matches_the_cpu(tiny_store: Path, tmp_path: Path) -> None:
    import anndata as ad
    import pandas as pd

    from scbd_cells import embed, train

    result = train(
        tiny_store, out=tmp_path / "run", device="cuda", encoder="resnet18", steps=4,
        val_every=4, classes_per_batch=8, cells_per_class=4, z_dim=16, workers=0,
    )  # fmt: skip
    metrics = pd.read_csv(result.metrics_path)
    assert np.isfinite(metrics["loss"]).all() and result.step == 4
    on_gpu = embed(tmp_path / "run", tiny_store, out=tmp_path / "gpu.h5ad", device="cuda")
    on_cpu = embed(tmp_path / "run", tiny_store, out=tmp_path / "cpu.h5ad", device="cpu")
    gpu, cpu = ad.read_h5ad(on_gpu.out_path).X, ad.read_h5ad(on_cpu.out_path).X
    cosine = (gpu * cpu).sum(axis=1)  # both unit-norm; bf16 on CUDA, float32 on the CPU
    assert np.median(cosine) > 0.99 and cosine.min() > 0.95


@pytest.mark.parametrize("normalize", ["store", "batch", "arcsinh"])
def test_preprocessing_on_cuda_equals_the_cpu(normalize: str) -> None:
    from scbd_cells.model.preprocess import ArcsinhPreprocessor, Preprocessor

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(100, 4000, (16, 4, 40, 40), generator=generator, dtype=torch.int32)
    batch = torch.arange(16) % 3
    stats = {"mean": [900.0, 1000.0, 1100.0, 1200.0], "std": [300.0, 310.0, 320.0, 330.0]}
    if normalize == "arcsinh":
        preprocess = ArcsinhPreprocessor(image_size=32)
    elif normalize == "batch":
        rng = np.random.default_rng(0)
        preprocess = Preprocessor(
            stats, image_size=32, batch_mean=rng.uniform(800, 1200, (3, 4)),
            batch_std=rng.uniform(200, 400, (3, 4)),
        )  # fmt: skip
    else:
        preprocess = Preprocessor(stats, image_size=32)
    on_cpu = preprocess(images, batch)
    on_gpu = preprocess(images.cuda(), batch.cuda()).cpu()
    difference = (on_gpu - on_cpu).abs()
    # arcsinh truncates the resized values to integers as torchvision does: a value that
    # rounds to either side of an integer on the two devices moves by one intensity step
    assert float(difference.mean()) < 1e-5
    assert float(difference.max()) < (2e-3 if normalize == "arcsinh" else 1e-4)
