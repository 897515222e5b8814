"""Evaluate: what a report was made from (``metrics.json``'s ``"provenance"`` object).

scbd-cells' version, the date, and each input: its path and size on disk, the cells, the
key evaluated and what scbd-cells recorded in its ``uns["scbd"]`` when it wrote the file
(kind, checkpoint step, the training run's alpha and steps, the correction method).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from scbd_cells.profiles.cells import Cells


def path_bytes(path: Path) -> int:
    """Size on disk of a file, or of every file under a folder (``.zarr``)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _recorded(adata: Cells) -> dict[str, Any]:
    return adata.provenance()


def input_provenance(path: Path, *, key: str, adata: Cells) -> dict[str, Any]:
    """One input's entry: path, bytes, cells, key, and the training facts it carries."""
    recorded = _recorded(adata)
    config = recorded.get("config") or {}
    if isinstance(config, str):  # files written before the config was a nested dict
        try:
            config = json.loads(config)
        except ValueError:
            config = {}
    step = recorded.get("step")
    return {
        "path": str(path.resolve()),
        "bytes": path_bytes(path),
        "n_cells": int(adata.n_obs),
        "key": key,
        "kind": str(recorded.get("kind", "")),
        "checkpoint": str(recorded.get("checkpoint", "")),
        "checkpoint_step": int(step) if step is not None else None,
        "alpha": float(config["alpha"]) if "alpha" in config else None,
        "steps": int(config["steps"]) if "steps" in config else None,
        "method": str(recorded.get("method", "")),
        "written_by": str(recorded.get("version", "")),
    }


def report_provenance(
    inputs: dict[str, dict[str, Any]], *, complexes_path: Path
) -> dict[str, Any]:
    """The ``"provenance"`` object of ``metrics.json``."""
    from scbd_cells import __version__

    return {
        "scbd_cells_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "inputs": inputs,
        "complexes": {
            "path": str(complexes_path.resolve()),
            "bytes": path_bytes(complexes_path),
        },
    }
