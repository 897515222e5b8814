"""Small stores the tests build: one recipe, shared (import with ``from stores import ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scbd_cells.data.store import create_store


def well_store(
    path: Path,
    *,
    n_wells: int = 4,
    cells_per_well: int = 6,
    seed: int = 0,
    control: str | None = None,
    chunk_cells: int | None = None,
) -> Path:
    """8 perturbations x ``n_wells`` wells x ``cells_per_well`` cells, 2-channel 12 px uint16.

    Each well adds its own brightness (1000 + 200 x well) and each perturbation a bright
    square whose channel and strength it sets, so both the well and the perturbation can be
    learned in a few steps. With ``control`` the first perturbation carries that label.
    Split 70/15/15 %, seeded.
    """
    rng = np.random.default_rng(seed)
    rows, images = [], []
    for perturbation in range(8):
        gene = control if control and perturbation == 0 else f"gene_{perturbation}"
        for well in range(n_wells):
            for cell in range(cells_per_well):
                image = rng.normal(1000 + 200 * well, 50, size=(2, 12, 12))
                image[perturbation % 2, 3:9, 3:9] += 300 * (perturbation // 2)
                images.append(image.clip(0, 65535).astype(np.uint16))
                rows.append(
                    {
                        "cell_id": f"p{perturbation}_w{well}_{cell}",
                        "gene": gene,
                        "plate": "plate_1",
                        "well": f"W{well}",
                    }
                )
    create_store(
        path,
        images=np.stack(images),
        obs=pd.DataFrame(rows),
        channel_names=["dna", "actin"],
        perturbation_column="gene",
        control=control,
        split_fractions=(0.7, 0.15, 0.15),
        seed=seed,
        **({"chunk_cells": chunk_cells} if chunk_cells else {}),
    )
    return path


# Training options small enough for a test: two tiny encoders, 6 x 4 cells a batch.
FAST = {
    "encoder": "tiny",
    "classes_per_batch": 6,
    "cells_per_class": 4,
    "val_batches": 1,
    "log_every": 2,
    "workers": 0,
    "device": "cpu",
    "z_dim": 8,
}


def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Run ``scbd-cells ARGS`` in this process through the real entry point."""
    from scbd_cells.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["scbd-cells", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err
