"""CORUM score of the simulator's true gene effects: a reference for the demo's table.

The simulated screen's ``truth.json`` holds each gene's true effect vector (its
shift of the ten morphology parameters). Scoring those vectors with the same
CORUM protocol as ``scbd-cells evaluate`` (standardised components, cosine,
percentile thresholds) tells how far the protocol can go on *perfect* profiles
in that geometry — and, with small noise on the genes without effect, how much
of the score those genes cost: their identical zero vectors tie at cosine 1.

Usage::

    scbd-cells simulate screen --preset demo        # or the demo's out/screen
    python examples/truth_reference.py screen
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from scbd_cells.evaluation.complexes import read_complexes
from scbd_cells.evaluation.corum import corum_pr


def standardised(profiles: np.ndarray) -> np.ndarray:
    std = profiles.std(axis=0)
    return (profiles - profiles.mean(axis=0)) / np.where(std > 0, std, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("screen", type=Path, help="a folder written by scbd-cells simulate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tie-breaking noise")
    args = parser.parse_args()
    truth = json.loads((args.screen / "truth.json").read_text())
    complexes = read_complexes(args.screen / "complexes.txt")
    genes = [gene for gene in truth["genes"] if gene != truth["control"]]
    effects = np.array(
        [[truth["genes"][gene]["effect"][axis] for axis in truth["morphology"]] for gene in genes]
    )  # (n_genes, 10)
    no_effect = ~effects.any(axis=1)
    in_file = set(complexes.genes)
    print(
        f"{len(genes)} genes, {int(no_effect.sum())} without effect "
        f"({sum(g in in_file for g, z in zip(genes, no_effect, strict=True) if z)} of them in "
        "complexes)"
    )
    result = corum_pr(standardised(effects), genes, complexes)
    print(f"true effect vectors:      AUPRC {result.auprc:.3f}, recall {result.recall_5_95:.3f}")
    rng = np.random.default_rng(args.seed)
    for scale in (1e-3, 0.1, 0.3):
        noisy = effects + no_effect[:, None] * rng.normal(0, scale, effects.shape)
        result = corum_pr(standardised(noisy), genes, complexes)
        print(
            f"ties broken (noise {scale:g} on the no-effect genes): AUPRC {result.auprc:.3f}, "
            f"recall {result.recall_5_95:.3f}"
        )


if __name__ == "__main__":
    main()
