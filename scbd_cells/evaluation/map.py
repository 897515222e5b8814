"""Evaluate: mean average precision (mAP) with copairs, scored as the JUMP benchmark does.

Two retrieval questions (Kalinin et al. 2025, Nat Commun 16:5181; Arevalo et al. 2024,
Nat Commun 15:6516), both answered by ``copairs`` itself:

- **phenotypic activity**: can a gene's replicate profiles (guide x well means) be told
  from the controls? Each replicate ranks the gene's other replicates *from other wells*
  against the control replicates *of its own well* (the benchmark's ``pos_diffby`` well,
  ``neg_sameby`` plate: a well's fingerprint helps only the negatives), cosine
  similarity; the AP of its replicates averaged is the gene's mAP, with a permutation
  p-value, Benjamini-Hochberg corrected over genes. A gene is *active* at q < 0.05.
- **phenotypic consistency**: do the genes of one complex retrieve each other among the
  other complex genes? Gene profiles (the paper's, as for CORUM), a complex's members as
  positives and genes sharing no complex as negatives (copairs' multilabel AP, a gene may
  sit in several complexes); per-complex mAP, p-value and q-value the same way.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError
from scbd_cells.data import schema
from scbd_cells.evaluation.complexes import Complexes
from scbd_cells.profiles.replicates import cap_groups, cell_groups, group_means

if TYPE_CHECKING:
    import anndata

    from scbd_cells.profiles.cells import Cells

log = logging.getLogger(__name__)

DEFAULT_NULL_SIZE = 10_000
DEFAULT_MAX_REPLICATES = 16
THRESHOLD = 0.05
REFERENCE = "Metadata_Reference_Index"


@dataclass(frozen=True)
class ReplicateProfiles:
    """Guide x well profiles: the mean embedding of a guide's cells in one well.

    Attributes
    ----------
    meta
        One row per profile: ``Metadata_Perturbation``, ``Metadata_Guide``,
        ``Metadata_Batch`` (plain strings) and ``Metadata_n_cells``.
    values
        (n_profiles, D) float32: control-centred, each feature scaled to unit spread over
        all profiles (one transform for the whole screen, never per well, so a well's
        fingerprint stays for the metric to see).
    """

    meta: pd.DataFrame
    values: np.ndarray


@dataclass(frozen=True)
class MapResult:
    """mAP of each group (gene or complex) and the summary over groups.

    Attributes
    ----------
    table
        One row per group: the group column, ``mean_average_precision``, ``p_value``,
        ``corrected_p_value`` (Benjamini-Hochberg) and ``retrieved`` (q < 0.05).
    mean_map
        Mean of the groups' mAP.
    fraction_retrieved
        Share of groups with q < 0.05.
    """

    table: pd.DataFrame
    mean_map: float
    fraction_retrieved: float


def replicate_profiles(
    adata: anndata.AnnData | Cells,
    *,
    use_rep: str = "X",
    perturbation_key: str = schema.PERTURBATION,
    guide_key: str = schema.GUIDE,
    batch_key: str = schema.BATCH,
    control: str = schema.CONTROL_LABEL,
    max_replicates: int | None = DEFAULT_MAX_REPLICATES,
    seed: int,
) -> ReplicateProfiles:
    """The guide x well profiles of a cell embedding, at most ``max_replicates`` per gene.

    Parameters
    ----------
    adata
        Cell-level AnnData (in memory or backed) or :class:`~scbd_cells.profiles.cells.Cells`.
    use_rep
        ``"X"`` or an obsm key.
    perturbation_key, guide_key, batch_key
        obs columns (without a guide column each gene counts as one guide).
    control
        The non-targeting control label.
    max_replicates
        At most this many guide x well profiles per targeting gene, and this many control
        profiles per well (seeded draw without replacement; None keeps all). Bounds the
        pairs copairs ranks: a 26 M-cell screen has millions of guide x well groups.
    seed
        Seeds the draw.
    """
    keys = [perturbation_key, batch_key]
    if guide_key is not None and guide_key in adata.obs.columns:
        keys.insert(1, guide_key)
    groups = cell_groups(
        adata, keys, what={perturbation_key: "perturbation", batch_key: "batch", guide_key: "guide"}
    )
    kept = _capped_replicates(
        groups.labels, perturbation_key=perturbation_key, batch_key=batch_key, control=control,
        max_replicates=max_replicates, seed=seed,
    )  # fmt: skip
    groups = groups.keep(kept)
    values = group_means(adata, groups, use_rep=use_rep).astype(np.float64)
    labels = groups.labels
    control_rows = (labels[perturbation_key] == control).to_numpy()
    values -= values[control_rows].mean(axis=0)
    spread = values.std(axis=0)
    values /= np.where(spread > 0, spread, 1.0)
    guide = labels[guide_key] if guide_key in labels else labels[perturbation_key]
    meta = pd.DataFrame(
        {
            schema.METADATA_PERTURBATION: labels[perturbation_key].astype(str).to_numpy(),
            schema.METADATA_GUIDE: guide.astype(str).to_numpy(),
            schema.METADATA_BATCH: labels[batch_key].astype(str).to_numpy(),
            schema.METADATA_N_CELLS: labels["n_cells"].to_numpy(),
        }
    )
    return ReplicateProfiles(meta=meta, values=values.astype(np.float32))


def _capped_replicates(
    labels: pd.DataFrame,
    *,
    perturbation_key: str,
    batch_key: str,
    control: str,
    max_replicates: int | None,
    seed: int,
) -> np.ndarray:
    """Positions of the replicates kept: at most ``max_replicates`` per targeting gene, and
    per well of the controls (seeded)."""
    is_control = (labels[perturbation_key] == control).to_numpy()
    if not is_control.any():
        raise DataError(
            f"The control label {control!r} is not among the embedding's perturbations; "
            "pass the label of the non-targeting control with --control."
        )
    targeting = np.flatnonzero(~is_control)
    controls = np.flatnonzero(is_control)
    by_gene = cap_groups(
        labels.iloc[targeting], by=perturbation_key, max_groups=max_replicates, seed=seed
    )
    by_well = cap_groups(labels.iloc[controls], by=batch_key, max_groups=max_replicates, seed=seed)
    return np.concatenate([targeting[by_gene], controls[by_well]])


def _summary(table: pd.DataFrame, group: str) -> MapResult:
    table = table.rename(columns={"below_corrected_p": "retrieved"})
    table = table[[group, "mean_average_precision", "p_value", "corrected_p_value", "retrieved"]]
    table = table.sort_values(group, kind="stable").reset_index(drop=True)
    scores = table["mean_average_precision"].to_numpy(dtype=np.float64)
    return MapResult(
        table=table,
        mean_map=float(np.nanmean(scores)) if len(scores) else float("nan"),
        fraction_retrieved=float(table["retrieved"].mean()) if len(table) else float("nan"),
    )


@contextmanager
def _quiet_copairs(what: str) -> Iterator[None]:
    """copairs' notices silenced; its "no pairs" error turned into a :class:`DataError`."""
    from copairs.matching import UnpairedException

    with warnings.catch_warnings():
        # copairs' groupby and pandas' future-behaviour notices are not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            yield
        except UnpairedException as error:
            raise DataError(f"{what} is undefined for this data (copairs: {error})") from None


