"""Benchmark: training steps per second of the real loop vs the same model on a batch on the device.

Two rates from one run and one store:

- *real*: ``scbd_cells.train`` (loader, device-side preprocessing, the model,
  the SCBD losses, AdamW), read from its ``metrics.csv`` after warm-up windows;
- *device only*: the same model, preprocessing, losses and optimiser stepping
  over a few batches that already sit on the device (no loader at all).

Their ratio is the share of the GPU's speed that the data path keeps (target
≥ 85 % on an H200 at 32 px, bf16 + channels_last, batch 2048). On CUDA the
training loop always uses bf16 autocast and channels_last. Examples::

    python benchmarks/train_step.py --cells 20000 --encoder resnet18 \\
        --classes-per-batch 16 --cells-per-class 4 --steps 20          # CPU smoke figures
    python benchmarks/train_step.py --device cuda --cells 1000000 --steps 300 --record
    python benchmarks/train_step.py --device cuda --cells 1000000 --image-size 64 --steps 300
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import (
    add_json_argument,
    add_store_arguments,
    benchmark_store,
    markdown_table,
    peak_rss_gb,
    record,
    write_json,
)

from scbd_cells import train
from scbd_cells.data import schema
from scbd_cells.data.batch_stats import batch_channel_stats
from scbd_cells.data.loader import BalancedLoader
from scbd_cells.data.sampler import BalancedBatchSampler
from scbd_cells.model.losses import scbd_loss
from scbd_cells.model.preprocess import preprocessor_for
from scbd_cells.model.scbd import SCBDModel


def device_only_rate(store, args, device: torch.device) -> float:
    """Steps per second of model + losses + AdamW on batches already on the device."""
    codes, _ = store.codes(schema.PERTURBATION)
    sampler = BalancedBatchSampler(
        codes,
        np.arange(store.n_cells),
        classes_per_batch=args.classes_per_batch,
        cells_per_class=args.cells_per_class,
        seed=0,
    )
    with BalancedLoader(store, sampler, device=device, workers=1, cache_gb=0) as loader:
        batches = [next(loader) for _ in range(4)]  # (images, labels) resident on the device
    image_size = args.model_size or store.image_size[0]
    model_args = {
        "encoder": args.encoder,
        "in_channels": store.n_channels,
        "image_size": image_size,
        "z_dim": 64,
        "decoder": False,
        "decoder_width": 256,
    }
    torch.manual_seed(0)
    model = SCBDModel(model_args).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    forward_model = torch.compile(model) if args.compile else model
    preprocessor = preprocessor_for(  # train's default: per-well statistics
        store.codes(schema.BATCH)[1],
        channel_stats=store.channel_stats,
        image_size=image_size,
        batch_stats=batch_channel_stats(store),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(batch) -> None:
        images = preprocessor(batch.images, batch.batch)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            output = forward_model(images)
        losses = scbd_loss(
            output.z_perturbation.float(),
            output.z_batch.float(),
            perturbation=batch.perturbation,
            batch=batch.batch,
            alpha=1.0,
        )
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        float(losses.total.detach())  # the real loop reads the loss every step, as here

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
    return args.steps / (time.perf_counter() - start)


def real_loop_rate(store, args, device: torch.device, run_dir: Path) -> float:
    """Steps per second of ``scbd_cells.train`` after ``--warmup`` steps (from metrics.csv)."""
    log_every = max(1, args.warmup)
    train(
        store.path,
        out=run_dir,
        encoder=args.encoder,
        image_size=args.model_size,
        classes_per_batch=args.classes_per_batch,
        cells_per_class=args.cells_per_class,
        steps=args.warmup + args.steps,
        val_every=10**9,  # validation only after the last step, outside the timed windows
        log_every=log_every,
        device=str(device),
        compile=args.compile,
        cache_gb=args.cache_gb,
        workers=args.workers,
        prefetch=args.prefetch,
        alpha=1.0,
    )
    metrics = pd.read_csv(run_dir / "metrics.csv")
    windows = metrics[(metrics["phase"] == "train") & (metrics["step"] > args.warmup)]
    steps = windows["step"].diff().fillna(windows["step"].iloc[0] - args.warmup)
    seconds = steps / windows["steps_per_s"]
    return float(steps.sum() / seconds.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--model-size", type=int, default=None, help="model input px")
    parser.add_argument("--classes-per-batch", type=int, default=256)
    parser.add_argument("--cells-per-class", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cache-gb", type=float, default=64.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_json_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    store = benchmark_store(args)
    batch_size = args.classes_per_batch * args.cells_per_class

    only = device_only_rate(store, args, device)
    with tempfile.TemporaryDirectory(prefix="scbd-train-bench-") as tmp:
        real = real_loop_rate(store, args, device, Path(tmp) / "run")
    image_size = args.model_size or store.image_size[0]
    rows = [
        ["device only (batch resident)", only, only * batch_size, 1.0],
        ["real loop (train + loader)", real, real * batch_size, real / only],
    ]
    body = markdown_table(["loop", "steps/s", "cells/s", "share of device-only"], rows)
    body += (
        f"\n\n{args.encoder} ×2 at {image_size} px, batch {args.classes_per_batch} × "
        f"{args.cells_per_class} = {batch_size}, {args.steps} timed steps after {args.warmup}, "
        f"on {device}{' (bf16 autocast, channels_last)' if device.type == 'cuda' else ''}"
        f"{', torch.compile' if args.compile else ''}; loader: {args.workers} threads, "
        f"prefetch {args.prefetch}, cache budget {args.cache_gb} GB; store "
        f"{store.n_cells:,} cells. Peak RSS {peak_rss_gb():.2f} GB."
    )
    record("Training step rate: real loop vs batch on the device", body, enabled=args.record)
    store_gb = store.n_cells * store.n_channels * store.image_size[0] ** 2 * store.dtype.itemsize
    write_json(
        args.json,
        {
            "device_only_steps_per_s": only,
            "real_steps_per_s": real,
            "real_cells_per_s": real * batch_size,
            "share": real / only,
            "batch_size": batch_size,
            "image_size": image_size,
            "encoder": args.encoder,
            "n_cells": store.n_cells,
            "store_gb": store_gb / 1e9,
            "cache_gb": args.cache_gb,
            "compile": args.compile,
            "peak_rss_gb": peak_rss_gb(),
        },
    )


if __name__ == "__main__":
    main()
