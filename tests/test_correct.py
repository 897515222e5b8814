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
from scbd_cells.core.errors import DataError, InputError
from scbd_cells.evaluation.mixing import batch_mixing
from scbd_cells.profiles.corrections import (
    HarmonyReference,
    harmony,
    harmony_fit,
    harmony_map,
    read_harmony_reference,
)


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


def _screen(seed: int, *, n: int = 1200, batches: tuple[str, ...] = ("P1_A01", "P1_A02", "P2_A01")):
    """Profiles of four cell states, each batch shifted by its own offset (Harmony's case)."""
    rng = np.random.default_rng(seed)
    states = rng.integers(0, 4, n)
    centres = rng.normal(0, 4, (4, 8))
    labels = np.array(batches)[rng.integers(0, len(batches), n)]
    shift = {b: rng.normal(scale=1.5, size=8) for b in batches}
    values = centres[states] + rng.normal(size=(n, 8)) + np.stack([shift[b] for b in labels])
    return values, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_harmony_map_of_the_reference_cells_reproduces_harmonypy(seed: int) -> None:
    """The reference's own cells mapped onto it land where harmonypy put them: to within 6 %
    of the correction's size (Frobenius) with harmonypy's own ridge rule, 12 % with
    Symphony's lambda = 1 (the default). Not to float precision: the mapping assigns cells
    to the final corrected centroids from their *uncorrected* positions, while Harmony's
    last regression used assignments from the previous round's corrected positions
    (measured 0.2-4.8 % on these seeds with harmonypy's rule). With lambda = 1 the batch
    offsets are removed almost fully, where harmonypy's rule leaves alpha / (1 + alpha)
    = 1/6 of them: the mapped cells are corrected a little further than Harmony did
    (measured 8.6-10.1 %)."""
    import harmonypy

    values, batches = _screen(seed)
    expected = harmonypy.run_harmony(
        values, pd.DataFrame({"batch": batches}), ["batch"], random_state=0, verbose=False
    ).Z_corr
    expected = expected.T if expected.shape[0] != len(values) else expected
    fit = harmony_fit(values, batches, seed=0)
    np.testing.assert_array_equal(fit.corrected, expected)
    correction = np.linalg.norm(values - expected)
    own_rule = harmony_map(fit.reference, values, batches=batches, ridge_lambda=None)
    assert np.linalg.norm(own_rule - expected) <= 0.06 * correction
    mapped = harmony_map(fit.reference, values, batches=batches)
    assert np.linalg.norm(mapped - expected) <= 0.12 * correction
    assert fit.reference.n_cells == len(values) and set(fit.reference.batches) == set(batches)
    np.testing.assert_allclose(np.linalg.norm(fit.reference.centroids, axis=1), 1.0)
    np.testing.assert_allclose(fit.reference.cluster_sizes.sum(), len(values))


def _hand_reference(sizes: np.ndarray, means: np.ndarray) -> HarmonyReference:
    """A reference of well-separated clusters (means along distinct axes), built by hand."""
    return HarmonyReference(
        centroids=means / np.linalg.norm(means, axis=1, keepdims=True),
        cluster_sizes=sizes.astype(float),
        cluster_sums=sizes[:, None] * means,
        sigma=np.full(len(sizes), 0.1),
        ridge_alpha=0.2,
        batches=("ref",),
        n_cells=int(sizes.sum()),
        space={},
    )


