"""How low can the perturbation SupCon loss go on a simulated screen? A ceiling from the truth.

The simulator draws each cell's morphology as ``N(0, I) + shift`` over ten parameters
(``scbd_cells.sim.screen.MORPHOLOGY``), where ``shift`` is its gene's effect if the cell
was edited. An encoder can at best recover those parameters, so the appendix-B SupCon
loss of an embedding *of the true parameters* bounds from below what training can reach
per cell (pixels, rendering and well effects only lose information; the parameters are
Gaussian with a shared covariance, so a linear read-out is close to the best one).

The loss keeps the anchor's own similarity in the softmax, so a spread-out embedding
without class structure scores about 1 / temperature = 10, and a collapsed one log B.
The best embedding of weak signal is therefore *nearly* collapsed: a common direction
plus the parameters scaled by a small ``s``. This script scans ``s`` and reports the
minimum, for the demo preset at several effect strengths::

    python examples/supcon_ceiling.py --strengths 1 1.5 2 3

The numbers are quoted in docs/simulator.md and docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from scbd_cells.model.losses import supcon_loss
from scbd_cells.sim.screen import PRESETS, _design

SCALES = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def latent_cells(strength: float, *, preset: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell true morphology parameters and gene codes of a simulated screen's design."""
    params = dataclasses.replace(PRESETS[preset], effect_strength=strength)
    design = _design(params, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    edited = rng.random(design.cell_guide.size) < design.guide_efficacy[design.cell_guide]
    genes = design.guide_gene[design.cell_guide]
    shift = design.gene_effects[genes] * edited[:, None]
    return rng.standard_normal(shift.shape) + shift, genes


def mean_supcon(
    z: np.ndarray,
    labels: np.ndarray,
    *,
    classes_per_batch: int,
    cells_per_class: int,
    n_batches: int,
    seed: int,
) -> float:
    """Appendix-B SupCon averaged over class-balanced batches drawn without replacement."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = {k: np.flatnonzero(labels == k) for k in classes}
    losses = []
    for _ in range(n_batches):
        drawn = rng.choice(classes, classes_per_batch, replace=False)
        rows = np.concatenate(
            [rng.choice(by_class[k], cells_per_class, replace=False) for k in drawn]
        )
        losses.append(
            supcon_loss(
                torch.from_numpy(z[rows]).float(), torch.from_numpy(labels[rows]), temperature=0.1
            ).item()
        )
    return float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--classes-per-batch", type=int, default=16)
    parser.add_argument("--cells-per-class", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    batch_size = args.classes_per_batch * args.cells_per_class
    print(f"preset {args.preset}, batches {args.classes_per_batch} x {args.cells_per_class}; ")
    print(f"collapsed embedding: log {batch_size} = {np.log(batch_size):.4f}\n")
    print("| effect strength | best SupCon of the true parameters | at s | below log B |")
    print("|---|---|---|---|")
    for strength in args.strengths:
        latent, genes = latent_cells(strength, preset=args.preset, seed=args.seed)
        results = []
        for scale in SCALES:
            z = np.concatenate([np.ones((len(latent), 1)), scale * latent], axis=1)
            z /= np.linalg.norm(z, axis=1, keepdims=True)
            loss = mean_supcon(
                z,
                genes,
                classes_per_batch=args.classes_per_batch,
                cells_per_class=args.cells_per_class,
                n_batches=args.batches,
                seed=args.seed,
            )
            results.append((loss, scale))
        loss, scale = min(results)
        print(f"| {strength:g} | {loss:.3f} | {scale:g} | {np.log(batch_size) - loss:.3f} |")


if __name__ == "__main__":
    main()
