"""Benchmark: peak memory and wall time of ``scbd-cells evaluate`` against the number of cells.

Writes synthetic cell-level embeddings the way ``scbd-cells embed`` does
(``scbd_cells.profiles.anndata_io.CellsWriter``: the store's cell table as ``obs``, ``X`` = z_c and
``obsm["X_scbd_batch"]`` = z_s, 64 dimensions each, filled batch by batch) with the columns
a store carries (cell_id, perturbation, guide, batch, split, image_path, gene, plate, well,
tile, x, y, table_row), plus a CORUM 5.x complexes file (200 complexes whose genes share
part of their effect). Then it runs the real command line (``scbd_cells.cli.main`` with
``evaluate FILE --corum ... --out ...``) in a fresh child process that reports its own peak
resident set (``VmHWM``) and wall time. Example::

    python benchmarks/evaluate_memory.py --cells 100000,1000000 --record
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import REPO, markdown_table, record

# The child imports only what the command imports: `scbd-cells evaluate` never loads torch
# (0.47 GB), so the child does not either (threads are set through the BLAS/OpenMP
# variables); `baseline` imports torch itself.
CHILD = """
import json, sys, time
sys.argv = ["scbd-cells", *{args!r}]
from scbd_cells.cli import main
start = time.perf_counter()
try:
    main()
except SystemExit as stop:
    if stop.code:
        raise
