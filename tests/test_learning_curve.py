"""examples/learning_curve.py end to end on the tiny demo: runs per budget, one report, curves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from scbd_cells.pipeline import demo

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "learning_curve.py"


def _curve(*arguments: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return completed


@pytest.mark.slow
def test_learning_curve_on_the_tiny_demo(tmp_path: Path) -> None:
    demo(out=tmp_path / "demo", preset="tiny", steps=2, device="cpu", workers=1)
    common = ["--demo", str(tmp_path / "demo"), "--out", str(tmp_path / "curves")]
    _curve(*common, "--steps", "2", "3", "--alphas", "0", "--device", "cpu", "--no-report")
    assert not (tmp_path / "curves" / "curves.csv").exists()
    again = _curve(*common, "--steps", "2", "--alphas", "0", "--device", "cpu", "--both-rules")
    assert "steps_2_alpha_0: embedded, skipped" in again.stdout  # a rerun trains nothing

    for steps in (2, 3):  # each budget is its own run, trained to its own number of steps
        run_dir = tmp_path / "curves" / "runs" / f"steps_{steps}_alpha_0"
        metrics = pd.read_csv(run_dir / "metrics.csv")
        assert metrics["step"].max() == steps
    table = pd.read_csv(tmp_path / "curves" / "curves.csv")
    assert list(table["embedding"]) == [
        "steps_2_alpha_0", "steps_3_alpha_0", "steps_2_alpha_0_zc",  # z_c's rule, same run
        "baseline", "baseline_per_well", "baseline_harmony",
    ]  # fmt: skip
    assert list(table["budget_steps"].iloc[:3]) == [2, 3, 2]
    assert table["budget_steps"][3:].isna().all()
    # one validation, at step 2: both rules keep it, so the zc curve embeds the same weights
    runs = table.set_index("embedding")
    assert runs.loc["steps_2_alpha_0_zc", "variant"] == "zc"
    assert runs.loc["steps_2_alpha_0_zc", "select"] == "z_c"
    assert runs.loc["steps_2_alpha_0_zc", "best_pt_step"] == 2
    for metric in ("corum_auprc", "well_f1"):
        zc, total = runs.loc["steps_2_alpha_0_zc", metric], runs.loc["steps_2_alpha_0", metric]
        assert zc == pytest.approx(total)
    # the references are the demo's own files, scored as the demo scored them
    scored = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    for name in ("baseline", "baseline_per_well", "baseline_harmony"):
        mine, theirs = table.set_index("embedding").loc[name], scored["embeddings"][name]
        assert mine["corum_auprc"] == pytest.approx(theirs["corum_auprc"])
        assert mine["well_f1"] == pytest.approx(theirs["well_f1"])
    assert table["overall"].notna().all()
    assert (tmp_path / "curves" / "curves.png").stat().st_size > 10_000
    assert "steps_3_alpha_0" in (tmp_path / "curves" / "curves.md").read_text()


def _script_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("learning_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_option_sets_name_their_runs() -> None:
    """--variant NAME:option=value,... and --seed S name each run; the names parse back."""
    curve = _script_module()
    assert curve.parse_variant("default") == ("default", {})
    assert curve.parse_variant("all:stem=small,augment=dihedral+shift,warmup-steps=50") == (
        "all", {"stem": "small", "augment": "dihedral+shift", "warmup_steps": "50"},
    )  # fmt: skip
    for bad in ("Big:stem=small", "x:steps=5", "x:stem", "default:stem=small"):
        with pytest.raises(SystemExit):
            curve.parse_variant(bad)
    names = {
        (300, 3.0, "default", 0): "steps_300_alpha_3",  # as before option sets
        (300, 0.5, "small", 0): "steps_300_alpha_0.5_small",
        (1000, 3.0, "default", 2): "steps_1000_alpha_3_seed_2",
        (1000, 3.0, "d4-shift", 1): "steps_1000_alpha_3_d4-shift_seed_1",
    }
    for (steps, alpha, variant, seed), name in names.items():
        assert curve.run_name(steps, alpha, variant, seed) == name
        parsed = curve.RUN_NAME.match(name).groups()
        assert (int(parsed[0]), float(parsed[1])) == (steps, alpha)
        assert (parsed[2] or "default", int(parsed[3] or 0)) == (variant, seed)
