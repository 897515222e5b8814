"""scbd-cells sweep: alphas trained, embedded and evaluated, resumable, a documented choice."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scbd_cells.core.errors import InputError
from scbd_cells.training.sweeping import recommend_alpha

LOG_B = math.log(128)


def _table(supcon: dict[float, float], **columns) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "alpha": list(supcon),
            "val_supcon_perturbation": list(supcon.values()),
            "log_val_batch_size": LOG_B,
        }
    )
    for name, values in columns.items():
        table[name] = values
    return table


# The demo screen's val perturbation SupCon at the end of 300 steps, seed 0 (docs/training.md,
# "What alpha does on the demo screen"); alpha 1 fell furthest below log 128 = 4.852.
DEMO = {0.0: 4.733, 1.0: 4.725, 3.0: 4.786, 5.0: 4.822, 10.0: 4.846}


def test_rule_picks_the_largest_alpha_within_the_margin() -> None:
    # a CORUM column that would prefer alpha 10: the rule must not read it
    table = _table(DEMO, corum_auprc=[0.1, 0.1, 0.1, 0.1, 0.9])
    chosen = recommend_alpha(table, margin=0.5)
    falls = LOG_B - np.array(list(DEMO.values()))
    np.testing.assert_allclose(chosen.retained, falls / falls.max())
    # kept: 0.94, 1, 0.52, 0.24, 0.05 of the largest fall (alpha 1's)
    assert chosen.within_margin.tolist() == [True, True, True, False, False]
    assert chosen.alpha == 3.0 and "alpha 3" in chosen.reason and "52%" in chosen.reason
    # a tighter margin keeps only what lost less than 40 %
    assert recommend_alpha(table, margin=0.4).alpha == 1.0
    # margin 0: only the best fall itself
    assert recommend_alpha(table, margin=0.0).alpha == 1.0


def test_rule_refuses_to_choose_when_nothing_was_learned() -> None:
    from scbd_cells.training.loop import COLLAPSE_MARGIN as TRAINING_MARGIN
    from scbd_cells.training.sweeping import COLLAPSE_MARGIN

    assert COLLAPSE_MARGIN == TRAINING_MARGIN  # the stall warning's level
    chosen = recommend_alpha(_table({0.0: LOG_B + 0.01, 1.0: LOG_B, 3.0: LOG_B + 0.2}))
    assert chosen.alpha is None and "learned no perturbation" in chosen.reason
    assert not chosen.within_margin.any()
    # a fall within the validation loss's noise (below 1 % of log B = 0.049) is no learning
    # either: a 40-step sweep of the tiny screen fell 0.0067 at best (issue 23)
    noise = recommend_alpha(_table({0.0: LOG_B - 0.0067, 1.0: LOG_B, 3.0: LOG_B - 0.0044}))
    assert noise.alpha is None and "--steps" in noise.reason and "--encoder small" in noise.reason
    assert recommend_alpha(_table({0.0: LOG_B - 0.04, 1.0: LOG_B})).alpha is None
    assert recommend_alpha(_table({0.0: LOG_B - 0.06, 1.0: LOG_B})).alpha == 0.0
    with pytest.raises(InputError, match="margin"):
        recommend_alpha(_table(DEMO), margin=1.0)


def test_overall_scores_span_the_alphas_and_the_references() -> None:
    """The field's overall score is relative to a table: the sweep's is alphas + references."""
    from scbd_cells.evaluation.overall import BATCH_METRICS, BIO_METRICS, overall_scores
    from scbd_cells.training.sweeping import _with_overall

    rng = np.random.default_rng(0)
    metrics = [*BATCH_METRICS, *BIO_METRICS]
    alphas = pd.DataFrame(rng.uniform(size=(3, len(metrics))), columns=metrics)
    alphas.insert(0, "alpha", [0.0, 1.0, 3.0])
    references = pd.DataFrame(rng.uniform(size=(2, len(metrics))), columns=metrics)
    references.insert(0, "embedding", ["baseline", "harmony"])
    with_alphas, with_references = _with_overall(alphas, references)
    expected = overall_scores(pd.concat([alphas, references], ignore_index=True))
    np.testing.assert_allclose(with_alphas["overall"], expected["overall"][:3])
    np.testing.assert_allclose(with_references["overall"], expected["overall"][3:])
    assert list(with_references.columns) == [*references.columns, "batch_score", "bio_score",
                                             "overall"]  # fmt: skip
    alone, none = _with_overall(alphas, pd.DataFrame())
    np.testing.assert_allclose(alone["overall"], overall_scores(alphas)["overall"])
    assert none.empty


def test_alphas_are_checked_and_zero_is_added(tmp_path: Path) -> None:
    from scbd_cells.training.sweeping import _alphas

    assert _alphas(["3", "0.3", "10"]) == [0.0, 0.3, 3.0, 10.0]
    for bad in (["-1"], ["1", "1.0"], ["nan"], [], ["x"]):
        with pytest.raises(InputError, match="--alpha"):
            _alphas(bad)


def test_a_sweep_folder_keeps_what_scbd_cells_did_not_write(tmp_path: Path) -> None:
    """--overwrite removes the sweep's own runs, files and reports; a user's files stay."""
    from scbd_cells.training.sweeping import _mark, _open_sweep_folder

    out = tmp_path / "sweep"
    assert _open_sweep_folder(out, overwrite=False, inputs=[]) is False
    (out / "runs" / "alpha_0").mkdir()
    _mark(out / "runs", ["alpha_0"])
    (out / "sweep.csv").write_text("alpha\n0\n")
    (out / "notes.txt").write_text("mine")
    (out / "runs" / "my_run_notes.txt").write_text("mine too")
    (out / "runs" / ".alpha_0.lock").write_text("")  # as a killed train leaves it
    assert _open_sweep_folder(out, overwrite=False, inputs=[]) is True  # continued
    assert (out / "sweep.csv").exists()
    assert _open_sweep_folder(out, overwrite=True, inputs=[]) is False  # started over
    assert not (out / "sweep.csv").exists() and not (out / "runs" / "alpha_0").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "runs" / "my_run_notes.txt").read_text() == "mine too"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not a scbd-cells alpha sweep folder"):
            _open_sweep_folder(foreign, overwrite=overwrite, inputs=[])
    assert (foreign / "data.csv").read_text() == "x"
    with pytest.raises(InputError, match="input"):
        _open_sweep_folder(tmp_path / "s", overwrite=False, inputs=[tmp_path / "s" / "x.zarr"])


def test_a_second_sweep_on_the_same_folder_exits_at_once(tiny_store: Path, tmp_path) -> None:
    from scbd_cells import sweep
    from scbd_cells.core.outputs import output_lock

    out = tmp_path / "sweep"
    with output_lock(out), pytest.raises(InputError, match="being written by another"):
        sweep(tiny_store, out=out, corum=tmp_path / "c.txt", alpha=[0])
    assert not out.exists()


def test_the_cli_options_reach_the_library(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from scbd_cells.cli import app
    from scbd_cells.training import sweeping

    seen = {}

    def record(store_path, **kwargs):
        seen.update(kwargs, store_path=store_path)
        return sweeping._interrupted(Path(kwargs["out"]))

    monkeypatch.setattr(sweeping, "sweep", record)
    arguments = [
        "sweep", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "sw"), "--corum", "c.txt",
        "--alpha", "0,0.3,8", "--reference", "a.h5ad", "--reference", "b.h5ad",
        "--margin", "0.25", "--steps", "7", "--encoder", "tiny", "--normalize", "arcsinh",
        "--no-stratify", "--classes-per-batch", "5", "--seed", "3", "--config", "o.yaml",
    ]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 130, result.output  # the stand-in reports an interruption
    assert seen["alpha"] == [0.0, 0.3, 8.0]
    assert [str(p) for p in seen["reference"]] == ["a.h5ad", "b.h5ad"]
    assert seen["margin"] == 0.25 and str(seen["config_path"]) == "o.yaml"
    options = {k: v for k, v in seen.items() if v is not None}
    assert options["steps"] == 7 and options["encoder"] == "tiny"
    assert options["normalize"] == "arcsinh" and options["stratify"] is False
    assert options["classes_per_batch"] == 5 and options["seed"] == 3
    bad = CliRunner().invoke(app, ["sweep", "s.zarr", "--out", "o", "--corum", "c", "--alpha",
                                   "0,one"])  # fmt: skip
    assert isinstance(bad.exception, InputError) and "--alpha must be numbers" in str(
        bad.exception
    )  # the entry point turns it into exit code 2


def test_sweep_takes_every_train_option() -> None:
    """The sweep's train options are train's own: names, help and defaults."""
    import typer

    from scbd_cells.cli import app

    commands = typer.main.get_command(app).commands
    train = {p.name: p for p in commands["train"].params}
    sweep = {p.name: p for p in commands["sweep"].params}
    for name in set(train) - {"store_path", "out", "config", "resume", "alpha"}:
        assert name in sweep, name
        assert sweep[name].help == train[name].help and sweep[name].opts == train[name].opts


FAST = dict(
    encoder="tiny", steps=4, val_every=2, classes_per_batch=8, cells_per_class=4, z_dim=8,
    val_batches=1, log_every=1, workers=0, device="cpu",
)  # fmt: skip


@pytest.mark.slow
def test_sweep_end_to_end_resumes_a_killed_run(
    tiny_store: Path, tiny_screen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Ctrl-C in alpha 1's training; the rerun skips alpha 0's finished stages and resumes."""
    import logging

    from scbd_cells import baseline, sweep
    from scbd_cells.training import loop as training

    reference = tmp_path / "baseline.h5ad"
    baseline(tiny_store, out=reference, nucleus_channel="ch2")
    corum = tiny_screen / "complexes.txt"
    out = tmp_path / "sweep"

    real_loss, calls = training.scbd_loss, []

    def ctrl_c_in_alpha_1(*args, **kwargs):
        if kwargs.get("alpha") == 1.0:
            calls.append(1)
            if len(calls) == 4:  # steps 1, 2, the val pass at 2, then step 3
                os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "scbd_loss", ctrl_c_in_alpha_1)
    first = sweep(tiny_store, out=out, corum=corum, alpha=[1], reference=[reference], **FAST)
    assert first.interrupted and not (out / "sweep.csv").exists()
    from scbd_cells.training.checkpoint import load_checkpoint

    assert load_checkpoint(out / "runs" / "alpha_0" / "checkpoints" / "last.pt")["step"] == 4
    assert load_checkpoint(out / "runs" / "alpha_1" / "checkpoints" / "last.pt")["step"] == 3
    assert (out / "embeddings" / "alpha_0.h5ad").exists()
    assert not (out / "embeddings" / "alpha_1.h5ad").exists()
    finished = [
        out / "runs" / "alpha_0" / "checkpoints" / "last.pt",
        out / "embeddings" / "alpha_0.h5ad",
        out / "reports" / "alpha_0" / "metrics.json",
    ]
    written = {path: path.stat().st_mtime_ns for path in finished}

    monkeypatch.setattr(training, "scbd_loss", real_loss)
    caplog.set_level(logging.INFO, logger="scbd_cells")
    result = sweep(tiny_store, out=out, corum=corum, alpha=[1], reference=[reference], **FAST)
    assert not result.interrupted
    assert {path: path.stat().st_mtime_ns for path in finished} == written  # not redone
    assert "alpha_1: resuming the training at step 3 of 4" in caplog.text
    assert "alpha_0: trained (step 4 of 4), skipped" in caplog.text
    assert load_checkpoint(out / "runs" / "alpha_1" / "checkpoints" / "last.pt")["step"] == 4

    table = pd.read_csv(out / "sweep.csv")
    assert table["alpha"].tolist() == [0.0, 1.0]  # alpha 0 added
    # 4 steps of the tiny encoder learn little: the rule may decline to recommend (issue 23),
    # but the table and the result always agree
    recommended = table.loc[table["recommended"], "alpha"].tolist()
    assert recommended == ([] if result.recommended_alpha is None else [result.recommended_alpha])
    metrics = json.loads((out / "reports" / "alpha_1" / "metrics.json").read_text())
    assert table.loc[1, "corum_auprc"] == pytest.approx(
        metrics["embeddings"]["alpha_1"]["corum_auprc"]
    )
    val = pd.read_csv(out / "runs" / "alpha_1" / "metrics.csv")
    best_step = table.loc[1, "best_step"]
    at_best = val[(val["phase"] == "val") & (val["step"] == best_step)]
    assert table.loc[1, "val_supcon_perturbation"] == pytest.approx(
        at_best["supcon_perturbation"].item()
    )
    assert np.isfinite(table[["overall", "bio_score", "well_f1_over_chance"]]).all().all()
    references = pd.read_csv(out / "references.csv")
    assert references["embedding"].tolist() == ["baseline"]
    assert (out / "tradeoff.png").stat().st_size > 10_000
    if result.recommended_alpha is None:
        assert "cannot recommend" in (out / "sweep.md").read_text()
    else:
        assert f"Recommended α: {result.recommended_alpha:g}" in (out / "sweep.md").read_text()
