"""Every GPU figure in one run: CUDA tests, training, embedding, the loader, a learning-curve point.

Run it through ``benchmarks/gpu_suite.sh``, which installs the carried wheels on the GPU
machine first. Stages, in order of priority, each a child process with its own time
limit inside one overall budget (default 480 s counted from the shell script's start):

1. ``cuda_tests``: the tests marked ``gpu`` (``pytest -m gpu``);
2. ``stores``: a synthetic store at 32 px and one at 64 px (``benchmarks/common.py``), and
   a seeded subset of the ``large`` simulated screen, ingested (the larger screen);
3. ``train_embed``: ``scbd-cells train`` then ``embed`` on CUDA (bf16 autocast and
   channels_last are what CUDA always gets);
4. ``ratio_32``, ``ratio_64``: ``benchmarks/train_step.py``, the real loop against the
   same model on batches resident on the device (target >= 85 % at 32 px);
5. ``embed_rate``: ``benchmarks/embed.py`` (target >= 500,000 cells/s at 32 px);
6. ``loader``: ``benchmarks/loader.py`` on the simulated screen (per-core rates, budgets
   smaller than the store);
7. ``learning_point``: ``train`` for ``--point-steps`` steps of 256 x 8 on the simulated
   screen, ``embed``, and the paper's two numbers (CORUM AUPRC, well F1 / chance);
8. ``train_compile``: ``train --compile`` then ``embed`` (compiling takes longest);
9. ``ratio_32_segments``: the training ratio at 32 px with a cache budget of a third of
   the store, so the loader reads segments (runs if time is left).

A stage that fails or runs out of time is reported as such and the next one runs. The
figures go into docs/performance.md between ``<!-- gpu-suite:start -->`` and
``<!-- gpu-suite:end -->`` (replaced on a rerun) and, with ``--out-dir`` (default: the
``OUT`` environment variable), the updated file, the section, the figures as JSON and the
log are copied there. ``--dry-run`` runs every stage at tiny sizes (on the CPU: seconds,
CI's check that the suite works; in this process unless ``--children``) and writes the
section into the work folder's copy of docs/performance.md, not the repository's.

The stage sizes were chosen to fit 8 minutes on an H200 host from the CPU figures of
docs/performance.md and DESIGN.md's H200 rates; they have not been timed on a GPU yet. If
the budget runs out, the stages left are reported as skipped: ``--budget-s`` gives more
time, ``--skip STAGE`` leaves one out, and the sizes are options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
START_MARKER = "<!-- gpu-suite:start -->"
END_MARKER = "<!-- gpu-suite:end -->"


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """What each stage runs on; the GPU's sizes or the dry run's."""

    encoder: str
    classes_per_batch: int
    cells_per_class: int
    cells_32: int
    cells_64: int
    classes: int
    image_small: int  # the "32 px" store (16 px in a dry run would hide nothing: keep 32)
    train_steps: int
    compile_steps: int
    ratio_steps: int
    ratio_warmup: int
    embed_batch: int
    loader_batches: int
    sim_preset: str
    sim_cells_per_guide: int | None
    sim_control_cells_per_guide: int | None
    point_steps: int
    point_val_every: int

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.cells_per_class


def sizes_for(args: argparse.Namespace) -> Sizes:
    if args.dry_run:
        return Sizes(
            encoder="tiny", classes_per_batch=8, cells_per_class=4, cells_32=1500, cells_64=1000,
            classes=20, image_small=32, train_steps=3, compile_steps=2, ratio_steps=2,
            ratio_warmup=1, embed_batch=256, loader_batches=2, sim_preset="tiny",
            sim_cells_per_guide=None, sim_control_cells_per_guide=None, point_steps=4,
            point_val_every=2,
        )  # fmt: skip
    return Sizes(
        encoder="resnet18", classes_per_batch=256, cells_per_class=8, cells_32=args.cells_32,
        cells_64=args.cells_64, classes=1000, image_small=32, train_steps=60,
        compile_steps=40, ratio_steps=args.ratio_steps, ratio_warmup=10, embed_batch=8192,
        loader_batches=8, sim_preset="large", sim_cells_per_guide=args.point_cells_per_guide,
        sim_control_cells_per_guide=args.point_control_cells_per_guide,
        point_steps=args.point_steps, point_val_every=max(1, args.point_steps // 4),
    )  # fmt: skip


# --------------------------------------------------------------------------- running stages


@dataclass
class StageResult:
    """One stage: what happened, how long it took, what it measured."""

    name: str
    title: str
    status: str = "skipped"  # ok, failed, timeout, skipped
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""


class StageError(RuntimeError):
    """A child process failed; the message holds the end of its output."""


class Suite:
    """Runs child processes inside the overall budget, logging everything to one file."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args = args
        self.sizes = sizes
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "suite.log"
        self.log_path.write_text("")
        started = os.environ.get("GPU_SUITE_STARTED")
        self.started = float(started) if started else time.time()
        self.deadline = self.started + args.budget_s
        self.stage_deadline = self.deadline
        self.stores: dict[str, Any] | None = None  # what the stores stage built
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [p for p in (self.env.get("PYTHONPATH"), str(REPO)) if p]
        )

    def remaining(self) -> float:
        return min(self.deadline, self.stage_deadline) - time.time()

    def log(self, text: str) -> None:
        line = f"[{time.time() - self.started:7.1f} s] {text}"
        print(line, flush=True)
        with self.log_path.open("a") as handle:
            handle.write(line + "\n")

    def run(self, command: list[str], *, what: str) -> str:
        """Run ``command`` (from the repository root); its output, or StageError/timeout."""
        limit = self.remaining()
        if limit < 5:
            raise subprocess.TimeoutExpired(command, 0)
        self.log(f"$ {' '.join(map(str, command))}")
        with self.log_path.open("a") as handle:
            try:
                completed = subprocess.run(
                    [str(part) for part in command], cwd=REPO, env=self.env, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=limit,
                )  # fmt: skip
            except subprocess.TimeoutExpired as error:
                output = error.output or ""
                handle.write(output if isinstance(output, str) else output.decode(errors="replace"))
                raise
            handle.write(completed.stdout)
        if completed.returncode != 0:
            tail = "\n".join(completed.stdout.strip().splitlines()[-12:])
            raise StageError(f"{what} exited with {completed.returncode}:\n{tail}")
        return completed.stdout

    def python(self, *arguments: Any, what: str) -> str:
        """``python ARGUMENTS``: a child process, or in this process in a dry run.

        A dry run's stages run in this process (one import of torch and the package instead
        of one per stage), with the same command lines; the GPU run keeps child processes,
        so that each stage has its own time limit and a crash stays in its stage.
        """
        arguments = tuple(str(part) for part in arguments)
        if self.args.dry_run and not self.args.children:
            return self.in_process(arguments, what=what)
        return self.run([sys.executable, *arguments], what=what)

    def in_process(self, arguments: tuple[str, ...], *, what: str) -> str:
        """Run ``python ARGUMENTS`` (``-m MODULE``, ``-c CODE`` or a script) in this process."""
        import contextlib
        import io
        import runpy

        self.log(f"$ python {' '.join(arguments)}  (in process)")
        buffer, saved_argv, saved_path = io.StringIO(), sys.argv, list(sys.path)
        code = 0
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                if arguments[0] == "-m":
                    sys.argv = [arguments[1], *arguments[2:]]
                    runpy.run_module(arguments[1], run_name="__main__", alter_sys=True)
                elif arguments[0] == "-c":
                    sys.argv = ["-c", *arguments[2:]]
                    exec(compile(arguments[1], "<gpu_suite>", "exec"), {"__name__": "__main__"})
                else:
                    sys.argv = list(arguments)
                    sys.path.insert(0, str(Path(arguments[0]).parent))
                    runpy.run_path(arguments[0], run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception as error:  # what a child process would have died of
            buffer.write(f"{type(error).__name__}: {error}\n")
            code = 1
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
        output = buffer.getvalue()
        with self.log_path.open("a") as handle:
            handle.write(output)
        if code != 0:
            tail = "\n".join(output.strip().splitlines()[-12:])
            raise StageError(f"{what} exited with {code}:\n{tail}")
        return output

    def cli(self, *arguments: Any, what: str) -> str:
        return self.python("-m", "scbd_cells", *arguments, what=what)


def run_stage(suite: Suite, result: StageResult, body, *, cap_s: float) -> StageResult:
    """Run one stage's ``body(suite) -> figures`` within ``cap_s`` and what is left."""
    if suite.deadline - time.time() < 10:
        result.status, result.note = "skipped", "the suite's time budget was spent"
        suite.log(f"{result.name}: skipped (budget spent)")
        return result
    suite.stage_deadline = time.time() + cap_s
    suite.log(f"== {result.name}: {result.title}")
    start = time.time()
    try:
        result.figures = body(suite) or {}
        result.status = "ok"
    except subprocess.TimeoutExpired:
        result.status, result.note = "timeout", f"stopped after {time.time() - start:.0f} s"
    except StageError as error:
        result.status, result.note = "failed", str(error)
    except Exception as error:  # a bug in the suite itself must not lose the other stages
        result.status, result.note = "failed", f"{type(error).__name__}: {error}"
    finally:
        suite.stage_deadline = suite.deadline
    result.seconds = time.time() - start
    suite.log(f"{result.name}: {result.status} in {result.seconds:.1f} s {result.note[:300]}")
    return result


# --------------------------------------------------------------------------- the stages


def stage_cuda_tests(suite: Suite) -> dict[str, Any]:
    files = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "tests").glob("test_*.py")
        if "mark.gpu" in path.read_text()
    )
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "--basetemp", str(suite.work / "pytest"), *files]  # fmt: skip
    try:
        output = suite.run(command, what="pytest -m gpu")
        failed = False
    except StageError as error:
        output, failed = str(error), True
    counts = {
        word: int(number)
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)
    }
    if failed and not counts.get("failed") and not counts.get("error") and "errors" not in counts:
        raise StageError(output)
    if failed:
        raise StageError(f"{counts}: {output[-800:]}")
    return {"files": files, **counts}


