"""Evaluate: mechanism-of-action retrieval in an arrayed screen, NSC and NSCB (1-NN accuracy).

The compound screens' standard check (Ljosa et al. 2013, J Biomol Screen 18:1321; Ando et
al. 2017, bioRxiv 161422): build one profile per treatment (a compound at one
concentration), give each its nearest neighbour by cosine distance among the profiles of
*other* compounds, and count how often that neighbour shares a mechanism of action (MoA)
with it:

- **NSC** (not-same-compound): every profile of the same compound (all its concentrations)
  is left out of the candidates, so a compound cannot retrieve itself.
- **NSCB** (not-same-compound-or-batch): the profiles of the query's batch are left out too,
  so a batch fingerprint shared by unrelated compounds cannot help; NSC − NSCB is the part
  of the accuracy that the batch effect lends.

The profiles (:func:`treatment_profiles`): the mean of each replicate's cells (the well's),
optionally standardised to the negative-control cells of its plate (Ando et al. 2017; the
user's choice, recorded), then the median of the treatment's replicate profiles within each
batch (a treatment imaged in one batch, as in BBBC021, has one profile, as in Ljosa et al.;
one imaged in several has one per batch, so that "another batch" is defined). Controls
and compounds without a relationship group are left out, as Ljosa et al. leave out
compounds without a known MoA. Nothing here is random: no seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError
from scbd_cells.evaluation.complexes import Complexes
from scbd_cells.profiles.replicates import CellGroups, cell_groups, group_means

if TYPE_CHECKING:
    import anndata

    from scbd_cells.profiles.cells import Cells

log = logging.getLogger(__name__)

ROW_CHUNK = 65536
#: What ``evaluate --compound-key`` adds to each embedding's entry in ``metrics.json``.
MOA_KEYS = ("nsc", "nscb", "n_moa_profiles", "n_moa_queries_nscb")
#: The report's NSC/NSCB table: ``(column, header, format)``.
MOA_COLUMNS = [
    ("embedding", "embedding", "s"),
    ("nsc", "NSC ↑", ".3f"),
    ("nscb", "NSCB ↑", ".3f"),
    ("n_moa_profiles", "treatment profiles", "d"),
    ("n_moa_queries_nscb", "with a neighbour in another batch", "d"),
]
MOA_BEST = {"nsc": "max", "nscb": "max"}
#: Separates compound and concentration in a treatment's label (``CPD0001@0.1``).
TREATMENT_SEPARATOR = "@"


@dataclass(frozen=True)
class MoaSettings:
    """Which obs columns define the treatments, batches and replicates (recorded in metrics.json).

    Attributes
    ----------
    compound_key
        The compound: every profile of the query's compound is left out (NSC).
    concentration_key
        With a concentration column, a treatment is compound x concentration; without, the
        compound.
    batch_key
        The batch: NSCB also leaves out the query's batch; profiles are per treatment and batch.
    replicate_key
        The replicate unit (the well), or None to group by the keys above alone.
    standardize_key
        Standardise replicate profiles to the negative-control cells of the same value of
        this column (the plate), or None to keep the embedding as it is.
    perturbation_key, control
        The column and label that mark the negative-control cells (left out of the profiles).
    """

    compound_key: str
    batch_key: str
    perturbation_key: str
    control: str
    concentration_key: str | None = None
    replicate_key: str | None = None
    standardize_key: str | None = None


@dataclass(frozen=True)
class TreatmentProfiles:
    """One profile per treatment and batch.

    Attributes
    ----------
    meta
        One row per profile: ``treatment``, ``compound``, ``batch``, ``n_replicates``,
        ``n_cells`` (plain strings and ints).
    values
        (n_profiles, D) float64: the median of the treatment's replicate profiles in the batch.
    """

    meta: pd.DataFrame
    values: np.ndarray


@dataclass(frozen=True)
class NearestMoaResult:
    """NSC and NSCB accuracies and each query's neighbours.

    Attributes
    ----------
    nsc, nscb
        Share of queries whose nearest eligible neighbour shares a group with them (NaN when
        no query has an eligible neighbour).
    n_queries_nsc, n_queries_nscb
        Queries with at least one eligible neighbour (the denominators).
    table
        One row per profile: ``nsc_neighbour`` / ``nscb_neighbour`` (row position, -1 when
        none), ``nsc_hit`` / ``nscb_hit``.
    """

    nsc: float
    nscb: float
    n_queries_nsc: int
    n_queries_nscb: int
    table: pd.DataFrame


def cosine_distances(values: np.ndarray) -> np.ndarray:
    """(n, n) ``1 - cos`` between the rows; a zero row is at distance 1 from every row."""
    values = np.asarray(values, dtype=np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    unit = values / np.where(norms > 0, norms, 1.0)
    return 1.0 - unit @ unit.T


def nearest_moa_accuracy(
    values: np.ndarray,
    *,
    compounds: np.ndarray | list[str],
    batches: np.ndarray | list[str],
    groups: list[frozenset[str]],
) -> NearestMoaResult:
    """NSC and NSCB: 1-NN accuracy of the relationship group, by cosine distance.

    Parameters
    ----------
    values
        (n, D) profiles, one per treatment (and batch).
    compounds
        (n,) compound of each profile: a query's own compound never counts as a neighbour.
    batches
        (n,) batch of each profile: for NSCB, the query's batch does not count either.
    groups
        (n,) the relationship groups (MoA) of each profile's compound, none empty; a
        neighbour is a hit when it shares at least one group with the query.

    Returns
    -------
    NearestMoaResult
    """
    compounds = np.asarray(compounds, dtype=object)
    batches = np.asarray(batches, dtype=object)
    n = len(compounds)
    if len(values) != n or len(batches) != n or len(groups) != n:
        raise ValueError("values, compounds, batches and groups must have one row per profile")
    if any(not g for g in groups):
        raise ValueError("every profile needs at least one group; leave out the others")
    distances = cosine_distances(values)
    same_compound = compounds[:, None] == compounds[None, :]
    same_batch = batches[:, None] == batches[None, :]

    def neighbours(excluded: np.ndarray) -> np.ndarray:
        masked = np.where(excluded, np.inf, distances)
        nearest = np.argmin(masked, axis=1) if n else np.zeros(0, dtype=np.int64)
        return np.where(np.isfinite(masked[np.arange(n), nearest]), nearest, -1)

    def hits(nearest: np.ndarray) -> np.ndarray:
        return np.array(
            [j >= 0 and bool(groups[i] & groups[j]) for i, j in enumerate(nearest)], dtype=bool
        )

    def accuracy(nearest: np.ndarray, hit: np.ndarray) -> float:
        asked = nearest >= 0
        return float(hit[asked].mean()) if asked.any() else float("nan")

    nsc_nearest = neighbours(same_compound)
    nscb_nearest = neighbours(same_compound | same_batch)
    nsc_hit, nscb_hit = hits(nsc_nearest), hits(nscb_nearest)
    table = pd.DataFrame(
        {
            "nsc_neighbour": nsc_nearest,
            "nsc_hit": nsc_hit,
            "nscb_neighbour": nscb_nearest,
            "nscb_hit": nscb_hit,
        }
    )
    return NearestMoaResult(
        nsc=accuracy(nsc_nearest, nsc_hit),
        nscb=accuracy(nscb_nearest, nscb_hit),
        n_queries_nsc=int((nsc_nearest >= 0).sum()),
        n_queries_nscb=int((nscb_nearest >= 0).sum()),
        table=table,
    )


def _embedding(adata: anndata.AnnData | Cells, use_rep: str) -> Any:
    return adata.X if use_rep == "X" else adata.obsm[use_rep]


def _control_moments(
    adata: anndata.AnnData | Cells, *, use_rep: str, plate_codes: np.ndarray, n_plates: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per plate, the mean and standard deviation of its control cells (``plate_codes`` -1: not
    a control cell), read ``ROW_CHUNK`` rows at a time."""
    import scipy.sparse as sp

    data = _embedding(adata, use_rep)
    width = int(data.shape[1])
    sums = np.zeros((n_plates, width))
    squares = np.zeros((n_plates, width))
    for start in range(0, int(data.shape[0]), ROW_CHUNK):
        stop = min(start + ROW_CHUNK, int(data.shape[0]))
        codes = plate_codes[start:stop]
        used = np.flatnonzero(codes >= 0)
        if used.size == 0:
            continue
        block = data[start:stop]
        block = np.asarray(block.toarray() if hasattr(block, "toarray") else block, np.float64)
        indicator = sp.csr_matrix(
            (np.ones(used.size), (codes[used], used)), shape=(n_plates, stop - start)
        )
        sums += indicator @ block
        squares += indicator @ np.square(block)
    counts = np.bincount(plate_codes[plate_codes >= 0], minlength=n_plates)[:, None]
    mean = sums / np.maximum(counts, 1)
    std = np.sqrt(np.maximum(squares / np.maximum(counts, 1) - np.square(mean), 0.0))
    return mean, std


