"""Train: the SCBD training loop, one readable function from store to checkpoints.

``train(store_path, out=run_dir)`` reads class-balanced batches from the store,
optimises SupCon(z_c; perturbation) + SupCon(z_s; batch target) +
alpha * Invariance(z_c; batch) with AdamW, validates every ``val_every`` steps
(validation losses plus a linear probe that predicts the well from z_c and
from z_s), keeps ``best`` (lowest validation loss) and ``last`` checkpoints,
and writes ``config.yaml``, ``metrics.csv`` and ``curves.png`` into the run
folder. Distributed iff ``RANK`` is set (torchrun): the losses see the global
batch through an all-gather with gradients; only rank 0 logs, validates and
writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from scbd_cells.core.config import (
    TrainConfig,
    legacy_augment,
    read_config_file,
    resolve_train_config,
    save_config,
)
from scbd_cells.core.distributed import (
    all_gather_nograd,
    all_gather_with_grad,
    barrier,
    cleanup,
    init_distributed,
)
from scbd_cells.core.errors import CheckpointError, DataError, InputError, TrainingError
from scbd_cells.core.outputs import (
    atomic_path,
    check_not_input,
    check_output,
    kind_of,
    locks_output,
    writable_folder_error,
    write_marker,
    write_text_atomic,
)
from scbd_cells.core.progress import format_duration, progress_bar
from scbd_cells.data import schema
from scbd_cells.data.batch_stats import BatchChannelStats, batch_channel_stats
from scbd_cells.data.loader import BalancedLoader, segment_cells_of
from scbd_cells.data.sampler import BalancedBatchSampler
from scbd_cells.data.store import open_store
from scbd_cells.model.losses import (
    SCBDLoss,
    batch_target_labels,
    invariance_shuffled,
    scbd_loss,
)
from scbd_cells.model.preprocess import ImagePreprocessor, augment_images, preprocessor_for
from scbd_cells.model.scbd import (
    SCBDModel,
    default_decoder_width,
    device_autocast,
    parameter_groups,
    run_model,
)
from scbd_cells.model.schedule import set_learning_rates
from scbd_cells.model.selection import COLLAPSE_MARGIN, CheckpointSelection
from scbd_cells.training.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_path_of,
    for_embedding,
    load_checkpoint,
    non_finite_tensors,
    save_checkpoint,
)

if TYPE_CHECKING:
    from scbd_cells.data.store import Store

logger = logging.getLogger(__name__)

METRIC_COLUMNS = [
    "step",
    "phase",
    "loss",
    "supcon_perturbation",
    "supcon_batch",
    "invariance",
    "invariance_shuffled",
    "reconstruction",
    "well_f1_z_perturbation",
    "well_f1_z_batch",
    "well_f1_chance",
    "steps_per_s",
    "cells_per_s",
    "elapsed_s",
    "best_step_total",  # val rows: the step each --select rule keeps so far
    "best_step_z_c",
]


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    run_dir
        The run folder.
    best_checkpoint_path, last_checkpoint_path
        ``checkpoints/best.pt`` (lowest validation loss) and ``checkpoints/last.pt``.
    metrics_path
        ``metrics.csv`` (one row per train log interval and per validation).
    step
        Steps done.
    best_val_loss
        Lowest validation loss seen.
    interrupted
        True when stopped by Ctrl-C (``last`` holds the state; rerun with ``resume=True``).
    best_step, best_step_total, best_step_z_c
        The step ``best.pt`` holds (chosen by ``config.select``), and the step each rule
        keeps (:mod:`scbd_cells.model.selection`); None before the first validation.
    final_val
        The last validation row (losses and well F1 of z_c, z_s and chance).
    config
        The resolved options.
    """

    run_dir: Path
    best_checkpoint_path: Path
    last_checkpoint_path: Path
    metrics_path: Path
    step: int
    best_val_loss: float
    interrupted: bool
    final_val: dict[str, float]
    config: TrainConfig
    best_step: int | None = None
    best_step_total: int | None = None
    best_step_z_c: int | None = None


@locks_output("out")
def train(
    store_path: str | os.PathLike,
    *,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    config_path: str | os.PathLike | None = None,
    resume: bool = False,
    **options: Any,
) -> TrainResult:
    """Train SCBD on a store and write the run folder ``out``.

    Parameters
    ----------
    store_path
        A store written by ``scbd-cells ingest``.
    out
        Run folder (created). Holds ``config.yaml``, ``metrics.csv``,
        ``curves.png`` and ``checkpoints/{best,last}.pt``.
    config
        Base options (defaults when None).
    config_path
        YAML file of options (e.g. an earlier run's ``config.yaml``).
    resume
        Continue the run in ``out`` from ``checkpoints/last.pt`` exactly where it
        stopped; its ``config.yaml`` is the base, ``options`` may change e.g. ``steps``.
    **options
        Any :class:`~scbd_cells.core.config.TrainConfig` field, e.g. ``alpha=1.0``,
        ``steps=2000``. Precedence: defaults < config < config_path < env < options.

    Returns
    -------
    TrainResult

    Raises
    ------
    InputError
        Bad options, unwritable run folder, a finished run in ``out`` without ``resume``.
    DataError, StoreError
        A store that cannot train SCBD (one well, another format version, ...).
    TrainingError
        A non-finite loss; ``checkpoints/last.pt`` keeps the last good state.
    """
    run_dir = Path(out)
    config = _resolve_options(run_dir, store_path, config, config_path, resume, options)
    run = _set_up(store_path, run_dir, config, resume=resume)
    config = run.config  # as the store fitted it (classes per batch)
    stop, stall, log = _StopRequest(), _StallMonitor(config), _TrainLog(run.step, config)
    pace = _PaceCheck(run.step, config, device=run.dist.device, is_main=run.dist.is_main)
    run.model.train()
    with stop.installed(), progress_bar(unit="steps") as bar:
        task = bar.add_task("Training", total=config.steps, completed=run.step)
        try:
            while run.step < config.steps and not stop.requested:
                parts = _train_step(run, next(run.loader))
                run.step += 1
                bar.advance(task)
                pace.check(run.step)
                log.add(parts)
                stall.record(parts["supcon_perturbation"])
                if run.step % config.log_every == 0 or run.step == config.steps:
                    row = log.train_row(run.step)
                    run.history.append(row)
                    bar.update(task, description=f"Training [dim]loss {row['loss']:.3f} "
                               f"{row['cells_per_s']:,.0f} cells/s[/]")  # fmt: skip
                if run.step % config.val_every == 0 or run.step == config.steps:
                    if run.dist.is_main:
                        _validate_and_save(run, stall, elapsed_s=log.elapsed())
                    barrier()
        finally:
            run.loader.close()
    return _finish(run, interrupted=stop.requested and run.step < config.steps)


