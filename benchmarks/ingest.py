"""Benchmark ingest: cells/s with 1 and N workers on a simulated screen, then store read rates.

Usage::

    # the large preset (~1 M cells; simulating it takes a while, done once)
    python benchmarks/ingest.py --preset large --workers 1,2 --record
    # a subset here: a smaller screen from the large preset's design, first 40,000 rows
    python benchmarks/ingest.py --preset large --cells-per-guide 10 --cells 40000 --record

Each ingest runs on a warm page cache (the image files are read once before
timing, untimed) into a fresh store, so the workers are compared on decode and
write work, not on the disk. After ingest, ``Store.read`` is timed for three
access patterns on the store just written: contiguous runs, class-balanced
batches (classes × cells per class, as training draws them) and uniformly
random rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))


def screen(args) -> Path:
    """The simulated screen's cells table (simulated once under --work-dir)."""
    from scbd_cells import simulate

    if args.screen:
        return Path(args.screen) / "cells.csv"
    name = f"{args.preset}_{args.layout}_{args.cells_per_guide}_{args.control_cells_per_guide}"
    screen_dir = Path(args.work_dir) / name
    if not (screen_dir / "cells.csv").exists():
        started = time.perf_counter()
        simulate(
            screen_dir,
            preset=args.preset,
            layout=args.layout,
            seed=0,
            workers=args.simulate_workers,
            cells_per_guide=args.cells_per_guide,
            control_cells_per_guide=args.control_cells_per_guide,
            overwrite=True,
        )
        print(f"simulated {screen_dir} in {time.perf_counter() - started:.0f} s")
    return screen_dir / "cells.csv"


def warm_cache(table: pd.DataFrame, columns: list[str], base_dir: Path) -> None:
    """Read every image file once so that each timed run starts from the same warm cache."""
    for column in columns:
        for path in pd.unique(table[column]):
            (base_dir / path).read_bytes()


def read_rates(store, *, seed: int = 0, batch: int = 2048, repeats: int = 20) -> dict[str, float]:
    """Rows/s of ``Store.read`` for contiguous, class-balanced and random batches."""
    rng = np.random.default_rng(seed)
    n = store.n_cells
    batch = min(batch, n)
    ranges = list(store.class_ranges().values())
    per_class = 8
    n_classes = min(len(ranges), max(1, batch // per_class))

    def contiguous() -> np.ndarray:
        start = int(rng.integers(0, n - batch + 1))
        return np.arange(start, start + batch)

    def balanced() -> np.ndarray:
        chosen = rng.choice(len(ranges), size=n_classes, replace=False)
        return np.concatenate(
            [rng.integers(ranges[c][0], ranges[c][1], size=per_class) for c in chosen]
        )

    def random() -> np.ndarray:
        return rng.integers(0, n, size=batch)

    rates = {}
    for name, draw in (
        ("contiguous", contiguous),
        ("class-balanced", balanced),
        ("random", random),
    ):
        store.read(draw())  # warm up
        rows, started = 0, time.perf_counter()
        for _ in range(repeats):
            indices = draw()
            store.read(indices)
            rows += len(indices)
        rates[name] = rows / (time.perf_counter() - started)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screen", help="an existing simulated screen folder (skips simulating)")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--layout", default="crops", choices=["crops", "fields"])
    parser.add_argument("--cells-per-guide", type=int, default=None, help="preset override")
    parser.add_argument("--control-cells-per-guide", type=int, default=None, help="override")
    parser.add_argument("--cells", type=int, default=None, help="ingest only the first N rows")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--simulate-workers", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/scbd-bench-ingest")
    parser.add_argument("--record", action="store_true", help="append to docs/performance-log.md")
    args = parser.parse_args()

    # imported here, not at the top: worker processes re-import this script,
    # and `common` imports torch
    from common import markdown_table, record

    from scbd_cells import ingest, open_store
    from scbd_cells.core.progress import set_quiet
    from scbd_cells.data import schema

    set_quiet(True)
    table_path = screen(args)
    table = pd.read_csv(table_path)
    if args.cells:
        table = table.head(args.cells)
    subset_path = table_path.with_name(f"cells_{len(table)}.csv")
    table.to_csv(subset_path, index=False)
    if args.layout == "crops":
        image_options = {"image_column": "image_path"}
        columns = ["image_path"]
    else:
        columns = [f"{name}_path" for name in schema.SIM_CHANNELS]
        crop = int(
            pd.read_json(table_path.with_name("truth.json"), typ="series")["params"]["crop_size"]
        )
        image_options = {
            "fov_channel_columns": columns,
            "x_column": "x",
            "y_column": "y",
            "crop_size": crop,
        }
    warm_cache(table, columns, table_path.parent)
    load_before = os.getloadavg()[0]

    rows, stores = [], {}
    for workers in [int(w) for w in args.workers.split(",")]:
        out = Path(args.work_dir) / f"ingest_w{workers}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        result = ingest(
            subset_path,
            out=out,
            perturbation_column="gene",
            guide_column="guide",
            control="nontargeting",
            workers=workers,
            **image_options,
        )
        stores[workers] = out
        rows.append([workers, result.n_cells, result.seconds, result.cells_per_second])
        print(
            f"workers={workers}: {result.n_cells:,} cells in {result.seconds:.1f} s "
            f"= {result.cells_per_second:,.0f} cells/s"
        )
    base = rows[0][3]
    for row in rows:
        row.append(f"{row[3] / base:.2f}x")
    store = open_store(stores[min(stores)])
    summary = store.summary()
    body = (
        f"Screen: `{args.preset}` preset ({args.layout}), {summary['n_cells']:,} cells, "
        f"{summary['n_channels']} × {summary['image_size'][0]} × {summary['image_size'][1]} "
        f"{summary['dtype']}, {summary['n_perturbations']} perturbations; store "
        f"{summary['size_bytes'] / 2**20:,.0f} MiB on disk for {summary['raw_bytes'] / 2**20:,.0f} "
        f"MiB of pixels, {summary['chunk_cells']} cells per chunk. Warm page cache; load "
        f"average before/after the runs {load_before:.1f} / {os.getloadavg()[0]:.1f} "
        f"(other jobs share the cores when it exceeds the core count).\n\n"
        + markdown_table(["workers", "cells", "seconds", "cells/s", "vs 1 worker"], rows)
    )
    rates = read_rates(store)
    body += "\n\n`Store.read` on that store, batches of 2,048 rows (class-balanced: 256 × 8):\n\n"
    body += markdown_table(["access", "rows/s"], [[name, rate] for name, rate in rates.items()])
    record("Ingest throughput (benchmarks/ingest.py)", body, enabled=args.record)


if __name__ == "__main__":
    main()
