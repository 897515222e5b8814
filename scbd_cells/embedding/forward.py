"""Embedding: store cells through a trained model, the one loop embed and reconstruct share.

:func:`encode_pieces` reads, preprocesses and embeds cells piece by piece (each
rank its share under torchrun); ``embed`` streams the pieces into AnnData,
:func:`encode_cells` keeps a few cells' inputs and embeddings in memory for
reconstruct's pictures. Both see the same inputs and the same z.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from scbd_cells.core.progress import progress_bar
from scbd_cells.data import schema

if TYPE_CHECKING:
    import torch

    from scbd_cells.data.store import Store
    from scbd_cells.model.preprocess import ImagePreprocessor
    from scbd_cells.model.scbd import SCBDOutput
    from scbd_cells.training.checkpoint import TrainedModel


class EncodedPiece(NamedTuple):
    """One piece of cells through the model (what :func:`encode_pieces` yields)."""

    rows: np.ndarray  # (b,) store rows
    inputs: torch.Tensor  # (b, C, S, S) float32 preprocessed images, the decoder's target
    output: SCBDOutput  # z and r of each cell


def encode_pieces(
    model: torch.nn.Module,
    store: Store,
    preprocessor: ImagePreprocessor,
    rows: np.ndarray,
    *,
    device: torch.device,
    batch_size: int,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[EncodedPiece]:
    """Store ``rows`` through the model piece by piece: read, preprocess, forward pass.

    ``embed`` writes the pieces, :func:`encode_cells` keeps them for pictures. Under
    torchrun each rank reads every ``world_size``-th piece (see ``iter_cells``).
    """
    import torch

    from scbd_cells.data.loader import images_to_device, iter_cells
    from scbd_cells.model.scbd import device_autocast, run_model

    batch_codes = torch.from_numpy(np.asarray(store.codes(schema.BATCH)[0], dtype=np.int64))
    autocast = device_autocast(device)
    for indices, images in iter_cells(
        store, rows, batch_size=batch_size, workers=workers, rank=rank, world_size=world_size
    ):
        with torch.inference_mode():
            pixels = images_to_device(images, device)
            codes = batch_codes[torch.from_numpy(np.asarray(indices, dtype=np.int64))]
            inputs = preprocessor(pixels, codes)  # (B, C, S, S) float32
            output = run_model(model, inputs, autocast=autocast)
        yield EncodedPiece(np.asarray(indices, dtype=np.int64), inputs, output)


@dataclass(frozen=True)
class EncodedCells:
    """Store rows with their model inputs and embeddings (row i of each array is ``rows[i]``).

    Attributes
    ----------
    rows
        (n,) store rows, sorted and unique.
    inputs
        (n, C, S, S) float32 preprocessed images (what the decoder reproduces).
    z_perturbation, z_batch
        (n, z) float32 unit-norm z_c and z_s.
    """

    rows: np.ndarray
    inputs: np.ndarray
    z_perturbation: np.ndarray
    z_batch: np.ndarray

    def position(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions of store ``rows`` in the arrays."""
        return np.searchsorted(self.rows, np.asarray(rows, dtype=np.int64))


def encode_cells(
    trained: TrainedModel,
    store: Store,
    rows: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 512,
    workers: int = 0,
) -> EncodedCells:
    """Preprocess and embed some cells of ``store`` in memory, through embed's loop.

    Parameters
    ----------
    trained
        A :class:`~scbd_cells.training.checkpoint.TrainedModel`.
    store
        An open store (its own per-well statistics when it is not the training store).
    rows
        Store rows (any order, repeats allowed).
    batch_size
        Cells per forward pass.
    workers
        Store reader threads.
    """
    unique = np.unique(np.asarray(rows, dtype=np.int64))
    device = next(trained.model.parameters()).device
    inputs, z_c, z_s = [], [], []
    with progress_bar(unit="cells") as bar:
        task = bar.add_task("Embedding cells to draw", total=unique.size)
        for piece in encode_pieces(
            trained.model, store, trained.preprocessor_for(store), unique,
            device=device, batch_size=batch_size, workers=workers,
        ):  # fmt: skip
            inputs.append(piece.inputs.float().cpu().numpy())
            z_c.append(piece.output.z_perturbation.float().cpu().numpy())
            z_s.append(piece.output.z_batch.float().cpu().numpy())
            bar.advance(task, piece.rows.size)
    size = int(trained.model_args["image_size"])
    z_dim = int(trained.model_args["z_dim"])
    empty = (np.empty((0, store.n_channels, size, size), np.float32), np.empty((0, z_dim)))
    return EncodedCells(
        rows=unique,
        inputs=np.concatenate(inputs) if inputs else empty[0],
        z_perturbation=np.concatenate(z_c).astype(np.float32) if z_c else empty[1],
        z_batch=np.concatenate(z_s).astype(np.float32) if z_s else empty[1],
    )
