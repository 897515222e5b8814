"""Profiles in: pycytominer tables through correct, evaluate and export, as AnnData goes.

The tables are written by pycytominer itself (``normalize(..., output_file=...)``), and
each command's result on a table is checked against an independent computation: pandas
for the per-batch standardisation, ``evaluate`` on an AnnData built by hand from the same
numbers, pycytominer's ``aggregate`` for the exported well profiles.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scbd_cells.cli import main
from scbd_cells.core.errors import DataError, InputError
from scbd_cells.profiles.profile_tables import profile_feature_columns, read_profile_table

CONTROL = "nontargeting"
COMPLEXES = {"cA": ["g0", "g1", "g2"], "cB": ["g3", "g4", "g5"]}
PLATES = ("0001", "0002")  # leading zeros: a CSV must give them back as text
WELLS = ("A01", "A02", "B01")
FEATURES = [
    "Cells_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA", "Nuclei_AreaShape_Area",
    "Nuclei_Texture_Contrast_DNA_3", "Cytoplasm_Intensity_MeanIntensity_Actin",
    "Cytoplasm_Granularity_2_Mito",
]  # fmt: skip


def _single_cells(seed: int = 0) -> pd.DataFrame:
    """A CellProfiler-style single-cell table: genes in complexes, guides, wells with offsets."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(7)] + [CONTROL]
    effect = {g: rng.normal(size=len(FEATURES)) for g in genes}
    for members in COMPLEXES.values():
        shared = rng.normal(size=len(FEATURES))
        for gene in members:
            effect[gene] = effect[gene] + 2 * shared
    effect[CONTROL] = np.zeros(len(FEATURES))
    offset = {(p, w): 2 * rng.normal(size=len(FEATURES)) for p in PLATES for w in WELLS}
    rows, values = [], []
    for plate in PLATES:
        for well in WELLS:
            for gene in genes:
                for guide in range(2):
                    for cell in range(6):
                        rows.append((plate, well, gene, f"{gene}_{guide}", cell + 1))
                        values.append(effect[gene] + offset[plate, well])
    frame = pd.DataFrame(
        rows,
        columns=["Metadata_Plate", "Metadata_Well", "Metadata_Gene", "Metadata_sgRNA",
                 "Metadata_ObjectNumber"],
    )  # fmt: skip
    features = np.stack(values) + rng.normal(size=(len(rows), len(FEATURES)))
    return pd.concat([frame, pd.DataFrame(100 + 10 * features, columns=FEATURES)], axis=1)


def _pycytominer_tables(folder: Path, pycytominer) -> tuple[Path, Path]:
    """The single cells normalised by pycytominer and written by it as Parquet and CSV."""
    cells = _single_cells()
    paths = folder / "profiles.parquet", folder / "profiles.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for path, output_type in zip(paths, ("parquet", "csv"), strict=True):
            pycytominer.normalize(
                cells, features="infer", meta_features="infer", samples="all",
                method="standardize", output_file=str(path), output_type=output_type,
            )  # fmt: skip
    return paths


def _cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Run ``scbd-cells -q ARGS`` in this process through the real entry point."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["scbd-cells", "-q", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_features_as_pycytominer_infers_them(tmp_path: Path, pycytominer) -> None:
    from pycytominer.cyto_utils import infer_cp_features

    cells = _single_cells()
    cells["Image_Count_Cells"] = 3  # numeric, but no compartment: not a feature
    cells["ImageNumber"] = 1
    cells["Metadata_Concentration"] = 0.5
    assert profile_feature_columns(cells) == infer_cp_features(cells) == FEATURES
    # no CellProfiler compartment (DeepProfiler, an embedding): every numeric non-Metadata_
    embedding = cells[["Metadata_Plate", "Metadata_Gene"]].assign(
        efficientnet_0=1.0, efficientnet_1=2.0, Label="x"
    )
    assert profile_feature_columns(embedding) == ["efficientnet_0", "efficientnet_1"]

    parquet, csv = _pycytominer_tables(tmp_path, pycytominer)
    written = pd.read_parquet(parquet)
    for path in (parquet, csv):
        adata = read_profile_table(path)
        assert list(adata.var_names) == FEATURES
        np.testing.assert_allclose(adata.X, written[FEATURES].to_numpy(), rtol=1e-6)
        assert list(adata.obs.columns) == [c for c in written.columns if c not in FEATURES]
        assert set(adata.obs["Metadata_Plate"]) == set(PLATES)  # "0001", not 1
        assert adata.uns["scbd"]["kind"] == "profile_table"
    # pycytominer's own writer gzips a CSV by default
    gzipped = pycytominer.cyto_utils.output(written, str(tmp_path / "profiles.csv.gz"))
    assert Path(gzipped).read_bytes()[:2] == b"\x1f\x8b"
    adata = read_profile_table(gzipped)
    np.testing.assert_allclose(adata.X, written[FEATURES].to_numpy(), rtol=1e-6)
    assert set(adata.obs["Metadata_Plate"]) == set(PLATES)