seconds = time.perf_counter() - start
# VmHWM: this process image's peak (ru_maxrss would keep the parent's pages from the fork)
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({{"seconds": seconds, "peak_gb": peak * 1024 / 1e9}}))
"""


def cells_obs(
    n_cells: int,
    *,
    n_genes: int,
    guides_per_gene: int,
    n_plates: int,
    n_wells: int,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """A cell table as ``store_obs_for_anndata`` leaves it: store order (grouped by gene)."""
    genes = np.array([f"GENE{k:05d}" for k in range(n_genes)] + ["nontargeting"])
    weights = np.ones(len(genes))
    weights[-1] = 0.08 * n_genes  # ~8 % control cells
    gene_code = np.sort(rng.choice(len(genes), size=n_cells, p=weights / weights.sum()))
    gene = genes[gene_code]
    guide_number = rng.integers(0, guides_per_gene, n_cells)
    guide = np.char.add(np.char.add(gene, "_"), guide_number.astype(str))
    plate = rng.integers(0, n_plates, n_cells)
    well = rng.integers(0, n_wells, n_cells)
    plate_names = np.array([f"P{p}" for p in range(n_plates)])
    well_names = np.array([f"{'ABCDEFGH'[w // 12]}{w % 12 + 1:02d}" for w in range(n_wells)])
    batch = np.char.add(np.char.add(plate_names[plate], "_"), well_names[well])
    cell_id = np.arange(n_cells).astype(str).astype(object)
    split = rng.choice(["train", "val", "test"], size=n_cells, p=[0.83, 0.02, 0.15])
    image_path = [f"images/{b}/cell{i:07d}.tif" for i, b in enumerate(batch)]
    obs = pd.DataFrame(
        {
            "cell_id": cell_id,
            "perturbation": pd.Categorical(gene),
            "guide": pd.Categorical(guide),
            "batch": pd.Categorical(batch),
            "split": pd.Categorical(split, categories=["train", "val", "test"]),
            "image_path": pd.Categorical(image_path),
            "gene": pd.Categorical(gene),
            "plate": pd.Categorical(plate_names[plate]),
            "well": pd.Categorical(well_names[well]),
            "tile": rng.integers(0, 100, n_cells),
            "x": np.round(rng.uniform(0, 2048, n_cells), 3),
            "y": np.round(rng.uniform(0, 2048, n_cells), 3),
            "table_row": rng.permutation(n_cells).astype(np.int64),
        },
        index=pd.Index(cell_id, dtype=object),
    )
    return obs


def write_cells(
    path: Path, complexes_path: Path, *, n_cells: int, n_genes: int, dims: int, seed: int
) -> None:
    """Write a cells file as ``embed`` does, and a CORUM 5.x file of 200 disjoint complexes.

    A complex's genes share part of their effect, so the CORUM figures are above random.
    """
    from scbd_cells.profiles.anndata_io import CellsWriter

    rng = np.random.default_rng(seed)
    obs = cells_obs(n_cells, n_genes=n_genes, guides_per_gene=4, n_plates=4, n_wells=24, rng=rng)
    genes = list(obs["perturbation"].cat.categories)
    targeting = [k for k, g in enumerate(genes) if g != "nontargeting"]
    gene_effect = rng.normal(size=(len(genes), dims))
    lines = ["complex_id\tcomplex_name\torganism\tsubunits_gene_name"]
    order, at = rng.permutation(targeting), 0
    for k in range(min(200, len(targeting) // 8)):
        members = order[at : at + int(rng.integers(3, 9))]
        at += len(members)
        gene_effect[members] += rng.normal(size=dims)
        names = ";".join(genes[m] for m in members)
        lines.append(f"{k}\tcomplex {k}\tHuman\t{names}")
    complexes_path.write_text("\n".join(lines) + "\n")
    well_effect = rng.normal(size=(len(obs["batch"].cat.categories), dims))
    gene_codes = obs["perturbation"].cat.codes.to_numpy()
    batch_codes = obs["batch"].cat.codes.to_numpy()
    uns = {"scbd": {"kind": "scbd", "control": "nontargeting", "version": "benchmark"}}
    writer = CellsWriter(path, obs=obs, widths={"X": dims, "X_scbd_batch": dims}, uns=uns)
    try:
        for start in range(0, n_cells, 65536):
            stop = min(start + 65536, n_cells)
            noise = rng.normal(size=(stop - start, 2, dims))
            effect = gene_effect[gene_codes[start:stop]]
            well = well_effect[batch_codes[start:stop]]
            z_c = 0.3 * effect + 0.2 * well + noise[:, 0]
            z_s = 0.1 * effect + 1.0 * well + noise[:, 1]
            writer.write(
                start, {"X": z_c.astype(np.float32), "X_scbd_batch": z_s.astype(np.float32)}
            )
    finally:
        writer.close()


def run_cli(cli_args: list[str], *, threads: int) -> dict:
    """Run ``scbd-cells CLI_ARGS`` in a fresh child process: its own peak RSS and wall time."""
    env_threads = {
        name: str(threads)
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(args=cli_args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env_threads},
    )
    if child.returncode != 0:
        sys.exit(f"scbd-cells {cli_args[0]} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def baseline_rows(args: argparse.Namespace, work_dir: Path) -> list[list[str]]:
    """``scbd-cells baseline`` on synthetic stores (``common.synthetic_store``)."""
    from common import synthetic_store

    rows = []
    for n_cells in [int(n) for n in args.baseline_cells.split(",") if n]:
        size = args.baseline_image_size
        store_path = work_dir.parent / f"synthetic_{n_cells}_1000_{size}.zarr"
        synthetic_store(store_path, n_cells=n_cells, n_classes=1000, image_size=size)
        out = work_dir / f"baseline_{n_cells}.h5ad"
        result = run_cli(
            ["baseline", str(store_path), "--out", str(out), "--overwrite"], threads=args.threads
        )
        rows.append(
            [
                f"{n_cells:,}",
                f"4 x {size} px",
                f"{out.stat().st_size / 1e9:.2f}",
                f"{result['peak_gb']:.2f}",
                f"{result['seconds']:.1f}",
            ]
        )
        out.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="100000,1000000", help="comma-separated cell counts")
    parser.add_argument("--format", default="h5ad", help="h5ad, zarr or h5ad,zarr")
    parser.add_argument("--genes", type=int, default=2000, help="targeting genes (4 guides each)")
    parser.add_argument("--dims", type=int, default=64, help="embedding dimensions (X and z_s)")
    parser.add_argument("--key", default="X", help="X or X_scbd_batch (the embedding evaluated)")
    parser.add_argument("--max-cells", type=int, default=50_000, help="well-probe cell cap")
    parser.add_argument("--mixing-cells", type=int, default=10_000, help="batch-mixing cells")
    parser.add_argument("--max-replicates", type=int, default=16, help="mAP profiles per gene")
    parser.add_argument("--null-size", type=int, default=10_000, help="mAP permutations")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads of the child")
    parser.add_argument(
        "--baseline-cells", default="", help="also run `scbd-cells baseline` on stores this big"
    )
    parser.add_argument("--baseline-image-size", type=int, default=16)
    parser.add_argument("--work-dir", default="/tmp/scbd-bench/evaluate")
    parser.add_argument("--keep", action="store_true", help="keep the cells files for a re-run")
    parser.add_argument("--record", action="store_true", help="append to docs/performance-log.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the machine line names the child's thread count
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n_cells in [int(n) for n in args.cells.split(",")]:
        for suffix in args.format.split(","):
            cells_path = work_dir / f"cells_{n_cells}_{args.genes}_{args.dims}.{suffix}"
            complexes_path = work_dir / f"complexes_{n_cells}_{args.genes}.txt"
            if not cells_path.exists():
                write_cells(
                    cells_path,
                    complexes_path,
                    n_cells=n_cells,
                    n_genes=args.genes,
                    dims=args.dims,
                    seed=0,
                )
            report_dir = work_dir / f"report_{n_cells}_{suffix}"
            cli_args = [
                "evaluate", str(cells_path), "--corum", str(complexes_path),
                "--out", str(report_dir), "--key", args.key,
                "--max-cells", str(args.max_cells), "--overwrite",
                "--mixing-cells", str(args.mixing_cells),
                "--max-replicates", str(args.max_replicates),
                "--null-size", str(args.null_size),
            ]  # fmt: skip
            result = run_cli(cli_args, threads=args.threads)
            metrics = json.loads((report_dir / "metrics.json").read_text())["embeddings"]
            scores = next(iter(metrics.values()))
            file_gb = (
                sum(p.stat().st_size for p in cells_path.rglob("*") if p.is_file())
                if cells_path.is_dir()
                else cells_path.stat().st_size
            ) / 1e9
            rows.append(
                [
                    f"{n_cells:,}",
                    f".{suffix}",
                    f"{file_gb:.2f}",
                    f"{result['peak_gb']:.2f}",
                    f"{result['seconds']:.1f}",
                    f"{scores['corum_recall_5_95']:.3f}",
                    f"{scores['well_f1']:.3f} ({scores['well_f1_chance']:.3f})",
                    f"{scores['map_activity']:.3f} / {scores['map_consistency']:.3f}",
                    f"{scores['ilisi']:.3f} / {scores['kbet']:.3f}",
                    f"{scores['n_replicates']:,} / {scores['n_mixing_cells']:,}",
                ]
            )
            shutil.rmtree(report_dir, ignore_errors=True)
            if not args.keep and cells_path.is_dir():
                shutil.rmtree(cells_path)
            elif not args.keep:
                cells_path.unlink()
    body = markdown_table(
        [
            "cells",
            "file",
            "file GB",
            "evaluate peak RSS GB",
            "seconds",
            "CORUM recall @ 5%/95%",
            "well F1 (chance)",
            "mAP activity / consistency",
            "iLISI / kBET",
            "replicate profiles / mixing cells",
        ],
        rows,
    )
    body += (
        f"\n\nSynthetic embeddings written as `embed` writes them: X and obsm X_scbd_batch, "
        f"{args.dims} float32 dimensions each, obs with the store's 13 columns (cell_id and "
        f"image_path unique per cell), {args.genes:,} genes x 4 guides + nontargeting, 96 wells; "
        f"key `{args.key}`, well probe on at most {args.max_cells:,} cells, batch mixing on "
        f"{args.mixing_cells:,}, mAP on at most {args.max_replicates} guide x well profiles per "
        f"gene ({args.null_size:,} permutations); one child process "
        f"per file running `scbd-cells evaluate` with {args.threads} thread(s); peak RSS is "
        "its own VmHWM (Python, numpy, sklearn, anndata and matplotlib included)."
    )
    baseline = baseline_rows(args, work_dir)
    if baseline:
        body += "\n\n" + markdown_table(
            ["cells", "store images", "output file GB", "baseline peak RSS GB", "seconds"],
            baseline,
        )
        body += (
            "\n\n`scbd-cells baseline` on synthetic stores (`benchmarks/common.py`, 1,000 "
            f"perturbations), in a child process with {args.threads} thread(s), VmHWM as above."
        )
    record("Evaluate memory: peak RSS vs cells", body, enabled=args.record)


if __name__ == "__main__":
    main()
