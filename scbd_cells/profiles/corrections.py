"""Correct: the field's standard profile-level batch corrections, as comparators for SCBD.

``scbd-cells correct PROFILES.h5ad --method M --batch-key COLUMN --out OUT.h5ad`` applies
one of the corrections the JUMP Cell Painting batch-correction benchmark (Arevalo et al.
2024) compares, to any cell-level AnnData (the baseline's features or PCA, z_c, a lab's
own CellProfiler profiles), and writes an AnnData that ``evaluate`` reads:

- ``harmony``: Harmony (``harmonypy.run_harmony``, Korsunsky et al. 2019) on the
  embedding, batch = the batch column, seeded;
- ``sphering``: ZCA whitening fitted on the control cells (mean and covariance of the
  controls, ``W = U diag(1 / sqrt(lambda + epsilon)) U^T``), applied to every cell: the
  directions in which control cells vary (the wells' signature among them) are scaled
  down to unit variance. The batch column is not used. Equal to pycytominer's
  ``Spherize(method="ZCA")`` (tested);
- ``combat``: ComBat (``scanpy.pp.combat``), batch = the batch column;
- ``center-scale``: each feature standardised (mean 0, standard deviation 1) within each
  batch: what ``baseline --normalize batch`` does to the features.

New plates without refitting Harmony (``correct --method harmony --reference FITTED.h5ad``):
every Harmony output records its fit in compressed form (:class:`HarmonyReference`, in
``uns["scbd"]["harmony_reference"]``), and cells it was not fitted on are mapped onto it
as Symphony (Kang et al. 2021, *Nat Commun* 12:5890) maps a query onto a Harmony reference
(:func:`harmony_map`): soft-assigned to the reference's cluster centroids, then, per
cluster, the query batches' offsets are estimated by the same ridge mixture-of-experts
regression Harmony uses (Symphony's penalty, 1), its intercept anchored by the
reference's cluster statistics, and subtracted. The reference's own corrected profiles
are never touched.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.core.outputs import check_output, locks_output
from scbd_cells.data import schema
from scbd_cells.data.store import did_you_mean
from scbd_cells.profiles.cells import open_cells, read_recorded
from scbd_cells.profiles.profile_tables import (
    check_profile_columns,
    is_profile_table,
    profile_table_frame,
    write_profile_table,
)
from scbd_cells.profiles.replicates import batch_column

if TYPE_CHECKING:
    import anndata

log = logging.getLogger(__name__)

METHODS = ("harmony", "sphering", "combat", "center-scale")
SPHERING_EPSILON = 1e-6
# harmonypy's defaults, passed explicitly so that a reference records what its fit used:
# the soft-clustering bandwidth, and the ridge penalty of each batch in each cluster,
# estimated as HARMONY_RIDGE_ALPHA x the cells of that batch expected in that cluster
# (harmonypy >= 2.1, as Harmony 1.2 for R; pyproject.toml)
HARMONY_SIGMA = 0.1
HARMONY_RIDGE_ALPHA = 0.2
SYMPHONY_RIDGE_LAMBDA = 1.0  # Symphony's ridge penalty of a query batch (moe_correct_ref)
UNS_HARMONY_REFERENCE = "harmony_reference"
MAP_CHUNK = 65_536  # cells soft-clustered at a time when mapping (memory: chunk x clusters)


@dataclass(frozen=True)
class CorrectResult:
    """What :func:`correct` wrote.

    Attributes
    ----------
    out_path
        The corrected AnnData.
    method
        The correction applied.
    n_cells, n_features
        Shape of the corrected ``X``.
    n_batches
        Batches in the batch column (0 for sphering, which does not use it).
    """

    out_path: Path
    method: str
    n_cells: int
    n_features: int
    n_batches: int


def center_scale(values: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Each column standardised within each batch (constant columns only centred)."""
    out = np.empty_like(values, dtype=np.float64)
    codes, _ = pd.factorize(np.asarray(batches).astype(str))
    for code in np.unique(codes):
        rows = codes == code
        block = values[rows].astype(np.float64)
        spread = block.std(axis=0)
        out[rows] = (block - block.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    return out


def zca_sphering(
    values: np.ndarray, reference: np.ndarray, *, epsilon: float = SPHERING_EPSILON
) -> np.ndarray:
    """ZCA whitening of ``values`` with the mean and covariance of ``reference`` rows."""
    reference = np.asarray(reference, dtype=np.float64)
    if len(reference) < 2:
        raise DataError(
            f"Sphering is fitted on the control cells; found {len(reference)}. Name the "
            "control with --control, as given at ingest."
        )
    mean = reference.mean(axis=0)
    covariance = np.cov(reference - mean, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(np.atleast_2d(covariance))
    whitening = eigenvectors @ np.diag(1.0 / np.sqrt(eigenvalues + epsilon)) @ eigenvectors.T
    return (np.asarray(values, dtype=np.float64) - mean) @ whitening


@dataclass(frozen=True)
class HarmonyReference:
    """A Harmony fit, compressed so that new cells can be mapped onto it (Symphony).

    Symphony's reference (Kang et al. 2021): everything the query regression needs from
    the reference cells, without the cells. ``K`` clusters, ``D`` features.

    Attributes
    ----------
    centroids
        (K, D) unit rows: each cluster's centroid of the *corrected* reference cells,
        ``normalise(R Z_corr)``, in Harmony's cosine-normalised space.
    cluster_sizes
        (K,) ``N_k = sum_i R_ki``, the reference cells' soft counts per cluster.
    cluster_sums
        (K, D) ``C_k = sum_i R_ki z_corr_i``, their corrected profiles summed per cluster.
    sigma
        (K,) soft-clustering bandwidth of each cluster, as the fit used.
    ridge_alpha
        The ridge penalty of batch b in cluster k is ``ridge_alpha x`` the cells of b
        expected in k (harmonypy's dynamic lambda).
    batches
        The reference's batch labels.
    n_cells
        Reference cells.
    space
        Where the reference's profiles live (``kind`` and, where scbd-cells wrote them,
        the baseline's ``space_id`` or the SCBD checkpoint and step): cells mapped onto it
        must come from the same space.
    """

    centroids: np.ndarray
    cluster_sizes: np.ndarray
    cluster_sums: np.ndarray
    sigma: np.ndarray
    ridge_alpha: float
    batches: tuple[str, ...]
    n_cells: int
    space: dict[str, str]

    @property
    def n_features(self) -> int:
        return int(self.centroids.shape[1])

    def to_uns(self) -> dict[str, Any]:
        """Plain arrays and strings, for ``uns["scbd"]["harmony_reference"]``."""
        return {
            "centroids": self.centroids,
            "cluster_sizes": self.cluster_sizes,
            "cluster_sums": self.cluster_sums,
            "sigma": self.sigma,
            "ridge_alpha": float(self.ridge_alpha),
            "batches": list(self.batches),
            "n_cells": int(self.n_cells),
            "space": dict(self.space),
        }

    @classmethod
    def from_uns(cls, record: Any, *, source: Path) -> HarmonyReference:
        """The reference stored by :meth:`to_uns`; DataError if it is incomplete."""
        try:
            reference = cls(
                centroids=np.asarray(record["centroids"], dtype=np.float64),
                cluster_sizes=np.asarray(record["cluster_sizes"], dtype=np.float64),
                cluster_sums=np.asarray(record["cluster_sums"], dtype=np.float64),
                sigma=np.asarray(record["sigma"], dtype=np.float64),
                ridge_alpha=float(record["ridge_alpha"]),
                batches=tuple(str(b) for b in np.asarray(record["batches"]).ravel()),
                n_cells=int(record["n_cells"]),
                space={str(k): str(v) for k, v in dict(record.get("space", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"{source} holds a damaged Harmony reference ({type(error).__name__}: {error})."
                " Correct the reference plates again with `scbd-cells correct --method harmony`."
            ) from None
        n_clusters, n_features = reference.centroids.shape
        shapes = (
            reference.cluster_sizes.shape, reference.cluster_sums.shape, reference.sigma.shape
        )  # fmt: skip
        if shapes != ((n_clusters,), (n_clusters, n_features), (n_clusters,)):
            raise DataError(
                f"{source} holds a damaged Harmony reference: {n_clusters} centroids of "
                f"{n_features} features, but cluster sizes, sums and sigma of shapes {shapes}. "
                "Correct the reference plates again with `scbd-cells correct --method harmony`."
            )
        return reference


class HarmonyFit(NamedTuple):
    """Harmony's corrected profiles and the reference that maps new cells onto them."""

    corrected: np.ndarray
    reference: HarmonyReference


def _unit_rows(values: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return values / np.where(norms > 0, norms, 1.0)


def harmony_fit(
    values: np.ndarray,
    batches: np.ndarray,
    *,
    seed: int,
    space: dict[str, str] | None = None,
) -> HarmonyFit:
    """Harmony (harmonypy) on cells x features, and its fit as a :class:`HarmonyReference`.

    Parameters
    ----------
    values
        (N, D) profiles (a PCA, an embedding).
    batches
        (N,) batch label of each cell.
    seed
        harmonypy's ``random_state``.
    space
        Recorded in the reference (see :attr:`HarmonyReference.space`).

    Returns
    -------
    HarmonyFit
        ``corrected`` (N, D) as ``harmonypy.run_harmony(...).Z_corr``; ``reference`` built
        as Symphony's ``buildReferenceFromHarmonyObj``: centroids from the final soft
        assignments ``R`` and corrected profiles, ``N_k`` and ``C_k`` from the same.
    """
    import harmonypy

    labels = np.asarray(batches).astype(str)
    meta = pd.DataFrame({"batch": labels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = harmonypy.run_harmony(
            np.asarray(values, dtype=np.float64), meta, ["batch"], sigma=HARMONY_SIGMA,
            alpha=HARMONY_RIDGE_ALPHA, random_state=seed, verbose=False,
        )  # fmt: skip
    corrected = np.asarray(model.Z_corr, dtype=np.float64)
    assignments = np.asarray(model.R, dtype=np.float64)
    # harmonypy has returned (features x cells) and (clusters x cells) in older releases,
    # (cells x features) and (cells x clusters) in newer; the two change together
    if corrected.shape[0] != len(meta):
        corrected, assignments = corrected.T, assignments.T
    cluster_sums = assignments.T @ corrected  # (K, D)
    reference = HarmonyReference(
        centroids=_unit_rows(cluster_sums),
        cluster_sizes=assignments.sum(axis=0),
        cluster_sums=cluster_sums,
        sigma=np.full(assignments.shape[1], HARMONY_SIGMA),
        ridge_alpha=HARMONY_RIDGE_ALPHA,
        batches=tuple(pd.unique(labels)),
        n_cells=len(labels),
        space=dict(space or {}),
    )
    return HarmonyFit(corrected=corrected, reference=reference)


def harmony(values: np.ndarray, batches: np.ndarray, *, seed: int) -> np.ndarray:
    """Harmony-corrected embedding (harmonypy), cells x features."""
    return harmony_fit(values, batches, seed=seed).corrected


def soft_assignments(reference: HarmonyReference, values: np.ndarray) -> np.ndarray:
    """(N, K) soft assignment of cells to the reference's clusters (rows sum to 1).

    Harmony's soft k-means step on cosine-normalised profiles, as Symphony applies it to
    a query: ``R_ik`` proportional to ``exp(-2 (1 - cos(z_i, y_k)) / sigma_k)``.
    """
    similarity = _unit_rows(np.asarray(values, dtype=np.float64)) @ reference.centroids.T
    logits = -2.0 * (1.0 - similarity) / reference.sigma  # (N, K)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def harmony_map(
    reference: HarmonyReference,
    values: np.ndarray,
    *,
    batches: np.ndarray,
    ridge_lambda: float | None = SYMPHONY_RIDGE_LAMBDA,
) -> np.ndarray:
    """Map new cells onto a Harmony reference without refitting it (Symphony's mapping).

    In each reference cluster ``k``, with the cells' soft assignments ``R_ik``
    (:func:`soft_assignments`) and the design ``x_i = [1, onehot(batch_i)]``, the query's
    coefficients solve the ridge regression that Harmony solves for its own batches, with
    the reference's cluster as ``N_k`` extra cells of no query batch whose corrected
    profiles sum to ``C_k``::

        A_k = sum_i R_ik x_i x_i^T + diag(0, lambda_k1, ..., lambda_kB) + N_k e_0 e_0^T
        W_k = A_k^-1 (sum_i R_ik x_i z_i^T + e_0 C_k)          # (1 + B, D)
        z_i <- z_i - sum_k R_ik W_k[batch_i]                   # the intercept stays

    So each query batch is moved, cluster by cluster, by its offset from the intercept,
    and the intercept is held where the reference's corrected cells are. The reference's
    cells are not involved: nothing of theirs changes. Each call is one regression over the
    batches it is given (map each new plate on its own, and the plates mapped before it do
    not change either).

    Parameters
    ----------
    reference
        From :func:`harmony_fit` (or read from a corrected file's ``uns``).
    values
        (N, D) the new cells' profiles, in the reference's space (same PCA, same features).
    batches
        (N,) their batch labels (a new plate's wells).
    ridge_lambda
        Penalty of every batch coefficient: Symphony's 1 (``moe_correct_ref``) by default,
        small beside a cluster's cells, so the anchor fixes the intercept and a batch's
        offset from it is removed almost fully, however many cells the new plate has.
        ``None``: harmonypy's own rule for its batches, ``ridge_alpha x`` the batch's
        expected cells in the cluster (``R_ik`` summed over the query x the batch's share
        of it). That rule leaves ``alpha / (1 + alpha)`` of each batch's offset in a
        Harmony fit, and in the anchored regression it grows with the query: a plate whose
        cells crowd a few clusters (``n_k`` >> ``N_k``) keeps most of its offset, its
        intercept pulled to its own mean (measured in docs/new-plates.md).

    Returns
    -------
    numpy.ndarray
        (N, D) the mapped profiles, float64.
    """
    if ridge_lambda is not None and not ridge_lambda >= 0:
        raise InputError(f"ridge_lambda must be 0 or more (or None); found {ridge_lambda}.")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != reference.n_features:
        raise DataError(
            f"The Harmony reference was fitted on {reference.n_features} features; the cells "
            f"to map have {values.shape[1] if values.ndim == 2 else values.shape}. Map profiles"
            " made the way the reference's were (the same PCA: `scbd-cells baseline "
            "--reference`, or the same SCBD run)."
        )
    codes, _ = pd.factorize(np.asarray(batches).astype(str))
    n_batches = int(codes.max()) + 1 if len(codes) else 0
    counts, sums = _query_moments(reference, values, codes, n_batches)
    if ridge_lambda is None:
        share = np.bincount(codes, minlength=n_batches) / max(len(codes), 1)
        penalty = reference.ridge_alpha * np.outer(counts.sum(axis=1), share)  # (K, B)
    else:
        penalty = np.full((len(reference.centroids), n_batches), float(ridge_lambda))
    offsets = _batch_offsets(reference, counts, sums, penalty)
    return _move_cells(reference, values, codes, offsets)


def _query_moments(
    reference: HarmonyReference, values: np.ndarray, codes: np.ndarray, n_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster and batch, the soft counts (K, B) and the summed profiles (K, B, D)."""
    n_clusters, n_features = reference.centroids.shape
    counts = np.zeros((n_clusters, n_batches))  # sum_{i in b} R_ik
    sums = np.zeros((n_clusters, n_batches, n_features))  # sum_{i in b} R_ik z_i
    for start in range(0, len(values), MAP_CHUNK):
        chunk = slice(start, start + MAP_CHUNK)
        weights = soft_assignments(reference, values[chunk])  # (n, K)
        for batch in np.unique(codes[chunk]):
            rows = codes[chunk] == batch
            counts[:, batch] += weights[rows].sum(axis=0)
            sums[:, batch] += weights[rows].T @ values[chunk][rows]
    return counts, sums


def _batch_offsets(
    reference: HarmonyReference, counts: np.ndarray, sums: np.ndarray, penalty: np.ndarray
) -> np.ndarray:
    """(K, B, D) each batch's offset in each cluster: the anchored ridge regression."""
    n_clusters, n_batches, n_features = sums.shape
    # per cluster, the (1 + B) x (1 + B) system: intercept row/column first
    offsets = np.empty((n_clusters, n_batches, n_features))
    for k in range(n_clusters):
        system = np.zeros((1 + n_batches, 1 + n_batches))
        system[0, 0] = counts[k].sum() + reference.cluster_sizes[k]
        system[0, 1:] = system[1:, 0] = counts[k]
        system[1:, 1:] = np.diag(counts[k] + penalty[k])
        target = np.concatenate(
            [(sums[k].sum(axis=0) + reference.cluster_sums[k])[None], sums[k]]
        )  # (1 + B, D)
        offsets[k] = np.linalg.solve(system, target)[1:]  # the intercept is not removed
    return offsets


def _move_cells(
    reference: HarmonyReference, values: np.ndarray, codes: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """Each cell moved by its batch's offsets, weighted by its clusters (a copy)."""
    mapped = values.copy()
    for start in range(0, len(values), MAP_CHUNK):
        chunk = slice(start, start + MAP_CHUNK)
        weights = soft_assignments(reference, values[chunk])  # (n, K)
        block = mapped[chunk]  # a view: changed in place
        for batch in np.unique(codes[chunk]):
            rows = codes[chunk] == batch
            block[rows] -= weights[rows] @ offsets[:, batch]  # (n_b, K) @ (K, D)
    return mapped


COMBAT_MIN_CELLS = 2  # ComBat estimates a mean and a variance of each feature in each batch


def check_combat(values: np.ndarray, batches: np.ndarray) -> None:
    """ComBat's preconditions: each batch has a variance to estimate, some feature varies.

    A batch of one cell (or a batch label unique to each cell) has no variance, and
    features that are all constant have nothing to standardise: ComBat then returns NaN
    for every value.
    """
    labels, counts = np.unique(np.asarray(batches).astype(str), return_counts=True)
    small = labels[counts < COMBAT_MIN_CELLS]
    if len(small):
        shown = ", ".join(f"{label!r}" for label in small[:5])
        more = f" and {len(small) - 5:,} more" if len(small) > 5 else ""
        raise DataError(
            f"ComBat estimates each feature's variance within each batch, so every batch needs "
            f"at least {COMBAT_MIN_CELLS} cells; {len(small):,} of {len(labels):,} batches have "
            f"fewer ({shown}{more}: 1 cell each). Name a coarser batch with --batch-key (e.g. "
            "the plate), drop those cells, or use --method harmony or center-scale."
        )
    values = np.asarray(values)
    if len(values) and not (np.ptp(values, axis=0) > 0).any():
        raise DataError(
            f"Every one of the {values.shape[1]:,} features is constant across the cells: "
            "ComBat has nothing to standardise. Check that --key names the profiles."
        )


def combat(values: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """ComBat (scanpy.pp.combat) with the batch column as the batch."""
    import anndata as ad
    import scanpy as sc

    check_combat(values, batches)

    adata = ad.AnnData(
        X=np.asarray(values, dtype=np.float64),
        obs=pd.DataFrame(
            {"batch": pd.Categorical(np.asarray(batches).astype(str))},
            index=pd.RangeIndex(len(values)).astype(str),
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # constant features within a batch
        sc.pp.combat(adata, key="batch")
    return np.asarray(adata.X)


def profile_space(recorded: dict[str, Any], *, key: str) -> dict[str, str]:
    """Which space a file's profiles are in, from what scbd-cells recorded in it.

    Two files' profiles can be mixed (a reference and the cells mapped onto it) only if
    they are in one space: a baseline's PCA with the same standardisation and loadings
    (its ``space_id``: ``scbd-cells baseline --reference`` keeps the reference's), or SCBD
    embeddings from the same checkpoint. Empty where the file does not say (a lab's own
    profiles): nothing can then be checked.
    """
    kind = str(recorded.get("kind", ""))
    if kind.startswith("correct:"):  # a corrected file: the space of what was corrected
        kind = str(recorded.get("source_kind", ""))
    if kind == "baseline" and recorded.get("space_id"):
        space = "features" if key == schema.OBSM_FEATURES else "pca"
        return {"kind": kind, "space_id": str(recorded["space_id"]), "key": space}
    if kind == "scbd" and recorded.get("checkpoint"):
        return {
            "kind": kind,
            "checkpoint": str(recorded["checkpoint"]),
            "step": str(recorded.get("step", "")),
            "representation": str(recorded.get("representation", "")),
            "key": key,
        }
    return {}


def read_harmony_reference(path: str | Path) -> HarmonyReference:
    """The Harmony reference recorded in a file that ``correct --method harmony`` wrote."""
    source = Path(path)
    recorded = read_recorded(source, what="The Harmony reference")
    if UNS_HARMONY_REFERENCE not in recorded:
        found = str(recorded.get("kind", "")) or "no scbd-cells record"
        raise DataError(
            f"{source} holds no Harmony reference (it is {found}). Pass as --reference the "
            "output of `scbd-cells correct --method harmony` on the reference plates (files "
            "corrected before scbd-cells 0.1.0's Harmony references must be corrected again)."
        )
    return HarmonyReference.from_uns(recorded[UNS_HARMONY_REFERENCE], source=source)


def _check_space(reference: HarmonyReference, space: dict[str, str], *, source: Path) -> None:
    if not reference.space or not space or reference.space == space:
        return
    hint = (
        "Measure the new plate in the reference's space: `scbd-cells baseline NEW.zarr "
        "--reference REFERENCE_BASELINE.h5ad` (the reference's channel ranges, "
        "standardisation and PCA)"
        if space.get("kind") == "baseline"
        else "Embed the new plate with the run the reference plates were embedded with"
    )
    raise DataError(
        f"{source} is not in the space the Harmony reference was fitted in (reference: "
        f"{reference.space}; these profiles: {space}), so the reference's clusters and "
        f"offsets mean nothing for them. {hint}, then map that file."
    )


@locks_output("out")
def correct(
    profiles_path: str | Path,
    *,
    method: str,
    out: str | Path,
    batch_key: str = schema.BATCH,
    key: str = "X",
    control: str | None = None,
    perturbation_key: str = schema.PERTURBATION,
    reference: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> CorrectResult:
    """Correct a cell-level embedding or feature table with a standard method.

    Parameters
    ----------
    profiles_path
        Cell-level AnnData (``.h5ad`` or ``.zarr``): one row per cell, the batch column in
        obs; or a pycytominer profile table (``.parquet``, ``.csv``, ``.csv.gz``: its
        ``Metadata_*`` columns as obs, its features as ``X``;
        :func:`scbd_cells.profiles.profile_tables.read_profile_table`).
    method
        ``harmony``, ``sphering``, ``combat`` or ``center-scale``.
    out
        AnnData to write (``.h5ad`` or ``.zarr``): ``X`` = the corrected values (float32),
        ``obs`` = the input's, ``uns["scbd"]`` = the input's record plus the correction
        (for ``harmony``, also the fit as a reference: ``uns["scbd"]["harmony_reference"]``).
        From a profile table, also a table (``.parquet``, ``.csv``, ``.csv.gz``): the
        input's columns other than the features as they were, then the corrected features
        under their names (a table keeps no ``uns["scbd"]`` record).
    batch_key
        obs column of the batch (well) corrected for (not used by sphering).
    key
        ``X`` or the obsm key to correct (e.g. ``X_features`` of a baseline).
    control
        Control label, for sphering (default: the file's ``uns["scbd"]["control"]``, else
        ``nontargeting``).
    perturbation_key
        obs column holding the control label.
    reference
        Harmony only: an earlier ``correct --method harmony`` output (the reference
        plates). Instead of refitting, this file's cells are mapped onto that fit
        (:func:`harmony_map`, Symphony's mapping) and the reference's profiles stay as
        they are. The output carries the same reference, so any file of the series can
        serve as the next one's.
    seed
        Seeds Harmony.
    overwrite
        Replace an existing output.

    Returns
    -------
    CorrectResult
    """
    source, out_path = Path(profiles_path), Path(out)
    reference_path = Path(reference) if reference is not None else None
    _check_request(
        method, source=source, out=out_path, reference=reference_path, overwrite=overwrite
    )
    adata, values = _read_profiles(
        source, key=key, method=method, batch_key=batch_key, perturbation_key=perturbation_key
    )
    input_columns = [str(c) for c in adata.obs.columns]  # before a joined batch column
    recorded = dict(adata.uns.get(schema.UNS_SCBD, {}))
    if method == "sphering":
        label = control or str(recorded.get("control") or schema.CONTROL_LABEL)
        corrected = _sphere(adata, values, source=source, label=label, key=perturbation_key)
        n_batches = 0
    else:
        batch_key = batch_column(adata, batch_key)
        corrected, n_batches = _correct_batches(
            method, adata, values, recorded=recorded, batch_key=batch_key,
            reference_path=reference_path, key=key, source=source, seed=seed,
        )  # fmt: skip
    recorded.update(_correction_record(
        recorded, method=method, source=source, key=key, batch_key=batch_key, seed=seed
    ))  # fmt: skip
    result = _corrected_anndata(adata, corrected, recorded=recorded, key=key)
    _write_result(result, out_path, input_columns=input_columns, overwrite=overwrite)
    log.info(
        "Corrected %s (%s) with %s%s -> %s", source, key, method,
        f" mapped onto {reference_path}" if reference_path is not None else "", out_path,
    )  # fmt: skip
    return CorrectResult(
        out_path=out_path, method=method, n_cells=result.n_obs, n_features=result.n_vars,
        n_batches=n_batches,
    )  # fmt: skip


def _check_request(
    method: str, *, source: Path, out: Path, reference: Path | None, overwrite: bool
) -> None:
    """Refuse options that do not go together, and an output in the way."""
    from scbd_cells.profiles.anndata_io import check_output_path

    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}; found {method!r}.")
    if reference is not None and method != "harmony":
        raise InputError(
            f"--reference maps new cells onto an earlier Harmony fit; it does not apply to "
            f"--method {method}. Use --method harmony, or leave out --reference."
        )
    inputs = [source] if reference is None else [source, reference]
    table_out = is_profile_table(out)
    if table_out and not is_profile_table(source):
        raise InputError(
            f"--out {out} is a table, but {source} is an AnnData: `correct` writes a table "
            "only for a table it read. Write an AnnData (.h5ad) and make a pycytominer table "
            "of it with `scbd-cells export`."
        )
    if table_out:
        check_output(out, kind="table", overwrite=overwrite, inputs=inputs)
    else:
        check_output_path(out, overwrite=overwrite, inputs=inputs)


def _read_profiles(
    source: Path, *, key: str, method: str, batch_key: str, perturbation_key: str
) -> tuple[anndata.AnnData, np.ndarray]:
    """The whole file in memory, and its profiles under ``key`` as float64 (finite, not empty)."""
    from scbd_cells.profiles.anndata_io import non_finite_rows, rows_named

    with open_cells(source) as cells:
        if is_profile_table(source):  # the column the method reads must be there
            named = {
                "--perturbation-key": perturbation_key if method == "sphering" else None,
                "--batch-key": batch_key if method != "sphering" else None,
            }
            check_profile_columns(cells, named, source=source)
        cells.rep(key)  # refuses a missing X or obsm key before the whole file is read
        adata = cells.to_anndata()
    values = adata.X if key == "X" else adata.obsm[key]
    values = np.asarray(values.toarray() if hasattr(values, "toarray") else values, np.float64)
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise DataError(
            f"{source} holds no profiles to correct: {values.shape[0]:,} cells x "
            f"{values.shape[1]:,} features in {key}. Pass the cell-level file that embed, "
            "baseline or export's source holds."
        )
    bad = non_finite_rows(values)
    if len(bad):
        raise DataError(
            f"{source} ({key}) holds NaN, infinite or beyond-float32 (±3.4e38) values in "
            f"{len(bad):,} of {len(values):,} cells (cells {rows_named(adata.obs_names, bad)}); "
            f"{method} needs finite numbers. Drop or impute those cells or features first."
        )
    return adata, values


def _sphere(
    adata: anndata.AnnData, values: np.ndarray, *, source: Path, label: str, key: str
) -> np.ndarray:
    """ZCA sphering fitted on the cells whose ``key`` column is the control ``label``."""
    if key not in adata.obs.columns:
        raise DataError(
            f"{source} has no column {key!r} in obs; sphering needs it to "
            f"find the control cells. {did_you_mean(key, list(adata.obs.columns))}"
            "Name it with --perturbation-key."
        )
    is_control = adata.obs[key].astype(str).to_numpy() == label
    return zca_sphering(values, values[is_control])


def _batches(
    adata: anndata.AnnData, *, source: Path, batch_key: str, mapping: Path | None
) -> np.ndarray:
    """The batch of each cell (as text); at least two batches unless mapping onto a reference."""
    if batch_key not in adata.obs.columns:
        raise DataError(
            f"{source} has no batch column {batch_key!r} in obs (columns: "
            f"{', '.join(map(str, adata.obs.columns[:12]))}). "
            f"{did_you_mean(batch_key, list(adata.obs.columns))}Name it with --batch-key."
        )
    batches = adata.obs[batch_key].astype(str).to_numpy()
    if len(np.unique(batches)) < 2 and mapping is None:  # one new well can be mapped
        raise DataError(
            f"The batch column {batch_key!r} holds one batch only; nothing to correct."
        )
    return batches


def _correct_batches(
    method: str,
    adata: anndata.AnnData,
    values: np.ndarray,
    *,
    recorded: dict[str, Any],
    batch_key: str,
    reference_path: Path | None,
    key: str,
    source: Path,
    seed: int,
) -> tuple[np.ndarray, int]:
    """Harmony (fitted, or mapped onto ``reference_path``), ComBat or center-scale.

    Returns the corrected values and the number of batches; a Harmony fit (or the
    reference mapped onto) goes into ``recorded``.
    """
    batches = _batches(adata, source=source, batch_key=batch_key, mapping=reference_path)
    n_batches = len(np.unique(batches))
    space = profile_space(recorded, key=key)
    if reference_path is not None:
        fitted = read_harmony_reference(reference_path)
        _check_space(fitted, space, source=source)
        corrected = harmony_map(fitted, values, batches=batches)
        recorded[UNS_HARMONY_REFERENCE] = fitted.to_uns()
        recorded["harmony_reference_path"] = str(reference_path.resolve())
    elif method == "harmony":
        fit = harmony_fit(values, batches, seed=seed, space=space)
        corrected = fit.corrected
        recorded[UNS_HARMONY_REFERENCE] = fit.reference.to_uns()
    elif method == "combat":
        corrected = combat(values, batches)
    else:
        corrected = center_scale(values, batches)
    return corrected, n_batches


def _correction_record(
    recorded: dict[str, Any], *, method: str, source: Path, key: str, batch_key: str, seed: int
) -> dict[str, Any]:
    """What ``uns["scbd"]`` adds about this correction to the input's record."""
    from scbd_cells import __version__

    source_kind = str(recorded.get("kind", ""))
    return {
        "kind": f"correct:{method}",
        "method": method,
        "source": str(source.resolve()),
        "source_kind": str(recorded.get("source_kind", ""))
        if source_kind.startswith("correct:")
        else source_kind,
        "source_key": key,
        "batch_key": batch_key,
        "seed": seed,
        "version": __version__,
    }


def _corrected_anndata(
    adata: anndata.AnnData, corrected: np.ndarray, *, recorded: dict[str, Any], key: str
) -> anndata.AnnData:
    """``X`` = the corrected values (float32), the input's obs and var names, the record."""
    import anndata as ad

    result = ad.AnnData(X=corrected.astype(np.float32), obs=adata.obs.copy())
    names = recorded.get("feature_names")
    if key == "X" and adata.n_vars == corrected.shape[1]:
        result.var_names = adata.var_names
    elif names is not None and len(names) == corrected.shape[1]:  # a baseline's X_features
        result.var_names = [str(n) for n in names]
    result.uns[schema.UNS_SCBD] = recorded
    return result


def _write_result(
    result: anndata.AnnData, out_path: Path, *, input_columns: list[str], overwrite: bool
) -> None:
    """An AnnData, or for a table read, a table: its columns as read, then the features."""
    if is_profile_table(out_path):
        table = profile_table_frame(result, result.X)[[*input_columns, *result.var_names]]
        write_profile_table(table, out_path, overwrite=overwrite)
    else:
        from scbd_cells.profiles.anndata_io import write_anndata

        write_anndata(result, out_path, overwrite=overwrite)