def test_correct_evaluate_export_through_the_cli(
    tmp_path: Path, pycytominer, write_corum, capsys: pytest.CaptureFixture
) -> None:
    parquet, csv = _pycytominer_tables(tmp_path, pycytominer)
    table = pd.read_parquet(parquet)
    batch = table["Metadata_Plate"] + "_" + table["Metadata_Well"]
    by_batch = table.groupby(batch)[FEATURES]
    expected = (table[FEATURES] - by_batch.transform("mean")) / by_batch.transform("std", ddof=0)

    # correct: a table in, an AnnData out, and a table (the lab's own, corrected) out
    keys = ["--batch-key", "Metadata_Plate,Metadata_Well"]
    code, output = _cli(capsys, "correct", parquet, "--method", "center-scale", *keys,
                     "--out", tmp_path / "corrected.h5ad")  # fmt: skip
    assert code == 0, output
    corrected = ad.read_h5ad(tmp_path / "corrected.h5ad")
    assert list(corrected.var_names) == FEATURES
    np.testing.assert_allclose(corrected.X, expected.to_numpy(), atol=1e-4)
    assert corrected.obs["Metadata_Gene"].astype(str).tolist() == table["Metadata_Gene"].tolist()
    code, output = _cli(capsys, "correct", csv, "--method", "center-scale", *keys,
                     "--out", tmp_path / "corrected.csv")  # fmt: skip
    assert code == 0, output
    back = pd.read_csv(tmp_path / "corrected.csv", dtype={"Metadata_Plate": str})
    assert list(back.columns) == list(table.columns)
    pd.testing.assert_frame_equal(back.drop(columns=FEATURES), table.drop(columns=FEATURES))
    np.testing.assert_allclose(back[FEATURES], expected, atol=1e-4)
    assert set(pd.read_csv(tmp_path / "corrected.csv")["Metadata_Plate"]) == {1, 2}  # as text
    assert "0001" in (tmp_path / "corrected.csv").read_text()

    # evaluate: the table and the corrected file, equal to evaluate on a hand-built AnnData
    corum = write_corum(tmp_path / "complexes.txt", COMPLEXES)
    label_keys = ["--perturbation-key", "Metadata_Gene", "--guide-key", "Metadata_sgRNA",
                  *keys, "--control", CONTROL]  # fmt: skip
    fast = ["--no-umap", "--null-size", "50", "--mixing-cells", "300", "--max-replicates", "4"]
    by_hand = ad.AnnData(
        X=table[FEATURES].to_numpy(np.float32),
        obs=table[["Metadata_Plate", "Metadata_Well", "Metadata_Gene", "Metadata_sgRNA"]]
        .astype("category").set_axis([str(i) for i in range(len(table))]),
    )
    by_hand.write_h5ad(tmp_path / "by_hand.h5ad")
    files = [parquet, tmp_path / "by_hand.h5ad", tmp_path / "corrected.h5ad"]
    code, output = _cli(capsys, "evaluate", *files, "--corum", corum, *label_keys, *fast,
                        "--out", tmp_path / "report")  # fmt: skip
    assert code == 0, output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["embeddings"]
    assert set(metrics) == {"profiles", "by_hand", "corrected"}
    for name in ("corum_auprc", "well_f1", "map_activity", "n_genes", "n_cells"):
        assert metrics["profiles"][name] == pytest.approx(metrics["by_hand"][name]), name
    assert metrics["profiles"]["n_cells"] == len(table)
    assert metrics["corrected"]["well_f1"] < metrics["profiles"]["well_f1"]

    # export: the corrected file and the table itself, read back by pycytominer
    code, output = _cli(capsys, "export", tmp_path / "corrected.h5ad", "--level", "well", *keys,
                     "--perturbation-key", "Metadata_Gene", "--guide-key", "Metadata_sgRNA",
                     "--out", tmp_path / "wells.parquet")  # fmt: skip
    assert code == 0, output
    wells = pd.read_parquet(tmp_path / "wells.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        aggregated = pycytominer.aggregate(
            back, strata=["Metadata_Plate", "Metadata_Well"], features=FEATURES,
            operation="mean",
        )  # fmt: skip
    ours = wells.set_index(["Metadata_Plate", "Metadata_Well"]).sort_index()
    theirs = aggregated.set_index(["Metadata_Plate", "Metadata_Well"]).sort_index()
    assert list(ours.index) == list(theirs.index)
    np.testing.assert_allclose(ours[FEATURES], theirs[FEATURES], atol=1e-4)
    code, output = _cli(capsys, "export", csv, "--level", "cell", *keys, "--perturbation-key",
                     "Metadata_Gene", "--out", tmp_path / "cells.parquet")  # fmt: skip
    assert code == 0, output
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    assert not cells.columns.duplicated().any()
    assert cells["Metadata_Plate"].tolist() == table["Metadata_Plate"].tolist()
    assert cells["Metadata_Perturbation"].tolist() == table["Metadata_Gene"].tolist()
    assert cells["Metadata_ObjectNumber"].tolist() == table["Metadata_ObjectNumber"].tolist()
    np.testing.assert_allclose(cells[FEATURES], table[FEATURES], rtol=1e-6)