# --- the run's stages -------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything the loop works on: built by :func:`_set_up`, changed by the steps."""

    config: TrainConfig
    run_dir: Path
    store: Store
    dist: Any  # DistributedInfo
    model: SCBDModel
    forward_model: torch.nn.Module  # the model, under DDP and torch.compile when asked
    optimizer: torch.optim.Optimizer
    preprocessor: ImagePreprocessor
    loader: BalancedLoader
    val_set: _ValidationSet
    batch_stats: BatchChannelStats | None
    vocab: dict[str, list[str]]
    autocast: Any
    step: int = 0
    best_val_loss: float = math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    option_history: list[dict[str, Any]] = field(default_factory=list)
    final_val: dict[str, float] = field(default_factory=dict)
    selection: CheckpointSelection = field(default_factory=CheckpointSelection)
    base_lrs: list[float] = field(default_factory=list)  # per group, from the options

    @property
    def last_path(self) -> Path:
        return checkpoint_path_of(self.run_dir, "last")

    @property
    def best_path(self) -> Path:
        return checkpoint_path_of(self.run_dir, "best")

    @property
    def cuda(self) -> bool:
        return self.dist.device.type == "cuda"

    def checkpoint(self) -> dict[str, Any]:
        """The plain-dict checkpoint of the run as it is now (see ``training/checkpoint.py``)."""
        return {
            "model": self.model.state_dict(),
            "model_args": dict(self.model.model_args),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "config": self.config.model_dump(),
            "store_fingerprint": self.store.fingerprint(),
            "vocab": self.vocab,
            "normalize": self.config.normalize,
            "channel_stats": {k: list(v) for k, v in self.store.channel_stats.items()},
            "batch_channel_stats": None if self.batch_stats is None else self.batch_stats.to_dict(),
            "val_batch_size": self.val_set.batch_size,
            "sampler": self.loader.state_dict(),
            "option_history": self.option_history,
            "selection": self.selection.state_dict(),
        }

    def write_metrics(self) -> None:
        _write_metrics(self.history, self.run_dir, collapsed=math.log(self.val_set.batch_size))


def _resolve_options(
    run_dir: Path,
    store_path: str | os.PathLike,
    config: TrainConfig | None,
    config_path: str | os.PathLike | None,
    resume: bool,
    options: dict[str, Any],
) -> TrainConfig:
    """The run's options; the rules of ``out`` (a new run, or ``resume`` of one) checked."""
    last_path = checkpoint_path_of(run_dir, "last")
    check_not_input(run_dir, [store_path, config_path])
    if resume:
        if not last_path.is_file():
            raise CheckpointError(
                f"nothing to resume in {run_dir}: no {last_path}. Start the run without --resume."
            )
        saved = read_config_file(run_dir / "config.yaml")
        return resolve_train_config(
            base={**_legacy_options(saved, last_path), **saved},
            config_path=config_path,
            overrides=options,
        )
    resolved = resolve_train_config(base=config, config_path=config_path, overrides=options)
    if last_path.exists():
        raise InputError(
            f"{run_dir} already holds a run ({last_path}). Continue it with --resume, or "
            "choose another --out."
        )
    if kind_of(run_dir) != "run":
        check_output(run_dir, kind="run", overwrite=False)  # only a new or empty folder
    return resolved


MAX_UPSCALE = 4  # --image-size at most this many times the store's crops


def _check_image_size(config: TrainConfig, store: Store) -> None:
    """Refuse a model input far larger than the store's crops, before any memory is taken."""
    crop = int(store.image_size[0])
    if config.image_size is not None and config.image_size > MAX_UPSCALE * crop:
        raise InputError(
            f"--image-size {config.image_size} would enlarge the store's {crop} px crops "
            f"{config.image_size / crop:.0f}x (a batch of {config.batch_size:,} cells of "
            f"{store.n_channels} channels would take "
            f"{config.batch_size * store.n_channels * config.image_size**2 * 4 / 2**30:,.1f} GiB"
            f"); enlarging adds no detail. Use at most {MAX_UPSCALE * crop} ({MAX_UPSCALE}x), "
            "or leave --image-size out to train at the store's size."
        )


def _set_up(
    store_path: str | os.PathLike, run_dir: Path, config: TrainConfig, *, resume: bool
) -> _Run:
    """Store, sampler, loader, model, optimiser and validation set; the resume point loaded.

    Every check of the options and the store comes before the run folder is written.
    """
    store = open_store(store_path)
    dist_info = init_distributed(config.device)
    device = dist_info.device
    torch.manual_seed(config.seed)
    config, labels, sampler = _labels_and_sampler(store, config, world_size=dist_info.world_size)
    resumed_from, changes = _resume_point(run_dir, config, resume=resume)
    if dist_info.is_main:  # only now, with the options and the store checked
        _prepare_run_dir(run_dir)
    loader = BalancedLoader(
        store,
        sampler,
        device=device,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        cache_gb=config.cache_gb,
        workers=config.workers,
        prefetch=config.prefetch,
    )
    model, preprocessor, batch_stats = _model_and_preprocessor(store, config, labels, device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, decoder_lr=config.decoder_lr),
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    run = _Run(
        config=config,
        run_dir=run_dir,
        store=store,
        dist=dist_info,
        model=model,
        forward_model=model,
        optimizer=optimizer,
        preprocessor=preprocessor,
        loader=loader,
        val_set=_ValidationSet.build(
            store, config, labels.perturbation_codes, labels.batch_codes, labels.val_rows
        ),
        batch_stats=batch_stats,
        vocab={
            schema.PERTURBATION: list(labels.perturbation_names),
            schema.BATCH: list(labels.batch_names),
        },
        autocast=device_autocast(device),
        base_lrs=[group["lr"] for group in optimizer.param_groups],  # before a resume loads
    )
    if resumed_from is not None:
        _resume(run, resumed_from, changes)
    if dist_info.distributed:  # wrapped after the resume: DDP broadcasts rank 0's weights
        run.forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if run.cuda else None
        )
    if config.compile:
        run.forward_model = torch.compile(run.forward_model)
    if dist_info.is_main:
        save_config(config, run_dir / "config.yaml")
        _write_option_history(run.option_history, run_dir)
        _log_start(run, labels)
    return run


