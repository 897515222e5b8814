"""Benchmark: class-balanced batches per second from a store, against the one-row-at-a-time path.

Measures, in one run on one store:

- the *reference* loader, written the way the official SCBD code feeds its
  model: for every cell of a balanced batch, a pandas row, a read of that one
  cell from the store, a torchvision resize, then a pandas concat per batch;
- :class:`scbd_cells.data.loader.BalancedLoader` with the images cached in
  memory (also followed by the device-side ``Preprocessor``, uint ->
  normalised float, so that both sides deliver model-ready tensors), and with
  a cache budget smaller than the store: segment reads (``backend="chunks"``,
  what ``auto`` picks then: whole chunks decoded and kept, the sampler drawing
  each class segment by segment) at half the store and at 1.25 x one segment
  per class, then per-row reads through tensorstore and zarr-python.

Rates are cells per wall second and cells per CPU second of the process (all
threads), the per-core figure the ratio is taken on. Examples::

    python benchmarks/loader.py                          # synthetic 100 k-cell store, CPU
    python benchmarks/loader.py --source simulate --preset large --record
    python benchmarks/loader.py --device cuda --workers 8 --record
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from common import (
    add_json_argument,
    add_store_arguments,
    benchmark_store,
    markdown_table,
    peak_rss_gb,
    record,
    write_json,
)

from scbd_cells.data import schema
from scbd_cells.data.loader import BalancedLoader, SegmentReader, segment_cells_of
from scbd_cells.data.sampler import BalancedBatchSampler
from scbd_cells.model.preprocess import Preprocessor

OFFICIAL_CELLS_PER_CORE = 4_300  # DESIGN.md "Performance": the official data path


class ReferenceLoader:
    """The official data path: one pandas row, one store read, one resize per cell."""

    def __init__(self, store, sampler: BalancedBatchSampler, *, image_size: int) -> None:
        self.table = store.obs.reset_index(drop=True)
        self.images = store.images
        self.sampler = sampler
        self.image_size = image_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, images = [], []
        for index in self.sampler.next_indices():
            row = self.table.iloc[[int(index)]]  # a one-row DataFrame per cell
            image = torch.from_numpy(self.images[int(index)].astype(np.float32))  # (C, H, W)
            image = TF.resize(image, [self.image_size, self.image_size], antialias=True)
            rows.append(row)
            images.append(image)
        table = pd.concat(rows)
        perturbation = torch.as_tensor(table[schema.PERTURBATION].cat.codes.to_numpy().copy())
        batch = torch.as_tensor(table[schema.BATCH].cat.codes.to_numpy().copy())
        return torch.stack(images), perturbation.long(), batch.long()


def _sampler(store, args, seed: int) -> BalancedBatchSampler:
    codes, _ = store.codes(schema.PERTURBATION)
    split = store.obs[schema.SPLIT].to_numpy()
    train_rows = np.flatnonzero(split == "train")
    return BalancedBatchSampler(
        codes,
        train_rows,
        classes_per_batch=args.classes_per_batch,
        cells_per_class=args.cells_per_class,
        seed=seed,
    )


def _settle(loaders) -> None:
    """Wait until every loader's prefetched batches are read, so no thread works in the background.

    Each timed window starts and ends settled: the reads done in it are then
    exactly those of the batches it consumed (the prefetch queue is as full at
    the end as at the start), and no other loader's prefetching runs in it.
    """
    for loader in loaders:
        for _, pending in loader._pending:  # benchmark-only peek at the prefetch queue
            if hasattr(pending, "result"):
                pending.result()


def _time(
    run_batch,
    n_batches: int,
    batch_size: int,
    device: torch.device,
    *,
    warmup: int = 1,
    loaders=(),
) -> tuple[float, float]:
    """(cells per wall second, cells per CPU second) over ``n_batches`` after ``warmup``."""
    for _ in range(warmup):
        run_batch()
    _settle(loaders)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        run_batch()
    _settle(loaders)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cells = n_batches * batch_size
    return cells / wall, cells / max(cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes-per-batch", type=int, default=256)
    parser.add_argument("--cells-per-class", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per loader")
    parser.add_argument("--reference-batches", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="loader threads")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--chunks-warmup",
        type=int,
        default=400,
        help="at most this many untimed batches before timing segment reads: at least 30, and "
        "until the decoded segments fill 90%% of the budget (a one-off, like the in-memory copy)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timed windows")
    add_json_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    store = benchmark_store(args)
    batch_size = args.classes_per_batch * args.cells_per_class
    image_size = store.image_size[0]
    store_gb = store.n_cells * store.n_channels * image_size**2 * store.dtype.itemsize / 1e9
    preprocess = Preprocessor(store.channel_stats, image_size=image_size)
    print(f"store: {store.path} ({store.n_cells:,} cells, {store_gb:.2f} GB, {store.dtype})")

    rows = []
    reference = ReferenceLoader(store, _sampler(store, args, 0), image_size=image_size)
    ref_wall, ref_cpu = _time(reference.next_batch, args.reference_batches, batch_size, device)
    rows.append(["reference (row at a time)", "zarr, 1 row", 0, ref_wall, ref_cpu, 1.0])

    n_classes = len(_sampler(store, args, 0).classes)
    segment_gb = SegmentReader(store, budget_gb=0).recommended_gb(n_classes)
    per_class_gb = min(1.25 * segment_gb, 0.9 * store_gb)  # still smaller than the store
    configs = [  # (reads, cache budget GB, with the Preprocessor)
        ("memory", 2 * store_gb + 1, False),
        ("memory", 2 * store_gb + 1, True),
        ("chunks", store_gb / 2, False),
        ("chunks", per_class_gb, False),
        ("tensorstore", store_gb / 2, False),
        ("zarr", store_gb / 2, False),
    ]
    loaders = {}  # one loader per reads and budget (the Preprocessor row reuses the memory one)
    for backend, cache_gb, _ in configs:
        if (backend, cache_gb) not in loaders:
            sampler = _sampler(store, args, 0)
            if backend == "chunks":  # train --sampling segments
                sampler.use_segments(segment_cells_of(store))
            loaders[backend, cache_gb] = BalancedLoader(
                store,
                sampler,
                device=device,
                cache_gb=cache_gb,
                workers=args.workers,
                prefetch=args.prefetch,
                backend=backend,
            )
            loader = loaders[backend, cache_gb]
            next(loader)
            if backend == "chunks":  # until the kept segments fill the budget: a one-off
                assert loader.backend == "chunks"
                for step in range(args.chunks_warmup):
                    full = loader.reader.kept_bytes >= 0.9 * loader.reader.budget_bytes
                    if step >= 30 and full:
                        break
                    next(loader)

    # Timed windows, the configurations taking turns, `--repeats` rounds: on a shared machine
    # the load changes over seconds, and a ratio from one round compares neighbours in time.
    rates = {config: [] for config in configs}
    all_loaders = list(loaders.values())
    for _ in range(args.repeats):
        for backend, cache_gb, with_preprocess in configs:
            loader = loaders[backend, cache_gb]

            def run_batch(loader=loader, with_preprocess=with_preprocess) -> None:
                batch = next(loader)
                if with_preprocess:
                    preprocess(batch.images)

            slow = backend in ("tensorstore", "zarr")
            n_batches = max(2, args.batches // 4) if slow else args.batches
            rates[backend, cache_gb, with_preprocess].append(
                _time(run_batch, n_batches, batch_size, device, warmup=0, loaders=all_loaders)
            )
    decodes = []
    for (backend, _), loader in loaders.items():
        if backend == "chunks":  # batches drawn, prefetched ones included (read or in flight)
            drawn = loader.sampler.batches_drawn * batch_size
            decodes.append(drawn / loader.reader.decoded_segments)
        loader.close()

    def median(config, which: int) -> float:
        return float(np.median([rate[which] for rate in rates[config]]))

    for backend, cache_gb, with_preprocess in configs:
        config = (backend, cache_gb, with_preprocess)
        name = "BalancedLoader" + (" + Preprocessor" if with_preprocess else "")
        label = f"{backend}, cache budget {cache_gb:.2f} GB"
        if backend == "chunks":
            label = f"segments ({loaders[backend, cache_gb].reader.backend}), {label[8:]}"
        wall, cpu = median(config, 0), median(config, 1)
        rows.append([name, label, args.workers, wall, cpu, cpu / ref_cpu])

    def slower(config) -> str:
        """Median over rounds of (memory / config) per core, with the range."""
        ratios = [m[1] / c[1] for m, c in zip(rates[configs[0]], rates[config], strict=True)]
        return f"{np.median(ratios):.2f}× (rounds: {min(ratios):.2f}–{max(ratios):.2f})"

    memory_cpu = rows[1][4]
    shards = getattr(store.images, "shards", None)
    shards = f" in shards {tuple(shards)}" if shards else ""
    body = markdown_table(
        ["loader", "reads", "threads", "cells/s", "cells/CPU-s", "× reference per core"], rows
    )
    body += (
        f"\n\nStore: {store.n_cells:,} cells, {store.n_channels} × {image_size} px "
        f"{store.dtype}, {store_gb:.2f} GB, chunks {tuple(store.images.chunks)}"
        f"{shards}; batches of "
        f"{args.classes_per_batch} classes × {args.cells_per_class} cells on {device}; "
        f"medians of {args.repeats} rounds in which the loaders take turns. "
        f"Per core, the loader alone is {memory_cpu / ref_cpu:.0f}× this reference and "
        f"{memory_cpu / OFFICIAL_CELLS_PER_CORE:.1f}× the official path's "
        f"{OFFICIAL_CELLS_PER_CORE:,} cells/s per core quoted in DESIGN.md. "
        f"Store larger than the cache budget vs in memory (per core): segment reads "
        f"{slower(configs[2])} slower with a budget of half the store and "
        f"{slower(configs[3])} with {per_class_gb:.2f} GB (1.25 × one "
        f"{segment_gb / n_classes * 1e3:.2f} MB segment for each of the {n_classes} classes; "
        f"{' and '.join(f'{v:.1f}' for v in decodes)} cells drawn per segment decoded, "
        f"untimed warm-up included: 30 batches or more, until the kept segments filled 90 % "
        f"of the budget); per-row reads: "
        f"tensorstore {slower(configs[4])}, zarr-python {slower(configs[5])} slower. "
        f"Peak RSS {peak_rss_gb():.2f} GB."
    )
    record("Loader: balanced batches vs the one-row-at-a-time path", body, enabled=args.record)

    def ratio(config) -> float:
        return float(np.median([m[1] / c[1] for m, c in zip(rates[configs[0]], rates[config],
                                                             strict=True)]))  # fmt: skip

    write_json(
        args.json,
        {
            "reference_cells_per_cpu_s": ref_cpu,
            "memory_cells_per_s": median(configs[0], 0),
            "memory_cells_per_cpu_s": median(configs[0], 1),
            "memory_with_preprocess_cells_per_s": median(configs[1], 0),
            "segments_half_cells_per_s": median(configs[2], 0),
            "segments_half_cells_per_cpu_s": median(configs[2], 1),
            "segments_half_slower": ratio(configs[2]),
            "segments_tight_cells_per_cpu_s": median(configs[3], 1),
            "segments_tight_slower": ratio(configs[3]),
            "tight_budget_gb": per_class_gb,
            "store_gb": store_gb,
            "n_cells": store.n_cells,
            "workers": args.workers,
            "device": str(device),
        },
    )


if __name__ == "__main__":
    main()
