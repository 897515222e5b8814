"""The command line as a user meets it: help, version, subcommands, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from scbd_cells import __version__
from scbd_cells.cli import app

COMMANDS = [
    "simulate", "ingest", "info", "train", "embed", "baseline", "correct", "evaluate", "export",
    "demo", "sweep",
]  # fmt: skip
runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_every_subcommand() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output, f"`scbd-cells --help` does not list {command}"


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_package_error_becomes_clean_exit(tmp_path) -> None:
    """A store that does not exist: exit code 1 or 2, a message, no traceback."""
    missing = tmp_path / "missing.zarr"
    result = subprocess.run(
        [sys.executable, "-m", "scbd_cells", "info", str(missing)],
        capture_output=True,
        text=True,
    )
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr
    assert "missing.zarr" in result.stderr


def test_plain_log_lines_follow_the_current_stderr(monkeypatch, capsys) -> None:
    """A command run in-process leaves its root handler behind; once the stderr it saw is
    closed (a notebook cell, a test's CliRunner), later records still print, to today's."""
    import io
    import logging

    from scbd_cells import cli as cli_module

    monkeypatch.setattr(cli_module.console, "force_terminal", False, raising=False)
    earlier = io.StringIO()
    monkeypatch.setattr("sys.stderr", earlier)
    cli_module.configure_logging()
    logging.getLogger("scbd_cells.test").warning("first")
    earlier.close()
    monkeypatch.undo()
    logging.getLogger("scbd_cells.test").warning("second")
    captured = capsys.readouterr().err
    assert "second" in captured and "Logging error" not in captured
    logging.basicConfig(handlers=[], force=True)
