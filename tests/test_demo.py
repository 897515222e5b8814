"""demo end to end on the tiny preset: every output, scanpy on the profiles, same table twice."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

from scbd_cells.core.errors import InputError
from scbd_cells.pipeline import demo


@pytest.mark.slow
def test_demo_twice_same_table(tmp_path: Path) -> None:
    import scanpy as sc
    import torch

    torch.set_num_threads(2)
    first = demo(out=tmp_path / "a", preset="tiny", steps=2, device="cpu", workers=1)
    report = tmp_path / "a" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert list(metrics["embeddings"]) == [
        "scbd", "scbd_alpha0", "baseline", "baseline_per_well", "baseline_harmony"
    ]  # fmt: skip
    assert metrics["embeddings"]["scbd"]["overall"] is not None
    assert {p.name for p in report.iterdir()} >= {"metrics.json", "corum_pr.csv", "report.md"}
    # the SCBD model's pictures, one swap grid linked from the report
    assert (tmp_path / "a" / "reconstruct" / "swap_well.png").exists()
    assert "](../reconstruct/swap_well.png)" in (report / "report.md").read_text()
    assert first.pictures_dir == tmp_path / "a" / "reconstruct"
    genes = ad.read_h5ad(tmp_path / "a" / "embeddings" / "scbd" / "genes.h5ad")
    assert genes.n_obs == 16 and genes.obs["n_cells"].gt(0).all()
    sc.pp.neighbors(genes, use_rep="X", n_neighbors=5)
    sc.tl.umap(genes, random_state=0)
    assert genes.obsm["X_umap"].shape == (16, 2)

    second = demo(out=tmp_path / "b", preset="tiny", steps=2, device="cpu", workers=1)
    pd.testing.assert_frame_equal(first.table, second.table)
    with pytest.raises(InputError, match="Pass --overwrite"):
        demo(out=tmp_path / "a", preset="tiny", steps=2, device="cpu")
