"""Data: per-batch (per-well) channel statistics, for normalising each well on its own.

Every well of a screen has its own brightness and background: a stain that sat
longer, a lamp that aged, a camera offset. Standardising each channel with the
statistics of the cell's own well (``--normalize batch``) removes that affine
part of the batch effect before the encoders see a pixel, the way plate and
well normalisation is routine for CellProfiler features; SCBD's invariance
loss then only has to purge what is left (blur, noise, uneven illumination).

This assumes what SCBD assumes anyway: every batch label holds cells of many
perturbations (a pooled screen, or plates of an arrayed one), so that a
well's mean is not one perturbation's phenotype.

Statistics come from a seeded sample of whole chunks, so they cost a fraction
of a pass on a large store and are identical every time they are computed
from the same store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scbd_cells.core.errors import DataError
from scbd_cells.data import schema

if TYPE_CHECKING:
    from scbd_cells.data.store import Store

#: Cells per batch label the statistics are computed from (at most).
DEFAULT_CELLS_PER_BATCH = 2048


@dataclass(frozen=True)
class BatchChannelStats:
    """Per-channel mean and std of raw intensities, one row per batch label.

    Attributes
    ----------
    labels
        Batch labels, in the order of the rows.
    mean, std
        (n_labels, C) float64 arrays (population std).
    n_cells
        (n_labels,) cells each row was computed from.
    """

    labels: list[str]
    mean: np.ndarray
    std: np.ndarray
    n_cells: np.ndarray

    def rows_for(self, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) arrays of shape (len(labels), C) in the order of ``labels``.

        Raises :class:`DataError` for a label without statistics.
        """
        position = {label: index for index, label in enumerate(self.labels)}
        missing = [label for label in labels if label not in position]
        if missing:
            raise DataError(
                f"No channel statistics for batch label(s) {missing[:5]}: expected every batch "
                f"label of the store among {self.labels[:5]}... Recompute them from this store."
            )
        order = np.array([position[label] for label in labels], dtype=np.int64)
        return self.mean[order], self.std[order]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, for checkpoints (``torch.load(weights_only=True)``) and JSON."""
        return {
            "labels": list(self.labels),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "n_cells": self.n_cells.tolist(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BatchChannelStats:
        return cls(
            labels=[str(label) for label in values["labels"]],
            mean=np.asarray(values["mean"], dtype=np.float64),
            std=np.asarray(values["std"], dtype=np.float64),
            n_cells=np.asarray(values["n_cells"], dtype=np.int64),
        )


def batch_channel_stats(
    store: Store, *, cells_per_batch: int = DEFAULT_CELLS_PER_BATCH, seed: int = 0
) -> BatchChannelStats:
    """Per-channel mean and std of every batch label's cells (all splits), from a sample.

    Whole chunks are read in a seeded random order until every batch label has
    ``cells_per_batch`` cells (or all of its cells), up to twice that many cells
    in all; a label still short then (a rare well) gets the rest of its sample
    read row by row, so a rare well never makes this a pass over the store. A
    store smaller than the sample is read whole and the statistics are exact.

    Parameters
    ----------
    store
        An open store.
    cells_per_batch
        Cells per batch label to stop at (at least 1).
    seed
        Seed of the chunk order and of the rows drawn for rare labels.
    """
    if cells_per_batch < 1:
        raise ValueError(f"cells_per_batch must be at least 1, found {cells_per_batch}")
    codes, labels = store.codes(schema.BATCH)
    codes = np.asarray(codes, dtype=np.int64)
    n_labels, n_channels = len(labels), store.n_channels
    wanted = np.minimum(np.bincount(codes, minlength=n_labels), cells_per_batch)
    chunk = int(store.images.chunks[0])
    n_chunks = -(-store.n_cells // chunk)
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(n_chunks)
    sums = np.zeros((n_labels, n_channels))
    squares = np.zeros((n_labels, n_channels))
    counts = np.zeros(n_labels, dtype=np.int64)

    def add(rows: np.ndarray) -> None:
        images = store.read(rows).astype(np.float64)  # (n, C, H, W)
        cell_codes = codes[rows]
        np.add.at(sums, cell_codes, images.sum(axis=(2, 3)))
        np.add.at(squares, cell_codes, np.square(images).sum(axis=(2, 3)))
        counts[:] += np.bincount(cell_codes, minlength=n_labels)

    budget, n_read, chunks_read = 2 * int(wanted.sum()), 0, []
    for chunk_id in order:
        if np.all(counts >= wanted) or n_read >= budget:
            break
        rows = np.arange(int(chunk_id) * chunk, min((int(chunk_id) + 1) * chunk, store.n_cells))
        add(rows)  # one whole chunk
        n_read += rows.size
        chunks_read.append(int(chunk_id))
    read_mask = np.zeros(n_chunks, dtype=bool)
    read_mask[chunks_read] = True
    for code in np.flatnonzero(counts < wanted):
        unread = np.flatnonzero((codes == code) & ~read_mask[np.arange(codes.size) // chunk])
        add(np.sort(rng.choice(unread, size=int(wanted[code] - counts[code]), replace=False)))
    pixels = counts[:, None] * int(np.prod(store.image_size))
    empty = counts == 0  # a label without cells is never looked up; keep it finite
    pixels[empty] = 1
    mean = sums / pixels
    variance = squares / pixels - np.square(mean)
    variance[empty] = 1.0
    return BatchChannelStats(
        labels=[str(label) for label in labels],
        mean=mean,
        std=np.sqrt(np.maximum(variance, 0.0)),
        n_cells=counts,
    )
