"""Measure what alpha does on simulated screens: the numbers and figures of docs/training.md.

For each (screen, invariance variant, alpha) it trains SCBD on the CPU, then
embeds held-out *test* cells with the best checkpoint and reports

- the well macro F1 of a logistic regression on z_c and on z_s (and chance),
- the perturbation macro F1 of a logistic regression on z_c (biology kept),
- the perturbation SupCon loss on val at the first and last validation.

Usage::

    python examples/alpha_sweep.py --out /tmp/alpha --runs demo:paper:0 demo:paper:1
    python examples/alpha_sweep.py --out /tmp/alpha --steps 150 \
        --runs wells4:paper:0 wells4:paper:1 wells4:normalized:1 wells16:paper:1 ...

``--normalize store`` reproduces the runs from before per-well normalisation
became train's default.

Screens: ``demo`` (the demo preset: 12 wells), ``wells4`` and ``wells16`` (the
demo preset with 2 and 8 wells per plate). Results append to
``OUT/results.jsonl``; ``--report`` writes ``OUT/table.md`` and ``OUT/curves.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import scbd_cells
from scbd_cells.data import schema
from scbd_cells.data.loader import iter_cells
from scbd_cells.evaluation.well_probe import batch_prediction_f1
from scbd_cells.pipeline import DEMO_SPLIT_FRACTIONS
from scbd_cells.training.checkpoint import load_trained

SCREENS = {
    "demo": {},
    # 40 genes (half the demo) to keep the two extra screens cheap; only the wells differ.
    "wells4": {"wells_per_plate": 2, "n_genes": 40, "n_complexes": 8},
    "wells16": {"wells_per_plate": 8, "n_genes": 40, "n_complexes": 8},
}
TEST_CELLS = 3000


def make_store(out_dir: Path, screen: str) -> Path:
    store_path = out_dir / f"{screen}.zarr"
    if not store_path.exists():
        screen_dir = out_dir / f"{screen}_screen"
        if not (screen_dir / "cells.csv").exists():
            scbd_cells.simulate(screen_dir, preset="demo", seed=0, **SCREENS[screen])
        scbd_cells.ingest(
            screen_dir / "cells.csv",
            out=store_path,
            perturbation_column="gene",
            guide_column="guide",
            control=schema.CONTROL_LABEL,
            resize=32,
            split_fractions=DEMO_SPLIT_FRACTIONS,
        )
    return store_path


@torch.no_grad()
def _embed(trained, store, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z_c and z_s of the given store rows, preprocessed as the run was trained."""
    preprocessor = trained.preprocessor_for(store)
    codes = torch.from_numpy(store.codes(schema.BATCH)[0].astype(np.int64))
    z_c, z_s = [], []
    for indices, images in iter_cells(store, rows, batch_size=512, workers=0):
        pixels = torch.from_numpy(images.astype(np.int32))
        output = trained.model(preprocessor(pixels, codes[torch.from_numpy(indices)]))
        z_c.append(output.z_perturbation.numpy())
        z_s.append(output.z_batch.numpy())
    return np.concatenate(z_c), np.concatenate(z_s)


def test_metrics(run_dir: Path, store_path: Path, *, seed: int = 0) -> dict[str, float]:
    """Probes on held-out test cells, and the well probe of ``scbd-cells evaluate`` on all cells.

    The all-cell probe (every cell, as the paper's batch prediction; 60/40 split) holds
    about 5,700 cells out on the demo screen instead of about 850, so it is the steadier
    number; it is averaged over three probe splits.
    """
    store = scbd_cells.open_store(store_path)
    trained = load_trained(run_dir, which="best")
    split = store.obs[schema.SPLIT].astype(str).to_numpy()
    rows = np.flatnonzero(split == "test")
    rows = np.sort(np.random.default_rng(seed).permutation(rows)[:TEST_CELLS])
    all_c, all_s = _embed(trained, store, np.arange(store.n_cells))  # each cell once
    z_c, z_s = all_c[rows], all_s[rows]
    all_wells = store.obs[schema.BATCH].astype(str).to_numpy()
    wells = all_wells[rows]
    genes = store.obs[schema.PERTURBATION].astype(str).to_numpy()[rows]
    well_c = batch_prediction_f1(z_c, wells, seed=seed)
    well_s = batch_prediction_f1(z_s, wells, seed=seed)
    gene_c = batch_prediction_f1(z_c, genes, seed=seed)  # same probe, perturbation labels
    return {
        "test_well_f1_z_c": well_c.f1,
        "test_well_f1_z_s": well_s.f1,
        "test_well_f1_chance": well_c.chance,
        "test_perturbation_f1_z_c": gene_c.f1,
        "test_perturbation_f1_chance": gene_c.chance,
        "all_well_f1_z_c": float(
            np.mean([batch_prediction_f1(all_c, all_wells, seed=s).f1 for s in range(3)])
        ),
        "all_well_f1_z_s": batch_prediction_f1(all_s, all_wells, seed=0).f1,
        "n_wells": well_c.n_batches,
    }


