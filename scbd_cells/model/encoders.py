"""Model: image encoders f_c and f_s (torchvision architectures, random weights, C-channel stem)."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from scbd_cells.core.config import ENCODER_NAMES
from scbd_cells.core.errors import InputError

ENCODERS = ENCODER_NAMES  # one list: TrainConfig checks --encoder against it too
#: ``train --stem`` choices: torchvision's ImageNet stem, or one for small crops.
STEMS = ("imagenet", "small")


class Encoder(NamedTuple):
    """An encoder module mapping (B, C, H, W) images to (B, r) features, and r."""

    module: nn.Module
    feature_dim: int


def build_encoder(name: str, *, in_channels: int, stem: str = "imagenet") -> Encoder:
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
    stem
        ``imagenet`` (torchvision's 7x7 stride-2 convolution and 3x3 stride-2 max pool)
        or ``small`` (a 3x3 stride-1 convolution, no pool: :func:`use_small_stem`);
        ResNets and DenseNet only.

    Returns
    -------
    Encoder
        The module (classifier removed, global pooling kept) and its feature size r.
    """
    from torchvision import models  # heavy import, only when a model is built

    if stem not in STEMS:
        raise InputError(f"unknown stem {stem!r}: expected one of {', '.join(STEMS)}.")
    if stem != "imagenet" and name not in ("resnet18", "resnet50", "densenet121"):
        raise InputError(
            f"--stem {stem} changes the first layers of a ResNet or DenseNet; the {name!r} "
            "encoder has no such stem. Drop --stem or choose --encoder resnet18."
        )

    if name in ("resnet18", "resnet50"):
        network = getattr(models, name)(weights=None)
        first = network.conv1
        network.conv1 = nn.Conv2d(
            in_channels, first.out_channels, kernel_size=7, stride=2, padding=3, bias=False
        )
        feature_dim = network.fc.in_features
        network.fc = nn.Identity()
        if stem == "small":
            use_small_stem(network, in_channels=in_channels)
        return Encoder(network, feature_dim)
    if name == "densenet121":
        network = models.densenet121(weights=None)
        first = network.features.conv0
        network.features.conv0 = nn.Conv2d(
            in_channels, first.out_channels, kernel_size=7, stride=2, padding=3, bias=False
        )
        feature_dim = network.classifier.in_features
        network.classifier = nn.Identity()
        if stem == "small":
            use_small_stem(network, in_channels=in_channels)
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


def use_small_stem(network: nn.Module, *, in_channels: int) -> None:
    """Replace a torchvision ResNet's or DenseNet's ImageNet stem with a small-image one, in place.

    The ImageNet stem (7x7 convolution of stride 2, then a 3x3 max pool of stride 2)
    shrinks a crop four-fold before the first block: 32 px become 8x8. The small-image
    stem (a 3x3 convolution of stride 1, padding 1, no pool; the CIFAR ResNets' first
    layer) keeps 32x32, so every later stage sees 16 times the positions (about 16x the
    compute at the same crop size). The convolution keeps the stem's output channels, so
    the rest of the network and its feature size r are unchanged.
    """
    from torchvision import models

    if isinstance(network, models.ResNet):  # conv1, bn1, relu, maxpool, layer1...
        out_channels = network.conv1.out_channels
        network.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
        network.maxpool = nn.Identity()
        return
    if not isinstance(network, models.DenseNet):
        raise TypeError(f"expected a torchvision ResNet or DenseNet, found {type(network)}")
    features = network.features  # conv0, norm0, relu0, pool0, denseblock1...
    out_channels = features.conv0.out_channels
    features.conv0 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
    features.pool0 = nn.Identity()


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


__all__ = ["ENCODERS", "STEMS", "Encoder", "build_encoder", "count_parameters", "use_small_stem"]
