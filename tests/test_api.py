"""API conventions: the public functions keep the shape STYLE.md promises.

- every command of the CLI is a library function exported lazily from ``scbd_cells``;
- at most two positional parameters, everything else keyword-only;
- ``import scbd_cells`` does no heavy work (torch is not imported).
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import scbd_cells

PUBLIC_FUNCTIONS = [name for name in scbd_cells.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_function_signature(name: str) -> None:
    function = getattr(scbd_cells, name)
    assert callable(function), f"scbd_cells.{name} is not callable"
    parameters = inspect.signature(function).parameters.values()
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    assert len(positional) <= 2, f"scbd_cells.{name} takes {len(positional)} positional arguments"
    assert function.__doc__, f"scbd_cells.{name} has no docstring"


def test_import_is_light() -> None:
    code = "import sys, scbd_cells; print('torch' in sys.modules, 'anndata' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError):
        scbd_cells.not_a_function  # noqa: B018