def stage_stores(suite: Suite) -> dict[str, Any]:
    sizes, work = suite.sizes, suite.work
    figures: dict[str, Any] = {}
    for key, n_cells, image_size in (("store_32", sizes.cells_32, sizes.image_small),
                                     ("store_64", sizes.cells_64, 64)):  # fmt: skip
        path = work / f"synthetic_{n_cells}_{image_size}px.zarr"
        started = time.time()
        suite.python(
            "-c",
            "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; "
            "from common import synthetic_store; "
            f"synthetic_store(Path({str(path)!r}), n_cells={n_cells}, n_classes={sizes.classes}, "
            f"image_size={image_size})",
            what=f"building {path.name}",
        )
        figures[key] = {"path": str(path), "cells": n_cells, "px": image_size,
                        "seconds": time.time() - started}  # fmt: skip
    screen, store = work / "screen", work / "screen.zarr"
    started = time.time()
    if not (store / "zarr.json").exists():
        simulate = ["simulate", screen, "--preset", sizes.sim_preset, "--seed", "0",
                    "--workers", suite.args.workers, "--overwrite", "-q"]  # fmt: skip
        if sizes.sim_cells_per_guide:
            simulate += ["--cells-per-guide", sizes.sim_cells_per_guide]
        if sizes.sim_control_cells_per_guide:
            simulate += ["--control-cells-per-guide", sizes.sim_control_cells_per_guide]
        suite.cli(*simulate, what="simulate")
        suite.cli(
            "ingest", screen / "cells.csv", "--out", store, "--perturbation-column", "gene",
            "--guide-column", "guide", "--control", "nontargeting", "--channel-names",
            "dna_damage,actin,dna,microtubules", "--workers", suite.args.workers, "-q",
            what="ingest",
        )  # fmt: skip
    figures["screen"] = {"path": str(store), "complexes": str(screen / "complexes.txt"),
                         "seconds": time.time() - started}  # fmt: skip
    summary_path = work / "screen_summary.json"
    suite.python(
        "-c",
        "import json, sys; from scbd_cells import open_store; "
        "json.dump(open_store(sys.argv[1]).summary(), open(sys.argv[2], 'w'), default=str)",
        store, summary_path, what="store summary",
    )  # fmt: skip
    info = json.loads(summary_path.read_text())
    figures["screen"].update(cells=info["n_cells"], perturbations=info["n_perturbations"],
                             batches=info["n_batches"])  # fmt: skip
    suite.stores = figures
    return figures