@dataclass(frozen=True)
class _TrainLabels:
    """The store's labels as codes and names, and its train and val rows."""

    perturbation_codes: np.ndarray
    perturbation_names: list[str]
    batch_codes: np.ndarray
    batch_names: list[str]
    train_rows: np.ndarray
    val_rows: np.ndarray  # the train rows when the store has no val split


def _labels_and_sampler(
    store: Store, config: TrainConfig, *, world_size: int
) -> tuple[TrainConfig, _TrainLabels, BalancedBatchSampler]:
    """Labels, splits and the class-balanced sampler; the options checked against the store
    (``classes_per_batch`` fitted to the train perturbations)."""
    perturbation_codes, perturbation_names = store.codes(schema.PERTURBATION)
    batch_codes, batch_names = store.codes(schema.BATCH)
    split_codes, split_names = store.codes(schema.SPLIT)  # codes: no string per cell
    train_rows, val_rows = (
        np.flatnonzero(split_codes == split_names.index(name)) if name in split_names
        else np.zeros(0, dtype=np.int64)
        for name in ("train", "val")
    )  # fmt: skip
    _check_image_size(config, store)
    config = _fit_classes_per_batch(config, perturbation_codes[train_rows])
    _check_labels(store, config, perturbation_codes, batch_codes, batch_names, train_rows)
    if val_rows.size == 0:
        logger.warning("The store has no val split: validating on train cells.")
        val_rows = train_rows
    sampler = BalancedBatchSampler(
        perturbation_codes,
        train_rows,
        classes_per_batch=config.classes_per_batch,
        cells_per_class=config.cells_per_class,
        seed=config.seed,
        batch_codes=batch_codes if config.stratify else None,
    )
    if config.sampling == "segments":
        sampler.use_segments(segment_cells_of(store), world_size=world_size)
    if sampler.n_small_classes:
        logger.info(
            "%d perturbation classes have fewer than %d train cells; they are sampled with "
            "replacement.",
            sampler.n_small_classes,
            config.cells_per_class,
        )
    _check_wells_per_batch(perturbation_codes, train_rows, config, batch_codes)
    labels = _TrainLabels(
        perturbation_codes, perturbation_names, batch_codes, batch_names, train_rows, val_rows
    )
    return config, labels, sampler


def _resume_point(
    run_dir: Path, config: TrainConfig, *, resume: bool
) -> tuple[dict[str, Any] | None, dict[str, tuple[Any, Any]]]:
    """``last.pt`` to continue from (None for a new run) and the options the resume changes."""
    last_path = checkpoint_path_of(run_dir, "last")
    resumed_from = load_checkpoint(last_path) if resume else None
    if resumed_from is not None and (broken := non_finite_tensors(resumed_from["model"])):
        raise CheckpointError(
            f"{last_path} (step {resumed_from.get('step')}) holds non-finite (NaN or infinite) "
            f"weights in {len(broken)} tensors (e.g. {', '.join(broken[:3])}): it is not a "
            "state training can continue from. Start the run again in a new --out (with a "
            "lower --lr or a higher --temperature if its loss diverged)."
        )
    changes = _resume_changes(resumed_from, config, last_path) if resumed_from else {}
    return resumed_from, changes


def _model_and_preprocessor(
    store: Store, config: TrainConfig, labels: _TrainLabels, device: torch.device
) -> tuple[SCBDModel, ImagePreprocessor, BatchChannelStats | None]:
    """The model on ``device`` (channels-last on CUDA) and the input transform it trains on."""
    image_size = config.image_size or int(store.image_size[0])
    model_args = {
        "encoder": config.encoder,
        "in_channels": store.n_channels,
        "image_size": image_size,
        "z_dim": config.z_dim,
        "decoder": config.decoder,
        "decoder_width": config.decoder_width or default_decoder_width(config.encoder, image_size),
        "stem": config.stem,
    }
    model = SCBDModel(model_args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    batch_stats = _batch_stats(store, config)
    preprocessor = preprocessor_for(
        labels.batch_names,
        channel_stats=store.channel_stats,
        image_size=image_size,
        batch_stats=batch_stats,
        normalize=config.normalize,
    )
    return model, preprocessor, batch_stats


def _log_start(run: _Run, labels: _TrainLabels) -> None:
    """One line on what is trained on what."""
    config = run.config
    logger.info(
        "Training %s x2 (%s) on %s: %d train cells, %d perturbations, "
        "%d batch labels, batches of %d x %d = %d cells, %d steps",
        config.encoder,
        _parameter_counts(run.model),
        run.dist.device,
        labels.train_rows.size,
        len(np.unique(labels.perturbation_codes[labels.train_rows])),
        len(labels.batch_names),
        config.classes_per_batch,
        config.cells_per_class,
        config.batch_size,
        config.steps,
    )


def _resume(run: _Run, checkpoint: dict[str, Any], changes: dict[str, tuple[Any, Any]]) -> None:
    """Continue from ``last.pt``: weights, optimiser, sampler, step, metrics so far."""
    _check_fingerprint(checkpoint, run.store, run.last_path)
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.loader.load_state_dict(checkpoint["sampler"])
    run.step, run.best_val_loss = int(checkpoint["step"]), float(checkpoint["best_val_loss"])
    run.history = _read_metrics(run.run_dir / "metrics.csv", up_to_step=run.step)
    run.option_history = list(checkpoint.get("option_history", []))
    run.selection = _resumed_selection(checkpoint, run.history, best_path=run.best_path)
    logger.info("Resuming %s at step %d", run.run_dir, run.step)
    if changes:
        logger.warning(
            "Resuming with changed options from step %d: %s",
            run.step,
            ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()),
        )
        run.option_history.append(
            {"step": run.step, "changed": {key: list(pair) for key, pair in changes.items()}}
        )


