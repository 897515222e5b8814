"""Learning curves: does SCBD catch up with the conventional pipeline as it trains longer?

Trains SCBD (``scbd_cells.train``, the demo's options but the number of steps) for each
training budget and alpha on a demo folder's screen, embeds every cell, and evaluates all
runs in one ``scbd-cells evaluate`` report beside the demo's conventional pipelines
(handcrafted features as is, standardised within each well, and Harmony-corrected); then
draws the metrics against the budget.

Usage::

    scbd-cells demo --out demo-out
    python examples/learning_curve.py --demo demo-out --out curves --steps 300 1000 --alphas 3 0
    python examples/learning_curve.py --demo demo-out --out curves --steps 3000 --alphas 3

Runs land in ``OUT/runs/steps_N_alpha_A`` and embeddings in ``OUT/embeddings``; a rerun skips
an embedded run and resumes a killed one (``train(resume=True)``). Then it evaluates
every embedding in ``OUT/embeddings`` with the references in one report (``OUT/report``:
one table, so the field's min-max scaled batch, bio and overall scores compare across
budgets), and writes ``OUT/curves.csv``, ``OUT/curves.png`` and ``OUT/curves.md``.
Nothing here is tuned on the evaluation's complexes file: alpha and the options are the
demo's. ``--no-report`` only trains and embeds, ``--report`` only evaluates and draws;
``--cells-per-class`` / ``--classes-per-batch`` change the batch (use another ``--out``).
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

import pandas as pd

import scbd_cells
from scbd_cells.config import demo_train_options
from scbd_cells.data import schema
from scbd_cells.evaluation.pages import markdown_table

REFERENCES = ("baseline", "baseline_per_well", "baseline_harmony")
RUN_NAME = re.compile(r"^steps_(\d+)_alpha_([0-9.]+)$")
PANELS = (
    ("corum_auprc", "CORUM AUPRC (higher is better)"),
    ("map_consistency", "mAP, genes sharing a complex (higher is better)"),
    ("well_f1_over_chance", "well F1 / chance (lower is better; 1 = chance)"),
    ("overall", "overall score, scaled across this table"),
)


def demo_inputs(demo_dir: Path) -> tuple[Path, Path, dict[str, Path]]:
    """The demo's store, complexes file and reference AnnData files."""
    store = demo_dir / "screen.zarr"
    complexes = demo_dir / "screen" / "complexes.txt"
    references = {name: demo_dir / "embeddings" / f"{name}.h5ad" for name in REFERENCES}
    missing = [p for p in (store, complexes, *references.values()) if not p.exists()]
    if missing:
        raise SystemExit(f"not a finished demo folder ({demo_dir}): missing {missing[0]}")
    return store, complexes, references


def train_options(store_path: Path, args: argparse.Namespace) -> dict:
    """The demo's training options, with this curve's batch shape and seed."""
    store = scbd_cells.open_store(store_path)
    train_split = store.obs[schema.SPLIT].astype(str) == "train"
    n_classes = int(store.obs.loc[train_split, schema.PERTURBATION].nunique())
    options = demo_train_options(n_classes)
    options.pop("steps")
    options.pop("alpha")
    if args.classes_per_batch:
        options["classes_per_batch"] = args.classes_per_batch
    if args.cells_per_class:
        options["cells_per_class"] = args.cells_per_class
    return dict(options, seed=args.seed, device=args.device)