def _train_rates(run_dir: Path) -> dict[str, Any]:
    """Steady cells/s (median of the train windows after the first two) and the last val row."""
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv")
    train, val = metrics[metrics["phase"] == "train"], metrics[metrics["phase"] == "val"]
    steady = train.iloc[2:] if len(train) > 3 else train
    last = val.iloc[-1]
    return {
        "steps": int(metrics["step"].max()),
        "cells_per_s": float(steady["cells_per_s"].median()),
        "first_window_s": float(train["elapsed_s"].iloc[0]) if len(train) else math.nan,
        "train_s": float(metrics["elapsed_s"].max()),
        "val_supcon_perturbation": float(last["supcon_perturbation"]),
        "val_well_f1_z_perturbation": float(last["well_f1_z_perturbation"]),
        "val_well_f1_chance": float(last["well_f1_chance"]),
        "finite": bool(metrics["loss"].notna().all() and (metrics["loss"].abs() < 1e6).all()),
    }


def _train_and_embed(suite: Suite, name: str, *, steps: int, compile_model: bool) -> dict:
    sizes, store = suite.sizes, suite.stores["store_32"]["path"]
    run_dir = suite.work / f"run_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    suite.cli(
        "train", store, "--out", run_dir, "--device", suite.args.device, "--encoder",
        sizes.encoder, "--steps", steps, "--val-every", steps, "--classes-per-batch",
        sizes.classes_per_batch, "--cells-per-class", sizes.cells_per_class, "--workers",
        suite.args.workers, *(["--compile"] if compile_model else []), "-q",
        what=f"train ({name})",
    )  # fmt: skip
    figures = _train_rates(run_dir)
    cells = suite.work / f"cells_{name}.h5ad"
    started = time.time()
    suite.cli("embed", run_dir, store, "--out", cells, "--device", suite.args.device,
              "--batch-size", sizes.embed_batch, "--workers", suite.args.workers,
              "--overwrite", "-q", what=f"embed ({name})")  # fmt: skip
    figures["embed_wall_s"] = time.time() - started  # process start and imports included
    if not figures["finite"]:
        raise StageError(f"non-finite losses in {run_dir / 'metrics.csv'}")
    return figures


