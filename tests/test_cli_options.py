"""Every command's options reach its library function, converted as documented.

Each case runs the real CLI (Typer parsing, `-q` after the subcommand) with the library
function replaced by a recorder, and checks the keyword arguments it received: a typo
in the wiring (an option dropped, two swapped, a default passed instead of the value)
fails here, without running the work itself.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from typer.testing import CliRunner

from scbd_cells.cli import app


class Recorded(Exception):
    """Raised by the recorder once it has the arguments (the command stops there)."""


CASES = [
    (
        ["simulate", "OUT", "--preset", "tiny", "--seed", "7", "--layout", "fields",
         "--holdout-plates", "1", "--workers", "3"],
        "scbd_cells.sim.screen", "simulate",
        {"preset": "tiny", "seed": 7, "layout": "fields", "holdout_plates": 1, "workers": 3},
    ),
    (
        ["ingest", "cells.csv", "--out", "s.zarr", "--perturbation-column", "gene",
         "--batch-columns", "plate, well", "--split-fractions", "0.7,0.1,0.2",
         "--channel-names", "dna,actin", "--skip-bad", "--workers", "3"],
        "scbd_cells.data.ingest", "ingest",
        {"perturbation_column": "gene", "batch_columns": ["plate", "well"],
         "split_fractions": [0.7, 0.1, 0.2], "channel_names": ["dna", "actin"],
         "skip_bad": True, "workers": 3},
    ),
    (
        ["ingest", "cells.csv", "--out", "s.zarr", "--perturbation-column", "gene",
         "--scheduler", "tcp://head:8786"],
        "scbd_cells.data.ingest", "ingest",
        {"scheduler": "tcp://head:8786", "workers": 2},
    ),
    (
        ["train", "s.zarr", "--out", "run", "--alpha", "2.5", "--encoder", "tiny",
         "--sampling", "segments", "--no-stratify", "--classes-per-batch", "5",
         "--decoder", "--decoder-lr", "0.003", "--normalize", "store", "--device", "cpu"],
        "scbd_cells.training.loop", "train",
        {"alpha": 2.5, "encoder": "tiny", "sampling": "segments", "stratify": False,
         "classes_per_batch": 5, "decoder": True, "decoder_lr": 0.003, "normalize": "store",
         "device": "cpu", "resume": False},
    ),
    (
        ["embed", "run", "s.zarr", "--out", "c.h5ad", "--which", "last", "--batch-size", "7",
         "--representation", "encoder", "--aggregate", "--device", "cpu", "--overwrite"],
        "scbd_cells.embedding.encode", "embed",
        {"which": "last", "batch_size": 7, "representation": "encoder", "aggregate": True,
         "device": "cpu", "overwrite": True},
    ),
    (
        ["baseline", "s.zarr", "--out", "b.h5ad", "--features", "cellprofiler",
         "--n-components", "5", "--normalize", "batch", "--nucleus-channel", "dna"],
        "scbd_cells.profiles.features", "baseline",
        {"features": "cellprofiler", "n_components": 5, "normalize": "batch",
         "nucleus_channel": "dna"},
    ),
    (
        ["evaluate", "a.h5ad", "b.h5ad", "--corum", "c.txt", "--out", "r", "--label", "A",
         "--label", "B", "--null-size", "10", "--no-umap", "--holdout-key", "plate",
         "--holdout-batches", "p3,p4", "--max-cells", "99", "--batch-key", "plate,well"],
        "scbd_cells.evaluation.report", "evaluate",
        {"labels": ["A", "B"], "null_size": 10, "umap": False, "holdout_key": "plate",
         "holdout_batches": ["p3", "p4"], "max_cells": 99, "batch_key": "plate,well"},
    ),
    (
        ["correct", "b.h5ad", "--method", "sphering", "--out", "x.h5ad", "--key", "X_pca",
         "--control", "NT"],
        "scbd_cells.profiles.corrections", "correct",
        {"method": "sphering", "key": "X_pca", "control": "NT"},
    ),
    (
        ["export", "c.h5ad", "--level", "gene", "--out", "g.parquet", "--key", "X_pca"],
        "scbd_cells.profiles.exports", "export",
        {"level": "gene", "key": "X_pca"},
    ),
    (
        ["demo", "--out", "d", "--preset", "tiny", "--steps", "3", "--alpha", "0.5",
         "--device", "cpu"],
        "scbd_cells.pipeline", "demo",
        {"preset": "tiny", "steps": 3, "alpha": 0.5, "device": "cpu"},
    ),
    (
        ["reconstruct", "run", "s.zarr", "--out", "p", "--wells", "2", "--cells", "3",
         "--perturbations", "A,B", "--which", "last"],
        "scbd_cells.embedding.reconstruction", "reconstruct",
        {"wells": 2, "cells": 3, "perturbations": ["A", "B"], "which": "last"},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("arguments", "module", "function", "expected"), CASES,
                         ids=[case[0][0] for case in CASES])  # fmt: skip
def test_options_reach_the_library(
    arguments: list[str],
    module: str,
    function: str,
    expected: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    received: dict[str, Any] = {}

    def recorder(*args: Any, **kwargs: Any) -> None:
        received.update(kwargs, positional=args)
        raise Recorded

    monkeypatch.setattr(importlib.import_module(module), function, recorder)
    result = CliRunner().invoke(app, [*arguments, "-q"])
    assert isinstance(result.exception, Recorded), result.output
    for key, value in expected.items():
        assert received.get(key) == value, (key, received.get(key), value)


def test_info_passes_verify_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}

    class FakeStore:
        def summary(self) -> dict:
            return {}

        def verify(self, *, workers: int) -> list:
            calls["workers"] = workers
            raise Recorded

    import scbd_cells.data.store as store_module

    monkeypatch.setattr(store_module, "open_store", lambda path: FakeStore())
    result = CliRunner().invoke(app, ["info", "s.zarr", "--verify", "--workers", "5"])
    assert isinstance(result.exception, Recorded), result.output
    assert calls == {"workers": 5}