def run(args: argparse.Namespace) -> None:
    store, _, _ = demo_inputs(args.demo)
    options = train_options(store, args)
    for steps in args.steps:
        for alpha in args.alphas:
            name = f"steps_{steps}_alpha_{alpha:g}"
            run_dir, cells = args.out / "runs" / name, args.out / "embeddings" / f"{name}.h5ad"
            if cells.exists():
                print(f"{name}: embedded, skipped", flush=True)
                continue
            started = time.perf_counter()
            resume = (run_dir / "checkpoints" / "last.pt").exists()
            # validation every 1/6 of the run, as the demo's 50 of 300
            trained = scbd_cells.train(
                store, out=run_dir, resume=resume,
                **dict(options, steps=steps, alpha=alpha, val_every=max(10, steps // 6)),
            )  # fmt: skip
            if trained.interrupted:  # Ctrl-C: leave it unembedded, so a rerun resumes it
                raise SystemExit(f"{name}: interrupted; rerun the same command to continue")
            scbd_cells.embed(run_dir, store, out=cells, workers=2)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)


def evaluate_all(args: argparse.Namespace) -> pd.DataFrame:
    """One report of every embedded run and the references; the table with the budgets."""
    _, complexes, references = demo_inputs(args.demo)
    runs = sorted(
        (p for p in (args.out / "embeddings").glob("*.h5ad") if RUN_NAME.match(p.stem)),
        key=lambda p: (float(RUN_NAME.match(p.stem)[2]), int(RUN_NAME.match(p.stem)[1])),
    )
    if not runs:
        raise SystemExit(f"nothing embedded in {args.out / 'embeddings'}: run without --report")
    labels = [p.stem for p in runs] + list(references)
    result = scbd_cells.evaluate(
        [*runs, *references.values()], corum=complexes, out=args.out / "report",
        labels=labels, seed=args.seed, umap=False, overwrite=True,
    )  # fmt: skip
    table = result.table.copy()
    parsed = table["embedding"].str.extract(RUN_NAME.pattern)
    table["budget_steps"] = pd.to_numeric(parsed[0])
    table["alpha"] = pd.to_numeric(parsed[1])
    table["well_f1_over_chance"] = table["well_f1"] / table["well_f1_chance"]
    return table


def plot(table: pd.DataFrame, figure_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 4.0), dpi=110)
    scbd, refs = table[table["budget_steps"].notna()], table[table["budget_steps"].isna()]
    for ax, (column, label) in zip(axes, PANELS, strict=True):
        for alpha, rows in scbd.groupby("alpha", sort=True):
            rows = rows.sort_values("budget_steps")
            ax.plot(rows["budget_steps"], rows[column], "o-", label=f"SCBD α = {alpha:g}")
        for (_, row), style in zip(refs.iterrows(), ("--", "-.", ":"), strict=False):
            ax.axhline(row[column], color="0.35", ls=style, lw=1.2, label=row["embedding"])
        if column == "well_f1_over_chance":
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
        ax.set_xscale("log")
        budgets = sorted(scbd["budget_steps"].unique())
        ax.set_xticks(budgets, [f"{b:,.0f}" for b in budgets], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel("training steps (SCBD)")
        ax.set_title(label, fontsize=9)
    axes[0].legend(frameon=False, fontsize=7)
    figure.suptitle("SCBD against the conventional pipeline, per training budget (demo screen)")
    figure.tight_layout()
    figure.savefig(figure_path)
    plt.close(figure)


def report(args: argparse.Namespace) -> None:
    table = evaluate_all(args)
    table.to_csv(args.out / "curves.csv", index=False)
    plot(table, args.out / "curves.png")
    columns = [("embedding", "embedding", "s"), ("corum_auprc", "CORUM AUPRC", ".3f"),
               ("map_consistency", "mAP complexes", ".3f"), ("well_f1", "well F1", ".3f"),
               ("well_f1_over_chance", "/ chance", ".2f"), ("ilisi", "iLISI", ".3f"),
               ("overall", "overall", ".2f")]  # fmt: skip
    body = markdown_table(table, columns)
    (args.out / "curves.md").write_text(
        "# Learning curves\n\n![curves](curves.png)\n\n" + body + "\n", encoding="utf-8"
    )
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished demo folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1000, 3000])
    parser.add_argument("--alphas", type=float, nargs="+", default=[3.0, 0.0],
                        help="the demo's alpha and no invariance")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes-per-batch", type=int, default=None)
    parser.add_argument("--cells-per-class", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--report", action="store_true", help="only evaluate and draw")
    parser.add_argument("--no-report", action="store_true", help="only train and embed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not args.report:
        run(args)
    if not args.no_report:
        report(args)


if __name__ == "__main__":
    main()
