"""Distributed (launcher side): this process's rank as torchrun sets it, without torch.

A run is distributed iff ``RANK`` is set. Progress bars and output locks ask
whether they are on rank 0 before any model is built (and for ``--help``), so
this lives apart from :mod:`scbd_cells.core.distributed`, which imports torch.
"""

from __future__ import annotations

import os


def launched_rank() -> int | None:
    """The rank torchrun gave this process (``RANK``), or None outside torchrun."""
    value = os.environ.get("RANK")
    return None if value is None else int(value)


def is_rank_zero() -> bool:
    """True in one process and on rank 0 under torchrun (the rank that logs and writes)."""
    return (launched_rank() or 0) == 0
