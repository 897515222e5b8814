"""Distributed: torchrun, 2 CPU processes (gloo), reproduces single-process losses and gradients.

The file is also the worker script: ``python -m torch.distributed.run
--nproc-per-node 2 tests/test_distributed.py <case> <out_dir>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from stores import well_store

from scbd_cells.core.distributed import (
    DistInfo,
    all_gather_nograd,
    all_gather_with_grad,
    gather_to_main,
    init_distributed,
    rank_seed,
    shard_indices,
)
from scbd_cells.model.losses import scbd_loss

GLOBAL_BATCH = 16


def _problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 5))
    inputs = torch.randn(GLOBAL_BATCH, 6)
    labels = torch.stack([torch.arange(GLOBAL_BATCH) // 4, torch.arange(GLOBAL_BATCH) % 3])
    return model, inputs, labels  # labels: (2, B) perturbation and batch codes


def _forward_loss(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
    """The SCBD objective (supcon x2 + invariance) on the all-gathered global batch."""
    z = torch.nn.functional.normalize(model(inputs), dim=1)  # (b, 5)
    z = all_gather_with_grad(z)  # (B, 5)
    z_perturbation, z_batch = z[:, :3], z[:, 3:]
    return scbd_loss(
        torch.nn.functional.normalize(z_perturbation, dim=1),
        torch.nn.functional.normalize(z_batch, dim=1),
        perturbation=labels[0],
        batch=labels[1],
        alpha=1.0,
    ).total


def _single_process() -> tuple[float, list[np.ndarray]]:
    model, inputs, labels = _problem()
    loss = _forward_loss(model, inputs, labels)
    loss.backward()
    return loss.item(), [p.grad.numpy().copy() for p in model.parameters()]


# --------------------------------------------------------------------------- worker side
def _worker_shared_cache(info: DistInfo, out_dir: Path, store_path: str) -> None:
    """Both ranks map one node-shared copy of the images and read correct slices from it."""
    from scbd_cells.data.loader import BalancedLoader
    from scbd_cells.data.sampler import BalancedBatchSampler
    from scbd_cells.data.store import open_store

    store = open_store(store_path)
    codes, _ = store.codes("perturbation")
    sampler = BalancedBatchSampler(
        codes, np.arange(store.n_cells), classes_per_batch=4, cells_per_class=4, seed=0
    )
    loader = BalancedLoader(
        store, sampler, device="cpu", rank=info.rank, world_size=info.world_size, cache_gb=1.0
    )
    reader = loader.reader
    if reader.backend != "memory" or reader._shared_memory is None:
        raise RuntimeError(f"expected a node-shared cache, found {reader.backend}")
    images = store.images[:]
    for _ in range(3):
        batch = next(loader)
        if not np.array_equal(batch.images.numpy(), images[batch.indices.numpy()]):
            raise RuntimeError("the shared cache returned wrong pixels")
    (out_dir / f"segment{info.rank}.txt").write_text(reader._shared_memory.name)
    loader.close()


def _worker_gradients(info: DistInfo, out_dir: Path, store_path: str) -> None:
    _worker_shared_cache(info, out_dir, store_path)
    model, inputs, labels = _problem()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    local = shard_indices(GLOBAL_BATCH, rank=info.rank, world_size=info.world_size)
    loss = _forward_loss(ddp, inputs[local], labels)  # labels: the global batch's
    loss.backward()
    gathered = all_gather_nograd(torch.arange(info.rank + 1) + 10 * info.rank)
    on_main = gather_to_main(np.full(info.rank + 2, info.rank))
    if info.is_main:
        np.savez(
            out_dir / "result.npz",
            loss=loss.item(),
            gathered=gathered.numpy(),
            on_main=on_main,
            **{f"grad{i}": p.grad.numpy() for i, p in enumerate(model.parameters())},
        )
    elif on_main is not None:
        raise RuntimeError("gather_to_main returned data on rank > 0")


WORKERS = {"gradients": _worker_gradients}


def _run_torchrun(case: str, out_dir: Path, *extra: str, timeout: int = 120) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
        __file__, case, str(out_dir), *extra,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# --------------------------------------------------------------------------- train / embed
TRAIN_OPTIONS = {
    "encoder": "tiny",
    "classes_per_batch": 6,
    "cells_per_class": 4,
    "val_batches": 1,
    "val_every": 5,
    "log_every": 1,
    "workers": 1,
    "device": "cpu",
    "z_dim": 8,
    "lr": 3e-3,
    "steps": 10,
}


@pytest.fixture(scope="module")
def train_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 perturbations x 4 wells of 2-channel 12 px uint16 crops (perturbation and well signal)."""
    return well_store(tmp_path_factory.mktemp("dist_store") / "screen.zarr", cells_per_well=8)


def _train_losses(run_dir: Path) -> pd.DataFrame:
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return metrics[metrics["phase"] == "train"].set_index("step")["loss"]


