"""Checkpoint: atomic save of plain-dict checkpoints, safe loading, and the trained model for embed.

A checkpoint (``RUN_DIR/checkpoints/{best,last}.pt``, and ``best_<rule>.pt`` for the
``--select`` rule that does not keep ``best.pt``) is a plain dict that
``torch.load(path, weights_only=True)`` reads: ``model`` (state dict),
``model_args``, ``optimizer``, ``step``, ``best_val_loss``, ``config`` (dict),
``store_fingerprint``, ``vocab`` (``perturbation``, ``batch`` category lists),
``normalize`` (the input transform: ``batch``, ``store`` or ``arcsinh``; absent before
the option had three values), ``channel_stats``, ``batch_channel_stats`` (per-well
statistics, or None), ``val_batch_size`` (cells in one validation batch), ``sampler``
(state), ``version``. ``best.pt`` leaves out ``optimizer`` and ``sampler``
(only a resume, from ``last.pt``, needs them). Files follow the umask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import torch

from scbd_cells import __version__
from scbd_cells.core.config import WhichCheckpoint, read_config_file
from scbd_cells.core.errors import CheckpointError
from scbd_cells.data import schema
from scbd_cells.data.batch_stats import BatchChannelStats, batch_channel_stats
from scbd_cells.model.preprocess import ImagePreprocessor, preprocessor_for
from scbd_cells.model.scbd import SCBDModel

if TYPE_CHECKING:
    from scbd_cells.data.store import Store

CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
#: Entries only ``last.pt`` holds: what a resume needs beyond the weights.
RESUME_ONLY = ("optimizer", "sampler")


#: ``embed``/``reconstruct --which`` choices (:data:`scbd_cells.core.config.WhichCheckpoint`).
WHICH_CHOICES = get_args(WhichCheckpoint)


def checkpoint_path_of(run_dir: Path, which: str) -> Path:
    """``RUN_DIR/checkpoints/<which>.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.pt"


def rule_checkpoint_path(run_dir: Path, which: str) -> Path:
    """The file ``--which`` names in a run folder.

    ``best_<rule>`` is ``best.pt`` where the run kept it by that rule (its ``--select``),
    else ``best_<rule>.pt``, which training writes beside it; a run trained before training
    wrote that file has none and is refused with what to do.
    """
    if which not in WHICH_CHOICES:
        raise CheckpointError(f"unknown checkpoint {which!r}; choose one of {WHICH_CHOICES}.")
    own = checkpoint_path_of(run_dir, which)
    if which in ("best", "last") or own.is_file():
        return own
    rule = which.removeprefix("best_")
    best = checkpoint_path_of(run_dir, "best")
    if best.is_file() and _recorded_select(Path(run_dir), best) == rule:
        return best
    raise CheckpointError(
        f"{run_dir} has no checkpoint kept by --select {rule}: {own.name} is missing (the "
        "run was trained before train kept one per rule, or resumed from such a run and "
        "the rule never improved since). Use --which best, or train again with --select "
        f"{rule}; metrics.csv's best_step_{rule} names the step that rule keeps."
    )


def _recorded_select(run_dir: Path, best: Path) -> str:
    """The run's ``--select``: from its ``config.yaml``, so ``best.pt`` is not loaded twice."""
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        return read_config_file(config_path).get("select", "total")
    return load_checkpoint(best)["config"].get("select", "total")


def save_checkpoint(checkpoint: dict[str, Any], checkpoint_path: Path) -> None:
    """Write ``checkpoint`` atomically (:func:`scbd_cells.core.outputs.atomic_path`).

    A crash during the write leaves the previous file intact; the file follows the umask.
    """
    from scbd_cells.core.outputs import atomic_path

    checkpoint_path = Path(checkpoint_path)
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {**checkpoint, "version": CHECKPOINT_VERSION, "package_version": __version__}
    with atomic_path(checkpoint_path) as tmp_path:
        torch.save(checkpoint, tmp_path)


