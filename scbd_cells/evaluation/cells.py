"""Evaluate: what the values of an embedding allow (NaN, infinite, collapsed), read in chunks.

The files themselves are opened by :func:`scbd_cells.profiles.cells.open_cells`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scbd_cells.profiles.cells import ROW_CHUNK


@dataclass(frozen=True)
class ValueCheck:
    """What :func:`check_values` found in an embedding matrix.

    Attributes
    ----------
    n_nonfinite
        NaN, infinite or beyond-float32 entries (infinite once read as float32).
    n_constant_columns, n_columns
        Columns whose finite values are all equal (zero variance), and all columns.
    """

    n_nonfinite: int
    n_constant_columns: int
    n_columns: int

    @property
    def constant(self) -> bool:
        """Every column constant: every cell has the same embedding."""
        return self.n_constant_columns == self.n_columns


def check_values(data: Any, *, chunk_size: int = ROW_CHUNK) -> ValueCheck:
    """Count non-finite entries and constant columns, one row chunk at a time (bounded memory)."""
    n_rows, width = (int(size) for size in data.shape)
    low = np.full(width, np.inf)
    high = np.full(width, -np.inf)
    nonfinite = 0
    for start in range(0, n_rows, chunk_size):
        block = data[start : start + chunk_size]
        block = np.asarray(block.toarray() if hasattr(block, "toarray") else block, np.float64)
        with np.errstate(invalid="ignore"):  # beyond float32: infinite once read as float32
            finite = np.abs(block) <= np.finfo(np.float32).max
        nonfinite += int(block.size - np.count_nonzero(finite))
        low = np.minimum(low, np.where(finite, block, np.inf).min(axis=0, initial=np.inf))
        high = np.maximum(high, np.where(finite, block, -np.inf).max(axis=0, initial=-np.inf))
    constant = int(np.count_nonzero(~(high > low)))
    return ValueCheck(n_nonfinite=nonfinite, n_constant_columns=constant, n_columns=width)
