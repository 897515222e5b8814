"""correct: each method against its reference, the output evaluate reads, and bad inputs."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scbd_cells import correct
from scbd_cells.errors import DataError, InputError
from scbd_cells.evaluation.mixing import batch_mixing


def _profiles(path: Path, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = 600
    genes = np.array([f"g{i}" for i in range(5)] + ["nontargeting"])[rng.integers(0, 6, n)]
    batch = np.array(["P1_A01", "P1_A02", "P2_A01"])[rng.integers(0, 3, n)]
    shift = {b: rng.normal(scale=2.0, size=8) for b in np.unique(batch)}
    x = rng.normal(size=(n, 8)) + np.stack([shift[b] for b in batch])
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(genes), "batch": pd.Categorical(batch)},
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs)
    adata.uns["scbd"] = {"kind": "baseline", "control": "nontargeting"}
    adata.write_h5ad(path)
    return path


def test_sphering_equals_pycytominer_zca(tmp_path: Path, pycytominer) -> None:
    Spherize = pycytominer.operations.Spherize
    source = _profiles(tmp_path / "cells.h5ad")
    correct(source, method="sphering", out=tmp_path / "sphered.h5ad")
    cells = ad.read_h5ad(source)
    controls = pd.DataFrame(cells.X[cells.obs["perturbation"] == "nontargeting"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        spherer = Spherize(method="ZCA", epsilon=1e-6, center=True).fit(controls)
        expected = spherer.transform(pd.DataFrame(cells.X)).to_numpy()
    got = ad.read_h5ad(tmp_path / "sphered.h5ad").X
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_center_scale_combat_harmony(tmp_path: Path) -> None:
    import harmonypy
    import scanpy as sc

    source = _profiles(tmp_path / "cells.h5ad")
    cells = ad.read_h5ad(source)
    batches = cells.obs["batch"].astype(str).to_numpy()
    result = correct(source, method="center-scale", out=tmp_path / "cs.h5ad")
    got = ad.read_h5ad(tmp_path / "cs.h5ad")
    for batch in np.unique(batches):
        block = got.X[batches == batch]
        np.testing.assert_allclose(block.mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(block.std(axis=0), 1, atol=1e-4)
    assert result.n_batches == 3
    assert got.uns["scbd"]["method"] == "center-scale" and got.uns["scbd"]["control"]
    pd.testing.assert_frame_equal(got.obs, cells.obs)

    correct(source, method="combat", out=tmp_path / "combat.h5ad")
    reference = ad.AnnData(X=cells.X.astype(np.float64), obs=cells.obs.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.combat(reference, key="batch")
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "combat.h5ad").X, reference.X, atol=1e-4)

    correct(source, method="harmony", out=tmp_path / "harmony.h5ad", seed=0)
    expected = harmonypy.run_harmony(
        cells.X.astype(np.float64), pd.DataFrame({"batch": batches}), ["batch"],
        random_state=0, verbose=False,
    ).Z_corr
    expected = expected.T if expected.shape[0] != cells.n_obs else expected
    harmonised = ad.read_h5ad(tmp_path / "harmony.h5ad").X
    np.testing.assert_allclose(harmonised, expected, atol=1e-4)
    labels = cells.obs["perturbation"].astype(str).to_numpy()
    before = batch_mixing(cells.X, batches, labels)
    after = batch_mixing(harmonised, batches, labels)
    assert after.ilisi > before.ilisi + 0.3  # the wells mix after Harmony


def test_correct_bad_inputs(tmp_path: Path) -> None:
    source = _profiles(tmp_path / "cells.h5ad")
    with pytest.raises(InputError, match="--method"):
        correct(source, method="scvi", out=tmp_path / "x.h5ad")
    with pytest.raises(InputError, match="is an input of this command"):
        correct(source, method="combat", out=source, overwrite=True)
    with pytest.raises(DataError, match="batch column"):
        correct(source, method="combat", out=tmp_path / "x.h5ad", batch_key="plate")
    (tmp_path / "taken.h5ad").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        correct(source, method="combat", out=tmp_path / "taken.h5ad")
    assert (tmp_path / "taken.h5ad").read_text() == "mine"
    result = subprocess.run(
        [sys.executable, "-m", "scbd_cells", "correct", str(source), "--method", "nope",
         "--out", str(tmp_path / "y.h5ad")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'--method'" in result.stderr and "'harmony'" in result.stderr  # the choices named
