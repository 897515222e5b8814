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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from scbd_cells.core.outputs import locks_output, prepare_folder
from scbd_cells.data import schema

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
    from scbd_cells.core.config import demo_train_options
    from scbd_cells.data.ingest import ingest
    from scbd_cells.data.store import open_store
    from scbd_cells.embedding.encode import embed
    from scbd_cells.embedding.reconstruction import reconstruct
    from scbd_cells.evaluation.report import evaluate
    from scbd_cells.profiles.corrections import correct
    from scbd_cells.profiles.features import baseline
    from scbd_cells.sim.screen import simulate
    from scbd_cells.training.loop import train

    out_dir = Path(out)
    # only what a demo wrote is replaced (its marker lists it); anything else in the folder stays
    prepare_folder(out_dir, kind="demo", overwrite=overwrite, entries=DEMO_OUTPUTS)
    embed_device = None if device == "auto" else device
    seconds: dict[str, float] = {}

    def stage(name: str, started: float) -> None:
        seconds[name] = time.perf_counter() - started
        log.info("demo: %s done in %.1f s", name, seconds[name])

    started = time.perf_counter()
    screen = simulate(out_dir / "screen", preset=preset, seed=seed, workers=workers)
    stage("simulate", started)

    started = time.perf_counter()
    store_path = out_dir / "screen.zarr"
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
    stage("ingest", started)

    store = open_store(store_path)
    train_split = store.obs[schema.SPLIT].astype(str) == "train"
    n_classes = int(store.obs.loc[train_split, schema.PERTURBATION].nunique())
    options: dict[str, Any] = dict(demo_train_options(n_classes), seed=seed, device=device)
    # the demo's alpha is the training stage's choice for short CPU runs (core/config.py)
    alpha = float(options.get("alpha", _default_alpha())) if alpha is None else float(alpha)
    if steps is not None:
        options["steps"] = steps
    runs = {"scbd": alpha, "scbd_alpha0": 0.0}
    cells_paths = {}
    for name, run_alpha in runs.items():
        started = time.perf_counter()
        run_dir = out_dir / "runs" / name
        decoder = DEMO_DECODER if name == "scbd" else {}
        train(store_path, out=run_dir, **dict(options, alpha=run_alpha, **decoder))
        stage(f"train {name} (alpha={run_alpha:g})", started)
        started = time.perf_counter()
        cells_paths[name] = out_dir / "embeddings" / name / "cells.h5ad"
        embed(run_dir, store_path, out=cells_paths[name], aggregate=True, device=embed_device)
        stage(f"embed {name}", started)

    started = time.perf_counter()
    pictures = reconstruct(
        out_dir / "runs" / "scbd", store_path, out=out_dir / "reconstruct", seed=seed,
        device=embed_device,
    )  # fmt: skip
    stage("reconstruct scbd", started)

    # the conventional pipeline as is, and with its features standardised within each well
    # (the per-well correction SCBD's pixels get by default)
    for name, normalize in (("baseline", "store"), ("baseline_per_well", "batch")):
        started = time.perf_counter()
        cells_paths[name] = out_dir / "embeddings" / f"{name}.h5ad"
        baseline(store_path, out=cells_paths[name], normalize=normalize, seed=seed)
        stage(name, started)
    # the field's standard: Harmony on the uncorrected baseline's PCA, batch = well
    started = time.perf_counter()
    cells_paths["baseline_harmony"] = out_dir / "embeddings" / "baseline_harmony.h5ad"
    correct(
        cells_paths["baseline"], method="harmony", out=cells_paths["baseline_harmony"],
        batch_key=schema.BATCH, seed=seed,
    )
    stage("baseline_harmony", started)

    started = time.perf_counter()
    result = evaluate(
        list(cells_paths.values()),
        corum=Path(screen.complexes_path),
        out=out_dir / "report",
        labels=list(cells_paths),
        control=schema.CONTROL_LABEL,
        seed=seed,
    )
    stage("evaluate", started)
    _link_pictures(result.report_path, pictures)
    return DemoResult(
        out_dir=out_dir,
        table=result.table,
        report_path=result.report_path,
        seconds=seconds,
        pictures_dir=pictures.out_dir,
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