def _standardise(
    adata: anndata.AnnData | Cells,
    groups: CellGroups,
    means: np.ndarray,
    is_control: np.ndarray,
    *,
    plate_key: str,
    settings: MoaSettings,
    use_rep: str,
) -> np.ndarray:
    """Replicate profiles minus their plate's control-cell mean, over its control-cell SD."""
    plates, plate_of_group = np.unique(groups.labels[plate_key].to_numpy(), return_inverse=True)
    control_plates = set(plate_of_group[is_control].tolist())
    missing = [str(p) for i, p in enumerate(plates) if i not in control_plates]
    if missing:
        raise DataError(
            f"No negative-control cells ({settings.perturbation_key} = {settings.control!r}) on "
            f"{len(missing)} value(s) of {plate_key!r}, e.g. {missing[:3]}: profiles cannot be "
            "standardised to their plate's controls there. Put controls on every plate, name "
            "the control with --control, or leave out --standardize-key."
        )
    group_plate = np.where(is_control, plate_of_group, -1)
    cell_plate = np.where(groups.codes >= 0, group_plate[np.maximum(groups.codes, 0)], -1)
    mean, std = _control_moments(
        adata, use_rep=use_rep, plate_codes=cell_plate, n_plates=len(plates)
    )
    std = np.where(std > 0, std, 1.0)
    return (means - mean[plate_of_group]) / std[plate_of_group]


