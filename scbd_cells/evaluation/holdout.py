"""Evaluate: held-out batches (a new plate) reported apart from the rest.

A plate imaged after training is embedded by the trained model as it stands
(docs/new-plates.md). Three questions about it, each answered on the held-out
cells against the others:

- does the biology carry over? CORUM from gene profiles built from the
  held-out cells alone;
- is the new plate's own well effect gone? well F1 among its own wells;
- do its cells mix with the training plates'? a classifier telling held-out
  from other cells (macro F1, chance 0.5 for equal numbers), and iLISI and kBET
  with "held out" / "not held out" as the batch label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError
from scbd_cells.evaluation.complexes import Complexes
from scbd_cells.evaluation.corum import DEFAULT_PERCENTILES, corum_pr
from scbd_cells.evaluation.mixing import batch_mixing
from scbd_cells.evaluation.well_probe import batch_prediction_f1, subsample
from scbd_cells.profiles.cells import read_rows

if TYPE_CHECKING:
    import anndata

    from scbd_cells.profiles.cells import Cells

# (column, header, format) of the report's held-out table
HOLDOUT_COLUMNS = [
    ("embedding", "embedding", "s"),
    ("heldout_corum_auprc", "CORUM AUPRC, held-out cells ↑", ".4f"),
    ("heldout_corum_recall_5_95", "recall @ 5%/95% ↑", ".3f"),
    ("heldout_well_f1", "well F1 among held-out wells ↓", ".3f"),
    ("heldout_well_f1_chance", "chance", ".3f"),
    ("heldout_vs_rest_f1", "held out vs rest F1 ↓", ".3f"),
    ("heldout_vs_rest_chance", "chance", ".3f"),
    ("heldout_ilisi", "iLISI held out/rest ↑", ".3f"),
    ("heldout_kbet", "kBET held out/rest ↑", ".3f"),
    ("n_heldout_cells", "held-out cells", ",d"),
]
HOLDOUT_KEYS = [column for column, _, _ in HOLDOUT_COLUMNS[1:]]


@dataclass(frozen=True)
class Holdout:
    """Which cells are held out: those whose ``column`` holds one of ``values``."""

    column: str
    values: tuple[str, ...]

    def mask(self, obs_column: pd.Series, *, path: Any) -> np.ndarray:
        """Boolean mask of the held-out cells of one file.

        Raises
        ------
        DataError
            No cell, or every cell, is held out (the values name nothing, or everything).
        """
        values = obs_column.astype(str).to_numpy()
        held = np.isin(values, list(self.values))
        if not held.any() or held.all():
            found = pd.unique(values)
            shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
            what = "no cell" if not held.any() else "every cell"
            raise DataError(
                f"--holdout-batches {','.join(self.values)} selects {what} of {path} in column "
                f"{self.column!r} (its values: {shown}). Name the held-out values of that "
                "column (e.g. --holdout-key plate --holdout-batches plate3)."
            )
        return held


def holdout_metrics(
    adata: anndata.AnnData | Cells,
    *,
    key: str,
    held: np.ndarray,
    complexes: Complexes,
    control: str,
    perturbation_key: str,
    guide_key: str,
    batch_key: str,
    max_cells: int | None,
    mixing_cells: int | None,
    seed: int,
) -> dict[str, float]:
    """The held-out cells' metrics (the keys of :data:`HOLDOUT_KEYS`) for one embedding."""
    import anndata as ad

    from scbd_cells.profiles.aggregate import aggregate_profiles

    data = adata.X if key == "X" else adata.obsm[key]
    held_rows = np.flatnonzero(held)
    obs = pd.DataFrame(
        {
            column: adata.obs[column].iloc[held_rows].astype(str).to_numpy()
            for column in (perturbation_key, guide_key, batch_key)
            if column in adata.obs.columns
        },
        index=pd.Index(held_rows.astype(str)),
    )
    held_cells = ad.AnnData(X=read_rows(data, held_rows).astype(np.float32), obs=obs)
    genes = aggregate_profiles(
        held_cells,
        perturbation_key=perturbation_key,
        guide_key=guide_key if guide_key in obs.columns else None,
        control=control,
    ).genes
    corum = corum_pr(genes.X, list(genes.obs_names), complexes, percentiles=DEFAULT_PERCENTILES)

    positions = subsample(len(held_rows), max_cells=max_cells, seed=seed)
    wells = obs[batch_key].to_numpy()[positions]
    if len(np.unique(wells)) >= 2:
        well = batch_prediction_f1(held_cells.X[positions], wells, seed=seed)
        well_f1, well_chance = well.f1, well.chance
    else:  # one held-out well: nothing to tell apart
        well_f1 = well_chance = float("nan")

    positions = np.sort(subsample(adata.n_obs, max_cells=max_cells, seed=seed))
    side = np.where(held[positions], "held out", "rest")
    apart = batch_prediction_f1(read_rows(data, positions), side, seed=seed)

    positions = np.sort(subsample(adata.n_obs, max_cells=mixing_cells, seed=seed))
    labels = adata.obs[perturbation_key].iloc[positions].astype(str).to_numpy()
    mixing = batch_mixing(
        read_rows(data, positions), np.where(held[positions], "held out", "rest"), labels
    )
    return {
        "heldout_corum_auprc": corum.auprc,
        "heldout_corum_recall_5_95": corum.recall_5_95,
        "heldout_well_f1": well_f1,
        "heldout_well_f1_chance": well_chance,
        "heldout_vs_rest_f1": apart.f1,
        "heldout_vs_rest_chance": apart.chance,
        "heldout_ilisi": mixing.ilisi,
        "heldout_kbet": mixing.kbet,
        "n_heldout_cells": int(held.sum()),
    }


HOLDOUT_EXPLANATION = """\
- **CORUM AUPRC, held-out cells**: gene profiles built from the held-out cells alone.
- **well F1 among held-out wells**: as the well F1 above, among the held-out cells' own wells.
- **held out vs rest F1**: a logistic regression telling held-out cells from the others
  (macro F1; lower is better, chance beside it): can the new plate's cells be told apart?
- **iLISI / kBET held out/rest**: the mixing metrics with "held out" and "rest" as the two
  batches (higher is better mixed).
"""


def holdout_intro(holdout: dict[str, Any]) -> str:
    """One sentence naming the held-out cells (Markdown)."""
    values = ", ".join(f"`{value}`" for value in holdout["values"])
    return (
        f"Cells whose `{holdout['column']}` is {values}, apart from the rest (docs/new-plates.md)."
    )
