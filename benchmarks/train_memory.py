"""Benchmark: what part of ``train``'s memory grows with the number of cells, and what part
with the batch.

On the ``large`` simulated screen at two sizes (its cells per guide scaled down for the
smaller one: same genes, guides and wells), each measurement in its own process:

- *set-up*: what ``train`` builds before its first batch (the label columns, the codes, the
  class-balanced sampler, the loader), as resident memory after it minus after the imports,
  through the training loop's own set-up function; its growth between the two stores,
  divided by the cells added, is the part that scales with the screen;
- *a whole run*: ``scbd-cells train --steps 2`` under GNU time (peak RSS) with a cache budget
  smaller than the store (the loader reads rows, as on a screen that does not fit in memory),
  at train's batch and, on the larger store, at a quarter of it: the difference is the
  batch's share (activations, and the chunks a batch of row reads decodes).

Usage::

    python benchmarks/train_memory.py --work-dir /scratch/bench --record
    python benchmarks/train_memory.py --stores small.zarr large.zarr   # stores already built
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import markdown_table, record, simulated_store

from scbd_cells.data.store import open_store

GIB = 2**30


def train_peak(store: Path, *, steps: int, classes_per_batch: int, cache_gb: float) -> dict:
    """Peak RSS (GiB) and wall time of ``scbd-cells train`` in its own process."""
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        command = [
            sys.executable, "-m", "scbd_cells", "train", str(store), "--out", str(run_dir),
            "--steps", str(steps), "--val-every", str(steps), "--cache-gb", str(cache_gb),
            "--classes-per-batch", str(classes_per_batch), "--device", "cpu",
        ]  # fmt: skip
        timing = Path(scratch) / "time.txt"
        started = time.perf_counter()
        subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", str(timing), *command],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - started
        return {"peak_gib": int(timing.read_text().split()[-1]) * 1024 / GIB, "wall_s": wall}


def _rss_gib() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return kib * 1024 / GIB


def probe_setup(store_path: str, cache_gb: float) -> None:
    """(child process) Print the GiB the training set-up adds, as JSON."""
    import torch

    from scbd_cells.core.config import TrainConfig
    from scbd_cells.data.loader import BalancedLoader
    from scbd_cells.training.loop import _labels_and_sampler

    before = _rss_gib()
    store = open_store(store_path)
    config = TrainConfig(cache_gb=cache_gb, device="cpu")
    config, _, sampler = _labels_and_sampler(store, config, world_size=1)
    loader = BalancedLoader(store, sampler, device=torch.device("cpu"), cache_gb=cache_gb,
                            workers=config.workers)  # fmt: skip
    print(json.dumps({"setup_gib": _rss_gib() - before, "n_cells": store.n_cells}))
    loader.close()


def setup_gib(store: Path, cache_gb: float) -> float:
    child = subprocess.run(
        [sys.executable, __file__, "--probe", str(store), "--cache-gb", str(cache_gb)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(child.stdout.strip().splitlines()[-1])["setup_gib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", nargs=2, type=Path, help="two stores (smaller first)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/scbd-bench"))
    parser.add_argument(
        "--cells-per-guide", type=int, nargs=2, default=[48, None],
        help="the two sizes of the large preset (default: 48 per guide, and the preset's own)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--classes-per-batch", type=int, default=256, help="train's default")
    parser.add_argument("--cache-gb", type=float, default=0.25)
    parser.add_argument("--workers", type=int, default=2, help="simulate and ingest")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the child process's store
    args = parser.parse_args()
    if args.probe:
        probe_setup(args.probe, args.cache_gb)
        return

    if args.stores:
        stores = list(args.stores)
    else:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        stores = []
        for per_guide in args.cells_per_guide:
            path = args.work_dir / f"sim_large_{per_guide}_32px.zarr"
            simulated_store(
                path, preset="large", cells_per_guide=per_guide, workers=args.workers, resize=32
            )
            stores.append(path)
    cells = [open_store(path).n_cells for path in stores]
    setups = [setup_gib(path, args.cache_gb) for path in stores]
    quarter = max(1, args.classes_per_batch // 4)
    runs = [(stores[0], args.classes_per_batch), (stores[1], args.classes_per_batch),
            (stores[1], quarter)]  # fmt: skip
    rows, peaks = [], []
    for store, classes in runs:
        measured = train_peak(
            store, steps=args.steps, classes_per_batch=classes, cache_gb=args.cache_gb
        )
        n_cells, setup = cells[stores.index(store)], setups[stores.index(store)]
        peaks.append(measured["peak_gib"])
        rows.append([f"{n_cells:,}", f"{setup:.3f}", f"{classes} × 8 = {classes * 8:,}",
                     f"{measured['peak_gib']:.2f}", f"{measured['wall_s']:.0f}"])  # fmt: skip
        print(rows[-1], flush=True)
    per_cell = (setups[1] - setups[0]) * GIB / (cells[1] - cells[0])
    batch_part = peaks[1] - peaks[2]
    table = markdown_table(
        ["cells in the store", "set-up GiB", "batch (cells)", "peak RSS GiB", "wall s"], rows
    )
    body = (
        f"{table}\n\n`train --steps {args.steps} --cache-gb {args.cache_gb} --device cpu`, "
        f"ResNet-18 ×2 at 32 px, each measurement its own process. The set-up (labels, codes, "
        f"sampler, loader; RSS after it minus after the imports) grows by **{per_cell:,.0f} "
        f"bytes per cell** ({per_cell * 26e6 / GIB:.1f} GiB for 26 M cells); the batch of "
        f"{args.classes_per_batch * 8:,} cells against {quarter * 8:,} adds **{batch_part:.2f} "
        f"GiB** to the peak. The peaks at the same batch differ by "
        f"{peaks[1] - peaks[0]:.2f} GiB between the stores: the set-up's growth and the row "
        f"reads' decoded chunks (a batch touches more distinct chunks in a larger store, at "
        f"most one per cell)."
    )
    record("Training memory against cells and batch", body, enabled=args.record)


if __name__ == "__main__":
    main()
