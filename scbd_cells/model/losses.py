"""Model: the SCBD losses (paper section 2, appendix B), pure functions of embeddings and labels.

With their defaults, :func:`supcon_loss` and :func:`invariance_loss` compute
exactly what the paper's appendix B code computes:

- every anchor keeps its own similarity ``z_i . z_i / T`` in the softmax
  denominator (only the targets exclude it);
- SupCon is ``F.cross_entropy(log_softmax(logits), p)`` with ``p`` the
  positives of each anchor spread uniformly, averaged over *all* anchors (an
  anchor without positives contributes 0 but still counts);
- the invariance loss compares ``mean(dim=1)`` of the masked log-probabilities,
  i.e. the *sums* over the positive and negative sets divided by the batch
  size. Its scale therefore grows with the number of batch labels (wells) in
  the batch: with many wells, the negative set dominates.

``normalized=True`` is an explicit, non-paper variant: the anchor's own
similarity is removed from the softmax, SupCon averages over anchors that have
positives, and the invariance loss compares the *means* over the positive and
the negative set (anchors lacking either set are skipped), so that its scale no
longer depends on the number of wells. docs/training.md compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _log_probabilities(z: torch.Tensor, temperature: float, *, normalized: bool) -> torch.Tensor:
    """Row-wise log-softmax of ``z z^T / T``; the diagonal is set to 0 (used by no target).

    With ``normalized`` the diagonal is excluded from the softmax denominator.
    """
    batch_size = z.shape[0]
    self_mask = torch.eye(batch_size, dtype=torch.bool, device=z.device)
    logits = z @ z.T / temperature  # (B, B)
    if normalized:
        logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = F.log_softmax(logits, dim=1)  # (B, B)
    return log_prob.masked_fill(self_mask, 0.0)


def _positive_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``same[i, j]`` (labels equal, diagonal included) and ``positive`` (diagonal excluded)."""
    same = labels[:, None] == labels[None, :]  # (B, B)
    self_mask = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same, same & ~self_mask


def supcon_loss(
    z: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.1, normalized: bool = False
) -> torch.Tensor:
    """Supervised contrastive loss that clusters ``z`` by ``labels``.

    Parameters
    ----------
    z
        (B, D) unit-norm embeddings.
    labels
        (B,) integer labels; cells sharing a label are positives of each other.
    temperature
        Softmax temperature (paper: 0.1).
    normalized
        False (default): the paper's appendix B code. True: the anchor's own
        similarity is left out of the softmax and the mean runs over anchors
        that have at least one positive.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    _check_inputs(z, labels)
    _, positive = _positive_mask(labels)
    positive = positive.to(z.dtype)
    n_positive = positive.sum(dim=1)  # (B,)
    target = positive / n_positive.clamp(min=1.0)[:, None]  # (B, B), rows sum to 1 or 0
    log_prob = _log_probabilities(z, temperature, normalized=normalized)
    per_anchor = -(target * log_prob).sum(dim=1)  # (B,)
    if not normalized:
        return per_anchor.mean()
    has_positive = n_positive > 0
    if not bool(has_positive.any()):
        return z.sum() * 0.0  # keeps the graph; no pair to contrast
    return per_anchor[has_positive].mean()


def invariance_loss(
    z: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.1, normalized: bool = False
) -> torch.Tensor:
    """SCBD invariance loss: makes ``z`` unable to tell same-label from other-label cells.

    For each anchor, the log-probabilities of being matched with a cell of the
    same label (positives, self excluded) and with a cell of another label
    (negatives) are compared; the loss is the mean absolute difference.

    Parameters
    ----------
    z
        (B, D) unit-norm embeddings (the perturbation embedding z_c).
    labels
        (B,) integer batch labels (wells).
    temperature
        Softmax temperature (paper: 0.1).
    normalized
        False (default): the paper's appendix B code, which divides the sums
        over each set by the batch size. True: the anchor's own similarity is
        left out of the softmax and the sets are compared by their means.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    _check_inputs(z, labels)
    log_prob = _log_probabilities(z, temperature, normalized=normalized)
    return _invariance_of(log_prob, labels, normalized=normalized)


def _invariance_of(
    log_prob: torch.Tensor, labels: torch.Tensor, *, normalized: bool
) -> torch.Tensor:
    """The invariance loss from the (B, B) log-probabilities of :func:`_log_probabilities`."""
    same, positive = _positive_mask(labels)
    negative = (~same).to(log_prob.dtype)
    positive = positive.to(log_prob.dtype)
    if not normalized:
        log_prob_positive = (log_prob * positive).mean(dim=1)  # (B,)
        log_prob_negative = (log_prob * negative).mean(dim=1)
        return (log_prob_positive - log_prob_negative).abs().mean()
    n_positive = positive.sum(dim=1)
    n_negative = negative.sum(dim=1)
    valid = (n_positive > 0) & (n_negative > 0)
    if not bool(valid.any()):
        return log_prob.sum() * 0.0
    log_prob_positive = (log_prob * positive).sum(dim=1) / n_positive.clamp(min=1.0)
    log_prob_negative = (log_prob * negative).sum(dim=1) / n_negative.clamp(min=1.0)
    return (log_prob_positive - log_prob_negative)[valid].abs().mean()