def stage_train_embed(suite: Suite) -> dict[str, Any]:
    return _train_and_embed(suite, "bf16", steps=suite.sizes.train_steps, compile_model=False)


def stage_train_compile(suite: Suite) -> dict[str, Any]:
    if not suite.args.dry_run:
        return _train_and_embed(suite, "compile", steps=suite.sizes.compile_steps,
                                compile_model=True)  # fmt: skip
    # A dry run takes the --compile path with TorchDynamo disabled: compiling even the tiny
    # encoder costs minutes of C++ on a CPU, and what could go wrong is the GPU's anyway.
    import torch._dynamo

    saved = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        return _train_and_embed(suite, "compile", steps=suite.sizes.compile_steps,
                                compile_model=True)  # fmt: skip
    finally:
        torch._dynamo.config.disable = saved


def _ratio(suite: Suite, store_key: str, *, cache_gb: float | None) -> dict[str, Any]:
    sizes = suite.sizes
    store = suite.stores[store_key]
    out = suite.work / f"ratio_{store_key}_{cache_gb}.json"
    budget = cache_gb if cache_gb is not None else 64.0
    suite.python(
        BENCHMARKS / "train_step.py", "--store", store["path"], "--device", suite.args.device,
        "--encoder", sizes.encoder, "--classes-per-batch", sizes.classes_per_batch,
        "--cells-per-class", sizes.cells_per_class, "--steps", sizes.ratio_steps, "--warmup",
        sizes.ratio_warmup, "--workers", suite.args.workers, "--cache-gb", budget, "--json",
        out, what=f"train_step.py ({store_key})",
    )  # fmt: skip
    return json.loads(out.read_text())


def stage_ratio_32(suite: Suite) -> dict[str, Any]:
    return _ratio(suite, "store_32", cache_gb=None)


