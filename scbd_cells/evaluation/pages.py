"""Evaluate: the report's field-metrics tables, provenance, extra files and ``report.html``.

:func:`write_extras` writes, into the report's temporary folder, what the field's metrics
add to the paper's report: ``map_activity.csv`` (per gene), ``map_consistency.csv`` (per
complex), ``tradeoff.png``, ``umap.png`` and ``report.html``; :func:`field_markdown` is the
part of ``report.md`` that describes them.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scbd_cells.evaluation.benchmark import BenchmarkResult, group_tables
from scbd_cells.evaluation.complexes import Complexes
from scbd_cells.evaluation.figures import plot_tradeoff, plot_umaps
from scbd_cells.evaluation.holdout import HOLDOUT_COLUMNS, HOLDOUT_EXPLANATION, holdout_intro
from scbd_cells.evaluation.html import html_table, provenance_html, report_html
from scbd_cells.evaluation.moa import MOA_BEST, MOA_COLUMNS, moa_explanation

log = logging.getLogger(__name__)

PAPER_COLUMNS = [
    ("embedding", "embedding", "s"),
    ("corum_auprc", "CORUM AUPRC ↑", ".4f"),
    ("corum_recall_5_95", "recall @ 5%/95% ↑", ".3f"),
    ("corum_recall_10_90", "recall @ 10%/90% ↑", ".3f"),
    ("well_f1", "well F1 ↓", ".3f"),
    ("well_f1_chance", "chance", ".3f"),
    ("n_genes", "genes", "d"),
    ("n_cells", "cells", ",d"),
]
FIELD_COLUMNS = [
    ("embedding", "embedding", "s"),
    ("map_activity", "mAP activity ↑", ".3f"),
    ("fraction_active", "active ↑", ".2f"),
    ("map_consistency", "mAP consistency ↑", ".3f"),
    ("fraction_consistent", "consistent ↑", ".2f"),
    ("ilisi", "iLISI ↑", ".3f"),
    ("silhouette_batch", "silhouette batch ↑", ".3f"),
    ("graph_connectivity", "graph conn. ↑", ".3f"),
    ("kbet", "kBET ↑", ".3f"),
    ("silhouette_label", "silhouette label ↑", ".3f"),
    ("leiden_nmi", "Leiden NMI ↑", ".3f"),
    ("leiden_ari", "Leiden ARI ↑", ".3f"),
    ("batch_score", "batch ↑", ".2f"),
    ("bio_score", "bio ↑", ".2f"),
    ("overall", "overall ↑", ".2f"),
]


def paper_columns(label: str) -> list[tuple[str, str, str]]:
    """:data:`PAPER_COLUMNS` with the relationship file's label (``CORUM`` or neutral)."""
    return [
        (column, f"{label} AUPRC ↑" if column == "corum_auprc" else header, fmt)
        for column, header, fmt in PAPER_COLUMNS
    ]


# the best value of each of these columns is shown bold in report.html
BEST = {
    **{c: "max" for c, _, f in PAPER_COLUMNS + FIELD_COLUMNS if f not in ("s", "d", ",d")},
    "well_f1": "min",
}
BEST.pop("well_f1_chance")
HOLDOUT_BEST = {
    "heldout_corum_auprc": "max",
    "heldout_corum_recall_5_95": "max",
    "heldout_well_f1": "min",
    "heldout_vs_rest_f1": "min",
    "heldout_ilisi": "max",
    "heldout_kbet": "max",
}


@dataclass(frozen=True)
class ReportExtras:
    """What the field's metrics add to the report's files.

    Attributes
    ----------
    benchmarks
        Each embedding's :class:`~scbd_cells.evaluation.benchmark.BenchmarkResult`.
    complexes
        The complexes file (UMAP colours).
    umap
        Whether to draw ``umap.png``.
    seed
        Seeds the UMAPs.
    """

    benchmarks: dict[str, BenchmarkResult]
    complexes: Complexes
    umap: bool
    seed: int


def _cell(value: Any, fmt: str) -> str:
    if fmt == "s":
        return str(value)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return format(value, fmt)


def markdown_table(table: pd.DataFrame, columns: list[tuple[str, str, str]]) -> str:
    """``table`` as a Markdown table of ``(column, header, format)``."""
    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "|".join("---" if fmt == "s" else "---:" for _, _, fmt in columns) + "|",
    ]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], f) for c, _, f in columns) + " |")
    return "\n".join(lines)


