"""What alpha does on Coloured MNIST: the figure and table of docs/training.md.

Trains ``scbd_cells.train`` on the red and green digits of examples/coloured_digits.py
(the paper's domain-generalisation recipe: ``--batch-target perturbation+batch``,
``--normalize store``) for each alpha, seed and sampler (``--stratify`` on and off),
then, with the last checkpoint, fits logistic regressions on z_c of the train-split
cells and scores them on held-out cells:

- colour (environment) accuracy on the held-out red and green cells (chance 0.5):
  what z_c still knows of the batch label, lower is better;
- digit accuracy on the held-out red and green cells (in distribution);
- digit accuracy on the white test digits (out of distribution, chance 0.1).

It also reads the invariance loss and its shuffled reference (``invariance_shuffled``)
from metrics.csv, averaged over the second half of the run.

Usage::

    python examples/cmnist_alpha.py --out /tmp/cmnist                # tiny encoder, CI size
    python examples/cmnist_alpha.py --out /tmp/cmnist --report       # table.md + figure
    python examples/cmnist_alpha.py --out /tmp/cmnist_r18 --encoder resnet18 --lr 1e-4 \\
        --steps 300 --alphas 10 --seeds 0 1

Results append to ``OUT/results.jsonl`` (runs already there are skipped).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from coloured_digits import ingest_coloured_digits
from sklearn.linear_model import LogisticRegression

import scbd_cells
from scbd_cells.data import schema
from scbd_cells.training.checkpoint import load_trained


@torch.no_grad()
def z_c_of(trained, store) -> np.ndarray:
    """z_c of every cell of ``store``, preprocessed as the run was trained."""
    pixels = torch.from_numpy(store.read(np.arange(store.n_cells)).astype(np.int32))
    codes = torch.from_numpy(store.codes(schema.BATCH)[0].astype(np.int64))
    if store.n_cells and codes.max() >= len(trained.vocab[schema.BATCH]):
        codes = torch.zeros_like(codes)  # white digits: store statistics, no batch row needed
    return trained.model(trained.preprocessor_for(store)(pixels, codes)).z_perturbation.numpy()


def probes(run_dir: Path, train_store: Path, test_store: Path) -> dict[str, float]:
    store, white = scbd_cells.open_store(train_store), scbd_cells.open_store(test_store)
    trained = load_trained(run_dir, which="last")
    z_c, z_white = z_c_of(trained, store), z_c_of(trained, white)
    digit = store.codes(schema.PERTURBATION)[0]
    colour = store.codes(schema.BATCH)[0]
    white_labels = white.obs[schema.PERTURBATION].astype(str).to_numpy()
    digit_names = np.asarray(store.codes(schema.PERTURBATION)[1])
    split = store.obs[schema.SPLIT].astype(str).to_numpy()
    fit, held_out = split == "train", split != "train"

    def probe() -> LogisticRegression:
        return LogisticRegression(max_iter=3000)

    digit_probe = probe().fit(z_c[fit], digit[fit])
    colour_probe = probe().fit(z_c[fit], colour[fit])
    return {
        "colour_accuracy": colour_probe.score(z_c[held_out], colour[held_out]),
        "digit_accuracy": digit_probe.score(z_c[held_out], digit[held_out]),
        "ood_digit_accuracy": float(
            np.mean(digit_names[digit_probe.predict(z_white)] == white_labels)
        ),
    }


def run(out_dir: Path, *, alpha: float, seed: int, stratify: bool, options: dict) -> dict:
    train_store, test_store = ingest_coloured_digits(out_dir / "data")
    tag = f"{options['encoder']}_alpha{alpha:g}_seed{seed}_{'strat' if stratify else 'uniform'}"
    run_dir = out_dir / "runs" / tag
    start = time.perf_counter()
    result = scbd_cells.train(
        train_store, out=run_dir, alpha=alpha, seed=seed, stratify=stratify, **options
    )
    seconds = time.perf_counter() - start
    metrics = pd.read_csv(result.metrics_path)
    late = metrics[(metrics["phase"] == "train") & (metrics["step"] > options["steps"] // 2)]
    row = {
        "run": tag,
        "encoder": options["encoder"],
        "alpha": alpha,
        "seed": seed,
        "stratify": stratify,
        "steps": options["steps"],
        "batch": f"{options['classes_per_batch']}x{options['cells_per_class']}",
        "lr": options["lr"],
        "invariance": float(late["invariance"].mean()),
        "invariance_shuffled": float(late["invariance_shuffled"].mean()),
        "supcon_perturbation": float(late["supcon_perturbation"].mean()),
        "train_seconds": round(seconds, 1),
        **probes(run_dir, train_store, test_store),
    }
    with open(out_dir / "results.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def report(out_dir: Path, figure: Path | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(out_dir / "results.jsonl")]
    table = pd.DataFrame(rows).drop_duplicates("run", keep="last")
    columns = [
        "invariance",
        "invariance_shuffled",
        "colour_accuracy",
        "digit_accuracy",
        "ood_digit_accuracy",
    ]
    summary = (
        table.groupby(["encoder", "stratify", "alpha"])[columns]
        .agg(["mean", "min", "max"])
        .round(3)
    )
    summary["n_seeds"] = table.groupby(["encoder", "stratify", "alpha"]).size()
    lines = ["| encoder | stratify | alpha | seeds | " + " | ".join(columns) + " |"]
    lines.append("|" + "---|" * (4 + len(columns)))
    for key, values in summary.iterrows():
        cells = [
            f"{values[(c, 'mean')]:.3f} ({values[(c, 'min')]:.3f}–{values[(c, 'max')]:.3f})"
            for c in columns
        ]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]:g} | {int(values['n_seeds'].iloc[0])} | "
            + " | ".join(cells)
            + " |"
        )
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    panels = [
        ("invariance", "Invariance(z_c; colour), 2nd half of training"),
        ("colour_accuracy", "colour probe on z_c (chance 0.5)"),
        ("digit_accuracy", "digit probe on z_c, red/green"),
        ("ood_digit_accuracy", "digit probe on z_c, white digits"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (column, title) in zip(axes, panels, strict=True):
        for stratify, colour in ((True, "C0"), (False, "C3")):
            part = table[table["stratify"] == stratify]
            if not len(part):
                continue
            label = "stratified batches" if stratify else "uniform within digit (before)"
            grouped = part.groupby("alpha")[column]
            alphas = np.array(sorted(part["alpha"].unique()))
            x = np.arange(len(alphas)) + (-0.08 if stratify else 0.08)
            ax.errorbar(
                x,
                grouped.mean().to_numpy(),
                yerr=[
                    grouped.mean().to_numpy() - grouped.min().to_numpy(),
                    grouped.max().to_numpy() - grouped.mean().to_numpy(),
                ],
                fmt="o-",
                color=colour,
                capsize=3,
                label=label,
            )
            ax.plot(
                x.repeat(grouped.size().to_numpy()),
                part.sort_values("alpha")[column],
                ".",
                color=colour,
                alpha=0.4,
            )
            if column == "invariance":
                ax.plot(
                    x,
                    part.groupby("alpha")["invariance_shuffled"].mean().to_numpy(),
                    ":",
                    color=colour,
                    label="shuffled reference" if stratify else None,
                )
            ax.set_xticks(np.arange(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("alpha")
        ax.set_title(title, fontsize=9)
    axes[1].axhline(0.5, color="k", ls="--", lw=0.8)
    axes[3].axhline(0.1, color="k", ls="--", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle("Coloured MNIST (sklearn digits): mean, min-max over seeds", fontsize=10)
    fig.tight_layout()
    figure = figure or out_dir / "cmnist_alpha.png"
    fig.savefig(figure, dpi=80)
    print(f"figure: {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stratify", choices=["on", "off", "both"], default="both")
    parser.add_argument("--encoder", default="tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--cells-per-class", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--report", action="store_true", help="only write table and figure")
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args.out, args.figure)
        return
    torch.set_num_threads(1)
    done = set()
    if (args.out / "results.jsonl").exists():
        done = {json.loads(line)["run"] for line in open(args.out / "results.jsonl")}
    options = {
        "encoder": args.encoder,
        "batch_target": "perturbation+batch",
        "normalize": "store",
        "classes_per_batch": 10,
        "cells_per_class": args.cells_per_class,
        "steps": args.steps,
        "lr": args.lr,
        "val_every": args.steps,
        "val_batches": 1,
        "log_every": 10,
        "workers": 0,
        "device": "cpu",
    }
    stratify = {"on": [True], "off": [False], "both": [True, False]}[args.stratify]
    for seed in args.seeds:
        for alpha in args.alphas:
            for strat in stratify:
                tag = f"{args.encoder}_alpha{alpha:g}_seed{seed}_{'strat' if strat else 'uniform'}"
                if tag not in done:
                    run(args.out, alpha=alpha, seed=seed, stratify=strat, options=options)


if __name__ == "__main__":
    main()
