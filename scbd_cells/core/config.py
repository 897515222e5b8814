"""Config: each command's options as one frozen model; defaults < YAML < env < CLI.

A field is declared once: its description is the ``--help`` of the command-line option
that ``scbd_cells.cli`` derives from it, and :class:`Flag` carries what else the option
needs (choices, a default shown in words, hidden).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from scbd_cells.core.errors import InputError
from scbd_cells.data.schema import MASK_NEIGHBOURS_CHOICES

ENV_PREFIX = "SCBD_CELLS_TRAIN_"
ENCODER_NAMES = ("resnet18", "resnet50", "densenet121", "small", "tiny")
# One wording per option across commands.
DEVICE_HELP = "auto (a CUDA GPU when there is one, else cpu), cpu, cuda or cuda:N."


@dataclass(frozen=True)
class Flag:
    """How a config field shows on the command line, beyond its description and default.

    ``scbd_cells.cli`` derives each option from the field (``Annotated[type, Flag(...)]``):
    the name from the field's, the help from its description, the default from its default.

    Attributes
    ----------
    default_text
        The ``[default: ...]`` in words, for a default the field leaves to the data (None).
    show_default
        False: the help says the default itself.
    choices
        The values a ``str`` field accepts, offered as choices.
    hidden
        Accepted on the command line but left out of ``--help`` (a tuning knob).
    csv
        A list field given as comma-separated text (``--batch-columns plate,well``).
    cli_default
        The command's default where it differs from the library's.
    names
        The option's names where they are not ``--field-name`` (e.g. ``("--json",)``).
    """

    default_text: str | None = None
    show_default: bool = True
    choices: tuple[str, ...] | None = None
    hidden: bool = False
    csv: bool = False
    cli_default: Any = None
    names: tuple[str, ...] = ()


class TrainConfig(BaseModel):
    """Every option of ``scbd-cells train`` (paper A.1 defaults).

    Each field is declared once: its description is the option's ``--help`` and its
    default the ``[default: ...]`` there; :class:`Flag` says what else the command line
    needs. Facts of the data (channels, image size, vocabularies) come from the store,
    not from here. A typo in a YAML key or keyword fails (``extra="forbid"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # model
    encoder: Annotated[str, Flag(choices=ENCODER_NAMES)] = Field(
        "resnet18", description="Image encoders (two, random weights)."
    )
    z_dim: int = Field(64, ge=2, description="Embedding size.")
    image_size: Annotated[int | None, Flag(default_text="the store's size")] = Field(
        None, ge=8, description="Model input px."
    )
    decoder: bool = Field(
        False,
        description="Train the additive decoder on detached z (for `scbd-cells reconstruct`; "
        "changes no embedding).",
    )
    decoder_width: Annotated[
        int | None,
        Flag(
            default_text="sized to the encoder and image: 32 with small/tiny, 128 at 32 px, "
            "256 at 64 px"
        ),
    ] = Field(None, ge=4, description="Decoder channels")
    # The decoder learns from detached embeddings, so its rate changes no embedding.
    decoder_lr: Annotated[float | None, Flag(default_text="--lr")] = Field(
        None, gt=0, description="Decoder learning rate."
    )
    normalize: Literal["batch", "store", "arcsinh"] = Field(
        "batch",
        description="batch: standardise each channel with the statistics of the cell's own well "
        "(removes brightness and background offsets per well); store: with the whole "
        "store's; arcsinh: the official SCBD code's (arcsinh(x) - 7) / 7 for every cell "
        "(docs/training.md).",
    )
    # A run written with the earlier on/off option reads true as dihedral, false as none.
    augment: Literal["none", "dihedral", "dihedral+shift"] = Field(
        "none",
        description="none (the paper); dihedral: each train cell turned by a random multiple of "
        "90 degrees and mirrored at random (exact, seeded); dihedral+shift: then moved by up "
        "to 1/8 of the crop (4 px at 32 px), the edge reflected into the gap.",
    )
    stem: Literal["imagenet", "small"] = Field(
        "imagenet",
        description="First layers of a ResNet/DenseNet: imagenet (7x7 stride 2 + max pool: a 32 "
        "px crop is 8x8 after them) or small (3x3 stride 1, no pool: 32x32 stays; about 16x "
        "the compute).",
    )
    # objective
    alpha: float = Field(1.0, ge=0, description="Invariance weight.")
    invariance: Literal["paper", "normalized"] = Field(
        "paper", description="paper: the appendix B loss; normalized: self excluded, per-set means."
    )
    temperature: float = Field(0.1, gt=0, description="SupCon temperature.")
    batch_target: Literal["batch", "perturbation+batch"] = Field(
        "batch",
        description="What z_s learns: the batch label, or the (perturbation, batch) pair.",
    )
    # batches (paper A.1: 256 classes x 8 cells = 2048)
    classes_per_batch: int = Field(256, ge=1, description="Perturbations per batch.")
    # at least 2: SupCon's positive pair
    cells_per_class: int = Field(8, ge=2, description="Cells per perturbation.")
    stratify: Annotated[bool, Flag(show_default=False)] = Field(
        True,
        description="Spread each perturbation's cells in a batch evenly over its batch labels "
        "(wells), so that every batch holds them in near-equal numbers: the paper's "
        "invariance loss reads and pushes on that mix. --no-stratify draws uniformly "
        "within the perturbation (paper A.1). Default: on.",
    )
    # segments: a store larger than --cache-gb is decoded about once per pass
    sampling: Literal["cells", "segments"] = Field(
        "cells",
        description="cells: a perturbation's cells come from all its train cells; segments: from "
        "one store segment (whole chunks) at a time, many times faster on a store larger "
        "than --cache-gb (the batches depend on this option, never on --cache-gb).",
    )
    # optimisation
    steps: int = Field(10_000, ge=1, description="Optimiser steps.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    # step s (from 0) trains at lr x (s + 1) / N for s < N, then at lr
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Linear learning-rate warm-up over N steps, then constant (0: none).",
    )
    seed: int = Field(0, description="Seed.")
    # validation and logging
    val_every: int = Field(500, ge=1, description="Validate every N steps.")
    val_batches: Annotated[int, Flag(hidden=True)] = Field(
        2, ge=1, description="Class-balanced val batches per val pass."
    )
    select: Literal["total", "z_c"] = Field(
        "total",
        description="What keeps checkpoints/best.pt: total, the lowest total val loss (the "
        "paper); z_c, the lowest val SupCon(z_c; perturbation), ties to the lower well "
        "F1 of z_c. metrics.csv names both rules' steps.",
    )
    log_every: Annotated[int, Flag(hidden=True)] = Field(
        10, ge=1, description="Log the train losses every N steps."
    )
    stall_tolerance: Annotated[float, Flag(hidden=True)] = Field(
        0.02, ge=0, description="Warn if the perturbation loss fell by less than this fraction."
    )
    # hardware and data path
    device: str = Field("auto", description=DEVICE_HELP)
    compile: bool = Field(False, description="torch.compile the model.")
    cache_gb: float = Field(4.0, ge=0, description="RAM for caching images.")
    workers: int = Field(2, ge=0, description="Loader threads.")
    prefetch: Annotated[int, Flag(hidden=True)] = Field(
        2, ge=0, description="Batches the loader prepares ahead."
    )

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        if value not in ENCODER_NAMES:
            raise ValueError(f"unknown encoder {value!r}; choose one of {', '.join(ENCODER_NAMES)}")
        return value

    @field_validator("augment", mode="before")
    @classmethod
    def _legacy_augment(cls, value: Any) -> Any:
        return legacy_augment(value)

    @model_validator(mode="after")
    def _stem_fits_encoder(self) -> TrainConfig:
        if self.stem == "small" and self.encoder in ("tiny", "small"):
            raise ValueError(
                "--stem small changes the first layers of resnet18, resnet50 and densenet121; "
                f"the {self.encoder} encoder has no such stem. Drop --stem or choose another "
                "--encoder"
            )
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
            raise ValueError(f"unknown device {value!r}; choose auto, cpu, cuda or cuda:N")
        return value

    @property
    def batch_size(self) -> int:
        """Global batch size: classes_per_batch x cells_per_class."""
        return self.classes_per_batch * self.cells_per_class


def legacy_augment(value: Any) -> Any:
    """``augment`` as written before it had three values: true is dihedral, false is none.

    YAML and the environment spell booleans in several ways (``true``, ``False``, ``1``,
    ``off``); each reads as the on/off option read it.
    """
    if isinstance(value, bool):
        return "dihedral" if value else "none"
    if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
        return "dihedral" if _BOOLEAN_WORDS[value.strip().lower()] else "none"
    return value


_BOOLEAN_WORDS = {
    "true": True, "yes": True, "on": True, "1": True,
    "false": False, "no": False, "off": False, "0": False,
}  # fmt: skip


def _env_options() -> dict[str, str]:
    fields = TrainConfig.model_fields
    options = {}
    for key, value in os.environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name not in fields:
                raise InputError(
                    f"environment variable {key} names no train option; expected "
                    f"{ENV_PREFIX}<OPTION> with OPTION one of {', '.join(fields)}."
                )
            options[name] = value
    return options


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_file(config_path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML file (safe loading); a run's saved ``config.yaml`` works as is.

    A key given twice is an error (plain YAML would keep the last value silently).
    """
    config_path = Path(config_path)
    try:
        loaded = yaml.load(config_path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506
    except OSError as error:
        raise InputError(f"cannot read the config file {config_path}: {error}") from error
    except yaml.YAMLError as error:
        raise InputError(f"{config_path} is not valid YAML: {error}") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InputError(f"{config_path} must hold a mapping of option: value; found {loaded!r}")
    return loaded


def resolve_train_config(
    *,
    config_path: str | os.PathLike | None = None,
    base: TrainConfig | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Resolve options: defaults < ``base`` < YAML ``config_path`` < env < ``overrides``.

    Environment variables are ``SCBD_CELLS_TRAIN_<OPTION>`` (e.g.
    ``SCBD_CELLS_TRAIN_ALPHA=2``). ``overrides`` (the CLI's or the caller's
    keywords) whose value is None are ignored.

    Raises
    ------
    InputError
        Unknown option or invalid value, naming which.
    """
    options: dict[str, Any] = {}
    if isinstance(base, TrainConfig):
        options.update(base.model_dump(exclude_unset=True))  # unset: still the defaults
    elif base is not None:
        options.update(base)
    if config_path is not None:
        options.update(read_config_file(config_path))
    options.update(_env_options())
    options.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validated(TrainConfig, options, command="train")


def save_config(config: TrainConfig, config_path: Path) -> None:
    """Write the resolved config as YAML (re-loadable with ``--config``)."""
    config_path.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))


