"""benchmarks/gpu_suite.sh: every stage runs at tiny sizes on the CPU, and the section it writes
into docs/performance.md replaces its earlier one and nothing else."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_section_is_replaced_between_its_markers_and_nothing_else() -> None:
    suite = _suite_module()
    start, end = suite.START_MARKER, suite.END_MARKER
    first = f"{start}\nold figures\n{end}\n"
    second = f"{start}\nnew figures\n{end}\n"
    document = "# Performance\n\nearlier text\n"
    once = suite.replace_section(document, first)
    assert once == f"# Performance\n\nearlier text\n\n{first}"  # appended when absent
    later = once + "\n### a later section\n\nkept\n"
    again = suite.replace_section(later, second)
    assert again == later.replace("old figures", "new figures")
    assert again.count(start) == 1 and again.count(end) == 1
    assert suite.replace_section(again, second) == again  # a rerun changes nothing more


@pytest.mark.slow
def test_dry_run_on_the_cpu_runs_every_stage(tmp_path: Path) -> None:
    suite = _suite_module()
    performance = tmp_path / "performance.md"
    stale = f"{suite.START_MARKER}\nstale\n{suite.END_MARKER}"
    performance.write_text(f"# Performance\n\nbefore\n\n{stale}\n\nafter\n")
    repository_file = (REPO / "docs" / "performance.md").read_text()
    completed = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--device", "cpu",
         "--work-dir", str(tmp_path / "work"), "--performance-md", str(performance),
         "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "work" / "suite.json").read_text())
    assert [r["name"] for r in results] == [name for name, *_ in suite.STAGES]
    assert {r["name"]: r["status"] for r in results} == {r["name"]: "ok" for r in results}
    assert results[0]["figures"]["files"] == ["tests/test_gpu.py", "tests/test_loader.py"]
    point = next(r for r in results if r["name"] == "learning_point")["figures"]
    assert 0 <= point["corum_auprc"] <= 1 and point["well_f1_chance"] > 0

    text = performance.read_text()
    assert text.startswith("# Performance\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "stale" not in text and text.count(suite.START_MARKER) == 1
    assert "DRY RUN" in text and "learning-curve point" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpu_point_curves.png", "performance.md", "section.md", "suite.json", "suite.log",
    ]  # fmt: skip
    # the repository's own file and figures are left alone by a dry run
    assert (REPO / "docs" / "performance.md").read_text() == repository_file
