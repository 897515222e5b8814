"""Shared benchmark helpers: the machine's description, tables, benchmark stores, the log file."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
PERFORMANCE_MD = REPO / "docs" / "performance-log.md"  # the run log (performance.md: current)


def machine_info() -> str:
    """One line naming the machine: platform, CPU cores, torch version, GPU."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores (torch threads {torch.get_num_threads()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}, {gpu}"
    )


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; floats get thousands separators."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def record(title: str, body: str, *, enabled: bool) -> None:
    """Print a result section and, if ``enabled``, append it to docs/performance-log.md."""
    command = " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv])
    section = (
        f"\n### {title} — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        f"Machine: {machine_info()}.\n\nCommand: `{command}`\n\n{body}\n"
    )
    print(section)
    if enabled:
        with PERFORMANCE_MD.open("a", encoding="utf-8") as handle:
            handle.write(section)
        print(f"appended to {PERFORMANCE_MD}")


def synthetic_store(
    path: Path,
    *,
    n_cells: int,
    n_classes: int,
    image_size: int,
    channels: int = 4,
    n_wells: int = 32,
    seed: int = 0,
    chunk_cells: int | None = None,
    shard_cells: int | None = None,
):
    """A store from ``create_store``: uint16 cell-like blobs, Zipf-ish class sizes, wells.

    The pixels are smooth blobs plus noise so that compression behaves roughly
    like microscopy (pure noise would not compress, zeros would compress too well).
    """
    from scbd_cells.data.store import create_store, open_store

    if (path / "zarr.json").exists():
        return open_store(path)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_classes + 1) ** 0.5
    genes = rng.choice(n_classes, size=n_cells, p=weights / weights.sum())
    grid = np.linspace(-1, 1, image_size, dtype=np.float32)
    radius = grid[None, :] ** 2 + grid[:, None] ** 2  # (H, W)
    images = np.empty((n_cells, channels, image_size, image_size), dtype=np.uint16)
    for start in range(0, n_cells, 8192):
        stop = min(n_cells, start + 8192)
        n = stop - start
        scale = rng.uniform(0.2, 0.6, size=(n, 1, 1, 1)).astype(np.float32)
        level = rng.uniform(500, 4000, size=(n, channels, 1, 1)).astype(np.float32)
        blob = level * np.exp(-radius[None, None] / scale)
        noise = rng.normal(0, 40, size=blob.shape).astype(np.float32)
        images[start:stop] = np.clip(blob + noise + 200, 0, 65535).astype(np.uint16)
    obs = pd.DataFrame(
        {
            "gene": [f"gene_{k:05d}" for k in genes],
            "plate": [f"P{k // 8}" for k in rng.integers(0, n_wells, n_cells)],
            "well": [f"W{k:02d}" for k in rng.integers(0, 8, n_cells)],
        }
    )
    return create_store(
        path,
        images=images,
        obs=obs,
        channel_names=[f"ch{i}" for i in range(channels)],
        perturbation_column="gene",
        seed=seed,
        chunk_cells=chunk_cells,
        shard_cells=shard_cells,
    )


def simulated_store(
    path: Path, *, preset: str, cells_per_guide: int | None, workers: int, resize: int | None = None
):
    """Simulate (``scbd_cells.simulate``) and ingest a screen (crops resized to ``resize``
    px if given), or open it if it exists."""
    from scbd_cells import ingest, open_store, simulate

    if (path / "zarr.json").exists():
        return open_store(path)
    screen_dir = path.with_suffix(".screen")
    if not (screen_dir / "cells.csv").exists():
        simulate(
            screen_dir,
            preset=preset,
            seed=0,
            workers=workers,
            cells_per_guide=cells_per_guide,
            overwrite=True,
        )
    ingest(
        screen_dir / "cells.csv",
        out=path,
        perturbation_column="gene",
        guide_column="guide",
        control="nontargeting",
        workers=workers,
        resize=resize,
    )
    return open_store(path)


def benchmark_store(args) -> object:
    """The store a benchmark runs on: ``--store``, or built under ``--work-dir``."""
    from scbd_cells.data.store import open_store

    if args.store:
        return open_store(args.store)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.source == "simulate":
        name = f"sim_{args.preset}_{args.cells_per_guide}.zarr"
        return simulated_store(
            work_dir / name,
            preset=args.preset,
            cells_per_guide=args.cells_per_guide,
            workers=args.build_workers,
        )
    name = f"synthetic_{args.cells}_{args.classes}_{args.image_size}.zarr"
    if args.chunk_cells or args.shard_cells:
        name = name.replace(".zarr", f"_c{args.chunk_cells}_s{args.shard_cells}.zarr")
    return synthetic_store(
        work_dir / name,
        n_cells=args.cells,
        n_classes=args.classes,
        image_size=args.image_size,
        chunk_cells=args.chunk_cells,
        shard_cells=args.shard_cells,
    )


def one_step_run(store_path, run_dir: Path, *, encoder: str, device: str, **options) -> Path:
    """A run folder with a checkpoint for ``embed`` after one training step.

    Embed speed and memory do not depend on the weights, so one step is enough.
    """
    from scbd_cells import train

    train(
        store_path,
        out=run_dir,
        encoder=encoder,
        classes_per_batch=8,
        cells_per_class=4,
        steps=1,
        val_every=1,
        device=device,
        workers=0,
        **options,
    )
    return run_dir


def add_store_arguments(parser) -> None:
    """The options every benchmark shares to find or build its store."""
    parser.add_argument("--store", help="an existing store (skips building one)")
    parser.add_argument("--source", choices=["synthetic", "simulate"], default="synthetic")
    parser.add_argument("--preset", default="large", help="simulate preset (--source simulate)")
    parser.add_argument(
        "--cells-per-guide", type=int, default=None, help="override the preset's cells per guide"
    )
    parser.add_argument("--cells", type=int, default=100_000, help="synthetic store size")
    parser.add_argument("--classes", type=int, default=500, help="synthetic perturbations")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic image side")
    parser.add_argument("--chunk-cells", type=int, default=None, help="synthetic chunk length")
    parser.add_argument("--shard-cells", type=int, default=None, help="synthetic shard length")
    parser.add_argument("--work-dir", default="/tmp/scbd-bench", help="where stores are built")
    parser.add_argument("--build-workers", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append to docs/performance-log.md")


def add_json_argument(parser) -> None:
    """``--json PATH``: also write the figures as JSON (what ``gpu_suite.py`` reads)."""
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def write_json(path: str | None, values: dict) -> None:
    """Write ``values`` (numbers and strings) to ``path``; nothing when ``path`` is None."""
    if path:
        Path(path).write_text(json.dumps(values, indent=1, default=float) + "\n")