def phenotypic_activity(
    replicates: ReplicateProfiles,
    *,
    control: str,
    null_size: int = DEFAULT_NULL_SIZE,
    seed: int,
) -> MapResult:
    """Per-gene mAP of retrieving a gene's replicates against the controls (copairs).

    Positive pairs: two replicates of the gene from different wells. Negative pairs: a
    replicate and a control replicate of the same well. Control profiles are only
    references (copairs' reference index), never queries.
    """
    from copairs import map as copairs_map
    from copairs.matching import assign_reference_index

    meta = replicates.meta.copy()
    meta = assign_reference_index(
        meta,
        meta.index[meta[schema.METADATA_PERTURBATION] == control],
        reference_col=REFERENCE,
        default_value=-1,
    )
    with _quiet_copairs("Phenotypic activity (a gene's replicates in two wells)"):
        ap = copairs_map.average_precision(
            meta,
            replicates.values,
            pos_sameby=[schema.METADATA_PERTURBATION, REFERENCE],
            pos_diffby=[schema.METADATA_BATCH],
            neg_sameby=[schema.METADATA_BATCH],
            neg_diffby=[schema.METADATA_PERTURBATION, REFERENCE],
            progress_bar=False,
        )
        ap = ap[ap[schema.METADATA_PERTURBATION] != control]
        if not ap["n_pos_pairs"].gt(0).any():
            raise DataError(
                "No gene has replicate profiles in two wells, so phenotypic activity is "
                "undefined. mAP needs each gene's cells in at least two wells (batch column)."
            )
        table = copairs_map.mean_average_precision(
            ap, [schema.METADATA_PERTURBATION], null_size=null_size, threshold=THRESHOLD,
            seed=seed, progress_bar=False, max_workers=1,
        )
    return _summary(table, schema.METADATA_PERTURBATION)


def phenotypic_consistency(
    gene_profiles: np.ndarray,
    genes: list[str],
    complexes: Complexes,
    *,
    null_size: int = DEFAULT_NULL_SIZE,
    seed: int,
) -> MapResult:
    """Per-complex mAP of retrieving a complex's member genes among the other complex genes.

    ``gene_profiles`` are the paper's gene profiles (as for CORUM); genes outside the
    complex file are left out, and a complex needs two profiled members to be scored.
    """
    from copairs import map as copairs_map

    genes = [str(g) for g in genes]
    membership = complexes.membership(genes)
    keep = membership.any(axis=1)
    names = np.asarray(complexes.names, dtype=object)
    members_of = [sorted(names[row]) for row in membership[keep]]
    meta = pd.DataFrame(
        {
            schema.METADATA_PERTURBATION: np.asarray(genes, dtype=object)[keep].astype(str),
            schema.METADATA_COMPLEX: members_of,
        }
    )
    values = np.asarray(gene_profiles, dtype=np.float32)[keep]
    rules = {
        "pos_sameby": [schema.METADATA_COMPLEX],
        "pos_diffby": [],
        "neg_sameby": [],
        "neg_diffby": [schema.METADATA_COMPLEX],
        "progress_bar": False,
    }
    with _quiet_copairs("Phenotypic consistency (two profiled genes of one complex)"):
        if all(len(names) == 1 for names in members_of):
            # every gene in one complex: copairs' plain AP gives the same pairs as its
            # multilabel AP, in a fraction of the memory (0.1 vs 0.5 GB for 1,100 genes)
            meta[schema.METADATA_COMPLEX] = [names[0] for names in members_of]
            ap = copairs_map.average_precision(meta, values, **rules)
        else:
            ap = copairs_map.multilabel.average_precision(
                meta, values, multilabel_col=schema.METADATA_COMPLEX, **rules
            )
        if ap.empty or not ap["n_pos_pairs"].gt(0).any():
            raise DataError(
                "No complex has two profiled member genes, so phenotypic consistency is "
                "undefined. Check that the complexes file uses the embedding's gene symbols."
            )
        table = copairs_map.mean_average_precision(
            ap, [schema.METADATA_COMPLEX], null_size=null_size, threshold=THRESHOLD,
            seed=seed, progress_bar=False, max_workers=1,
        )
    return _summary(table, schema.METADATA_COMPLEX)
