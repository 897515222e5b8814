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
        # 150 steps: the demo's table within seed noise of 300 steps' on 3 training seeds
        # (CORUM AUPRC 0.279 +- 0.022 against 0.266 +- 0.012; well F1 1.13 +- 0.05 x chance
        # against 1.08 +- 0.03) in half the training time (docs/evaluation.md, "How many steps
        # the demo trains"); alpha 3 was chosen at 300 steps.
        "steps": 150,
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

    Attributes
    ----------
    perturbation_column, guide_column, batch_columns, control
        Label columns (batch columns joined with ``_``) and the control label.
    image_column
        Crops: a path per cell to a multi-channel TIFF ((C, H, W) or (H, W, C)),
        NPY or PNG. Used by default when the table has an ``image_path`` column.
    channel_columns
        Crops: one single-channel file per cell and channel.
    fov_column, fov_channel_columns
        Fields of view: a multi-channel file per field, or one file per field
        and channel; needs ``x_column``, ``y_column`` (pixels; x = column) and
        ``crop_size``. The crop spans ``rint(y) - S // 2`` ... ``+ S - 1``;
        cells whose crop leaves the field are skipped and counted.
    channel_names
        One name per channel (default: the channel columns without ``_path``,
        else ``ch0, ch1, ...``).
    resize
        Store crops at ``resize`` x ``resize`` px (area average when shrinking).
    workers
        Parallel workers, each reading, writing and summarising whole chunks:
        1 is one thread; more are processes (guard a calling script with
        ``if __name__ == "__main__":``).
    split_fractions, seed
        Train/val/test fractions (stratified by perturbation) and the seed of
        the split and of the order of cells within a class.
    skip_bad
        Leave bad rows out (recorded in ``rejected.csv``) instead of stopping.
    overwrite
        Replace an existing store.
    image_root
        The folder relative image paths resolve against (default: the table's).
    image_table
        CellProfiler's per-image table, joined to ``table_path`` (its per-object
        table) on ``ImageNumber``.
    channels
        CellProfiler image names whose ``PathName_<name>``/``FileName_<name>`` columns
        (also ``Image_``-prefixed) are read as fields, one channel each, in this order.
        Without any image option, every such pair of the table is read. The centroids
        are ``[<Object>_]Location_Center_X/Y`` unless ``x_column``/``y_column`` say.
    cell_id_column
        The column naming each cell (kept as text).
    mask_column
        Fields: a label image per row's field (same grid; 0 = background), a path column
        or a CellProfiler object/image name. Each row's object is ``label_column``
        (default ``ObjectNumber``); without centroid columns, its centroid is the mean
        pixel position of its label. Rows whose label is not in the mask are bad rows.
    mask_neighbours
        ``zero``: other objects' pixels in a crop are set to 0 (background kept);
        ``keep``: crops as cut. Recorded in the store's attributes.
    label_column
        The column holding each row's label in its mask.
    scheduler
        Read and write the cells on a ``dask.distributed`` cluster instead of
        this machine's processes: a scheduler address (``tcp://host:8786``), or
        ``local:N`` for a local cluster of N processes. Its workers write the
        store directly, so the table, the images and ``out`` must be on a file
        system every worker sees; ``workers`` then only checks files here.
        Needs ``pip install "scbd-cells[dask]"``. The store is the one the
        single-machine path writes (docs/scaling.md).
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


# --- the other commands: one model each, from which scbd_cells.cli derives the options ---

#: ``embed``/``reconstruct --which``: ``best`` (kept by the run's ``--select`` rule), ``last``,
#: and the step a named rule keeps, whichever rule kept ``best.pt``.
WhichCheckpoint = Literal["best", "last", "best_total", "best_z_c"]
WHICH_HELP = (
    "Checkpoint of the run: best (kept by its --select rule), last, or the step a rule "
    "keeps whichever kept best.pt: best_total (lowest total val loss), best_z_c (lowest "
    "val SupCon of z_c)."
)


