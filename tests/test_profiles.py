"""Guide/gene aggregation against a pandas reference."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scbd_cells.core.errors import DataError
from scbd_cells.profiles.aggregate import aggregate_profiles


def _cells(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    guides = ["A_1", "A_2", "B_1", "B_2", "B_3", "C_1", "nontargeting_0", "nontargeting_1"]
    guide = rng.choice(guides, size=300)
    gene = np.array([g.rsplit("_", 1)[0] for g in guide])
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(gene), "guide": pd.Categorical(guide)},
        index=[str(i) for i in range(300)],
    )
    return ad.AnnData(
        X=rng.normal(size=(300, 5)).astype(np.float32),
        obs=obs,
        obsm={"other": rng.normal(size=(300, 3))},
    )


def test_matches_pandas_reference() -> None:
    cells = _cells()
    profiles = aggregate_profiles(cells, control="nontargeting", chunk_size=37)
    frame = pd.DataFrame(cells.X.astype(np.float64))
    frame["guide"], frame["gene"] = (
        cells.obs["guide"].astype(str).to_numpy(),
        cells.obs["perturbation"].astype(str).to_numpy(),
    )
    guide_means = frame.groupby("guide").mean(numeric_only=True)
    guide_gene = frame.groupby("guide")["gene"].first()
    gene_means = guide_means.groupby(guide_gene).mean()
    centred = gene_means.drop("nontargeting") - gene_means.loc["nontargeting"]
    expected = (centred - centred.mean()) / centred.std(ddof=0)

    genes = profiles.genes
    assert list(genes.obs_names) == ["A", "B", "C"]
    np.testing.assert_allclose(genes.X, expected.to_numpy(), rtol=1e-5, atol=1e-5)
    assert genes.X.dtype == np.float32
    assert genes.obs["n_guides"].tolist() == [2, 3, 1]
    counts = cells.obs["perturbation"].value_counts()
    assert genes.obs["n_cells"].tolist() == [counts["A"], counts["B"], counts["C"]]
    guides = profiles.guides
    assert guides.n_obs == 8 and guides.obs.loc["B_2", "perturbation"] == "B"
    assert guides.obs["n_cells"].sum() == 300
    targeting = guides.obs["perturbation"] != "nontargeting"
    np.testing.assert_allclose(guides.X[targeting.to_numpy()].mean(0), 0, atol=1e-5)


def test_obsm_and_backed(tmp_path) -> None:
    cells = _cells()
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    a = aggregate_profiles(backed, chunk_size=50).genes.X
    b = aggregate_profiles(cells).genes.X
    np.testing.assert_allclose(a, b, rtol=1e-6)
    backed.file.close()
    assert aggregate_profiles(cells, use_rep="other").genes.n_vars == 3


def test_without_guide_column() -> None:
    cells = _cells()
    del cells.obs["guide"]
    genes = aggregate_profiles(cells).genes
    assert genes.obs["n_guides"].tolist() == [1, 1, 1]


def test_control_missing_and_bad_columns() -> None:
    cells = _cells()
    with pytest.raises(DataError, match="control label 'NTC'"):
        aggregate_profiles(cells, control="NTC")
    with pytest.raises(DataError, match="no perturbation column 'gene'"):
        aggregate_profiles(cells, perturbation_key="gene")
    with pytest.raises(DataError, match="no obsm key"):
        aggregate_profiles(cells, use_rep="X_missing")
