"""Training: runs end to end on a tiny store, is deterministic, resumes exactly, fails clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from stores import FAST, well_store

from scbd_cells import train
from scbd_cells.core.config import resolve_train_config
from scbd_cells.core.errors import CheckpointError, DataError, InputError, StoreError
from scbd_cells.model.scbd import SCBDModel
from scbd_cells.training.checkpoint import load_checkpoint, load_trained


# Tiny and fast: 2-layer encoder, 12 px, 24-cell batches.
def _make_store(path: Path, *, n_wells: int = 4, seed: int = 0) -> Path:
    return well_store(path, n_wells=n_wells, seed=seed)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_store(tmp_path_factory.mktemp("train_store") / "screen.zarr")


def test_normalize_store_keeps_no_well_statistics(small_store: Path, tmp_path: Path) -> None:
    result = train(
        small_store, out=tmp_path / "run", steps=2, val_every=2, normalize="store", **FAST
    )
    checkpoint = torch.load(result.last_checkpoint_path, weights_only=True)
    assert checkpoint["batch_channel_stats"] is None
    assert load_trained(tmp_path / "run").normalize == "store"


def test_train_writes_run_folder(small_store: Path, tmp_path: Path) -> None:
    result = train(small_store, out=tmp_path / "run", steps=6, val_every=3, alpha=1.0, **FAST)
    assert result.step == 6 and not result.interrupted
    for name in ("config.yaml", "metrics.csv", "curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    metrics = pd.read_csv(result.metrics_path)
    assert set(metrics["phase"]) == {"train", "val"}
    val = metrics[metrics["phase"] == "val"]
    assert list(val["step"]) == [3, 6]
    assert val[["loss", "well_f1_z_perturbation", "well_f1_z_batch"]].notna().all().all()
    assert np.isfinite(metrics["loss"]).all()
    # plain-dict checkpoint, loadable without executing code, model rebuilt from model_args
    checkpoint = torch.load(result.last_checkpoint_path, weights_only=True)
    assert checkpoint["step"] == 6 and checkpoint["vocab"]["batch"][0].startswith("plate_1")
    assert checkpoint["config"]["alpha"] == 1.0
    # default --normalize batch: every well's channel statistics travel with the weights
    assert checkpoint["config"]["normalize"] == "batch"
    saved = checkpoint["batch_channel_stats"]
    assert saved["labels"] == checkpoint["vocab"]["batch"]
    assert np.asarray(saved["mean"]).shape == (len(saved["labels"]), 2)
    trained = load_trained(tmp_path / "run", which="best")
    assert trained.model_args["in_channels"] == 2 and not trained.model.training
    from scbd_cells.data.store import open_store

    store = open_store(small_store)
    trained.check_store(store)
    images = torch.from_numpy(store.read(np.arange(5)).astype(np.int32))
    codes = torch.from_numpy(store.codes("batch")[0][:5].astype(np.int64))
    z = trained.model.embed_perturbation(trained.preprocessor_for(store)(images, codes))
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    # the saved config reloads as is
    reloaded = resolve_train_config(config_path=tmp_path / "run" / "config.yaml")
    assert reloaded == result.config


def test_same_seed_same_losses(small_store: Path, tmp_path: Path) -> None:
    first = train(small_store, out=tmp_path / "a", steps=4, val_every=4, seed=3, **FAST)
    second = train(small_store, out=tmp_path / "b", steps=4, val_every=4, seed=3, **FAST)
    columns = ["loss", "supcon_perturbation", "supcon_batch", "invariance"]
    a = pd.read_csv(first.metrics_path)[columns].to_numpy()
    b = pd.read_csv(second.metrics_path)[columns].to_numpy()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("augment", [False, True])
def test_resume_equals_uninterrupted(small_store: Path, tmp_path: Path, augment: bool) -> None:
    options = {**FAST, "workers": 1, "prefetch": 2, "seed": 5, "val_every": 3, "augment": augment}
    whole = train(small_store, out=tmp_path / "whole", steps=6, **options)
    half = train(small_store, out=tmp_path / "half", steps=3, **options)
    assert half.step == 3
    resumed = train(small_store, out=tmp_path / "half", resume=True, steps=6)
    assert resumed.step == 6
    expected = load_checkpoint(whole.last_checkpoint_path)
    found = load_checkpoint(resumed.last_checkpoint_path)
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(found["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert found["sampler"] == expected["sampler"]
    rows = pd.read_csv(resumed.metrics_path)
    assert list(rows[rows["phase"] == "val"]["step"]) == [3, 6]


def test_decoder_trains_on_detached_embeddings(small_store: Path, tmp_path: Path) -> None:
    result = train(
        small_store,
        out=tmp_path / "run",
        steps=2,
        val_every=2,
        decoder=True,
        decoder_width=16,
        image_size=16,
        **FAST,
    )
    metrics = pd.read_csv(result.metrics_path)
    assert metrics["reconstruction"].notna().any()
    trained = load_trained(result.run_dir, which="last")
    z = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    assert trained.model.decode(z, z).shape == (3, 2, 16, 16)
    # the decoder learns: its weights left their initial values (same seed, same init)
    torch.manual_seed(0)
    initial = SCBDModel(trained.model_args).state_dict()
    learned = trained.model.state_dict()
    decoder_keys = [k for k in learned if k.startswith("decoder")]
    assert decoder_keys and any(not torch.equal(initial[k], learned[k]) for k in decoder_keys)
    # that it learns from *detached* embeddings (the encoders' weights are those of the same
    # run without it, bit for bit): test_reconstruct.py::test_the_decoder_changes_no_embedding


def test_bad_inputs_fail_clearly(small_store: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="classes in the train split"):
        train(small_store, out=tmp_path / "r1", steps=1, **{**FAST, "classes_per_batch": 9})
    with pytest.raises(InputError, match="unknown encoder"):
        train(small_store, out=tmp_path / "r2", steps=1, **{**FAST, "encoder": "vgg"})
    with pytest.raises(InputError, match="alphaa"):
        train(small_store, out=tmp_path / "r3", steps=1, alphaa=1.0, **FAST)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(small_store, out=tmp_path / "r4", resume=True)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="Cannot write in the folder .*file is a file"):
        train(small_store, out=blocker / "run", steps=1, **FAST)
    with pytest.raises(StoreError):
        train(tmp_path / "missing.zarr", out=tmp_path / "r5", steps=1, **FAST)


def test_one_well_store_is_refused(tmp_path: Path) -> None:
    store_path = _make_store(tmp_path / "one_well.zarr", n_wells=1)
    with pytest.raises(DataError, match="one batch label"):
        train(store_path, out=tmp_path / "run", steps=1, **FAST)


def test_non_finite_loss_stops_with_training_error(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scbd_cells.core.errors import TrainingError
    from scbd_cells.training import loop as training

    train(small_store, out=tmp_path / "run", steps=2, val_every=2, **FAST)
    real_loss = training.scbd_loss

    def broken_loss(*args, **kwargs):
        losses = real_loss(*args, **kwargs)
        return type(losses)(
            losses.total * float("nan"),
            losses.supcon_perturbation * float("nan"),
            losses.supcon_batch,
            losses.invariance,
        )

    monkeypatch.setattr(training, "scbd_loss", broken_loss)
    with pytest.raises(TrainingError, match="non-finite"):
        train(small_store, out=tmp_path / "run", resume=True, steps=4)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_cli_bad_input_exits_with_message(small_store: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "scbd_cells",
        "--quiet",
        "train",
        str(small_store),
        "--out",
        str(tmp_path / "run"),
        "--encoder",
        "tiny",
        "--classes-per-batch",
        "50",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--classes-per-batch 8 or fewer" in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.stderr


def test_stall_and_collapse_warnings(caplog: pytest.LogCaptureFixture) -> None:
    import math

    from scbd_cells.core.config import TrainConfig
    from scbd_cells.training.loop import _StallMonitor

    config = TrainConfig(steps=100, classes_per_batch=6, cells_per_class=4, alpha=10.0)
    stalled = _StallMonitor(config)
    for _ in range(40):
        stalled.record(5.0)
    with caplog.at_level("WARNING", logger="scbd_cells.training.loop"):
        stalled.check(40)
    assert "has not fallen" in caplog.text and "alpha (10)" in caplog.text

    caplog.clear()
    learning = _StallMonitor(config)
    for i in range(40):
        learning.record(5.0 - 0.05 * i)  # falls, and stays away from log(24)
    with caplog.at_level("WARNING", logger="scbd_cells.training.loop"):
        learning.check(40)
    assert caplog.text == ""

    # Train loss fell from a spread-out start to the collapsed level; the val loss stays
    # at log(val batch) -> the collapse warning (not the "has not fallen" one), once.
    collapsed = _StallMonitor(config)
    for i in range(40):
        collapsed.record(math.log(24) + (1.0 if i < 10 else 0.0))
    with caplog.at_level("WARNING", logger="scbd_cells.training.loop"):
        collapsed.check(20, val_supcon=math.log(32) + 0.001, val_batch_size=32)
        assert caplog.text == ""  # first val check: too early to tell
        collapsed.check(40, val_supcon=math.log(32) - 0.001, val_batch_size=32)
        collapsed.check(60, val_supcon=math.log(32), val_batch_size=32)
    assert caplog.text.count("is not below log(val batch size)") == 1
    assert "has not fallen" not in caplog.text

    # Below the collapsed level first, back above it later: overfitting, said as such.
    caplog.clear()
    overfit = _StallMonitor(config)
    for i in range(40):
        overfit.record(math.log(24) - 0.02 * i)  # the train loss keeps falling
    with caplog.at_level("WARNING", logger="scbd_cells.training.loop"):
        overfit.check(20, val_supcon=math.log(32) - 0.05, val_batch_size=32)
        overfit.check(40, val_supcon=math.log(32) + 0.05, val_batch_size=32)
    assert "memorising the train cells" in caplog.text and "(step 20)" in caplog.text
    assert "is not below log(val batch size)" not in caplog.text

    # Val loss below the collapsed level by more than the margin: learning, no warning.
    caplog.clear()
    below = _StallMonitor(config)
    for i in range(40):
        below.record(math.log(24) + (1.0 if i < 10 else 0.0))
    with caplog.at_level("WARNING", logger="scbd_cells.training.loop"):
        below.check(20, val_supcon=math.log(32) - 0.01, val_batch_size=32)
        below.check(40, val_supcon=math.log(32) - 0.02, val_batch_size=32)
    assert caplog.text == ""


def test_store_of_another_format_version_is_refused(small_store: Path, tmp_path: Path) -> None:
    import json
    import shutil

    old_store = tmp_path / "old.zarr"
    shutil.copytree(small_store, old_store)
    metadata_path = old_store / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["attributes"]["format_version"] = 0
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(StoreError, match="format version 0"):
        train(old_store, out=tmp_path / "run", steps=1, **FAST)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_ctrl_c_saves_last_and_returns(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    from scbd_cells.training import loop as training

    real_loss, calls = training.scbd_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C mid-step
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "scbd_loss", loss_then_ctrl_c)
    # what was installed before (Python's default, or SIG_IGN when pytest itself runs in a
    # background job) must be back afterwards
    before = signal.getsignal(signal.SIGINT)
    result = train(small_store, out=tmp_path / "run", steps=50, val_every=100, **FAST)
    assert result.interrupted and result.step == 3
    assert load_checkpoint(result.last_checkpoint_path)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before


def test_val_batches_do_not_repeat_cells_when_the_split_allows(tmp_path: Path) -> None:
    """A cell drawn twice is a perfect positive: val batches avoid it when they can."""
    from scbd_cells.data import schema
    from scbd_cells.data.store import open_store
    from scbd_cells.training.loop import _ValidationSet

    store_path = _make_store(tmp_path / "wide_val.zarr")
    store = open_store(store_path)
    # Re-split: the fixture store's 15 % val has ~3.6 cells a class, below cells_per_class.
    obs_split = np.where(np.arange(store.n_cells) % 2 == 0, "val", "train")
    perturbation, _ = store.codes(schema.PERTURBATION)
    batch, _ = store.codes(schema.BATCH)
    config = resolve_train_config(overrides={**FAST, "val_batches": 4})
    val_rows = np.flatnonzero(obs_split == "val")  # 12 cells a class
    validation = _ValidationSet.build(store, config, perturbation, batch, val_rows)
    batch_size = config.classes_per_batch * config.cells_per_class
    for start in range(0, len(validation.rows), batch_size):
        rows = validation.rows[start : start + batch_size]
        assert len(np.unique(rows)) == batch_size

    # Too few val cells a class: drawn with replacement, and the run says so.
    sparse_rows = val_rows[perturbation[val_rows] < 2]  # 2 classes < classes_per_batch
    sparse_rows = np.concatenate(
        [sparse_rows, [np.flatnonzero(perturbation == k)[0] for k in range(2, 8)]]
    )
    validation = _ValidationSet.build(store, config, perturbation, batch, sparse_rows)
    first = validation.rows[:batch_size]
    assert len(np.unique(first)) < batch_size


def test_random_dihedral_applies_one_of_the_eight_symmetries() -> None:
    from scbd_cells.model.preprocess import random_dihedral

    images = torch.arange(64 * 2 * 5 * 5, dtype=torch.float32).reshape(64, 2, 5, 5)
    out = random_dihedral(images, generator=torch.Generator().manual_seed(0))
    symmetries = [
        np.flip(np.rot90(image, k, axes=(-2, -1)), axis=-1)
        if mirror
        else np.rot90(image, k, axes=(-2, -1))
        for image in [images[0].numpy()]
        for k in range(4)
        for mirror in (False, True)
    ]
    assert len({s.tobytes() for s in symmetries}) == 8
    seen = set()
    for original, turned in zip(images.numpy(), out.numpy(), strict=True):
        matches = [
            index
            for index, (k, mirror) in enumerate((k, m) for k in range(4) for m in (False, True))
            if np.array_equal(
                turned,
                np.flip(np.rot90(original, k, axes=(-2, -1)), axis=-1)
                if mirror
                else np.rot90(original, k, axes=(-2, -1)),
            )
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 8  # 64 draws hit every symmetry
    again = random_dihedral(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="square"):
        random_dihedral(images[:, :, :4, :], generator=torch.Generator())


def test_augment_changes_what_the_model_sees(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --augment the model is fed each cell turned or mirrored (one of the square's 8
    symmetries, not all of them the identity); without it, the cells as they are."""
    from scbd_cells.model import preprocess

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = preprocess.random_dihedral

    def spy(images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        out = real(images, generator=generator)
        seen.append((images.clone(), out.clone()))
        return out

    monkeypatch.setattr(preprocess, "random_dihedral", spy)
    train(small_store, out=tmp_path / "plain", steps=2, **FAST)
    assert not seen  # off by default
    turned = train(small_store, out=tmp_path / "turned", steps=2, augment=True, **FAST)
    assert len(seen) == 2 and load_checkpoint(turned.last_checkpoint_path)["config"]["augment"]
    n_changed = 0
    for before, after in seen:
        for image, out in zip(before, after, strict=True):
            symmetries = [torch.rot90(image, k, dims=(-2, -1)) for k in range(4)]
            symmetries += [torch.flip(turn, dims=(-1,)) for turn in symmetries]
            assert any(torch.equal(out, candidate) for candidate in symmetries)
            n_changed += not torch.equal(out, image)
    assert n_changed > 0
