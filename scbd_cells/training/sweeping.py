"""Sweep: train, embed and evaluate SCBD at several alphas, draw the trade-off, recommend one.

``sweep(store_path, out=SWEEP_DIR, alpha=[0, 0.3, 1, 3, 10], corum=FILE)`` runs, for
each alpha, ``train`` -> ``embed`` -> ``evaluate`` (one embedding per report, so each
alpha's evaluation is done once), evaluates the reference AnnData files the user gives
(e.g. a ``scbd-cells baseline``), and writes:

    SWEEP_DIR/
      sweep.yaml           what was asked: the store, alphas, references, train options
      runs/alpha_A/        one training run per alpha (``scbd-cells train``)
      embeddings/alpha_A.h5ad
      reports/alpha_A/     one ``scbd-cells evaluate`` report per alpha, and
      reports/ref_NAME/    per reference file
      sweep.csv            one row per alpha: validation losses, evaluation metrics, the rule
      references.csv       the references' evaluation metrics
      tradeoff.png         biology (CORUM AUPRC; the field's bio score) against well F1 / chance
      sweep.md             the table, the recommended alpha and the rule, the figure

It is resumable like ``make``: a rerun skips a run that reached its steps and resumes
one that did not (``train(resume=True)``), and redoes an embedding older than its
checkpoint or a report older than its embedding (or made with another complexes file
or seed). Nothing else is redone.

The recommended alpha does not look at the complexes file (that is for reporting): it
is the largest alpha whose validation perturbation SupCon loss keeps at least
``1 - margin`` of the largest fall below the collapsed level log(val batch size) seen
in the sweep (:func:`recommend_alpha`; docs/training.md, "Choosing alpha").
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from scbd_cells.core.config import SweepOptions
from scbd_cells.core.errors import InputError
from scbd_cells.core.outputs import (
    atomic_path,
    check_not_input,
    check_output,
    kind_of,
    locks_output,
    read_marker,
    remove_owned,
    writable_folder_error,
    write_marker,
    write_text_atomic,
)
from scbd_cells.model.selection import COLLAPSE_MARGIN as COLLAPSE_MARGIN  # stall level

log = logging.getLogger(__name__)

# "Clearly learned": a fall below log B of at least this fraction of log B (0.049 for B = 128).
# The validation loss moves by 0.01-0.04 between validations of one run (docs/training.md,
# seeds 0-2 of the demo), so a smaller fall may be noise: a 40-step sweep of the tiny screen
# fell 0.0067 at best. The demo's 300-step runs fall 0.07-0.13 at alpha 0-3.
LEARNED_MARGIN = 0.01

# The defaults of `scbd-cells sweep`, declared once on its options
DEFAULT_ALPHAS: tuple[float, ...] = SweepOptions.model_fields["alpha"].default
#: Fraction of the sweep's largest fall below log(val batch size) that an alpha may lose.
DEFAULT_MARGIN: float = SweepOptions.model_fields["margin"].default
SWEEP_ENTRIES = (
    "sweep.yaml",
    "runs",
    "embeddings",
    "reports",
    "sweep.csv",
    "references.csv",
    "tradeoff.png",
    "sweep.md",
)
SUBFOLDERS = ("runs", "embeddings", "reports")
# Options of train that the sweep itself sets or that make no sense per alpha.
NOT_TRAIN_OPTIONS = ("alpha", "out", "resume", "config", "store_path")
# validation columns of metrics.csv kept in sweep.csv (prefixed "val_")
VAL_COLUMNS = (
    "loss",
    "supcon_perturbation",
    "supcon_batch",
    "invariance",
    "invariance_shuffled",
    "well_f1_z_perturbation",
    "well_f1_z_batch",
    "well_f1_chance",
)


@dataclass(frozen=True)
class Recommendation:
    """The alpha :func:`recommend_alpha` picks, and why.

    Attributes
    ----------
    alpha
        The recommended alpha, or None when no alpha's z_c learned the perturbation.
    retained
        Per row of the table: the fraction of the sweep's largest fall below
        log(val batch size) that the row's validation perturbation SupCon loss keeps.
    within_margin
        Per row: ``retained >= 1 - margin``.
    reason
        One sentence for people.
    """

    alpha: float | None
    retained: pd.Series
    within_margin: pd.Series
    reason: str


def recommend_alpha(table: pd.DataFrame, *, margin: float = DEFAULT_MARGIN) -> Recommendation:
    """The largest alpha whose z_c still learns the perturbation nearly as well as the best one.

    For each row, ``fall = log_val_batch_size - val_supcon_perturbation``: how far the
    validation perturbation SupCon loss of the checkpoint the sweep embedded lies below
    log(B), the loss of a z_c that is the same for every cell (B = cells in one validation
    batch; the same level the training's stall warning uses). If no fall reaches
    ``LEARNED_MARGIN`` (1 %) of log B, more than the validation loss moves between
    validations, nothing is recommended. An alpha is within the
    margin when its fall is at least ``(1 - margin)`` times the largest fall in the sweep;
    the recommendation is the largest such alpha. The reference is the sweep's best fall,
    not alpha = 0's, because on small screens alpha = 0 overfits (its validation loss
    climbs back towards log B) while a small alpha regularises. Nothing here reads the
    complexes file or any evaluation metric.

    Parameters
    ----------
    table
        One row per alpha, columns ``alpha``, ``val_supcon_perturbation``,
        ``log_val_batch_size``.
    margin
        Fraction of the largest fall an alpha may lose, in [0, 1).

    Returns
    -------
    Recommendation
    """
    if not 0 <= margin < 1:
        raise InputError(f"--margin must be at least 0 and below 1; found {margin}.")
    fall = table["log_val_batch_size"].astype(float) - table["val_supcon_perturbation"].astype(
        float
    )
    best = float(fall.max()) if len(fall) else float("nan")
    # a fall smaller than the validation loss's own noise is no learning
    floor = LEARNED_MARGIN * float(table["log_val_batch_size"].astype(float).max())
    if not math.isfinite(best) or best < floor:
        nothing = pd.Series(False, index=table.index)
        fell = f"{best:.4f} at best" if math.isfinite(best) else "no value"
        return Recommendation(
            alpha=None,
            retained=pd.Series(np.nan, index=table.index),
            within_margin=nothing,
            reason=(
                "no alpha's validation perturbation SupCon loss fell clearly below log(val batch "
                f"size), the level of a z_c that learned nothing ({fell}; at least "
                f"{floor:.3f}, {LEARNED_MARGIN:.0%} of it, is needed): z_c learned no "
                "perturbation at any alpha, so the sweep cannot recommend one. Train longer "
                "(--steps: the demo screen needs about 300), on a CPU with --encoder small, or "
                "check that the perturbations change the cells."
            ),
        )
    retained = fall / best
    within = retained >= 1 - margin - 1e-12
    chosen = float(table.loc[within, "alpha"].astype(float).max())
    best_alpha = float(table.loc[fall.idxmax(), "alpha"])
    kept = float(retained[table["alpha"].astype(float) == chosen].iloc[0])
    reason = (
        f"alpha {chosen:g} is the largest alpha whose validation perturbation SupCon loss keeps "
        f"at least {1 - margin:.0%} of the largest fall below log(val batch size) in this sweep "
        f"({best:.4f} at alpha {best_alpha:g}); it keeps {kept:.0%}."
    )
    return Recommendation(alpha=chosen, retained=retained, within_margin=within, reason=reason)


@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` produced.

    Attributes
    ----------
    out_dir
        The sweep folder.
    table
        ``sweep.csv``: one row per alpha.
    references
        ``references.csv``: one row per reference embedding (may be empty).
    recommended_alpha
        The rule's choice (None when no alpha learned the perturbation, or the sweep was
        interrupted).
    reason
        Why, in one sentence.
    figure_path, table_path, summary_path
        ``tradeoff.png``, ``sweep.csv``, ``sweep.md``.
    interrupted
        True when a training was stopped by Ctrl-C (rerun the same command to continue).
    """

    out_dir: Path
    table: pd.DataFrame
    references: pd.DataFrame
    recommended_alpha: float | None
    reason: str
    figure_path: Path
    table_path: Path
    summary_path: Path
    interrupted: bool = False