def for_embedding(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint without what only a resume needs (optimizer and sampler state).

    ``best.pt`` is saved this way: with AdamW's two moments per weight the optimizer
    state is twice the model; ``last.pt`` keeps everything.
    """
    return {key: value for key, value in checkpoint.items() if key not in RESUME_ONLY}


def check_argument_order(run_dir: str | os.PathLike, store_path: str | os.PathLike) -> None:
    """Refuse ``RUN_DIR STORE`` given the other way round, naming the order.

    Raises
    ------
    InputError
        ``run_dir`` is a store, or ``store_path`` a training run.
    """
    from scbd_cells.core.errors import InputError
    from scbd_cells.core.outputs import kind_of

    found = []
    if kind_of(run_dir) == "store":
        found.append(f"{run_dir} is a store")
    if kind_of(store_path) == "run" or Path(store_path).suffix == ".pt":
        found.append(f"{store_path} is a training run")
    if found:
        raise InputError(
            f"The arguments look swapped: {' and '.join(found)}. Give the training run first, "
            f"then the store: RUN_DIR STORE, here `{store_path} {run_dir}`."
        )


def load_checkpoint(checkpoint_path: Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (no code runs from the file).

    Raises
    ------
    CheckpointError
        Missing, unreadable, or not a scbd-cells checkpoint.
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise CheckpointError(
            f"no checkpoint at {checkpoint_path}. Train first (`scbd-cells train STORE --out "
            "RUN_DIR`) and point at RUN_DIR or at a .pt file in RUN_DIR/checkpoints."
        )
    try:
        checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise CheckpointError(
            f"cannot read {checkpoint_path} as a scbd-cells checkpoint ({error}). The file may be "
            "truncated or from another program; use another checkpoint or retrain."
        ) from error
    required = {"model", "model_args", "step", "version"}
    missing = required - set(checkpoint) if isinstance(checkpoint, dict) else required
    if missing:
        raise CheckpointError(
            f"{checkpoint_path} is not a scbd-cells checkpoint (missing {sorted(missing)})."
        )
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{checkpoint_path} has checkpoint version {checkpoint['version']}; this scbd-cells "
            f"reads version {CHECKPOINT_VERSION}. Retrain with this version."
        )
    return checkpoint


@dataclass
class TrainedModel:
    """A trained SCBD model ready to embed, with what it was trained on.

    Attributes
    ----------
    model
        :class:`SCBDModel` in eval mode on the requested device.
    channel_stats
        The training store's channel statistics.
    batch_stats
        The training store's per-well statistics (``normalize="batch"``), else None.
    normalize
        The input transform the model was trained with: ``batch``, ``store`` or ``arcsinh``.
    model_args, vocab, store_fingerprint, config
        As saved in the checkpoint.
    checkpoint_path
        The file loaded.
    step
        Training step of the checkpoint.
    """

    model: SCBDModel
    channel_stats: dict[str, list[float]]
    batch_stats: BatchChannelStats | None
    normalize: str
    model_args: dict[str, Any]
    vocab: dict[str, list[str]]
    store_fingerprint: dict[str, Any]
    config: dict[str, Any]
    checkpoint_path: Path
    step: int

    def preprocessor_for(self, store: Store) -> ImagePreprocessor:
        """The model's input transform for ``store``'s cells (call it with their batch codes).

        With per-well normalisation the training store reuses the statistics saved
        at training; any other store's wells are standardised with their own
        statistics, computed from that store (:func:`batch_channel_stats`).
        """
        image_size = int(self.model_args["image_size"])
        batch_stats = self.batch_stats
        trained_on = self.store_fingerprint.get("store_id")
        if batch_stats is not None and store.fingerprint()["store_id"] != trained_on:
            batch_stats = batch_channel_stats(store)
        return preprocessor_for(
            store.codes(schema.BATCH)[1],
            channel_stats=self.channel_stats,
            image_size=image_size,
            batch_stats=batch_stats,
            normalize=self.normalize,
        )

    def check_store(self, store: Store) -> None:
        """Raise :class:`CheckpointError` when ``store`` does not fit the model (channels, size).

        A store of another size is accepted only when it has the same channels
        (the preprocessor resizes); different channel counts or names are refused.
        """
        expected = self.store_fingerprint
        found = store.fingerprint()
        if int(found["n_channels"]) != int(expected["n_channels"]):
            raise CheckpointError(
                f"the model was trained on {expected['n_channels']} channels "
                f"({', '.join(expected['channel_names'])}); the store {store.path} has "
                f"{found['n_channels']} ({', '.join(found['channel_names'])}). Use a store with "
                "the training channels, or train on this store."
            )
        if list(found["channel_names"]) != list(expected["channel_names"]):
            raise CheckpointError(
                f"the model was trained on channels {expected['channel_names']} in that order; "
                f"the store {store.path} has {found['channel_names']}. Re-ingest with the "
                "training channel order, or train on this store."
            )
        if tuple(found["image_size"]) != tuple(expected["image_size"]):
            if tuple(found["image_size"])[0] != tuple(found["image_size"])[1]:
                raise CheckpointError(
                    f"the model expects square images (trained on {expected['image_size']}); "
                    f"the store {store.path} has {found['image_size']}. Re-ingest with square "
                    "crops."
                )


def load_trained(
    run_dir_or_checkpoint: str | os.PathLike,
    *,
    which: str = "best",
    device: str | torch.device = "cpu",
) -> TrainedModel:
    """Rebuild the trained model from a run folder or a checkpoint file.

    Parameters
    ----------
    run_dir_or_checkpoint
        A run folder (``RUN_DIR`` of ``scbd-cells train``) or a ``.pt`` file.
    which
        For a run folder: ``best`` (kept by the run's ``--select`` rule), ``last``, or
        ``best_total``/``best_z_c`` (the step that rule keeps, either way).
    device
        Where to put the model.
    """
    path = Path(run_dir_or_checkpoint)
    checkpoint_path = path if path.is_file() else rule_checkpoint_path(path, which)
    checkpoint = load_checkpoint(checkpoint_path)
    model = SCBDModel(checkpoint["model_args"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"the weights in {checkpoint_path} do not fit the model they describe ({error})."
        ) from error
    broken = non_finite_tensors(model.state_dict())
    if broken:
        raise CheckpointError(
            f"{checkpoint_path} holds non-finite (NaN or infinite) weights in {len(broken)} "
            f"tensors (e.g. {', '.join(broken[:3])}): embeddings from it would be NaN. Use "
            "another checkpoint of the run (--which last or best) or retrain."
        )
    model.to(device).eval()
    batch_stats = checkpoint.get("batch_channel_stats")
    return TrainedModel(
        model=model,
        channel_stats={k: list(v) for k, v in checkpoint["channel_stats"].items()},
        batch_stats=None if batch_stats is None else BatchChannelStats.from_dict(batch_stats),
        normalize=normalize_of(checkpoint),
        model_args=dict(model.model_args),  # an older checkpoint's missing keys: the defaults
        vocab={k: list(v) for k, v in checkpoint.get("vocab", {}).items()},
        store_fingerprint=dict(checkpoint.get("store_fingerprint", {})),
        config=dict(checkpoint.get("config", {})),
        checkpoint_path=checkpoint_path,
        step=int(checkpoint["step"]),
    )


def normalize_of(checkpoint: dict[str, Any]) -> str:
    """The input transform a checkpoint was trained with: ``batch``, ``store`` or ``arcsinh``.

    Checkpoints from before the ``normalize`` entry tell it by their per-well statistics
    (present: ``batch``; absent: ``store``, which is also what checkpoints from before
    per-well normalisation used).
    """
    saved = checkpoint.get("normalize")
    if saved is not None:
        return str(saved)
    return "store" if checkpoint.get("batch_channel_stats") is None else "batch"


def non_finite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold NaN or infinity."""
    return [
        name
        for name, tensor in state_dict.items()
        if torch.is_tensor(tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]
