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
    again = _curve(*common, "--steps", "2", "--alphas", "0", "--device", "cpu")
    assert "steps_2_alpha_0: embedded, skipped" in again.stdout  # a rerun trains nothing

    for steps in (2, 3):  # each budget is its own run, trained to its own number of steps
        run_dir = tmp_path / "curves" / "runs" / f"steps_{steps}_alpha_0"
        metrics = pd.read_csv(run_dir / "metrics.csv")
        assert metrics["step"].max() == steps
    table = pd.read_csv(tmp_path / "curves" / "curves.csv")
    assert list(table["embedding"]) == [
        "steps_2_alpha_0", "steps_3_alpha_0", "baseline", "baseline_per_well", "baseline_harmony",
    ]  # fmt: skip
    assert list(table["budget_steps"].iloc[:2]) == [2, 3] and table["budget_steps"][2:].isna().all()
    # the references are the demo's own files, scored as the demo scored them
    scored = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    for name in ("baseline", "baseline_per_well", "baseline_harmony"):
        mine, theirs = table.set_index("embedding").loc[name], scored["embeddings"][name]
        assert mine["corum_auprc"] == pytest.approx(theirs["corum_auprc"])
        assert mine["well_f1"] == pytest.approx(theirs["well_f1"])
    assert table["overall"].notna().all()
    assert (tmp_path / "curves" / "curves.png").stat().st_size > 10_000
    assert "steps_3_alpha_0" in (tmp_path / "curves" / "curves.md").read_text()
