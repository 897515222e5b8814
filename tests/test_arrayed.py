"""Arrayed screens: `simulate --layout arrayed`, the well as replicate, relationship files named
neutrally, and NSC/NSCB checked against sklearn's nearest neighbours and a case done by hand."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import NearestNeighbors
from typer.testing import CliRunner

from scbd_cells.cli import app
from scbd_cells.core.errors import DataError, InputError
from scbd_cells.evaluation.complexes import read_complexes
from scbd_cells.evaluation.moa import (
    MoaSettings,
    moa_retrieval,
    nearest_moa_accuracy,
    treatment_profiles,
)
from scbd_cells.sim.screen import ARRAYED_PRESETS, simulate

runner = CliRunner()
CHANNELS = "dna_damage,actin,dna,microtubules"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


# ---------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------


def test_arrayed_screen_is_one_treatment_per_well_with_controls_on_every_plate(
    tmp_path: Path,
) -> None:
    result = simulate(tmp_path / "one", preset="tiny", layout="arrayed", seed=3)
    params = ARRAYED_PRESETS["tiny"]
    table = pd.read_csv(result.cells_path)
    assert list(table.columns) == [
        "cell_id", "image_path", "compound", "concentration", "plate", "well", "batch",
        "tile", "x", "y",
    ]  # fmt: skip
    assert result.n_cells == len(table) == params.n_cells
    wells = table.groupby(["plate", "well"])[["compound", "concentration", "batch"]].nunique()
    assert (wells == 1).all().all(), "a well holds one treatment, on one plate of one batch"
    assert (table.groupby(["plate", "well"]).size() == params.cells_per_well).all()
    per_plate = table.drop_duplicates(["plate", "well"])
    for _plate, wells_of_plate in per_plate.groupby("plate"):
        treated = wells_of_plate[wells_of_plate["compound"] != "DMSO"]
        assert (wells_of_plate["compound"] == "DMSO").sum() == params.control_wells
        assert not treated.duplicated(["compound", "concentration"]).any()
        assert len(treated) == params.n_compounds * len(params.concentrations)
    assert (per_plate.loc[per_plate["compound"] == "DMSO", "concentration"] == 0).all()
    batches = per_plate.drop_duplicates("plate").set_index("plate")["batch"]
    assert batches.to_dict() == {
        "plate1": "batch1", "plate2": "batch1", "plate3": "batch2", "plate4": "batch2",
    }  # fmt: skip
    # the relationship file: GMT, every compound in exactly one mechanism, read neutrally
    relationships = read_complexes(result.complexes_path)
    assert result.complexes_path.name == "moa.gmt"
    assert relationships.format == "gmt" and not relationships.is_corum
    assert relationships.label == "relationships (moa.gmt)"
    members = [c for group in relationships.members for c in group]
    assert sorted(members) == sorted(set(table["compound"]) - {"DMSO"})
    truth = json.loads(result.truth_path.read_text())
    assert truth["layout"] == "arrayed" and truth["control"] == "DMSO"
    for compound, facts in truth["compounds"].items():
        assert compound in relationships.members[relationships.names.index(facts["mechanism"])]

    # seeded: the same seed writes the same bytes, another seed other cells
    again = simulate(tmp_path / "two", preset="tiny", layout="arrayed", seed=3)
    assert _digest(result.out_dir) == _digest(again.out_dir)
    other = simulate(tmp_path / "three", preset="tiny", layout="arrayed", seed=4)
    assert _digest(other.out_dir)["cells.csv"] != _digest(result.out_dir)["cells.csv"]


def test_arrayed_refuses_the_pooled_only_sizes(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--guides-per-gene size a pooled screen"):
        simulate(tmp_path / "s", preset="tiny", layout="arrayed", guides_per_gene=3)
    with pytest.raises(InputError, match="--preview"):
        simulate(tmp_path / "s", preset="tiny", layout="arrayed", preview=True)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------
# NSC / NSCB against independent computations
# ---------------------------------------------------------------------------


def _sklearn_neighbour(values: np.ndarray, query: int, candidates: np.ndarray) -> int:
    """The nearest candidate by cosine distance, from sklearn's brute-force search."""
    positions = np.flatnonzero(candidates)
    if positions.size == 0:
        return -1
    search = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute")
    search.fit(values[positions])
    return int(positions[search.kneighbors(values[[query]], return_distance=False)[0, 0]])


