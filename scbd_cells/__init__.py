"""scbd-cells: batch correction for single-cell image screens with SCBD.

Every command of the CLI is a library function with the same arguments::

    import scbd_cells
    scbd_cells.simulate("screen/", preset="tiny", seed=0)
    scbd_cells.ingest("screen/cells.csv", out="screen.zarr", perturbation_column="gene")
    store = scbd_cells.open_store("screen.zarr")

Imports are lazy: ``import scbd_cells`` does no work (torch is loaded only
when a function that needs it is called).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it. Module names differ from the function
# names on purpose: a submodule called ``train`` would shadow ``scbd_cells.train``.
_LAZY = {
    "simulate": "scbd_cells.sim.screen",
    "ingest": "scbd_cells.data.ingest",
    "open_store": "scbd_cells.data.store",
    "train": "scbd_cells.training.loop",
    "embed": "scbd_cells.embedding.encode",
    "aggregate_profiles": "scbd_cells.profiles.aggregate",
    "baseline": "scbd_cells.profiles.features",
    "evaluate": "scbd_cells.evaluation.report",
    "correct": "scbd_cells.profiles.corrections",
    "export": "scbd_cells.profiles.exports",
    "demo": "scbd_cells.pipeline",
    "reconstruct": "scbd_cells.embedding.reconstruction",
    "sweep": "scbd_cells.training.sweeping",
    "read_profile_table": "scbd_cells.profiles.profile_tables",
    "open_cells": "scbd_cells.profiles.cells",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scbd_cells' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
