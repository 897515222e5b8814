"""Benchmark the simulator: drawing rate per core, and the ``large`` preset's time and peak memory.

Usage::

    python benchmarks/simulate_large.py --out /tmp/scbd_large --workers 2
    python benchmarks/simulate_large.py --preset demo --workers 1   # the demo's screen

Runs ``scbd-cells simulate`` in a child process and polls /proc every 0.2 s for
the resident memory of that process and its workers together (Linux), so the
peak is the whole job's. Prints a markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            statm = Path(entry.path, "statm").read_text().split()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
        rss[int(entry.name)] = int(statm[1]) * page
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def _draw_rate(crop_size: int, n_cells: int = 2048) -> float:
    """Cells per second per core for :func:`draw_cells` (no blur, noise or writing)."""
    from scbd_cells.sim.screen import draw_cells

    rng = np.random.default_rng(0)
    shift = np.zeros((n_cells, 10), dtype=np.float32)
    subpixel = rng.uniform(-0.4, 0.4, size=(n_cells, 2))
    batch = max(8, 2**18 // (crop_size * crop_size))  # as the simulator does
    draw_cells(shift[:batch], crop_size=crop_size, subpixel=subpixel[:batch], rng=rng)  # warm up
    started = time.perf_counter()
    for i in range(0, n_cells, batch):
        draw_cells(
            shift[i : i + batch], crop_size=crop_size, subpixel=subpixel[i : i + batch], rng=rng
        )
    return n_cells / (time.perf_counter() - started)


def _disk_usage(folder: Path) -> tuple[int, int]:
    """(files, bytes allocated on disk) under ``folder``."""
    files = allocated = 0
    stack = [folder]
    while stack:
        for entry in os.scandir(stack.pop()):
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            else:
                files += 1
                allocated += entry.stat(follow_symlinks=False).st_blocks * 512
    return files, allocated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/scbd_simulate_benchmark"))
    parser.add_argument("--preset", default="large")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", action="store_true", help="Keep the simulated screen.")
    parser.add_argument("--skip-draw", action="store_true", help="Skip the per-core drawing rates.")
    parser.add_argument("--layout", default="crops", choices=["crops", "fields"])
    args, extra = parser.parse_known_args()  # extra: simulate options, e.g. --cells-per-guide 100
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    rows = []
    if not args.skip_draw:
        for size in (32, 64):
            rows.append((f"draw_cells, {size} px, 1 core", f"{_draw_rate(size):,.0f} cells/s"))

    if args.out.exists():
        shutil.rmtree(args.out)
    command = [
        sys.executable,
        "-m",
        "scbd_cells",
        "-q",
        "simulate",
        str(args.out),
        "--preset",
        args.preset,
        "--workers",
        str(args.workers),
        "--layout",
        args.layout,
        *extra,
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss_bytes(child.pid))
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        sys.exit(f"simulate failed with exit code {child.returncode}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and its joined workers
    n_cells = sum(1 for _ in open(args.out / "cells.csv")) - 1
    files, allocated = _disk_usage(args.out)
    rows += [
        (f"simulate {' '.join(command[5:])}: cells", f"{n_cells:,}"),
        ("wall time", f"{seconds:,.0f} s ({n_cells / seconds:,.0f} cells/s)"),
        (
            "CPU time user / system (all processes)",
            f"{usage.ru_utime:,.0f} s / {usage.ru_stime:,.0f} s",
        ),
        ("peak resident memory (all processes)", f"{peak / 2**30:.2f} GiB"),
        ("files / disk", f"{files:,} / {allocated / 2**30:.1f} GiB"),
    ]

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]
    print(
        f"\nMachine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average at the end {load:.1f}\n"
    )
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |", flush=True)
    if not args.keep:  # after printing: deleting a million files can take long
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