def _train_step(run: _Run, batch: Any) -> dict[str, float]:
    """One optimiser step on one class-balanced batch; returns the step's losses."""
    config = run.config
    images = run.preprocessor(batch.images, batch.batch)  # (b, C, H, W) float32
    if config.augment != "none":
        # seeded by (seed, step, rank): a resumed run draws the same turns and shifts
        generator = torch.Generator().manual_seed(
            (config.seed * 1_000_003 + run.step) * 1009 + run.dist.rank
        )
        images = augment_images(images, augment=config.augment, generator=generator)
    output = run_model(run.forward_model, images, autocast=run.autocast)
    # Losses in float32 on the global batch (all ranks' cells).
    z_perturbation = all_gather_with_grad(output.z_perturbation.float())
    z_batch = all_gather_with_grad(output.z_batch.float())
    perturbation = _gather_labels(batch.perturbation, run.dist.distributed)
    batch_label = _gather_labels(batch.batch, run.dist.distributed)
    losses = _scbd_objective(
        config,
        z_perturbation,
        z_batch,
        perturbation=perturbation,
        batch=batch_label,
        n_batches=len(run.vocab[schema.BATCH]),
    )
    total, parts = losses.total, losses.items()
    if config.decoder:
        # Paper A.1.1: the decoder learns from detached embeddings only.
        with run.autocast:
            reconstruction = run.model.decode(
                output.z_perturbation.detach(), output.z_batch.detach()
            )
        reconstruction_loss = F.mse_loss(reconstruction.float(), images)
        total = total + reconstruction_loss
        parts["reconstruction"] = float(reconstruction_loss.detach())
    if not all(math.isfinite(v) for v in parts.values()):
        raise TrainingError(
            f"the loss became non-finite at step {run.step + 1} ({_format(parts)}). "
            f"{run.last_path} keeps the last good state (step "
            f"{_last_saved_step(run.last_path)}). Try a lower --lr, a higher "
            "--temperature, or check the store's images for constant channels."
        )
    parts["invariance_shuffled"] = _invariance_reference(
        config, z_perturbation, batch_label, perturbation, step=run.step
    )
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    set_learning_rates(
        run.optimizer, base_lrs=run.base_lrs, step=run.step, warmup_steps=config.warmup_steps
    )
    run.optimizer.step()
    return parts


def _validate_and_save(run: _Run, stall: _StallMonitor, *, elapsed_s: float) -> None:
    """Validate, keep ``best.pt``, ``best_<other rule>.pt`` and ``last.pt``, rewrite the metrics."""
    val = run.val_set.evaluate(
        run.model, run.preprocessor, run.config, run.autocast, run.dist.device
    )
    val.update(step=run.step, phase="val", elapsed_s=elapsed_s)
    run.final_val = val
    run.history.append(val)
    logger.info("step %d  %s", run.step, _format(val))
    stall.check(
        run.step, val_supcon=val["supcon_perturbation"], val_batch_size=run.val_set.batch_size
    )
    improved = run.selection.update(val, step=run.step)  # every rule, whichever keeps best.pt
    val.update(run.selection.columns())
    run.best_val_loss = min(run.best_val_loss, val["loss"])
    state = run.checkpoint()
    for rule in sorted(improved):  # best.pt for --select's rule, best_<rule>.pt for the other
        which = "best" if rule == run.config.select else f"best_{rule}"
        save_checkpoint(for_embedding(state), checkpoint_path_of(run.run_dir, which))
    save_checkpoint(state, run.last_path)
    run.write_metrics()


def _finish(run: _Run, *, interrupted: bool) -> TrainResult:
    """After the loop: an interrupted run's ``last.pt``; a ``best.pt`` in any case."""
    if interrupted and run.dist.is_main:
        save_checkpoint(run.checkpoint(), run.last_path)
        run.write_metrics()
        logger.warning(
            "Interrupted at step %d; %s saved. Continue with --resume.", run.step, run.last_path
        )
    if run.dist.is_main and not run.best_path.exists():
        save_checkpoint(for_embedding(run.checkpoint()), run.best_path)
    barrier()
    if run.dist.distributed:
        cleanup()
    return TrainResult(
        run_dir=run.run_dir,
        best_checkpoint_path=run.best_path,
        last_checkpoint_path=run.last_path,
        metrics_path=run.run_dir / "metrics.csv",
        step=run.step,
        best_val_loss=run.best_val_loss,
        interrupted=interrupted,
        final_val=run.final_val,
        config=run.config,
        best_step=run.selection.best_step(run.config.select),
        best_step_total=run.selection.best_step("total"),
        best_step_z_c=run.selection.best_step("z_c"),
    )


def _parameter_counts(model: SCBDModel) -> str:
    """``encoders 2 x 11.2 M, heads 2 x 0.26 M, decoder 2 x 1.2 M parameters``."""

    def count(module: torch.nn.Module) -> str:
        n = sum(p.numel() for p in module.parameters())
        return f"{n / 1e6:.2g} M" if n >= 1e5 else f"{n / 1e3:.3g} k"

    parts = [
        f"encoders 2 x {count(model.encoder_perturbation)}",
        f"heads 2 x {count(model.head_perturbation)}",
    ]
    if model.decoder_perturbation is not None:
        parts.append(f"decoder 2 x {count(model.decoder_perturbation)}")
    return ", ".join(parts) + " parameters"


