"""Model: on-device preprocessing — integer images to standardised float at the model's size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


class Preprocessor:
    """uint images (B, C, H, W) -> float32 standardised with the store's channel statistics.

    Each channel is shifted by its mean and divided by its standard deviation,
    both measured over the store's train split at ingest
    (``store.channel_stats``), so no pass over the data is needed and the
    transform is identical at train and embed time. (The paper's code applies
    an arcsinh transform instead; per-channel standardisation plays the same
    role of putting the stains on one scale and is what scbd-cells uses.)
    Images whose size differs from ``image_size`` are resized (bilinear,
    antialiased).

    Parameters
    ----------
    channel_stats
        Mapping with per-channel lists ``mean`` and ``std``.
    image_size
        Side of the square images the model expects.
    """

    def __init__(self, channel_stats: Mapping[str, Sequence[float]], *, image_size: int) -> None:
        self.mean = torch.tensor([float(v) for v in channel_stats["mean"]], dtype=torch.float32)
        std = torch.tensor([float(v) for v in channel_stats["std"]], dtype=torch.float32)
        self.std = std.clamp(min=1e-6)  # a blank channel must not divide by zero
        self.image_size = int(image_size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess a batch on its own device; returns (B, C, image_size, image_size) float32."""
        images = images.to(torch.float32)  # widen first: uint16 has few kernels
        mean = self.mean.to(images.device)[None, :, None, None]
        std = self.std.to(images.device)[None, :, None, None]
        images = (images - mean) / std  # (B, C, H, W)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return images


def random_dihedral(images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Each image turned by a random multiple of 90 degrees and mirrored with probability 1/2.

    A cell has no preferred orientation in the field of view, so the eight symmetries of
    the square keep its biology (unlike intensity jitter, which would blur intensity
    phenotypes). The draws come from ``generator`` (on the CPU), so a run seeded per
    step repeats them exactly.

    Parameters
    ----------
    images
        (B, C, S, S) square images, on any device.
    generator
        CPU generator for the per-image draws.

    Returns
    -------
    torch.Tensor
        (B, C, S, S) transformed images, same dtype and device.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"random_dihedral needs square images, found {tuple(images.shape)}")
    n = images.shape[0]
    quarter_turns = torch.randint(0, 4, (n,), generator=generator)
    mirror = torch.randint(0, 2, (n,), generator=generator).bool()
    out = images.clone()
    for turns in range(1, 4):
        chosen = (quarter_turns == turns).nonzero().flatten().to(images.device)
        if chosen.numel():
            out[chosen] = torch.rot90(images[chosen], turns, dims=(-2, -1))
    chosen = mirror.nonzero().flatten().to(images.device)
    if chosen.numel():
        out[chosen] = out[chosen].flip(-1)
    return out
