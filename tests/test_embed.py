"""embed: AnnData outputs (h5ad/zarr, aggregate), equality with the model, scanpy, bad input."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scbd_cells.core.errors import CheckpointError, InputError
from scbd_cells.data.store import create_store, open_store
from scbd_cells.embedding.encode import embed
from scbd_cells.model.scbd import DEFAULT_MODEL_ARGS, SCBDModel
from scbd_cells.training.checkpoint import load_trained, save_checkpoint

GENES = ["g1", "g2", "g3", "g4", "g5", "g6", "nontargeting"]


def _make_store(
    path: Path,
    *,
    n_channels: int = 3,
    n: int = 210,
    control: str | None = "nontargeting",
    dimmer: bool = False,
) -> Path:
    rng = np.random.default_rng(0)
    names = GENES if control else [g for g in GENES if g != "nontargeting"]
    genes = np.array(names)[np.arange(n) % len(names)]
    obs = pd.DataFrame(
        {
            "cell_id": [f"c{i}" for i in range(n)],
            "gene": genes,
            "guide": [f"{g}_{i % 2}" for i, g in enumerate(genes)],
            "plate": "P1",
            "well": np.array(["A01", "A02", "A03"])[rng.integers(0, 3, n)],
            "tile": rng.integers(0, 5, n),
        }
    )
    images = rng.integers(0, 4000, size=(n, n_channels, 16, 16), dtype=np.uint16)
    if dimmer:  # a dimmer plate with a higher background
        images = images // 2 + 300
    create_store(
        path,
        images=images,
        obs=obs,
        channel_names=[f"ch{i}" for i in range(n_channels)],
        perturbation_column="gene",
        guide_column="guide",
        control=control,
    )
    return path


def _make_run(run_dir: Path, store_path: Path, *, batch_stats: dict | None = None) -> Path:
    torch.manual_seed(0)
    store = open_store(store_path)
    model_args = dict(
        DEFAULT_MODEL_ARGS, encoder="tiny", in_channels=store.n_channels, image_size=16, z_dim=8
    )
    model = SCBDModel(model_args)
    save_checkpoint(
        {
            "model": model.state_dict(),
            "model_args": model_args,
            "step": 1,
            "best_val_loss": 0.0,
            "config": {"alpha": 1.0, "note": None},
            "store_fingerprint": store.fingerprint(),
            "vocab": {"perturbation": GENES, "batch": ["P1_A01", "P1_A02", "P1_A03"]},
            "channel_stats": store.channel_stats,
            "batch_channel_stats": batch_stats,
        },
        run_dir / "checkpoints" / "best.pt",
    )
    return run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("embed")
    store_path = _make_store(base / "screen.zarr")
    return _make_run(base / "run", store_path), store_path


def test_embed_h5ad_aggregate_and_scanpy(setup, tmp_path: Path, entries) -> None:
    import scanpy as sc

    torch.set_num_threads(2)
    run_dir, store_path = setup
    result = embed(
        run_dir,
        store_path,
        out=tmp_path / "cells.h5ad",
        aggregate=True,
        batch_size=64,
        device="cpu",
    )
    cells = ad.read_h5ad(result.out_path)
    store = open_store(store_path)
    assert cells.shape == (store.n_cells, 8) and cells.X.dtype == np.float32
    assert cells.obsm["X_scbd_batch"].shape == (store.n_cells, 8)
    np.testing.assert_allclose(np.linalg.norm(cells.X, axis=1), 1, rtol=1e-5)
    assert list(cells.obs_names) == list(store.obs.index)
    assert isinstance(cells.obs["batch"].dtype, pd.CategoricalDtype)
    assert cells.uns["scbd"]["control"] == "nontargeting"

    # independent forward pass on a few cells, standardised by hand with the store's statistics
    trained = load_trained(run_dir, device="cpu")
    rows = np.array([0, 5, 100, 209])
    mean, std = (np.asarray(store.channel_stats[key])[:, None, None] for key in ("mean", "std"))
    inputs = (store.read(rows).astype(np.float64) - mean) / std
    with torch.inference_mode():
        output = trained.model(torch.from_numpy(inputs.astype(np.float32)))
    np.testing.assert_allclose(cells.X[rows], output.z_perturbation.numpy(), atol=1e-5)
    np.testing.assert_allclose(cells.obsm["X_scbd_batch"][rows], output.z_batch.numpy(), atol=1e-5)

    genes = ad.read_h5ad(result.genes_path)
    guides = ad.read_h5ad(result.guides_path)
    assert sorted(genes.obs_names) == GENES[:-1]
    assert genes.obs["n_cells"].sum() == 180 and guides.obs["n_cells"].sum() == 210
    assert set(genes.obs["n_guides"]) == {2}

    sc.pp.neighbors(cells, use_rep="X", n_neighbors=10)
    sc.tl.umap(cells, random_state=0)
    assert cells.obsm["X_umap"].shape == (store.n_cells, 2)
    sc.pp.neighbors(genes, use_rep="X", n_neighbors=3)
    assert entries(tmp_path) == ["cells.h5ad", "genes.h5ad", "guides.h5ad"]


def _by_hand_well_inputs(store, rows: np.ndarray) -> np.ndarray:
    """Cells standardised with numpy statistics of all the cells of their own well."""
    everything = store.read(np.arange(store.n_cells)).astype(np.float64)
    wells = store.obs["batch"].astype(str).to_numpy()
    inputs = []
    for row in rows:
        own = everything[wells == wells[row]]
        mean, std = own.mean(axis=(0, 2, 3)), own.std(axis=(0, 2, 3))
        inputs.append((everything[row] - mean[:, None, None]) / std[:, None, None])
    return np.stack(inputs).astype(np.float32)


def test_embed_per_well_normalisation(setup, tmp_path: Path) -> None:
    """A run trained with --normalize batch embeds each cell with its own well's statistics:
    the saved ones on the training store, freshly computed ones on another store."""
    from scbd_cells.data.batch_stats import batch_channel_stats

    _, store_path = setup
    store = open_store(store_path)
    saved = batch_channel_stats(store).to_dict()
    run_dir = _make_run(tmp_path / "run", store_path, batch_stats=saved)
    trained = load_trained(run_dir, device="cpu")
    assert trained.normalize == "batch"
    rows = np.array([0, 5, 100, 209])
    with torch.inference_mode():
        expected = trained.model(torch.from_numpy(_by_hand_well_inputs(store, rows)))
    result = embed(run_dir, store_path, out=tmp_path / "cells.h5ad", batch_size=50, device="cpu")
    cells = ad.read_h5ad(result.out_path)
    np.testing.assert_allclose(cells.X[rows], expected.z_perturbation.numpy(), atol=1e-5)

    # another store (new wells, other brightness): its wells get their own statistics
    other_path = _make_store(tmp_path / "other.zarr", dimmer=True)
    other = open_store(other_path)
    with torch.inference_mode():
        expected = trained.model(torch.from_numpy(_by_hand_well_inputs(other, rows)))
    result = embed(run_dir, other_path, out=tmp_path / "other.h5ad", batch_size=50, device="cpu")
    np.testing.assert_allclose(
        ad.read_h5ad(result.out_path).X[rows], expected.z_perturbation.numpy(), atol=1e-5
    )


def test_embed_zarr_and_encoder(setup, tmp_path: Path) -> None:
    run_dir, store_path = setup
    result = embed(
        run_dir,
        store_path,
        out=tmp_path / "cells.zarr",
        representation="encoder",
        batch_size=100,
        device="cpu",
        workers=0,
    )
    cells = ad.read_zarr(result.out_path)
    width = (
        load_trained(run_dir, device="cpu")
        .model.encoder_perturbation(torch.zeros(1, 3, 16, 16))
        .shape[1]
    )
    assert cells.obsm["X_scbd_encoder"].shape == (210, width)
    assert cells.obsm["X_scbd_batch_encoder"].shape == (210, width)
    reference = embed(run_dir, store_path, out=tmp_path / "ref.h5ad", batch_size=33, device="cpu")
    np.testing.assert_allclose(cells.X, ad.read_h5ad(reference.out_path).X, atol=1e-5)


def test_mismatched_store_and_existing_output(setup, tmp_path: Path, entries) -> None:
    run_dir, _ = setup
    other = _make_store(tmp_path / "two.zarr", n_channels=2, n=70)
    with pytest.raises(CheckpointError, match="3 channels"):
        embed(run_dir, other, out=tmp_path / "out" / "cells.h5ad", aggregate=True, device="cpu")
    assert not (tmp_path / "out").exists() or not entries(tmp_path / "out")
    (tmp_path / "cells.h5ad").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        embed(run_dir, other, out=tmp_path / "cells.h5ad", device="cpu")
    with pytest.raises(InputError, match=".h5ad or .zarr"):
        embed(run_dir, other, out=tmp_path / "cells.csv", device="cpu")


def test_cli_mismatched_store_exit_code(setup, tmp_path: Path) -> None:
    import subprocess
    import sys

    run_dir, _ = setup
    other = _make_store(tmp_path / "two.zarr", n_channels=2, n=70)
    result = subprocess.run(
        [sys.executable, "-m", "scbd_cells", "embed", str(run_dir), str(other),
         "--out", str(tmp_path / "cells.h5ad"), "--device", "cpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "channels" in result.stderr
    assert not (tmp_path / "cells.h5ad").exists()


def test_aggregate_without_control_fails_first(setup, tmp_path: Path, entries) -> None:
    from scbd_cells.core.errors import DataError

    run_dir, _ = setup
    store_path = _make_store(tmp_path / "no_control.zarr", n=70, control=None)
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="no perturbation 'nontargeting'"):
        embed(
            run_dir, store_path, out=tmp_path / "out" / "cells.h5ad", aggregate=True, device="cpu"
        )
    assert not entries(tmp_path / "out")


def test_obs_text_columns_are_plain_strings_anndata_writes(setup) -> None:
    """pandas 3 infers its ``str`` dtype for text, which anndata 0.12 refuses to write
    (``allow_write_nullable_strings``): cell ids must stay plain object strings."""
    from scbd_cells.profiles.anndata_io import store_obs_for_anndata

    _, store_path = setup
    obs = store_obs_for_anndata(open_store(store_path))
    assert obs["cell_id"].dtype == object and obs.index.dtype == object
    assert all(isinstance(value, str) for value in obs["cell_id"])