def alpha_name(alpha: float) -> str:
    """``alpha_0``, ``alpha_0.3``, ``alpha_10``: the folder and label of one alpha."""
    return f"alpha_{alpha:g}"


def _alphas(values: Sequence[float | str]) -> list[float]:
    """The alphas as sorted floats, alpha = 0 included; refuse negatives, NaN and repeats."""
    try:
        alphas = [float(value) for value in values]
    except (TypeError, ValueError):
        raise InputError(
            f"--alpha must be numbers separated by commas, e.g. 0,0.3,1,3,10; found {values!r}."
        ) from None
    bad = [a for a in alphas if not math.isfinite(a) or a < 0]
    if bad or not alphas:
        raise InputError(
            f"--alpha must be one or more finite numbers of at least 0 (e.g. 0,0.3,1,3,10); "
            f"found {', '.join(map(str, alphas)) or 'none'}."
        )
    names = [alpha_name(a) for a in alphas]
    if len(set(names)) != len(names):
        raise InputError(f"--alpha lists a value twice ({', '.join(names)}); give each once.")
    if 0.0 not in alphas:
        log.info("sweep: adding alpha 0, the reference of the trade-off and of the rule")
        alphas.append(0.0)
    return sorted(alphas)


def _reference_names(references: Sequence[str | os.PathLike]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in map(Path, references):
        if not path.exists():
            raise InputError(
                f"The reference {path} does not exist. Give AnnData files of conventional "
                "profiles, e.g. from `scbd-cells baseline STORE --out baseline.h5ad` or "
                "`scbd-cells correct`."
            )
        if path.stem in names:
            raise InputError(
                f"Two references are named {path.stem!r} ({names[path.stem]} and {path}); "
                "rename one of the files."
            )
        names[path.stem] = path
    return names


# --------------------------------------------------------------------------- the folder


def _open_sweep_folder(out_dir: Path, *, overwrite: bool, inputs: list[Any]) -> bool:
    """Create, reuse (a sweep folder: resume) or replace (``overwrite``) the sweep folder.

    Returns True when an earlier sweep is continued.
    """
    check_not_input(out_dir, inputs)
    resumed = kind_of(out_dir) == "sweep"
    if resumed and overwrite:
        remove_owned(out_dir, kind="sweep")
        resumed = False
    elif not resumed:
        check_output(out_dir, kind="sweep", overwrite=overwrite)  # a new or empty folder
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _mark(out_dir, SWEEP_ENTRIES)
        for name in SUBFOLDERS:
            # Inside a sweep folder (new, empty, or the sweep's) a subfolder is the sweep's, or
            # what an earlier sweep left of it after --overwrite: files a person put there. Its
            # marker lists only what the sweep writes, so those are never touched.
            (out_dir / name).mkdir(exist_ok=True)
            _mark(out_dir / name, ())
    except OSError as error:
        raise writable_folder_error(out_dir, error) from error
    return resumed


def _mark(folder: Path, entries: Sequence[str]) -> None:
    """Mark ``folder`` as the sweep's, listing ``entries`` and those an earlier marker listed.

    The subfolders ``runs``, ``embeddings`` and ``reports`` carry their own marker, so that
    replacing a sweep removes the runs, files and reports it made and nothing else put there.
    """
    earlier = read_marker(folder) or {}
    write_marker(folder, kind="sweep", entries=[*earlier.get("entries", []), *entries])


def _check_same_store(out_dir: Path, earlier: dict[str, Any], request: dict[str, Any]) -> None:
    """Refuse to continue a sweep on another store than the one it began on (by store id)."""
    before, now = earlier.get("store_id"), request["store_id"]
    if before is None:  # a sweep begun before the id was recorded: compare the paths
        same = Path(str(earlier.get("store", ""))).resolve() == Path(request["store"]).resolve()
    else:
        same = before == now
    if not same:
        raise InputError(
            f"The sweep in {out_dir} was begun on the store {earlier.get('store')} (store id "
            f"{before or 'not recorded'}); this command gives {request['store']} (store id "
            f"{now}). Its finished runs were trained on the first, so they cannot be reported "
            "for the second. Choose another --out, or pass --overwrite to start the sweep over "
            "on the new store."
        )


def _record_request(out_dir: Path, request: dict[str, Any], *, resumed: bool) -> None:
    """``sweep.yaml``; on a rerun, refuse another store and warn about other changes."""
    path = out_dir / "sweep.yaml"
    if resumed and path.exists():
        try:
            earlier = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            earlier = {}
        _check_same_store(out_dir, earlier, request)
        changed = sorted(
            key
            for key in (set(earlier) | set(request)) - {"store_id"}  # checked above
            if earlier.get(key) != request.get(key)
        )
        if changed:
            log.warning(
                "sweep: continuing %s with changed settings (%s); finished runs are kept, "
                "unfinished ones resume with the new options. Use --overwrite to start over.",
                out_dir,
                ", ".join(changed),
            )
    write_text_atomic(path, yaml.safe_dump(request, sort_keys=False))


# --------------------------------------------------------------------------- the stages


def _saved_step(checkpoint_path: Path) -> int | None:
    """The step of a checkpoint, or None when there is none (or it cannot be read)."""
    from scbd_cells.core.errors import CheckpointError
    from scbd_cells.training.checkpoint import load_checkpoint

    if not checkpoint_path.is_file():
        return None
    try:
        return int(load_checkpoint(checkpoint_path)["step"])
    except CheckpointError:
        return None


def _train_stage(
    store_path: Path,
    run_dir: Path,
    *,
    alpha: float,
    config_path: Path | None,
    options: dict[str, Any],
) -> bool:
    """Train (or resume, or skip) the run of one alpha; True if it was interrupted."""
    from scbd_cells.core.config import resolve_train_config
    from scbd_cells.training.checkpoint import checkpoint_path_of
    from scbd_cells.training.loop import train

    steps = resolve_train_config(config_path=config_path, overrides=dict(options, alpha=alpha))
    target = steps.steps
    done = _saved_step(checkpoint_path_of(run_dir, "last"))
    name = alpha_name(alpha)
    if done is not None and done >= target:
        log.info("sweep: %s: trained (step %d of %d), skipped", name, done, target)
        return False
    if done is None:
        log.info("sweep: %s: training %d steps", name, target)
    else:
        log.info("sweep: %s: resuming the training at step %d of %d", name, done, target)
    result = train(
        store_path,
        out=run_dir,
        config_path=config_path,
        resume=done is not None,
        **dict(options, alpha=alpha),
    )
    return result.interrupted


def _older(path: Path, than: Path) -> bool:
    """True when ``path`` is missing or was written before ``than`` (make's rule)."""
    return not path.exists() or path.stat().st_mtime_ns < than.stat().st_mtime_ns


def _embed_stage(run_dir: Path, store_path: Path, cells_path: Path, *, options: dict) -> None:
    from scbd_cells.embedding.encode import embed
    from scbd_cells.training.checkpoint import checkpoint_path_of

    name = cells_path.stem
    if not _older(cells_path, checkpoint_path_of(run_dir, "best")):
        log.info("sweep: %s: embedded, skipped", name)
        return
    log.info("sweep: %s: embedding the cells", name)
    device = options.get("device")
    embed(
        run_dir,
        store_path,
        out=cells_path,
        device=None if device in (None, "auto") else device,
        workers=int(options.get("workers") or 2),
        overwrite=True,  # only an AnnData scbd-cells wrote is replaced
    )


def _evaluate_stage(
    cells_path: Path,
    report_dir: Path,
    *,
    label: str,
    corum: Path,
    control: str | None,
    seed: int,
) -> dict[str, Any]:
    """Evaluate one embedding into its own report (unless an up-to-date one is there)."""
    from scbd_cells.evaluation.report import evaluate

    metrics_path = report_dir / "metrics.json"
    current = None
    if not _older(metrics_path, cells_path):
        current = json.loads(metrics_path.read_text())
        settings = current.get("settings", {})
        if settings.get("corum") != str(corum) or settings.get("seed") != seed:
            current = None
    if current is not None and label in current.get("embeddings", {}):
        log.info("sweep: %s: evaluated, skipped", label)
        return current["embeddings"][label]
    log.info("sweep: %s: evaluating", label)
    result = evaluate(
        [cells_path],
        corum=corum,
        out=report_dir,
        labels=[label],
        control=control,
        umap=False,
        seed=seed,
        overwrite=True,  # only a report folder scbd-cells wrote is replaced
    )
    return result.metrics["embeddings"][label]


# --------------------------------------------------------------------------- the tables


def _val_row(run_dir: Path) -> dict[str, Any]:
    """The validation losses at the embedded (best) checkpoint and at the end of the run."""
    from scbd_cells.training.checkpoint import checkpoint_path_of, load_checkpoint

    best = load_checkpoint(checkpoint_path_of(run_dir, "best"))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    val = metrics[metrics["phase"] == "val"]
    at_best = val[val["step"] == int(best["step"])]
    row: dict[str, Any] = {"steps": int(metrics["step"].max()), "best_step": int(best["step"])}
    chosen = at_best.iloc[-1] if len(at_best) else val.iloc[-1]
    for column in VAL_COLUMNS:
        row[f"val_{column}"] = float(chosen[column])
    row["val_supcon_perturbation_last"] = float(val.iloc[-1]["supcon_perturbation"])
    batch_size = best.get("val_batch_size")
    if batch_size is None:  # a run from before the entry: the batch the run was asked for
        config = best.get("config", {})
        batch_size = int(config["classes_per_batch"]) * int(config["cells_per_class"])
    row["log_val_batch_size"] = math.log(int(batch_size))
    return row


def _metric_row(metrics: dict[str, Any]) -> dict[str, Any]:
    from scbd_cells.evaluation.report import METRIC_KEYS

    row = {key: metrics.get(key) for key in METRIC_KEYS}
    row = {key: (np.nan if value is None else value) for key, value in row.items()}
    chance = row.get("well_f1_chance")
    row["well_f1_over_chance"] = row["well_f1"] / chance if chance else np.nan
    return row


def _with_overall(alphas: pd.DataFrame, references: pd.DataFrame) -> tuple[pd.DataFrame, ...]:
    """batch_score, bio_score and overall across the sweep's alphas and references together.

    The field's overall score ranks the embeddings of one table (min-max scaled per metric,
    scIB style); each report has one embedding, so the scores are computed here over all.
    """
    from scbd_cells.evaluation.overall import overall_scores

    if references.empty:
        both = alphas.copy()
    else:
        both = pd.concat([alphas, references], ignore_index=True)
    scores = overall_scores(both)
    both[scores.columns] = scores

    def columns(table: pd.DataFrame) -> list[str]:
        return [*table.columns, *(c for c in scores.columns if c not in table.columns)]

    alpha_rows = both.iloc[: len(alphas)].reset_index(drop=True)[columns(alphas)]
    if references.empty:
        return alpha_rows, references
    reference_rows = both.iloc[len(alphas) :].reset_index(drop=True)[columns(references)]
    return alpha_rows, reference_rows


# --------------------------------------------------------------------------- figure, summary


def plot_tradeoff(
    table: pd.DataFrame,
    references: pd.DataFrame,
    figure_path: Path,
    *,
    recommended: float | None,
) -> None:
    """Biology against well F1 / chance, one labelled point per alpha, references beside them.

    Left: CORUM AUPRC (paper A.3); right: the field's bio score (min-max scaled across the
    sweep's embeddings). Up and to the left is better: more biology, less of the well.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [("corum_auprc", "CORUM AUPRC (higher is better)"),
              ("bio_score", "bio score, scaled across this sweep")]  # fmt: skip
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for ax, (column, label) in zip(axes, panels, strict=True):
        x, y = table["well_f1_over_chance"], table[column]
        ax.plot(x, y, "-", color="tab:blue", alpha=0.4, zorder=1)
        ax.scatter(x, y, color="tab:blue", zorder=2, label="SCBD")
        for alpha, px, py in zip(table["alpha"], x, y, strict=True):
            ax.annotate(f"α={alpha:g}", (px, py), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color="tab:blue")  # fmt: skip
        if recommended is not None:
            chosen = table[table["alpha"] == recommended]
            ax.scatter(chosen["well_f1_over_chance"], chosen[column], s=220, facecolors="none",
                       edgecolors="tab:red", linewidths=1.6, zorder=3,
                       label=f"recommended (α={recommended:g})")  # fmt: skip
        if len(references):
            rx, ry = references["well_f1_over_chance"], references[column]
            ax.scatter(rx, ry, marker="s", color="0.35", zorder=2, label="references")
            for name, px, py in zip(references["embedding"], rx, ry, strict=True):
                ax.annotate(str(name), (px, py), textcoords="offset points", xytext=(5, -10),
                            fontsize=8, color="0.25")  # fmt: skip
        ax.axvline(1.0, color="k", ls=":", lw=1)
        spread = pd.concat([x, references.get("well_f1_over_chance", x.iloc[:0])]).dropna()
        if len(spread) and spread.min() > 0 and spread.max() / spread.min() > 4:
            ax.set_xscale("log")  # a raw pipeline at 12x chance would squeeze the alphas
        ax.set_xlabel("well F1 / chance (lower is better; 1 = chance)")
        ax.set_ylabel(label)
        ax.legend(frameon=False, fontsize=8)
    figure.suptitle("Biology kept against well information left, per α (up and left is better)")
    figure.tight_layout()
    try:
        with atomic_path(figure_path) as tmp_path:
            figure.savefig(tmp_path)
    finally:
        plt.close(figure)


def _summary(
    table: pd.DataFrame,
    references: pd.DataFrame,
    recommendation: Recommendation,
    *,
    margin: float,
) -> str:
    def number(value: Any, fmt: str) -> str:
        return "–" if value is None or value != value else format(value, fmt)

    lines = [
        "# scbd-cells α sweep",
        "",
        f"**Recommended α: {recommendation.alpha:g}**" if recommendation.alpha is not None
        else "**No α recommended.**",  # fmt: skip
        "",
        recommendation.reason,
        "",
        f"The rule (margin {margin:g}) reads only the validation losses of the training runs, "
        "never the complexes file; see docs/training.md, \"Choosing α\". Check the trade-off "
        "below before you adopt it.",
        "",
        "| α | val SupCon(z_c), embedded checkpoint | log B | fall kept | CORUM AUPRC ↑ | "
        "well F1 / chance ↓ | bio score ↑ | overall ↑ |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table.itertuples(index=False):
        mark = " ✔" if row.recommended else ""
        lines.append(
            f"| {row.alpha:g}{mark} | {number(row.val_supcon_perturbation, '.4f')} | "
            f"{row.log_val_batch_size:.4f} | {number(row.retained, '.0%')} | "
            f"{number(row.corum_auprc, '.4f')} | {number(row.well_f1_over_chance, '.2f')} | "
            f"{number(row.bio_score, '.3f')} | {number(row.overall, '.3f')} |"
        )
    if len(references):
        lines += ["", "References:", "", "| embedding | CORUM AUPRC ↑ | well F1 / chance ↓ | "
                  "bio score ↑ | overall ↑ |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for row in references.itertuples(index=False):
            lines.append(
                f"| {row.embedding} | {number(row.corum_auprc, '.4f')} | "
                f"{number(row.well_f1_over_chance, '.2f')} | {number(row.bio_score, '.3f')} | "
                f"{number(row.overall, '.3f')} |"
            )
    lines += [
        "",
        "![trade-off](tradeoff.png)",
        "",
        "Files: `sweep.csv` (every column), `references.csv`, `runs/` (training runs), "
        "`embeddings/`, `reports/` (one `scbd-cells evaluate` report per embedding).",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


@locks_output("out")
def sweep(
    store_path: str | os.PathLike,
    *,
    out: str | os.PathLike,
    corum: str | os.PathLike,
    alpha: Sequence[float] = DEFAULT_ALPHAS,
    reference: Sequence[str | os.PathLike] = (),
    margin: float = DEFAULT_MARGIN,
    control: str | None = None,
    config_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    **options: Any,
) -> SweepResult:
    """Train, embed and evaluate SCBD at each alpha; write sweep.csv, the trade-off, a choice.

    Parameters
    ----------
    store_path
        A store written by ``scbd-cells ingest``.
    out
        Sweep folder (created; an earlier sweep there is continued).
    corum
        Complexes file for the evaluation (CORUM 3.x/4.x/5.x, two-column or GMT). Used for
        reporting only: the recommendation never reads it.
    alpha
        The alphas to train (alpha = 0 is added when missing).
    reference
        AnnData files of conventional pipelines (``scbd-cells baseline``, ``correct``),
        evaluated and drawn beside the alphas.
    margin
        Fraction of the sweep's largest fall of the validation perturbation SupCon loss below
        log(val batch size) that the recommended alpha may lose (:func:`recommend_alpha`).
    control
        Non-targeting control label for the evaluation (default: the store's).
    config_path
        YAML file of train options, as ``train --config``.
    overwrite
        Replace an earlier sweep in ``out`` instead of continuing it.
    **options
        Any train option but ``alpha`` (e.g. ``steps=2000``, ``encoder="resnet18"``,
        ``normalize="arcsinh"``), the same for every alpha. ``seed`` also seeds the
        evaluation.

    Returns
    -------
    SweepResult

    Raises
    ------
    InputError
        Bad alphas or options, an output that holds an input, a folder scbd-cells did not
        write.
    """
    out_dir, store_path, corum = Path(out), Path(store_path), Path(corum)
    config_path = Path(config_path) if config_path is not None else None
    options, alphas, references = _checked_request(
        options, alpha=alpha, reference=reference, corum=corum, margin=margin,
        config_path=config_path,
    )  # fmt: skip
    seed = _start_sweep(
        out_dir, store_path, corum, alphas=alphas, references=references, margin=margin,
        control=control, config_path=config_path, overwrite=overwrite, options=options,
    )  # fmt: skip
    rows = []
    for value in alphas:
        row = _alpha_row(out_dir, store_path, value, corum=corum, control=control, seed=seed,
                         config_path=config_path, options=options)  # fmt: skip
        if row is None:
            log.warning("sweep: interrupted; run the same command again to continue.")
            return _interrupted(out_dir)
        rows.append(row)
    reference_rows = [
        _reference_row(out_dir, stem, path, corum=corum, control=control, seed=seed)
        for stem, path in references.items()
    ]
    return _write_results(out_dir, rows, reference_rows, margin=margin)


def _checked_request(
    options: dict[str, Any],
    *,
    alpha: Sequence[float],
    reference: Sequence[str | os.PathLike],
    corum: Path,
    margin: float,
    config_path: Path | None,
) -> tuple[dict[str, Any], list[float], dict[str, Path]]:
    """The train options that were set, the alphas and the references; a bad one fails now."""
    from scbd_cells.core.config import resolve_train_config

    clashing = sorted(set(options) & set(NOT_TRAIN_OPTIONS))
    if clashing:
        raise InputError(
            f"sweep sets {', '.join(clashing)} itself; give the alphas with alpha=[...] "
            "(--alpha A,B,...) and the folder with out= (--out)."
        )
    options = {key: value for key, value in options.items() if value is not None}
    alphas = _alphas(alpha)
    resolve_train_config(config_path=config_path, overrides=options)  # a typo fails now
    references = _reference_names(reference)
    if not corum.is_file():
        raise InputError(
            f"The complexes file {corum} does not exist. Give a CORUM file (or the "
            "complexes.txt that `scbd-cells simulate` writes) with --corum."
        )
    if not 0 <= margin < 1:
        raise InputError(f"--margin must be at least 0 and below 1; found {margin}.")
    return options, alphas, references


def _start_sweep(
    out_dir: Path,
    store_path: Path,
    corum: Path,
    *,
    alphas: list[float],
    references: dict[str, Path],
    margin: float,
    control: str | None,
    config_path: Path | None,
    overwrite: bool,
    options: dict[str, Any],
) -> int:
    """Open (or continue) the sweep folder and record the request; returns the seed."""
    from scbd_cells.core.config import resolve_train_config
    from scbd_cells.data.store import open_store

    inputs = [store_path, corum, config_path, *references.values()]
    store_id = open_store(store_path).store_id  # which store the runs are trained on
    resumed = _open_sweep_folder(out_dir, overwrite=overwrite, inputs=inputs)
    seed = int(resolve_train_config(config_path=config_path, overrides=options).seed)
    _record_request(
        out_dir,
        {
            "store": str(store_path),
            "store_id": store_id,
            "corum": str(corum),
            "alpha": alphas,
            "reference": [str(path) for path in references.values()],
            "margin": margin,
            "control": control,
            "config": None if config_path is None else str(config_path),
            "train_options": {key: options[key] for key in sorted(options)},
        },
        resumed=resumed,
    )
    log.info(
        "sweep: %d alphas (%s) in %s%s",
        len(alphas),
        ", ".join(f"{a:g}" for a in alphas),
        out_dir,
        ", continuing an earlier sweep" if resumed else "",
    )
    return seed


def _alpha_row(
    out_dir: Path,
    store_path: Path,
    value: float,
    *,
    corum: Path,
    control: str | None,
    seed: int,
    config_path: Path | None,
    options: dict[str, Any],
) -> dict[str, Any] | None:
    """Train, embed and evaluate at one alpha: its row of sweep.csv (None: interrupted)."""
    name = alpha_name(value)
    run_dir = out_dir / "runs" / name
    _mark(out_dir / "runs", [name])
    if _train_stage(store_path, run_dir, alpha=value, config_path=config_path, options=options):
        return None
    cells_path = out_dir / "embeddings" / f"{name}.h5ad"
    _mark(out_dir / "embeddings", [cells_path.name])
    _embed_stage(run_dir, store_path, cells_path, options=options)
    _mark(out_dir / "reports", [name])
    metrics = _evaluate_stage(
        cells_path, out_dir / "reports" / name, label=name, corum=corum,
        control=control, seed=seed,
    )  # fmt: skip
    return {
        "alpha": value,
        **_val_row(run_dir),
        **_metric_row(metrics),
        "embedding": name,
        "run_dir": str(run_dir),
        "embedding_path": str(cells_path),
    }


def _reference_row(
    out_dir: Path, stem: str, path: Path, *, corum: Path, control: str | None, seed: int
) -> dict[str, Any]:
    """Evaluate one reference embedding: its row of references.csv."""
    folder = f"ref_{stem}"
    _mark(out_dir / "reports", [folder])
    metrics = _evaluate_stage(
        path, out_dir / "reports" / folder, label=stem, corum=corum, control=control,
        seed=seed,
    )  # fmt: skip
    return {"embedding": stem, **_metric_row(metrics), "embedding_path": str(path)}


def _write_results(
    out_dir: Path, rows: list[dict[str, Any]], reference_rows: list[dict[str, Any]], *,
    margin: float,
) -> SweepResult:  # fmt: skip
    """Score the rows, recommend an alpha; write sweep.csv, references.csv, the figure, sweep.md."""
    table, reference_table = _with_overall(pd.DataFrame(rows), pd.DataFrame(reference_rows))
    recommendation = recommend_alpha(table, margin=margin)
    table.insert(table.columns.get_loc("log_val_batch_size") + 1, "retained",
                 recommendation.retained)  # fmt: skip
    table.insert(table.columns.get_loc("retained") + 1, "within_margin",
                 recommendation.within_margin)  # fmt: skip
    table.insert(table.columns.get_loc("within_margin") + 1, "recommended",
                 table["alpha"] == recommendation.alpha)  # fmt: skip
    table_path = out_dir / "sweep.csv"
    write_text_atomic(table_path, table.to_csv(index=False))
    write_text_atomic(out_dir / "references.csv", reference_table.to_csv(index=False))
    figure_path = out_dir / "tradeoff.png"
    plot_tradeoff(table, reference_table, figure_path, recommended=recommendation.alpha)
    summary_path = out_dir / "sweep.md"
    write_text_atomic(summary_path, _summary(table, reference_table, recommendation, margin=margin))
    log.info("sweep: %s", recommendation.reason)
    return SweepResult(
        out_dir=out_dir,
        table=table,
        references=reference_table,
        recommended_alpha=recommendation.alpha,
        reason=recommendation.reason,
        figure_path=figure_path,
        table_path=table_path,
        summary_path=summary_path,
    )


def sweep_tables(result: SweepResult, *, width: int) -> list:
    """The sweep as Rich tables ``width`` columns wide: one line per alpha (and reference),
    what the rule read and what the evaluation found.
    """
    from scbd_cells.evaluation.console import rich_tables

    def number(value: Any, fmt: str) -> str:
        return "–" if value is None or value != value else format(value, fmt)

    rows = [
        {
            "alpha": f"{row.alpha:g}" + (" (recommended)" if row.recommended else ""),
            "supcon": number(row.val_supcon_perturbation, ".4f"),
            "kept": number(row.retained, ".0%"),
            "auprc": number(row.corum_auprc, ".4f"),
            "well": number(row.well_f1_over_chance, ".2f"),
            "overall": number(row.overall, ".3f"),
        }
        for row in result.table.itertuples(index=False)
    ]
    rows += [
        {"alpha": str(row.embedding), "supcon": "", "kept": "",
         "auprc": number(row.corum_auprc, ".4f"), "well": number(row.well_f1_over_chance, ".2f"),
         "overall": number(row.overall, ".3f")}
        for row in result.references.itertuples(index=False)
    ]  # fmt: skip
    columns = [("alpha", "alpha", "s"), ("supcon", "val SupCon(z_c)", "s"),
               ("kept", "fall kept", "s"), ("auprc", "CORUM AUPRC", "s"),
               ("well", "well F1 / chance", "s"), ("overall", "overall", "s")]  # fmt: skip
    title = "Alpha sweep (AUPRC, overall: higher is better; well F1 / chance: lower)"
    return rich_tables(title, pd.DataFrame(rows), columns, arrows=False, width=width)


def _interrupted(out_dir: Path) -> SweepResult:
    return SweepResult(
        out_dir=out_dir,
        table=pd.DataFrame(),
        references=pd.DataFrame(),
        recommended_alpha=None,
        reason="interrupted; run the same command again to continue",
        figure_path=out_dir / "tradeoff.png",
        table_path=out_dir / "sweep.csv",
        summary_path=out_dir / "sweep.md",
        interrupted=True,
    )
