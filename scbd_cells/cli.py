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

@app.command()
def simulate(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the screen to (new or empty).")],
    preset: Annotated[
        str,
        typer.Option(help="tiny (tests, 1.4k cells), demo (15k cells, 64 px), large (1M, 32 px)."),
    ] = "demo",
    layout: Annotated[
        str, typer.Option(help="crops: one (C,H,W) TIFF per cell; fields: fields of view + x/y.")
    ] = "crops",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, identical files.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes drawing and writing images.")] = 1,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing simulated screen in OUT_DIR.")
    ] = False,
    preview: Annotated[
        bool, typer.Option(help="Also write OUT_DIR/preview.png (example cells).")
    ] = False,
    n_genes: Annotated[int | None, typer.Option(help="Targeted genes [preset].")] = None,
    n_complexes: Annotated[int | None, typer.Option(help="Protein complexes [preset].")] = None,
    guides_per_gene: Annotated[int | None, typer.Option(help="Guides per gene [preset].")] = None,
    control_guides: Annotated[int | None, typer.Option(help="Control guides [preset].")] = None,
    cells_per_guide: Annotated[
        int | None, typer.Option(help="Cells per targeting guide [preset].")
    ] = None,
    control_cells_per_guide: Annotated[
        int | None, typer.Option(help="Cells per non-targeting guide [preset].")
    ] = None,
    plates: Annotated[int | None, typer.Option(help="Plates [preset].")] = None,
    wells_per_plate: Annotated[int | None, typer.Option(help="Wells per plate [preset].")] = None,
    crop_size: Annotated[int | None, typer.Option(help="Crop side in px, >= 16 [preset].")] = None,
    effect_strength: Annotated[
        float | None, typer.Option(help="Gene effect multiplier (1 = default, 0 = no biology).")
    ] = None,
    batch_strength: Annotated[
        float | None, typer.Option(help="Well effect multiplier (1 = default, 0 = none).")
    ] = None,
) -> None:
    """Write a synthetic optical pooled screen: cells.csv, images, complexes.txt, truth.json."""
    from scbd_cells.simulation import simulate as run_simulation

    result = run_simulation(
        out_dir, preset=preset, layout=layout, seed=seed, overwrite=overwrite, preview=preview,
        workers=workers, n_genes=n_genes, n_complexes=n_complexes,
        guides_per_gene=guides_per_gene, control_guides=control_guides,
        cells_per_guide=cells_per_guide, control_cells_per_guide=control_cells_per_guide,
        plates=plates, wells_per_plate=wells_per_plate, crop_size=crop_size,
        effect_strength=effect_strength, batch_strength=batch_strength,
    )
    stdout.print(
        f"[green]Simulated[/] {result.n_cells:,} cells ({result.n_genes} genes in "
        f"{result.n_complexes} complexes + control, {result.n_wells} wells, {result.layout}) "
        f"in {result.seconds:.1f} s -> {result.cells_path}"
    )
    if result.preview_path is not None:
        stdout.print(f"Preview: {result.preview_path}")


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

