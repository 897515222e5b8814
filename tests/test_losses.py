"""Losses: equal to the paper's appendix B code; gradients flow; the normalised variant is sane."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

# --- appendix B of the paper, transcribed verbatim (the numerical reference) ------------
# the paper's two functions live in tests/scbd_reference.py, transcribed once
from scbd_reference import paper_invariance_loss, paper_supcon_loss

from scbd_cells.model.losses import (
    batch_target_labels,
    invariance_loss,
    invariance_shuffled,
    scbd_loss,
    shuffle_within,
    supcon_loss,
)
from scbd_cells.model.scbd import SCBDModel

# ----------------------------------------------------------------------------------------


def _labels(structure: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    if structure == "random":
        return torch.randint(0, 5, (batch_size,), generator=generator)
    if structure == "balanced":  # classes x cells, as the sampler makes
        return torch.arange(batch_size) // 4
    if structure == "singleton":  # one label seen once, the rest paired
        labels = torch.randint(0, 3, (batch_size,), generator=generator)
        labels[0] = 99
        return labels
    if structure == "all_same":
        return torch.zeros(batch_size, dtype=torch.long)
    if structure == "all_distinct":
        return torch.arange(batch_size)
    raise ValueError(structure)


STRUCTURES = ["random", "balanced", "singleton", "all_same", "all_distinct"]


@pytest.mark.parametrize("batch_size", [2, 8, 33, 256])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_losses_equal_appendix_b(batch_size: int, structure: str, temperature: float) -> None:
    generator = torch.Generator().manual_seed(batch_size * 31 + len(structure))
    z = F.normalize(torch.randn(batch_size, 16, generator=generator, dtype=torch.float64), dim=1)
    labels = _labels(structure, batch_size, generator)
    expected_supcon = paper_supcon_loss(z, labels, temperature)
    expected_invariance = paper_invariance_loss(z, labels, temperature)
    torch.testing.assert_close(
        supcon_loss(z, labels, temperature=temperature), expected_supcon, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        invariance_loss(z, labels, temperature=temperature),
        expected_invariance,
        rtol=0,
        atol=1e-6,
    )


def test_losses_equal_appendix_b_float32_default_temperature() -> None:
    generator = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(512, 64, generator=generator), dim=1)
    labels = torch.randint(0, 40, (512,), generator=generator)
    torch.testing.assert_close(
        supcon_loss(z, labels), paper_supcon_loss(z, labels, 0.1), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        invariance_loss(z, labels), paper_invariance_loss(z, labels, 0.1), rtol=0, atol=1e-6
    )


def test_normalized_variant_by_hand() -> None:
    """Self excluded from the softmax, per-set means: checked against a loop over anchors."""
    generator = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(12, 8, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
    supcon_terms, invariance_terms = [], []
    for i in range(12):
        others = [j for j in range(12) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.1 for j in others])
        log_prob = dict(zip(others, F.log_softmax(logits, dim=0), strict=True))
        positives = [j for j in others if labels[j] == labels[i]]
        negatives = [j for j in others if labels[j] != labels[i]]
        if positives:
            supcon_terms.append(-torch.stack([log_prob[j] for j in positives]).mean())
            mean_pos = torch.stack([log_prob[j] for j in positives]).mean()
            mean_neg = torch.stack([log_prob[j] for j in negatives]).mean()
            invariance_terms.append((mean_pos - mean_neg).abs())
    torch.testing.assert_close(
        supcon_loss(z, labels, normalized=True), torch.stack(supcon_terms).mean()
    )
    torch.testing.assert_close(
        invariance_loss(z, labels, normalized=True), torch.stack(invariance_terms).mean()
    )


def test_invariance_scale_grows_with_wells_only_for_paper_version() -> None:
    """The paper's invariance loss grows with the number of wells; the normalised one does not."""
    generator = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(1024, 64, generator=generator), dim=1)  # well-independent z
    paper, normalized = {}, {}
    for n_wells in (2, 16):
        wells = torch.arange(1024) % n_wells
        paper[n_wells] = float(invariance_loss(z, wells))
        normalized[n_wells] = float(invariance_loss(z, wells, normalized=True))
    assert paper[16] > 5 * paper[2]
    assert normalized[16] < 0.2 and normalized[2] < 0.2


def test_scbd_loss_parts_and_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = SCBDModel({"encoder": "tiny", "in_channels": 3, "image_size": 16, "z_dim": 8})
    images = torch.randn(24, 3, 16, 16)
    perturbation = torch.arange(24) // 4
    batch = torch.arange(24) % 3
    output = model(images)
    target = batch_target_labels(
        perturbation, batch, batch_target="perturbation+batch", n_batches=3
    )
    assert len(set(target.tolist())) == 18
    losses = scbd_loss(
        output.z_perturbation,
        output.z_batch,
        perturbation=perturbation,
        batch=batch,
        batch_target=target,
        alpha=2.0,
    )
    expected = (
        paper_supcon_loss(output.z_perturbation, perturbation, 0.1)
        + paper_supcon_loss(output.z_batch, target, 0.1)
        + 2.0 * paper_invariance_loss(output.z_perturbation, batch, 0.1)
    )
    torch.testing.assert_close(losses.total, expected)
    assert set(losses.items()) == {"loss", "supcon_perturbation", "supcon_batch", "invariance"}
    losses.total.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("normalized", [False, True])
