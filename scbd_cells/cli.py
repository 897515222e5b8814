"""Command line: a thin Typer layer that parses options, calls the library and prints a summary.

Each subcommand is one short function calling the library function of the same
name (``scbd_cells.<command>``). Only this module turns the package's
exceptions (:class:`scbd_cells.core.errors.ScbdError`) into exit codes; library code
raises, logs and never exits.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from scbd_cells import __version__
from scbd_cells.core.commandline import Command, Group, options_from, split_lists
from scbd_cells.core.config import (
    BaselineOptions,
    CorrectOptions,
    DemoOptions,
    EmbedOptions,
    EvaluateOptions,
    ExportOptions,
    InfoOptions,
    IngestOptions,
    ReconstructOptions,
    SimulateOptions,
    SweepOptions,
    TrainConfig,
)
from scbd_cells.core.errors import ScbdError
from scbd_cells.core.progress import set_quiet

# One wording per option across commands.
STORE_URL_HELP = "A local path, or an s3:// or gs:// URL (docs/scaling.md)."


app = typer.Typer(
    name="scbd-cells",
    cls=Group,
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
stdout = Console(soft_wrap=True)  # result lines keep their paths whole (no wrap inserted)


def _version_callback(value: bool) -> None:
    if value:
        stdout.print(f"scbd-cells {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and errors only.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    configure_logging(verbose=verbose, quiet=quiet)
    set_quiet(quiet)


class _CurrentStderrHandler(logging.StreamHandler):
    """Plain lines to whatever ``sys.stderr`` is when a record comes, not the one at setup.

    A command run in-process (a notebook, a test's CliRunner) may leave this root handler
    behind after its stderr was closed; later records would then fail to print.
    """

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; always use sys.stderr
        pass


def configure_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """scbd-cells' own messages at INFO (DEBUG with -v, WARNING with -q); other libraries'
    at WARNING (matplotlib's at ERROR). On a terminal lines are Rich's, with times; piped or
    redirected to a file they are plain lines that are never wrapped.
    """
    if console.is_terminal:
        handler: logging.Handler = RichHandler(
            console=console, show_path=False, rich_tracebacks=False
        )
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = _CurrentStderrHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        )
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.getLogger("scbd_cells").setLevel(level)
    logging.getLogger("matplotlib").setLevel(logging.ERROR)


def _print_all(views: list) -> None:
    """Rich tables, one after another, on stdout."""
    for view in views:
        stdout.print(view)


def store_argument(value: str) -> Path | str:
    """A store argument as the readers take it: the URL of a store on object storage kept a
    ``str`` (``Path`` would turn ``s3://`` into ``s3:/``), a local path as a ``Path``."""
    from scbd_cells.core.outputs import object_url

    return object_url(value) or Path(value)


def refuse_object_storage_out(out: str) -> None:
    """Refuse ``ingest --out s3://...``: ingest writes a local store (docs/scaling.md)."""
    from scbd_cells.core.errors import InputError
    from scbd_cells.core.outputs import object_url

    url = object_url(out)
    if url is not None:
        raise InputError(
            f"ingest writes stores to a local or shared file system, not to {url}: object "
            "storage has no atomic rename or file lock, which the unfinished-store, resume and "
            "one-writer guarantees rely on. Ingest into a local STORE.zarr, then copy it, e.g. "
            f"`aws s3 sync STORE.zarr {url}`; info, train, embed and baseline read it there "
            '(docs/scaling.md, "Stores on object storage").'
        )


# ---------------------------------------------------------------------------
# Subcommands. Keep each one short: parse, call the library, print a summary.
# ---------------------------------------------------------------------------


@app.command(cls=Command)
@options_from(SimulateOptions)
def simulate(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the screen to (new or empty).")],
    **options: Any,
) -> None:
    """Write a synthetic optical pooled screen: cells.csv, images, complexes.txt, truth.json."""
    from scbd_cells.sim.screen import simulate as run_simulation

    result = run_simulation(out_dir, **options)
    arrayed = options["layout"] == "arrayed"
    genes, groups = ("compounds", "mechanisms") if arrayed else ("genes", "complexes")
    stdout.print(
        f"[green]Simulated[/] {result.n_cells:,} cells ({result.n_genes} {genes} in "
        f"{result.n_complexes} {groups} + control, {result.n_wells} wells, {result.layout}) "
        f"in {result.seconds:.1f} s -> {result.cells_path}"
    )
    if result.preview_path is not None:
        stdout.print(f"Preview: {result.preview_path}")


@app.command(cls=Command)
@options_from(IngestOptions)
def ingest(
    table: Annotated[
        Path, typer.Argument(help="Cells table: CSV, TSV or Parquet, one row per cell.")
    ],
    out: Annotated[
        str, typer.Option(help="Store to write (STORE.zarr), on a local or shared file system.")
    ],
    **options: Any,
) -> None:
    """Turn a cells table and its images (crops or fields of view) into a store.

    Rerun the same command after a crash to resume.
    """
    from scbd_cells.data.ingest import ingest as run_ingest

    refuse_object_storage_out(out)
    result = run_ingest(table, out=Path(out), **split_lists(IngestOptions, options))
    if result.already_complete:
        stdout.print(
            f"[green]Already complete[/]: {result.store_path} holds {result.n_cells:,} cells "
            "ingested from this table with these options; nothing to do."
        )
        return
    height, width = result.image_size
    stdout.print(
        f"[green]Ingested[/] {result.n_cells:,} cells ({len(result.channel_names)} channels "
        f"{','.join(result.channel_names)}, {height}x{width} px, {result.dtype}) in "
        f"{result.seconds:.1f} s ({result.cells_per_second:,.0f} cells/s"
        f"{', resumed' if result.resumed else ''}) -> {result.store_path}"
    )
    if result.n_rejected or result.n_border:
        stdout.print(
            f"Left out {result.n_rejected:,} bad rows and {result.n_border:,} border cells "
            f"(listed in {result.store_path / 'rejected.csv'})."
        )
    if result.n_blank:
        stdout.print(f"[yellow]{result.n_blank:,} cells are entirely zero[/] (kept; check them).")


@app.command(cls=Command)
@options_from(InfoOptions)
def info(
    store: Annotated[
        str, typer.Argument(help=f"A store written by `scbd-cells ingest`. {STORE_URL_HELP}")
    ],
    **options: Any,
) -> None:
    """What is in a store: cells, channels, labels, split, size, format version."""
    import json

    from rich.table import Table

    from scbd_cells.data.store import open_store

    json_output, verify, workers = options["json_output"], options["verify"], options["workers"]
    opened = open_store(store_argument(store))
    summary = opened.summary()
    damaged = opened.verify(workers=workers) if verify else None
    if damaged is not None:
        summary["damaged_ranges"] = [list(pair) for pair in damaged]
    if json_output:
        stdout.print_json(json.dumps(summary))
    if damaged:
        from scbd_cells.core.errors import StoreError

        listed = ", ".join(f"{a}-{b - 1}" for a, b in damaged[:20])
        more = f" (and {len(damaged) - 20} more ranges)" if len(damaged) > 20 else ""
        raise StoreError(
            f"The store {store} is damaged: {sum(b - a for a, b in damaged):,} cells in "
            f"{len(damaged)} range(s) cannot be read: cells {listed}{more}. Re-ingest the table "
            "(or restore the store from a copy)."
        )
    if json_output:
        return
    per_class = summary["cells_per_perturbation"]
    splits = summary["splits"]
    control = summary["control"]
    rows = [
        ("cells", f"{summary['n_cells']:,}"),
        ("channels", f"{summary['n_channels']}: {', '.join(summary['channel_names'])}"),
        ("image size", "x".join(map(str, summary["image_size"])) + f" px, {summary['dtype']}"),
        (
            "size on disk",
            f"{summary['size_bytes'] / 2**20:,.1f} MiB "
            f"(raw {summary['raw_bytes'] / 2**20:,.1f} MiB)",
        ),
        (
            "perturbations",
            f"{summary['n_perturbations']:,} (cells per class: min {per_class['min']:,}, "
            f"median {per_class['median']:,.0f}, max {per_class['max']:,})",
        ),
        ("guides", f"{summary['n_guides']:,}"),
        ("batches", f"{summary['n_batches']:,}"),
        ("control", f"{control} ({summary['control_cells']:,} cells)" if control else "none"),
        ("split", f"train {splits['train']:,} / val {splits['val']:,} / test {splits['test']:,}"),
        ("left out", f"{summary['n_rejected']:,} bad rows, {summary['n_border']:,} border cells"),
        ("blank cells", f"{summary['n_blank']:,} (every pixel zero)"),
        ("format", f"{summary['format']} (scbd-cells {summary['version']}, {summary['created']})"),
    ]
    if damaged is not None:
        rows.append(("verified", f"every chunk of {summary['n_cells']:,} cells reads back intact"))
    table = Table(title=str(store), show_header=False)
    for name, value in rows:
        table.add_row(name, value)
    stdout.print(table)


@app.command(cls=Command)
@options_from(TrainConfig, unset=True)
def train(
    store_path: Annotated[
        str, typer.Argument(help=f"Store written by `scbd-cells ingest`. {STORE_URL_HELP}")
    ],
    out: Annotated[Path, typer.Option(help="Run folder: config, metrics, curves, checkpoints.")],
    config: Annotated[
        Path | None, typer.Option(help="YAML options (e.g. a run's config.yaml); CLI wins.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out exactly where it stopped.")
    ] = False,
    **options: Any,
) -> None:
    """Train SCBD: z_c keeps the perturbation, z_s takes the well (docs/training.md)."""
    from scbd_cells.training.loop import train as run_training

    result = run_training(
        store_argument(store_path), out=out, config_path=config, resume=resume, **options
    )
    val = result.final_val
    if val:
        stdout.print(
            f"step {result.step}: val loss {val['loss']:.4f} (best {result.best_val_loss:.4f}); "
            f"well F1 z_c {val['well_f1_z_perturbation']:.3f}, z_s {val['well_f1_z_batch']:.3f}, "
            f"chance {val['well_f1_chance']:.3f}"
        )
    if result.best_step is not None:
        stdout.print(
            f"best.pt: step {result.best_step} (--select {result.config.select}); the lowest "
            f"total val loss is at step {result.best_step_total}, the lowest val SupCon(z_c) "
            f"at step {result.best_step_z_c}"
        )
    if result.interrupted:
        stdout.print(f"[yellow]Interrupted[/] at step {result.step}; continue with --resume.")
        raise typer.Exit(130)
    stdout.print(f"[green]Trained[/] -> {result.best_checkpoint_path}")


@app.command(cls=Command)
@options_from(EmbedOptions)
def embed(
    run_dir: Annotated[Path, typer.Argument(help="Training run folder (or a checkpoint .pt).")],
    store: Annotated[
        str,
        typer.Argument(help=f"Store to embed (channels must fit the model). {STORE_URL_HELP}"),
    ],
    **options: Any,
) -> None:
    """Embed every cell: X = z_c, obsm["X_scbd_batch"] = z_s, obs = the store's cell table."""
    from scbd_cells.embedding.encode import embed as run_embed

    result = run_embed(run_dir, store_argument(store), **options)
    stdout.print(f"[green]Embedded[/] {result.n_cells:,} cells -> {result.out_path}")
    if result.genes_path is not None:
        stdout.print(f"Profiles: {result.guides_path}, {result.genes_path}")


@app.command(cls=Command)
@options_from(BaselineOptions)
def baseline(
    store: Annotated[str, typer.Argument(help=f"Store to measure. {STORE_URL_HELP}")],
    **options: Any,
) -> None:
    """CellProfiler-style reference: intensity, shape and texture features per cell, then PCA."""
    from scbd_cells.profiles.features import baseline as run_baseline

    result = run_baseline(store_argument(store), **options)
    stdout.print(
        f"[green]Baseline[/] {result.n_cells:,} cells x {result.n_features} features -> PCA "
        f"{result.n_components} ({100 * result.explained_variance:.0f}% variance) -> "
        f"{result.out_path}"
    )


@app.command(cls=Command)
@options_from(EvaluateOptions)
def evaluate(
    embeddings: Annotated[
        list[Path],
        typer.Argument(
            help="Cell-level AnnData files (.h5ad/.zarr) or pycytominer tables (.parquet/.csv) "
            "to compare."
        ),
    ],
    **options: Any,
) -> None:
    """The paper's tasks (CORUM, well F1) and the field's metrics (mAP, batch mixing, overall)."""
    from scbd_cells.evaluation.console import result_tables
    from scbd_cells.evaluation.report import evaluate as run_evaluate

    result = run_evaluate(embeddings, **split_lists(EvaluateOptions, options))
    relationships = result.metrics["settings"]["relationships"]
    _print_all(result_tables(result.table, relationships=relationships, width=stdout.width))
    for text in result.metrics.get("warnings", {}).values():
        console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)
    stdout.print(f"Report: {result.out_dir / 'report.html'} (and report.md, metrics.json)")


@app.command(cls=Command)
@options_from(CorrectOptions)
def correct(
    profiles: Annotated[
        Path,
        typer.Argument(
            help="Cell-level AnnData (.h5ad/.zarr): embed, baseline, your own; or a pycytominer "
            "table (.parquet/.csv)."
        ),
    ],
    **options: Any,
) -> None:
    """A standard batch correction of cell profiles (the JUMP benchmark's comparators).

    Harmony's output records its fit, so later plates can be mapped onto it with
    --reference (docs/new-plates.md).
    """
    from scbd_cells.profiles.corrections import correct as run_correct

    result = run_correct(profiles, **options)
    reference = options["reference"]
    mapped = f" mapped onto {reference}" if reference is not None else ""
    stdout.print(
        f"[green]Corrected[/] {result.n_cells:,} cells x {result.n_features} features with "
        f"{result.method}{mapped} -> {result.out_path}"
    )


@app.command(cls=Command)
@options_from(ExportOptions)
def export(
    embedding: Annotated[
        Path,
        typer.Argument(help="Cell-level AnnData (.h5ad/.zarr), or a pycytominer .parquet/.csv."),
    ],
    **options: Any,
) -> None:
    """Profiles with Metadata_ columns, for pycytominer and copairs (docs/evaluation.md)."""
    from scbd_cells.profiles.exports import export as run_export

    result = run_export(embedding, **options)
    stdout.print(
        f"[green]Exported[/] {result.n_rows:,} {result.level} profiles x {result.n_features} "
        f"features -> {result.out_path}"
    )


@app.command(cls=Command)
@options_from(DemoOptions)
def demo(
    **options: Any,
) -> None:
    """Simulate -> ingest -> train (alpha=0 and default) -> embed -> baseline -> evaluate."""
    from scbd_cells.evaluation.console import result_tables
    from scbd_cells.pipeline import demo as run_demo

    result = run_demo(**options)
    _print_all(result_tables(result.table, width=stdout.width))
    stdout.print(
        f"Report: {result.report_path.with_name('report.html')} (and report.md; total "
        f"{sum(result.seconds.values()) / 60:.1f} min)"
    )


@app.command(cls=Command)
@options_from(ReconstructOptions)
def reconstruct(
    run_dir: Annotated[
        Path, typer.Argument(help="Training run folder trained with --decoder (or its .pt).")
    ],
    store: Annotated[Path, typer.Argument(help="Store whose cells are drawn (any plate).")],
    **options: Any,
) -> None:
    """Pictures of what z_c and z_s hold: reconstructions and swaps from the decoder.

    Writes reconstructions.png, swap_well.png ("this cell as if imaged in well B"),
    swap_perturbation.png ("well A's look with perturbation B"), each also as
    *_channels.png, and index.csv (the cells used). Needs a run trained with --decoder.
    """
    from scbd_cells.embedding.reconstruction import reconstruct as run_reconstruct

    result = run_reconstruct(run_dir, store, **split_lists(ReconstructOptions, options))
    stdout.print(
        f"[green]Drew[/] {', '.join(result.perturbations)} -> {result.out_dir} "
        f"({', '.join(path.name for path in result.figure_paths.values())}, index.csv)"
    )


@app.command(cls=Command)
@options_from(TrainConfig, exclude=("alpha",), unset=True)
@options_from(SweepOptions)
def sweep(
    store_path: Annotated[Path, typer.Argument(help="Store written by `scbd-cells ingest`.")],
    **options: Any,
) -> None:
    """Train, embed and evaluate SCBD at several alphas; draw the trade-off, recommend one.

    Every train option below applies to each alpha's run (docs/training.md, Choosing alpha).
    """
    from scbd_cells.training.sweeping import sweep as run_sweep
    from scbd_cells.training.sweeping import sweep_tables

    options = split_lists(SweepOptions, options)
    options["reference"] = options["reference"] or []
    result = run_sweep(store_path, **options)
    if result.interrupted:
        stdout.print("[yellow]Interrupted[/]; run the same command again to continue.")
        raise typer.Exit(130)
    _print_all(sweep_tables(result, width=stdout.width))
    stdout.print(f"[green]Recommended alpha[/]: {result.reason}")
    stdout.print(f"Sweep: {result.summary_path} (figure {result.figure_path.name})")


# <subcommands>


def _os_error_message(error: OSError) -> str:
    """One paragraph for a failed file operation: the path, the cause, the fix."""
    import errno

    path = Path(error.filename) if error.filename else None
    where = f" {path}" if path else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full: could not write{where}. Free some space and run it again."
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"no permission to write{where} ({error.strerror}). Choose a --out in a folder you "
            "can write to."
        )
    return f"{error.strerror or error}{':' + where if where else ''}."


def _verbose() -> bool:
    return logging.getLogger("scbd_cells").isEnabledFor(logging.DEBUG)


def main() -> None:
    """Console-script entry point: run the app, turning errors into messages and exit codes.

    A package error (:class:`ScbdError`) or a failed file operation prints one
    paragraph; anything else prints its type and message and asks for
    ``--verbose``, which adds the traceback to any error.
    """
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as error:
        if _verbose():
            console.print_exception()
        if isinstance(error, ScbdError):
            message, code = str(error), error.exit_code
        elif isinstance(error, OSError):
            message, code = _os_error_message(error), 1
        else:
            message, code = (
                f"unexpected {type(error).__name__}: {error}. This is a bug in scbd-cells: run "
                "the command again with --verbose for the traceback, and please report it.",
                1,
            )
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        if not _verbose():
            # zarr's event loop, torn down mid-write, would log its unfinished tasks at exit:
            # noise after the error was said
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sys.exit(code)