def test_harmony_map_removes_a_constant_offset() -> None:
    """Each query batch is moved onto the reference's corrected cluster mean: a pure constant
    offset per batch is removed exactly without a ridge penalty, and otherwise by the
    closed-form share n N / (n lambda + N n + N lambda) (one batch, n query cells and N
    reference cells in the cluster; worked out by hand from the normal equations of the
    anchored ridge regression): 0.99 of it with Symphony's lambda = 1, less with
    harmonypy's lambda = alpha n."""
    rng = np.random.default_rng(0)
    n_per_cluster, dims = 150, 6
    means = 4.0 * np.eye(3, dims)  # three clusters along axes 0, 1, 2
    reference = _hand_reference(np.array([150, 300, 600]), means)
    noise = rng.normal(scale=0.3, size=(3, n_per_cluster, dims))
    for half in (slice(0, None, 2), slice(1, None, 2)):  # each batch's cells of each cluster
        noise[:, half] -= noise[:, half].mean(axis=1, keepdims=True)  # centred on its mean
    cells = (means[:, None, :] + noise).reshape(-1, dims)
    offsets = {
        "Q_A01": np.array([0, 0, 0, 0.6, -0.4, 0.2]),
        "Q_A02": np.array([0, 0, 0, -0.3, 0.5, 0.1]),
    }
    batches = np.tile(["Q_A01", "Q_A02"], len(cells) // 2)
    shifted = cells + np.stack([offsets[b] for b in batches])

    unpenalised = harmony_map(reference, shifted, batches=batches, ridge_lambda=0.0)
    np.testing.assert_allclose(unpenalised, cells, atol=1e-6)

    one = batches == "Q_A01"
    cluster = np.repeat(np.arange(3), n_per_cluster)[one]
    for ridge_lambda in (1.0, None):
        mapped = harmony_map(reference, shifted[one], batches=batches[one],
                             ridge_lambda=ridge_lambda)  # fmt: skip
        for k in range(3):
            n, big_n = (cluster == k).sum(), reference.cluster_sizes[k]
            penalty = 0.2 * n if ridge_lambda is None else ridge_lambda
            removed = n * big_n / (n * penalty + big_n * n + big_n * penalty)
            assert removed > (0.75 if ridge_lambda is None else 0.98)
            expected = shifted[one][cluster == k] - removed * (
                shifted[one][cluster == k].mean(axis=0) - means[k]
            )
            np.testing.assert_allclose(mapped[cluster == k], expected, atol=1e-6)


def _reference_and_plates(tmp_path: Path) -> dict[str, Path]:
    """Training plates P1, P2 and two new plates P3, P4 (their own well offsets), as files."""
    wells = ("P1_A01", "P1_A02", "P2_A01", "P2_A02", "P3_A01", "P3_A02", "P4_A01")
    values, batches = _screen(0, n=2100, batches=wells)
    plates = np.array([b[:2] for b in batches])
    paths = {}
    parts = {"train": ("P1", "P2"), "P3": ("P3",), "P4": ("P4",), "all": ("P1", "P2", "P3", "P4")}
    for name, keep in parts.items():
        rows = np.isin(plates, keep)
        obs = pd.DataFrame(
            {"batch": pd.Categorical(batches[rows]), "plate": pd.Categorical(plates[rows]),
             "perturbation": pd.Categorical(np.full(rows.sum(), "g1"))},
            index=[f"c{i}" for i in np.flatnonzero(rows)],
        )  # fmt: skip
        adata = ad.AnnData(X=values[rows].astype(np.float32), obs=obs)
        adata.uns["scbd"] = {"kind": "baseline", "control": "nontargeting", "space_id": "s1"}
        paths[name] = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(paths[name])
    return paths


def test_mapping_new_plates_never_moves_earlier_profiles(tmp_path: Path) -> None:
    paths = _reference_and_plates(tmp_path)
    reference = tmp_path / "train_harmony.h5ad"
    correct(paths["train"], method="harmony", out=reference)
    before = ad.read_h5ad(reference).X.copy()
    reference_bytes = reference.read_bytes()
    # the reference's corrected values are harmonypy's on the training plates alone
    cells = ad.read_h5ad(paths["train"])
    np.testing.assert_allclose(
        before, harmony(cells.X, cells.obs["batch"].astype(str).to_numpy(), seed=0), atol=1e-6
    )
    correct(paths["P3"], method="harmony", reference=reference, out=tmp_path / "P3_mapped.h5ad")
    p3 = ad.read_h5ad(tmp_path / "P3_mapped.h5ad").X.copy()
    correct(paths["P4"], method="harmony", reference=tmp_path / "P3_mapped.h5ad",
            out=tmp_path / "P4_mapped.h5ad")  # fmt: skip  (any file of the series is the reference)
    correct(paths["P4"], method="harmony", reference=reference, out=tmp_path / "P4_again.h5ad")
    # earlier profiles: the reference file and the first new plate's are untouched, bit for bit,
    # and refitting the reference plates gives them again
    assert reference.read_bytes() == reference_bytes
    correct(paths["train"], method="harmony", out=tmp_path / "refit_train.h5ad")
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "refit_train.h5ad").X, before)
    correct(paths["P3"], method="harmony", reference=reference, out=tmp_path / "P3_again.h5ad")
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "P3_again.h5ad").X, p3)
    np.testing.assert_array_equal(
        ad.read_h5ad(tmp_path / "P4_mapped.h5ad").X, ad.read_h5ad(tmp_path / "P4_again.h5ad").X
    )
    mapped = ad.read_h5ad(tmp_path / "P3_mapped.h5ad")
    assert mapped.uns["scbd"]["harmony_reference_path"] == str(reference.resolve())
    assert mapped.uns["scbd"]["method"] == "harmony"
    pd.testing.assert_frame_equal(mapped.obs, ad.read_h5ad(paths["P3"]).obs)
    # refitting Harmony with the new plates, by contrast, moves the training plates' profiles
    correct(paths["all"], method="harmony", out=tmp_path / "refit_all.h5ad")
    refit = ad.read_h5ad(tmp_path / "refit_all.h5ad")
    training = refit.obs["plate"].isin(["P1", "P2"]).to_numpy()
    assert np.abs(refit.X[training] - before).max() > 0.05