def test_gradients_finite_with_degenerate_labels(normalized: bool) -> None:
    z = F.normalize(torch.randn(6, 4), dim=1).requires_grad_(True)
    for labels in (torch.zeros(6, dtype=torch.long), torch.arange(6)):
        loss = supcon_loss(z, labels, normalized=normalized) + invariance_loss(
            z, labels, normalized=normalized
        )
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        supcon_loss(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("n_wells", [2, 4, 12])
def test_paper_invariance_of_a_well_free_embedding_is_not_zero(n_wells: int) -> None:
    """For identical embeddings (no well information) appendix B gives (|N| - |P|) / B * log B.

    This is why its scale grows with the number of wells (docs/training.md): it is zero
    for a well-free embedding only with two equal wells. The normalised variant is zero.
    """
    batch_size = 120
    z = F.normalize(torch.ones(batch_size, 4, dtype=torch.float64), dim=1)
    wells = torch.arange(batch_size) % n_wells
    n_positive = batch_size // n_wells - 1
    n_negative = batch_size - batch_size // n_wells
    expected = (n_negative - n_positive) / batch_size * np.log(batch_size)
    assert float(invariance_loss(z, wells)) == pytest.approx(expected, abs=1e-9)
    assert float(invariance_loss(z, wells, normalized=True)) == pytest.approx(0.0, abs=1e-9)


# --- the reference level of the invariance loss -----------------------------------------


def test_shuffle_within_permutes_labels_inside_each_group_only() -> None:
    generator = torch.Generator().manual_seed(3)
    groups = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 2])
    labels = torch.tensor([5, 6, 7, 8, 9, 5, 7, 6, 6, 9])
    seen = set()
    for _ in range(50):
        shuffled = shuffle_within(labels, groups, generator=generator)
        for group in groups.unique():
            members = groups == group
            assert sorted(shuffled[members].tolist()) == sorted(labels[members].tolist())
        seen.add(tuple(shuffled.tolist()))
    assert len(seen) > 10  # it does shuffle


@pytest.mark.parametrize("n_first", [160, 170, 190, 230])
def test_invariance_shuffled_of_a_constant_embedding_has_a_closed_form(n_first: int) -> None:
    """Identical z: every log-probability is -log B, so the loss counts set sizes only."""
    batch_size = 320
    z = F.normalize(torch.ones(batch_size, 8, dtype=torch.float64), dim=1)
    batch = (torch.arange(batch_size) >= n_first).long()  # n_first cells of label 0
    perturbation = torch.arange(batch_size) % 10
    n_same = torch.where(batch == 0, n_first, batch_size - n_first).double()  # self included
    n_other = batch_size - n_same
    expected = np.log(batch_size) / batch_size * (n_other - n_same + 1).abs().mean()
    value = invariance_shuffled(z, batch, perturbation, n_shuffles=2)
    assert float(value) == pytest.approx(float(expected), abs=1e-9)
    assert float(paper_invariance_loss(z, batch, 0.1)) == pytest.approx(float(expected), abs=1e-9)


def _prototype_embedding(
    perturbation: torch.Tensor, batch: torch.Tensor, *, batch_shift: float, seed: int
) -> torch.Tensor:
    """Unit z: a prototype per perturbation, plus noise, plus ``batch_shift`` along a batch axis."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(int(perturbation.max()) + 1, 32, generator=generator)
    noise = 0.7 * torch.randn(len(perturbation), 32, generator=generator)
    axis = torch.randn(32, generator=generator)
    z = prototypes[perturbation] + noise + batch_shift * (2 * batch[:, None] - 1) * axis
    return F.normalize(z.double(), dim=1)


def test_invariance_shuffled_is_the_mean_of_appendix_b_over_within_class_shuffles() -> None:
    """Against an independent computation: numpy shuffles fed to the appendix B code."""
    rng = np.random.default_rng(0)
    perturbation = torch.arange(320) // 32  # 10 classes x 32 cells, as the sampler makes
    batch = torch.from_numpy((rng.random(320) < 0.56).astype(np.int64))  # unequal environments
    z = _prototype_embedding(perturbation, batch, batch_shift=0.0, seed=1)
    values = []
    for _ in range(150):
        shuffled = batch.clone()
        for k in range(10):
            members = np.flatnonzero(perturbation.numpy() == k)
            shuffled[members] = batch[rng.permutation(members)]
        values.append(float(paper_invariance_loss(z, shuffled, 0.1)))
    expected, spread = np.mean(values), np.std(values) / np.sqrt(len(values))
    value = invariance_shuffled(z, batch, perturbation, n_shuffles=150)
    assert float(value) == pytest.approx(expected, abs=5 * spread)
    # the reference depends on the composition: more unequal environments, a higher level
    skewed = (torch.arange(320) % 32 < 24).long()  # 24 of 32 cells of every class in one
    assert float(invariance_shuffled(z, skewed, perturbation)) > float(value) + 0.3


def test_invariance_shuffled_separates_batch_informed_from_batch_free_embeddings() -> None:
    """A batch-free z scores the reference (on average); one that knows the batch, above it."""
    perturbation = torch.arange(320) // 32
    gaps = {}
    for shift in (0.0, 1.0):
        gap = []
        for seed in range(5):
            batch = (torch.rand(320, generator=torch.Generator().manual_seed(seed)) < 0.5).long()
            z = _prototype_embedding(perturbation, batch, batch_shift=shift, seed=seed)
            reference = invariance_shuffled(z, batch, perturbation, n_shuffles=16)
            gap.append(float(invariance_loss(z, batch)) - float(reference))
        gaps[shift] = np.mean(gap)
    assert abs(gaps[0.0]) < 0.03
    assert gaps[1.0] > 0.3
