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

Option sets (issue 24: stem, augmentation, model selection, learning rate) each get their
own curve: ``--variant NAME:option=value,option=value`` (any ``scbd-cells train`` option;
repeat for several; ``default`` is the demo's options as they are), and ``--seed 0 1 2``
repeats every run per seed::

    python examples/learning_curve.py --demo demo-out --out screen --steps 300 1000 \
        --alphas 3 --seed 0 1 2 --variant default --variant select:select=z_c \
        --variant d4shift:augment=dihedral+shift --variant small:stem=small \
        --variant warmup:lr=3e-4,warmup_steps=100 \
        --variant all:select=z_c,augment=dihedral+shift,stem=small,lr=3e-4,warmup_steps=100

Runs land in ``OUT/runs/steps_N_alpha_A[_NAME][_seed_S]`` (no suffix for the default
options and seed 0, as before) and embeddings in ``OUT/embeddings``; a rerun skips
an embedded run and resumes a killed one (``train(resume=True)``). Then it evaluates
every embedding in ``OUT/embeddings`` with the references in one report (``OUT/report``:
one table, so the field's min-max scaled batch, bio and overall scores compare across
budgets), and writes ``OUT/curves.csv``, ``OUT/curves.png`` and ``OUT/curves.md``.
Nothing here is tuned on the evaluation's complexes file: alpha and the options are the
demo's. ``--no-report`` only trains and embeds, ``--report`` only evaluates and draws;
``--cells-per-class`` / ``--classes-per-batch`` change the batch (use another ``--out``).
``curves.md`` also gives, per option set, budget and alpha, the mean and the spread over
seeds, and for each run the step embedded and the step each selection rule
(``--select total`` / ``z_c``) would keep. ``--both-rules`` also embeds, from the same
runs, the step ``--select z_c`` keeps (``checkpoints/best_z_c.pt``) as the curve
``zc`` (``NAME-zc`` for a variant): model selection compared without training twice.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

import pandas as pd

import scbd_cells
from scbd_cells.core.config import demo_train_options
from scbd_cells.data import schema
from scbd_cells.evaluation.pages import markdown_table

REFERENCES = ("baseline", "baseline_per_well", "baseline_harmony")
RUN_NAME = re.compile(r"^steps_(\d+)_alpha_([0-9.]+)(?:_(?!seed_)([a-z0-9-]+))?(?:_seed_(\d+))?$")
VARIANT_NAME = re.compile(r"^[a-z0-9-]+$")
#: Options a variant cannot set: the curve sets them per run.
CURVE_OPTIONS = ("steps", "alpha", "seed", "val_every", "device")
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


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:option=value,option=value`` (or ``default``) -> (NAME, options).

    Values stay strings: ``scbd_cells.train`` validates and converts them as it does the
    command line's (an unknown option or a bad value stops the run with its message).
    """
    name, _, spec = text.partition(":")
    if not VARIANT_NAME.match(name):
        raise SystemExit(f"--variant {text!r}: NAME must be lower-case letters, digits or '-'")
    options = {}
    for item in filter(None, spec.split(",")):
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not key:
            raise SystemExit(f"--variant {text!r}: expected option=value, found {item!r}")
        if key in CURVE_OPTIONS:
            raise SystemExit(f"--variant {text!r}: {key} is set by the curve (--steps, ...)")
        options[key] = value.strip()
    if name == "default" and options:
        raise SystemExit("--variant default takes no options: it is the demo's own")
    return name, options


def run_name(steps: int, alpha: float, variant: str, seed: int) -> str:
    """``steps_N_alpha_A`` for the default options and seed 0, suffixed otherwise."""
    name = f"steps_{steps}_alpha_{alpha:g}"
    if variant != "default":
        name += f"_{variant}"
    return name + (f"_seed_{seed}" if seed else "")


def train_options(store_path: Path, args: argparse.Namespace) -> dict:
    """The demo's training options, with this curve's batch shape (seed and steps per run)."""
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
    return dict(options, device=args.device)


def run(args: argparse.Namespace) -> None:
    store, _, _ = demo_inputs(args.demo)
    options = train_options(store, args)
    variants = dict(parse_variant(text) for text in args.variant)
    plan = [
        (steps, alpha, variant, seed)
        for variant in variants
        for seed in args.seed
        for steps in args.steps
        for alpha in args.alphas
    ]
    for done, (steps, alpha, variant, seed) in enumerate(plan):
        name = run_name(steps, alpha, variant, seed)
        print(f"[{done + 1}/{len(plan)}] {name} {variants[variant] or ''}", flush=True)
        run_options = dict(options, **variants[variant], seed=seed)
        run_dir, cells = args.out / "runs" / name, args.out / "embeddings" / f"{name}.h5ad"
        if cells.exists():
            print(f"{name}: embedded, skipped", flush=True)
        else:
            train_and_embed(store, run_dir, cells, dict(run_options, steps=steps, alpha=alpha))
        if args.both_rules:
            embed_other_rule(run_dir, store, args.out, (steps, alpha, variant, seed))


def train_and_embed(store: Path, run_dir: Path, cells: Path, options: dict) -> None:
    """Train one run (resuming a killed one) and embed its ``best.pt``."""
    started = time.perf_counter()
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    # validation every 1/6 of the run, as the demo's 50 of 300
    options = dict(options, val_every=max(10, options["steps"] // 6))
    trained = scbd_cells.train(store, out=run_dir, resume=resume, **options)
    if trained.interrupted:  # Ctrl-C: leave it unembedded, so a rerun resumes it
        raise SystemExit(f"{run_dir.name}: interrupted; rerun the same command to continue")
    scbd_cells.embed(run_dir, store, out=cells, workers=2)
    print(f"{run_dir.name}: {time.perf_counter() - started:.0f} s", flush=True)


def zc_variant(variant: str) -> str:
    """The curve of a variant's runs embedded at the step ``--select z_c`` keeps."""
    return "zc" if variant == "default" else f"{variant}-zc"


def embed_other_rule(run_dir: Path, store: Path, out: Path, key: tuple) -> None:
    """Embed ``best_z_c.pt``, the step ``--select z_c`` keeps in the same run, as its own curve.

    A run kept ``best.pt`` by the total val loss (the default rule); training writes the
    step z_c's rule keeps beside it, so that rule's embedding needs no second run.
    """
    steps, alpha, variant, seed = key
    if not (run_dir / "checkpoints" / "best_z_c.pt").is_file():
        return  # the run's own rule is z_c: best.pt is that step already
    cells = out / "embeddings" / f"{run_name(steps, alpha, zc_variant(variant), seed)}.h5ad"
    if not cells.exists():
        scbd_cells.embed(run_dir, store, out=cells, which="best_z_c", workers=2)


def evaluate_all(args: argparse.Namespace) -> pd.DataFrame:
    """One report of every embedded run and the references; the table with the budgets."""
    _, complexes, references = demo_inputs(args.demo)

    def order(path: Path) -> tuple:
        steps, alpha, variant, seed = RUN_NAME.match(path.stem).groups()
        return (variant or "", float(alpha), int(steps), int(seed or 0))

    runs = sorted(
        (p for p in (args.out / "embeddings").glob("*.h5ad") if RUN_NAME.match(p.stem)), key=order
    )
    if not runs:
        raise SystemExit(f"nothing embedded in {args.out / 'embeddings'}: run without --report")
    labels = [p.stem for p in runs] + list(references)
    result = scbd_cells.evaluate(
        [*runs, *references.values()], corum=complexes, out=args.out / "report",
        labels=labels, seed=args.seed[0], umap=False, overwrite=True,
    )  # fmt: skip
    table = result.table.copy()
    parsed = table["embedding"].str.extract(RUN_NAME.pattern)
    table["budget_steps"] = pd.to_numeric(parsed[0])
    table["alpha"] = pd.to_numeric(parsed[1])
    is_run = table["budget_steps"].notna()
    table["variant"] = parsed[2].where(parsed[2].notna() | ~is_run, "default")
    table["seed"] = pd.to_numeric(parsed[3]).where(parsed[3].notna() | ~is_run, 0)
    table["well_f1_over_chance"] = table["well_f1"] / table["well_f1_chance"]
    steps = [selection_steps(args.out / "runs", name) if run else {}
             for name, run in zip(table["embedding"], is_run, strict=True)]  # fmt: skip
    return pd.concat([table, pd.DataFrame(steps, index=table.index)], axis=1)


def selection_steps(runs: Path, name: str) -> dict:
    """The rule that chose the embedded step, that step, and the step each rule would keep.

    A ``-zc`` curve's embedding is its source run's ``best_z_c.pt`` (``--both-rules``).
    """
    import torch
    import yaml

    checkpoint, rule = "best.pt", None
    steps, alpha, variant, seed = RUN_NAME.match(name).groups()
    if not (runs / name).is_dir() and variant and (variant == "zc" or variant.endswith("-zc")):
        source = variant.removesuffix("zc").removesuffix("-") or "default"
        name = run_name(int(steps), float(alpha), source, int(seed or 0))
        checkpoint, rule = "best_z_c.pt", "z_c"
    run_dir = runs / name
    val = pd.read_csv(run_dir / "metrics.csv").query("phase == 'val'")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    kept = torch.load(run_dir / "checkpoints" / checkpoint, map_location="cpu", weights_only=True)
    return {
        "select": rule or config.get("select", "total"),
        "best_pt_step": int(kept["step"]),
        "best_step_total": val["best_step_total"].iloc[-1] if len(val) else None,
        "best_step_z_c": val["best_step_z_c"].iloc[-1] if len(val) else None,
    }


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per option set, alpha and budget: the mean and standard deviation over seeds."""
    runs = table[table["budget_steps"].notna()]
    metrics = ["corum_auprc", "corum_recall_10_90", "well_f1_over_chance", "overall"]
    grouped = runs.groupby(["variant", "alpha", "budget_steps"], sort=True)[metrics]
    summary = grouped.mean().join(grouped.std(ddof=1), rsuffix="_sd").reset_index()
    summary["n_seeds"] = grouped.size().to_numpy()
    return summary


def plot(table: pd.DataFrame, figure_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 4.0), dpi=110)
    scbd, refs = table[table["budget_steps"].notna()], table[table["budget_steps"].isna()]
    for ax, (column, label) in zip(axes, PANELS, strict=True):
        for (variant, alpha), rows in scbd.groupby(["variant", "alpha"], sort=True):
            by_budget = rows.groupby("budget_steps")[column]  # over seeds: mean and sd
            mean, spread = by_budget.mean(), by_budget.std().fillna(0.0)
            name = f"SCBD α = {alpha:g}" + ("" if variant == "default" else f", {variant}")
            ax.errorbar(mean.index, mean.to_numpy(), yerr=spread.to_numpy(), fmt="o-",
                        capsize=3, label=name)  # fmt: skip
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
    figure.suptitle(
        "SCBD against the conventional pipeline, per training budget "
        "(demo screen; mean ± sd over seeds)"
    )
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
    runs = table[table["budget_steps"].notna()]
    selection = markdown_table(
        runs, [("embedding", "run", "s"), ("select", "--select", "s"),
               ("best_pt_step", "embedded step", ".0f"),
               ("best_step_total", "lowest total val loss", ".0f"),
               ("best_step_z_c", "lowest val SupCon(z_c)", ".0f")],
    )  # fmt: skip
    summary = markdown_table(
        seed_summary(table),
        [("variant", "options", "s"), ("alpha", "α", "g"), ("budget_steps", "steps", ".0f"),
         ("n_seeds", "seeds", ".0f"), ("corum_auprc", "CORUM AUPRC", ".3f"),
         ("corum_auprc_sd", "± sd", ".3f"), ("corum_recall_10_90", "recall 10/90", ".3f"),
         ("well_f1_over_chance", "well F1 / chance", ".2f"),
         ("well_f1_over_chance_sd", "± sd", ".2f"), ("overall", "overall", ".2f")],
    )  # fmt: skip
    (args.out / "curves.md").write_text(
        "# Learning curves\n\n![curves](curves.png)\n\n" + body
        + "\n\n## Per option set (mean and sd over seeds)\n\n" + summary
        + "\n\n## Model selection per run\n\n" + selection + "\n",
        encoding="utf-8",
    )  # fmt: skip
    print(body + "\n\n" + summary + "\n\n" + selection)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished demo folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1000, 3000])
    parser.add_argument("--alphas", type=float, nargs="+", default=[3.0, 0.0],
                        help="the demo's alpha and no invariance")  # fmt: skip
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed")
    parser.add_argument(
        "--variant", action="append", default=None, metavar="NAME:OPTION=VALUE,...",
        help="an option set of its own curve, e.g. small:stem=small (repeat); default: default",
    )  # fmt: skip
    parser.add_argument("--classes-per-batch", type=int, default=None)
    parser.add_argument("--cells-per-class", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--both-rules", action="store_true",
        help="also embed each run's best_z_c.pt (the step --select z_c keeps) as the curve NAME-zc",
    )  # fmt: skip
    parser.add_argument("--report", action="store_true", help="only evaluate and draw")
    parser.add_argument("--no-report", action="store_true", help="only train and embed")
    args = parser.parse_args()
    args.variant = args.variant or ["default"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not args.report:
        run(args)
    if not args.no_report:
        report(args)


if __name__ == "__main__":
    main()