def shuffle_within(
    labels: torch.Tensor, groups: torch.Tensor, *, generator: torch.Generator
) -> torch.Tensor:
    """``labels`` randomly permuted among the cells of each group (group counts are kept).

    Parameters
    ----------
    labels, groups
        (B,) integer codes on any device.
    generator
        CPU generator for the permutation.
    """
    keys = torch.rand(labels.shape[0], generator=generator, dtype=torch.float64)
    groups_cpu = groups.detach().to("cpu")
    by_group = torch.sort(groups_cpu, stable=True).indices  # positions, grouped
    random_order = torch.argsort(keys)
    shuffled = random_order[torch.sort(groups_cpu[random_order], stable=True).indices]
    # by_group and shuffled list the same groups in the same order, each group's cells
    # in a different order: cell by_group[k] takes the label of cell shuffled[k].
    result = labels.clone()
    result[by_group.to(labels.device)] = labels[shuffled.to(labels.device)]
    return result


@torch.no_grad()
def invariance_shuffled(
    z: torch.Tensor,
    batch: torch.Tensor,
    perturbation: torch.Tensor,
    *,
    temperature: float = 0.1,
    normalized: bool = False,
    n_shuffles: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The invariance loss z would score if it held no batch information: the reference level.

    The batch labels are shuffled among the cells of each perturbation (so every
    perturbation keeps its count of cells per batch label, and the batch its
    composition), and :func:`invariance_loss` of the *same* z is taken with the
    shuffled labels; the mean over ``n_shuffles`` shuffles is returned. An embedding
    whose batch label is independent of it given the perturbation scores this value
    on average; the invariance loss reads above it by what z still knows of the batch.

    The paper's loss of such an embedding is not 0: it depends on the batch's
    composition (how many cells of each batch label, and per perturbation) and on
    how z clusters the perturbations. For an embedding that is the same for every
    cell it is ``log(B) / B * mean_i |n_other(i) - n_same(i) + 1|`` (n_same(i)
    counts cell i itself), e.g. (1 - 2/W) log B for W equal batch labels. Below
    the reference is possible too: the paper's loss also rewards a z that sets
    cells of the same batch label *apart* when a batch holds more of one label.

    Parameters
    ----------
    z
        (B, D) unit-norm embeddings (z_c).
    batch, perturbation
        (B,) integer codes.
    temperature, normalized
        As :func:`invariance_loss`.
    n_shuffles
        Shuffles averaged.
    generator
        CPU generator of the shuffles (a fresh one seeded 0 when None).

    Returns
    -------
    torch.Tensor
        Scalar, without gradient.
    """
    _check_inputs(z, batch)
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    log_prob = _log_probabilities(z.detach(), temperature, normalized=normalized)
    values = [
        _invariance_of(
            log_prob,
            shuffle_within(batch, perturbation, generator=generator),
            normalized=normalized,
        )
        for _ in range(n_shuffles)
    ]
    return torch.stack(values).mean()


def _check_inputs(z: torch.Tensor, labels: torch.Tensor) -> None:
    if z.ndim != 2 or labels.ndim != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(
            f"expected z of shape (B, D) and labels of shape (B,); found {tuple(z.shape)} "
            f"and {tuple(labels.shape)}"
        )


@dataclass(frozen=True)
class SCBDLoss:
    """The SCBD objective and its named parts (scalar tensors).

    ``total = supcon_perturbation + supcon_batch + alpha * invariance``.
    """

    total: torch.Tensor
    supcon_perturbation: torch.Tensor
    supcon_batch: torch.Tensor
    invariance: torch.Tensor

    def items(self) -> dict[str, float]:
        """The parts as Python floats, for logging."""
        return {
            "loss": float(self.total.detach()),
            "supcon_perturbation": float(self.supcon_perturbation.detach()),
            "supcon_batch": float(self.supcon_batch.detach()),
            "invariance": float(self.invariance.detach()),
        }


def batch_target_labels(
    perturbation: torch.Tensor, batch: torch.Tensor, *, batch_target: str, n_batches: int
) -> torch.Tensor:
    """Labels that z_s is clustered by: the batch, or the (perturbation, batch) pair.

    Parameters
    ----------
    perturbation, batch
        (B,) integer codes.
    batch_target
        ``"batch"`` (batch correction) or ``"perturbation+batch"`` (the paper's
        domain-generalisation setting).
    n_batches
        Number of batch labels (codes are below it), to make the pair code unique.
    """
    if batch_target == "batch":
        return batch
    if batch_target == "perturbation+batch":
        return perturbation * n_batches + batch
    raise ValueError(f"batch_target must be 'batch' or 'perturbation+batch', not {batch_target!r}")


def scbd_loss(
    z_perturbation: torch.Tensor,
    z_batch: torch.Tensor,
    *,
    perturbation: torch.Tensor,
    batch: torch.Tensor,
    batch_target: torch.Tensor | None = None,
    alpha: float,
    temperature: float = 0.1,
    normalized: bool = False,
) -> SCBDLoss:
    """SupCon(z_c; perturbation) + SupCon(z_s; batch target) + alpha * Invariance(z_c; batch).

    Parameters
    ----------
    z_perturbation, z_batch
        (B, D) unit-norm embeddings z_c and z_s.
    perturbation, batch
        (B,) integer codes.
    batch_target
        (B,) labels z_s is clustered by (see :func:`batch_target_labels`);
        defaults to ``batch``.
    alpha
        Weight of the invariance loss.
    temperature
        Softmax temperature of all three terms.
    normalized
        Use the normalised variant of the invariance loss (SupCon terms stay as
        the paper's). See the module docstring.
    """
    target = batch if batch_target is None else batch_target
    supcon_perturbation = supcon_loss(z_perturbation, perturbation, temperature=temperature)
    supcon_batch = supcon_loss(z_batch, target, temperature=temperature)
    invariance = invariance_loss(
        z_perturbation, batch, temperature=temperature, normalized=normalized
    )
    total = supcon_perturbation + supcon_batch + alpha * invariance
    return SCBDLoss(total, supcon_perturbation, supcon_batch, invariance)
