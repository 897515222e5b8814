"""Profiles: cells -> guides -> genes aggregation (paper A.3), shared by embed and evaluate.

Mean over the cells of each guide, then mean of the guides of each gene (so a
gene with one well-represented guide does not outweigh its others); the
control's profile (mean of its guide profiles) is subtracted and every feature
is standardised to mean 0 and variance 1 over the targeting genes (guides:
with the mean and spread of the targeting guides, so control guides sit in the
same frame). The control is left out of the gene table (it would be the zero
vector before standardisation); its guides stay in the guide table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError
from scbd_cells.data import schema
from scbd_cells.profiles.replicates import (
    check_no_missing,
    factorize_labels,
    group_sums,
    obs_column,
    representation,
)

if TYPE_CHECKING:
    import anndata

    from scbd_cells.profiles.cells import Cells

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profiles:
    """Guide- and gene-level AnnData made by :func:`aggregate_profiles`."""

    guides: anndata.AnnData
    genes: anndata.AnnData


def _feature_names(adata: anndata.AnnData | Cells, use_rep: str, width: int) -> list[str]:
    """The profiles' var names: the cells' own for ``X`` (``z0...`` from embed), else numbered."""
    names = list(getattr(adata, "var_names", [])) if use_rep == "X" else []
    if len(names) == width:
        return [str(name) for name in names]
    prefix = "z" if use_rep == "X" else f"{use_rep}_"
    return [f"{prefix}{i}" for i in range(width)]


def standardise(values: np.ndarray, *, reference: np.ndarray | None = None) -> np.ndarray:
    """Mean 0, variance 1 per column (statistics of ``reference``, default ``values``)."""
    reference = values if reference is None else reference
    mean = reference.mean(axis=0)
    std = reference.std(axis=0)
    return (values - mean) / np.where(std > 0, std, 1.0)


def _complete_labels(adata: anndata.AnnData | Cells, key: str, what: str) -> pd.Series:
    labels = obs_column(adata, key, what)
    check_no_missing(adata, key, what=what)
    return labels


@dataclass(frozen=True)
class _Guides:
    """Each cell's guide, and each guide's gene (one gene per guide, checked)."""

    codes: np.ndarray  # (n_cells,) the guide of each cell
    names: np.ndarray  # (n_guides,)
    gene_of_guide: np.ndarray  # (n_guides,) object


def _guides_of_cells(
    adata: anndata.AnnData | Cells, *, perturbation_key: str, guide_key: str | None, control: str
) -> _Guides:
    """Factorise the perturbation and guide columns; refuse a guide of two genes, no control."""
    gene_codes_of_cells, gene_labels = factorize_labels(
        _complete_labels(adata, perturbation_key, "perturbation")
    )
    if guide_key is not None and guide_key in adata.obs.columns:
        guide_codes, guide_names = factorize_labels(_complete_labels(adata, guide_key, "guide"))
    else:
        guide_codes, guide_names = gene_codes_of_cells, gene_labels
    # distinct (guide, gene) pairs, sorted by guide: one gene per guide is required
    pairs = np.unique(guide_codes * len(gene_labels) + gene_codes_of_cells)
    pair_guide, pair_gene = np.divmod(pairs, len(gene_labels))
    genes_per_guide = np.bincount(pair_guide, minlength=len(guide_names))
    if (genes_per_guide > 1).any():
        bad = guide_names[int(np.flatnonzero(genes_per_guide > 1)[0])]
        raise DataError(
            f"Guide {bad!r} is assigned to more than one perturbation; guides must be unique to "
            "one gene. Check the guide and perturbation columns. In an arrayed screen (one "
            "perturbation per well, no guide) the well is the replicate: evaluate "
            "--replicate-key plate,well."
        )
    gene_of_guide = np.asarray(gene_labels, dtype=object)[pair_gene]
    if control not in set(gene_of_guide):
        raise DataError(
            f"The control label {control!r} is not among the embedding's perturbations "
            f"(e.g. {', '.join(sorted(set(gene_of_guide))[:5])}). Pass the label of the "
            "non-targeting control (--control), as given at ingest."
        )
    return _Guides(codes=guide_codes, names=guide_names, gene_of_guide=gene_of_guide)


def _profile_tables(
    guide_means: np.ndarray,
    guide_cells: np.ndarray,
    guides: _Guides,
    *,
    control: str,
    feature_names: list[str],
) -> tuple[anndata.AnnData, anndata.AnnData]:
    """Gene means of guide means, control subtracted, standardised: the two AnnData."""
    import anndata as ad

    # the mean of a gene's guides, by hand: pandas' groupby mean sums with Kahan
    # compensation (last bits differ, ~1e-15: the published tables would move);
    # scanpy.get.aggregate gives these very bits but wants an AnnData around the guides
    gene_codes, gene_names = pd.factorize(guides.gene_of_guide, sort=True)
    gene_means = np.zeros((len(gene_names), guide_means.shape[1]))
    np.add.at(gene_means, gene_codes, guide_means)
    n_guides = np.bincount(gene_codes, minlength=len(gene_names))
    gene_means /= n_guides[:, None]
    gene_cells = np.bincount(gene_codes, weights=guide_cells, minlength=len(gene_names))

    is_control_gene = np.asarray(gene_names) == control
    control_profile = gene_means[is_control_gene][0]
    targeting = ~is_control_gene
    if targeting.sum() < 2:
        raise DataError(
            f"Only {int(targeting.sum())} targeting gene(s) besides the control {control!r}; "
            "profiles need at least two."
        )
    genes_x = standardise(gene_means[targeting] - control_profile)
    guides_centred = guide_means - control_profile
    targeting_guides = guides.gene_of_guide != control
    guides_x = standardise(guides_centred, reference=guides_centred[targeting_guides])

    guide_index = np.asarray(guides.names, dtype=str)
    guide_table = ad.AnnData(
        X=guides_x.astype(np.float32),
        obs=pd.DataFrame(
            {
                schema.PERTURBATION: pd.Categorical(guides.gene_of_guide),
                schema.GUIDE: guide_index,
                schema.N_CELLS: guide_cells.astype(np.int64),
            },
            index=pd.Index(guide_index, name=None),
        ),
    )
    guide_table.var_names = feature_names
    gene_index = np.asarray(gene_names, dtype=str)[targeting]
    gene_table = ad.AnnData(
        X=genes_x.astype(np.float32),
        obs=pd.DataFrame(
            {
                schema.PERTURBATION: gene_index,
                schema.N_GUIDES: n_guides[targeting].astype(np.int64),
                schema.N_CELLS: gene_cells[targeting].astype(np.int64),
            },
            index=pd.Index(gene_index, name=None),
        ),
    )
    gene_table.var_names = guide_table.var_names
    return guide_table, gene_table


def aggregate_profiles(
    adata: anndata.AnnData | Cells,
    *,
    use_rep: str = "X",
    perturbation_key: str = schema.PERTURBATION,
    guide_key: str | None = schema.GUIDE,
    control: str = schema.CONTROL_LABEL,
    chunk_size: int = 65536,
) -> Profiles:
    """Guide and gene profiles of a cell embedding (paper appendix A.3).

    Parameters
    ----------
    adata
        Cell-level AnnData (in memory or backed), or
        :class:`~scbd_cells.profiles.cells.Cells`, with the perturbation (and guide) in obs.
    use_rep
        ``"X"`` or an ``obsm`` key holding the embedding to aggregate.
    perturbation_key, guide_key
        obs columns; without a guide column (None or absent) each gene counts as one guide.
    control
        Label of the non-targeting control; its profile is subtracted.
    chunk_size
        Cells read at a time (memory stays bounded for backed files).

    Returns
    -------
    Profiles
        ``guides``: one row per guide, obs ``perturbation, guide, n_cells``; ``genes``:
        one row per targeting gene, obs ``perturbation, n_guides, n_cells``. ``X`` float32,
        control-subtracted and standardised.

    Raises
    ------
    DataError
        Missing columns or key, the control label absent, a guide assigned to two genes,
        or fewer than two targeting genes.
    """
    data = representation(adata, use_rep)
    guides = _guides_of_cells(
        adata, perturbation_key=perturbation_key, guide_key=guide_key, control=control
    )
    sums, guide_cells = group_sums(data, guides.codes, len(guides.names), chunk_size=chunk_size)
    guide_means = sums / np.maximum(guide_cells, 1)[:, None]
    guide_table, gene_table = _profile_tables(
        guide_means,
        guide_cells,
        guides,
        control=control,
        feature_names=_feature_names(adata, use_rep, guide_means.shape[1]),
    )
    info = {
        "control": control,
        "use_rep": use_rep,
        "method": "paper A.3: guide mean, gene mean of guides, control subtracted, standardised",
    }
    guide_table.uns["profiles"] = dict(info, level="guide")
    gene_table.uns["profiles"] = dict(info, level="gene")
    log.info(
        "Aggregated %d cells into %d guides and %d genes",
        adata.n_obs, guide_table.n_obs, gene_table.n_obs,
    )  # fmt: skip
    return Profiles(guides=guide_table, genes=gene_table)
