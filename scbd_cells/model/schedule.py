"""Model: the learning-rate schedule of training (``train --warmup-steps``), stateless.

The rate of step ``s`` (counted from 0) is a function of ``s`` and the options alone, set
on the optimiser before each step: a resumed run continues the schedule exactly, with no
scheduler state in the checkpoint, and an ``--lr`` changed on ``--resume`` takes effect
from the step it resumes at.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def warmup_factor(step: int, *, warmup_steps: int) -> float:
    """Linear warm-up, then constant: ``(step + 1) / warmup_steps`` below it, else 1.

    Step 0 trains at ``1 / warmup_steps`` of the rate, step ``warmup_steps - 1`` and every
    later one at the full rate. ``warmup_steps = 0`` is no warm-up (the paper's constant rate).
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, found {step}, {warmup_steps}")
    if step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def set_learning_rates(
    optimizer: torch.optim.Optimizer,
    *,
    base_lrs: Sequence[float],
    step: int,
    warmup_steps: int,
) -> None:
    """Set each parameter group's rate for ``step``: its base rate times :func:`warmup_factor`.

    ``base_lrs``: one rate per group, in the optimiser's group order (``--lr``, and
    ``--decoder-lr`` for the decoder's group).
    """
    if len(base_lrs) != len(optimizer.param_groups):
        raise ValueError(
            f"{len(base_lrs)} base rates for {len(optimizer.param_groups)} parameter groups"
        )
    factor = warmup_factor(step, warmup_steps=warmup_steps)
    for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base_lr * factor


__all__ = ["set_learning_rates", "warmup_factor"]