def test_nsc_and_nscb_match_sklearn_nearest_neighbours() -> None:
    rng = np.random.default_rng(7)
    compounds = np.repeat([f"c{i}" for i in range(9)], 4)  # 2 concentrations x 2 batches each
    batches = np.tile(["b1", "b1", "b2", "b2"], 9)
    mechanism = {f"c{i}": {f"moa{i % 3}"} for i in range(9)}
    mechanism["c8"] = {"moa2", "moa0"}  # a compound in two groups: a hit with either
    groups = [frozenset(mechanism[c]) for c in compounds]
    centres = {f"moa{k}": rng.normal(size=12) for k in range(3)}
    batch_shift = {"b1": rng.normal(size=12), "b2": rng.normal(size=12)}
    values = np.stack(
        [
            sum(centres[m] for m in g) + 1.5 * batch_shift[b] + rng.normal(size=12)
            for g, b in zip(groups, batches, strict=True)
        ]
    )
    result = nearest_moa_accuracy(values, compounds=compounds, batches=batches, groups=groups)

    expected = {}
    for name, excluded in (
        ("nsc", compounds[:, None] == compounds[None, :]),
        ("nscb", (compounds[:, None] == compounds[None, :]) | (batches[:, None] == batches)),
    ):
        neighbours = [_sklearn_neighbour(values, i, ~excluded[i]) for i in range(len(values))]
        np.testing.assert_array_equal(result.table[f"{name}_neighbour"], neighbours)
        expected[name] = np.mean([bool(groups[i] & groups[j]) for i, j in enumerate(neighbours)])
    assert result.nsc == pytest.approx(expected["nsc"])
    assert result.nscb == pytest.approx(expected["nscb"])
    assert result.n_queries_nsc == result.n_queries_nscb == len(values)
    assert 0 < result.nscb < result.nsc < 1  # the batch shift lends NSC some of its hits


def test_nsc_and_nscb_by_hand() -> None:
    """Four 2-D profiles where the batch misleads NSC; cosines worked out by hand.

    a (MoA X, batch 1) = (1, 0), b (Y, 1) = (1, 0.1), c (X, 2) = (0.7, 0.7), d (Y, 2) = (0, 1).
    cos(a,b) = 0.995, cos(a,c) = 0.707, cos(a,d) = 0, cos(b,c) = 0.774, cos(b,d) = 0.0995,
    cos(c,d) = 0.707.
    NSC (other compounds): a -> b (miss), b -> a (miss), c -> b (miss), d -> c (0.707 >
    0.0995 > 0, miss): 0 of 4.
    NSCB (other compounds of the other batch): a -> c (hit), b -> c (miss), c -> b (miss),
    d -> b (hit, 0.0995 > 0): 2 of 4.
    """
    values = np.array([[1.0, 0.0], [1.0, 0.1], [0.7, 0.7], [0.0, 1.0]])
    result = nearest_moa_accuracy(
        values,
        compounds=["a", "b", "c", "d"],
        batches=["1", "1", "2", "2"],
        groups=[frozenset("X"), frozenset("Y"), frozenset("X"), frozenset("Y")],
    )
    assert result.table["nsc_neighbour"].tolist() == [1, 0, 1, 2]
    assert result.table["nscb_neighbour"].tolist() == [2, 2, 1, 1]
    assert result.nsc == 0.0
    assert result.nscb == 0.5


def test_a_profile_with_no_candidate_is_not_counted() -> None:
    # one batch only: NSCB has no candidate anywhere (undefined), NSC is defined
    values = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    result = nearest_moa_accuracy(
        values,
        compounds=["a", "b", "c"],
        batches=["1", "1", "1"],
        groups=[frozenset("X"), frozenset("X"), frozenset("Y")],
    )
    assert result.nsc == pytest.approx(2 / 3)  # a -> b hit, b -> a hit, c -> b miss
    assert np.isnan(result.nscb) and result.n_queries_nscb == 0


def _arrayed_cells(seed: int = 0) -> ad.AnnData:
    """A hand-made arrayed screen: 2 batches x 3 plates, 4 compounds x 2 doses, DMSO wells."""
    rng = np.random.default_rng(seed)
    rows = []
    plates = {"p1": "b1", "p2": "b1", "p3": "b1", "p4": "b2", "p5": "b2", "p6": "b2"}
    for plate, batch in plates.items():
        wells = [(c, dose) for c in ("k1", "k2", "k3", "k4") for dose in (1.0, 10.0)]
        wells += [("DMSO", 0.0)] * 3
        # each plate in its own order: a well name (W03) holds other treatments on other plates
        for w, position in enumerate(rng.permutation(len(wells))):
            compound, dose = wells[position]
            for _ in range(int(rng.integers(3, 7))):
                rows.append((compound, dose, plate, f"W{w:02d}", batch))
    obs = pd.DataFrame(rows, columns=["compound", "concentration", "plate", "well", "batch"])
    obs["perturbation"] = obs["compound"]
    x = (
        rng.normal(size=(len(obs), 5))
        + np.where(obs["plate"].isin(["p2", "p4"]), 3.0, 0.0)[:, None]
    )
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return ad.AnnData(X=x.astype(np.float32), obs=obs)


