"""Sampler: class-balanced batches of store rows, as the paper's A.1 (seeded, resumable)."""

from __future__ import annotations

from typing import Any

import numpy as np

from scbd_cells.core.errors import InputError


def arrays_as_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The state with numpy arrays as torch tensors (what a checkpoint can hold safely)."""
    import torch

    return {
        key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        for key, value in state.items()
    }


def equal_allocation(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` draws over groups as equally as their sizes allow (water-filling).

    Groups smaller than their fair share give all their members; the rest of the draws
    are split evenly over the other groups, the first ``remainder`` of them (in the
    order given) taking one more. The result is what handing out the draws one at a
    time does, each to the group with the fewest so far that still has members (the
    earliest in the order on ties).

    Parameters
    ----------
    counts
        (G,) group sizes, in the order that breaks ties (shuffle it for a random one).
    total
        Draws to split; at most ``counts.sum()``.

    Returns
    -------
    np.ndarray
        (G,) draws per group, summing to ``total``, each at most its group's size.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if total > counts.sum():
        raise ValueError(f"cannot draw {total} from groups of {int(counts.sum())} in all")
    by_size = np.argsort(counts, kind="stable")
    smallest_first = counts[by_size]
    taken = np.concatenate([[0], np.cumsum(smallest_first)])
    n_full = 0  # the n_full smallest groups are used up
    while n_full < len(counts):
        remaining, n_open = total - taken[n_full], len(counts) - n_full
        if smallest_first[n_full] >= -(-remaining // n_open):  # room for an even share
            break
        n_full += 1
    quota = np.zeros_like(counts)
    quota[by_size[:n_full]] = smallest_first[:n_full]
    open_groups = np.sort(by_size[n_full:])
    share, extra = divmod(int(total - taken[n_full]), len(open_groups))
    quota[open_groups] = share
    quota[open_groups[:extra]] += 1
    return quota


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
    batch_codes
        Optional batch-label codes (wells, environments), aligned like
        ``perturbation_codes``. When given, the ``cells_per_class`` cells of a
        drawn class are spread as evenly as its cells allow over the batch labels
        it has (*stratified*): the labels in a random order take
        ``cells_per_class // L`` cells each and the first ``cells_per_class % L``
        one more (a label with too few cells gives what it has, the others make up
        the rest), uniformly within each (class, label). A batch then holds its
        batch labels in near-equal numbers instead of in proportions that vary by
        chance from batch to batch; see :func:`equal_allocation`. Cells of a class's
        rare labels are drawn more often than under the uniform draw.

    Notes
    -----
    :meth:`use_segments` switches how the cells *within* a class are drawn,
    for stores read in whole chunks (the loader does it when the images do not
    fit its cache budget); the class draw is unchanged. See its docstring.
    """

    def __init__(
        self,
        perturbation_codes: np.ndarray,
        cell_indices: np.ndarray,
        *,
        classes_per_batch: int,
        cells_per_class: int,
        seed: int,
        batch_codes: np.ndarray | None = None,
    ) -> None:
        codes = np.asarray(perturbation_codes)
        rows = np.asarray(cell_indices, dtype=np.int64)
        if codes.shape[0] != rows.shape[0]:
            codes = codes[rows]  # codes of every store row
        strata = None
        if batch_codes is not None:
            strata = np.asarray(batch_codes)
            if strata.shape[0] != rows.shape[0]:
                strata = strata[rows]
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
        if strata is None:
            order = np.argsort(inverse, kind="stable")
        else:  # by class, then by batch label within the class
            order = np.lexsort((strata, inverse))
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
        self.segment_cells: int | None = None  # None: uniform within class (the default)
        self._home_ranks = 1
        self.stratified = strata is not None
        self._strata: np.ndarray | None = None  # batch label of each of self._rows
        if strata is not None:
            self._strata = strata[order]
            # batch-label runs of class k: self._label_starts[self._class_labels[k] : ...[k + 1]]
            position = np.arange(len(order))
            new_run = np.ones(len(order), dtype=bool)
            new_run[1:] = (self._strata[1:] != self._strata[:-1]) | np.isin(
                position[1:], self._starts[1:-1]
            )
            self._label_starts = np.concatenate([np.flatnonzero(new_run), [len(order)]])
            self._class_labels = np.searchsorted(self._label_starts, self._starts)

    # -- within-class draw from store segments ------------------------------------------
    def use_segments(self, segment_cells: int, *, world_size: int = 1) -> None:
        """Draw the cells of a class segment by segment, each segment used up before the next.

        A *segment* is the run of store rows ``[s * segment_cells, (s + 1) *
        segment_cells)`` (the loader's unit of decoding: whole chunks). Per class
        the sampler keeps a queue: the class's sampled rows of one segment, in a
        random order. A drawn class takes its ``cells_per_class`` cells from the
        front of its queue; an empty queue is refilled with the class's next
        segment. The segments of a class are visited in a random order per pass
        (a new order every pass), so every cell of the class is drawn once per
        pass and a decoded segment is used up before the next is needed: about
        one decode per cell. The class draw (``classes_per_batch`` distinct
        classes from the class distribution), batch shape, no repeated cell
        within a class's group, and the with-replacement rule for classes
        smaller than ``cells_per_class`` are unchanged. A row taken at the end
        of one pass is not taken again in the same batch from the next pass.

        Parameters
        ----------
        segment_cells
            Rows per segment (a multiple of the store's chunk length).
        world_size
            Ranks that share each global batch (torchrun). With more than one,
            and ``classes_per_batch`` divisible by it, the class groups of a batch
            are ordered so that a class goes to the same rank whenever there is
            room (class code modulo ``world_size``), so that a rank keeps
            decoding its own classes' segments.
        """
        if segment_cells < 1:
            raise InputError(f"segment_cells must be at least 1; found {segment_cells}.")
        segment_cells = int(segment_cells)
        n_classes = len(self.classes)
        class_of = np.repeat(np.arange(n_classes), self.class_counts)  # position -> class
        rows, strata = self._rows, self._strata
        same_class = class_of[1:] == class_of[:-1]
        if np.any((rows[1:] < rows[:-1]) & same_class):  # sort within class (usually sorted)
            by_row = np.lexsort((rows, class_of))
            rows = rows[by_row]
            strata = None if strata is None else strata[by_row]
        if np.any((rows[1:] == rows[:-1]) & same_class):
            raise InputError(
                "Segment sampling needs distinct cell rows; found repeated rows in cell_indices. "
                "Pass each store row once."
            )
        self._segment_rows = rows  # sorted within class (uniform mode keeps using _rows)
        self._segment_strata = strata  # their batch labels (stratified) or None
        segment = rows // segment_cells
        starts = np.flatnonzero(
            np.concatenate([[True], (segment[1:] != segment[:-1]) | ~same_class])
        )  # first position of each class-segment, classes in order
        per_class = np.bincount(class_of[starts], minlength=n_classes)
        first_segment = np.concatenate([[0], np.cumsum(per_class)]).astype(np.int64)
        self.segment_cells = segment_cells
        self._home_ranks = int(world_size) if world_size > 1 else 1
        self._segment_first = first_segment
        self._segment_starts = np.concatenate([starts, [len(rows)]]).astype(np.int64)
        # rows of class-segment j: self._segment_rows[_segment_starts[j] : _segment_starts[j + 1]]
        self._queues: list[np.ndarray] = [np.empty(0, np.int64) for _ in range(n_classes)]
        self._order = np.zeros(first_segment[-1], np.int64)  # per class: its pass order
        self._position = np.full(n_classes, -1, np.int64)  # next position in the order; -1: none
        self._passes = np.zeros(n_classes, np.int64)

    def _next_segment(self, k: int) -> slice:
        """Where class k's rows of its next segment lie in ``_segment_rows`` (a new random
        visiting order of the segments every pass)."""
        first, last = self._segment_first[k], self._segment_first[k + 1]
        if self._position[k] < 0 or self._position[k] >= last - first:
            self._order[first:last] = self._rng.permutation(last - first)
            self._position[k] = 0
            self._passes[k] += 1
        j = first + self._order[first + self._position[k]]
        self._position[k] += 1
        return slice(self._segment_starts[j], self._segment_starts[j + 1])

    def _shuffled_segment(self, k: int) -> np.ndarray:
        """Class k's rows of its next segment in a random order; stratified, the batch
        labels take turns (one cell of each label present, in a random label order,
        then the next), so that consecutive cells of the queue spread over the labels."""
        where = self._next_segment(k)
        rows = self._segment_rows[where]
        if self._segment_strata is None:
            return self._rng.permutation(rows)
        permutation = self._rng.permutation(len(rows))
        labels = self._segment_strata[where][permutation]
        unique, label_index = np.unique(labels, return_inverse=True)
        by_label = np.argsort(label_index, kind="stable")
        first = np.searchsorted(label_index[by_label], np.arange(len(unique)))
        turn = np.empty(len(rows), dtype=np.int64)
        turn[by_label] = np.arange(len(rows)) - first[label_index[by_label]]
        label_order = self._rng.permutation(len(unique))
        return rows[permutation][np.lexsort((label_order[label_index], turn))]

    def _draw_from_segments(self, k: int) -> np.ndarray:
        queue = self._queues[k]
        need = self.cells_per_class
        if len(queue) >= need:
            self._queues[k] = queue[need:]
            return queue[:need]
        taken = [queue]
        n_taken = len(queue)
        while n_taken < need:
            fresh = self._shuffled_segment(k)
            if n_taken:  # same segment again at a pass boundary: no repeat within the batch
                fresh = fresh[~np.isin(fresh, np.concatenate(taken))]
            take = fresh[: need - n_taken]
            taken.append(take)
            n_taken += len(take)
            queue = fresh[len(take) :]
        self._queues[k] = queue
        return np.concatenate(taken)

    def _order_for_ranks(self, chosen: np.ndarray, pieces: list[np.ndarray]) -> list[np.ndarray]:
        """Class groups reordered so that class k lands on rank k % world_size when it fits."""
        ranks = self._home_ranks
        if ranks <= 1 or self.classes_per_batch % ranks:
            return pieces
        room = self.classes_per_batch // ranks
        slots: list[list[int]] = [[] for _ in range(ranks)]
        overflow = []
        for position, k in enumerate(chosen):
            home = int(self.classes[k]) % ranks
            (slots[home] if len(slots[home]) < room else overflow).append(position)
        for slot in slots:
            while len(slot) < room:
                slot.append(overflow.pop(0))
        return [pieces[position] for slot in slots for position in slot]

    def _draw_stratified(self, k: int) -> np.ndarray:
        """``cells_per_class`` distinct rows of class k, spread evenly over its batch labels."""
        runs = self._label_starts[self._class_labels[k] : self._class_labels[k + 1] + 1]
        counts = np.diff(runs)
        order = self._rng.permutation(len(counts))
        quota = np.empty_like(counts)
        quota[order] = equal_allocation(counts[order], self.cells_per_class)
        one = np.flatnonzero(quota == 1)  # the usual case with many labels: one draw for all
        pieces = [self._rows[runs[one] + self._rng.integers(0, counts[one])]]
        for label in np.flatnonzero(quota > 1):
            within = self._rng.choice(counts[label], size=quota[label], replace=False)
            pieces.append(self._rows[runs[label] + within])
        return np.concatenate(pieces)

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
            if self.segment_cells is not None and not small:
                pieces.append(self._draw_from_segments(k))
                continue
            if self.stratified and not small:
                pieces.append(self._draw_stratified(k))
                continue
            within = self._rng.choice(n, size=self.cells_per_class, replace=small)
            pieces.append(self._rows[start + within])
        if self.segment_cells is not None:
            pieces = self._order_for_ranks(chosen, pieces)
        self.batches_drawn += 1
        return np.concatenate(pieces).astype(np.int64)

    def __iter__(self):
        while True:
            yield self.next_indices()

    def state_dict(self, *, as_tensors: bool = True) -> dict[str, Any]:
        """State for an exact resume: ints and strings, plus int64 arrays in segment mode.

        In segment mode the state also holds, per class, the rows still queued
        (store rows, not pixels: the loader decodes their segments again after a
        resume), the current pass's segment order and the position in it: torch
        tensors (loadable with ``torch.load(weights_only=True)``), or numpy
        arrays with ``as_tensors=False`` (cheaper to copy; the loader snapshots
        the state before every batch).
        """
        state = self._rng.bit_generator.state
        result: dict[str, Any] = {
            "seed": self.seed,
            "batches_drawn": self.batches_drawn,
            "bit_generator": state["bit_generator"],
            "state": int(state["state"]["state"]),
            "inc": int(state["state"]["inc"]),
            "has_uint32": int(state["has_uint32"]),
            "uinteger": int(state["uinteger"]),
        }
        if self.segment_cells is not None:
            sizes = np.fromiter(map(len, self._queues), np.int64, len(self._queues))
            rows = np.concatenate(self._queues) if sizes.sum() else np.empty(0, np.int64)
            result.update(
                segment_cells=self.segment_cells,
                home_ranks=self._home_ranks,
                queue_sizes=sizes,
                queue_rows=rows.astype(np.int64),
                segment_order=self._order.copy(),
                segment_position=self._position.copy(),
                passes=self._passes.copy(),
            )
        return arrays_as_tensors(result) if as_tensors else result

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator so that the next batch is the one an uninterrupted run draws."""
        self._rng.bit_generator.state = {
            "bit_generator": state["bit_generator"],
            "state": {"state": int(state["state"]), "inc": int(state["inc"])},
            "has_uint32": int(state["has_uint32"]),
            "uinteger": int(state["uinteger"]),
        }
        self.batches_drawn = int(state["batches_drawn"])
        if state.get("segment_cells") is None:
            self.segment_cells = None
            return
        # a run started in segment mode continues in it, whatever the loader chose now
        self.use_segments(int(state["segment_cells"]), world_size=int(state["home_ranks"]))
        sizes = np.asarray(state["queue_sizes"], dtype=np.int64)
        if len(sizes) != len(self.classes) or len(state["segment_order"]) != len(self._order):
            raise InputError(
                "The sampler state does not fit these cells: it was saved for "
                f"{len(sizes)} classes and {len(state['segment_order'])} class segments, found "
                f"{len(self.classes)} and {len(self._order)}. Resume on the same store and split."
            )
        rows = np.asarray(state["queue_rows"], dtype=np.int64).copy()
        self._queues = list(np.split(rows, np.cumsum(sizes)[:-1]))
        self._order = np.asarray(state["segment_order"], dtype=np.int64).copy()
        self._position = np.asarray(state["segment_position"], dtype=np.int64).copy()
        self._passes = np.asarray(state["passes"], dtype=np.int64).copy()
