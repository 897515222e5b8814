"""Demo: simulate -> ingest -> train (alpha = 0 and default) -> embed -> baseline -> evaluate.

The whole story of scbd-cells on a simulated screen, on the CPU in minutes:
SCBD's z_c should keep the complexes (CORUM AUPRC) while a classifier can no
longer tell the wells apart (well F1 near chance, below the alpha = 0 model's).
Both models see per-well normalised pixels (``train``'s default); the
CellProfiler-style baseline is shown as is (``baseline``, no batch correction),
with its features standardised within each well (``baseline_per_well``), and
corrected with Harmony (``baseline_harmony``, the conventional pipeline the JUMP
batch-correction benchmark ranks among the best).

Layout of ``out``::

    screen/            simulated screen (cells.csv, crops, complexes.txt, truth.json)
    screen.zarr        the store (crops resized to 32 px)
    runs/scbd/         training run with the default alpha (and the decoder)
    runs/scbd_alpha0/  training run with alpha = 0
    embeddings/scbd/cells.h5ad (+ guides.h5ad, genes.h5ad), embeddings/scbd_alpha0/...,
    embeddings/baseline.h5ad, embeddings/baseline_per_well.h5ad, embeddings/baseline_harmony.h5ad
    reconstruct/       pictures of what z_c and z_s hold (``scbd-cells reconstruct``)
    report/            evaluate's report (it links reconstruct/swap_well.png)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from scbd_cells.core.outputs import locks_output, prepare_folder
from scbd_cells.data import schema

if TYPE_CHECKING:  # the stages import their commands when they run
    from scbd_cells.embedding.reconstruction import ReconstructResult
    from scbd_cells.evaluation.report import EvaluationResult
    from scbd_cells.sim.screen import SimulationResult

log = logging.getLogger(__name__)

DEMO_IMAGE_SIZE = 32
# train / val / test. A 10 % val split (the paper's 2 % is for 26 M cells) gives the demo's
# val batches enough cells per class to be drawn without replacement.
DEMO_SPLIT_FRACTIONS = (0.75, 0.10, 0.15)
DEMO_OUTPUTS = ("screen", "screen.zarr", "runs", "embeddings", "reconstruct", "report")
# The SCBD model also trains the additive decoder, for the pictures. It learns from detached
# embeddings, so no number of the demo table changes (tested). At the encoders' rate (1e-4)
# 300 steps leave it worse than the mean cell; at 3e-3, 32 channels, it is measurably better
# (docs/reconstruct.md).
DEMO_DECODER = {"decoder": True, "decoder_width": 32, "decoder_lr": 3e-3}


@dataclass(frozen=True)
class DemoResult:
    """What :func:`demo` produced.

    Attributes
    ----------
    out_dir
        The demo folder.
    table
        The evaluation table (one row per embedding: scbd, scbd_alpha0, baseline,
        baseline_per_well, baseline_harmony).
    report_path
        ``out_dir / "report" / "report.md"``.
    seconds
        Wall time of each stage.
    pictures_dir
        ``out_dir / "reconstruct"``: reconstructions and swaps of the SCBD model.
    """

    out_dir: Path
    table: pd.DataFrame
    report_path: Path
    seconds: dict[str, float]
    pictures_dir: Path | None = None


def _default_alpha() -> float:
    from scbd_cells.core.config import TrainConfig

    return float(TrainConfig.model_fields["alpha"].default)


@locks_output("out")
def demo(
    *,
    out: str | Path = "scbd-demo",
    preset: str = "demo",
    seed: int = 0,
    alpha: float | None = None,
    steps: int | None = None,
    device: str = "auto",
    workers: int = 2,
    overwrite: bool = False,
) -> DemoResult:
    """Run the whole pipeline on a simulated screen and evaluate SCBD against its references.

    Parameters
    ----------
    out
        Demo folder (must be new or empty unless ``overwrite``).
    preset
        Simulator preset (``demo``; ``tiny`` for a smoke test).
    seed
        Seeds the simulation, the split, training and evaluation: same seed, same table.
    alpha
        Invariance weight of the SCBD model (default: the demo training options' alpha,
        see ``scbd_cells.core.config.demo_train_options``); the reference model uses alpha = 0.
    steps
        Training steps per model (default: the demo's training options).
    device
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    workers
        Processes/threads for simulating and reading images.
    overwrite
        Replace what an earlier demo left in ``out``.

    Returns
    -------
    DemoResult
    """
    out_dir = Path(out)
    # only what a demo wrote is replaced (its marker lists it); anything else in the folder stays
    prepare_folder(out_dir, kind="demo", overwrite=overwrite, entries=DEMO_OUTPUTS)
    embed_device = None if device == "auto" else device
    clock = _StageClock()
    screen, store_path = _simulate_and_ingest(
        out_dir, preset=preset, seed=seed, workers=workers, clock=clock
    )
    options, alpha = _train_options(store_path, seed=seed, device=device, alpha=alpha, steps=steps)
    cells_paths: dict[str, Path] = {}
    for name, run_alpha in {"scbd": alpha, "scbd_alpha0": 0.0}.items():
        cells_paths[name] = _train_and_embed(
            name, store_path, out_dir=out_dir, options=dict(options, alpha=run_alpha),
            embed_device=embed_device, clock=clock,
        )  # fmt: skip
    pictures = _reconstruct(out_dir, store_path, seed=seed, embed_device=embed_device, clock=clock)
    cells_paths.update(_baselines(out_dir, store_path, seed=seed, clock=clock))
    result = _evaluate(out_dir, cells_paths, screen=screen, seed=seed, clock=clock)
    _link_pictures(result.report_path, pictures)
    return DemoResult(
        out_dir=out_dir,
        table=result.table,
        report_path=result.report_path,
        seconds=clock.seconds,
        pictures_dir=pictures.out_dir,
    )


# --- the demo's stages ----------------------------------------------------------------------


class _StageClock:
    """The wall time of each stage (:attr:`DemoResult.seconds`), logged as each ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started
        log.info("demo: %s done in %.1f s", name, self.seconds[name])


def _simulate_and_ingest(
    out_dir: Path, *, preset: str, seed: int, workers: int, clock: _StageClock
) -> tuple[SimulationResult, Path]:
    """Simulate the screen into ``screen/`` and ingest it into ``screen.zarr``."""
    from scbd_cells.data.ingest import ingest
    from scbd_cells.sim.screen import simulate

    with clock.stage("simulate"):
        screen = simulate(out_dir / "screen", preset=preset, seed=seed, workers=workers)
    store_path = out_dir / "screen.zarr"
    with clock.stage("ingest"):
        ingest(
            Path(screen.cells_path),
            out=store_path,
            perturbation_column="gene",
            guide_column="guide",
            control=schema.CONTROL_LABEL,
            channel_names=list(schema.SIM_CHANNELS),
            resize=DEMO_IMAGE_SIZE,
            split_fractions=DEMO_SPLIT_FRACTIONS,
            workers=workers,
            seed=seed,
        )
    return screen, store_path


def _train_options(
    store_path: Path, *, seed: int, device: str, alpha: float | None, steps: int | None
) -> tuple[dict[str, Any], float]:
    """The demo's training options for this store, and the SCBD model's alpha."""
    from scbd_cells.core.config import demo_train_options
    from scbd_cells.data.store import open_store

    store = open_store(store_path)
    train_split = store.obs[schema.SPLIT].astype(str) == "train"
    n_classes = int(store.obs.loc[train_split, schema.PERTURBATION].nunique())
    options: dict[str, Any] = dict(demo_train_options(n_classes), seed=seed, device=device)
    # the demo's alpha is the training stage's choice for short CPU runs (core/config.py)
    alpha = float(options.get("alpha", _default_alpha())) if alpha is None else float(alpha)
    if steps is not None:
        options["steps"] = steps
    return options, alpha


def _train_and_embed(
    name: str,
    store_path: Path,
    *,
    out_dir: Path,
    options: dict[str, Any],
    embed_device: str | None,
    clock: _StageClock,
) -> Path:
    """Train one model into ``runs/NAME`` and embed the store's cells with it; their file."""
    from scbd_cells.embedding.encode import embed
    from scbd_cells.training.loop import train

    run_dir = out_dir / "runs" / name
    decoder = DEMO_DECODER if name == "scbd" else {}
    with clock.stage(f"train {name} (alpha={options['alpha']:g})"):
        train(store_path, out=run_dir, **dict(options, **decoder))
    cells_path = out_dir / "embeddings" / name / "cells.h5ad"
    with clock.stage(f"embed {name}"):
        embed(run_dir, store_path, out=cells_path, aggregate=True, device=embed_device)
    return cells_path


def _reconstruct(
    out_dir: Path, store_path: Path, *, seed: int, embed_device: str | None, clock: _StageClock
) -> ReconstructResult:
    """The SCBD model's pictures of what z_c and z_s hold, into ``reconstruct/``."""
    from scbd_cells.embedding.reconstruction import reconstruct

    with clock.stage("reconstruct scbd"):
        return reconstruct(
            out_dir / "runs" / "scbd", store_path, out=out_dir / "reconstruct", seed=seed,
            device=embed_device,
        )  # fmt: skip


def _baselines(
    out_dir: Path, store_path: Path, *, seed: int, clock: _StageClock
) -> dict[str, Path]:
    """The conventional pipeline's cell files: as is, standardised per well, and Harmony."""
    from scbd_cells.profiles.corrections import correct
    from scbd_cells.profiles.features import baseline

    cells_paths = {}
    # the conventional pipeline as is, and with its features standardised within each well
    # (the per-well correction SCBD's pixels get by default)
    for name, normalize in (("baseline", "store"), ("baseline_per_well", "batch")):
        cells_paths[name] = out_dir / "embeddings" / f"{name}.h5ad"
        with clock.stage(name):
            baseline(store_path, out=cells_paths[name], normalize=normalize, seed=seed)
    # the field's standard: Harmony on the uncorrected baseline's PCA, batch = well
    cells_paths["baseline_harmony"] = out_dir / "embeddings" / "baseline_harmony.h5ad"
    with clock.stage("baseline_harmony"):
        correct(
            cells_paths["baseline"], method="harmony", out=cells_paths["baseline_harmony"],
            batch_key=schema.BATCH, seed=seed,
        )  # fmt: skip
    return cells_paths


def _evaluate(
    out_dir: Path,
    cells_paths: dict[str, Path],
    *,
    screen: SimulationResult,
    seed: int,
    clock: _StageClock,
) -> EvaluationResult:
    """Evaluate every cell file side by side into ``report/``."""
    from scbd_cells.evaluation.report import evaluate

    with clock.stage("evaluate"):
        return evaluate(
            list(cells_paths.values()),
            corum=Path(screen.complexes_path),
            out=out_dir / "report",
            labels=list(cells_paths),
            control=schema.CONTROL_LABEL,
            seed=seed,
        )


def _link_pictures(report_path: Path, pictures: Any) -> None:
    """Add the SCBD model's well-swap grid to the demo report (a section after evaluate's)."""
    folder = pictures.out_dir.name
    others = ", ".join(
        f"[{path.name}](../{folder}/{path.name})"
        for name, path in pictures.figure_paths.items()
        if name != "swap_well"
    )
    section = f"""
## What the model separated

![z_c of cells from one well with z_s of cells from other wells](../{folder}/swap_well.png)

The SCBD model's decoder draws each cell from its z_c and the z_s of cells from other wells
(columns): the cell as if imaged in that well. Also in `{folder}/`: {others}, one
`*_channels.png` per grid, and `index.csv` (the cells used). The demo's decoder is small and
trains for the model's 300 steps, so the pictures are blurry; see docs/reconstruct.md.
"""
    with open(report_path, "a", encoding="utf-8") as report:
        report.write(section)