def _pandas_profiles(adata: ad.AnnData, *, standardize: bool) -> pd.DataFrame:
    """Treatment x batch medians of well means, by pandas (optionally plate-control z-scored)."""
    cells = pd.DataFrame(np.asarray(adata.X, dtype=np.float64), index=adata.obs_names)
    obs = adata.obs
    if standardize:
        control = obs["perturbation"] == "DMSO"
        mean = cells[control.to_numpy()].groupby(obs.loc[control, "plate"].to_numpy()).mean()
        std = cells[control.to_numpy()].groupby(obs.loc[control, "plate"].to_numpy()).std(ddof=0)
        cells = (cells - mean.loc[obs["plate"]].to_numpy()) / std.loc[obs["plate"]].to_numpy()
    keys = ["compound", "concentration", "batch", "plate", "well"]
    wells = cells.groupby([obs[k].astype(str).to_numpy() for k in keys]).mean()
    wells.index.names = keys
    wells = wells.reset_index()
    wells = wells[wells["compound"] != "DMSO"]
    return wells.groupby(["compound", "concentration", "batch"])[list(range(5))].median()


@pytest.mark.parametrize("standardize", [False, True])
def test_treatment_profiles_are_medians_of_well_means(standardize: bool) -> None:
    adata = _arrayed_cells()
    adata.obs["plate_well"] = adata.obs["plate"] + "_" + adata.obs["well"]
    profiles = treatment_profiles(
        adata,
        settings=MoaSettings(
            compound_key="compound",
            concentration_key="concentration",
            batch_key="batch",
            replicate_key="plate_well",
            standardize_key="plate" if standardize else None,
            perturbation_key="perturbation",
            control="DMSO",
        ),
    )
    expected = _pandas_profiles(adata, standardize=standardize)
    assert len(profiles.meta) == len(expected) == 16  # 4 compounds x 2 doses x 2 batches
    assert set(profiles.meta["compound"]) == {"k1", "k2", "k3", "k4"}  # no control
    # one well per plate, three plates a batch: a median of three is not their mean
    assert (profiles.meta["n_replicates"] == 3).all()
    got = pd.DataFrame(
        profiles.values,
        index=pd.MultiIndex.from_arrays(
            [
                profiles.meta["compound"],
                profiles.meta["treatment"].str.split("@").str[1],
                profiles.meta["batch"],
            ]
        ),
    )
    np.testing.assert_allclose(
        got.sort_index().to_numpy(), expected.sort_index().to_numpy(), rtol=1e-5, atol=1e-5
    )
    if standardize:  # the plate offset of p2 and p4 is gone: profiles near zero
        assert np.abs(profiles.values.mean()) < 0.5


def test_standardising_needs_controls_on_every_plate() -> None:
    adata = _arrayed_cells()
    adata = adata[~((adata.obs["plate"] == "p3") & (adata.obs["compound"] == "DMSO"))].copy()
    settings = MoaSettings(
        compound_key="compound", batch_key="batch", standardize_key="plate",
        perturbation_key="perturbation", control="DMSO",
    )  # fmt: skip
    with pytest.raises(DataError, match="No negative-control cells.*'p3'"):
        treatment_profiles(adata, settings=settings)


def test_no_compound_in_the_relationship_file_is_refused(tmp_path: Path) -> None:
    gmt = tmp_path / "moa.gmt"
    gmt.write_text("m1\tdescription\tother1\tother2\n")
    settings = MoaSettings(
        compound_key="compound", batch_key="batch", perturbation_key="perturbation",
        control="DMSO",
    )  # fmt: skip
    with pytest.raises(DataError, match="No compound of column 'compound'"):
        moa_retrieval(_arrayed_cells(), relationships=read_complexes(gmt), settings=settings)


def test_relationship_labels(tmp_path: Path, write_corum) -> None:
    corum = read_complexes(write_corum(tmp_path / "allComplexes.txt", {"c": ["a", "b"]}))
    assert corum.is_corum and corum.label == "CORUM"
    two = tmp_path / "targets.tsv"
    two.write_text("EGFR\tcpd1 cpd2\nTUBB\tcpd3;cpd4\n")
    assert read_complexes(two).label == "relationships (targets.tsv)"


# ---------------------------------------------------------------------------
# evaluate: the well as replicate, the report, end to end
# ---------------------------------------------------------------------------