def run(out_dir: Path, spec: str, *, steps: int, val_every: int, options: dict) -> dict:
    screen, invariance, alpha = spec.split(":")
    store_path = make_store(out_dir, screen)
    tag = "_".join(f"{k}{v}" for k, v in sorted(options.items()))
    run_dir = out_dir / "runs" / "_".join([spec.replace(":", "_"), tag]).strip("_")
    n_classes = len(scbd_cells.open_store(store_path).class_ranges())
    from scbd_cells.core.config import demo_train_options

    options = {
        **demo_train_options(n_classes),
        "steps": steps,
        "val_every": val_every,
        "alpha": float(alpha),
        "invariance": invariance,
        "device": "cpu",
        "workers": 1,
        **options,
    }
    start = time.perf_counter()
    result = scbd_cells.train(store_path, out=run_dir, **options)
    seconds = time.perf_counter() - start
    metrics = pd.read_csv(result.metrics_path)
    val = metrics[metrics["phase"] == "val"]
    row = {
        "spec": spec,
        "run_dir": str(run_dir),
        **options,
        "screen": screen,
        "invariance": invariance,
        "alpha": float(alpha),
        "normalize": result.config.normalize,
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "val_supcon_perturbation_first": float(val["supcon_perturbation"].iloc[0]),
        "val_supcon_perturbation_last": float(val["supcon_perturbation"].iloc[-1]),
        "val_invariance_last": float(val["invariance"].iloc[-1]),
        "val_well_f1_z_c_last": float(val["well_f1_z_perturbation"].iloc[-1]),
        "best_val_loss": result.best_val_loss,
        **test_metrics(run_dir, store_path),
    }
    with open(out_dir / "results.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def markdown_table(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.to_numpy()]
    return "\n".join(lines) + "\n"


def report(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(out_dir / "results.jsonl")]
    table = pd.DataFrame(rows).drop_duplicates("run_dir", keep="last")
    # rows from before --normalize existed were standardised with the store's statistics
    table["normalize"] = table.get("normalize", pd.Series(index=table.index)).fillna("store")
    columns = [
        "screen",
        "encoder",
        "n_wells",
        "normalize",
        "invariance",
        "alpha",
        "seed",
        "steps",
        "val_supcon_perturbation_first",
        "val_supcon_perturbation_last",
        "test_well_f1_z_c",
        "test_well_f1_z_s",
        "test_well_f1_chance",
        "all_well_f1_z_c",
        "all_well_f1_z_s",
        "test_perturbation_f1_z_c",
        "test_perturbation_f1_chance",
        "train_seconds",
    ]
    (out_dir / "table.md").write_text(markdown_table(table.reindex(columns=columns).round(3)))
    if "encoder" not in table:
        table["encoder"] = "resnet18"
    table["encoder"] = table["encoder"].fillna("resnet18")
    screens = list(dict.fromkeys(table["screen"]))
    for screen in screens:
        runs = table[(table["screen"] == screen) & (table["encoder"] == "resnet18")]
        runs = runs[runs["normalize"] == runs["normalize"].iloc[-1]] if not runs.empty else runs
        if "seed" in runs:  # curves of the seed-0 runs only (other seeds are in the table)
            runs = runs[runs["seed"].fillna(0) == 0]
        if not runs.empty:
            break
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for _, row in runs.iterrows():
        metrics = pd.read_csv(Path(row["run_dir"]) / "metrics.csv")
        train, val = metrics[metrics["phase"] == "train"], metrics[metrics["phase"] == "val"]
        label = f"{row['invariance']} alpha={row['alpha']:g}" if row["alpha"] else "alpha=0"
        (line,) = axes[0].plot(train["step"], train["supcon_perturbation"], lw=1, label=label)
        axes[1].plot(val["step"], val["supcon_perturbation"], "o-", color=line.get_color())
        axes[2].plot(val["step"], val["well_f1_z_perturbation"], "o-", color=line.get_color())
    batch_size = int(runs["classes_per_batch"].iloc[0] * runs["cells_per_class"].iloc[0])
    for ax in axes[:2]:
        ax.axhline(np.log(batch_size), color="k", ls=":", label=f"log {batch_size} (collapsed z_c)")
        ax.set_ylim(np.log(batch_size) - 0.2, np.log(batch_size) + 0.08)
    axes[2].axhline(float(runs["test_well_f1_chance"].iloc[0]), color="k", ls="--", label="chance")
    axes[0].set_title(f"SupCon(z_c; perturbation), train ({screen})")
    axes[1].set_title("SupCon(z_c; perturbation), val (fixed batches)")
    axes[2].set_title("well probe macro F1 of z_c (val)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    axes[2].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=90)
    print((out_dir / "table.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="*", default=[], help="screen:invariance:alpha")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoder", default=None, help="default: the demo options'")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--classes-per-batch", type=int, default=None)
    parser.add_argument("--augment", action="store_true", help="random turns and mirrors")
    parser.add_argument("--normalize", choices=("batch", "store"), default=None)
    parser.add_argument("--seed", type=int, default=None, help="training seed (default 0)")
    args = parser.parse_args()
    # One thread: on a shared, oversubscribed CPU two OpenMP threads mostly spin-wait.
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    options = {
        key: value
        for key, value in {
            "encoder": args.encoder,
            "lr": args.lr,
            "classes_per_batch": args.classes_per_batch,
            "augment": args.augment or None,
            "normalize": args.normalize,
            "seed": args.seed,
        }.items()
        if value is not None
    }
    for spec in args.runs:
        run(args.out, spec, steps=args.steps, val_every=args.val_every, options=options)
    if args.report:
        report(args.out)


if __name__ == "__main__":
    main()