def stage_ratio_64(suite: Suite) -> dict[str, Any]:
    return _ratio(suite, "store_64", cache_gb=None)


def stage_ratio_32_segments(suite: Suite) -> dict[str, Any]:
    store = suite.stores["store_32"]
    pixels_gb = store["cells"] * 4 * store["px"] ** 2 * 2 / 1e9
    return _ratio(suite, "store_32", cache_gb=round(pixels_gb / 3, 4))


def stage_embed_rate(suite: Suite) -> dict[str, Any]:
    out = suite.work / "embed_rate.json"
    suite.python(
        BENCHMARKS / "embed.py", "--store", suite.stores["store_32"]["path"], "--device",
        suite.args.device, "--encoder", suite.sizes.encoder, "--batch-size",
        suite.sizes.embed_batch, "--workers", suite.args.workers, "--json", out,
        what="embed.py",
    )  # fmt: skip
    return json.loads(out.read_text())


def stage_loader(suite: Suite) -> dict[str, Any]:
    out = suite.work / "loader.json"
    sizes = suite.sizes
    suite.python(
        BENCHMARKS / "loader.py", "--store", suite.stores["screen"]["path"], "--device",
        suite.args.device, "--workers", suite.args.workers, "--classes-per-batch",
        sizes.classes_per_batch, "--cells-per-class", sizes.cells_per_class, "--batches",
        sizes.loader_batches, "--reference-batches", 1, "--repeats", 1, "--chunks-warmup",
        60 if not suite.args.dry_run else 30, "--json", out, what="loader.py",
    )  # fmt: skip
    return json.loads(out.read_text())


POINT_METRICS = """
import json, sys
import anndata as ad
from scbd_cells.evaluation.well_probe import batch_prediction_f1, subsample
from scbd_cells.evaluation.complexes import read_complexes
from scbd_cells.evaluation.corum import DEFAULT_PERCENTILES, corum_pr
from scbd_cells.profiles.aggregate import aggregate_profiles
cells_path, complexes_path, out_path = sys.argv[1:4]
adata = ad.read_h5ad(cells_path)
genes = aggregate_profiles(adata, control="nontargeting").genes
corum = corum_pr(genes.X, list(genes.obs_names), read_complexes(complexes_path),
                 percentiles=DEFAULT_PERCENTILES)
rows = subsample(adata.n_obs, max_cells=50_000, seed=0)
well = batch_prediction_f1(adata.X[rows], adata.obs["batch"].iloc[rows].astype(str).to_numpy(),
                           seed=0)
json.dump({"corum_auprc": corum.auprc, "corum_recall_5_95": corum.recall_5_95,
           "n_genes": corum.n_genes, "well_f1": well.f1, "well_f1_chance": well.chance,
           "n_cells": int(adata.n_obs)}, open(out_path, "w"))
"""


def stage_learning_point(suite: Suite) -> dict[str, Any]:
    sizes, screen = suite.sizes, suite.stores["screen"]
    run_dir = suite.work / "run_point"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    suite.cli(
        "train", screen["path"], "--out", run_dir, "--device", suite.args.device, "--encoder",
        sizes.encoder, "--steps", sizes.point_steps, "--val-every", sizes.point_val_every,
        "--classes-per-batch", sizes.classes_per_batch, "--cells-per-class",
        sizes.cells_per_class, "--workers", suite.args.workers, "--seed", 0, "-q",
        what="train (learning-curve point)",
    )  # fmt: skip
    figures = {"train_wall_s": time.time() - started, **_train_rates(run_dir)}
    import yaml

    figures["alpha"] = float(yaml.safe_load((run_dir / "config.yaml").read_text())["alpha"])
    cells = suite.work / "cells_point.h5ad"
    suite.cli("embed", run_dir, screen["path"], "--out", cells, "--device", suite.args.device,
              "--batch-size", sizes.embed_batch, "--workers", suite.args.workers,
              "--overwrite", "-q", what="embed (learning-curve point)")  # fmt: skip
    out = suite.work / "point_metrics.json"
    suite.python("-c", POINT_METRICS, cells, screen["complexes"], out, what="point metrics")
    figures.update(json.loads(out.read_text()))
    figures["batch"] = f"{sizes.classes_per_batch} x {sizes.cells_per_class}"
    figures["curves"] = str(run_dir / "curves.png")
    return figures


