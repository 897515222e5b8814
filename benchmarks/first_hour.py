"""A lab's first hour: how long `scbd-cells demo` takes, stage by stage, and one small evaluate.

    python benchmarks/first_hour.py --work-dir DIR [--preset demo] [--record]

Runs the demo (``scbd_cells.demo``, what ``scbd-cells demo --out DIR/demo`` runs: the
demo's screen and models) and takes each stage's wall time from its result, then evaluates one
cell-level file on its own in a fresh process (``scbd-cells evaluate``, as after the
quickstart: the first evaluate of a session pays any just-in-time compiling). Prints, and
with ``--record`` appends to docs/performance-log.md, the stages' seconds and shares.
On a shared machine compare the shares, not the wall times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import markdown_table, record


def run(command: list[str], *, cwd: Path) -> float:
    """Run ``python -m scbd_cells COMMAND`` and return its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scbd_cells", "-q", *command], cwd=cwd, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--preset", default="demo", help="demo (the real one) or tiny (a check)")
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's own")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from scbd_cells import demo

    started = time.perf_counter()
    result = demo(out=work / "demo", preset=args.preset, steps=args.steps, overwrite=True)
    total = time.perf_counter() - started
    seconds = result.seconds
    cells = work / "demo" / "embeddings" / "scbd" / "cells.h5ad"
    complexes = work / "demo" / "screen" / "complexes.txt"
    alone = run(["evaluate", str(cells), "--corum", str(complexes), "--out", "one-report",
                 "--no-umap", "--overwrite"], cwd=work)  # fmt: skip

    staged = sum(seconds.values())
    rows = [[name, round(value, 1), f"{100 * value / staged:.0f} %"]
            for name, value in seconds.items()]  # fmt: skip
    rows.append(["demo, all stages", round(total, 1), ""])
    rows.append([f"evaluate one file alone ({cells.name}, new process)", round(alone, 1), ""])
    steps = f" --steps {args.steps}" if args.steps else ""
    body = (
        f"`scbd-cells demo --preset {args.preset}{steps}`, then `scbd-cells evaluate` of its "
        "scbd cells.h5ad alone (--no-umap):\n\n"
        + markdown_table(["stage", "seconds", "share of the demo's stages"], rows)
    )
    record("First hour: the demo's stages and one small evaluate", body, enabled=args.record)


if __name__ == "__main__":
    main()