def _torchrun_cli(*arguments: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
        "-m", "scbd_cells", "--quiet", *arguments,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def single_run(train_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process training run with TRAIN_OPTIONS (its options file beside it)."""
    import yaml

    from scbd_cells import train

    run_root = tmp_path_factory.mktemp("single_run")
    (run_root / "options.yaml").write_text(yaml.safe_dump(TRAIN_OPTIONS))
    train(train_store, out=run_root / "run", config_path=run_root / "options.yaml")
    return run_root / "run"


@pytest.mark.slow
def test_two_process_training_follows_the_single_process_run(
    train_store: Path, single_run: Path, tmp_path: Path
) -> None:
    """``torchrun -m scbd_cells train`` (2 ranks, gloo) gives the single-process loss curve."""
    options_path = single_run.parent / "options.yaml"
    _torchrun_cli(
        "train", str(train_store), "--out", str(tmp_path / "ddp"), "--config", str(options_path)
    )
    single_losses, ddp_losses = _train_losses(single_run), _train_losses(tmp_path / "ddp")
    assert list(ddp_losses.index) == list(single_losses.index)
    # Same global batches, same initialisation, no batch norm: the curves agree closely.
    np.testing.assert_allclose(ddp_losses.to_numpy(), single_losses.to_numpy(), rtol=1e-3)
    assert single_losses.iloc[-4:].mean() < single_losses.iloc[:4].mean()  # it learns
    assert (tmp_path / "ddp" / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_two_process_embed_writes_the_single_process_result(
    train_store: Path, single_run: Path, tmp_path: Path, entries
) -> None:
    """``torchrun -m scbd_cells embed``: ranks split the cells, one file equal to one process's."""
    import anndata as ad

    from scbd_cells import embed

    # batch size 7 over 256 cells: 37 pieces, an uneven last round (one rank idles).
    embed(single_run, train_store, out=tmp_path / "single.h5ad", batch_size=7, device="cpu")
    _torchrun_cli(
        "embed", str(single_run), str(train_store), "--out", str(tmp_path / "ddp.h5ad"),
        "--batch-size", "7", "--device", "cpu",
    )  # fmt: skip
    single, ddp = ad.read_h5ad(tmp_path / "single.h5ad"), ad.read_h5ad(tmp_path / "ddp.h5ad")
    assert ddp.n_obs == single.n_obs == 256
    assert list(ddp.obs_names) == list(single.obs_names)
    np.testing.assert_allclose(ddp.X, single.X, atol=1e-6)
    np.testing.assert_allclose(ddp.obsm["X_scbd_batch"], single.obsm["X_scbd_batch"], atol=1e-6)
    assert not np.any(np.all(ddp.X == 0, axis=1))  # every row was written
    assert entries(tmp_path) == ["ddp.h5ad", "single.h5ad"]


# --------------------------------------------------------------------------- tests
def test_single_process_helpers_are_no_ops() -> None:
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    tensor = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(tensor) is tensor
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8


def test_iter_cells_deals_pieces_round_robin_in_step() -> None:
    from scbd_cells.data.loader import iter_cells

    class Rows:
        images = np.arange(23 * 1).reshape(23, 1, 1, 1)

        def read(self, rows):
            return self.images[rows]

    per_rank = [
        list(iter_cells(Rows(), np.arange(23), batch_size=4, workers=1, rank=r, world_size=2))
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 6 pieces; ranks stay in step
    rounds = [np.concatenate([per_rank[0][t][0], per_rank[1][t][0]]) for t in range(3)]
    np.testing.assert_array_equal(np.concatenate(rounds), np.arange(23))
    assert all(np.all(np.diff(round_) == 1) for round_ in rounds)  # consecutive rows


def test_shard_indices_cover_everything_in_order() -> None:
    for n, world in [(10, 3), (2, 4), (0, 2), (17, 1)]:
        shards = [shard_indices(n, rank=r, world_size=world) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_two_process_loss_and_gradients_equal_single_process(
    train_store: Path, tmp_path: Path
) -> None:
    """Also: the two ranks share one in-memory copy of the store, gone after the run."""
    _run_torchrun("gradients", tmp_path, str(train_store))
    names = {(tmp_path / f"segment{rank}.txt").read_text() for rank in range(2)}
    assert len(names) == 1
    assert not (Path("/dev/shm") / names.pop().lstrip("/")).exists()
    result = np.load(tmp_path / "result.npz")
    loss, grads = _single_process()
    assert abs(float(result["loss"]) - loss) < 1e-5
    for i, grad in enumerate(grads):
        np.testing.assert_allclose(result[f"grad{i}"], grad, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(result["gathered"], [0, 10, 11])
    np.testing.assert_array_equal(result["on_main"], [0, 0, 1, 1, 1])


if __name__ == "__main__":
    torch.set_num_threads(1)
    case, out = sys.argv[1], Path(sys.argv[2])
    dist_info = init_distributed("cpu")
    from scbd_cells.core.distributed import barrier, cleanup

    try:
        WORKERS[case](dist_info, out, *sys.argv[3:])
        # As train/embed do: no rank leaves the group while a peer is still in a collective
        # (gloo aborted rank 0 at exit about one run in eight without it).
        barrier()
    finally:
        cleanup()
