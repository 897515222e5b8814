"""Benchmark: cells per second of ``scbd_cells.embed``, end to end, store to AnnData file.

Trains a model for a step (the weights do not matter for speed), then runs
``embed`` in a fresh child process and reports its wall time, cells/s and peak
resident memory (the memory bound of streaming). For context it also times the
model alone on a batch already on the device. Target: ≥ 500,000 cells/s on one
H200 at 32 px. Examples::

    python benchmarks/embed.py --cells 20000 --encoder resnet18 --batch-size 512   # CPU
    python benchmarks/embed.py --device cuda --cells 1000000 --batch-size 8192 --record
    torchrun --nproc-per-node 8 -m scbd_cells embed RUN STORE --out cells.h5ad     # multi-GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    REPO,
    add_json_argument,
    add_store_arguments,
    benchmark_store,
    markdown_table,
    one_step_run,
    record,
    write_json,
)

from scbd_cells.training.checkpoint import load_trained

CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads({threads})
from scbd_cells import embed
start = time.perf_counter()
result = embed({run!r}, {store!r}, out={out!r}, batch_size={batch_size}, device={device!r},
               workers={workers})
# VmHWM: this process image's peak (ru_maxrss would keep the parent's pages from the fork)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
peak_kib = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak_gb = peak_kib * 1024 / 1e9
print(json.dumps({{"seconds": time.perf_counter() - start, "n_cells": result.n_cells,
                  "peak_rss_gb": peak_gb}}))
"""


def model_only_rate(run_dir: Path, store, args, device: torch.device) -> float:
    """Cells per second of the trained model (both encoders) on a batch resident on the device."""
    trained = load_trained(run_dir, device=str(device))
    model = trained.model
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    images = torch.from_numpy(store.images[: args.batch_size].astype("int32")).to(device)
    preprocessor = trained.preprocessor_for(store)
    codes = torch.from_numpy(store.codes("batch")[0][: args.batch_size].astype("int64")).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def forward() -> None:
        inputs = preprocessor(images, codes)
        if cuda:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            output = model(inputs)
        output.z_perturbation.float().cpu()

    with torch.inference_mode():
        for _ in range(2):
            forward()
        start = time.perf_counter()
        for _ in range(args.repeats):
            forward()
        if cuda:
            torch.cuda.synchronize()
    return args.repeats * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2, help="store reader threads")
    parser.add_argument("--repeats", type=int, default=5, help="model-only timed batches")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_json_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    store = benchmark_store(args)

    with tempfile.TemporaryDirectory(prefix="scbd-embed-bench-") as tmp:
        run_dir = one_step_run(
            store.path, Path(tmp) / "run", encoder=args.encoder, device=str(device)
        )
        model_rate = model_only_rate(run_dir, store, args, device)
        code = CHILD.format(
            threads=args.threads,
            run=str(run_dir),
            store=str(store.path),
            out=str(Path(tmp) / "cells.h5ad"),
            batch_size=args.batch_size,
            device=str(device),
            workers=args.workers,
        )
        child = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
        )
        timing = json.loads(child.stdout.strip().splitlines()[-1])
        # measured inside the child (VmHWM): ru_maxrss would count the parent's pages
        child_rss_gb = timing["peak_rss_gb"]
        out_mb = (Path(tmp) / "cells.h5ad").stat().st_size / 1e6

    end_to_end = timing["n_cells"] / timing["seconds"]
    image_size = store.image_size[0]
    rows = [
        ["model only (batch resident)", model_rate, "-"],
        ["embed: store -> AnnData (.h5ad)", end_to_end, f"{child_rss_gb:.2f}"],
    ]
    body = markdown_table(["path", "cells/s", "peak RSS GB"], rows)
    store_gb = store.n_cells * store.n_channels * image_size**2 * store.dtype.itemsize / 1e9
    body += (
        f"\n\n{args.encoder} ×2 at {image_size} px, batch {args.batch_size}, {args.workers} "
        f"reader threads, on {device}{' (bf16, channels_last)' if device.type == 'cuda' else ''}; "
        f"store {store.n_cells:,} cells ({store_gb:.2f} GB of pixels), output {out_mb:.0f} MB; "
        f"embed took {timing['seconds']:.1f} s. End to end is "
        f"{end_to_end / model_rate:.0%} of the model-only rate."
    )
    record("Embed rate: store to AnnData", body, enabled=args.record)
    write_json(
        args.json,
        {
            "model_only_cells_per_s": model_rate,
            "end_to_end_cells_per_s": end_to_end,
            "seconds": timing["seconds"],
            "n_cells": timing["n_cells"],
            "peak_rss_gb": child_rss_gb,
            "image_size": image_size,
            "batch_size": args.batch_size,
            "encoder": args.encoder,
        },
    )


if __name__ == "__main__":
    main()