class _PaceCheck:
    """Times the first steps; on a CPU, warns when the run is planned to take hours.

    The default run (ResNet-18, 10,000 steps) takes a day and more on a laptop; the
    warning comes after a few seconds, with options of a run that finishes in minutes.
    """

    WARMUP_STEPS = 2  # the first steps build caches and allocate: not timed
    TIMED_STEPS = 5
    WARN_ABOVE_S = 30 * 60

    def __init__(self, step: int, config: TrainConfig, *, device: torch.device, is_main: bool,
                 clock: Any = time.perf_counter) -> None:  # fmt: skip
        self.config = config
        self.clock = clock
        self.enabled = torch.device(device).type == "cpu" and is_main
        self.start_step = step + self.WARMUP_STEPS
        self.started: float | None = None

    def check(self, step: int) -> None:
        if not self.enabled:
            return
        if step == self.start_step:
            self.started = self.clock()
        elif self.started is not None and step == self.start_step + self.TIMED_STEPS:
            self.enabled = False
            per_step = (self.clock() - self.started) / self.TIMED_STEPS
            self.warn(per_step, remaining=self.config.steps - step)

    def warn(self, per_step: float, *, remaining: int) -> None:
        """The warning, when ``remaining`` steps at ``per_step`` seconds exceed the limit."""
        if per_step * remaining <= self.WARN_ABOVE_S:
            return
        in_ten_minutes = max(1, int(600 / per_step))
        shorter = f"--steps {in_ten_minutes:,}".replace(",", "")
        if self.config.encoder not in ("small", "tiny"):
            shorter += " (or --encoder small, a CPU-sized encoder, with more steps)"
        logger.warning(
            "On the CPU this run will take about %s: %s steps left at %.1f s/step (timed over "
            "%d steps). For a first result in about 10 minutes stop it (Ctrl-C keeps a "
            "checkpoint) and train with %s, as docs/quickstart.md does; or train on a GPU.",
            format_duration(per_step * remaining),
            f"{remaining:,}",
            per_step,
            self.TIMED_STEPS,
            shorter,
        )


class _TrainLog:
    """Train rows of metrics.csv: each the mean of the ``log_every`` steps since the last."""

    def __init__(self, step: int, config: TrainConfig) -> None:
        self.batch_size = config.batch_size
        self.started = self.window_start = time.perf_counter()
        self.window_first_step = step
        self.window: dict[str, list[float]] = {}

    def add(self, parts: dict[str, float]) -> None:
        for key, value in parts.items():
            self.window.setdefault(key, []).append(value)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def train_row(self, step: int) -> dict[str, Any]:
        seconds = time.perf_counter() - self.window_start
        steps = step - self.window_first_step
        row: dict[str, Any] = {k: float(np.mean(v)) for k, v in self.window.items()}
        row.update(
            step=step,
            phase="train",
            steps_per_s=steps / seconds,
            cells_per_s=steps * self.batch_size / seconds,
            elapsed_s=self.elapsed(),
        )
        self.window, self.window_start, self.window_first_step = {}, time.perf_counter(), step
        return row


# --- checks of the input ---------------------------------------------------------------------


RUN_ENTRIES = (
    "config.yaml",
    "metrics.csv",
    "curves.png",
    CHECKPOINT_DIR,
    "option_history.yaml",
    ".metrics.csv.tmp",
)
# Options that fix the model's and the batches' shape: a resumed run cannot change them.
SHAPE_OPTIONS = (
    "encoder",
    "z_dim",
    "image_size",
    "decoder",
    "decoder_width",
    "stem",
    "classes_per_batch",
    "cells_per_class",
    "sampling",
)


def _legacy_options(saved: dict[str, Any], last_path: Path) -> dict[str, Any]:
    """Options a run of an earlier version did not record, as that version applied them.

    Before ``stratify`` batches were drawn uniformly within a perturbation; before
    ``sampling`` the loader chose segment draws when the store exceeded the cache (the
    checkpoint's sampler state says which). A resume continues as the run began.
    """
    legacy: dict[str, Any] = {}
    if "stratify" not in saved:
        legacy["stratify"] = False
    if "sampling" not in saved:
        sampler = load_checkpoint(last_path).get("sampler") or {}
        legacy["sampling"] = "segments" if sampler.get("segment_cells") is not None else "cells"
    return legacy