def test_a_missing_key_names_the_close_column(
    tmp_path: Path, pycytominer, write_corum, capsys: pytest.CaptureFixture
) -> None:
    parquet, _ = _pycytominer_tables(tmp_path, pycytominer)
    corum = write_corum(tmp_path / "complexes.txt", COMPLEXES)
    commands = {
        "correct": ["correct", parquet, "--method", "combat", "--out", tmp_path / "c.h5ad"],
        "evaluate": ["evaluate", parquet, "--corum", corum, "--out", tmp_path / "report",
                     "--perturbation-key", "Metadata_Gene"],
        "export": ["export", parquet, "--level", "well", "--out", tmp_path / "w.parquet"],
    }  # fmt: skip
    for name, command in commands.items():
        code, output = _cli(capsys, *command, "--batch-key", "Metadata_Plat")
        assert code == 1, (name, output)
        assert "no column 'Metadata_Plat' for --batch-key" in output, name
        assert "Did you mean 'Metadata_Plate'" in output, name
        assert "Traceback" not in output
        code, output = _cli(capsys, *command)  # the default key 'batch': columns are named
        assert code == 1, (name, output)
        assert "no column 'batch' for --batch-key" in output, name
        assert "Metadata_Well" in output, name
    code, output = _cli(capsys, "export", parquet, "--level", "cell", "--batch-key",
                        "Metadata_Well", "--perturbation-key", "Metadata_Gen",
                        "--out", tmp_path / "x.parquet")  # fmt: skip
    assert code == 1 and "Did you mean 'Metadata_Gene'" in output
    assert not list(tmp_path.glob("*.h5ad")) and not (tmp_path / "report").exists()