def test_the_well_as_guide_is_refused_with_the_fix(tmp_path: Path) -> None:
    from scbd_cells.evaluation.report import evaluate

    path = tmp_path / "cells.h5ad"
    _arrayed_cells().write_h5ad(path)
    gmt = tmp_path / "moa.gmt"
    gmt.write_text("m1\td\tk1\tk2\nm2\td\tk3\tk4\n")
    with pytest.raises(DataError, match="--replicate-key plate,well"):
        evaluate([path], corum=gmt, out=tmp_path / "report", guide_key="well", control="DMSO")
    with pytest.raises(InputError, match="need --compound-key"):
        evaluate([path], corum=gmt, out=tmp_path / "report", standardize_key="plate")
    assert not (tmp_path / "report").exists()


def _recompute_nsc(cells_path: Path, gmt: Path) -> tuple[float, float, int]:
    """NSC/NSCB from the written AnnData with pandas and sklearn alone."""
    adata = ad.read_h5ad(cells_path)
    obs = adata.obs.astype(str)
    cells = pd.DataFrame(np.asarray(adata.X, dtype=np.float64))
    control = (obs["perturbation"] == "DMSO").to_numpy()
    plate = obs["plate"].to_numpy()
    mean = cells[control].groupby(plate[control]).mean()
    std = cells[control].groupby(plate[control]).std(ddof=0).replace(0, 1)
    cells = (cells - mean.loc[plate].to_numpy()) / std.loc[plate].to_numpy()
    keys = ["compound", "concentration", "batch", "plate", "well"]
    wells = cells.groupby([obs[k].to_numpy() for k in keys]).mean()
    wells.index.names = keys
    wells = wells.reset_index()
    wells = wells[wells["compound"] != "DMSO"]
    profiles = wells.groupby(["compound", "concentration", "batch"])[list(cells.columns)].median()
    moa = {}
    for line in gmt.read_text().splitlines():
        name, _description, *members = line.split("\t")
        for member in members:
            moa[member] = name
    compounds = profiles.index.get_level_values("compound").to_numpy()
    batches = profiles.index.get_level_values("batch").to_numpy()
    values = profiles.to_numpy()
    scores = []
    for same_batch_too in (False, True):
        hits = []
        for i in range(len(values)):
            candidates = compounds != compounds[i]
            if same_batch_too:
                candidates &= batches != batches[i]
            j = _sklearn_neighbour(values, i, candidates)
            hits.append(moa[compounds[i]] == moa[compounds[j]])
        scores.append(float(np.mean(hits)))
    return scores[0], scores[1], len(values)


@pytest.mark.slow
def test_arrayed_screen_end_to_end(tmp_path: Path) -> None:
    """simulate --layout arrayed -> ingest -> baseline -> evaluate --compound-key (the CLI)."""
    from scbd_cells import baseline, ingest

    screen = tmp_path / "screen"
    result = runner.invoke(
        app, ["simulate", str(screen), "--preset", "tiny", "--layout", "arrayed", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "6 compounds in 3 mechanisms" in result.output
    ingest(
        screen / "cells.csv",
        out=tmp_path / "store.zarr",
        perturbation_column="compound",
        batch_columns=["batch"],
        control="DMSO",
        channel_names=CHANNELS.split(","),
        workers=1,
    )
    baseline(tmp_path / "store.zarr", out=tmp_path / "baseline.h5ad")
    report = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "evaluate", str(tmp_path / "baseline.h5ad"), "--corum", str(screen / "moa.gmt"),
            "--out", str(report), "--replicate-key", "plate,well", "--compound-key", "compound",
            "--concentration-key", "concentration", "--standardize-key", "plate",
            "--null-size", "100", "--mixing-cells", "500", "--no-umap",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((report / "metrics.json").read_text())
    entry = metrics["embeddings"]["baseline"]
    for key in ("nsc", "nscb"):
        assert entry[key] is not None and 0.0 <= entry[key] <= 1.0, (key, entry[key])
    nsc, nscb, n_profiles = _recompute_nsc(tmp_path / "baseline.h5ad", screen / "moa.gmt")
    assert entry["nsc"] == pytest.approx(nsc)
    assert entry["nscb"] == pytest.approx(nscb)
    assert entry["n_moa_profiles"] == n_profiles == 6 * 2 * 2  # compound x dose x batch
    assert entry["n_genes"] == 6  # compound profiles from well replicates, for the AUPRC
    assert entry["n_replicates"] == 4 * (6 * 2 + 4)  # mAP's replicates: every well of 4 plates
    settings = metrics["settings"]
    assert settings["relationships"] == "relationships (moa.gmt)"
    assert settings["moa"]["standardize_key"] == "plate"
    assert settings["moa"]["replicate_key"] == "plate,well"
    text = (report / "report.md").read_text()
    assert "relationships (moa.gmt) AUPRC" in text and "CORUM AUPRC" not in text
    assert "## Mechanism of action: NSC / NSCB" in text
    assert "NSC ↑" in (report / "report.html").read_text()
