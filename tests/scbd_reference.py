"""A minimal SCBD, written from the paper alone: the reference that `train` is checked against.

Nothing here comes from scbd_cells: the encoders are torchvision's with the stem
widened to C channels (A.1.1), the heads Linear(r, r)-GELU-Linear(r, z), the losses
the appendix B code transcribed verbatim, the optimiser AdamW. It trains on batches
of row indices into a tensor of already preprocessed images, one step per batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# --- appendix B, verbatim --------------------------------------------------------------


def paper_supcon_loss(z, u, temperature):
    batch_size = len(z)
    u_col = u.unsqueeze(1)
    u_row = u.unsqueeze(0)
    mask_pos = (u_col == u_row).float()
    offdiag_mask = 1.0 - torch.eye(batch_size)
    mask_pos = mask_pos * offdiag_mask
    logits = torch.matmul(z, z.T) / temperature
    p = mask_pos / mask_pos.sum(dim=1, keepdim=True).clamp(min=1.0)
    q = F.log_softmax(logits, dim=1)
    return F.cross_entropy(q, p)


def paper_invariance_loss(zc, e, temperature):
    batch_size = len(zc)
    e_col = e.unsqueeze(1)
    e_row = e.unsqueeze(0)
    mask_pos = (e_col == e_row).float()
    mask_neg = 1.0 - mask_pos
    offdiag_mask = 1.0 - torch.eye(batch_size)
    mask_pos = mask_pos * offdiag_mask
    logits = torch.matmul(zc, zc.T) / temperature
    q = F.log_softmax(logits, dim=1)
    log_prob_pos = (q * mask_pos).mean(dim=1)
    log_prob_neg = (q * mask_neg).mean(dim=1)
    return (log_prob_pos - log_prob_neg).abs().mean()


# --- the networks (A.1.1) ----------------------------------------------------------------


def _encoder(name: str, in_channels: int) -> tuple[nn.Module, int]:
    from torchvision import models

    if name == "tiny":  # the two-layer CNN scbd-cells offers for tests
        layers = [nn.Conv2d(in_channels, 16, 3, stride=2, padding=1), nn.GELU()]
        layers += [nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 32
    network = getattr(models, name)(weights=None)
    network.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    r = network.fc.in_features
    network.fc = nn.Identity()
    return network, r


class ReferenceSCBD(nn.Module):
    """f_c, f_s, g_c, g_s built in this order (so that one seed gives scbd-cells' weights)."""

    def __init__(self, encoder: str, in_channels: int, z_dim: int) -> None:
        super().__init__()
        self.f_c, r = _encoder(encoder, in_channels)
        self.f_s, _ = _encoder(encoder, in_channels)
        self.g_c = nn.Sequential(nn.Linear(r, r), nn.GELU(), nn.Linear(r, z_dim))
        self.g_s = nn.Sequential(nn.Linear(r, r), nn.GELU(), nn.Linear(r, z_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.g_c(self.f_c(x)), dim=1), F.normalize(self.g_s(self.f_s(x)), dim=1)


def reference_train(
    images: torch.Tensor,
    y: torch.Tensor,
    e: torch.Tensor,
    batches: Iterable,
    *,
    alpha: float,
    encoder: str = "resnet18",
    z_dim: int = 64,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    temperature: float = 0.1,
    seed: int = 0,
    model: ReferenceSCBD | None = None,
) -> tuple[ReferenceSCBD, list[dict[str, float]]]:
    """SCBD with z_s clustered by the (y, e) pair: one AdamW step per batch of row indices.

    ``images`` are preprocessed floats (N, C, H, W); ``y`` digit and ``e`` environment
    codes (N,). Returns the model and, per step, the three losses *before* the step.
    """
    if model is None:
        torch.manual_seed(seed)
        model = ReferenceSCBD(encoder, images.shape[1], z_dim)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_e = int(e.max()) + 1
    history = []
    for rows in batches:
        rows = torch.as_tensor(rows)
        zc, zs = model(images[rows])
        yb, eb = y[rows], e[rows]
        supcon_c = paper_supcon_loss(zc, yb, temperature)
        supcon_s = paper_supcon_loss(zs, yb * n_e + eb, temperature)
        invariance = paper_invariance_loss(zc, eb, temperature)
        loss = supcon_c + supcon_s + alpha * invariance
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(
            {
                "loss": loss.item(),
                "supcon_perturbation": supcon_c.item(),
                "supcon_batch": supcon_s.item(),
                "invariance": invariance.item(),
            }
        )
    return model, history
