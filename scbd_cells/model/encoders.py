"""Model: image encoders f_c and f_s (torchvision architectures, random weights, C-channel stem)."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from scbd_cells.config import ENCODER_NAMES
from scbd_cells.errors import InputError

ENCODERS = ENCODER_NAMES  # one list: TrainConfig checks --encoder against it too


class Encoder(NamedTuple):
    """An encoder module mapping (B, C, H, W) images to (B, r) features, and r."""

    module: nn.Module
    feature_dim: int


def build_encoder(name: str, *, in_channels: int) -> Encoder:
    """Build an encoder with random weights whose first convolution takes ``in_channels``.

    Parameters
    ----------
    name
        ``resnet18`` (the paper's choice for cells, default), ``resnet50``,
        ``densenet121``, ``small`` (a three-layer CNN with batch norm, 0.1 M
        parameters, for a first run on a laptop: it learns a strong screen, e.g. the
        demo's, in minutes on a CPU, but is no match for ResNet-18 on real cells), or
        ``tiny`` (a two-layer CNN for tests and smoke runs, not for science: it hardly
        learns at the default learning rate).
    in_channels
        Number of image channels (the store's).

    Returns
    -------
    Encoder
        The module (classifier removed, global pooling kept) and its feature size r.
    """
    from torchvision import models  # heavy import, only when a model is built

    if name in ("resnet18", "resnet50"):
        network = getattr(models, name)(weights=None)
        stem = network.conv1
        network.conv1 = nn.Conv2d(
            in_channels, stem.out_channels, kernel_size=7, stride=2, padding=3, bias=False
        )
        feature_dim = network.fc.in_features
        network.fc = nn.Identity()
        return Encoder(network, feature_dim)
    if name == "densenet121":
        network = models.densenet121(weights=None)
        stem = network.features.conv0
        network.features.conv0 = nn.Conv2d(
            in_channels, stem.out_channels, kernel_size=7, stride=2, padding=3, bias=False
        )
        feature_dim = network.classifier.in_features
        network.classifier = nn.Identity()
        return Encoder(network, feature_dim)
    if name == "tiny":
        network = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        return Encoder(network, 32)
    if name == "small":
        return Encoder(_small_cnn(in_channels), SMALL_WIDTHS[-1])
    raise InputError(
        f"unknown encoder {name!r}: expected one of {', '.join(ENCODERS)}. "
        "Pass e.g. --encoder resnet18."
    )


# small: three 3x3 convolutions with batch norm, each halving the image (32 -> 4 px), then
# global average pooling. Measured on the tiny screen at the demo's effect strength (3),
# 200 steps at the default lr 1e-4, one thread: the perturbation SupCon fell from
# log 136 = 4.913 to 4.19 (31 CPU-s); with the first convolution at full resolution 4.50
# (88 CPU-s); the two-layer tiny CNN without normalisation stayed at 4.86.
SMALL_WIDTHS = (32, 64, 128)


def _small_cnn(in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in SMALL_WIDTHS:
        layers += [
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["ENCODERS", "Encoder", "build_encoder", "count_parameters"]
