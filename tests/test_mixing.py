"""Batch mixing, biology and the overall score against the libraries that define them.

scib-metrics (the scIB benchmark's own code), harmonypy (Harmony's LISI), sklearn and scanpy
are the references; scbd-cells computes the same numbers on shared neighbours without them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scbd_cells.evaluation import mixing
from scbd_cells.evaluation.biology import leiden_clusters, silhouette_label
from scbd_cells.evaluation.overall import BATCH_METRICS, BIO_METRICS, overall_scores


def _cells(shift: float, *, n: int = 900, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = np.array([f"w{i}" for i in rng.integers(0, 5, n)])
    labels = np.array([f"g{i}" for i in rng.integers(0, 12, n)])
    well = {b: rng.normal(size=12) for b in np.unique(batches)}
    gene = {g: rng.normal(size=12) for g in np.unique(labels)}
    values = rng.normal(size=(n, 12)) + np.stack([gene[g] for g in labels])
    values += shift * np.stack([well[b] for b in batches])
    return values.astype(np.float32), batches, labels


@pytest.fixture(scope="module")
def scib():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax / chex import notices
        import scib_metrics
        from scib_metrics.nearest_neighbors import NeighborsResults
    return scib_metrics, NeighborsResults


@pytest.mark.parametrize("shift", [0.0, 0.5, 2.0])
def test_mixing_metrics_equal_scib_metrics(scib, shift: float) -> None:
    scib_metrics, NeighborsResults = scib
    values, batches, labels = _cells(shift)
    indices, distances = mixing.nearest_neighbors(values, 91)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        without_self = NeighborsResults(indices=indices[:, 1:], distances=distances[:, 1:])
        with_self = NeighborsResults(indices=indices, distances=distances)
        reference = {
            "ilisi": float(scib_metrics.ilisi_knn(without_self, batches, perplexity=30)),
            "kbet": float(scib_metrics.kbet(with_self.subset_neighbors(50), batches)[0]),
            "graph_connectivity": float(
                scib_metrics.graph_connectivity(with_self.subset_neighbors(15), labels)
            ),
            "silhouette_batch": float(
                scib_metrics.silhouette_batch(values, labels, batches, metric="cosine")
            ),
        }
    result = mixing.batch_mixing(values, batches, labels)
    assert result.ilisi == pytest.approx(reference["ilisi"], rel=1e-5, abs=1e-6)
    assert result.kbet == pytest.approx(reference["kbet"], abs=1.5 / len(values))
    assert result.graph_connectivity == pytest.approx(reference["graph_connectivity"], abs=1e-12)
    assert result.silhouette_batch == pytest.approx(reference["silhouette_batch"], abs=1e-5)
    assert result.n_cells == len(values)


def test_lisi_equals_harmonypy_per_cell() -> None:
    from harmonypy import compute_lisi

    values, batches, _ = _cells(0.7, n=600)
    indices, distances = mixing.nearest_neighbors(values, 91)
    ours = mixing.lisi(indices[:, 1:], distances[:, 1:], batches)
    reference = compute_lisi(values.astype(np.float64), pd.DataFrame({"b": batches}), ["b"])
    np.testing.assert_allclose(ours, reference[:, 0], rtol=1e-8)


def test_mixing_ranks_mixed_above_separated() -> None:
    mixed = mixing.batch_mixing(*_cells(0.0))
    separated = mixing.batch_mixing(*_cells(3.0))
    for name in ("ilisi", "silhouette_batch", "graph_connectivity", "kbet"):
        assert getattr(mixed, name) > getattr(separated, name), name


def test_silhouette_label_equals_sklearn_and_scib(scib) -> None:
    from sklearn.metrics import silhouette_score

    scib_metrics, _ = scib
    values, _, labels = _cells(0.0, n=300)
    labels = labels.astype(object)
    labels[0] = "alone"  # a label with one row is left out (silhouette undefined for it)
    keep = labels != "alone"
    expected = (silhouette_score(values[keep], labels[keep], metric="cosine") + 1) / 2
    assert silhouette_label(values, labels) == pytest.approx(expected, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = scib_metrics.silhouette_label(values[keep], labels[keep], metric="cosine")
    assert silhouette_label(values, labels) == pytest.approx(float(reference), abs=1e-5)


def test_leiden_equals_scanpy_default_path() -> None:
    """Our exact-neighbour transformer gives scanpy's own clusters (< 4,096 rows)."""
    import anndata as ad
    import scanpy as sc

    values, _, _ = _cells(0.0, n=400)
    adata = ad.AnnData(X=values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sc.pp.neighbors(adata, n_neighbors=15, use_rep="X", metric="cosine", random_state=0)
        sc.tl.leiden(
            adata, resolution=1.0, flavor="igraph", n_iterations=2, directed=False,
            random_state=0,
        )
    ours = leiden_clusters(values, seed=0)
    np.testing.assert_array_equal(ours, adata.obs["leiden"].astype(str).to_numpy())


def test_overall_is_the_benchmark_formula() -> None:
    from sklearn.preprocessing import MinMaxScaler

    rng = np.random.default_rng(1)
    table = pd.DataFrame(rng.uniform(size=(4, 9)), columns=[*BATCH_METRICS, *BIO_METRICS])
    table["kbet"] = 0.3  # equal for all: scaled to 0 for all, as MinMaxScaler does
    scores = overall_scores(table)
    scaled = pd.DataFrame(MinMaxScaler().fit_transform(table), columns=table.columns)
    batch = scaled[list(BATCH_METRICS)].mean(axis=1)
    bio = scaled[list(BIO_METRICS)].mean(axis=1)
    np.testing.assert_allclose(scores["overall"], 0.4 * batch + 0.6 * bio, atol=1e-12)
    assert overall_scores(table.iloc[:1])["overall"].isna().all()
    table.loc[0, "leiden_ari"] = np.nan  # undefined for one embedding: out for all
    without = overall_scores(table)
    bio = scaled[[m for m in BIO_METRICS if m != "leiden_ari"]].mean(axis=1)
    np.testing.assert_allclose(without["bio_score"], bio, atol=1e-12)


def test_leiden_of_a_small_table_compiles_nothing_and_equals_scanpy(tmp_path) -> None:
    """In a fresh process (nothing compiled yet) the graph's umap kernels run interpreted:
    no numba compile on a small file's evaluate, and scanpy's own clusters all the same."""
    import os
    import subprocess
    import sys

    import anndata as ad
    import scanpy as sc

    values, _, _ = _cells(0.0, n=400)
    np.save(tmp_path / "values.npy", values)
    script = (
        "import sys, numpy as np\n"
        "from umap import umap_\n"
        "from scbd_cells.evaluation.biology import leiden_clusters\n"
        "ours = leiden_clusters(np.load(sys.argv[1]), seed=0)\n"
        "assert not umap_.smooth_knn_dist.signatures, 'numba compiled the kernel'\n"
        "assert not umap_.compute_membership_strengths.signatures\n"
        "print(','.join(ours))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "values.npy")], capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": root},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    ours = completed.stdout.strip().split(",")
    adata = ad.AnnData(X=values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sc.pp.neighbors(adata, n_neighbors=15, use_rep="X", metric="cosine", random_state=0)
        sc.tl.leiden(
            adata, resolution=1.0, flavor="igraph", n_iterations=2, directed=False,
            random_state=0,
        )
    np.testing.assert_array_equal(ours, adata.obs["leiden"].astype(str).to_numpy())
