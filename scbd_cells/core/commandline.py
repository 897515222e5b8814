"""The command line's plumbing: options derived from the config models, and help conventions.

Each option is declared once, as a field of a model in :mod:`scbd_cells.core.config`;
:func:`options_from` turns the fields into the Typer parameters of a command.
:class:`Group` and :class:`Command` give every command's ``--help`` the usual look.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from typer.core import TyperCommand, TyperGroup

from scbd_cells.core.config import Flag
from scbd_cells.core.errors import InputError

# Options of the whole program that are also accepted after the subcommand
# (``scbd-cells ingest ... --quiet``).
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


class _ConventionalHelp:
    """Upper-case metavars and a bare ``--help``, for the program and each subcommand."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _conventional_metavars(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Group(_ConventionalHelp, TyperGroup):
    """The program: moves -q/-v given after the subcommand in front of it."""

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


class Command(_ConventionalHelp, TyperCommand):
    """A subcommand whose help follows the usual conventions.

    Arguments show as upper-case names (``TABLE``, ``OUT_DIR``), on the usage line
    too; on/off flags show no type.
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = param.metavar + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
        return pieces


def split_csv(value: str | None) -> list[str] | None:
    """``"a,b, c"`` -> ``["a", "b", "c"]``; None stays None."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def split_numbers(value: str | None, *, option: str, expected: str) -> list[float]:
    """``"0.3,1"`` -> ``[0.3, 1.0]``; a word is a usage error naming ``option``."""
    try:
        return [float(part) for part in split_csv(value) or []]
    except ValueError as error:
        raise InputError(f"{option} must be {expected} ({error}).") from None


# --- options derived from the config models: each declared once, as a model field ---------


def _flag_of(field: FieldInfo) -> Flag:
    return next((item for item in field.metadata if isinstance(item, Flag)), Flag())


def _shown_default(name: str, default: Any) -> str:
    """A default as the help shows it; an on/off flag's as click writes it (no-decoder)."""
    if isinstance(default, bool):
        return name.replace("_", "-") if default else f"no-{name.replace('_', '-')}"
    return str(default)


def _csv(values: Any) -> str:
    """``(0.0, 0.3, 10.0)`` -> ``"0,0.3,10"``: a list option's default as it is typed."""
    return ",".join(format(v, "g") if isinstance(v, float) else str(v) for v in values)


def _option_parameter(name: str, field: FieldInfo, *, unset: bool) -> inspect.Parameter:
    """The Typer option of one model field.

    ``unset``: the option defaults to None (so YAML and the environment can apply) and the
    help names the model's default; otherwise the option's default is the field's.
    """
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


def options_from(
    model: type[BaseModel], *, exclude: tuple[str, ...] = (), unset: bool = False
) -> Any:
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


def split_lists(model: type[BaseModel], options: dict[str, Any]) -> dict[str, Any]:
    """The comma-separated options of ``model`` (``Flag(csv=True)``) as lists."""
    split = dict(options)
    for name, field in model.model_fields.items():
        if name not in split or not _flag_of(field).csv:
            continue
        if float in typing.get_args(field.annotation):  # tuple[float, ...]
            split[name] = split_numbers(
                split[name],
                option="--" + name.replace("_", "-"),
                expected=f"numbers separated by commas, e.g. {_csv(field.default)}",
            )
        else:
            split[name] = split_csv(split[name])
    return split
