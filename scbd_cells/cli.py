"""Command line: a thin Typer layer that parses options, calls the library and prints a summary.

Each subcommand is one short function calling the library function of the same
name (``scbd_cells.<command>``). Only this module turns the package's
exceptions (:class:`scbd_cells.errors.ScbdError`) into exit codes; library code
raises, logs and never exits.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from scbd_cells import __version__
from scbd_cells.errors import ScbdError
from scbd_cells.progress import set_quiet

app = typer.Typer(
    name="scbd-cells",
    help=(
        "Batch correction for single-cell image screens (optical pooled screens, Cell Painting) "
        "with Supervised Contrastive Block Disentanglement.\n\n"
        "Typical flow: simulate (or bring your own table) -> ingest -> train -> embed -> "
        "evaluate. Start with `scbd-cells demo`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)
stdout = Console()


def _version_callback(value: bool) -> None:
    if value:
        stdout.print(f"scbd-cells {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and errors only.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    set_quiet(quiet)


def _split_csv(value: str | None) -> list[str] | None:
    """``"a,b, c"`` -> ``["a", "b", "c"]``; None stays None."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


# ---------------------------------------------------------------------------
# Subcommands. Keep each one short: parse, call the library, print a summary.
# ---------------------------------------------------------------------------

# <subcommands>


def main() -> None:
    """Console-script entry point: run the app, turning package errors into exit codes."""
    try:
        app()
    except ScbdError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)

