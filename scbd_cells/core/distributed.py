"""Distributed: rank/world helpers for DDP under torchrun (training and embedding).

A run is distributed iff the ``RANK`` environment variable is set, as
``torchrun`` does; otherwise every helper here is a cheap no-op so that the
same code runs in one process. Backend: NCCL on CUDA, Gloo on the CPU.

The contrastive losses need the global batch: :func:`all_gather_with_grad`
concatenates every rank's rows and keeps the gradient of the local part. Its
backward sums the incoming gradient over ranks before taking the local slice
(each rank computes the same global loss), so that DDP's gradient averaging
gives exactly the gradient of the single-process loss on the global batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from scbd_cells.core.errors import InputError
from scbd_cells.core.rank import launched_rank

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run.

    Attributes
    ----------
    rank
        Global rank (0 in a single process).
    local_rank
        Rank on this node; picks the GPU.
    world_size
        Number of processes.
    device
        The device this process computes on.
    is_main
        True on rank 0, the only rank that logs, validates and writes.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part (a process group exists)."""
        return self.world_size > 1


def _resolve_device(device: str | torch.device, local_rank: int) -> torch.device:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(
            f"Expected --device auto, cpu, cuda or cuda:N (N a GPU number); found {device!r}."
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"Expected --device auto, cpu, cuda or cuda:N; found {str(device)!r}.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {str(device)!r} needs a CUDA GPU, and this machine has none (or "
                "torch was built without CUDA). Use --device cpu or auto."
            )
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        if device.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {device} names GPU {device.index}, but this machine has "
                f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
        torch.cuda.set_device(device)
    return device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device a single-process command computes on: ``auto``, ``cpu``, ``cuda``,
    ``cuda:N``; an :class:`InputError` naming the value when it is none of those."""
    return _resolve_device(device, 0)


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the process group when started by torchrun, and pick this rank's device.

    Parameters
    ----------
    device
        ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"`` (each rank
        takes GPU ``LOCAL_RANK``) or an explicit device.

    Returns
    -------
    DistInfo
        Rank, local rank, world size, device, and whether this is rank 0.
    """
    rank = launched_rank()
    if rank is None:
        return DistInfo(0, 0, 1, _resolve_device(device, 0), True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = _resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        timeout = timedelta(minutes=int(os.environ.get("SCBD_CELLS_DIST_TIMEOUT_MIN", "30")))
        kwargs = {"device_id": resolved} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        logger.info(
            "Joined process group: rank %d/%d (%s) on %s", rank, world_size, backend, resolved
        )
    return DistInfo(rank, local_rank, world_size, resolved, rank == 0)


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible seed for each rank (rank 0 keeps ``seed``).

    Use it for per-rank randomness (augmentation, dropout); the batch sampler
    must keep the *same* seed on every rank, since each rank slices the same
    global batch.
    """
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]) if rank else int(seed)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's part of the summed gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.size = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.size
        return grad[start : start + ctx.size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the local gradient.

    Every rank must pass the same shape. The result is ``(world_size * n, ...)``
    in rank order: rank ``r``'s rows sit at ``r * n : (r + 1) * n``, so it equals
    the global batch the loader sliced. Without a process group, returns
    ``tensor`` itself.

    Gradient: each rank computes the same loss on the gathered tensor; the
    backward sums the gradient over ranks and keeps the local rows, so after
    DDP averages parameter gradients over ranks they equal the single-process
    gradient of that loss.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_nograd(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradient.

    Ranks may pass different numbers of rows (other dims equal); rows come back
    in rank order.
    """
    if not is_distributed():
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    world_size = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)], dim=0)


def all_reduce_mean(value: float | torch.Tensor, *, device: torch.device | None = None) -> float:
    """Mean of a scalar over ranks (for logging and validation losses)."""
    if not is_distributed():
        return float(value)
    if device is None and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())  # NCCL needs CUDA tensors
    tensor = torch.as_tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def shard_indices(indices: np.ndarray | int, *, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of ``indices`` (or of ``range(indices)``).

    Shares differ in length by at most one and, concatenated in rank order,
    give back ``indices``: gather results with :func:`all_gather_nograd` or
    :func:`gather_to_main` to restore the original order.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(
            f"Expected 0 <= rank < world_size, found rank={rank}, world_size={world_size}."
        )
    if isinstance(indices, int | np.integer):
        indices = np.arange(int(indices), dtype=np.int64)
    indices = np.asarray(indices)
    bounds = np.linspace(0, indices.shape[0], world_size + 1).round().astype(np.int64)
    return indices[bounds[rank] : bounds[rank + 1]]


def gather_to_main(array: np.ndarray, *, device: torch.device | None = None) -> np.ndarray | None:
    """Concatenate a numpy array from every rank (rank order) on rank 0; None elsewhere.

    In one process returns ``array``. With NCCL pass the rank's CUDA device.
    Holds the whole result in rank 0's memory: for very large outputs write
    per-rank shards instead.
    """
    if not is_distributed():
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device is not None:
        tensor = tensor.to(device)
    gathered = all_gather_nograd(tensor)
    return gathered.cpu().numpy() if dist.get_rank() == 0 else None


def gather_pieces(
    indices: torch.Tensor, values: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Collect one round of per-rank pieces (rows of any length, possibly 0) on rank 0.

    Every rank must call it once per round (see ``iter_cells(rank=, world_size=)``).
    Returns ``(indices, values)`` concatenated in rank order on rank 0 (on the
    tensors' device) and None on the other ranks; in one process returns the
    input. With NCCL, pass CUDA tensors.
    """
    if not is_distributed():
        return indices, values
    gathered_indices = all_gather_nograd(indices.to(torch.long))
    gathered = {key: all_gather_nograd(value) for key, value in values.items()}
    if dist.get_rank() != 0:
        return None
    return gathered_indices, gathered
