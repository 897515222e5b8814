"""docs/quickstart.md, sections 2 and 3, run exactly as written on the `tiny` screen.

Every command of section 2's shell block runs with its documented options (the quickstart's
own first-run options: the tiny encoder, 300 steps), then every Python snippet of sections 2
and 3 in a fresh interpreter, in the same folder. Section 1's demo is run by test_demo.py
(at --preset tiny --steps 2) and timed by benchmarks/first_hour.py.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
from typer.testing import CliRunner

from scbd_cells.cli import app

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"
ROOT = QUICKSTART.parents[1]


def _section(number: int) -> str:
    text = QUICKSTART.read_text()
    start = text.index(f"## {number}.")
    end = text.find(f"## {number + 1}.", start)
    return text[start:] if end < 0 else text[start:end]


def quickstart_commands() -> list[list[str]]:
    """The ``scbd-cells`` commands of section 2's first bash block, as argument lists."""
    block = re.search(r"```bash\n(.*?)```", _section(2), re.S).group(1)
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "scbd-cells", f"not a scbd-cells command: {line}"
            commands.append(words[1:])
    return commands


def quickstart_snippets() -> list[str]:
    """The Python snippets of sections 2 and 3, in order."""
    return [
        snippet
        for number in (2, 3)
        for snippet in re.findall(r"```python\n(.*?)```", _section(number), re.S)
    ]


def test_the_quickstart_block_is_what_this_test_runs() -> None:
    names = [command[0] for command in quickstart_commands()]
    assert names == [
        "simulate", "ingest", "info", "train", "train", "embed", "embed", "baseline",
        "correct", "evaluate", "export",
    ]  # fmt: skip
    assert len(quickstart_snippets()) == 2


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in quickstart_commands():
        result = runner.invoke(app, command)
        assert result.exit_code == 0, f"scbd-cells {shlex.join(command)}:\n{result.output}"
        if command[0] == "evaluate":  # the page people open
            assert f"Report: {Path('report') / 'report.html'}" in result.stdout

    assert (tmp_path / "screen" / "images").is_dir()  # the layout the docs describe
    cells = ad.read_h5ad(tmp_path / "embeddings" / "scbd" / "cells.h5ad", backed="r")
    assert list(cells.var_names[:2]) == ["z0", "z1"]
    assert (tmp_path / "embeddings" / "scbd" / "genes.h5ad").is_file()
    metrics = pd.read_json(tmp_path / "report" / "metrics.json", typ="series")
    assert list(metrics["embeddings"]) == ["scbd", "scbd_alpha0", "baseline", "baseline_harmony"]
    assert (tmp_path / "report" / "report.html").is_file()
    assert len(pd.read_parquet(tmp_path / "guides.parquet")) > 0

    # the first run learned: z_c's SupCon clearly below log B, where a model that learned
    # nothing stays; z_c and z_s hold different things (z_s the well, z_c not)
    curve = pd.read_csv(tmp_path / "runs" / "scbd" / "metrics.csv")
    train_rows = curve[curve["phase"] == "train"]
    batch = 17 * 8  # every perturbation in every batch, 8 cells each
    assert train_rows["supcon_perturbation"].tail(5).mean() < math.log(batch) - 0.1
    last_val = curve[curve["phase"] == "val"].iloc[-1]
    assert last_val["well_f1_z_batch"] > last_val["well_f1_z_perturbation"] + 0.2

    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    for snippet in quickstart_snippets():
        completed = subprocess.run(
            [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert completed.returncode == 0, f"{snippet}\n{completed.stderr[-3000:]}"
    assert (tmp_path / "python" / "report" / "report.html").is_file()
    assert (tmp_path / "figures" / "umap_genes_by_complex.png").is_file()
