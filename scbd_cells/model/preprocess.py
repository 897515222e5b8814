"""Model: on-device preprocessing — integer images to standardised float at the model's size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the model layer takes statistics; it needs no data-layer code
    from scbd_cells.data.batch_stats import BatchChannelStats

#: ``train --normalize`` choices: per-well statistics, the store's statistics, the paper's code.
NORMALIZE_CHOICES = ("batch", "store", "arcsinh")
#: ``train --augment`` choices.
AUGMENT_CHOICES = ("none", "dihedral", "dihedral+shift")
#: The official code's ``T.Normalize(7., 7.)`` after its arcsinh: (arcsinh(x) - 7) / 7.
ARCSINH_CENTER = 7.0
ARCSINH_SCALE = 7.0


class ImagePreprocessor(Protocol):
    """What train, embed and reconstruct need of a preprocessor: raw pixels in, model input out."""

    image_size: int

    def __call__(self, images: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) raw pixels (any dtype) -> (B, C, image_size, image_size) float32."""
        ...


class Preprocessor:
    """uint images (B, C, H, W) -> float32 standardised per channel, resized to the model's size.

    Each channel is shifted by a mean and divided by a standard deviation:

    - ``normalize="store"``: the store's channel statistics over its train split,
      measured at ingest (``store.channel_stats``);
    - ``normalize="batch"``: the statistics of the cell's own batch label (well),
      from :func:`scbd_cells.data.batch_stats.batch_channel_stats`, passed as
      ``batch_mean``/``batch_std`` rows in the order of the store's batch codes;
      each call then needs the cells' batch codes.

    The statistics are computed once (at ingest, or from a per-well sample when a
    run starts) and the transform is identical at train and embed time. (The
    paper's code applies an arcsinh transform instead: :class:`ArcsinhPreprocessor`,
    ``normalize="arcsinh"``.) Images whose size differs from ``image_size`` are
    resized (bilinear, antialiased).

    Parameters
    ----------
    channel_stats
        Mapping with per-channel lists ``mean`` and ``std``.
    image_size
        Side of the square images the model expects.
    batch_mean, batch_std
        (n_batch_codes, C) per-batch statistics; both or neither.
    """

    def __init__(
        self,
        channel_stats: Mapping[str, Sequence[float]],
        *,
        image_size: int,
        batch_mean: np.ndarray | None = None,
        batch_std: np.ndarray | None = None,
    ) -> None:
        self.mean = torch.tensor([float(v) for v in channel_stats["mean"]], dtype=torch.float32)
        std = torch.tensor([float(v) for v in channel_stats["std"]], dtype=torch.float32)
        self.std = std.clamp(min=1e-6)  # a blank channel must not divide by zero
        self.image_size = int(image_size)
        if (batch_mean is None) != (batch_std is None):
            raise ValueError("pass both batch_mean and batch_std, or neither")
        self.batch_mean = self.batch_std = None
        self._batch_stats_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if batch_mean is not None:
            self.batch_mean = torch.as_tensor(np.asarray(batch_mean), dtype=torch.float32)
            self.batch_std = torch.as_tensor(np.asarray(batch_std), dtype=torch.float32).clamp(
                min=1e-6
            )
            if self.batch_mean.shape != self.batch_std.shape or self.batch_mean.shape[1:] != (
                self.mean.shape[0],
            ):
                raise ValueError(
                    f"batch statistics must be (n_batches, {self.mean.shape[0]}); found "
                    f"{tuple(self.batch_mean.shape)} and {tuple(self.batch_std.shape)}"
                )

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-batch statistics on ``device`` (copied once per device)."""
        if device not in self._batch_stats_on:
            self._batch_stats_on[device] = (self.batch_mean.to(device), self.batch_std.to(device))
        return self._batch_stats_on[device]

    def __call__(self, images: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """Preprocess a batch on its own device; returns (B, C, image_size, image_size) float32.

        ``batch``: (B,) batch codes of the cells, required with per-batch statistics.
        """
        images = images.to(torch.float32)  # widen first: uint16 has few kernels
        if self.batch_mean is not None:
            if batch is None:
                raise ValueError("per-batch normalisation needs the cells' batch codes")
            codes = torch.as_tensor(batch).to(images.device, torch.int64)  # no host sync
            batch_mean, batch_std = self._on(images.device)
            mean = batch_mean[codes][:, :, None, None]
            std = batch_std[codes][:, :, None, None]
        else:
            mean = self.mean.to(images.device)[None, :, None, None]
            std = self.std.to(images.device)[None, :, None, None]
        return resize((images - mean) / std, self.image_size)  # (B, C, S, S)


class ArcsinhPreprocessor:
    """The official SCBD code's transform: resize, arcsinh, then (x - 7) / 7, for every cell.

    ``normalize="arcsinh"``. The paper's code (``scbd/data/funk22.py`` of
    github.com/Genentech/SCBD, class ``Funk22Dataset``) applies
    ``T.Compose([T.Resize((32, 32)), Arcsinh(), T.Normalize(7., 7.)])`` to each cell's
    uint16 tensor. torchvision's ``Resize`` on a tensor interpolates in float32
    (bilinear, antialiased, ``align_corners=False``) and casts the result back to the
    input's dtype, which for uint16 truncates towards zero; a crop already at the size is
    returned as is. This class does the same on a batch: integer pixels are resized in
    float32 and truncated back onto the integer grid, float pixels are resized as floats;
    then ``(arcsinh(x) - 7) / 7`` per pixel. No statistics of the data enter, so it needs
    no batch codes and a new plate gets exactly the transform the training plates got.

    Parameters
    ----------
    image_size
        Side of the square images the model expects.
    """

    def __init__(self, *, image_size: int) -> None:
        self.image_size = int(image_size)

    def __call__(self, images: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """Preprocess a batch on its own device; ``batch`` is accepted and not needed."""
        integer = not images.is_floating_point()
        images = images.to(torch.float32)  # widen first: uint16 has few kernels
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = resize(images, self.image_size)
            if integer:  # torchvision's cast back to uint16 (towards zero)
                images = images.trunc()
        return (torch.arcsinh(images) - ARCSINH_CENTER) / ARCSINH_SCALE  # (B, C, S, S)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B, C, H, W) resized to (B, C, size, size): bilinear, antialiased, as
    torchvision's ``Resize`` on a tensor; images already at the size are returned as is."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


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


def max_shift_for(image_size: int) -> int:
    """Largest shift of ``augment="dihedral+shift"``: 1/8 of the crop (4 px at 32), at least 1."""
    return max(1, int(image_size) // 8)


def random_shift(
    images: torch.Tensor, *, generator: torch.Generator, max_shift: int
) -> torch.Tensor:
    """Each image moved by a random whole number of pixels, the edge reflected into the gap.

    Row and column shifts are drawn independently and uniformly from ``-max_shift ..
    max_shift``; image ``i`` becomes the window at offset (max_shift + dy, max_shift +
    dx) of the image padded by ``max_shift`` on every side with reflection (numpy's
    ``"reflect"``: the edge pixel is not repeated). Whole pixels move, nothing is
    interpolated, and no new intensity appears (zero padding after normalisation would
    paint the well's mean intensity, not background, into the crop).

    Parameters
    ----------
    images
        (B, C, S, S) images, on any device; ``max_shift`` < S.
    generator
        CPU generator for the per-image draws.
    max_shift
        Largest shift in pixels, each way.

    Returns
    -------
    torch.Tensor
        (B, C, S, S) shifted images, same dtype and device.
    """
    n, _, height, width = images.shape
    if not 0 < max_shift < min(height, width):
        raise ValueError(f"max_shift must be in 1..{min(height, width) - 1}, found {max_shift}")
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)  # (B, 2)
    padded = F.pad(images, (max_shift,) * 4, mode="reflect")  # (B, C, S + 2m, S + 2m)
    start = (max_shift + shifts).to(images.device)
    rows = start[:, 0, None] + torch.arange(height, device=images.device)  # (B, S)
    columns = start[:, 1, None] + torch.arange(width, device=images.device)  # (B, S)
    picked = padded[
        torch.arange(n, device=images.device)[:, None, None],
        :,
        rows[:, :, None],
        columns[:, None, :],
    ]  # (B, S, S, C): advanced indices first
    return picked.permute(0, 3, 1, 2).contiguous()


def augment_images(
    images: torch.Tensor, *, augment: str, generator: torch.Generator
) -> torch.Tensor:
    """``train --augment``: none, dihedral (:func:`random_dihedral`) or dihedral+shift
    (then :func:`random_shift` by at most :func:`max_shift_for` the crop), drawn in that
    order from ``generator``, so ``dihedral`` draws the same turns with or without shifts.
    """
    if augment not in AUGMENT_CHOICES:
        raise ValueError(f"augment must be one of {AUGMENT_CHOICES}, found {augment!r}")
    if augment == "none":
        return images
    images = random_dihedral(images, generator=generator)
    if augment == "dihedral+shift":
        max_shift = max_shift_for(images.shape[-1])
        images = random_shift(images, generator=generator, max_shift=max_shift)
    return images


def preprocessor_for(
    batch_labels: Sequence[str],
    *,
    channel_stats: Mapping[str, Sequence[float]],
    image_size: int,
    batch_stats: BatchChannelStats | None,
    normalize: str | None = None,
) -> ImagePreprocessor:
    """The preprocessor for cells whose batch codes index ``batch_labels``.

    Parameters
    ----------
    batch_labels
        The batch label of each batch code the cells will come with, in code order
        (a store's ``store.codes("batch")[1]``).
    channel_stats
        Whole-store statistics (used when ``batch_stats`` is None).
    image_size
        The model's input size.
    batch_stats
        Statistics of every label in ``batch_labels``, or None for ``normalize="store"``
        (and ``"arcsinh"``).
    normalize
        ``"arcsinh"`` for the official code's transform (:class:`ArcsinhPreprocessor`);
        otherwise (``"batch"``, ``"store"`` or None) standardisation with ``batch_stats``
        when given, else with ``channel_stats``.
    """
    if normalize is not None and normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, found {normalize!r}")
    if normalize == "arcsinh":
        return ArcsinhPreprocessor(image_size=image_size)
    if batch_stats is None:
        return Preprocessor(channel_stats, image_size=image_size)
    mean, std = batch_stats.rows_for([str(label) for label in batch_labels])
    return Preprocessor(channel_stats, image_size=image_size, batch_mean=mean, batch_std=std)
