"""Benchmark: peak memory of ``scbd_cells.embed`` against the number of cells (the streaming bound).

Embeds each given store in a fresh child process that reports its own peak
resident set (``VmHWM``), so nothing of this parent (store building, training)
is counted. A streaming embed holds the cell table and a few batches, never the
embeddings: peak memory should grow only with the table (a few hundred bytes a
cell), not with N x z. Example::

    python benchmarks/embed_memory.py --store /tmp/scbd-bench/synthetic_100000_500_32.zarr \
        --store /tmp/scbd-bench/synthetic_1000000_1000_16.zarr --record
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, markdown_table, one_step_run, record

from scbd_cells import open_store

CHILD = """
import json, time
import torch
torch.set_num_threads({threads})
from scbd_cells import embed
start = time.perf_counter()
result = embed({run!r}, {store!r}, out={out!r}, batch_size={batch_size}, device="cpu",
               workers={workers})
seconds = time.perf_counter() - start
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({{"seconds": seconds, "n_cells": result.n_cells, "peak_gb": peak * 1024 / 1e9}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", action="append", required=True, help="store(s) to embed")
    parser.add_argument("--encoder", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append to docs/performance-log.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="scbd-embed-mem-") as tmp:
        for k, store_path in enumerate(args.store):
            store = open_store(store_path)
            run_dir = one_step_run(
                store_path, Path(tmp) / f"run{k}", encoder=args.encoder, device="cpu", cache_gb=0
            )
            out = Path(tmp) / f"cells{k}.h5ad"
            code = CHILD.format(
                threads=args.threads,
                run=str(run_dir),
                store=str(store_path),
                out=str(out),
                batch_size=args.batch_size,
                workers=args.workers,
            )
            child = subprocess.run(
                [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            embeddings_gb = out.stat().st_size / 1e9
            rows.append(
                [
                    f"{store.n_cells:,}",
                    f"{store.n_channels} x {store.image_size[0]} px",
                    f"{embeddings_gb:.2f}",
                    f"{result['peak_gb']:.2f}",
                    f"{result['n_cells'] / result['seconds']:,.0f}",
                ]
            )
            out.unlink()
    body = markdown_table(
        ["cells", "images", "output file GB", "embed peak RSS GB", "cells/s"], rows
    )
    body += (
        f"\n\n{args.encoder} x2 encoders, batch {args.batch_size}, {args.workers} reader threads, "
        "CPU; peak RSS is the embed process's own VmHWM (torch and the runtime included)."
    )
    record("Embed memory: peak RSS vs cells", body, enabled=args.record)


if __name__ == "__main__":
    main()