def provenance_markdown(provenance: dict[str, Any]) -> str:
    """The provenance block as a Markdown list."""
    lines = [
        f"- scbd-cells {provenance['scbd_cells_version']}, {provenance['created']}",
        f"- complexes: `{provenance['complexes']['path']}` "
        f"({provenance['complexes']['bytes']:,} bytes)",
    ]
    for name, entry in provenance["inputs"].items():
        facts = [f"{entry['bytes']:,} bytes", f"{entry['n_cells']:,} cells", f"key {entry['key']}"]
        for label, field in (
            ("kind", "kind"),
            ("step", "checkpoint_step"),
            ("α", "alpha"),
            ("steps", "steps"),
            ("method", "method"),
        ):
            if entry.get(field) not in (None, ""):
                facts.append(f"{label} {entry[field]}")
        lines.append(f"- **{name}**: `{entry['path']}` ({', '.join(map(str, facts))})")
    return "\n".join(lines)


def field_explanation(settings: dict[str, Any], table: pd.DataFrame) -> str:
    """What the field's columns mean (Markdown; the HTML page shows the same text)."""
    n_mixing = ", ".join(f"{int(n):,}" for n in pd.unique(table["n_mixing_cells"]))
    n_replicates = ", ".join(f"{int(n):,}" for n in table["n_replicates"])
    return f"""- **mAP activity / active**: copairs' mean average precision of retrieving a gene's
  guide x well replicate profiles (from other wells) against the control profiles of the
  same well, averaged over genes; **active** = share of genes with permutation q < 0.05
  ({settings["null_size"]:,} permutations, Benjamini-Hochberg). Replicate profiles:
  {n_replicates} (at most {settings["max_replicates"]} per gene).
- **mAP consistency / consistent**: the same for a complex's member genes among the other
  complex genes (gene profiles as for CORUM); **consistent** = share of complexes with
  q < 0.05. Per-gene and per-complex tables: `map_activity.csv`, `map_consistency.csv`.
- **iLISI, silhouette batch, graph conn., kBET**: how well the wells mix among the cells
  (scIB's definitions, 0-1, higher = better mixed) on a seeded subsample of {n_mixing}
  cells.
- **silhouette label**: guides of one gene together (cosine silhouette, rescaled 0-1);
  **Leiden NMI / ARI**: Leiden clusters of guide profiles against their complexes.
- **batch / bio / overall**: each metric min-max scaled across this table's embeddings;
  batch = mean of the four mixing metrics, bio = mean of the two mAPs, silhouette label
  and Leiden NMI/ARI; **overall = 0.4 x batch + 0.6 x bio** (the JUMP benchmark's form).
  Relative to this table only. Protocol: docs/evaluation.md."""


def field_markdown(metrics: dict[str, Any], table: pd.DataFrame) -> str:
    """The field's part of ``report.md``: its table, what the columns mean, provenance."""
    drawn = metrics["settings"]["umap"]  # no link to a picture --no-umap did not draw
    umap = "\n![UMAPs of gene profiles and cells](umap.png)\n" if drawn else ""
    return f"""## The field's metrics (JUMP batch-correction benchmark)

{markdown_table(table, FIELD_COLUMNS)}

{field_explanation(metrics["settings"], table)}

![biology kept vs well left](tradeoff.png)
{umap}
## Provenance

{provenance_markdown(metrics["provenance"])}
"""


def _umap_panels(extras: ReportExtras) -> list[dict[str, Any]]:
    panels = []
    for name, result in extras.benchmarks.items():
        panels.append(
            {
                "name": name,
                "gene_profiles": result.gene_profiles,
                "complex_labels": extras.complexes.complex_of(result.genes),
                "cells": result.umap_cells,
                "batches": result.umap_batches,
            }
        )
    return panels


def write_extras(
    folder: Path, *, metrics: dict[str, Any], table: pd.DataFrame, extras: ReportExtras
) -> None:
    """Write the per-group CSVs, ``tradeoff.png``, ``umap.png`` and ``report.html`` into ``folder``.

    ``report.md``, ``corum_pr.png`` and ``well_f1.png`` must be there already (the page
    embeds the images).
    """
    activity, consistency = group_tables(extras.benchmarks)
    activity.to_csv(folder / "map_activity.csv", index=False)
    consistency.to_csv(folder / "map_consistency.csv", index=False)
    images = _figures(folder, table=table, extras=extras)
    page = report_html(
        title="scbd-cells evaluation", sections=_html_sections(metrics, table), images=images
    )
    (folder / "report.html").write_text(page, encoding="utf-8")


