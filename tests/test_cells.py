"""One reader for cells: ``open_cells`` on the three file kinds, one missing-key error."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.data import schema


def _cells(n: int = 60, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = np.array(["NTC", "g0", "g1", "g2"])[rng.integers(0, 4, n)]
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(genes),
            "guide": pd.Categorical([f"{g}_{i % 2}" for i, g in enumerate(genes)]),
            "batch": pd.Categorical(np.array(["A01", "A02"])[np.arange(n) % 2]),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=rng.normal(size=(n, 5)).astype(np.float32), obs=obs)
    adata.obsm[schema.OBSM_BATCH_EMBEDDING] = rng.normal(size=(n, 3)).astype(np.float32)
    adata.uns[schema.UNS_SCBD] = {"kind": "scbd", "control": "NTC"}
    return adata


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_open_cells_reads_anndata_lazily(tmp_path: Path, suffix: str) -> None:
    from scbd_cells.profiles.anndata_io import write_anndata
    from scbd_cells.profiles.cells import Cells, ObsColumns, open_cells

    adata = _cells()
    path = tmp_path / f"cells{suffix}"
    write_anndata(adata, path, overwrite=False)
    with open_cells(path) as cells:
        assert isinstance(cells, Cells)
        assert isinstance(cells.obs, ObsColumns)  # read a column at a time, not loaded
        assert (cells.n_obs, cells.n_vars, cells.control) == (60, 5, "NTC")
        assert cells.provenance()["kind"] == "scbd"
        assert cells.var_names == list(adata.var_names)
        np.testing.assert_array_equal(cells.rep("X")[:], adata.X)
        np.testing.assert_array_equal(
            cells.rep(schema.OBSM_BATCH_EMBEDDING)[:], adata.obsm[schema.OBSM_BATCH_EMBEDDING]
        )
        np.testing.assert_array_equal(
            cells.labels("batch", "batch").astype(str), adata.obs["batch"].astype(str)
        )
        whole = cells.to_anndata()
    np.testing.assert_array_equal(whole.X, adata.X)
    pd.testing.assert_frame_equal(whole.obs, adata.obs)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_open_cells_reads_a_profile_table(tmp_path: Path, suffix: str) -> None:
    from scbd_cells.profiles.cells import open_cells

    frame = pd.DataFrame(
        {
            "Metadata_Plate": ["P1", "P1", "P2"],
            "Metadata_Well": ["A01", "A02", "A01"],
            "Cells_AreaShape_Area": [1.0, 2.0, 3.0],
            "Nuclei_Intensity_Mean": [0.5, 0.25, 0.125],
        }
    )
    path = tmp_path / f"profiles{suffix}"
    frame.to_parquet(path, index=False) if suffix == ".parquet" else frame.to_csv(path, index=False)
    with open_cells(path) as cells:
        assert (cells.n_obs, cells.n_vars) == (3, 2)
        assert list(cells.obs.columns) == ["Metadata_Plate", "Metadata_Well"]
        assert cells.var_names == ["Cells_AreaShape_Area", "Nuclei_Intensity_Mean"]
        assert cells.provenance()["kind"] == "profile_table"
        np.testing.assert_allclose(np.asarray(cells.rep("X")), frame.iloc[:, 2:].to_numpy())
        assert list(cells.labels("Metadata_Plate", "batch")) == ["P1", "P1", "P2"]


def test_open_cells_refuses_what_is_not_there(tmp_path: Path) -> None:
    from scbd_cells.profiles.cells import open_cells

    with pytest.raises(InputError, match="does not exist"):
        open_cells(tmp_path / "missing.h5ad")
    (tmp_path / "junk.h5ad").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="Could not read"):
        open_cells(tmp_path / "junk.h5ad")


def test_every_command_names_a_missing_key_alike(tmp_path: Path, write_corum) -> None:
    """One message for a missing obsm key: the keys there are and the commands that make them."""
    from scbd_cells import aggregate_profiles, correct, evaluate, export
    from scbd_cells.profiles.anndata_io import write_anndata

    path = tmp_path / "cells.h5ad"
    write_anndata(_cells(), path, overwrite=False)
    corum_file = write_corum(tmp_path / "corum.txt", {"c": ["g0", "g1"]})
    runs = {
        "aggregate": lambda: aggregate_profiles(_cells(), use_rep="X_missing", control="NTC"),
        "evaluate": lambda: evaluate(
            [path], corum=corum_file, out=tmp_path / "report", keys=["X_missing"]
        ),
        "correct": lambda: correct(
            path, method="center-scale", out=tmp_path / "c.h5ad", key="X_missing"
        ),
        "export": lambda: export(path, level="well", out=tmp_path / "w.parquet", key="X_missing"),
    }
    messages = {}
    for name, run in runs.items():
        with pytest.raises(DataError) as caught:
            run()
        messages[name] = str(caught.value).split(" has no ", 1)[1]  # after the file named
    assert len(set(messages.values())) == 1, messages
    message = messages["export"]
    assert f"keys: {schema.OBSM_BATCH_EMBEDDING}" in message
    assert "scbd-cells embed" in message and "scbd-cells baseline" in message