def _prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder, mark it as a run, and prove it is writable before any work."""
    try:
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        write_marker(run_dir, kind="run", entries=RUN_ENTRIES)
    except OSError as error:
        raise writable_folder_error(run_dir, error) from error


def _resume_changes(
    checkpoint: dict, config: TrainConfig, checkpoint_path: Path
) -> dict[str, tuple[Any, Any]]:
    """Options that differ from the checkpoint's; refuse a change of the model's shape."""
    saved = dict(checkpoint.get("config") or {})
    if "augment" in saved:  # true/false before augment had three values
        saved["augment"] = legacy_augment(saved["augment"])
    current = config.model_dump()
    changes = {
        key: (saved.get(key), value)
        for key, value in current.items()
        if key in saved and saved[key] != value
    }
    if "select" in changes:
        old, new = changes["select"]
        raise InputError(
            f"cannot resume {checkpoint_path} with --select {new}: its best.pt was kept by "
            f"--select {old}. Resume without --select (the run keeps {old}); metrics.csv's "
            f"best_step_{new} column names the step {new} would keep. For {new} from the "
            "start, begin a new run in another --out."
        )
    fixed = [key for key in SHAPE_OPTIONS if key in changes]
    if fixed:
        described = ", ".join(
            f"--{key.replace('_', '-')} {changes[key][0]!r} (now {changes[key][1]!r})"
            for key in fixed
        )
        raise InputError(
            f"cannot resume {checkpoint_path} with another model, batch shape or sampling: it "
            "was trained "
            f"with {described}. Resume with the run's own values (drop those options), or start "
            "a new run in another --out."
        )
    return changes


def _resumed_selection(
    checkpoint: dict[str, Any], history: list[dict[str, Any]], *, best_path: Path
) -> CheckpointSelection:
    """Each rule's best step at the resume point: the checkpoint's, or replayed from metrics.

    A checkpoint from before ``--select`` records none; its val rows (``metrics.csv``, up to
    the checkpoint's step) give both rules, and its ``best_val_loss`` (the lowest total,
    the only rule then) with ``best.pt``'s step stays the bar for ``total`` when those
    rows are gone.
    """
    if "selection" in checkpoint:
        return CheckpointSelection.from_state(checkpoint["selection"])
    selection = CheckpointSelection.from_rows(row for row in history if row["phase"] == "val")
    if "total" not in selection.best and math.isfinite(float(checkpoint["best_val_loss"])):
        best = load_checkpoint(best_path) if best_path.is_file() else checkpoint
        selection.best["total"] = ((float(checkpoint["best_val_loss"]),), int(best["step"]))
    return selection


def _write_option_history(option_history: list[dict[str, Any]], run_dir: Path) -> None:
    """``option_history.yaml``: the options each resume changed, with the step it resumed at."""
    import yaml

    path = run_dir / "option_history.yaml"
    if option_history:
        write_text_atomic(path, yaml.safe_dump(option_history, sort_keys=False))


def _check_labels(
    store: Store,
    config: TrainConfig,
    perturbation_codes: np.ndarray,
    batch_codes: np.ndarray,
    batch_names: list[str],
    train_rows: np.ndarray,
) -> None:
    if train_rows.size == 0:
        raise DataError(f"the store {store.path} has no train cells; re-ingest with a train split.")
    n_train_batches = len(np.unique(batch_codes[train_rows]))
    if n_train_batches < 2:
        raise DataError(
            f"the store {store.path} has one batch label ({batch_names[0]!r}) among its train "
            "cells; SCBD needs cells from at least two batches (wells) to learn what is "
            "technical. Re-ingest with --batch-columns naming the plate/well columns."
        )
    n_classes = len(np.unique(perturbation_codes[train_rows]))
    if config.classes_per_batch > n_classes:
        raise InputError(
            f"--classes-per-batch {config.classes_per_batch} is larger than the number of "
            f"perturbation classes in the train split ({n_classes}). Use --classes-per-batch "
            f"{n_classes} or fewer (raise --cells-per-class to keep the batch size)."
        )


def _fit_classes_per_batch(config: TrainConfig, train_perturbations: np.ndarray) -> TrainConfig:
    """The default ``classes_per_batch`` (256) on a screen with fewer perturbations: all of them.

    A value the user chose (CLI, YAML, environment, keyword) is kept, and checked later.
    """
    n_classes = len(np.unique(train_perturbations))
    if "classes_per_batch" in config.model_fields_set or config.classes_per_batch <= n_classes:
        return config
    logger.info(
        "The train split has %d perturbations (fewer than the default %d per batch): every "
        "batch takes all of them (--classes-per-batch %d).",
        n_classes,
        config.classes_per_batch,
        n_classes,
    )
    return config.model_copy(update={"classes_per_batch": n_classes})


def _batch_stats(store: Store, config: TrainConfig) -> BatchChannelStats | None:
    """Per-well channel statistics for ``normalize="batch"`` (None for the others)."""
    if config.normalize != "batch":
        return None
    stats = batch_channel_stats(store)
    thin = [label for label, n in zip(stats.labels, stats.n_cells, strict=True) if 0 < n < 100]
    if thin:
        logger.warning(
            "Batch label(s) %s have fewer than 100 cells: their channel statistics are noisy. "
            "Consider --normalize store, or coarser batch labels (e.g. the plate).",
            ", ".join(thin[:5]),
        )
    return stats


def _check_wells_per_batch(
    perturbation_codes: np.ndarray,
    train_rows: np.ndarray,
    config: TrainConfig,
    batch_codes: np.ndarray,
) -> None:
    """Stop when batches would hold cells of one well only; warn when of very few."""
    probe = BalancedBatchSampler(
        perturbation_codes,
        train_rows,
        classes_per_batch=config.classes_per_batch,
        cells_per_class=config.cells_per_class,
        seed=config.seed + 12345,  # its own generator: the training batches are untouched
    )
    n_wells = [len(np.unique(batch_codes[probe.next_indices()])) for _ in range(5)]
    if max(n_wells) < 2:
        raise DataError(
            "every class-balanced batch holds cells of a single batch label (well): in this "
            "store each perturbation was imaged in one well, so the well cannot be separated "
            "from the perturbation. SCBD needs perturbations spread over several wells."
        )
    if min(n_wells) < min(4, len(np.unique(batch_codes[train_rows]))):  # all a store has is fine
        logger.warning(
            "Class-balanced batches hold only %d-%d wells; the invariance loss sees few wells "
            "per batch. More --classes-per-batch helps.",
            min(n_wells),
            max(n_wells),
        )
    logger.info("Training batches hold cells of %d-%d wells", min(n_wells), max(n_wells))


def _scbd_objective(
    config: TrainConfig,
    z_perturbation: torch.Tensor,
    z_batch: torch.Tensor,
    *,
    perturbation: torch.Tensor,
    batch: torch.Tensor,
    n_batches: int,
) -> SCBDLoss:
    """The SCBD loss as ``config`` defines it; one recipe for training steps and validation."""
    target = batch_target_labels(
        perturbation, batch, batch_target=config.batch_target, n_batches=n_batches
    )
    return scbd_loss(
        z_perturbation,
        z_batch,
        perturbation=perturbation,
        batch=batch,
        batch_target=target,
        alpha=config.alpha,
        temperature=config.temperature,
        normalized=config.invariance == "normalized",
    )


def _invariance_reference(
    config: TrainConfig,
    z_perturbation: torch.Tensor,
    batch: torch.Tensor,
    perturbation: torch.Tensor,
    *,
    step: int,
) -> float:
    """The invariance loss of this z_c with the batch labels shuffled within each perturbation.

    What a z_c without batch information scores on this batch's composition (logged as
    ``invariance_shuffled``; :func:`~scbd_cells.model.losses.invariance_shuffled`).
    Seeded by (seed, step); it draws nothing from the training's generators.
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 7)
    value = invariance_shuffled(
        z_perturbation,
        batch,
        perturbation,
        temperature=config.temperature,
        normalized=config.invariance == "normalized",
        generator=generator,
    )
    return float(value)


def _check_fingerprint(checkpoint: dict, store: Store, checkpoint_path: Path) -> None:
    saved, found = checkpoint.get("store_fingerprint", {}), store.fingerprint()
    if saved.get("store_id") != found["store_id"]:
        raise CheckpointError(
            f"{checkpoint_path} was trained on another store (id {saved.get('store_id')}, "
            f"{store.path} has {found['store_id']}). Resume with the store the run started on."
        )


def _gather_labels(labels: torch.Tensor, distributed: bool) -> torch.Tensor:
    return all_gather_nograd(labels) if distributed else labels