STAGES = [
    ("cuda_tests", "CUDA-only tests (pytest -m gpu)", stage_cuda_tests, 120),
    ("stores", "stores: synthetic 32 and 64 px, simulated screen", stage_stores, 150),
    ("train_embed", "train + embed on the device (bf16, channels_last)", stage_train_embed, 90),
    ("ratio_32", "training ratio at 32 px (real loop / device only)", stage_ratio_32, 75),
    ("ratio_64", "training ratio at 64 px", stage_ratio_64, 75),
    ("embed_rate", "embed rate, store to .h5ad", stage_embed_rate, 60),
    ("loader", "loader: memory, segments (store larger than the budget), per-row reads",
     stage_loader, 75),
    ("learning_point", "learning-curve point at GPU scale", stage_learning_point, 180),
    ("train_compile", "train --compile + embed", stage_train_compile, 150),
    ("ratio_32_segments", "training ratio at 32 px, store 3x its cache budget",
     stage_ratio_32_segments, 75),
]  # fmt: skip


# --------------------------------------------------------------------------- the section


def machine_line(device: str) -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        versions = f"torch {torch.__version__}"
    except ImportError:  # pragma: no cover - the suite needs torch anyway
        gpu, versions = "unknown", "no torch"
    return (
        f"{platform.platform()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, {versions}, {gpu}; stages on `{device}`"
    )


def _number(value: Any, fmt: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, fmt)


def _figures_text(result: StageResult) -> str:
    f = result.figures
    if result.status != "ok":
        return result.note.splitlines()[0][:160] if result.note else ""
    if result.name == "cuda_tests":
        counts = ", ".join(f"{f[k]} {k}" for k in ("passed", "failed", "skipped") if f.get(k))
        return f"{counts or 'none collected'} ({', '.join(f['files'])})"
    if result.name == "stores":
        screen = f["screen"]
        return (f"{f['store_32']['cells']:,} cells at {f['store_32']['px']} px, "
                f"{f['store_64']['cells']:,} at 64 px; screen {screen['cells']:,} cells, "
                f"{screen['perturbations']} perturbations, {screen['batches']} wells")  # fmt: skip
    if result.name in ("train_embed", "train_compile"):
        return (f"{f['steps']} steps, {_number(f['cells_per_s'])} cells/s steady, first window "
                f"{_number(f['first_window_s'], '.1f')} s; embed {f['embed_wall_s']:.1f} s "
                "with process start")  # fmt: skip
    if result.name.startswith("ratio"):
        return (f"{f['share']:.0%} of device-only ({_number(f['real_cells_per_s'])} vs "
                f"{_number(f['device_only_steps_per_s'] * f['batch_size'])} cells/s), "
                f"{f['image_size']} px, cache budget {f['cache_gb']:g} GB for "
                f"{f['store_gb']:.2f} GB")  # fmt: skip
    if result.name == "embed_rate":
        return (f"{_number(f['end_to_end_cells_per_s'])} cells/s end to end "
                f"({_number(f['model_only_cells_per_s'])} model only), {f['n_cells']:,} cells "
                f"in {f['seconds']:.1f} s, peak RSS {f['peak_rss_gb']:.2f} GB")  # fmt: skip
    if result.name == "loader":
        return (f"memory {_number(f['memory_cells_per_cpu_s'])} cells/CPU-s; segments "
                f"{_number(f['segments_half_cells_per_cpu_s'])} cells/CPU-s "
                f"({f['segments_half_slower']:.2f}x slower, budget half the store), "
                f"{f['segments_tight_slower']:.2f}x at {f['tight_budget_gb']:.2f} GB; "
                f"{f['store_gb']:.2f} GB store, {f['workers']} threads")  # fmt: skip
    if result.name == "learning_point":
        return (f"{f['steps']} steps of {f['batch']}: CORUM AUPRC {f['corum_auprc']:.4f}, "
                f"well F1 {f['well_f1'] / f['well_f1_chance']:.2f}x chance "
                f"({_number(f['cells_per_s'])} cells/s, {f['train_wall_s']:.0f} s)")  # fmt: skip
    return json.dumps(f)[:160]


