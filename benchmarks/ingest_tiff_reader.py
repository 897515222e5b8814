"""Benchmark: ingest per core with the TIFF template reader and with tifffile alone, in one run.

Ingest reads a pipeline's crops through a template (``scbd_cells.data.ingest._read_tiff``):
the first file of each size is parsed with tifffile, and later files whose every byte
outside the pixels equals it are read by slicing (checked against tifffile on the first
file). This measures what that buys: the same table ingested, rounds alternating, with the
template and with ``tifffile.imread`` for every file, in cells per CPU-second.

Usage::

    scbd-cells simulate /tmp/demo-screen --preset demo
    python benchmarks/ingest_tiff_reader.py /tmp/demo-screen/cells.csv --record
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import tifffile
    from common import markdown_table, record

    import scbd_cells
    from scbd_cells.core.progress import set_quiet
    from scbd_cells.data import ingest as ingest_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="a simulated screen's cells.csv (crops layout)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/scbd-bench-tiff"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append to docs/performance-log.md")
    args = parser.parse_args()
    set_quiet(True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    readers = {"template": ingest_module._read_tiff, "tifffile": tifffile.imread}
    rates: dict[str, list[float]] = {name: [] for name in readers}
    n_cells = 0
    for _ in range(args.rounds):
        for name, reader in readers.items():
            ingest_module._read_tiff = reader
            ingest_module._TIFF_TEMPLATES.clear()
            out = args.work_dir / f"{name}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            cpu = time.process_time()
            result = scbd_cells.ingest(
                args.table, out=out, perturbation_column="gene", guide_column="guide",
                control="nontargeting", resize=32, workers=1,
                channel_names=["dna_damage", "actin", "dna", "microtubules"],
            )  # fmt: skip
            n_cells = result.n_cells
            rates[name].append(result.n_cells / (time.process_time() - cpu))
    ingest_module._read_tiff = readers["template"]
    best = {name: max(values) for name, values in rates.items()}
    rows = [[name, f"{best[name]:,.0f}", ", ".join(f"{v:,.0f}" for v in rates[name])]
            for name in readers]  # fmt: skip
    body = (
        markdown_table(["TIFF reader", "best cells/CPU-s", "rounds"], rows)
        + f"\n\n{n_cells:,} cells, 1 worker, `--resize 32`; the template is "
        f"{best['template'] / best['tifffile']:.2f}× tifffile alone per core."
    )
    record("Ingest: TIFF template reader vs tifffile", body, enabled=args.record)


if __name__ == "__main__":
    main()