def treatment_profiles(
    adata: anndata.AnnData | Cells, *, settings: MoaSettings, use_rep: str = "X"
) -> TreatmentProfiles:
    """One profile per treatment and batch: the median of its replicate profiles.

    Parameters
    ----------
    adata
        Cell-level AnnData (in memory or backed) or :class:`~scbd_cells.profiles.cells.Cells`.
    settings
        The columns (:class:`MoaSettings`).
    use_rep
        ``"X"`` or an obsm key.

    Returns
    -------
    TreatmentProfiles
        Controls left out.
    """
    keys, what = _replicate_columns(settings)
    groups = cell_groups(adata, keys, what=what)
    means = group_means(adata, groups, use_rep=use_rep).astype(np.float64)
    labels = groups.labels
    is_control = (labels[settings.perturbation_key] == settings.control).to_numpy()
    if settings.standardize_key:
        means = _standardise(
            adata,
            groups,
            means,
            is_control,
            plate_key=settings.standardize_key,
            settings=settings,
            use_rep=use_rep,
        )
    treated = labels[~is_control].reset_index(drop=True)
    means = means[~is_control]
    if treated.empty:
        raise DataError(
            f"Every cell is a control ({settings.perturbation_key} = {settings.control!r}): no "
            "treatment to profile. Check --control."
        )
    profiles = _treatment_medians(treated, means, settings=settings)
    log.info(
        "Treatment profiles: %d (treatment x batch) from %d replicates",
        len(profiles.meta),
        len(treated),
    )
    return profiles


def _replicate_columns(settings: MoaSettings) -> tuple[list[str], dict[str, str]]:
    """The obs columns whose combinations are the replicates, and the option of each (for
    error messages)."""
    keys = [
        settings.compound_key,
        *([settings.concentration_key] if settings.concentration_key else []),
        settings.batch_key,
        *([settings.standardize_key] if settings.standardize_key else []),
        *([settings.replicate_key] if settings.replicate_key else []),
        settings.perturbation_key,
    ]
    keys = list(dict.fromkeys(keys))  # a column named twice (compound = perturbation) once
    what = {
        settings.compound_key: "compound",
        settings.batch_key: "batch",
        settings.perturbation_key: "perturbation",
    }
    if settings.concentration_key:
        what[settings.concentration_key] = "concentration"
    return keys, what


def _treatment_medians(
    treated: pd.DataFrame, means: np.ndarray, *, settings: MoaSettings
) -> TreatmentProfiles:
    """The median of each treatment's replicate profiles per batch (pandas' group median)."""
    treatment = treated[settings.compound_key].astype(str)
    if settings.concentration_key:
        treatment = treatment + TREATMENT_SEPARATOR + treated[settings.concentration_key]
    by = [
        treatment.rename("treatment"),
        treated[settings.compound_key].rename("compound"),
        treated[settings.batch_key].rename("batch"),
    ]
    values = pd.DataFrame(means).groupby(by, sort=True).median().to_numpy(dtype=np.float64)
    replicates = treated["n_cells"].groupby(by, sort=True)
    meta = replicates.size().astype(np.int64).reset_index(name="n_replicates")
    meta["n_cells"] = replicates.sum().to_numpy().astype(np.int64)
    return TreatmentProfiles(meta=meta, values=values)