def _figures(folder: Path, *, table: pd.DataFrame, extras: ReportExtras) -> list[tuple[Path, str]]:
    """Draw ``tradeoff.png`` (and ``umap.png``); every figure of the page with its caption."""
    plot_tradeoff(table, folder / "tradeoff.png")
    images = [
        (
            folder / "corum_pr.png",
            "CORUM precision-recall (AUPRC in the legend; dashed: the "
            "share of gene pairs that share a complex, a random predictor's precision)",
        ),
        (folder / "well_f1.png", "Predicting the well from the embedding (lower is better)"),
        (folder / "tradeoff.png", "Biology kept vs well left, one point per embedding"),
    ]
    if extras.umap:
        plot_umaps(_umap_panels(extras), folder / "umap.png", seed=extras.seed)
        images.append((folder / "umap.png", "UMAPs: gene profiles by complex, cells by well"))
    return images


def _html_sections(metrics: dict[str, Any], table: pd.DataFrame) -> list[tuple[str, str]]:
    """``report.html``'s sections in order: warnings, the paper's tasks, NSC/NSCB, the
    field's metrics, held-out batches, provenance."""
    import markdown_it  # rich's dependency: renders the explanation lists

    render = markdown_it.MarkdownIt().render
    settings = metrics["settings"]
    label = settings.get("relationships", "CORUM")
    sections = [
        ("Warning", f"<p><strong>{html.escape(text)}</strong></p>")
        for text in metrics.get("warnings", {}).values()
    ]
    paper = html_table(table, paper_columns(label), best=BEST) + _paper_text(settings)
    sections.append(("The paper's tasks", paper))
    if settings.get("moa"):
        moa = html_table(table, MOA_COLUMNS, best=MOA_BEST)
        sections.append(
            ("Mechanism of action: NSC / NSCB", moa + render(moa_explanation(settings["moa"])))
        )
    field = html_table(table, FIELD_COLUMNS, best=BEST)
    sections.append(
        (
            "The field's metrics (JUMP batch-correction benchmark)",
            field + render(field_explanation(settings, table)),
        )
    )
    if metrics.get("holdout"):
        sections.append(
            (
                "Held-out batches",
                render(holdout_intro(metrics["holdout"]))
                + html_table(table, HOLDOUT_COLUMNS, best=HOLDOUT_BEST)
                + render(HOLDOUT_EXPLANATION),
            )
        )
    sections.append(("Provenance", provenance_html(metrics["provenance"])))
    return sections


def _paper_text(settings: dict[str, Any]) -> str:
    """What the paper's columns mean (the HTML page's note under their table)."""
    label = settings.get("relationships", "CORUM")
    pair = "genes share a complex" if label == "CORUM" else "perturbations share a group"
    return (
        f"<p class='note'>{html.escape(label)} AUPRC: area under the precision-recall curve "
        f"of predicting 'the two {pair}' from the cosine similarity of their profiles "
        "(thresholds at the p-th / (100 − p)-th percentiles, p = 80..99; paper appendix "
        "A.3); recall at p = 95 and p = 90. Well F1: held-out macro F1 of a logistic "
        f"regression predicting the batch (<code>{settings['batch_key']}</code>) from the "
        f"cells (at most {settings['max_cells']} cells, seed {settings['seed']}); chance = "
        "the expected F1 of guessing.</p>"
    )


def holdout_markdown(table: pd.DataFrame, holdout: dict[str, Any]) -> str:
    """The report's section on the held-out batches (empty without them)."""
    if not holdout:
        return ""
    return (
        f"## Held-out batches\n\n{holdout_intro(holdout)}\n\n"
        f"{markdown_table(table, HOLDOUT_COLUMNS)}\n\n{HOLDOUT_EXPLANATION}\n"
    )


def moa_markdown(table: pd.DataFrame, settings: dict[str, Any] | None) -> str:
    """The report's NSC/NSCB section (empty without ``--compound-key``)."""
    if not settings:
        return ""
    return (
        "\n## Mechanism of action: NSC / NSCB\n\n"
        f"{markdown_table(table, MOA_COLUMNS)}\n\n{moa_explanation(settings)}\n"
    )
