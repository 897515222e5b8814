"""evaluate reads files lazily (scbd_cells.evaluation.cells) and scores them as in memory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from scbd_cells.core.errors import DataError
from scbd_cells.evaluation.complexes import read_complexes
from scbd_cells.evaluation.corum import corum_pr
from scbd_cells.evaluation.report import evaluate
from scbd_cells.evaluation.well_probe import batch_prediction_f1, subsample
from scbd_cells.profiles.aggregate import aggregate_profiles, factorize_labels
from scbd_cells.profiles.anndata_io import write_anndata
from scbd_cells.profiles.cells import Cells, open_cells, read_rows

COMPLEXES = {"cA": ["g0", "g1", "g2"], "cB": ["g3", "g4", "g5"], "cC": ["g6", "g7"]}


def _cells(n: int = 900, seed: int = 0) -> ad.AnnData:
    """Cells as `embed` writes them: categorical labels, a unique id, z_s in obsm."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(9)] + ["NTC"]
    gene = np.sort(np.array(genes)[rng.integers(0, len(genes), n)])
    centre = {g: rng.normal(size=12) for g in genes}
    for members in COMPLEXES.values():
        shared = rng.normal(size=12)
        for g in members:
            centre[g] = centre[g] + 2 * shared
    batch = np.array(["P0_A1", "P0_A2", "P1_A1"])[rng.integers(0, 3, n)]
    x = rng.normal(size=(n, 12)) + np.stack([centre[g] for g in gene])
    obs = pd.DataFrame(
        {
            "cell_id": np.arange(n).astype(str).astype(object),
            "perturbation": pd.Categorical(gene),
            "guide": pd.Categorical([f"{g}_{i % 2}" for i, g in enumerate(gene)]),
            "batch": pd.Categorical(batch),
            "image_path": [f"img/{i}.tif" for i in range(n)],
            "tile": rng.integers(0, 5, n),
            "x": rng.uniform(size=n),
        },
        index=pd.Index(np.arange(n).astype(str).astype(object), dtype=object),
    )
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs)
    adata.obsm["X_scbd_batch"] = rng.normal(size=(n, 5)).astype(np.float32)
    adata.obsm["frame"] = pd.DataFrame({"a": np.arange(n)}, index=obs.index)
    adata.uns["scbd"] = {"kind": "scbd", "control": "NTC"}
    return adata


@pytest.fixture
def corum_file(tmp_path: Path, write_corum) -> Path:
    return write_corum(tmp_path / "complexes.txt", COMPLEXES)


def test_read_rows_equals_fancy_indexing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=(103, 6))
    positions = np.sort(rng.choice(103, size=40, replace=False))
    expected = values[positions].astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle.create_dataset("d", data=values, chunks=(10, 6))
        for chunk_size in (1, 7, 50, 1000):
            np.testing.assert_array_equal(
                read_rows(handle["d"], positions, chunk_size=chunk_size), expected
            )
    z = zarr.create_array(tmp_path / "a.zarr", shape=values.shape, chunks=(16, 6), dtype="f8")
    z[:] = values
    np.testing.assert_array_equal(read_rows(z, positions, chunk_size=9), expected)
    sparse = sp.csr_matrix(np.where(values > 1, values, 0))
    np.testing.assert_array_equal(
        read_rows(sparse, positions, chunk_size=8), sparse[positions].toarray().astype(np.float32)
    )
    np.testing.assert_array_equal(read_rows(values, np.arange(103)), values.astype(np.float32))
    assert read_rows(values, np.array([], dtype=int)).shape == (0, 6)
    with pytest.raises(ValueError, match="sorted"):
        read_rows(values, np.array([3, 1]))


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr", "anndata-default.zarr"])
def test_cells_file_reads_what_anndata_reads(tmp_path: Path, suffix: str) -> None:
    adata = _cells()
    path = tmp_path / f"cells{suffix}"
    if suffix.startswith("anndata"):  # zarr v2 on purpose: files that anndata 0.12 writes
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Writing zarr v2", category=UserWarning)
            adata.write_zarr(path)
    else:
        write_anndata(adata, path, overwrite=False)
    cells = open_cells(path)
    assert isinstance(cells, Cells)
    try:
        assert (cells.n_obs, cells.n_vars, cells.control) == (900, 12, "NTC")
        assert list(cells.obs.columns) == list(adata.obs.columns)
        for column in adata.obs.columns:
            np.testing.assert_array_equal(
                cells.obs[column].astype(str).to_numpy(), adata.obs[column].astype(str).to_numpy()
            )
        assert isinstance(cells.obs["batch"].dtype, pd.CategoricalDtype)
        assert set(cells.obsm) == {"X_scbd_batch"}  # the data frame is not an embedding
        np.testing.assert_array_equal(cells.X[:], adata.X)
        np.testing.assert_array_equal(cells.obsm["X_scbd_batch"][:], adata.obsm["X_scbd_batch"])
        with pytest.raises(KeyError):
            cells.obs["missing"]
    finally:
        cells.close()


