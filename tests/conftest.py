"""Shared fixtures: a tiny simulated screen and its store, built once per test session."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

# Keep CPU tests predictable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _private_state_folder(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Ownership records of the files tests write go to a folder of the test session's own
    (``XDG_STATE_HOME``, inherited by the CLI subprocesses), not to the user's."""
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` simulated screen (crops layout), seed 0."""
    from scbd_cells import simulate

    out_dir = tmp_path_factory.mktemp("tiny_screen") / "screen"
    simulate(out_dir, preset="tiny", seed=0)
    return out_dir


@pytest.fixture(scope="session")
def tiny_store(tiny_screen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny screen ingested into a store (perturbation = gene, batch = plate,well)."""
    from scbd_cells import ingest

    store_path = tmp_path_factory.mktemp("tiny_store") / "screen.zarr"
    ingest(
        tiny_screen / "cells.csv",
        out=store_path,
        perturbation_column="gene",
        guide_column="guide",
        control="nontargeting",
    )
    return store_path


def write_corum_file(path: Path, complexes: dict[str, list[str]]) -> Path:
    """A CORUM 5.x-style complexes file (human rows) from ``{complex name: genes}``."""
    lines = ["complex_id\tcomplex_name\torganism\tsubunits_gene_name"]
    lines += [f"{i}\t{k}\tHuman\t{';'.join(v)}" for i, (k, v) in enumerate(complexes.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def entries_of(folder: Path) -> list[str]:
    """Sorted names in ``folder``, without the lock files scbd-cells leaves beside outputs."""
    return sorted(p.name for p in folder.iterdir() if not re.fullmatch(r"\..+\.lock", p.name))


@pytest.fixture
def entries():
    """The :func:`entries_of` helper, as a fixture."""
    return entries_of


@pytest.fixture
def write_corum():
    """The :func:`write_corum_file` helper, as a fixture (test modules do not import conftest)."""
    return write_corum_file


def import_pycytominer():
    """pycytominer, imported without its side effect on the rest of the test session.

    Importing pycytominer sets ``pandas.options.mode.copy_on_write = True`` for the whole
    process (its preparation for pandas 3), which would change the behaviour of every
    test that runs after it; the option is put back once the import is done.
    """
    import pandas as pd

    with pd.option_context("mode.copy_on_write", pd.options.mode.copy_on_write):
        import pycytominer
        import pycytominer.operations  # noqa: F401
    return pycytominer


@pytest.fixture
def pycytominer():
    """:func:`import_pycytominer` as a fixture."""
    return import_pycytominer()


@pytest.fixture(autouse=True)
def _scbd_log_level_restored() -> object:
    """A CLI call in one test (``-q``, ``-v``) sets the package's log level; undo it."""
    import logging

    logger = logging.getLogger("scbd_cells")
    level = logger.level
    yield
    logger.setLevel(level)
