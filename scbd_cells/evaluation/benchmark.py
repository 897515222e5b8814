"""Evaluate: the field's metrics of one embedding (mAP, batch mixing, biology), beside the paper's.

What the JUMP Cell Painting batch-correction benchmark (Arevalo et al. 2024) and the
perturbation-map benchmarks report, computed by :func:`benchmark_metrics` for one cell
embedding: copairs' mAP (:mod:`~scbd_cells.evaluation.map`), batch mixing on a seeded
cell subsample (:mod:`~scbd_cells.evaluation.mixing`), silhouette and Leiden on guide
profiles (:mod:`~scbd_cells.evaluation.biology`). It also keeps what the report's UMAPs
need (a few thousand cells and the gene profiles), so the cells are read once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError
from scbd_cells.data import schema
from scbd_cells.evaluation.biology import BiologyResult, guide_biology
from scbd_cells.evaluation.complexes import Complexes
from scbd_cells.evaluation.map import (
    MapResult,
    ReplicateProfiles,
    phenotypic_activity,
    phenotypic_consistency,
    replicate_profiles,
)
from scbd_cells.evaluation.mixing import MixingResult, batch_mixing
from scbd_cells.evaluation.well_probe import subsample
from scbd_cells.profiles.cells import read_rows

if TYPE_CHECKING:
    import anndata

    from scbd_cells.profiles.cells import Cells

log = logging.getLogger(__name__)

UMAP_CELLS = 3000
BENCHMARK_KEYS = (
    "map_activity",
    "fraction_active",
    "map_consistency",
    "fraction_consistent",
    "ilisi",
    "silhouette_batch",
    "graph_connectivity",
    "kbet",
    "silhouette_label",
    "leiden_nmi",
    "leiden_ari",
)


@dataclass(frozen=True)
class BenchmarkSettings:
    """Sizes and seeds of the field's metrics (recorded in ``metrics.json``).

    Attributes
    ----------
    null_size
        Permutations of copairs' null distribution for the mAP p-values.
    max_replicates
        Guide x well profiles per gene (and control profiles per well) kept for mAP.
    mixing_cells
        Cells (seeded subsample) for the batch-mixing metrics and the cell UMAPs.
    seed
        Seeds every draw.
    """

    null_size: int
    max_replicates: int | None
    mixing_cells: int | None
    seed: int


@dataclass(frozen=True)
class BenchmarkResult:
    """The field's metrics of one embedding, the per-group tables and the UMAP inputs.

    Attributes
    ----------
    values
        ``{key: float}`` for :data:`BENCHMARK_KEYS` (NaN where undefined).
    activity, consistency
        copairs' per-gene and per-complex mAP tables.
    n_mixing_cells, n_replicates
        The cell subsample's size and the number of guide x well profiles.
    umap_cells, umap_batches
        Up to :data:`UMAP_CELLS` cells of the subsample and their wells.
    gene_profiles, genes
        The gene profiles (as for CORUM) and their symbols.
    """

    values: dict[str, float]
    activity: MapResult
    consistency: MapResult
    n_mixing_cells: int
    n_replicates: int
    umap_cells: np.ndarray
    umap_batches: np.ndarray
    gene_profiles: np.ndarray
    genes: list[str]


def _or_undefined(what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(...)``, or None with a warning when the data cannot define the metric.

    A metric the data cannot support (no gene in two wells, no complex with two profiled
    members, too few cells for a neighbourhood) is reported as undefined (NaN in the
    table, null in metrics.json) rather than failing the paper's numbers beside it.
    """
    try:
        return function(*args, **kwargs)
    except DataError as error:
        log.warning("%s left undefined: %s", what.capitalize(), error)
        return None


def _rows(adata: anndata.AnnData | Cells, key: str, positions: np.ndarray) -> np.ndarray:
    return read_rows(adata.X if key == "X" else adata.obsm[key], positions)