def test_bad_tables_and_outputs(
    tmp_path: Path, pycytominer, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    parquet, _ = _pycytominer_tables(tmp_path, pycytominer)
    with pytest.raises(InputError, match="does not exist"):
        read_profile_table(tmp_path / "missing.parquet")
    metadata_only = tmp_path / "metadata.csv"
    pd.DataFrame({"Metadata_Plate": ["P1"], "Metadata_Well": ["A01"]}).to_csv(
        metadata_only, index=False
    )
    with pytest.raises(DataError, match="no feature column"):
        read_profile_table(metadata_only)
    empty = tmp_path / "empty.csv"
    empty.write_text("Metadata_Plate,Cells_AreaShape_Area\n")
    with pytest.raises(DataError, match="no rows"):
        read_profile_table(empty)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="Could not read"):
        read_profile_table(broken)

    # NaN features: the reader names them, the commands refuse them
    holes = pd.read_parquet(parquet)
    holes.loc[3, "Nuclei_AreaShape_Area"] = np.nan
    holes.to_parquet(tmp_path / "holes.parquet")
    with caplog.at_level(logging.WARNING, logger="scbd_cells.profiles.profile_tables"):
        read_profile_table(tmp_path / "holes.parquet")
    assert "Nuclei_AreaShape_Area" in caplog.text and "drop_na_columns" in caplog.text
    code, output = _cli(capsys, "correct", tmp_path / "holes.parquet", "--method", "combat",
                        "--batch-key", "Metadata_Well", "--out", tmp_path / "h.h5ad")
    assert code == 1 and "NaN" in output and not (tmp_path / "h.h5ad").exists()

    # correct writes a table only from a table, and never over a lab's own table
    ad.AnnData(X=np.zeros((4, 2), np.float32)).write_h5ad(tmp_path / "cells.h5ad")
    code, output = _cli(capsys, "correct", tmp_path / "cells.h5ad", "--method", "center-scale",
                     "--out", tmp_path / "out.parquet")  # fmt: skip
    assert code == 2 and "scbd-cells export" in output
    lab = tmp_path / "lab.csv"
    lab.write_text("mine\n")
    code, output = _cli(capsys, "correct", parquet, "--method", "center-scale", "--batch-key",
                     "Metadata_Well", "--out", lab, "--overwrite")  # fmt: skip
    assert code == 2 and "not a profile table" in output
    assert lab.read_text() == "mine\n"
    code, output = _cli(capsys, "correct", parquet, "--method", "center-scale", "--batch-key",
                        "Metadata_Well", "--out", tmp_path / "ours.csv.gz")  # fmt: skip
    assert code == 0, output
    assert (tmp_path / "ours.csv.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert len(read_profile_table(tmp_path / "ours.csv.gz").var_names) == len(FEATURES)
    for attempt in ("first", "again"):
        code, output = _cli(capsys, "correct", parquet, "--method", "center-scale", "--batch-key",
                         "Metadata_Well", "--out", tmp_path / "ours.parquet", "--overwrite")
        assert code == 0, (attempt, output)
    code, output = _cli(capsys, "correct", parquet, "--method", "center-scale", "--batch-key",
                     "Metadata_Well", "--out", tmp_path / "ours.parquet")  # fmt: skip
    assert code == 2 and "--overwrite" in output


def test_an_exported_table_read_back_by_export(tmp_path: Path, pycytominer, caplog) -> None:
    """scbd-cells' own guide x well export, exported again per gene: one column per name."""
    from scbd_cells import export

    parquet, _ = _pycytominer_tables(tmp_path, pycytominer)
    export(parquet, level="guide", out=tmp_path / "guides.parquet",
           batch_key="Metadata_Plate,Metadata_Well", perturbation_key="Metadata_Gene",
           guide_key="Metadata_sgRNA")  # fmt: skip
    guides = pd.read_parquet(tmp_path / "guides.parquet")
    with caplog.at_level(logging.WARNING, logger="scbd_cells.profiles.exports"):
        export(tmp_path / "guides.parquet", level="gene", out=tmp_path / "genes.parquet",
               batch_key="Metadata_Batch", perturbation_key="Metadata_Perturbation",
               guide_key="Metadata_Guide")  # fmt: skip
    genes = pd.read_parquet(tmp_path / "genes.parquet")
    assert not genes.columns.duplicated().any()
    assert "Metadata_Batch" not in caplog.text  # named by a key: replaced, same values
    assert "Metadata_n_cells" in caplog.text  # export counts the rows it averages itself
    assert (genes["Metadata_Gene"] == genes["Metadata_Perturbation"]).all()
    assert genes["Metadata_n_cells"].eq(2).all()  # two guide rows per gene x well
    expected = guides.groupby(["Metadata_Batch", "Metadata_Perturbation"])[FEATURES].mean()
    got = genes.set_index(["Metadata_Batch", "Metadata_Perturbation"])[FEATURES]
    np.testing.assert_allclose(got.loc[expected.index], expected, rtol=1e-5)
