"""Command line: a thin Typer layer that parses options, calls the library and prints a summary.

Each subcommand is one short function calling the library function of the same
name (``scbd_cells.<command>``). Only this module turns the package's
exceptions (:class:`scbd_cells.core.errors.ScbdError`) into exit codes; library code
raises, logs and never exits.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.logging import RichHandler
from typer.core import TyperCommand, TyperGroup

from scbd_cells import __version__
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

# Options of the whole program that are also accepted after the subcommand
# (``scbd-cells ingest ... --quiet``).
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")
# One wording per option across commands.
STORE_URL_HELP = "A local path, or an s3:// or gs:// URL (docs/scaling.md)."


class _Group(TyperGroup):
    """The program: moves -q/-v given after the subcommand in front of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _conventional_metavars(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        flags = [arg for arg in args[:end] if arg in GLOBAL_FLAGS]
        rest = [arg for arg in args[:end] if arg not in GLOBAL_FLAGS]
        return super().parse_args(ctx, flags + rest + args[end:])

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.BadParameter as error:
            error.message = _did_you_mean_choice(error.message)
            raise


def _did_you_mean_choice(message: str) -> str:
    """``'harmoni' is not one of 'harmony', ...`` gains ``Did you mean 'harmony'?``."""
    import difflib

    found = re.search(r"'([^']*)' is not one of ((?:'[^']*'(?:, )?)+)", message)
    if found is None:
        return message
    choices = re.findall(r"'([^']*)'", found.group(2))
    close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
    return f"{message} Did you mean {close[0]!r}?" if close else message


# Typer's type names (<int>, <list[Path]>) as the usual upper-case metavars
_METAVARS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "path": "PATH", "Path": "PATH",
             "bool": "", "file": "FILE", "dir": "DIRECTORY"}  # fmt: skip


def _no_type(ctx: Any) -> None:
    return None


def _conventional_metavars(params: list[Any]) -> None:
    """Upper-case names for arguments and values, none for on/off flags, choices in brackets."""
    for param in params:
        if param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()
            param.display_type_rich = _no_type  # the upper-case name says it, as in click
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        else:
            label = param.display_type(None).strip("<>")
            inner = re.fullmatch(r"list\[(.*)\]", label)
            label = inner.group(1) if inner else label
            param.metavar = _METAVARS.get(label, f"[{label}]" if "|" in label else label.upper())


class _Command(TyperCommand):
    """A subcommand whose help follows the usual conventions.

    Arguments show as upper-case names (``TABLE``, ``OUT_DIR``), on the usage line
    too; on/off flags show no type.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _conventional_metavars(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = param.metavar + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
        return pieces


app = typer.Typer(
    name="scbd-cells",
    cls=_Group,
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


def _split_csv(value: str | None) -> list[str] | None:
    """``"a,b, c"`` -> ``["a", "b", "c"]``; None stays None."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


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


def _split_numbers(value: str | None, *, option: str, expected: str) -> list[float]:
    """``"0.3,1"`` -> ``[0.3, 1.0]``; a word is a usage error naming ``option``."""
    from scbd_cells.core.errors import InputError

    try:
        return [float(part) for part in _split_csv(value) or []]
    except ValueError as error:
        raise InputError(f"{option} must be {expected} ({error}).") from None


# ---------------------------------------------------------------------------
# Options derived from the config models: each declared once, as a model field.
# ---------------------------------------------------------------------------


def _flag_of(field: Any) -> Any:
    from scbd_cells.core.config import Flag

    return next((item for item in field.metadata if isinstance(item, Flag)), Flag())


def _shown_default(name: str, default: Any) -> str:
    """A default as the help shows it; an on/off flag's as click writes it (no-decoder)."""
    if isinstance(default, bool):
        return name.replace("_", "-") if default else f"no-{name.replace('_', '-')}"
    return str(default)


def _csv(values: Any) -> str:
    """``(0.0, 0.3, 10.0)`` -> ``"0,0.3,10"``: a list option's default as it is typed."""
    return ",".join(format(v, "g") if isinstance(v, float) else str(v) for v in values)


