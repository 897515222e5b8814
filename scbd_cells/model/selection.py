"""Model selection: which validation step each rule keeps as ``best.pt`` (``train --select``).

Two rules read the rows a validation pass logs (``metrics.csv``, phase ``val``); neither
reads a complexes file or any other evaluation input:

- ``total``: the lowest total val loss, SupCon(z_c) + SupCon(z_s) + alpha x Invariance
  (the paper's rule). z_s's SupCon is the largest and the slowest part, so this rule can
  keep a step where z_c has already begun to memorise its train cells.
- ``z_c``: the lowest val SupCon(z_c; perturbation), the loss of the embedding a lab
  analyses; a tie is broken by the lower macro F1 of the well probe on z_c (the batch
  side of z_c). The probe does not enter otherwise: on a few val batches its F1 moves by
  a few hundredths from pass to pass, and at alpha = 0 it would trade the perturbation
  for the well, which is the alpha sweep's choice, not the checkpoint's.

Both rules are followed in every run, so ``metrics.csv`` and the run's result can say
which step each would keep, whichever one keeps ``best.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: ``train --select`` choices, and the val-row columns each rule minimises, in order.
SELECTION_RULES: dict[str, tuple[str, ...]] = {
    "total": ("loss",),
    "z_c": ("supcon_perturbation", "well_f1_z_perturbation"),
}
SELECT_CHOICES = tuple(SELECTION_RULES)

# Below log B by less than this fraction of log B counts as "at the collapsed level":
# 0.005 for B = 128 (an alpha = 10 demo run sat 0.001 above it, alpha = 3 reached 0.007
# below it by a third of its steps; docs/training.md). Training's stall warning and the
# alpha sweep's rule both use it (here, beside the val-loss rules, so neither needs torch).
COLLAPSE_MARGIN = 0.001


def best_step_column(rule: str) -> str:
    """The ``metrics.csv`` column of the step ``rule`` keeps so far (``best_step_z_c``)."""
    return f"best_step_{rule}"


def _key(row: Mapping[str, Any], rule: str) -> tuple[float, ...] | None:
    """What ``rule`` minimises in a val row; None when a value is missing or not finite."""
    values = []
    for column in SELECTION_RULES[rule]:
        value = row.get(column)
        if value is None or not math.isfinite(float(value)):
            return None
        values.append(float(value))
    return tuple(values)


@dataclass
class CheckpointSelection:
    """The best val step so far under every rule: ``{rule: (key, step)}``.

    :meth:`update` with each val row in order; it returns the rules whose best moved to
    this step (a strictly lower key: an equal one keeps the earlier step).
    """

    best: dict[str, tuple[tuple[float, ...], int]] = field(default_factory=dict)

    def update(self, row: Mapping[str, Any], *, step: int) -> set[str]:
        improved = set()
        for rule in SELECTION_RULES:
            key = _key(row, rule)
            if key is None:
                continue
            if rule not in self.best or key < self.best[rule][0]:
                self.best[rule] = (key, int(step))
                improved.add(rule)
        return improved

    def best_step(self, rule: str) -> int | None:
        """The step ``rule`` keeps so far (None before the first validation)."""
        return self.best[rule][1] if rule in self.best else None

    def columns(self) -> dict[str, int | None]:
        """``{"best_step_total": step, "best_step_z_c": step}`` for a metrics row."""
        return {best_step_column(rule): self.best_step(rule) for rule in SELECTION_RULES}

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Plain types for a checkpoint (``torch.load(weights_only=True)`` reads them)."""
        return {rule: {"key": list(key), "step": step} for rule, (key, step) in self.best.items()}

    @classmethod
    def from_state(cls, state: Mapping[str, Mapping[str, Any]]) -> CheckpointSelection:
        return cls(
            {
                rule: (tuple(float(v) for v in entry["key"]), int(entry["step"]))
                for rule, entry in state.items()
                if rule in SELECTION_RULES
            }
        )

    @classmethod
    def from_rows(cls, val_rows: Iterable[Mapping[str, Any]]) -> CheckpointSelection:
        """Replay val rows (``metrics.csv``'s, in step order): a run from before ``--select``."""
        selection = cls()
        for row in val_rows:
            selection.update(row, step=int(row["step"]))
        return selection


def selected_step(val_rows: Iterable[Mapping[str, Any]], *, rule: str) -> int | None:
    """The step ``rule`` keeps over these val rows (in step order); None without any."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {SELECT_CHOICES}")
    return CheckpointSelection.from_rows(val_rows).best_step(rule)


__all__ = [
    "SELECTION_RULES",
    "SELECT_CHOICES",
    "CheckpointSelection",
    "best_step_column",
    "selected_step",
]
