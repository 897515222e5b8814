"""Benchmark: the cost of one training step with the ImageNet stem and the small-image stem.

``train --stem small`` keeps a 32 px crop at 32x32 through the first stage of a ResNet
(the ImageNet stem shrinks it to 8x8), so every later stage sees 16 times the positions.
This measures what that costs: forward + SCBD loss + backward + AdamW on one batch already
in memory (no loader), both encoders, per stem, alternating the stems run by run so that a
machine shared with other work slows both alike. Wall time and the process's CPU time
(all its threads) are both reported: on a shared machine the CPU seconds are the better
guide. Examples::

    python benchmarks/stem_step.py                                 # ResNet-18, 320 x 32 px, CPU
    python benchmarks/stem_step.py --device cuda --batch 2048 --steps 20 --record
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import add_json_argument, markdown_table, peak_rss_gb, record, write_json

from scbd_cells.model.losses import scbd_loss
from scbd_cells.model.scbd import SCBDModel, run_model

STEMS = ("imagenet", "small")


def step_seconds(args, stem: str, device: torch.device) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each timed step (after one untimed warm-up step), one stem."""
    torch.manual_seed(0)
    model = SCBDModel(
        {"encoder": args.encoder, "in_channels": args.channels, "image_size": args.image_size,
         "z_dim": 64, "stem": stem}
    ).to(device)  # fmt: skip
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(
        args.batch, args.channels, args.image_size, args.image_size, generator=generator
    ).to(device)  # (B, C, S, S), as after preprocessing
    perturbation = torch.randint(0, 32, (args.batch,), generator=generator).to(device)
    batch = torch.randint(0, 12, (args.batch,), generator=generator).to(device)
    seconds = []
    for index in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started, started_cpu = time.perf_counter(), time.process_time()
        output = run_model(model, images)
        loss = scbd_loss(
            output.z_perturbation.float(), output.z_batch.float(), perturbation=perturbation,
            batch=batch, batch_target=batch, alpha=1.0, temperature=0.1,
        ).total  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index:  # the first step allocates and warms the kernels
            seconds.append((time.perf_counter() - started, time.process_time() - started_cpu))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch", type=int, default=320)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stem and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two stems")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record", action="store_true", help="append to performance-log.md")
    add_json_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    times: dict[str, list[tuple[float, float]]] = {stem: [] for stem in STEMS}
    for _ in range(args.rounds):
        for stem in STEMS:
            times[stem] += step_seconds(args, stem, device)
    wall = {stem: statistics.median(w for w, _ in values) for stem, values in times.items()}
    cpu = {stem: statistics.median(c for _, c in values) for stem, values in times.items()}
    rows = [
        [stem, wall[stem], min(w for w, _ in times[stem]), max(w for w, _ in times[stem]),
         wall[stem] / wall["imagenet"], cpu[stem], cpu[stem] / cpu["imagenet"]]
        for stem in STEMS
    ]  # fmt: skip
    body = markdown_table(
        ["stem", "wall s/step (median)", "fastest", "slowest", "wall vs imagenet",
         "CPU s/step (median)", "CPU vs imagenet"],
        rows,
    )  # fmt: skip
    body += (
        f"\n\n{args.encoder} ×2, batch {args.batch} at {args.image_size} px, {args.channels} "
        f"channels: forward + SCBD loss + backward + AdamW on a batch in memory, "
        f"{args.steps} timed steps per stem in each of {args.rounds} alternating rounds, on "
        f"{device} ({args.threads} threads). Peak RSS {peak_rss_gb():.2f} GB."
    )
    record("Training step: ImageNet stem vs small-image stem", body, enabled=args.record)
    write_json(args.json, {f"{stem}_s_per_step": wall[stem] for stem in STEMS})


if __name__ == "__main__":
    main()