def benchmark_metrics(
    adata: anndata.AnnData | Cells,
    *,
    key: str,
    profiles: Any,
    complexes: Complexes,
    control: str,
    perturbation_key: str,
    guide_key: str,
    batch_key: str,
    settings: BenchmarkSettings,
) -> BenchmarkResult:
    """mAP (activity, consistency), batch mixing and biology metrics of one cell embedding.

    Parameters
    ----------
    adata
        The cells (:class:`~scbd_cells.profiles.cells.Cells` or AnnData, backed or not).
    key
        ``"X"`` or the obsm key of the embedding.
    profiles
        Its :class:`~scbd_cells.profiles.aggregate.Profiles` (guides and genes).
    complexes
        The complexes file.
    control
        The non-targeting control label.
    perturbation_key, guide_key, batch_key
        obs columns.
    settings
        Sizes and seed.
    """
    replicates = replicate_profiles(
        adata,
        use_rep=key,
        perturbation_key=perturbation_key,
        guide_key=guide_key,
        batch_key=batch_key,
        control=control,
        max_replicates=settings.max_replicates,
        seed=settings.seed,
    )
    genes = profiles.genes
    gene_names = [str(g) for g in genes.obs_names]
    activity, consistency = _map_metrics(
        replicates, np.asarray(genes.X), gene_names, complexes, control=control, settings=settings
    )
    biology = guide_biology(profiles.guides, complexes, control=control, seed=settings.seed)
    cells = _mixing_cells(
        adata, key=key, batch_key=batch_key, perturbation_key=perturbation_key, settings=settings
    )
    mixing = _or_undefined("batch mixing", batch_mixing, *cells)
    if mixing is None:
        nan = float("nan")
        mixing = MixingResult(nan, nan, nan, nan, n_cells=len(cells.batches))
    empty = MapResult(table=pd.DataFrame(), mean_map=float("nan"), fraction_retrieved=float("nan"))
    activity = activity or empty
    consistency = consistency or empty
    shown = _umap_cells(len(cells.batches), seed=settings.seed)
    return BenchmarkResult(
        values=_values(activity, consistency, mixing, biology),
        activity=activity,
        consistency=consistency,
        n_mixing_cells=mixing.n_cells,
        n_replicates=len(replicates.meta),
        umap_cells=cells.embedding[shown],
        umap_batches=cells.batches[shown],
        gene_profiles=np.asarray(genes.X, dtype=np.float32),
        genes=gene_names,
    )


def _map_metrics(
    replicates: ReplicateProfiles,
    gene_profiles: np.ndarray,
    gene_names: list[str],
    complexes: Complexes,
    *,
    control: str,
    settings: BenchmarkSettings,
) -> tuple[MapResult | None, MapResult | None]:
    """copairs' phenotypic activity (replicates vs controls) and consistency (complexes)."""
    activity = _or_undefined(
        "phenotypic activity", phenotypic_activity, replicates, control=control,
        null_size=settings.null_size, seed=settings.seed,
    )
    consistency = _or_undefined(
        "phenotypic consistency", phenotypic_consistency, gene_profiles, gene_names,
        complexes, null_size=settings.null_size, seed=settings.seed,
    )
    return activity, consistency


class _MixingCells(NamedTuple):
    """The seeded cell subsample of the batch-mixing metrics (``batch_mixing``'s arguments)."""

    embedding: np.ndarray
    batches: np.ndarray
    perturbations: np.ndarray


def _mixing_cells(
    adata: Cells, *, key: str, batch_key: str, perturbation_key: str, settings: BenchmarkSettings
) -> _MixingCells:
    positions = subsample(adata.n_obs, max_cells=settings.mixing_cells, seed=settings.seed)
    return _MixingCells(
        embedding=_rows(adata, key, positions),
        batches=adata.obs[batch_key].iloc[positions].astype(str).to_numpy(),
        perturbations=adata.obs[perturbation_key].iloc[positions].astype(str).to_numpy(),
    )


def _umap_cells(n_cells: int, *, seed: int) -> np.ndarray:
    """Sorted positions of up to :data:`UMAP_CELLS` of the subsample's cells, seeded."""
    return np.sort(
        np.random.default_rng(seed).choice(n_cells, size=min(UMAP_CELLS, n_cells), replace=False)
    )


def _values(
    activity: MapResult, consistency: MapResult, mixing: MixingResult, biology: BiologyResult
) -> dict[str, float]:
    """The :data:`BENCHMARK_KEYS` of one embedding, as floats."""
    values = {
        "map_activity": activity.mean_map,
        "fraction_active": activity.fraction_retrieved,
        "map_consistency": consistency.mean_map,
        "fraction_consistent": consistency.fraction_retrieved,
        "ilisi": mixing.ilisi,
        "silhouette_batch": mixing.silhouette_batch,
        "graph_connectivity": mixing.graph_connectivity,
        "kbet": mixing.kbet,
        "silhouette_label": biology.silhouette_label,
        "leiden_nmi": biology.leiden_nmi,
        "leiden_ari": biology.leiden_ari,
    }
    return {k: float(v) for k, v in values.items()}


def group_tables(results: dict[str, BenchmarkResult]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-gene activity and per-complex consistency tables of all embeddings (for CSV)."""

    def stacked(which: str, column: str, name: str) -> pd.DataFrame:
        frames = []
        for embedding, result in results.items():
            table = getattr(result, which).table.rename(columns={column: name})
            if table.empty:
                continue
            frames.append(table.assign(embedding=embedding))
        columns = [name, "mean_average_precision", "p_value", "corrected_p_value", "retrieved"]
        if not frames:
            return pd.DataFrame(columns=["embedding", *columns])
        out = pd.concat(frames, ignore_index=True)
        return out[["embedding", *[c for c in out.columns if c != "embedding"]]]

    return (
        stacked("activity", schema.METADATA_PERTURBATION, "perturbation"),
        stacked("consistency", schema.METADATA_COMPLEX, "complex"),
    )