def _option_parameter(name: str, field: Any, *, unset: bool) -> inspect.Parameter:
    """The Typer option of one model field.

    ``unset``: the option defaults to None (so YAML and the environment can apply) and the
    help names the model's default; otherwise the option's default is the field's.
    """
    from pydantic_core import PydanticUndefined

    flag = _flag_of(field)
    annotation: Any = field.annotation
    if flag.choices:
        annotation = Literal[flag.choices]
    default = flag.cli_default if flag.cli_default is not None else field.default
    if flag.csv:
        annotation = str | None
        default = None if default is None else _csv(default)
    shown = flag.default_text
    if unset and shown is None and flag.show_default:
        shown = _shown_default(name, default)
    help_text = (field.description or "") + (f" \\[default: {shown}]" if shown else "")
    names = flag.names
    if annotation is bool and not names:
        names = (f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",)
    if unset:
        annotation, default = annotation | None, None
    option = typer.Option(*names, help=help_text, hidden=flag.hidden)
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[annotation, option],
        default=inspect.Parameter.empty if default is PydanticUndefined else default,
    )


def options_from(model: Any, *, exclude: tuple[str, ...] = (), unset: bool = False) -> Any:
    """Give a command one option per field of ``model`` (but ``exclude``), after its own.

    The command receives them in its ``**options``; Typer reads the options from the
    command's ``__signature__``. Adding a field to the model adds the option.
    """

    def decorate(command: Any) -> Any:
        own = inspect.signature(command, eval_str=True)
        kept = [p for p in own.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        derived = [
            _option_parameter(name, field, unset=unset)
            for name, field in model.model_fields.items()
            if name not in exclude
        ]
        command.__signature__ = own.replace(parameters=[*kept, *derived])
        return command

    return decorate



def _split_lists(model: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The comma-separated options of ``model`` (``Flag(csv=True)``) as lists."""
    split = dict(options)
    for name, field in model.model_fields.items():
        if name not in split or not _flag_of(field).csv:
            continue
        if float in typing.get_args(field.annotation):  # tuple[float, ...]
            split[name] = _split_numbers(
                split[name],
                option="--" + name.replace("_", "-"),
                expected=f"numbers separated by commas, e.g. {_csv(field.default)}",
            )
        else:
            split[name] = _split_csv(split[name])
    return split

# ---------------------------------------------------------------------------
# Subcommands. Keep each one short: parse, call the library, print a summary.
# ---------------------------------------------------------------------------


@app.command(cls=_Command)
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


@app.command(cls=_Command)
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
    result = run_ingest(table, out=Path(out), **_split_lists(IngestOptions, options))
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


@app.command(cls=_Command)
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


@app.command(cls=_Command)
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


@app.command(cls=_Command)
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


@app.command(cls=_Command)
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


def _print_table(table, *, relationships: str = "CORUM") -> None:
    from scbd_cells.evaluation.pages import FIELD_COLUMNS

    paper = [
        ("embedding", "embedding", "s"),
        ("corum_auprc", "AUPRC", ".4f"),
        ("corum_recall_5_95", "recall@5/95", ".3f"),
        ("well_f1", "well F1", ".3f"),
        ("well_f1_chance", "chance", ".3f"),
        ("n_genes", "genes", "d"),
        ("n_cells", "cells", ",d"),
    ]
    title = f"Evaluation ({relationships} AUPRC, recall: higher is better; well F1: lower)"
    _print_fitted(_rich_tables(title, table, paper, arrows=False))
    if "overall" in table:
        title = "The field's metrics (JUMP benchmark; all: higher is better)"
        _print_fitted(_rich_tables(title, table, FIELD_COLUMNS, arrows=False))
    if "nsc" in table:
        from scbd_cells.evaluation.moa import MOA_COLUMNS

        title = "Mechanism of action: 1-NN accuracy, not same compound (NSC) / or batch (NSCB)"
        _print_fitted(_rich_tables(title, table, MOA_COLUMNS, arrows=True))
    if "heldout_corum_auprc" in table:
        from scbd_cells.evaluation.holdout import HOLDOUT_COLUMNS

        title = "Held-out batches, apart from the rest"
        _print_fitted(_rich_tables(title, table, HOLDOUT_COLUMNS, arrows=True))


def _print_fitted(views: list) -> None:
    for view in views:
        stdout.print(view)


def _rich_tables(
    title: str,
    table,
    columns: list[tuple[str, str, str]],
    *,
    arrows: bool,
    width: int | None = None,
) -> list:
    """``table``'s ``(column, header, format)`` as Rich tables that fit ``width`` columns.

    No number is squeezed to ``0.…`` and no name is cut: when the columns do not fit the
    console (80 columns in a log or a pipe) the table is split into parts of whole columns,
    each repeating the first (the embedding's name).
    """
    from rich.table import Table

    width = width or stdout.width
    headers = [header if arrows else header.replace(" ↑", "") for _, header, _ in columns]
    cells = [
        [
            str(row[c]) if f == "s" else ("–" if row[c] != row[c] else format(row[c], f))
            for c, _, f in columns
        ]
        for _, row in table.iterrows()
    ]

    def needed(i: int) -> int:  # the widest value or header word, plus the borders
        words = [len(word) for word in headers[i].split()]
        return max([*words, *(len(row[i]) for row in cells)]) + 3

    parts: list[list[int]] = [[]]
    used = 1 + needed(0)
    for i in range(1, len(columns)):
        if parts[-1] and used + needed(i) > width:
            parts.append([])
            used = 1 + needed(0)
        parts[-1].append(i)
        used += needed(i)
    views = []
    for number, part in enumerate(parts, start=1):
        suffix = f" ({number}/{len(parts)})" if len(parts) > 1 else ""
        view = Table(title=title + suffix)
        for i in [0, *part]:
            view.add_column(
                headers[i],
                justify="left" if i == 0 else "right",
                no_wrap=i == 0,
                width=needed(i) - 3,  # headers wrap between words, values stay whole
            )
        for row in cells:
            view.add_row(*[row[i] for i in [0, *part]])
        views.append(view)
    return views


@app.command(cls=_Command)
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
    from scbd_cells.evaluation.report import evaluate as run_evaluate

    result = run_evaluate(embeddings, **_split_lists(EvaluateOptions, options))
    _print_table(result.table, relationships=result.metrics["settings"]["relationships"])
    for text in result.metrics.get("warnings", {}).values():
        console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)
    stdout.print(f"Report: {result.out_dir / 'report.html'} (and report.md, metrics.json)")


@app.command(cls=_Command)
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


@app.command(cls=_Command)
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


@app.command(cls=_Command)
@options_from(DemoOptions)
def demo(
    **options: Any,
) -> None:
    """Simulate -> ingest -> train (alpha=0 and default) -> embed -> baseline -> evaluate."""
    from scbd_cells.pipeline import demo as run_demo

    result = run_demo(**options)
    _print_table(result.table)
    stdout.print(
        f"Report: {result.report_path.with_name('report.html')} (and report.md; total "
        f"{sum(result.seconds.values()) / 60:.1f} min)"
    )


@app.command(cls=_Command)
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

    result = run_reconstruct(run_dir, store, **_split_lists(ReconstructOptions, options))
    stdout.print(
        f"[green]Drew[/] {', '.join(result.perturbations)} -> {result.out_dir} "
        f"({', '.join(path.name for path in result.figure_paths.values())}, index.csv)"
    )


def _print_sweep(result: Any) -> None:
    """One line per alpha (and reference): what the rule read and what the evaluation found."""
    import pandas as pd

    def number(value: Any, fmt: str) -> str:
        return "–" if value is None or value != value else format(value, fmt)

    rows = [
        {
            "alpha": f"{row.alpha:g}" + (" (recommended)" if row.recommended else ""),
            "supcon": number(row.val_supcon_perturbation, ".4f"),
            "kept": number(row.retained, ".0%"),
            "auprc": number(row.corum_auprc, ".4f"),
            "well": number(row.well_f1_over_chance, ".2f"),
            "overall": number(row.overall, ".3f"),
        }
        for row in result.table.itertuples(index=False)
    ]
    rows += [
        {"alpha": str(row.embedding), "supcon": "", "kept": "",
         "auprc": number(row.corum_auprc, ".4f"), "well": number(row.well_f1_over_chance, ".2f"),
         "overall": number(row.overall, ".3f")}
        for row in result.references.itertuples(index=False)
    ]  # fmt: skip
    columns = [("alpha", "alpha", "s"), ("supcon", "val SupCon(z_c)", "s"),
               ("kept", "fall kept", "s"), ("auprc", "CORUM AUPRC", "s"),
               ("well", "well F1 / chance", "s"), ("overall", "overall", "s")]  # fmt: skip
    title = "Alpha sweep (AUPRC, overall: higher is better; well F1 / chance: lower)"
    _print_fitted(_rich_tables(title, pd.DataFrame(rows), columns, arrows=False))


@app.command(cls=_Command)
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

    options = _split_lists(SweepOptions, options)
    options["reference"] = options["reference"] or []
    result = run_sweep(store_path, **options)
    if result.interrupted:
        stdout.print("[yellow]Interrupted[/]; run the same command again to continue.")
        raise typer.Exit(130)
    _print_sweep(result)
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
