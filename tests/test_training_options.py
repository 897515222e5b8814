"""train --select, --augment, --stem, --warmup-steps: each does what it names, and is recorded."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from stores import FAST, well_store

from scbd_cells import train
from scbd_cells.core.config import resolve_train_config
from scbd_cells.core.errors import CheckpointError, InputError
from scbd_cells.model.encoders import build_encoder
from scbd_cells.model.preprocess import augment_images, max_shift_for, random_shift
from scbd_cells.model.scbd import SCBDModel
from scbd_cells.model.schedule import warmup_factor
from scbd_cells.model.selection import CheckpointSelection
from scbd_cells.training.checkpoint import load_checkpoint, load_trained, save_checkpoint


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return well_store(tmp_path_factory.mktemp("options_store") / "screen.zarr", n_wells=4)


# --- --augment -----------------------------------------------------------------------------


def _dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square, numpy's rot90 and flip: (k turns, mirrored or not)."""
    turns = [np.rot90(image, k, axes=(-2, -1)) for k in range(4)]
    return turns + [np.flip(turn, axis=-1) for turn in turns]


def _shifted(image: np.ndarray, dy: int, dx: int, m: int) -> np.ndarray:
    """``image`` moved by (dy, dx), the gap filled by numpy's reflect padding of width m."""
    size = image.shape[-1]
    padded = np.pad(image, ((0, 0), (m, m), (m, m)), mode="reflect")
    return padded[:, m + dy : m + dy + size, m + dx : m + dx + size]


def test_shift_is_a_whole_pixel_move_within_the_bound() -> None:
    m = 2
    images = torch.randn(300, 2, 9, 9, generator=torch.Generator().manual_seed(1))
    out = random_shift(images, generator=torch.Generator().manual_seed(0), max_shift=m)
    assert out.shape == images.shape and out.dtype == images.dtype
    found = []
    for original, moved in zip(images.numpy(), out.numpy(), strict=True):
        matches = [
            (dy, dx)
            for dy, dx in itertools.product(range(-m, m + 1), repeat=2)
            if np.array_equal(moved, _shifted(original, dy, dx, m))
        ]
        assert len(matches) == 1  # pixel-exact, exactly one integer shift within +-m
        found.append(matches[0])
    assert set(found) == set(itertools.product(range(-m, m + 1), repeat=2))  # all 25 occur
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(images, generator=torch.Generator(), max_shift=9)


