"""Model: the SCBD network — two encoders, two projection heads, an optional additive decoder."""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from scbd_cells.model.encoders import build_encoder

# model_args keys and their defaults; a checkpoint stores the full dict so that
# the model can be rebuilt from it alone.
DEFAULT_MODEL_ARGS: dict[str, Any] = {
    "encoder": "resnet18",
    "in_channels": 4,
    "image_size": 32,
    "z_dim": 64,
    "decoder": False,
    "decoder_width": 256,
    "stem": "imagenet",  # checkpoints written before --stem had the ImageNet stem
}


def default_decoder_width(encoder: str, image_size: int) -> int:
    """The decoder's channels when ``--decoder-width`` is not given: sized to encoder and image.

    The paper's 256 channels suit ResNet-18 at 64 px (9 M parameters, most of a step's
    time); at 32 px half the pixels need half the channels (128), and beside the small
    or tiny encoder (0.1 M parameters or fewer) 32 channels keep the decoder's step as short as the
    encoders' (256 channels: 46 s per CPU step with tiny, 32: a small share of it).
    """
    if encoder in ("small", "tiny"):
        return 32
    return int(min(256, max(32, 256 * image_size // 64)))


class SCBDOutput(NamedTuple):
    """What :class:`SCBDModel` returns (a NamedTuple so that DDP can traverse it)."""

    z_perturbation: torch.Tensor  # (B, z) unit norm, z_c
    z_batch: torch.Tensor  # (B, z) unit norm, z_s
    r_perturbation: torch.Tensor  # (B, r) encoder features f_c(x)
    r_batch: torch.Tensor  # (B, r) encoder features f_s(x)


class ProjectionHead(nn.Sequential):
    """g: Linear(r, r) - GELU - Linear(r, z) (paper A.1.1)."""

    def __init__(self, feature_dim: int, z_dim: int) -> None:
        super().__init__(
            nn.Linear(feature_dim, feature_dim), nn.GELU(), nn.Linear(feature_dim, z_dim)
        )


class DecoderBranch(nn.Sequential):
    """One branch of the additive decoder: z -> (C, 32, 32), paper Table 2."""

    def __init__(self, z_dim: int, out_channels: int, width: int) -> None:
        layers: list[nn.Module] = [nn.Linear(z_dim, width * 2 * 2), nn.Unflatten(1, (width, 2, 2))]
        for i in range(4):  # 2 -> 4 -> 8 -> 16 -> 32 pixels
            last = i == 3
            layers += [
                nn.GELU(),
                nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1),
                nn.GELU(),
                nn.Conv2d(width, width // 2 if last else width, 3, padding=1),
            ]
        layers += [nn.GELU(), nn.Conv2d(width // 2, out_channels, 1)]
        super().__init__(*layers)


class SCBDModel(nn.Module):
    """Two encoders f_c, f_s with heads g_c, g_s giving unit-norm z_c (perturbation), z_s (batch).

    Parameters
    ----------
    model_args
        Plain dict: ``encoder``, ``in_channels``, ``image_size``, ``z_dim``,
        ``decoder`` (bool), ``decoder_width``, ``stem``; missing keys take
        :data:`DEFAULT_MODEL_ARGS`.
    """

    def __init__(self, model_args: dict[str, Any]) -> None:
        super().__init__()
        self.model_args = {**DEFAULT_MODEL_ARGS, **model_args}
        args = self.model_args
        shape = {"in_channels": args["in_channels"], "stem": args["stem"]}
        encoder_c = build_encoder(args["encoder"], **shape)
        encoder_s = build_encoder(args["encoder"], **shape)
        self.encoder_perturbation = encoder_c.module
        self.encoder_batch = encoder_s.module
        self.head_perturbation = ProjectionHead(encoder_c.feature_dim, args["z_dim"])
        self.head_batch = ProjectionHead(encoder_s.feature_dim, args["z_dim"])
        self.decoder_perturbation: nn.Module | None = None
        self.decoder_batch: nn.Module | None = None
        if args["decoder"]:
            width = args["decoder_width"]
            self.decoder_perturbation = DecoderBranch(args["z_dim"], args["in_channels"], width)
            self.decoder_batch = DecoderBranch(args["z_dim"], args["in_channels"], width)

    def forward(self, images: torch.Tensor) -> SCBDOutput:
        """Embed preprocessed float images (B, C, H, W)."""
        r_perturbation = self.encoder_perturbation(images)  # (B, r)
        r_batch = self.encoder_batch(images)  # (B, r)
        z_perturbation = F.normalize(self.head_perturbation(r_perturbation), dim=1)  # (B, z)
        z_batch = F.normalize(self.head_batch(r_batch), dim=1)  # (B, z)
        return SCBDOutput(z_perturbation, z_batch, r_perturbation, r_batch)

    def embed_perturbation(self, images: torch.Tensor) -> torch.Tensor:
        """z_c only (one encoder): what embed needs."""
        return F.normalize(self.head_perturbation(self.encoder_perturbation(images)), dim=1)

    def decode(self, z_perturbation: torch.Tensor, z_batch: torch.Tensor) -> torch.Tensor:
        """Additive decoder: x_hat = d_c(z_c) + d_s(z_s), at the model's image size (B, C, H, W).

        Feed detached embeddings when training it (paper A.1.1: the encoders
        learn from the contrastive losses only). Swapping z_c or z_s between
        cells gives the paper's swap pictures.
        """
        if self.decoder_perturbation is None or self.decoder_batch is None:
            raise RuntimeError("this model was built without a decoder (model_args['decoder'])")
        reconstruction = self.decoder_perturbation(z_perturbation) + self.decoder_batch(z_batch)
        size = self.model_args["image_size"]
        if reconstruction.shape[-1] != size:
            reconstruction = F.interpolate(
                reconstruction, size=(size, size), mode="bilinear", align_corners=False
            )
        return reconstruction


def parameter_groups(model: SCBDModel, *, decoder_lr: float | None) -> list[dict[str, Any]]:
    """Parameters for the optimiser: one group, or the decoder's apart at ``decoder_lr``.

    The decoder learns from detached embeddings, so its learning rate changes no
    encoder or head update: the first group holds the same parameters, in the same
    order, as ``model.parameters()`` without the decoder.
    """
    if decoder_lr is None or model.decoder_perturbation is None or model.decoder_batch is None:
        return [{"params": list(model.parameters())}]
    decoder = [*model.decoder_perturbation.parameters(), *model.decoder_batch.parameters()]
    in_decoder = {id(parameter) for parameter in decoder}
    rest = [parameter for parameter in model.parameters() if id(parameter) not in in_decoder]
    return [{"params": rest}, {"params": decoder, "lr": decoder_lr}]


def device_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The precision of training and embedding: bf16 autocast on CUDA, float32 on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_model(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
) -> SCBDOutput:
    """The forward pass as training, validation and embedding run it.

    On CUDA the images go channels-last (the layout the convolutions are fastest in) and
    the pass runs under ``autocast`` (default :func:`device_autocast`).
    """
    if images.is_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast if autocast is not None else device_autocast(images.device):
        return model(images)