def compound_groups(compounds: list[str], relationships: Complexes) -> list[frozenset[str]]:
    """The relationship groups (e.g. MoA) each compound belongs to (empty when none)."""
    of: dict[str, set[str]] = {}
    for name, members in zip(relationships.names, relationships.members, strict=True):
        for member in members:
            of.setdefault(member, set()).add(name)
    return [frozenset(of.get(compound, ())) for compound in compounds]


def moa_retrieval(
    adata: anndata.AnnData | Cells,
    *,
    relationships: Complexes,
    settings: MoaSettings,
    use_rep: str = "X",
) -> tuple[NearestMoaResult, TreatmentProfiles]:
    """NSC and NSCB of one cell embedding: :func:`treatment_profiles`, :func:`nearest_moa_accuracy`.

    Treatments whose compound is in no group of ``relationships`` are left out.

    Raises
    ------
    DataError
        No compound of the embedding is in the relationship file.
    """
    profiles = treatment_profiles(adata, settings=settings, use_rep=use_rep)
    groups = compound_groups(profiles.meta["compound"].tolist(), relationships)
    annotated = np.array([bool(g) for g in groups])
    if not annotated.any():
        examples = ", ".join(sorted(set(profiles.meta["compound"]))[:5])
        raise DataError(
            f"No compound of column {settings.compound_key!r} (e.g. {examples}) is a member of "
            f"any group in {relationships.path}: NSC/NSCB need compounds with a known "
            "relationship (mechanism of action). Check --compound-key and the relationship file."
        )
    if not annotated.all():
        log.info(
            "NSC/NSCB: %d of %d treatment profiles have no relationship group and are left out",
            int((~annotated).sum()),
            len(annotated),
        )
    kept = np.flatnonzero(annotated)
    profiles = TreatmentProfiles(
        meta=profiles.meta.iloc[kept].reset_index(drop=True), values=profiles.values[kept]
    )
    result = nearest_moa_accuracy(
        profiles.values,
        compounds=profiles.meta["compound"].to_numpy(),
        batches=profiles.meta["batch"].to_numpy(),
        groups=[groups[i] for i in kept],
    )
    return result, profiles


def moa_metrics(
    adata: anndata.AnnData | Cells,
    *,
    relationships: Complexes,
    settings: MoaSettings,
    use_rep: str = "X",
) -> dict[str, float | int]:
    """:data:`MOA_KEYS` of one cell embedding, for its row of the report (:func:`moa_retrieval`)."""
    result, profiles = moa_retrieval(
        adata, relationships=relationships, settings=settings, use_rep=use_rep
    )
    return {
        "nsc": result.nsc,
        "nscb": result.nscb,
        "n_moa_profiles": len(profiles.meta),
        "n_moa_queries_nscb": result.n_queries_nscb,
    }


def moa_explanation(settings: dict[str, Any]) -> str:
    """What the NSC/NSCB columns mean, with the choices made (Markdown)."""
    treatment = f"`{settings['compound_key']}`"
    if settings.get("concentration_key"):
        treatment += f" x `{settings['concentration_key']}`"
    standardized = (
        f"standardised to the control cells of their `{settings['standardize_key']}`"
        if settings.get("standardize_key")
        else "not standardised (the embedding as it is)"
    )
    replicate = f"`{settings['replicate_key']}`" if settings.get("replicate_key") else "the guide"
    return f"""- **NSC**: share of treatment profiles ({treatment}) whose nearest neighbour by
  cosine distance, among the profiles of *other* compounds, shares a relationship group
  (mechanism of action) with them (Ljosa et al. 2013). **NSCB**: the same with the profiles
  of the same batch (`{settings["batch_key"]}`) left out too (Ando et al. 2017); NSC − NSCB
  is what the batch lends. Higher is better.
- Profiles: the mean of each replicate's cells (replicate: {replicate}), {standardized}, then
  the median of a treatment's replicates per batch; controls and compounds in no group are
  left out. Protocol: docs/evaluation.md."""