def test_mapping_bad_inputs(tmp_path: Path) -> None:
    paths = _reference_and_plates(tmp_path)
    reference = tmp_path / "train_harmony.h5ad"
    correct(paths["train"], method="harmony", out=reference)
    with pytest.raises(InputError, match="does not apply to --method combat"):
        correct(paths["P3"], method="combat", reference=reference, out=tmp_path / "x.h5ad")
    correct(paths["train"], method="combat", out=tmp_path / "combat.h5ad")
    with pytest.raises(DataError, match="holds no Harmony reference"):
        correct(paths["P3"], method="harmony", reference=tmp_path / "combat.h5ad",
                out=tmp_path / "x.h5ad")  # fmt: skip
    with pytest.raises(InputError, match="does not exist"):
        correct(paths["P3"], method="harmony", reference=tmp_path / "nope.h5ad",
                out=tmp_path / "x.h5ad")  # fmt: skip
    other = ad.read_h5ad(paths["P3"])
    other.uns["scbd"]["space_id"] = "s2"  # a baseline with its own PCA
    other.write_h5ad(tmp_path / "own_pca.h5ad")
    with pytest.raises(DataError, match="not in the space.*baseline NEW.zarr --reference"):
        correct(tmp_path / "own_pca.h5ad", method="harmony", reference=reference,
                out=tmp_path / "x.h5ad")  # fmt: skip
    narrow = ad.AnnData(X=other.X[:, :5], obs=other.obs)
    narrow.write_h5ad(tmp_path / "narrow.h5ad")
    with pytest.raises(DataError, match="fitted on 8 features; the cells to map have 5"):
        correct(tmp_path / "narrow.h5ad", method="harmony", reference=reference,
                out=tmp_path / "x.h5ad")  # fmt: skip
    assert not (tmp_path / "x.h5ad").exists()
    result = subprocess.run(
        [sys.executable, "-m", "scbd_cells", "correct", str(paths["P3"]), "--method", "harmony",
         "--reference", str(tmp_path / "combat.h5ad"), "--out", str(tmp_path / "y.h5ad")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds no Harmony reference" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "scbd_cells", "correct", str(paths["P3"]), "--method", "harmony",
         "--reference", str(reference), "--out", str(tmp_path / "y.h5ad")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(
        ad.read_h5ad(tmp_path / "y.h5ad").X,
        harmony_map(read_harmony_reference(reference), ad.read_h5ad(paths["P3"]).X,
                    batches=ad.read_h5ad(paths["P3"]).obs["batch"].astype(str).to_numpy()).astype(np.float32),
    )  # fmt: skip