# --- validation --------------------------------------------------------------------------------


@dataclass
class _ValidationSet:
    """Fixed class-balanced val batches (same cells every pass), held in memory."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # images, perturbation, batch
    rows: np.ndarray  # store rows of the cells, batch after batch
    n_batches: int

    @property
    def batch_size(self) -> int:
        """Cells in one val batch (the SupCon loss of a collapsed z_c is its log)."""
        return len(self.batches[0][1])

    @classmethod
    def build(
        cls,
        store: Store,
        config: TrainConfig,
        perturbation_codes: np.ndarray,
        batch_codes: np.ndarray,
        val_rows: np.ndarray,
    ) -> _ValidationSet:
        # Val batches draw without replacement when the val split allows: a cell drawn
        # twice is a perfect positive and would pull the val SupCon below its true value.
        # Classes with fewer val cells than the batch's cells per class are left out; if
        # that leaves too few classes for a full batch, draw with replacement instead.
        counts = np.bincount(perturbation_codes[val_rows])
        per_class = config.cells_per_class
        eligible_rows = val_rows[counts[perturbation_codes[val_rows]] >= per_class]
        n_eligible = len(np.unique(perturbation_codes[eligible_rows]))
        if n_eligible >= min(config.classes_per_batch, int(np.count_nonzero(counts))):
            val_rows = eligible_rows
        else:
            logger.warning(
                "The val split has fewer than %d cells in almost every class: val batches "
                "repeat cells, so the val SupCon losses read low. Ingest with a larger val "
                "fraction (--split-fractions).",
                per_class,
            )
        n_val_classes = len(np.unique(perturbation_codes[val_rows]))
        sampler = BalancedBatchSampler(
            perturbation_codes,
            val_rows,
            classes_per_batch=min(config.classes_per_batch, n_val_classes),
            cells_per_class=per_class,
            seed=config.seed + 1,
            batch_codes=batch_codes if config.stratify else None,
        )
        batches, all_rows = [], []
        for _ in range(config.val_batches):
            rows = sampler.next_indices()
            all_rows.append(rows)
            unique, inverse = np.unique(rows, return_inverse=True)
            images = store.read(unique)[inverse]
            batches.append(
                (
                    torch.from_numpy(images.astype(np.int32, copy=False)),
                    torch.from_numpy(perturbation_codes[rows].astype(np.int64)),
                    torch.from_numpy(batch_codes[rows].astype(np.int64)),
                )
            )
        return cls(batches, np.concatenate(all_rows), int(batch_codes.max()) + 1)

    @torch.no_grad()
    def evaluate(
        self,
        model: SCBDModel,
        preprocessor: ImagePreprocessor,
        config: TrainConfig,
        autocast: Any,
        device: torch.device,
    ) -> dict[str, float]:
        from scbd_cells.evaluation.well_probe import batch_prediction_f1

        model.eval()
        parts: dict[str, list[float]] = {}
        z_perturbation, z_batch, wells = [], [], []
        for index, (images, perturbation, batch) in enumerate(self.batches):
            images = preprocessor(images.to(device), batch.to(device))
            perturbation, batch = perturbation.to(device), batch.to(device)
            output = run_model(model, images, autocast=autocast)
            z_c, z_s = output.z_perturbation.float(), output.z_batch.float()
            losses = _scbd_objective(
                config, z_c, z_s, perturbation=perturbation, batch=batch, n_batches=self.n_batches
            )
            for key, value in losses.items().items():
                parts.setdefault(key, []).append(value)
            reference = _invariance_reference(config, z_c, batch, perturbation, step=index)
            parts.setdefault("invariance_shuffled", []).append(reference)
            z_perturbation.append(z_c.cpu().numpy())
            z_batch.append(z_s.cpu().numpy())
            wells.append(batch.cpu().numpy())
        model.train()
        row = {key: float(np.mean(values)) for key, values in parts.items()}
        # Each cell once in the probe: a cell drawn twice must not sit on both sides of its split.
        _, first = np.unique(self.rows, return_index=True)
        wells_all = np.concatenate(wells)[first]
        z_c_all, z_s_all = np.concatenate(z_perturbation)[first], np.concatenate(z_batch)[first]
        probe_c = batch_prediction_f1(z_c_all, wells_all, seed=config.seed)
        probe_s = batch_prediction_f1(z_s_all, wells_all, seed=config.seed)
        row.update(
            well_f1_z_perturbation=probe_c.f1,
            well_f1_z_batch=probe_s.f1,
            well_f1_chance=probe_c.chance,
        )
        return row


# --- monitoring, signals, metrics ---------------------------------------------------------------


class _StallMonitor:
    """Warns once when z_c stops learning the perturbation (alpha too large, or no signal).

    Two signs, checked at each validation:

    - the train perturbation SupCon loss has not fallen from where it started;
    - the *val* perturbation SupCon loss is not below log(val batch size), the value of
      a z_c that is the same for every cell. The appendix-B loss keeps each cell's own
      similarity in the softmax, so a random z_c starts above that level and first falls
      *to* it by collapsing; only a fall *below* it means perturbations are told apart.
      The val batches are fixed, so this reads without the train batches' noise. When an
      earlier validation *was* below that level, the run has learned and is now
      memorising its train cells (overfitting), which the warning says instead.
    """

    collapse_margin = COLLAPSE_MARGIN

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.window = max(5, min(50, config.steps // 10))
        self.first: list[float] = []
        self.recent: list[float] = []
        self.n_val_checks = 0
        self.warned = False
        self.warned_collapse = False
        self.best_val: tuple[float, int] | None = None  # (lowest val SupCon, its step)

    def record(self, value: float) -> None:
        if len(self.first) < self.window:
            self.first.append(value)
        self.recent = [*self.recent[-(self.window - 1) :], value]

    def check(
        self, step: int, *, val_supcon: float | None = None, val_batch_size: int | None = None
    ) -> None:
        self.n_val_checks += 1
        if val_supcon is not None and (self.best_val is None or val_supcon < self.best_val[0]):
            self.best_val = (val_supcon, step)
        if step < 4 * self.window or len(self.first) < self.window:
            return
        start, now = float(np.mean(self.first)), float(np.mean(self.recent))
        if not self.warned and now > start * (1 - self.config.stall_tolerance):
            self.warned = True
            logger.warning(
                "The perturbation SupCon loss has not fallen in %d steps (%.3f at the start, "
                "%.3f now): z_c is not learning the perturbation. If alpha (%.3g) is large, "
                "the invariance term may dominate: lower --alpha or use --invariance "
                "normalized (docs/training.md, choosing alpha).",
                step,
                start,
                now,
                self.config.alpha,
            )
        if val_supcon is None or not val_batch_size or self.warned_collapse:
            return
        collapse_level = math.log(val_batch_size)
        learned_below = collapse_level * (1 - self.collapse_margin)
        late_enough = self.n_val_checks >= 2 and step >= self.config.steps // 4
        if late_enough and val_supcon > learned_below:
            self.warned_collapse = True
            best, best_step = self.best_val or (val_supcon, step)
            if best < learned_below:  # it had learned
                logger.warning(
                    "The val perturbation SupCon loss rose from %.4f (step %d) to %.4f (step "
                    "%d), back above log(val batch size) = %.4f, while the train loss is "
                    "%.3f: the encoders are memorising the train cells. More steps will not "
                    "help; --select z_c (best.pt at that lowest point), more cells per "
                    "perturbation or --augment dihedral+shift may (docs/training.md).",
                    best,
                    best_step,
                    val_supcon,
                    step,
                    collapse_level,
                    now,
                )
                return
            logger.warning(
                "After %d steps the val perturbation SupCon loss (%.4f) is not below "
                "log(val batch size) = %.4f, the value of a z_c that is the same for every "
                "cell: z_c is not (yet) telling perturbations apart. If alpha (%.3g) is "
                "large, the invariance term may be winning: lower --alpha (docs/training.md, "
                "choosing alpha); at alpha 0, train longer or check that the perturbations "
                "change the cells.",
                step,
                val_supcon,
                collapse_level,
                self.config.alpha,
            )


class _StopRequest:
    """Ctrl-C finishes the current step, then the loop saves ``last`` and returns."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Stopping after this step (Ctrl-C again to abort without saving)...")

    @contextlib.contextmanager
    def installed(self):
        try:
            previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _format(row: dict[str, Any]) -> str:
    keys = [k for k in METRIC_COLUMNS if k in row and k not in ("step", "phase", "elapsed_s")]
    return "  ".join(f"{k} {row[k]:.4g}" for k in keys)