def _reference(adata: ad.AnnData, corum: Path, *, key: str, max_cells: int | None) -> dict:
    """The metrics computed on the AnnData in memory (no lazy reading, numpy indexing)."""
    genes = aggregate_profiles(adata, use_rep=key, control="NTC").genes
    corum_result = corum_pr(genes.X, list(genes.obs_names), read_complexes(corum))
    positions = subsample(adata.n_obs, max_cells=max_cells, seed=0)
    values = adata.X if key == "X" else adata.obsm[key]
    values = values.toarray() if sp.issparse(values) else values
    well = batch_prediction_f1(
        np.asarray(values[positions], dtype=np.float32),
        adata.obs["batch"].astype(str).to_numpy()[positions],
        seed=0,
    )
    return {
        "corum_auprc": corum_result.auprc,
        "corum_recall_5_95": corum_result.recall_5_95,
        "well_f1": well.f1,
        "well_f1_chance": well.chance,
        "n_genes": corum_result.n_genes,
        "n_cells": adata.n_obs,
    }


@pytest.mark.parametrize(
    ("suffix", "key", "sparse", "max_cells"),
    [
        (".h5ad", "X", False, 500),
        (".zarr", "X", False, None),
        (".h5ad", "X_scbd_batch", False, 600),
        (".h5ad", "X", True, 500),
    ],
)
def test_evaluate_equals_in_memory_reference(
    tmp_path: Path, corum_file: Path, suffix: str, key: str, sparse: bool, max_cells: int | None
) -> None:
    adata = _cells()
    if sparse:
        adata.X = sp.csr_matrix(np.where(adata.X > 0.5, adata.X, 0))
    path = tmp_path / f"cells{suffix}"
    write_anndata(adata, path, overwrite=False)
    result = evaluate(
        [path], corum=corum_file, out=tmp_path / "report", keys=[key], max_cells=max_cells,
        umap=False,
    )
    measured = json.loads((tmp_path / "report" / "metrics.json").read_text())["embeddings"]
    reference = _reference(adata, corum_file, key=key, max_cells=max_cells)
    paper = {name: value for name, value in next(iter(measured.values())).items()
             if name in reference}  # the field's metrics sit beside these, unchanged
    assert paper == reference
    assert result.metrics["embeddings"] == measured


def test_factorize_labels_equals_string_factorize() -> None:
    rng = np.random.default_rng(2)
    values = rng.choice(["b", "a", "c", None], size=200).astype(object)
    categorical = pd.Series(pd.Categorical(values, categories=["z_unused", "c", "b", "a"]))
    mixed = pd.Series(pd.Categorical([1, "1", 2, 1], categories=[1, "1", 2]))  # "1" twice
    for series in (categorical, mixed, pd.Series(values), pd.Series(rng.integers(0, 5, 50))):
        codes, names = factorize_labels(series)
        expected_codes, expected_names = pd.factorize(series.astype(str).to_numpy(), sort=True)
        np.testing.assert_array_equal(codes, expected_codes)
        np.testing.assert_array_equal(np.asarray(names), np.asarray(expected_names))


def test_profiles_equal_from_categorical_and_string_labels() -> None:
    adata = _cells()
    as_strings = adata.copy()
    for column in ("perturbation", "guide"):
        as_strings.obs[column] = adata.obs[column].astype(str).to_numpy(dtype=object)
    a = aggregate_profiles(adata, control="NTC", chunk_size=100)
    b = aggregate_profiles(as_strings, control="NTC")
    for level in ("guides", "genes"):
        np.testing.assert_array_equal(getattr(a, level).X, getattr(b, level).X)
        pd.testing.assert_frame_equal(
            getattr(a, level).obs.astype(str), getattr(b, level).obs.astype(str)
        )
    clash = adata.copy()
    guide = clash.obs["guide"].astype(str).to_numpy(dtype=object, copy=True)  # pandas 3: CoW
    guide[guide == "g3_1"] = "g2_0"  # g2_0 now also names cells of g3
    clash.obs["guide"] = pd.Categorical(guide)
    with pytest.raises(DataError, match="Guide 'g2_0' is assigned to more than one"):
        aggregate_profiles(clash, control="NTC")


def test_not_anndata_is_a_data_error(tmp_path: Path, corum_file: Path) -> None:
    with h5py.File(tmp_path / "plain.h5ad", "w") as handle:
        handle.create_dataset("X", data=np.zeros((3, 2)))
    with pytest.raises(DataError, match="Could not read"):
        evaluate([tmp_path / "plain.h5ad"], corum=corum_file, out=tmp_path / "report")
    assert not (tmp_path / "report").exists()