def _targets(results: dict[str, StageResult]) -> list[list[str]]:
    """The DESIGN.md targets the run speaks to, with the measured figure."""

    def status(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "**not met**")

    rows = []
    ratio = results.get("ratio_32")
    if ratio and ratio.status == "ok":
        share = ratio.figures["share"]
        rows.append(["training >= 85 % of the device-only step rate at 32 px",
                     f"{share:.0%}", status(share >= 0.85)])  # fmt: skip
    segments = results.get("ratio_32_segments")
    if segments and segments.status == "ok":
        share = segments.figures["share"]
        rows.append(["the same with the store 3x larger than its cache budget",
                     f"{share:.0%}", status(share >= 0.85)])  # fmt: skip
    embed = results.get("embed_rate")
    if embed and embed.status == "ok":
        rate = embed.figures["end_to_end_cells_per_s"]
        rows.append(["embed >= 500,000 cells/s at 32 px", f"{rate:,.0f} cells/s",
                     status(rate >= 500_000)])  # fmt: skip
    loader = results.get("loader")
    if loader and loader.status == "ok":
        f = loader.figures
        rows.append(["larger than the cache: <= 2x slower, >= 10,000 cells per CPU-second",
                     f"{f['segments_half_slower']:.2f}x, "
                     f"{f['segments_half_cells_per_cpu_s']:,.0f} cells/CPU-s",
                     status(f["segments_half_slower"] <= 2
                            and f["segments_half_cells_per_cpu_s"] >= 10_000)])  # fmt: skip
    return rows


