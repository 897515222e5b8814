"""Sampler: class-balanced batches of store rows, as the paper's A.1 (seeded, resumable)."""

from __future__ import annotations

from typing import Any

import numpy as np

from scbd_cells.errors import InputError


class BalancedBatchSampler:
    """Draw batches of ``classes_per_batch`` distinct perturbations x ``cells_per_class`` cells.

    Per batch (paper A.1): draw ``classes_per_batch`` distinct perturbation
    classes from the class distribution of ``cell_indices`` (class k with
    probability n_k / n, successively without replacement within the batch),
    then ``cells_per_class`` cells of each drawn class, without replacement
    within the class. A class with fewer cells than ``cells_per_class`` is
    sampled *with* replacement, so every batch has exactly
    ``classes_per_batch * cells_per_class`` rows and every drawn class the
    same number of them (a cell may then appear twice in a batch; it is a
    positive of itself, which is harmless for SupCon).

    Parameters
    ----------
    perturbation_codes
        Integer class codes, either of the rows listed in ``cell_indices``
        (same length) or of every store row (indexed by ``cell_indices``).
    cell_indices
        Store rows to sample from (e.g. the train split).
    classes_per_batch, cells_per_class
        Batch shape; the batch size is their product.
    seed
        Seed of the sampler's own random generator.
    """

    def __init__(
        self,
        perturbation_codes: np.ndarray,
        cell_indices: np.ndarray,
        *,
        classes_per_batch: int,
        cells_per_class: int,
        seed: int,
    ) -> None:
        codes = np.asarray(perturbation_codes)
        rows = np.asarray(cell_indices, dtype=np.int64)
        if codes.shape[0] != rows.shape[0]:
            codes = codes[rows]  # codes of every store row
        if rows.size == 0:
            raise InputError("the sampler got no cells: the split to sample from is empty")
        classes, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
        if classes_per_batch < 1 or cells_per_class < 1:
            raise InputError(
                "classes_per_batch and cells_per_class must be at least 1; found "
                f"{classes_per_batch} and {cells_per_class}"
            )
        if classes_per_batch > len(classes):
            raise InputError(
                f"classes per batch ({classes_per_batch}) is larger than the number of "
                f"perturbation classes available ({len(classes)}). Use --classes-per-batch "
                f"{len(classes)} or fewer (and raise --cells-per-class to keep the batch size)."
            )
        order = np.argsort(inverse, kind="stable")
        self.classes = classes  # (K,) class codes
        self.class_counts = counts  # (K,)
        self.class_probabilities = counts / counts.sum()  # (K,)
        # rows of class k: self._rows[self._starts[k] : self._starts[k + 1]]
        self._rows = rows[order]
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.classes_per_batch = int(classes_per_batch)
        self.cells_per_class = int(cells_per_class)
        self.seed = int(seed)
        self.batch_size = self.classes_per_batch * self.cells_per_class
        self.n_small_classes = int((counts < cells_per_class).sum())
        self._rng = np.random.default_rng(seed)
        self.batches_drawn = 0

    def next_indices(self) -> np.ndarray:
        """The next global batch: int64 store rows (B,), grouped by class (cells_per_class each)."""
        chosen = self._rng.choice(
            len(self.classes),
            size=self.classes_per_batch,
            replace=False,
            p=self.class_probabilities,
        )
        pieces = []
        for k in chosen:
            start, stop = self._starts[k], self._starts[k + 1]
            n = stop - start
            small = n < self.cells_per_class
            within = self._rng.choice(n, size=self.cells_per_class, replace=small)
            pieces.append(self._rows[start + within])
        self.batches_drawn += 1
        return np.concatenate(pieces).astype(np.int64)

    def __iter__(self):
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (ints and strings only) for an exact resume."""
        state = self._rng.bit_generator.state
        return {
            "seed": self.seed,
            "batches_drawn": self.batches_drawn,
            "bit_generator": state["bit_generator"],
            "state": int(state["state"]["state"]),
            "inc": int(state["state"]["inc"]),
            "has_uint32": int(state["has_uint32"]),
            "uinteger": int(state["uinteger"]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator so that the next batch is the one an uninterrupted run draws."""
        self._rng.bit_generator.state = {
            "bit_generator": state["bit_generator"],
            "state": {"state": int(state["state"]), "inc": int(state["inc"])},
            "has_uint32": int(state["has_uint32"]),
            "uinteger": int(state["uinteger"]),
        }
        self.batches_drawn = int(state["batches_drawn"])
