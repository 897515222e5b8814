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
from typing import Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError
from scbd_cells.data import schema
from scbd_cells.data.store import did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profiles:
    """Guide- and gene-level AnnData made by :func:`aggregate_profiles`."""

    guides: Any  # anndata.AnnData
    genes: Any  # anndata.AnnData


def _rows(adata: Any, use_rep: str, start: int, stop: int) -> np.ndarray:
    data = adata.X if use_rep == "X" else adata.obsm[use_rep]
    block = data[start:stop]
    if hasattr(block, "toarray"):
        block = block.toarray()
    return np.asarray(block, dtype=np.float64)


def group_means(
    adata: Any, codes: np.ndarray, n_groups: int, *, use_rep: str = "X", chunk_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the rows of each group and the group sizes, reading ``chunk_size`` rows at a time.

    Works on in-memory and backed (``read_h5ad(backed="r")``) AnnData alike.
    """
    import scipy.sparse as sp

    n_obs = adata.n_obs
    width = adata.n_vars if use_rep == "X" else adata.obsm[use_rep].shape[1]
    sums = np.zeros((n_groups, width), dtype=np.float64)
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        chunk_codes = codes[start:stop]
        indicator = sp.csr_matrix(
            (np.ones(stop - start), (chunk_codes, np.arange(stop - start))),
            shape=(n_groups, stop - start),
        )
        sums += indicator @ _rows(adata, use_rep, start, stop)
    counts = np.bincount(codes, minlength=n_groups)
    return sums / np.maximum(counts, 1)[:, None], counts


def _feature_names(adata: Any, use_rep: str, width: int) -> list[str]:
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


def check_no_missing(adata: Any, key: str, *, what: str) -> None:
    """Refuse a label column with missing values (NaN), naming the rows that lack one.

    Read as text, a missing label would become a batch (or group) named ``"nan"``,
    silently pooling unrelated cells.
    """
    missing = np.flatnonzero(pd.isna(adata.obs[key]).to_numpy())
    if not len(missing):
        return
    if isinstance(adata.obs, pd.DataFrame):
        names = [str(adata.obs.index[i]) for i in missing[:5]]
    else:  # a lazily read cells file (ObsColumns)
        names = adata.obs.names_at(missing[:5])
    shown = ", ".join(map(repr, names)) + (
        f" and {len(missing) - 5:,} more" if len(missing) > 5 else ""
    )
    raise DataError(
        f"The {what} column {key!r} is missing for {len(missing):,} of {adata.n_obs:,} cells "
        f"(rows {shown}). Fill in their {what} label, or drop those cells first (e.g. "
        f"adata[adata.obs[{key!r}].notna()].copy())."
    )


def _labels(adata: Any, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise DataError(
            f"The embedding has no {what} column {key!r} in obs (columns: "
            f"{', '.join(map(str, adata.obs.columns[:12]))}). "
            f"{did_you_mean(key, list(adata.obs.columns))}Embed with `scbd-cells embed`, "
            f"which copies the store's cell table, or name the column with the {what} option."
        )
    check_no_missing(adata, key, what=what)
    return adata.obs[key]


def factorize_labels(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``pd.factorize(values.astype(str).to_numpy(), sort=True)`` without a string per cell.

    A categorical column (what ``embed`` writes) is factorised through its categories, so
    memory holds its codes and one int64 per cell rather than a Python string per cell
    (about 70 bytes); other columns take the string path. Missing values become ``"nan"``
    as ``astype(str)`` makes them in pandas 2.
    """
    if not isinstance(values.dtype, pd.CategoricalDtype):
        return pd.factorize(values.astype(str).to_numpy(), sort=True)
    codes = values.cat.codes.to_numpy().astype(np.int64)
    labels = values.cat.categories.astype(str).to_numpy(dtype=object)
    if (codes < 0).any():
        labels = np.append(labels, "nan")
        codes[codes < 0] = len(labels) - 1
    used = np.bincount(codes, minlength=len(labels)) > 0
    label_codes, names = pd.factorize(labels[used], sort=True)  # two categories may read alike
    mapping = np.full(len(labels), -1, dtype=np.int64)
    mapping[used] = label_codes
    return mapping[codes], names


def aggregate_profiles(
    adata: Any,
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
        Cell-level AnnData (in memory or backed) with the perturbation (and guide) in obs.
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
        Missing columns, the control label absent, a guide assigned to two genes, or
        fewer than two targeting genes.
    """
    import anndata as ad

    if use_rep != "X" and use_rep not in adata.obsm:
        raise DataError(
            f"The embedding has no obsm key {use_rep!r} (keys: {', '.join(adata.obsm.keys())}). "
            "Pick one of those (or 'X') with --key."
        )
    gene_codes_of_cells, gene_labels = factorize_labels(
        _labels(adata, perturbation_key, "perturbation")
    )
    if guide_key is not None and guide_key in adata.obs.columns:
        guide_codes, guide_names = factorize_labels(_labels(adata, guide_key, "guide"))
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

    guide_means, guide_cells = group_means(
        adata, guide_codes, len(guide_names), use_rep=use_rep, chunk_size=chunk_size
    )
    gene_codes, gene_names = pd.factorize(gene_of_guide, sort=True)
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
    targeting_guides = gene_of_guide != control
    guides_x = standardise(guides_centred, reference=guides_centred[targeting_guides])

    guides = ad.AnnData(
        X=guides_x.astype(np.float32),
        obs=pd.DataFrame(
            {
                schema.PERTURBATION: pd.Categorical(gene_of_guide),
                schema.GUIDE: np.asarray(guide_names, dtype=str),
                schema.N_CELLS: guide_cells.astype(np.int64),
            },
            index=pd.Index(np.asarray(guide_names, dtype=str), name=None),
        ),
    )
    guides.var_names = _feature_names(adata, use_rep, guides.n_vars)
    gene_index = np.asarray(gene_names, dtype=str)[targeting]
    genes = ad.AnnData(
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
    genes.var_names = guides.var_names
    info = {
        "control": control,
        "use_rep": use_rep,
        "method": "paper A.3: guide mean, gene mean of guides, control subtracted, standardised",
    }
    guides.uns["profiles"] = dict(info, level="guide")
    genes.uns["profiles"] = dict(info, level="gene")
    log.info(
        "Aggregated %d cells into %d guides and %d genes", adata.n_obs, guides.n_obs, genes.n_obs
    )
    return Profiles(guides=guides, genes=genes)