class SimulateOptions(BaseModel):
    """The options of ``scbd-cells simulate``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["tiny", "demo", "large"] = Field(
        "demo", description="tiny (tests, 1.4k cells), demo (15k cells, 64 px), large (1M, 32 px)."
    )
    layout: Literal["crops", "fields", "arrayed"] = Field(
        "crops",
        description="crops: one (C,H,W) TIFF per cell; fields: fields of view + x/y; arrayed: an "
        "arrayed screen (compound x concentration per well, DMSO wells, plates in "
        "batches, moa.gmt) as crops.",
    )
    seed: int = Field(0, description="Random seed; same seed, identical files.")
    workers: int = Field(2, description="Processes drawing and writing images at once.")
    overwrite: bool = Field(False, description="Replace an existing simulated screen in OUT_DIR.")
    preview: bool = Field(False, description="Also write OUT_DIR/preview.png (example cells).")
    n_genes: Annotated[int | None, Flag(default_text="set by --preset")] = Field(
        None, description="Targeted genes"
    )
    n_complexes: Annotated[int | None, Flag(default_text="set by --preset")] = Field(
        None, description="Protein complexes"
    )
    guides_per_gene: Annotated[int | None, Flag(default_text="set by --preset")] = Field(
        None, description="Guides per gene"
    )
    control_guides: Annotated[int | None, Flag(default_text="set by --preset")] = Field(
        None, description="Control guides"
    )
    cells_per_guide: Annotated[int | None, Flag(default_text="set by --preset")] = Field(
        None, description="Cells per targeting guide"
    )
    control_cells_per_guide: Annotated[int | None, Flag(default_text="set by --preset")] = Field(
        None, description="Cells per non-targeting guide"
    )
    plates: Annotated[int | None, Flag(default_text="set by --preset")] = Field(
        None, description="Plates"
    )
    wells_per_plate: Annotated[int | None, Flag(default_text="set by --preset")] = Field(
        None, description="Wells per plate"
    )
    crop_size: Annotated[int | None, Flag(default_text="set by --preset")] = Field(
        None, description="Crop side in px, >= 16"
    )
    effect_strength: Annotated[float | None, Flag(default_text="demo 3, other presets 1")] = Field(
        None, description="Gene effect multiplier (0 = no biology)."
    )
    batch_strength: float | None = Field(
        None, description="Well effect multiplier (1 = default, 0 = none)."
    )
    holdout_plates: Annotated[int | None, Flag(default_text="0")] = Field(
        None,
        description="Hold out the last K plates: technical effects unlike any other plate's (a new "
        "plate); cells.csv gets a 'holdout' column (docs/new-plates.md).",
    )


class InfoOptions(BaseModel):
    """The options of ``scbd-cells info``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    json_output: Annotated[bool, Flag(names=("--json",))] = Field(
        False, description="Print JSON instead of a table."
    )
    verify: bool = Field(
        False,
        description="Read every chunk and check its checksum; list damaged cell ranges (exit 1 if "
        "any).",
    )
    workers: int = Field(2, description="Threads reading chunks (with --verify).")


class EmbedOptions(BaseModel):
    """The options of ``scbd-cells embed``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path = Field(description="Cells AnnData to write: .h5ad or .zarr.")
    aggregate: bool = Field(
        False, description="Also write guides.h5ad and genes.h5ad beside --out."
    )
    representation: Literal["projection", "encoder"] = Field(
        "projection", description="projection (z only) or encoder (also r_c, r_s in obsm)."
    )
    batch_size: int = Field(1024, description="Cells per forward pass.")
    device: str = Field("auto", description=DEVICE_HELP)
    which: WhichCheckpoint = Field("best", description=WHICH_HELP)
    workers: int = Field(2, description="Threads reading the store.")
    overwrite: bool = Field(False, description="Replace existing outputs.")


class BaselineOptions(BaseModel):
    """The options of ``scbd-cells baseline``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path = Field(description="AnnData to write: .h5ad or .zarr.")
    n_components: int = Field(64, description="PCA dimensions.")
    nucleus_channel: Annotated[str | None, Flag(default_text="one named dna/dapi/hoechst")] = Field(
        None, description="Channel to segment nuclei on."
    )
    batch_size: int = Field(4096, description="Cells measured at a time.")
    normalize: Literal["store", "batch"] = Field(
        "store",
        description="store: standardise each feature over all cells (no batch correction); batch: "
        "within each well (the usual CellProfiler post-processing).",
    )
    features: Literal["handcrafted", "cellprofiler"] = Field(
        "handcrafted",
        description="handcrafted: 78 numpy measurements (fast); cellprofiler: CellProfiler's own "
        "size/shape, intensity and texture measurements with cp-measure (slower).",
    )
    reference: Path | None = Field(
        None,
        description="An earlier baseline (e.g. of the training plates): measure this store in its "
        "space, with its channel ranges, standardisation and PCA loadings, none "
        "refitted (a new plate beside earlier ones; `correct --reference`). Default: "
        "fit them on this store.",
    )
    seed: int = Field(0, description="Seed of the PCA solver.")
    overwrite: bool = Field(False, description="Replace an existing output.")