def render_section(
    results: list[StageResult], *, args: argparse.Namespace, sizes: Sizes, total_s: float
) -> str:
    by_name = {result.name: result for result in results}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    kind = "DRY RUN at tiny sizes: these figures say nothing about a GPU. " if args.dry_run else ""
    lines = [
        START_MARKER,
        f"## GPU suite (`benchmarks/gpu_suite.sh`) — {when}",
        "",
        f"{kind}Machine: {machine_line(args.device)}. Whole run {total_s:.0f} s (budget "
        f"{args.budget_s:.0f} s, set-up included). Command: "
        f"`bash benchmarks/gpu_suite.sh {' '.join(sys.argv[1:])}`".rstrip() + ".",
        "",
        "| stage | status | seconds | figures |",
        "|---|---|---:|---|",
    ]
    for result in results:
        text = _figures_text(result).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {result.title} | {result.status} | {result.seconds:.0f} | {text} |")
    targets = [] if args.dry_run else _targets(by_name)  # tiny CPU figures meet nothing
    if targets:
        lines += ["", "| target (DESIGN.md) | measured | status |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in targets]
    point = by_name.get("learning_point")
    if point and point.status == "ok":
        f = point.figures
        screen = by_name["stores"].figures["screen"]
        lines += [
            "",
            f"Learning-curve point: `scbd-cells train` ({sizes.encoder} x2, α = {f['alpha']:g} "
            f"(train's default), stratified batches of {f['batch']}, {f['steps']} steps) on the "
            f"`{sizes.sim_preset}` simulated screen, seed 0"
            + (f", {sizes.sim_cells_per_guide} cells per guide and "
               f"{sizes.sim_control_cells_per_guide} per control guide"
               if sizes.sim_cells_per_guide else "")  # fmt: skip
            + f" ({screen['cells']:,} cells, {screen['perturbations']} perturbations, "
            f"{screen['batches']} wells): val SupCon(z_c) {f['val_supcon_perturbation']:.4f}, "
            f"CORUM AUPRC {f['corum_auprc']:.4f} (recall @ 5/95 "
            f"{f['corum_recall_5_95']:.3f}, {f['n_genes']} genes), well F1 "
            f"{f['well_f1']:.3f} = {f['well_f1'] / f['well_f1_chance']:.2f}x chance "
            f"({f['well_f1_chance']:.3f}). The screen is deterministic, so the conventional "
            "pipelines for this point come from a CPU machine: `scbd-cells simulate screen "
            f"--preset {sizes.sim_preset} --seed 0"
            + (f" --cells-per-guide {sizes.sim_cells_per_guide} --control-cells-per-guide "
               f"{sizes.sim_control_cells_per_guide}" if sizes.sim_cells_per_guide else "")
            + "`, `scbd-cells ingest screen/cells.csv --out screen.zarr --perturbation-column "
            "gene --guide-column guide --control nontargeting --channel-names "
            "dna_damage,actin,dna,microtubules`, then `baseline` (with and without "
            "`--normalize batch`) and `evaluate --corum screen/complexes.txt`.",
        ]  # fmt: skip
    failed = [r for r in results if r.status in ("failed", "timeout")]
    for result in failed:
        lines += ["", f"`{result.name}` {result.status}:", "", "```",
                  result.note[-1500:].strip(), "```"]  # fmt: skip
    lines += ["", END_MARKER]
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with the suite's section replaced (between the markers) or appended."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start != -1 and end > start:
        after = text[end + len(END_MARKER) :]
        return text[:start] + section.rstrip("\n") + after
    return text.rstrip("\n") + "\n\n" + section


# --------------------------------------------------------------------------- main


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    parser.add_argument("--dry-run", action="store_true", help="every stage at tiny sizes")
    parser.add_argument("--children", action="store_true",
                        help="child processes in a dry run too, as on a GPU")  # fmt: skip
    parser.add_argument("--work-dir", default="/tmp/scbd-gpu-suite", help="stores, runs, logs")
    parser.add_argument("--performance-md", default=None,
                        help="file whose section is written (default docs/performance.md; a "
                        "dry run: the work folder's copy of it)")  # fmt: skip
    parser.add_argument("--out-dir", default=os.environ.get("OUT"),
                        help="copy the results here (default: $OUT when set)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="whole run in seconds, set-up included")  # fmt: skip
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--cells-32", type=int, default=150_000)
    parser.add_argument("--cells-64", type=int, default=40_000)
    parser.add_argument("--ratio-steps", type=int, default=50)
    parser.add_argument("--point-steps", type=int, default=2000)
    parser.add_argument("--point-cells-per-guide", type=int, default=48)
    parser.add_argument("--point-control-cells-per-guide", type=int, default=60)
    parser.add_argument("--skip", action="append", default=[], choices=[s[0] for s in STAGES],
                        help="leave a stage out (repeat)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dry_run:
        args.workers = min(args.workers, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    sizes = sizes_for(args)
    suite = Suite(args, sizes)
    suite.log(f"gpu suite on {args.device}{' (dry run)' if args.dry_run else ''}; work folder "
              f"{suite.work}; budget {args.budget_s:.0f} s")  # fmt: skip
    results = []
    for name, title, body, cap_s in STAGES:
        result = StageResult(name=name, title=title)
        if name in args.skip:
            result.note = "left out with --skip"
        elif name not in ("cuda_tests", "stores") and suite.stores is None:
            result.note = "no stores (the stores stage did not finish)"
        else:
            result = run_stage(suite, result, body, cap_s=cap_s)
        results.append(result)
    total_s = time.time() - suite.started
    section = render_section(results, args=args, sizes=sizes, total_s=total_s)
    target = Path(args.performance_md) if args.performance_md else None
    if target is None:
        target = REPO / "docs" / "performance.md"
        if args.dry_run:
            target = suite.work / "performance.md"
            shutil.copyfile(REPO / "docs" / "performance.md", target)
    target.write_text(replace_section(target.read_text(), section))
    (suite.work / "section.md").write_text(section)
    (suite.work / "suite.json").write_text(
        json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=str) + "\n"
    )
    point = next((r for r in results if r.name == "learning_point" and r.status == "ok"), None)
    if point and not args.dry_run:
        shutil.copyfile(point.figures["curves"], REPO / "docs" / "figures" / "gpu_point_curves.png")
    suite.log(f"wrote the section into {target} ({total_s:.0f} s in all)")
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        copies = [target, suite.work / "section.md", suite.work / "suite.json", suite.log_path]
        if point:
            copies.append(Path(point.figures["curves"]))
        for path in copies:
            shutil.copyfile(path, out_dir / (path.name if path.name != "curves.png"
                                             else "gpu_point_curves.png"))  # fmt: skip
    print(section)
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
