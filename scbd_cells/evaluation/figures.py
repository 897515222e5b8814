"""Evaluate: the report's pictures beyond the PR curve (trade-off, UMAPs).

- ``tradeoff.png``: one point per embedding, how much biology it keeps (CORUM AUPRC; the
  bio score of the overall formula) against how much of the well it still carries (well F1
  as a multiple of chance), the better corner marked.
- ``umap.png``: per embedding, a UMAP of the gene profiles coloured by complex and a UMAP
  of a cell subsample coloured by well (scanpy's neighbours and UMAP, seeded).
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

UMAP_NEIGHBORS = 15


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(table: pd.DataFrame, path: Any) -> None:
    """Biology kept against well left, one point per embedding; the better corner is top left."""
    plt = _pyplot()
    panels = [("corum_auprc", "CORUM AUPRC (higher is better)")]
    if "bio_score" in table and table["bio_score"].notna().any():
        panels.append(("bio_score", "bio score of the overall (scaled, 0-1)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=120)
    axes = np.atleast_1d(axes)
    ratio = table["well_f1"] / table["well_f1_chance"]
    colours = plt.get_cmap("tab10")
    for axis, (column, label) in zip(axes, panels, strict=True):
        for i, row in enumerate(table.itertuples(index=False)):
            y = getattr(row, column)
            axis.scatter(ratio.iloc[i], y, s=60, color=colours(i % 10), zorder=3)
            axis.annotate(
                row.embedding, (ratio.iloc[i], y), xytext=(6, 4), textcoords="offset points",
                fontsize=8,
            )
        axis.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("well F1 / chance (lower is better; 1 = chance)")
        axis.set_ylabel(label)
        low, high = axis.get_xlim()
        axis.set_xlim(min(low, 0.9), high + 0.15 * (high - low))
        bottom, top = axis.get_ylim()
        axis.set_ylim(bottom, top + 0.12 * (top - bottom))
        axis.annotate(
            "better", xy=(0.03, 0.97), xycoords="axes fraction", ha="left", va="top",
            fontsize=9, color="tab:green", weight="bold",
            bbox={"boxstyle": "round", "facecolor": "honeydew", "edgecolor": "tab:green"},
        )
        axis.annotate(
            "", xy=(0.03, 0.88), xytext=(0.2, 0.7), xycoords="axes fraction",
            arrowprops={"arrowstyle": "->", "color": "tab:green"},
        )
    figure.suptitle("Biology kept vs well left in the embedding", fontsize=11)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def umap_coordinates(values: np.ndarray, *, seed: int) -> np.ndarray:
    """2-D UMAP of the rows (scanpy: Euclidean neighbours, then ``tl.umap``), seeded."""
    import anndata as ad
    import scanpy as sc

    from scbd_cells.evaluation.biology import scanpy_neighbors

    adata = ad.AnnData(X=np.asarray(values, dtype=np.float32))
    scanpy_neighbors(
        adata, n_neighbors=max(2, min(UMAP_NEIGHBORS, adata.n_obs - 1)), metric="euclidean",
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)  # umap's n_jobs note with a seed
        sc.tl.umap(adata, random_state=seed)
    return np.asarray(adata.obsm["X_umap"])


def _natural(name: str) -> list:
    """Sort key that puts "complex 2" before "complex 10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _scatter(axis: Any, xy: np.ndarray, labels: np.ndarray, *, legend: bool, title: str) -> None:
    plt = _pyplot()
    names = [n for n in pd.unique(labels) if n]
    palette = plt.get_cmap("tab20")
    unlabelled = labels == ""
    if unlabelled.any():
        axis.scatter(*xy[unlabelled].T, s=6, color="lightgrey", label="no complex")
    for k, name in enumerate(sorted(names, key=_natural)):
        rows = labels == name
        axis.scatter(*xy[rows].T, s=8 if len(labels) > 500 else 16, color=palette(k % 20),
                     label=name)
    axis.set_title(title, fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    if legend and len(names) <= 20:
        axis.legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5),
                    markerscale=1.5)


def plot_umaps(panels: list[dict[str, Any]], path: Any, *, seed: int) -> None:
    """UMAPs, one row per embedding: gene profiles by complex, cells by well.

    Each panel: ``name``, ``gene_profiles``, ``complex_labels`` (``""`` = none),
    ``cells``, ``batches``.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(
        len(panels), 2, figsize=(10, 3.6 * len(panels)), dpi=110, squeeze=False
    )
    for row, panel in enumerate(panels):
        genes_xy = umap_coordinates(panel["gene_profiles"], seed=seed)
        cells_xy = umap_coordinates(panel["cells"], seed=seed)
        n_wells = len(np.unique(panel["batches"]))
        _scatter(
            axes[row, 0], genes_xy, np.asarray(panel["complex_labels"], dtype=object),
            legend=True, title=f"{panel['name']}: {len(genes_xy)} gene profiles, by complex",
        )
        _scatter(
            axes[row, 1], cells_xy, np.asarray(panel["batches"], dtype=object),
            legend=n_wells <= 20,
            title=f"{panel['name']}: {len(cells_xy):,} cells, by well ({n_wells} wells)",
        )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