def _last_saved_step(last_path: Path) -> str:
    if not last_path.exists():
        return "none saved yet"
    return str(torch.load(last_path, map_location="cpu", weights_only=True)["step"])


def _read_metrics(metrics_path: Path, *, up_to_step: int) -> list[dict[str, Any]]:
    import pandas as pd

    if not metrics_path.exists():
        return []
    try:
        table = pd.read_csv(metrics_path)
        table = table[pd.to_numeric(table["step"], errors="raise") <= up_to_step]
    except Exception as error:  # truncated, edited or not a CSV: the checkpoint is the truth
        aside = metrics_path.with_name(f"{metrics_path.name}.unreadable")
        os.replace(metrics_path, aside)
        logger.warning(
            "Cannot read %s (%s); kept it as %s and start the metrics anew from step %d "
            "(the checkpoint holds the training state).",
            metrics_path,
            error,
            aside,
            up_to_step,
        )
        return []
    return [{k: v for k, v in row.items() if pd.notna(v)} for row in table.to_dict("records")]


def _write_metrics(
    history: list[dict[str, Any]], run_dir: Path, *, collapsed: float | None = None
) -> None:
    """metrics.csv (atomic) and curves.png (``collapsed``: see :func:`plot_curves`)."""
    import pandas as pd

    table = pd.DataFrame(history, columns=METRIC_COLUMNS)
    with atomic_path(run_dir / "metrics.csv") as tmp_path:
        table.to_csv(tmp_path, index=False)
    plot_curves(table, run_dir / "curves.png", collapsed=collapsed)


def plot_curves(
    table: Any, figure_path: Path, *, title: str | None = None, collapsed: float | None = None
) -> None:
    """Four panels: the two SupCon losses, the invariance loss, and the well-probe F1.

    ``collapsed``: log(val batch size), the perturbation SupCon of a z_c that is the
    same for every cell, drawn as a dotted line (the stall warning's reference). The
    invariance panel draws ``invariance_shuffled`` (train) dotted: what the same z_c
    would score with the batch labels shuffled within each perturbation.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [
        ("supcon_perturbation", "SupCon(z_c; perturbation)"),
        ("supcon_batch", "SupCon(z_s; batch target)"),
        ("invariance", "Invariance(z_c; batch)"),
    ]
    for ax, (column, label) in zip(axes, panels, strict=False):
        for phase, style in (("train", "-"), ("val", "o-")):
            part = table[(table["phase"] == phase) & table[column].notna()]
            if len(part):
                ax.plot(part["step"], part[column], style, label=phase, markersize=3)
        if column == "supcon_perturbation" and collapsed is not None:
            ax.axhline(collapsed, color="k", ls=":", lw=1, label="log B: z_c learned nothing")
        if column == "invariance" and "invariance_shuffled" in table:
            part = table[(table["phase"] == "train") & table["invariance_shuffled"].notna()]
            if len(part):
                ax.plot(
                    part["step"],
                    part["invariance_shuffled"],
                    color="k",
                    ls=":",
                    lw=1,
                    label="z_c without batch information",
                )
        ax.set_title(label)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax = axes[3]
    val = table[table["phase"] == "val"]
    if len(val):
        ax.plot(val["step"], val["well_f1_z_perturbation"], "o-", label="z_c", markersize=3)
        ax.plot(val["step"], val["well_f1_z_batch"], "o-", label="z_s", markersize=3)
        ax.plot(val["step"], val["well_f1_chance"], "k--", label="chance")
    ax.set_title("well probe macro F1 (val)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:  # no val row yet (e.g. interrupted early)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(figure_path) as tmp_path:
            fig.savefig(tmp_path, dpi=90)
    finally:
        plt.close(fig)
