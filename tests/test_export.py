"""export: the levels, plain-string Metadata_ columns, and pycytominer / copairs on the table."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scbd_cells import export
from scbd_cells.data import schema
from scbd_cells.errors import InputError
from scbd_cells.evaluation.map import phenotypic_activity, replicate_profiles

CONTROL = "nontargeting"


def _cells(path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for gene in [f"g{i}" for i in range(6)] + [CONTROL]:
        for guide in range(3 if gene == CONTROL else 2):
            for plate in ("P1", "P2"):
                for well in ("A01", "A02"):
                    for _ in range(int(rng.integers(2, 5))):
                        rows.append((gene, f"{gene}_{guide}", plate, well, f"{plate}_{well}"))
    obs = pd.DataFrame(rows, columns=["perturbation", "guide", "plate", "well", "batch"])
    effect = {g: rng.normal(size=6) * (g in ("g0", "g1")) for g in obs["perturbation"].unique()}
    x = rng.normal(size=(len(obs), 6)) + 2 * np.stack([effect[g] for g in obs["perturbation"]])
    for column in obs:
        obs[column] = pd.Categorical(obs[column])
    obs.index = [f"c{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs)
    adata.var_names = [f"z{i}" for i in range(6)]
    adata.obsm["X_features"] = (x[:, :3] * 10).astype(np.float32)
    adata.uns["scbd"] = {
        "control": CONTROL,
        "feature_names": ["Nuclei_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA", "C_x"],
    }
    adata.write_h5ad(path)
    return path


def test_levels_and_metadata(tmp_path: Path) -> None:
    source = _cells(tmp_path / "cells.h5ad")
    cells = ad.read_h5ad(source)
    tables = {}
    for level in ("cell", "well", "guide", "gene"):
        result = export(source, level=level, out=tmp_path / f"{level}.parquet")
        tables[level] = pd.read_parquet(result.out_path)
        table = tables[level]
        assert list(table.columns[:6]) == list(schema.METADATA_COLUMNS)
        assert list(table.columns[6:]) == [f"z{i}" for i in range(6)]
        for column in schema.METADATA_COLUMNS[:-1]:  # plain strings, never categorical
            assert not isinstance(table[column].dtype, pd.CategoricalDtype), (level, column)
            assert table[column].map(type).eq(str).all(), (level, column)
        assert table[schema.METADATA_N_CELLS].sum() == cells.n_obs
    assert len(tables["cell"]) == cells.n_obs
    assert len(tables["well"]) == 4 and set(tables["well"][schema.METADATA_PERTURBATION]) == {
        "mixed"
    }
    guide = tables["guide"]
    assert len(guide) == 15 * 4  # one row per guide x well: the replicates
    frame = pd.DataFrame(cells.X, columns=cells.var_names).assign(
        guide=cells.obs["guide"].astype(str).to_numpy(),
        batch=cells.obs["batch"].astype(str).to_numpy(),
    )
    expected = frame.groupby(["guide", "batch"]).mean()
    got = guide.set_index([schema.METADATA_GUIDE, schema.METADATA_BATCH])[list(cells.var_names)]
    np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), rtol=1e-5)
    assert set(zip(guide[schema.METADATA_PLATE], guide[schema.METADATA_WELL], strict=True)) == {
        ("P1", "A01"), ("P1", "A02"), ("P2", "A01"), ("P2", "A02")
    }
    assert len(tables["gene"]) == 7 * 4
    named = export(source, level="gene", out=tmp_path / "f.csv", key="X_features")
    assert list(pd.read_csv(named.out_path).columns[6:])[:2] == [
        "Nuclei_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA"
    ]


def test_pycytominer_and_copairs_read_the_export(tmp_path: Path, pycytominer) -> None:
    """The steps docs/evaluation.md shows, on an exported guide x well table."""
    from copairs import map as copairs_map

    source = _cells(tmp_path / "cells.h5ad")
    export(source, level="guide", out=tmp_path / "guides.parquet")
    profiles = pd.read_parquet(tmp_path / "guides.parquet")
    features = [c for c in profiles.columns if not c.startswith("Metadata_")]
    meta_columns = [c for c in profiles.columns if c.startswith("Metadata_")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        genes = pycytominer.aggregate(
            profiles, strata=["Metadata_Perturbation"], features=features, operation="mean"
        )
        normalized = pycytominer.normalize(
            profiles, features=features, meta_features=meta_columns,
            samples=f"Metadata_Perturbation == '{CONTROL}'", method="standardize",
        )
    assert len(genes) == 7 and not genes[features].isna().any().any()
    assert len(normalized) == len(profiles)

    # copairs' phenotypic activity on the exported table, prepared as evaluate prepares its
    # replicate profiles (control-centred, unit spread), equals evaluate's numbers
    values = profiles[features].to_numpy(dtype=np.float64, copy=True)
    control = (profiles["Metadata_Perturbation"] == CONTROL).to_numpy()
    values -= values[control].mean(axis=0)
    values /= values.std(axis=0)
    meta = profiles[meta_columns].copy()
    meta["Metadata_Reference_Index"] = np.where(control, np.arange(len(meta)), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ap = copairs_map.average_precision(
            meta, values,
            pos_sameby=["Metadata_Perturbation", "Metadata_Reference_Index"],
            pos_diffby=["Metadata_Batch"], neg_sameby=["Metadata_Batch"],
            neg_diffby=["Metadata_Perturbation", "Metadata_Reference_Index"],
            progress_bar=False,
        )
        table = copairs_map.mean_average_precision(
            ap[~control], ["Metadata_Perturbation"], null_size=300, threshold=0.05, seed=0,
            progress_bar=False,
        )
    ours = phenotypic_activity(
        replicate_profiles(ad.read_h5ad(source), control=CONTROL, max_replicates=None, seed=0),
        control=CONTROL, null_size=300, seed=0,
    )
    np.testing.assert_allclose(
        ours.table["mean_average_precision"],
        table.sort_values("Metadata_Perturbation")["mean_average_precision"], atol=1e-5,
    )


def test_export_refuses(tmp_path: Path, entries) -> None:
    source = _cells(tmp_path / "cells.h5ad")
    with pytest.raises(InputError, match="--level"):
        export(source, level="plate", out=tmp_path / "x.parquet")
    with pytest.raises(InputError, match=".parquet or .csv"):
        export(source, level="cell", out=tmp_path / "x.txt")
    (tmp_path / "taken.parquet").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        export(source, level="cell", out=tmp_path / "taken.parquet")
    with pytest.raises(InputError, match="not a profile table exported by scbd-cells"):
        export(source, level="cell", out=tmp_path / "taken.parquet", overwrite=True)
    assert (tmp_path / "taken.parquet").read_text() == "mine"
    assert entries(tmp_path) == ["cells.h5ad", "taken.parquet"]
    export(source, level="well", out=tmp_path / "wells.csv")
    with pytest.raises(InputError, match="Pass --overwrite"):
        export(source, level="well", out=tmp_path / "wells.csv")
    export(source, level="guide", out=tmp_path / "wells.csv", overwrite=True)  # ours: replaced
    with open(tmp_path / "wells.csv", "a") as edited:  # edited since: no longer ours
        edited.write("\n")
    with pytest.raises(InputError, match="not a profile table"):
        export(source, level="well", out=tmp_path / "wells.csv", overwrite=True)