def test_dihedral_shift_gives_one_of_the_eight_symmetries_moved_by_whole_pixels() -> None:
    images = torch.randn(64, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    m = max_shift_for(32)
    assert m == 4
    out = augment_images(
        images, augment="dihedral+shift", generator=torch.Generator().manual_seed(0)
    )
    symmetries, shifts = set(), set()
    for original, moved in zip(images.numpy(), out.numpy(), strict=True):
        matches = [
            (index, dy, dx)
            for index, turned in enumerate(_dihedral(original))
            for dy, dx in itertools.product(range(-m, m + 1), repeat=2)
            if np.array_equal(moved, _shifted(np.ascontiguousarray(turned), dy, dx, m))
        ]
        assert len(matches) == 1
        symmetries.add(matches[0][0])
        shifts.add(matches[0][1:])
    assert symmetries == set(range(8))
    assert len(shifts) > 20 and max(max(abs(dy), abs(dx)) for dy, dx in shifts) == m


def test_augmentation_is_seeded() -> None:
    images = torch.randn(32, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    for augment in ("dihedral", "dihedral+shift"):
        first, again, other = (
            augment_images(images, augment=augment, generator=torch.Generator().manual_seed(s))
            for s in (5, 5, 6)
        )
        assert torch.equal(first, again)
        assert not torch.equal(first, other)
    plain = augment_images(images, augment="none", generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, images)
    # dihedral+shift draws the turns first: the same turns as dihedral, then moves them
    turned = augment_images(images, augment="dihedral", generator=torch.Generator().manual_seed(7))
    both = augment_images(
        images, augment="dihedral+shift", generator=torch.Generator().manual_seed(7)
    )
    m = max_shift_for(16)
    for before, after in zip(turned.numpy(), both.numpy(), strict=True):
        assert any(
            np.array_equal(after, _shifted(before, dy, dx, m))
            for dy, dx in itertools.product(range(-m, m + 1), repeat=2)
        )


def _transform_of(original: np.ndarray, moved: np.ndarray, m: int) -> tuple[int, int, int]:
    """(symmetry index, dy, dx) that turns ``original`` into ``moved``; exactly one."""
    matches = [
        (index, dy, dx)
        for index, turned in enumerate(_dihedral(original))
        for dy, dx in itertools.product(range(-m, m + 1), repeat=2)
        if np.array_equal(moved, _shifted(np.ascontiguousarray(turned), dy, dx, m))
    ]
    assert len(matches) == 1
    return matches[0]


def test_training_batches_are_augmented_and_seeded(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the model sees: each cell one of the 8 symmetries moved by whole pixels; the
    transforms drawn are the same for the same seed and differ for another seed."""
    from scbd_cells.training import loop as training

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = training.augment_images

    def spy(images: torch.Tensor, **kwargs) -> torch.Tensor:
        out = real(images, **kwargs)
        seen.append((images.clone(), out.clone()))
        return out

    monkeypatch.setattr(training, "augment_images", spy)
    options = {**FAST, "steps": 2, "val_every": 2, "augment": "dihedral+shift"}
    runs = [train(small_store, out=tmp_path / f"run{i}", seed=s, **options)
            for i, s in enumerate((1, 1, 2))]  # fmt: skip
    assert len(seen) == 6  # one call per training step, none in validation
    m = max_shift_for(12)
    transforms = [
        [_transform_of(a, b, m) for a, b in zip(before.numpy(), after.numpy(), strict=True)]
        for before, after in seen
    ]
    assert transforms[0:2] == transforms[2:4]  # same seed: the same turns and shifts
    assert transforms[0:2] != transforms[4:6]  # another seed: others
    drawn = {t for step in transforms for t in step}
    assert len({index for index, _, _ in drawn}) > 4 and any(dy or dx for _, dy, dx in drawn)
    assert runs[0].config.augment == "dihedral+shift"
    assert load_checkpoint(runs[0].last_checkpoint_path)["config"]["augment"] == "dihedral+shift"
    columns = ["loss", "supcon_perturbation", "supcon_batch"]
    a, b = (pd.read_csv(r.metrics_path)[columns].to_numpy() for r in runs[:2])
    np.testing.assert_array_equal(a, b)


def test_resume_is_exact_with_shifts_and_warm_up(small_store: Path, tmp_path: Path) -> None:
    options = {**FAST, "workers": 1, "seed": 5, "val_every": 3, "augment": "dihedral+shift",
               "warmup_steps": 4, "lr": 1e-3}  # fmt: skip
    whole = train(small_store, out=tmp_path / "whole", steps=6, **options)
    train(small_store, out=tmp_path / "half", steps=3, **options)
    resumed = train(small_store, out=tmp_path / "half", resume=True, steps=6)
    expected = load_checkpoint(whole.last_checkpoint_path)
    found = load_checkpoint(resumed.last_checkpoint_path)
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(found["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert found["config"]["augment"] == "dihedral+shift" and found["config"]["warmup_steps"] == 4


def test_augment_of_earlier_runs_reads_as_before(tmp_path: Path) -> None:
    """Before --augment had three values it was on/off: true is dihedral, false none."""
    assert resolve_train_config(overrides={"augment": True}).augment == "dihedral"
    assert resolve_train_config(overrides={"augment": False}).augment == "none"
    config_path = tmp_path / "config.yaml"
    config_path.write_text("augment: true\n")
    assert resolve_train_config(config_path=config_path).augment == "dihedral"
    with pytest.raises(InputError, match="augment"):
        resolve_train_config(overrides={"augment": "rotate"})


def test_a_run_with_the_old_augment_flag_resumes_without_a_change(
    small_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = train(small_store, out=tmp_path / "run", steps=2, val_every=2, augment=True, **FAST)
    checkpoint = load_checkpoint(run.last_checkpoint_path)
    checkpoint["config"]["augment"] = True  # as the on/off version wrote it
    save_checkpoint(checkpoint, run.last_checkpoint_path)
    config_path = tmp_path / "run" / "config.yaml"
    config_path.write_text(config_path.read_text().replace("augment: dihedral", "augment: true"))
    resumed = train(small_store, out=tmp_path / "run", resume=True, steps=3)
    assert resumed.config.augment == "dihedral"
    assert "steps 2 -> 3" in caplog.text and "augment" not in caplog.text  # steps only


# --- --stem ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121"])
def test_stem_output_size(name: str) -> None:
    images = torch.zeros(2, 4, 32, 32)  # (B, C, 32, 32)
    sizes = {}
    for stem in ("imagenet", "small"):
        network = build_encoder(name, in_channels=4, stem=stem).module.eval()
        if name == "densenet121":
            layers = [network.features.conv0, network.features.norm0, network.features.relu0,
                      network.features.pool0]  # fmt: skip
        else:
            layers = [network.conv1, network.bn1, network.relu, network.maxpool]
        with torch.no_grad():
            after_stem = torch.nn.Sequential(*layers)(images)
            features = network(images)
        sizes[stem] = tuple(after_stem.shape[-2:])
        assert features.shape[0] == 2 and features.ndim == 2
    assert sizes == {"imagenet": (8, 8), "small": (32, 32)}


def test_stem_small_is_refused_for_the_tiny_encoder() -> None:
    with pytest.raises(InputError, match="tiny"):
        resolve_train_config(overrides={"encoder": "tiny", "stem": "small"})
    with pytest.raises(InputError, match="tiny"):
        build_encoder("tiny", in_channels=2, stem="small")


def test_stem_travels_with_the_checkpoint(small_store: Path, tmp_path: Path) -> None:
    options = {**FAST, "encoder": "resnet18", "steps": 1, "val_every": 1}
    run = train(small_store, out=tmp_path / "small", stem="small", **options)
    trained = load_trained(run.run_dir, which="best")
    assert trained.model_args["stem"] == "small"
    assert isinstance(trained.model.encoder_perturbation.maxpool, torch.nn.Identity)
    assert trained.model.encoder_perturbation.conv1.kernel_size == (3, 3)
    saved = load_checkpoint(run.best_checkpoint_path)["model"]
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # a checkpoint written before --stem (no "stem" in model_args) had the ImageNet stem
    torch.manual_seed(0)
    old_model = SCBDModel({"encoder": "resnet18", "in_channels": 2, "image_size": 12, "z_dim": 8})
    checkpoint = load_checkpoint(run.best_checkpoint_path)
    checkpoint["model"] = old_model.state_dict()
    checkpoint["model_args"] = {k: v for k, v in checkpoint["model_args"].items() if k != "stem"}
    save_checkpoint(checkpoint, tmp_path / "old.pt")
    old = load_trained(tmp_path / "old.pt")
    assert old.model_args["stem"] == "imagenet"
    assert old.model.encoder_perturbation.conv1.kernel_size == (7, 7)
    with pytest.raises(InputError, match="stem"):  # a resume cannot change the model
        train(small_store, out=tmp_path / "small", resume=True, steps=2, stem="imagenet")


# --- --select -------------------------------------------------------------------------------

# Scripted val rows at steps 2, 4, 6, 8: the total falls throughout, z_c's SupCon is lowest
# at step 4 and ties there at step 6, where z_c's well F1 is lower, so z_c keeps step 6.
SCRIPTED = [
    {"loss": 9.0, "supcon_perturbation": 4.80, "well_f1_z_perturbation": 0.30},
    {"loss": 8.0, "supcon_perturbation": 4.60, "well_f1_z_perturbation": 0.40},
    {"loss": 7.0, "supcon_perturbation": 4.60, "well_f1_z_perturbation": 0.35},
    {"loss": 6.0, "supcon_perturbation": 4.90, "well_f1_z_perturbation": 0.20},
]
EXPECTED = {"total": [2, 4, 6, 8], "z_c": [2, 4, 6, 6]}


def _script_validation(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, float]]:
    """Replace the val pass by the scripted rows, one per call, in order."""
    from scbd_cells.training import loop as training

    rows = [dict(row) for row in SCRIPTED]

    def scripted(self, *args, **kwargs) -> dict[str, float]:
        row = rows.pop(0)
        return {**row, "supcon_batch": 1.0, "invariance": 0.0, "invariance_shuffled": 0.0,
                "well_f1_z_batch": 0.9, "well_f1_chance": 0.25}  # fmt: skip

    monkeypatch.setattr(training._ValidationSet, "evaluate", scripted)
    return rows


@pytest.mark.parametrize("select", ["total", "z_c"])
def test_select_keeps_the_step_its_rule_names(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, select: str
) -> None:
    _script_validation(monkeypatch)
    run = train(small_store, out=tmp_path / "run", steps=8, val_every=2, select=select, **FAST)
    val = pd.read_csv(run.metrics_path).query("phase == 'val'")
    assert list(val["step"]) == [2, 4, 6, 8]
    assert list(val["best_step_total"]) == EXPECTED["total"]
    assert list(val["best_step_z_c"]) == EXPECTED["z_c"]
    assert (run.best_step_total, run.best_step_z_c) == (8, 6)
    assert run.best_step == EXPECTED[select][-1]
    assert load_checkpoint(run.best_checkpoint_path)["step"] == EXPECTED[select][-1]
    assert run.best_val_loss == 6.0  # the lowest total, whichever rule keeps best.pt
    assert resolve_train_config(config_path=run.run_dir / "config.yaml").select == select
    # the other rule's step is kept beside best.pt, and --which names either rule's
    other = "z_c" if select == "total" else "total"
    checkpoints = sorted(path.name for path in (run.run_dir / "checkpoints").iterdir())
    assert checkpoints == ["best.pt", f"best_{other}.pt", "last.pt"]
    for rule in ("total", "z_c"):
        assert load_trained(run.run_dir, which=f"best_{rule}").step == EXPECTED[rule][-1]
    # a run trained before the second file existed: refused with what to do, not best.pt
    (run.run_dir / "checkpoints" / f"best_{other}.pt").unlink()
    with pytest.raises(CheckpointError, match=f"--select {other}.*best_step_{other}"):
        load_trained(run.run_dir, which=f"best_{other}")


def test_select_survives_a_resume(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_validation(monkeypatch)
    train(small_store, out=tmp_path / "run", steps=4, val_every=2, select="z_c", **FAST)
    with pytest.raises(InputError, match="--select total"):
        train(small_store, out=tmp_path / "run", resume=True, steps=8, select="total")
    resumed = train(small_store, out=tmp_path / "run", resume=True, steps=8)
    assert resumed.config.select == "z_c"
    assert (resumed.best_step, resumed.best_step_total) == (6, 8)
    assert load_checkpoint(resumed.best_checkpoint_path)["step"] == 6
    val = pd.read_csv(resumed.metrics_path).query("phase == 'val'")
    assert list(val["best_step_z_c"]) == EXPECTED["z_c"]


def test_selection_rules_against_a_sorted_table() -> None:
    """Each rule's step on every prefix of random val rows, with ties, equals the first row
    of the prefix sorted by the rule's columns (then by step)."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "step": np.arange(1, 41) * 10,
            "loss": rng.integers(0, 6, 40) / 2,
            "supcon_perturbation": rng.integers(0, 5, 40) / 4,
            "well_f1_z_perturbation": rng.integers(0, 3, 40) / 3,
        }
    )
    selection = CheckpointSelection()
    for end, row in enumerate(table.to_dict("records"), start=1):
        selection.update(row, step=int(row["step"]))
        prefix = table.iloc[:end]
        rules = {"total": ["loss"], "z_c": ["supcon_perturbation", "well_f1_z_perturbation"]}
        for rule, columns in rules.items():
            expected = prefix.sort_values([*columns, "step"]).iloc[0]["step"]
            assert selection.best_step(rule) == expected, (rule, end)
    restored = CheckpointSelection.from_state(selection.state_dict())
    assert restored == selection


# --- --warmup-steps -------------------------------------------------------------------------


def test_warmup_factor() -> None:
    assert [warmup_factor(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert warmup_factor(0, warmup_steps=0) == 1.0


def test_warmup_sets_the_rate_of_each_step(small_store: Path, tmp_path: Path) -> None:
    """The optimiser's rate as saved after step s is lr x min(1, s / N) (the rate step s ran at),
    the decoder's group warmed up alike."""
    options = {**FAST, "lr": 1e-3, "warmup_steps": 4, "decoder": True, "decoder_width": 8,
               "decoder_lr": 2e-3, "image_size": 16}  # fmt: skip
    for steps, share in ((2, 0.5), (3, 0.75), (5, 1.0)):
        run = train(small_store, out=tmp_path / f"run{steps}", steps=steps, val_every=1, **options)
        groups = load_checkpoint(run.last_checkpoint_path)["optimizer"]["param_groups"]
        assert [group["lr"] for group in groups] == pytest.approx([1e-3 * share, 2e-3 * share])
    plain = train(small_store, out=tmp_path / "plain", steps=2, val_every=2, lr=1e-3, **FAST)
    groups = load_checkpoint(plain.last_checkpoint_path)["optimizer"]["param_groups"]
    assert groups[0]["lr"] == 1e-3  # no warm-up: the rate as given, from the first step
    assert load_checkpoint(run.last_checkpoint_path)["config"]["warmup_steps"] == 4


# --- the command line ------------------------------------------------------------------------


def test_the_options_on_the_command_line(small_store: Path, tmp_path: Path) -> None:
    """train and sweep take the four options; a bad pairing is a usage error."""
    from typer.testing import CliRunner

    from scbd_cells.cli import app

    common = ["train", str(small_store), "--encoder", "tiny", "--z-dim", "8", "--steps", "2",
              "--val-every", "2", "--classes-per-batch", "6", "--cells-per-class", "4",
              "--workers", "0", "--device", "cpu", "-q"]  # fmt: skip
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, [*common, "--out", str(out), "--augment", "dihedral+shift", "--select", "z_c",
              "--warmup-steps", "3", "--stem", "imagenet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "best.pt: step 2 (--select z_c)" in " ".join(result.output.split())
    saved = resolve_train_config(config_path=out / "config.yaml")
    assert (saved.augment, saved.select, saved.warmup_steps, saved.stem) == (
        "dihedral+shift", "z_c", 3, "imagenet",
    )  # fmt: skip
    refused = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "r2"), "--stem", "small"])
    assert isinstance(refused.exception, InputError)  # cli.main: exit 2, one paragraph
    assert "invalid train options (--stem small changes" in str(refused.exception)
    help_text = CliRunner().invoke(app, ["sweep", "--help"]).output
    for option in ("--augment", "--stem", "--select", "--warmup-steps"):
        assert option in help_text