class EvaluateOptions(BaseModel):
    """The options of ``scbd-cells evaluate``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    corum: Path = Field(
        description="Complexes file (CORUM 3.x/4.x/5.x) or any relationship groups, e.g. "
        "mechanisms of action (GMT or two-column; reported as 'relationships (FILE)')."
    )
    out: Path = Field(description="Report folder to write.")
    keys: Annotated[list[str] | None, Flag(default_text="X", names=("--key",))] = Field(
        None, description="X or an obsm key, once for all files or once per file."
    )
    labels: Annotated[list[str] | None, Flag(default_text="the file stem", names=("--label",))] = (
        Field(None, description="Name in the table, once per file.")
    )
    control: Annotated[str | None, Flag(default_text="from the file or nontargeting")] = Field(
        None, description="Non-targeting control label."
    )
    perturbation_key: str = Field("perturbation", description="obs column of the gene.")
    guide_key: str = Field("guide", description="obs column of the guide.")
    batch_key: str = Field("batch", description="obs column of the batch (well).")
    max_cells: int | None = Field(
        50000, description="Cells (seeded subsample) for the well classifier."
    )
    mixing_cells: int | None = Field(
        10000, description="Cells (seeded subsample) for iLISI, kBET, silhouette, connectivity."
    )
    max_replicates: int | None = Field(
        16, description="Guide x well profiles per gene (and controls per well) for mAP."
    )
    null_size: int = Field(10000, description="Permutations for the mAP p-values (copairs).")
    umap: bool = Field(True, description="Draw umap.png (about 30 s on 2 cores).")
    holdout_batches: Annotated[list[str] | None, Flag(csv=True)] = Field(
        None,
        description="Comma-separated values of --holdout-key marking held-out cells (a new plate): "
        "CORUM from their cells alone, well F1 among their wells and how they mix with "
        "the rest, reported apart (docs/new-plates.md).",
    )
    holdout_key: Annotated[str | None, Flag(default_text="--batch-key")] = Field(
        None, description="obs column of --holdout-batches, e.g. plate."
    )
    replicate_key: Annotated[str | None, Flag(default_text="--guide-key")] = Field(
        None,
        description="The replicate unit in place of the guide, e.g. plate,well in an arrayed "
        "screen (one perturbation per well).",
    )
    compound_key: str | None = Field(
        None,
        description="obs column of the compound: adds NSC and NSCB (1-NN accuracy of the "
        "relationship group on treatment profiles, not the same compound / batch).",
    )
    concentration_key: str | None = Field(
        None, description="obs column of the concentration: treatment = compound x concentration."
    )
    standardize_key: Annotated[str | None, Flag(default_text="not standardised")] = Field(
        None,
        description="Standardise NSC/NSCB profiles to the control cells of the same COLUMN value "
        "(e.g. plate).",
    )
    seed: int = Field(0, description="Seed of every subsample, split and draw.")
    overwrite: bool = Field(False, description="Replace an existing report folder.")


class CorrectOptions(BaseModel):
    """The options of ``scbd-cells correct``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["harmony", "sphering", "combat", "center-scale"] = Field(
        description="harmony, sphering (ZCA on the controls), combat, center-scale."
    )
    out: Path = Field(
        description="Corrected AnnData to write (.h5ad or .zarr); from a table, also a table "
        "(.parquet/.csv)."
    )
    batch_key: str = Field(
        "batch", description="obs column of the batch corrected for (not used by sphering)."
    )
    key: str = Field("X", description="X or the obsm key to correct (e.g. X_features).")
    control: Annotated[str | None, Flag(default_text="from the file or nontargeting")] = Field(
        None, description="Control label for sphering."
    )
    perturbation_key: str = Field(
        "perturbation", description="obs column holding the control label."
    )
    reference: Path | None = Field(
        None,
        description="harmony only: an earlier `correct --method harmony` output (the reference "
        "plates). PROFILES (a new plate, in the same space: `baseline --reference`, or "
        "the same SCBD run) are mapped onto that fit, Symphony-style, instead of "
        "refitting; the reference's profiles never change. Default: fit Harmony on "
        "PROFILES.",
    )
    seed: int = Field(0, description="Seed of Harmony.")
    overwrite: bool = Field(False, description="Replace an existing output.")


