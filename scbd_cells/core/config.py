"""Config: the train command's options as one frozen model; defaults < YAML < env < CLI."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

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

ENV_PREFIX = "SCBD_CELLS_TRAIN_"
ENCODER_NAMES = ("resnet18", "resnet50", "densenet121", "small", "tiny")


class TrainConfig(BaseModel):
    """Every option of ``scbd-cells train`` (paper A.1 defaults).

    Facts of the data (channels, image size, vocabularies) come from the store,
    not from here. A typo in a YAML key or keyword fails (``extra="forbid"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # model
    encoder: str = Field("resnet18", description="resnet18, resnet50, densenet121, small or tiny")
    z_dim: int = Field(64, ge=2, description="Size of z_c and z_s.")
    image_size: int | None = Field(None, ge=8, description="Model input size; None = the store's.")
    decoder: bool = Field(False, description="Train the additive decoder on detached z (A.1.1).")
    decoder_width: int | None = Field(
        None,
        ge=4,
        description="Decoder channels; None = sized to the encoder and image: 32 with small "
        "or tiny, otherwise 256 (the paper's) at 64 px, 128 at 32 px.",
    )
    decoder_lr: float | None = Field(
        None,
        gt=0,
        description="AdamW learning rate of the decoder; None = lr. The decoder learns from "
        "detached embeddings, so its rate changes no embedding.",
    )
    normalize: Literal["batch", "store", "arcsinh"] = Field(
        "batch",
        description="batch: each channel standardised with the statistics of the cell's own "
        "batch label (well); store: with the store's statistics (train split); arcsinh: the "
        "official SCBD code's transform, (arcsinh(x) - 7) / 7 for every cell.",
    )
    augment: Literal["none", "dihedral", "dihedral+shift"] = Field(
        "none",
        description="none (the paper); dihedral: each train cell turned by a random multiple "
        "of 90 degrees and mirrored with probability 1/2 (the square's 8 symmetries, exact); "
        "dihedral+shift: then moved by a random whole number of pixels, at most 1/8 of the "
        "crop (4 px at 32 px) each way, the edge reflected into the gap. A run written with "
        "the earlier on/off option reads true as dihedral, false as none.",
    )
    stem: Literal["imagenet", "small"] = Field(
        "imagenet",
        description="First layers of a ResNet/DenseNet encoder: imagenet (7x7 stride 2 + max "
        "pool, torchvision's; a 32 px crop is 8x8 after them) or small (3x3 stride 1, no "
        "pool; 32x32 stays 32x32: the usual choice at 32-64 px, about 16x the compute).",
    )
    # objective
    alpha: float = Field(1.0, ge=0, description="Weight of the invariance loss.")
    invariance: Literal["paper", "normalized"] = Field(
        "paper", description="paper: appendix B; normalized: self excluded, per-set means."
    )
    temperature: float = Field(0.1, gt=0)
    batch_target: Literal["batch", "perturbation+batch"] = "batch"
    # batches (paper A.1: 256 classes x 8 cells = 2048)
    classes_per_batch: int = Field(256, ge=1)
    cells_per_class: int = Field(
        8, ge=2, description="Cells of each class in a batch: at least 2, SupCon's positive pair."
    )
    stratify: bool = Field(
        True,
        description="Spread each perturbation's cells in a batch evenly over its batch labels, "
        "so every batch holds them in near-equal numbers; off: uniform within the "
        "perturbation (paper A.1).",
    )
    sampling: Literal["cells", "segments"] = Field(
        "cells",
        description="cells: each perturbation's cells drawn from all its train cells; segments: "
        "from one store segment (whole chunks, about 1 MiB) at a time, so that a store larger "
        "than --cache-gb is decoded about once per pass (many times faster there). The "
        "batches depend on this option, never on --cache-gb.",
    )
    # optimisation
    steps: int = Field(10_000, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Linear learning-rate warm-up: step s (from 0) trains at lr x (s + 1) / N "
        "for s < N, then at lr, constant (0: no warm-up, the paper).",
    )
    seed: int = 0
    # validation and logging
    val_every: int = Field(500, ge=1)
    val_batches: int = Field(2, ge=1, description="Class-balanced val batches per val pass.")
    select: Literal["total", "z_c"] = Field(
        "total",
        description="Which validation keeps checkpoints/best.pt: total, the lowest total val "
        "loss (the paper's rule); z_c, the lowest val SupCon(z_c; perturbation), ties broken "
        "by the lower well-probe F1 of z_c. Both rules' steps go to metrics.csv either way.",
    )
    log_every: int = Field(10, ge=1)
    stall_tolerance: float = Field(
        0.02, ge=0, description="Warn if the perturbation loss fell by less than this fraction."
    )
    # hardware and data path
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    compile: bool = False
    cache_gb: float = Field(4.0, ge=0)
    workers: int = Field(2, ge=0)
    prefetch: int = Field(2, ge=0)

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
    try:
        return TrainConfig(**options)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            if e["loc"]
            else e["msg"].removeprefix("Value error, ")  # a rule across options
            for e in error.errors()
        )
        raise InputError(
            f"invalid train options ({problems}). See `scbd-cells train --help`."
        ) from error


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
