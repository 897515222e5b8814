"""mAP: replicate profiles, phenotypic activity and consistency against sklearn and copairs.

sklearn's ``average_precision_score`` on a hand-built rank list is the independent check of
the retrieval protocol (which pairs are positives and negatives); copairs run directly as
its documentation shows is the check of the per-group table and the p-values.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scbd_cells.data import schema
from scbd_cells.evaluation.complexes import Complexes
from scbd_cells.evaluation.map import (
    phenotypic_activity,
    phenotypic_consistency,
    replicate_profiles,
)

CONTROL = "nontargeting"


def _cells(seed: int = 0, *, well: float = 0.3) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(8)] + [CONTROL]
    rows = []
    for gene in genes:
        guides = 4 if gene == CONTROL else 2
        for g in range(guides):
            for w in range(4):
                for _ in range(int(rng.integers(2, 5))):
                    rows.append((gene, f"{gene}_{g}", f"P1_w{w}"))
    obs = pd.DataFrame(rows, columns=["perturbation", "guide", "batch"])
    effect = {g: (rng.normal(size=10) if g in ("g0", "g1", "g2") else np.zeros(10)) for g in genes}
    shift = {b: rng.normal(size=10) for b in obs["batch"].unique()}
    x = rng.normal(size=(len(obs), 10))
    x += 2 * np.stack([effect[g] for g in obs["perturbation"]])
    x += well * np.stack([shift[b] for b in obs["batch"]])
    for column in obs:
        obs[column] = pd.Categorical(obs[column])
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(X=x.astype(np.float32), obs=obs)


def test_replicate_profiles_are_centred_guide_well_means() -> None:
    cells = _cells()
    replicates = replicate_profiles(cells, control=CONTROL, max_replicates=None, seed=0)
    frame = pd.DataFrame(cells.X.astype(np.float64)).assign(
        guide=cells.obs["guide"].astype(str).to_numpy(),
        batch=cells.obs["batch"].astype(str).to_numpy(),
        gene=cells.obs["perturbation"].astype(str).to_numpy(),
    )
    means = frame.groupby(["gene", "guide", "batch"], sort=True).mean()
    expected = means.to_numpy() - means.loc[CONTROL].to_numpy().mean(axis=0)
    expected /= expected.std(axis=0)
    np.testing.assert_allclose(replicates.values, expected, rtol=1e-5, atol=1e-5)
    assert list(replicates.meta[schema.METADATA_GUIDE]) == [k[1] for k in means.index]
    assert replicates.meta[schema.METADATA_PERTURBATION].map(type).eq(str).all()
    capped = replicate_profiles(cells, control=CONTROL, max_replicates=3, seed=0)
    per_gene = capped.meta.groupby(schema.METADATA_PERTURBATION).size()
    assert per_gene.drop(CONTROL).max() == 3
    assert capped.meta[capped.meta[schema.METADATA_PERTURBATION] == CONTROL].groupby(
        schema.METADATA_BATCH
    ).size().max() == 3


def test_activity_protocol_equals_sklearn_average_precision() -> None:
    """A replicate ranks its gene's replicates of other wells against its well's controls."""
    from sklearn.metrics import average_precision_score

    replicates = replicate_profiles(_cells(), control=CONTROL, max_replicates=None, seed=0)
    result = phenotypic_activity(replicates, control=CONTROL, null_size=200, seed=0)
    meta, values = replicates.meta, replicates.values.astype(np.float64)
    unit = values / np.linalg.norm(values, axis=1, keepdims=True)
    expected = {}
    for gene in sorted(set(meta[schema.METADATA_PERTURBATION]) - {CONTROL}):
        scores = []
        for i in np.flatnonzero(meta[schema.METADATA_PERTURBATION] == gene):
            well = meta[schema.METADATA_BATCH][i]
            positive = (meta[schema.METADATA_PERTURBATION] == gene) & (
                meta[schema.METADATA_BATCH] != well
            )
            negative = (meta[schema.METADATA_PERTURBATION] == CONTROL) & (
                meta[schema.METADATA_BATCH] == well
            )
            rows = np.flatnonzero(positive | negative)
            scores.append(average_precision_score(positive[rows], unit[rows] @ unit[i]))
        expected[gene] = np.mean(scores)
    got = result.table.set_index(schema.METADATA_PERTURBATION)["mean_average_precision"]
    for gene, value in expected.items():
        assert got[gene] == pytest.approx(value, abs=1e-6), gene
    assert result.mean_map == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
    # the three genes with an effect are the active ones
    active = set(result.table.loc[result.table["retrieved"], schema.METADATA_PERTURBATION])
    assert {"g0", "g1", "g2"} <= active


def test_activity_equals_copairs_run_directly() -> None:
    from copairs import map as copairs_map

    replicates = replicate_profiles(_cells(1), control=CONTROL, max_replicates=None, seed=0)
    result = phenotypic_activity(replicates, control=CONTROL, null_size=500, seed=3)
    meta = replicates.meta.copy()
    meta["Metadata_Reference_Index"] = np.where(
        meta[schema.METADATA_PERTURBATION] == CONTROL, np.arange(len(meta)), -1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ap = copairs_map.average_precision(
            meta, replicates.values,
            pos_sameby=[schema.METADATA_PERTURBATION, "Metadata_Reference_Index"],
            pos_diffby=[schema.METADATA_BATCH], neg_sameby=[schema.METADATA_BATCH],
            neg_diffby=[schema.METADATA_PERTURBATION, "Metadata_Reference_Index"],
            progress_bar=False,
        )
        ap = ap.query(f"{schema.METADATA_PERTURBATION} != '{CONTROL}'")
        table = copairs_map.mean_average_precision(
            ap, [schema.METADATA_PERTURBATION], null_size=500, threshold=0.05, seed=3,
            progress_bar=False,
        )
    table = table.set_index(schema.METADATA_PERTURBATION).sort_index()
    ours = result.table.set_index(schema.METADATA_PERTURBATION)
    np.testing.assert_allclose(ours["mean_average_precision"], table["mean_average_precision"])
    np.testing.assert_allclose(ours["corrected_p_value"], table["corrected_p_value"])
    assert result.fraction_retrieved == pytest.approx(table["below_corrected_p"].mean())


def test_consistency_equals_sklearn_and_multilabel_path() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(12)]
    names = ("cA", "cB", "cC")
    members = (frozenset(genes[0:4]), frozenset(genes[4:7]), frozenset(genes[7:10]))
    complexes = Complexes(names=names, members=members, format="two_column", path="x")
    shared = {name: rng.normal(size=8) for name in names}
    profiles = rng.normal(size=(12, 8))
    for name, group in zip(names, members, strict=True):
        for gene in group:
            profiles[genes.index(gene)] += 1.5 * shared[name]
    result = phenotypic_consistency(profiles, genes, complexes, null_size=300, seed=0)
    kept = genes[:10]
    label = {g: n for n, group in zip(names, members, strict=True) for g in group}
    unit = profiles[:10] / np.linalg.norm(profiles[:10], axis=1, keepdims=True)
    for name in names:
        scores = []
        for i, gene in enumerate(kept):
            if label[gene] != name:
                continue
            others = [j for j in range(10) if j != i]
            truth = np.array([label[kept[j]] == name for j in others])
            scores.append(average_precision_score(truth, unit[others] @ unit[i]))
        got = result.table.set_index(schema.METADATA_COMPLEX).loc[name, "mean_average_precision"]
        assert got == pytest.approx(np.mean(scores), abs=1e-6)
    # a gene in two complexes takes copairs' multilabel path: still one row per complex
    overlapping = Complexes(
        names=(*names, "cD"), members=(*members, frozenset({"g0", "g10", "g11"})),
        format="two_column", path="x",
    )
    multi = phenotypic_consistency(profiles, genes, overlapping, null_size=300, seed=0)
    assert list(multi.table[schema.METADATA_COMPLEX]) == ["cA", "cB", "cC", "cD"]
