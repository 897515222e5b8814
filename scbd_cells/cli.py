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
from scbd_cells.core.config import DEVICE_HELP, IngestOptions, TrainConfig
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
        default = None if default is None else ",".join(map(str, default))
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
            flag = "--" + name.replace("_", "-")
            default = ",".join(map(str, field.default))
            split[name] = _split_numbers(
                split[name], option=flag, expected=f"three numbers, e.g. {default}"
            )
        else:
            split[name] = _split_csv(split[name])
    return split

# ---------------------------------------------------------------------------
# Subcommands. Keep each one short: parse, call the library, print a summary.
# ---------------------------------------------------------------------------


@app.command(cls=_Command)
def simulate(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the screen to (new or empty).")],
    preset: Annotated[
        Literal["tiny", "demo", "large"],
        typer.Option(help="tiny (tests, 1.4k cells), demo (15k cells, 64 px), large (1M, 32 px)."),
    ] = "demo",
    layout: Annotated[
        Literal["crops", "fields", "arrayed"],
        typer.Option(
            help="crops: one (C,H,W) TIFF per cell; fields: fields of view + x/y; arrayed: an "
            "arrayed screen (compound x concentration per well, DMSO wells, plates in batches, "
            "moa.gmt) as crops."
        ),
    ] = "crops",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, identical files.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes drawing and writing images at once.")] = 2,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing simulated screen in OUT_DIR.")
    ] = False,
    preview: Annotated[
        bool, typer.Option(help="Also write OUT_DIR/preview.png (example cells).")
    ] = False,
    n_genes: Annotated[
        int | None, typer.Option(help="Targeted genes \\[default: set by --preset]")
    ] = None,
    n_complexes: Annotated[
        int | None, typer.Option(help="Protein complexes \\[default: set by --preset]")
    ] = None,
    guides_per_gene: Annotated[
        int | None, typer.Option(help="Guides per gene \\[default: set by --preset]")
    ] = None,
    control_guides: Annotated[
        int | None, typer.Option(help="Control guides \\[default: set by --preset]")
    ] = None,
    cells_per_guide: Annotated[
        int | None, typer.Option(help="Cells per targeting guide \\[default: set by --preset]")
    ] = None,
    control_cells_per_guide: Annotated[
        int | None, typer.Option(help="Cells per non-targeting guide \\[default: set by --preset]")
    ] = None,
    plates: Annotated[int | None, typer.Option(help="Plates \\[default: set by --preset]")] = None,
    wells_per_plate: Annotated[
        int | None, typer.Option(help="Wells per plate \\[default: set by --preset]")
    ] = None,
    crop_size: Annotated[
        int | None, typer.Option(help="Crop side in px, >= 16 \\[default: set by --preset]")
    ] = None,
    effect_strength: Annotated[
        float | None,
        typer.Option(
            help="Gene effect multiplier (0 = no biology). \\[default: demo 3, other presets 1]"
        ),
    ] = None,
    batch_strength: Annotated[
        float | None, typer.Option(help="Well effect multiplier (1 = default, 0 = none).")
    ] = None,
    holdout_plates: Annotated[
        int | None,
        typer.Option(
            help="Hold out the last K plates: technical effects unlike any other plate's (a new "
            "plate); cells.csv gets a 'holdout' column (docs/new-plates.md). \\[default: 0]"
        ),
    ] = None,
) -> None:
    """Write a synthetic optical pooled screen: cells.csv, images, complexes.txt, truth.json."""
    from scbd_cells.sim.screen import simulate as run_simulation

    result = run_simulation(
        out_dir,
        preset=preset,
        layout=layout,
        seed=seed,
        overwrite=overwrite,
        preview=preview,
        workers=workers,
        n_genes=n_genes,
        n_complexes=n_complexes,
        guides_per_gene=guides_per_gene,
        control_guides=control_guides,
        cells_per_guide=cells_per_guide,
        control_cells_per_guide=control_cells_per_guide,
        plates=plates,
        wells_per_plate=wells_per_plate,
        crop_size=crop_size,
        effect_strength=effect_strength,
        batch_strength=batch_strength,
        holdout_plates=holdout_plates,
    )
    genes, groups = ("compounds", "mechanisms") if layout == "arrayed" else ("genes", "complexes")
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
def info(
    store: Annotated[
        str, typer.Argument(help=f"A store written by `scbd-cells ingest`. {STORE_URL_HELP}")
    ],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            help="Read every chunk and check its checksum; list damaged cell ranges "
            "(exit 1 if any)."
        ),
    ] = False,
    workers: Annotated[int, typer.Option(help="Threads reading chunks (with --verify).")] = 2,
) -> None:
    """What is in a store: cells, channels, labels, split, size, format version."""
    import json

    from rich.table import Table

    from scbd_cells.data.store import open_store

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
def embed(
    run_dir: Annotated[Path, typer.Argument(help="Training run folder (or a checkpoint .pt).")],
    store: Annotated[
        str,
        typer.Argument(help=f"Store to embed (channels must fit the model). {STORE_URL_HELP}"),
    ],
    out: Annotated[Path, typer.Option(help="Cells AnnData to write: .h5ad or .zarr.")],
    aggregate: Annotated[
        bool, typer.Option(help="Also write guides.h5ad and genes.h5ad beside --out.")
    ] = False,
    representation: Annotated[
        Literal["projection", "encoder"],
        typer.Option(help="projection (z only) or encoder (also r_c, r_s in obsm)."),
    ] = "projection",
    batch_size: Annotated[int, typer.Option(help="Cells per forward pass.")] = 1024,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    which: Annotated[
        Literal["best", "last"],
        typer.Option(help="Checkpoint of the run: best (lowest val loss) or last."),
    ] = "best",
    workers: Annotated[int, typer.Option(help="Threads reading the store.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
) -> None:
    """Embed every cell: X = z_c, obsm["X_scbd_batch"] = z_s, obs = the store's cell table."""
    from scbd_cells.embedding.encode import embed as run_embed

    result = run_embed(
        run_dir,
        store_argument(store),
        out=out,
        aggregate=aggregate,
        representation=representation,
        batch_size=batch_size,
        device=device,
        which=which,
        workers=workers,
        overwrite=overwrite,
    )
    stdout.print(f"[green]Embedded[/] {result.n_cells:,} cells -> {result.out_path}")
    if result.genes_path is not None:
        stdout.print(f"Profiles: {result.guides_path}, {result.genes_path}")


@app.command(cls=_Command)
def baseline(
    store: Annotated[str, typer.Argument(help=f"Store to measure. {STORE_URL_HELP}")],
    out: Annotated[Path, typer.Option(help="AnnData to write: .h5ad or .zarr.")],
    n_components: Annotated[int, typer.Option(help="PCA dimensions.")] = 64,
    nucleus_channel: Annotated[
        str | None,
        typer.Option(help="Channel to segment nuclei on. \\[default: one named dna/dapi/hoechst]"),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Cells measured at a time.")] = 4096,
    normalize: Annotated[
        Literal["store", "batch"],
        typer.Option(
            help="store: standardise each feature over all cells (no batch correction); "
            "batch: within each well (the usual CellProfiler post-processing)."
        ),
    ] = "store",
    features: Annotated[
        Literal["handcrafted", "cellprofiler"],
        typer.Option(
            help="handcrafted: 78 numpy measurements (fast); cellprofiler: CellProfiler's own "
            "size/shape, intensity and texture measurements with cp-measure (slower)."
        ),
    ] = "handcrafted",
    reference: Annotated[
        Path | None,
        typer.Option(
            help="An earlier baseline (e.g. of the training plates): measure this store in "
            "its space, with its channel ranges, standardisation and PCA loadings, none "
            "refitted (a new plate beside earlier ones; `correct --reference`). Default: fit "
            "them on this store."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the PCA solver.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """CellProfiler-style reference: intensity, shape and texture features per cell, then PCA."""
    from scbd_cells.profiles.features import baseline as run_baseline

    result = run_baseline(
        store_argument(store),
        out=out,
        n_components=n_components,
        nucleus_channel=nucleus_channel,
        batch_size=batch_size,
        normalize=normalize,
        features=features,
        reference=reference,
        seed=seed,
        overwrite=overwrite,
    )
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
def evaluate(
    embeddings: Annotated[
        list[Path],
        typer.Argument(
            help="Cell-level AnnData files (.h5ad/.zarr) or pycytominer tables (.parquet/.csv) "
            "to compare."
        ),
    ],
    corum: Annotated[
        Path,
        typer.Option(
            help="Complexes file (CORUM 3.x/4.x/5.x) or any relationship groups, e.g. "
            "mechanisms of action (GMT or two-column; reported as 'relationships (FILE)')."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Report folder to write.")],
    key: Annotated[
        list[str] | None,
        typer.Option(help="X or an obsm key, once for all files or once per file. \\[default: X]"),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="Name in the table, once per file. \\[default: the file stem]"),
    ] = None,
    control: Annotated[
        str | None,
        typer.Option(
            help="Non-targeting control label. \\[default: from the file or nontargeting]"
        ),
    ] = None,
    perturbation_key: Annotated[str, typer.Option(help="obs column of the gene.")] = "perturbation",
    guide_key: Annotated[str, typer.Option(help="obs column of the guide.")] = "guide",
    batch_key: Annotated[str, typer.Option(help="obs column of the batch (well).")] = "batch",
    max_cells: Annotated[
        int | None, typer.Option(help="Cells (seeded subsample) for the well classifier.")
    ] = 50_000,
    mixing_cells: Annotated[
        int | None,
        typer.Option(help="Cells (seeded subsample) for iLISI, kBET, silhouette, connectivity."),
    ] = 10_000,
    max_replicates: Annotated[
        int | None,
        typer.Option(help="Guide x well profiles per gene (and controls per well) for mAP."),
    ] = 16,
    null_size: Annotated[
        int, typer.Option(help="Permutations for the mAP p-values (copairs).")
    ] = 10_000,
    umap: Annotated[
        bool, typer.Option("--umap/--no-umap", help="Draw umap.png (about 30 s on 2 cores).")
    ] = True,
    holdout_batches: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated values of --holdout-key marking held-out cells (a new plate): "
            "CORUM from their cells alone, well F1 among their wells and how they mix with "
            "the rest, reported apart (docs/new-plates.md)."
        ),
    ] = None,
    holdout_key: Annotated[
        str | None,
        typer.Option(help="obs column of --holdout-batches, e.g. plate. \\[default: --batch-key]"),
    ] = None,
    replicate_key: Annotated[
        str | None,
        typer.Option(
            help="The replicate unit in place of the guide, e.g. plate,well in an arrayed "
            "screen (one perturbation per well). \\[default: --guide-key]"
        ),
    ] = None,
    compound_key: Annotated[
        str | None,
        typer.Option(
            help="obs column of the compound: adds NSC and NSCB (1-NN accuracy of the "
            "relationship group on treatment profiles, not the same compound / batch)."
        ),
    ] = None,
    concentration_key: Annotated[
        str | None,
        typer.Option(help="obs column of the concentration: treatment = compound x concentration."),
    ] = None,
    standardize_key: Annotated[
        str | None,
        typer.Option(
            help="Standardise NSC/NSCB profiles to the control cells of the same COLUMN value "
            "(e.g. plate). \\[default: not standardised]"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every subsample, split and draw.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
) -> None:
    """The paper's tasks (CORUM, well F1) and the field's metrics (mAP, batch mixing, overall)."""
    from scbd_cells.evaluation.report import evaluate as run_evaluate

    result = run_evaluate(
        embeddings,
        corum=corum,
        out=out,
        keys=key,
        labels=label,
        control=control,
        perturbation_key=perturbation_key,
        guide_key=guide_key,
        batch_key=batch_key,
        max_cells=max_cells,
        mixing_cells=mixing_cells,
        max_replicates=max_replicates,
        null_size=null_size,
        umap=umap,
        holdout_batches=_split_csv(holdout_batches),
        holdout_key=holdout_key,
        replicate_key=replicate_key,
        compound_key=compound_key,
        concentration_key=concentration_key,
        standardize_key=standardize_key,
        seed=seed,
        overwrite=overwrite,
    )
    _print_table(result.table, relationships=result.metrics["settings"]["relationships"])
    for text in result.metrics.get("warnings", {}).values():
        console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)
    stdout.print(f"Report: {result.out_dir / 'report.html'} (and report.md, metrics.json)")


@app.command(cls=_Command)
def correct(
    profiles: Annotated[
        Path,
        typer.Argument(
            help="Cell-level AnnData (.h5ad/.zarr): embed, baseline, your own; or a pycytominer "
            "table (.parquet/.csv)."
        ),
    ],
    method: Annotated[
        Literal["harmony", "sphering", "combat", "center-scale"],
        typer.Option(help="harmony, sphering (ZCA on the controls), combat, center-scale."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Corrected AnnData to write (.h5ad or .zarr); from a table, also a table "
            "(.parquet/.csv)."
        ),
    ],
    batch_key: Annotated[
        str, typer.Option(help="obs column of the batch corrected for (not used by sphering).")
    ] = "batch",
    key: Annotated[str, typer.Option(help="X or the obsm key to correct (e.g. X_features).")] = (
        "X"
    ),
    control: Annotated[
        str | None,
        typer.Option(help="Control label for sphering. \\[default: from the file or nontargeting]"),
    ] = None,
    perturbation_key: Annotated[
        str, typer.Option(help="obs column holding the control label.")
    ] = "perturbation",
    reference: Annotated[
        Path | None,
        typer.Option(
            help="harmony only: an earlier `correct --method harmony` output (the reference "
            "plates). PROFILES (a new plate, in the same space: `baseline --reference`, or the "
            "same SCBD run) are mapped onto that fit, Symphony-style, instead of refitting; "
            "the reference's profiles never change. Default: fit Harmony on PROFILES."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of Harmony.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """A standard batch correction of cell profiles (the JUMP benchmark's comparators).

    Harmony's output records its fit, so later plates can be mapped onto it with
    --reference (docs/new-plates.md).
    """
    from scbd_cells.profiles.corrections import correct as run_correct

    result = run_correct(
        profiles,
        method=method,
        out=out,
        batch_key=batch_key,
        key=key,
        control=control,
        perturbation_key=perturbation_key,
        reference=reference,
        seed=seed,
        overwrite=overwrite,
    )
    mapped = f" mapped onto {reference}" if reference is not None else ""
    stdout.print(
        f"[green]Corrected[/] {result.n_cells:,} cells x {result.n_features} features with "
        f"{result.method}{mapped} -> {result.out_path}"
    )


@app.command(cls=_Command)
def export(
    embedding: Annotated[
        Path,
        typer.Argument(help="Cell-level AnnData (.h5ad/.zarr), or a pycytominer .parquet/.csv."),
    ],
    level: Annotated[
        Literal["cell", "well", "guide", "gene"],
        typer.Option(help="cell, well, guide (guide x well) or gene (gene x well)."),
    ],
    out: Annotated[Path, typer.Option(help="Table to write: .parquet or .csv.")],
    key: Annotated[str, typer.Option(help="X or an obsm key (e.g. X_features).")] = "X",
    perturbation_key: Annotated[str, typer.Option(help="obs column of the gene.")] = (
        "perturbation"
    ),
    guide_key: Annotated[str, typer.Option(help="obs column of the guide.")] = "guide",
    batch_key: Annotated[str, typer.Option(help="obs column of the batch (well).")] = "batch",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing table.")] = False,
) -> None:
    """Profiles with Metadata_ columns, for pycytominer and copairs (docs/evaluation.md)."""
    from scbd_cells.profiles.exports import export as run_export

    result = run_export(
        embedding,
        level=level,
        out=out,
        key=key,
        perturbation_key=perturbation_key,
        guide_key=guide_key,
        batch_key=batch_key,
        overwrite=overwrite,
    )
    stdout.print(
        f"[green]Exported[/] {result.n_rows:,} {result.level} profiles x {result.n_features} "
        f"features -> {result.out_path}"
    )


@app.command(cls=_Command)
def demo(
    out: Annotated[Path, typer.Option(help="Demo folder (new or empty).")] = Path("scbd-demo"),
    preset: Annotated[
        Literal["demo", "tiny"], typer.Option(help="Simulator preset: demo, or tiny (smoke test).")
    ] = "demo",
    seed: Annotated[int, typer.Option(help="Seed of everything; same seed, same table.")] = 0,
    alpha: Annotated[
        float | None,
        typer.Option(help="Invariance weight of the SCBD model. \\[default: the demo's own]"),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Training steps per model. \\[default: the demo training options]"),
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    workers: Annotated[int, typer.Option(help="Processes simulating, threads reading images.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier demo in --out.")] = False,
) -> None:
    """Simulate -> ingest -> train (alpha=0 and default) -> embed -> baseline -> evaluate."""
    from scbd_cells.pipeline import demo as run_demo

    result = run_demo(
        out=out,
        preset=preset,
        seed=seed,
        alpha=alpha,
        steps=steps,
        device=device,
        workers=workers,
        overwrite=overwrite,
    )
    _print_table(result.table)
    stdout.print(
        f"Report: {result.report_path.with_name('report.html')} (and report.md; total "
        f"{sum(result.seconds.values()) / 60:.1f} min)"
    )


@app.command(cls=_Command)
def reconstruct(
    run_dir: Annotated[
        Path, typer.Argument(help="Training run folder trained with --decoder (or its .pt).")
    ],
    store: Annotated[Path, typer.Argument(help="Store whose cells are drawn (any plate).")],
    out: Annotated[Path, typer.Option(help="Folder for the PNG grids and index.csv.")],
    cells: Annotated[
        int, typer.Option(help="Cells per perturbation in the reconstruction grid.")
    ] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the cells and wells chosen.")] = 0,
    perturbations: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated perturbations to show (the control is added). Default: the "
            "4 whose mean z_c lies farthest from the control's."
        ),
    ] = None,
    wells: Annotated[int, typer.Option(help="Other wells whose z_s is swapped in.")] = 5,
    which: Annotated[
        Literal["best", "last"],
        typer.Option(help="Checkpoint of the run: best (lowest val loss) or last."),
    ] = "best",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    overwrite: Annotated[
        bool, typer.Option(help="Replace pictures an earlier reconstruct wrote in --out.")
    ] = False,
) -> None:
    """Pictures of what z_c and z_s hold: reconstructions and swaps from the decoder.

    Writes reconstructions.png, swap_well.png ("this cell as if imaged in well B"),
    swap_perturbation.png ("well A's look with perturbation B"), each also as
    *_channels.png, and index.csv (the cells used). Needs a run trained with --decoder.
    """
    from scbd_cells.embedding.reconstruction import reconstruct as run_reconstruct

    result = run_reconstruct(
        run_dir,
        store,
        out=out,
        cells=cells,
        seed=seed,
        perturbations=_split_csv(perturbations),
        wells=wells,
        which=which,
        device=device,
        overwrite=overwrite,
    )
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
def sweep(
    store_path: Annotated[Path, typer.Argument(help="Store written by `scbd-cells ingest`.")],
    out: Annotated[
        Path,
        typer.Option(
            help="Sweep folder: one run per alpha, embeddings, reports, sweep.csv, tradeoff.png, "
            "sweep.md. Rerun the same command to continue an unfinished sweep."
        ),
    ],
    corum: Annotated[
        Path,
        typer.Option(
            help="Complexes file for the evaluation (CORUM 3.x/4.x/5.x, two-column or GMT); "
            "reporting only, the recommended alpha never reads it."
        ),
    ],
    alpha: Annotated[
        str, typer.Option(help="Comma-separated alphas to train (0 is added when missing).")
    ] = "0,0.3,1,3,10",
    reference: Annotated[
        list[Path] | None,
        typer.Option(
            help="AnnData of a conventional pipeline (baseline, correct), drawn beside the "
            "alphas; repeat for several."
        ),
    ] = None,
    margin: Annotated[
        float,
        typer.Option(
            help="Recommend the largest alpha whose val perturbation SupCon loss keeps at least "
            "1 - MARGIN of the sweep's largest fall below log(val batch size) "
            "(docs/training.md, Choosing alpha)."
        ),
    ] = 0.5,
    control: Annotated[
        str | None,
        typer.Option(
            help="Non-targeting control label for the evaluation. \\[default: the store's]"
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML train options (e.g. a run's config.yaml); CLI wins.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start over: replace an earlier sweep in --out.")
    ] = False,
    **train_options: Any,
) -> None:
    """Train, embed and evaluate SCBD at several alphas; draw the trade-off, recommend one.

    Every train option below applies to each alpha's run (docs/training.md, Choosing alpha).
    """
    from scbd_cells.training.sweeping import sweep as run_sweep

    alphas = _split_numbers(
        alpha, option="--alpha", expected="numbers separated by commas, e.g. 0,0.3,1,3,10"
    )
    result = run_sweep(
        store_path,
        out=out,
        corum=corum,
        alpha=alphas,
        reference=reference or [],
        margin=margin,
        control=control,
        config_path=config,
        overwrite=overwrite,
        **train_options,
    )
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
