"""Benchmark: speed of `scbd-cells baseline --features handcrafted|cellprofiler` (cells per second).

Runs the real command line on a store in a fresh child process per feature set, one BLAS /
OpenMP thread, and reports wall time, the child's CPU time (user + system, less disturbed
by other jobs on a shared machine than the wall time) and peak RSS. Example::

    python benchmarks/baseline_features.py --store demo-out/screen.zarr --record
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, markdown_table, record

CHILD = """
import json, resource, sys, time
sys.argv = ["scbd-cells", *{args!r}]
from scbd_cells.cli import main
start = time.perf_counter()
try:
    main()
except SystemExit as stop:
    if stop.code:
        raise
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({{"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime,
                   "peak_gb": peak * 1024 / 1e9}}))
"""


def run(store: Path, features: str, out: Path) -> dict:
    """One ``baseline`` run in a child process: seconds, CPU seconds, peak GB."""
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    args = ["-q", "baseline", str(store), "--out", str(out), "--features", features, "--overwrite"]
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(args=args)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, **threads},
    )  # fmt: skip
    if child.returncode != 0:
        sys.exit(f"baseline --features {features} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="a store from ingest")
    parser.add_argument("--features", default="handcrafted,cellprofiler")
    parser.add_argument("--record", action="store_true", help="append to docs/performance-log.md")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from scbd_cells.data.store import open_store

    store = open_store(args.store)
    n_cells = store.n_cells
    n_channels, (height, width) = store.n_channels, store.image_size
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for features in args.features.split(","):
            result = run(args.store, features, Path(folder) / f"{features}.h5ad")
            rows.append(
                [
                    features,
                    f"{n_cells:,}",
                    f"{result['seconds']:.1f}",
                    f"{result['cpu']:.1f}",
                    f"{n_cells / result['seconds']:,.0f}",
                    f"{n_cells / result['cpu']:,.0f}",
                    f"{result['peak_gb']:.2f}",
                ]
            )
    body = markdown_table(
        ["--features", "cells", "seconds", "CPU seconds", "cells/s", "cells per CPU-second",
         "peak RSS GB"],
        rows,
    )
    body += (
        f"\n\nStore `{args.store}` ({n_cells:,} cells, {n_channels} channels, "
        f"{height}x{width} px); "
        "`scbd-cells baseline` (measurement, standardisation, PCA to 64, writing) in a child "
        "process with one BLAS/OpenMP thread; CPU seconds are the child's user + system time."
    )
    record("Baseline features: handcrafted vs cellprofiler (cp-measure)", body, enabled=args.record)


if __name__ == "__main__":
    main()
