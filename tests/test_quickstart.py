"""docs/quickstart.md, section 2, run as written on the `tiny` screen.

Every command of the section's shell block runs with its documented options; only
`train` gets a small encoder and a few steps, so the test takes about a minute.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
from typer.testing import CliRunner

from scbd_cells.cli import app

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"
SMALL_TRAINING = ["--steps", "4", "--encoder", "tiny", "--val-every", "2"]


def quickstart_commands() -> list[list[str]]:
    """The ``scbd-cells`` commands of section 2's first bash block, as argument lists."""
    text = QUICKSTART.read_text()
    section = text[text.index("## 2.") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "scbd-cells", f"not a scbd-cells command: {line}"
            commands.append(words[1:])
    return commands


def test_the_quickstart_block_is_what_this_test_runs() -> None:
    names = [command[0] for command in quickstart_commands()]
    assert names == [
        "simulate", "ingest", "info", "train", "train", "embed", "embed", "baseline",
        "correct", "evaluate", "export",
    ]  # fmt: skip


def test_quickstart_commands_run_on_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in quickstart_commands():
        if command[0] == "train":
            command = [*command, *SMALL_TRAINING]
        result = runner.invoke(app, command)
        assert result.exit_code == 0, f"scbd-cells {shlex.join(command)}:\n{result.output}"

    assert (tmp_path / "screen" / "images").is_dir()  # the layout the docs describe
    cells = ad.read_h5ad(tmp_path / "embeddings" / "scbd" / "cells.h5ad", backed="r")
    assert list(cells.var_names[:2]) == ["z0", "z1"]
    assert (tmp_path / "embeddings" / "scbd" / "genes.h5ad").is_file()
    metrics = pd.read_json(tmp_path / "report" / "metrics.json", typ="series")
    assert list(metrics["embeddings"]) == ["scbd", "scbd_alpha0", "baseline", "baseline_harmony"]
    assert (tmp_path / "report" / "report.html").is_file()
    assert len(pd.read_parquet(tmp_path / "guides.parquet")) > 0