class ExportOptions(BaseModel):
    """The options of ``scbd-cells export``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    level: Literal["cell", "well", "guide", "gene"] = Field(
        description="cell, well, guide (guide x well) or gene (gene x well)."
    )
    out: Path = Field(description="Table to write: .parquet or .csv.")
    key: str = Field("X", description="X or an obsm key (e.g. X_features).")
    perturbation_key: str = Field("perturbation", description="obs column of the gene.")
    guide_key: str = Field("guide", description="obs column of the guide.")
    batch_key: str = Field("batch", description="obs column of the batch (well).")
    overwrite: bool = Field(False, description="Replace an existing table.")


class DemoOptions(BaseModel):
    """The options of ``scbd-cells demo``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path = Field(Path("scbd-demo"), description="Demo folder (new or empty).")
    preset: Literal["demo", "tiny"] = Field(
        "demo", description="Simulator preset: demo, or tiny (smoke test)."
    )
    seed: int = Field(0, description="Seed of everything; same seed, same table.")
    alpha: Annotated[float | None, Flag(default_text="the demo's own")] = Field(
        None, description="Invariance weight of the SCBD model."
    )
    steps: Annotated[int | None, Flag(default_text="the demo training options")] = Field(
        None, description="Training steps per model."
    )
    device: str = Field("auto", description=DEVICE_HELP)
    workers: int = Field(2, description="Processes simulating, threads reading images.")
    overwrite: bool = Field(False, description="Replace an earlier demo in --out.")


class ReconstructOptions(BaseModel):
    """The options of ``scbd-cells reconstruct``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path = Field(description="Folder for the PNG grids and index.csv.")
    cells: int = Field(4, description="Cells per perturbation in the reconstruction grid.")
    seed: int = Field(0, description="Seed of the cells and wells chosen.")
    perturbations: Annotated[list[str] | None, Flag(csv=True)] = Field(
        None,
        description="Comma-separated perturbations to show (the control is added). Default: the 4 "
        "whose mean z_c lies farthest from the control's.",
    )
    wells: int = Field(5, description="Other wells whose z_s is swapped in.")
    which: WhichCheckpoint = Field("best", description=WHICH_HELP)
    device: str = Field("auto", description=DEVICE_HELP)
    overwrite: bool = Field(
        False, description="Replace pictures an earlier reconstruct wrote in --out."
    )


class SweepOptions(BaseModel):
    """The options of ``scbd-cells sweep``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path = Field(
        description="Sweep folder: one run per alpha, embeddings, reports, sweep.csv, "
        "tradeoff.png, sweep.md. Rerun the same command to continue an unfinished "
        "sweep."
    )
    corum: Path = Field(
        description="Complexes file for the evaluation (CORUM 3.x/4.x/5.x, two-column or GMT); "
        "reporting only, the recommended alpha never reads it."
    )
    alpha: Annotated[tuple[float, ...], Flag(csv=True)] = Field(
        (0.0, 0.3, 1.0, 3.0, 10.0),
        description="Comma-separated alphas to train (0 is added when missing).",
    )
    reference: list[Path] | None = Field(
        None,
        description="AnnData of a conventional pipeline (baseline, correct), drawn beside the "
        "alphas; repeat for several.",
    )
    margin: float = Field(
        0.5,
        description="Recommend the largest alpha whose val perturbation SupCon loss keeps at least "
        "1 - MARGIN of the sweep's largest fall below log(val batch size) "
        "(docs/training.md, Choosing alpha).",
    )
    control: Annotated[str | None, Flag(default_text="the store's")] = Field(
        None, description="Non-targeting control label for the evaluation."
    )
    config_path: Annotated[Path | None, Flag(names=("--config",))] = Field(
        None, description="YAML train options (e.g. a run's config.yaml); CLI wins."
    )
    overwrite: bool = Field(False, description="Start over: replace an earlier sweep in --out.")
