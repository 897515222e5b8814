"""Evaluate: biology kept in guide profiles (scIB's bio-conservation metrics, JUMP settings).

On the guide profiles of :func:`scbd_cells.aggregate_profiles` (a guide's cells pooled over
wells, control-subtracted, standardised):

- **silhouette of label**: silhouette of the targeting guides labelled by their gene
  (cosine, ``sklearn.metrics.silhouette_score``), rescaled to ``(s + 1) / 2``: 1 when a
  gene's guides sit together and apart from other genes';
- **Leiden NMI / ARI**: the guides of genes that belong to exactly one complex of the
  complex file, clustered with scanpy's Leiden on a 15-nearest-neighbour cosine graph
  (igraph flavour, two iterations, resolution 1, seeded: the JUMP benchmark's call), and
  the clusters compared with the complex labels (``normalized_mutual_info_score``,
  ``adjusted_rand_score``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scbd_cells.evaluation.complexes import Complexes
from scbd_cells.evaluation.mixing import WORKING_MEMORY_MB

if TYPE_CHECKING:
    import anndata

log = logging.getLogger(__name__)

LEIDEN_NEIGHBORS = 15
LEIDEN_RESOLUTION = 1.0


@dataclass(frozen=True)
class BiologyResult:
    """Bio-conservation metrics of one embedding's guide profiles (higher = better).

    Attributes
    ----------
    silhouette_label
        Rescaled silhouette of gene labels over targeting guides, or NaN when no gene has
        two guides.
    leiden_nmi, leiden_ari
        Leiden clusters against complex labels, or NaN with fewer than two complexes.
    n_guides_silhouette, n_guides_leiden, n_complexes_leiden
        What each was computed on.
    """

    silhouette_label: float
    leiden_nmi: float
    leiden_ari: float
    n_guides_silhouette: int
    n_guides_leiden: int
    n_complexes_leiden: int


def silhouette_label(profiles: np.ndarray, labels: np.ndarray) -> float:
    """``(silhouette_score(profiles, labels, metric="cosine") + 1) / 2``, labels of 2+ rows."""
    import sklearn
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels).astype(str)
    names, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, names[counts >= 2])
    if len(np.unique(labels[keep])) < 2:
        return float("nan")
    with sklearn.config_context(working_memory=WORKING_MEMORY_MB):
        score = silhouette_score(np.asarray(profiles)[keep], labels[keep], metric="cosine")
    return float((score + 1) / 2)


def scanpy_neighbors(adata: anndata.AnnData, *, n_neighbors: int, metric: str, seed: int) -> None:
    """``scanpy.pp.neighbors`` on ``X`` with exact neighbours (sklearn, brute force).

    scanpy 1.11 cannot read the ``csr_array`` that sklearn >= 1.9 and scipy 1.17 hand back
    for more than 4,096 rows; the transformer below returns the ``csr_matrix`` it expects.
    For fewer rows scanpy's own exact path gives the same connectivities (tested).
    """
    import scanpy as sc
    import scipy.sparse as sp
    import sklearn
    from sklearn.neighbors import KNeighborsTransformer

    class ExactNeighbors(KNeighborsTransformer):
        def fit_transform(self, X: Any, y: Any = None) -> Any:
            return sp.csr_matrix(super().fit_transform(X))

        def transform(self, X: Any) -> Any:
            return sp.csr_matrix(super().transform(X))

    transformer = ExactNeighbors(n_neighbors=n_neighbors, metric=metric, algorithm="brute")
    with warnings.catch_warnings(), sklearn.config_context(working_memory=WORKING_MEMORY_MB):
        warnings.simplefilter("ignore", FutureWarning)  # scanpy's notices on defaults
        sc.pp.neighbors(
            adata, n_neighbors=n_neighbors, use_rep="X", metric=metric, random_state=seed,
            transformer=transformer,
        )


# Up to this many rows the graph's two umap kernels run as the Python they are written in:
# numba would spend 20-40 s compiling them on a laptop (the whole evaluate of a small file
# took ~60 s), while interpreted they take well under a second at this size.
INTERPRETED_GRAPH_ROWS = 2_000


@contextlib.contextmanager
def _umap_kernels_interpreted(n_rows: int) -> Iterator[None]:
    """scanpy's connectivities (umap's fuzzy simplicial set) without JIT for small graphs.

    ``smooth_knn_dist`` and ``compute_membership_strengths`` are numba functions; their
    ``py_func`` is the same code run by Python. Above ``INTERPRETED_GRAPH_ROWS`` rows, or
    once numba has compiled them in this process, nothing changes.
    """
    with warnings.catch_warnings():  # as scanpy imports it
        warnings.filterwarnings("ignore", message=r"Tensorflow not installed")
        from umap import umap_

    kernels = ("smooth_knn_dist", "compute_membership_strengths")
    compiled = {name: getattr(umap_, name) for name in kernels}
    if n_rows > INTERPRETED_GRAPH_ROWS or any(f.signatures for f in compiled.values()):
        yield
        return
    try:
        for name, function in compiled.items():
            setattr(umap_, name, function.py_func)
        yield
    finally:
        for name, function in compiled.items():
            setattr(umap_, name, function)


def leiden_clusters(profiles: np.ndarray, *, seed: int) -> np.ndarray:
    """Leiden clusters (scanpy, igraph flavour) of rows on a cosine nearest-neighbour graph."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(X=np.asarray(profiles, dtype=np.float32))
    n_neighbors = max(2, min(LEIDEN_NEIGHBORS, adata.n_obs - 1))
    with _umap_kernels_interpreted(adata.n_obs):
        scanpy_neighbors(adata, n_neighbors=n_neighbors, metric="cosine", seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy's notices on defaults
        sc.tl.leiden(
            adata,
            resolution=LEIDEN_RESOLUTION,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=seed,
        )
    return adata.obs["leiden"].astype(str).to_numpy()


def guide_biology(guides: Any, complexes: Complexes, *, control: str, seed: int) -> BiologyResult:
    """Silhouette of gene label and Leiden NMI/ARI against complexes, on guide profiles.

    Parameters
    ----------
    guides
        The guide AnnData of :func:`scbd_cells.aggregate_profiles` (obs ``perturbation``).
    complexes
        The complexes file.
    control
        The control label; control guides are left out.
    seed
        Seeds the neighbour graph and Leiden.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    genes = guides.obs["perturbation"].astype(str).to_numpy()
    targeting = genes != control
    profiles = np.asarray(guides.X, dtype=np.float64)
    silhouette = silhouette_label(profiles[targeting], genes[targeting])

    distinct = sorted(set(genes[targeting]))
    membership = complexes.membership(distinct)
    single = membership.sum(axis=1) == 1
    names = np.asarray(complexes.names, dtype=object)
    complex_of = {
        gene: str(names[np.flatnonzero(row)[0]])
        for gene, row, one in zip(distinct, membership, single, strict=True)
        if one
    }
    rows = np.flatnonzero([targeting[i] and genes[i] in complex_of for i in range(len(genes))])
    truth = np.array([complex_of[genes[i]] for i in rows], dtype=object)
    if len(np.unique(truth)) < 2 or len(rows) < 3:
        nmi = ari = float("nan")
    else:
        clusters = leiden_clusters(profiles[rows], seed=seed)
        nmi = float(normalized_mutual_info_score(truth, clusters))
        ari = float(adjusted_rand_score(truth, clusters))
    return BiologyResult(
        silhouette_label=silhouette,
        leiden_nmi=nmi,
        leiden_ari=ari,
        n_guides_silhouette=int(targeting.sum()),
        n_guides_leiden=len(rows),
        n_complexes_leiden=len(np.unique(truth)),
    )
