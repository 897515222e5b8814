"""export: the levels, plain-string Metadata_ columns, and pycytominer / copairs on the table."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scbd_cells import export
from scbd_cells.core.errors import InputError
from scbd_cells.data import schema
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


def _lab_cells(path: Path, *, plate: str = "Metadata_Plate", well: str = "Metadata_Well") -> Path:
    """Cells as embed writes them from a store ingested with ``--batch-columns PLATE,WELL``.

    obs: the store's canonical labels (``perturbation``, ``guide``, ``batch`` joined from
    the plate and well), ``cell_id``, CellProfiler's ``ImageNumber`` / ``ObjectNumber``, and
    the table's ``Metadata_*`` columns verbatim: ``Metadata_Gene`` / ``Metadata_sgRNA`` (the
    label sources), ``Metadata_PlateMap`` (one per plate), ``Metadata_Site`` (per cell).
    """
    rng = np.random.default_rng(1)
    rows = []
    for gene in ("g0", "g1", CONTROL):
        for guide in range(2):
            for plate_name in ("P1", "P2"):
                for well_name in ("A01", "B02"):
                    for _ in range(int(rng.integers(2, 4))):
                        rows.append((gene, f"{gene}_{guide}", plate_name, well_name))
    obs = pd.DataFrame(rows, columns=["Metadata_Gene", "Metadata_sgRNA", plate, well])
    obs["perturbation"] = obs["Metadata_Gene"]
    obs["guide"] = obs["Metadata_sgRNA"]
    obs["batch"] = obs[plate] + "_" + obs[well]
    obs["ImageNumber"] = pd.factorize(obs["batch"])[0].astype(np.int64) + 1
    obs["ObjectNumber"] = obs.groupby("ImageNumber").cumcount().astype(np.int64) + 1
    obs["cell_id"] = [f"cell-{i:03d}" for i in range(len(obs))]
    obs["Metadata_PlateMap"] = obs[plate].map({"P1": "map_a", "P2": "map_b"})
    obs["Metadata_Site"] = rng.integers(1, 5, size=len(obs)).astype(str)
    for column in ("Metadata_Gene", "Metadata_sgRNA", plate, well, "perturbation", "guide",
                   "batch", "Metadata_PlateMap", "Metadata_Site"):  # fmt: skip
        obs[column] = pd.Categorical(obs[column])
    obs["cell_id"] = obs["cell_id"].astype(object)
    obs.index = obs["cell_id"].to_numpy()
    adata = ad.AnnData(X=rng.normal(size=(len(obs), 4)).astype(np.float32), obs=obs)
    adata.var_names = [f"z{i}" for i in range(4)]
    adata.uns["scbd"] = {
        "control": CONTROL,
        "label_columns": {
            "perturbation": "Metadata_Gene", "guide": "Metadata_sgRNA", "batch": [plate, well]
        },
    }
    adata.write_h5ad(path)
    return path


def test_metadata_columns_carried_and_plate_well_from_the_batch_columns(
    tmp_path: Path, pycytominer
) -> None:
    source = _lab_cells(tmp_path / "cells.h5ad")
    cells = ad.read_h5ad(source)
    obs = cells.obs
    tables = {}
    for level in ("cell", "well", "guide", "gene"):
        export(source, level=level, out=tmp_path / f"{level}.parquet")
        table = tables[level] = pd.read_parquet(tmp_path / f"{level}.parquet")
        assert not table.columns.duplicated().any(), level
        assert list(table.columns[:6]) == list(schema.METADATA_COLUMNS)
        assert list(table.columns[-4:]) == [f"z{i}" for i in range(4)]
        assert table[schema.METADATA_PLATE].isin(["P1", "P2"]).all(), level
        assert table[schema.METADATA_WELL].isin(["A01", "B02"]).all(), level
        assert (table[schema.METADATA_PLATE] + "_" + table[schema.METADATA_WELL]).equals(
            table[schema.METADATA_BATCH]
        ), level
        # pycytominer sees the Metadata_ columns as metadata and the rest as features
        meta = pycytominer.cyto_utils.infer_cp_features(table, metadata=True)
        assert meta == [c for c in table.columns if c.startswith("Metadata_")]

    cell = tables["cell"]
    assert list(cell.columns[6:12]) == [
        "Metadata_Cell_ID", "Metadata_ImageNumber", "Metadata_ObjectNumber",
        "Metadata_Gene", "Metadata_sgRNA", "Metadata_PlateMap",
    ]  # fmt: skip
    assert "Metadata_Site" in cell.columns
    assert cell["Metadata_Cell_ID"].tolist() == obs["cell_id"].tolist()
    assert cell["Metadata_ImageNumber"].dtype == np.int64  # joins CellProfiler's integers
    for column in ("Metadata_Gene", "Metadata_sgRNA", "Metadata_PlateMap", "Metadata_Site"):
        assert cell[column].tolist() == obs[column].astype(str).tolist(), column
    assert cell[schema.METADATA_PLATE].tolist() == obs["Metadata_Plate"].astype(str).tolist()
    assert cell[schema.METADATA_WELL].tolist() == obs["Metadata_Well"].astype(str).tolist()

    # the cell rows join back to a CellProfiler object table on ImageNumber + ObjectNumber
    objects = pd.DataFrame(
        {"ImageNumber": obs["ImageNumber"].to_numpy(), "ObjectNumber": obs["ObjectNumber"],
         "Cells_AreaShape_Area": np.arange(len(obs), dtype=float)}
    ).sample(frac=1.0, random_state=0)  # fmt: skip
    joined = cell.merge(
        objects, left_on=["Metadata_ImageNumber", "Metadata_ObjectNumber"],
        right_on=["ImageNumber", "ObjectNumber"], how="inner", validate="one_to_one",
    )  # fmt: skip
    assert len(joined) == cells.n_obs
    np.testing.assert_array_equal(joined["Cells_AreaShape_Area"], np.arange(cells.n_obs))

    # above the cell level: the Metadata_ columns constant within every group, no ids
    well = tables["well"]
    assert "Metadata_PlateMap" in well.columns and "Metadata_Site" not in well.columns
    assert "Metadata_Gene" not in well.columns and "Metadata_Cell_ID" not in well.columns
    assert dict(zip(well[schema.METADATA_PLATE], well["Metadata_PlateMap"], strict=True)) == {
        "P1": "map_a", "P2": "map_b"
    }
    guide = tables["guide"]
    assert {"Metadata_Gene", "Metadata_sgRNA", "Metadata_PlateMap"} <= set(guide.columns)
    assert guide["Metadata_Gene"].equals(guide[schema.METADATA_PERTURBATION])
    assert "Metadata_sgRNA" not in tables["gene"].columns
    assert "Metadata_ImageNumber" not in tables["gene"].columns

    # pycytominer's aggregate of the cell rows by plate and well is the well table
    features = [f"z{i}" for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        by_well = pycytominer.aggregate(
            cell, strata=["Metadata_Plate", "Metadata_Well"], features=features,
            operation="mean",
        )  # fmt: skip
    by_well = by_well.set_index(["Metadata_Plate", "Metadata_Well"]).sort_index()
    ours = well.set_index(["Metadata_Plate", "Metadata_Well"]).sort_index()
    np.testing.assert_allclose(ours[features], by_well[features], rtol=1e-5)


def test_plate_and_well_from_recorded_batch_columns_whatever_their_names(
    tmp_path: Path,
) -> None:
    """A store ingested with ``--batch-columns Plate_Barcode,WellPosition``."""
    source = _lab_cells(tmp_path / "cells.h5ad", plate="Plate_Barcode", well="WellPosition")
    for level in ("cell", "guide"):
        table = pd.read_csv(export(source, level=level, out=tmp_path / f"{level}.csv").out_path)
        assert set(table[schema.METADATA_PLATE]) == {"P1", "P2"}, level
        assert set(table[schema.METADATA_WELL]) == {"A01", "B02"}, level
    # a well-level export by plate: each plate's wells are several, so 'mixed'
    plates = export(source, level="well", out=tmp_path / "plates.csv", batch_key="Plate_Barcode")
    table = pd.read_csv(plates.out_path)
    assert table[schema.METADATA_PLATE].tolist() == ["P1", "P2"]
    assert table[schema.METADATA_WELL].tolist() == ["mixed", "mixed"]


def test_an_ingested_store_records_its_batch_columns_for_export(tmp_path: Path) -> None:
    """ingest --batch-columns Plate_Barcode,WellPosition -> baseline -> export's plate/well."""
    from scbd_cells import baseline, ingest

    rng = np.random.default_rng(0)
    (tmp_path / "crops").mkdir()
    rows = []
    for i in range(32):
        np.save(tmp_path / f"crops/c{i}.npy", rng.integers(0, 4000, (2, 12, 12), np.uint16))
        rows.append({"cell_id": f"c{i}", "image_path": f"crops/c{i}.npy",
                     "gene": f"g{i % 4}", "Plate_Barcode": f"BR{i % 2}",
                     "WellPosition": f"A0{i % 4 // 2 + 1}",
                     "Metadata_Site": f"s{i % 3}"})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "cells.csv", index=False)
    store = tmp_path / "store.zarr"
    ingest(tmp_path / "cells.csv", out=store, perturbation_column="gene",
           image_column="image_path", batch_columns=["Plate_Barcode", "WellPosition"],
           channel_names=["dna", "actin"])  # fmt: skip
    profiles = tmp_path / "baseline.h5ad"
    baseline(store, out=profiles, n_components=4)
    recorded = ad.read_h5ad(profiles).uns["scbd"]["label_columns"]
    assert recorded["perturbation"] == "gene"
    assert list(recorded["batch"]) == ["Plate_Barcode", "WellPosition"]
    cell = pd.read_parquet(export(profiles, level="cell", out=tmp_path / "c.parquet").out_path)
    table = pd.DataFrame(rows).set_index("cell_id").loc[cell["Metadata_Cell_ID"]]
    assert cell[schema.METADATA_PLATE].tolist() == table["Plate_Barcode"].tolist()
    assert cell[schema.METADATA_WELL].tolist() == table["WellPosition"].tolist()
    assert cell["Metadata_Site"].tolist() == table["Metadata_Site"].tolist()