def demo_train_options(n_classes: int) -> dict[str, Any]:
    """CPU-feasible options for the demo screen (minutes on 2 cores); see docs/training.md.

    Parameters
    ----------
    n_classes
        Number of perturbation classes in the store's train split.
    """
    return {
        "encoder": "resnet18",
        "classes_per_batch": min(16, n_classes),
        "cells_per_class": 8,
        "steps": 300,
        "val_every": 50,
        "val_batches": 2,
        "log_every": 10,
        # Measured on the demo screen, 300 steps, per-well normalisation (docs/training.md):
        # alpha 3 put z_c's well F1 at 1.04-1.21x chance, below alpha 0's 1.23-1.29x on each
        # of 3 seeds, while the perturbation SupCon kept falling below log B; alpha 5 fell
        # half as far, and alpha 10 froze the perturbation loss at log B.
        "alpha": 3.0,
        "invariance": "paper",
        "device": "auto",
    }


class IngestOptions(BaseModel):
    """Every option of ``scbd-cells ingest`` but the table and ``--out`` (what
    :func:`scbd_cells.data.ingest.ingest` takes as keywords).

    Each field is declared once: its description is the option's ``--help``. The store's
    content depends on all of them but ``workers``, ``overwrite`` and ``scheduler``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    perturbation_column: str = Field(description="Column with the perturbation (gene) label.")
    guide_column: str | None = Field(None, description="Column with the guide label.")
    batch_columns: Annotated[tuple[str, ...], Flag(csv=True)] = Field(
        ("plate", "well"), description="Comma-separated columns joined into the batch label."
    )
    control: str | None = Field(
        None, description="Label of the non-targeting control, e.g. nontargeting."
    )
    image_column: Annotated[str | None, Flag(default_text="image_path")] = Field(
        None, description="Crop file per cell (TIFF (C,H,W)/(H,W,C), NPY, PNG)."
    )
    channel_columns: Annotated[tuple[str, ...] | None, Flag(csv=True)] = Field(
        None, description="Comma-separated columns: one crop file per channel."
    )
    fov_column: str | None = Field(None, description="Field-of-view file per cell (multi-channel).")
    fov_channel_columns: Annotated[tuple[str, ...] | None, Flag(csv=True)] = Field(
        None, description="Comma-separated columns: one field file per channel."
    )
    x_column: str | None = Field(None, description="Centroid column (x = column, px).")
    y_column: str | None = Field(None, description="Centroid row (y = row, px).")
    crop_size: int | None = Field(None, description="Crop side cut from fields (px).")
    channel_names: Annotated[tuple[str, ...] | None, Flag(csv=True)] = Field(
        None, description="Comma-separated channel names, in channel order."
    )
    resize: int | None = Field(None, description="Store crops at PX x PX (area average).")
    # the library's default, one thread, needs no `if __name__ == "__main__":` guard
    workers: Annotated[int, Flag(cli_default=2)] = Field(
        1, description="Workers reading and writing chunks (1: one thread; more: processes)."
    )
    split_fractions: Annotated[tuple[float, ...], Flag(csv=True)] = Field(
        (0.83, 0.02, 0.15), description="Train,val,test fractions (stratified by perturbation)."
    )
    seed: int = Field(0, description="Seed of the split and of the order within a class.")
    skip_bad: bool = Field(
        False, description="Leave bad rows out (listed in STORE/rejected.csv), don't fail."
    )
    overwrite: bool = Field(False, description="Replace an existing store.")
    image_root: Annotated[Path | None, Flag(default_text="the table's")] = Field(
        None, description="Folder relative image paths resolve against."
    )
    image_table: Path | None = Field(
        None,
        description="CellProfiler per-image table (Image.csv), joined to TABLE (a per-object "
        "table) on ImageNumber.",
    )
    channels: Annotated[
        tuple[str, ...] | None,
        Flag(csv=True, default_text="every such pair, when no other image option"),
    ] = Field(
        None,
        description="CellProfiler image names read as channels, in order: their PathName_NAME/"
        "FileName_NAME columns.",
    )
    cell_id_column: Annotated[
        str | None,
        Flag(default_text="cell_id, else ImageNumber_ObjectNumber, else the row number"),
    ] = Field(None, description="Column naming each cell.")
    mask_column: str | None = Field(
        None,
        description="Label image per field (same grid, 0 = background): a path column, or a "
        "CellProfiler object/image name. Crops each row's object.",
    )
    mask_neighbours: Annotated[str, Flag(choices=MASK_NEIGHBOURS_CHOICES)] = Field(
        "zero", description="zero: other objects' pixels in a crop set to 0; keep: untouched."
    )
    label_column: Annotated[str | None, Flag(default_text="ObjectNumber")] = Field(
        None, description="Column with each row's label in its mask."
    )
    scheduler: str | None = Field(
        None,
        description="Read and write the cells on a dask.distributed cluster: its address "
        "(tcp://host:8786) or local:N (N local processes); the table, images and --out on a "
        "file system every worker sees. Needs scbd-cells[dask] (docs/scaling.md).",
    )


def validated(model: type[BaseModel], options: Mapping[str, Any], *, command: str) -> Any:
    """``model(**options)``, a bad or unknown option an :class:`InputError` naming it."""
    try:
        return model(**options)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            if e["loc"]
            else e["msg"].removeprefix("Value error, ")  # a rule across options
            for e in error.errors()
        )
        raise InputError(
            f"invalid {command} options ({problems}). See `scbd-cells {command} --help`."
        ) from error
