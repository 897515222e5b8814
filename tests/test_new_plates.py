"""The new-plate workflow of docs/new-plates.md, end to end on ``tiny``: train on some plates,
ingest a held-out plate into its own store, embed it with its own per-well statistics, and
evaluate it beside and together with the training plates."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from scbd_cells.cli import app
from scbd_cells.data import schema
from scbd_cells.data.batch_stats import batch_channel_stats
from scbd_cells.data.store import open_store
from scbd_cells.training.checkpoint import load_trained

INGEST = [
    "--perturbation-column", "gene", "--guide-column", "guide", "--control", "nontargeting",
    "--channel-names", "dna_damage,actin,dna,microtubules", "--resize", "32",
]  # fmt: skip
TRAIN = [
    "--encoder", "tiny", "--steps", "4", "--classes-per-batch", "8", "--cells-per-class", "4",
    "--val-every", "2", "--z-dim", "8", "--workers", "0", "--device", "cpu",
]  # fmt: skip


def _run(arguments: list[str]) -> None:
    result = CliRunner().invoke(app, ["-q", *arguments])
    assert result.exit_code == 0, (arguments, result.output, result.exception)


@pytest.mark.slow
def test_new_plate_workflow(tmp_path: Path) -> None:
    screen = tmp_path / "screen"
    _run(["simulate", str(screen), "--preset", "tiny", "--plates", "3", "--holdout-plates", "1"])
    truth = json.loads((screen / "truth.json").read_text())
    assert truth["holdout"]["plates"] == ["plate3"]

    # Train on plates 1-2 only: ingest takes a table, so filter the table (docs/new-plates.md).
    table = pd.read_csv(screen / "cells.csv")
    new_plates = truth["holdout"]["plates"]
    table[~table["plate"].isin(new_plates)].to_csv(screen / "train_plates.csv", index=False)
    table[table["plate"].isin(new_plates)].to_csv(screen / "new_plate.csv", index=False)
    train_store, new_store = tmp_path / "train_plates.zarr", tmp_path / "new_plate.zarr"
    _run(["ingest", str(screen / "train_plates.csv"), "--out", str(train_store), *INGEST])
    _run(["ingest", str(screen / "new_plate.csv"), "--out", str(new_store), *INGEST])
    run_dir = tmp_path / "runs" / "train_plates"
    _run(["train", str(train_store), "--out", str(run_dir), *TRAIN])
    assert set(open_store(train_store).obs["plate"]) == {"plate1", "plate2"}

    embeddings = tmp_path / "embeddings"
    old_path = embeddings / "train_plates" / "cells.h5ad"
    new_path = embeddings / "new_plate" / "cells.h5ad"
    _run(["embed", str(run_dir), str(train_store), "--out", str(old_path), "--aggregate"])
    before = ad.read_h5ad(old_path).X.copy()
    _run(["embed", str(run_dir), str(new_store), "--out", str(new_path), "--aggregate"])
    assert (new_path.parent / "genes.h5ad").exists()

    # The new plate's wells are standardised with their own statistics (never seen in
    # training), computed from the new store; the training plates keep the saved ones.
    trained = load_trained(run_dir, device="cpu")
    store = open_store(new_store)
    stats = batch_channel_stats(store)
    codes, labels = store.codes(schema.BATCH)
    mean, std = stats.rows_for(labels)
    rows = np.array([0, 17, store.n_cells - 1])
    pixels = store.read(rows).astype(np.float32)
    by_hand = (pixels - mean[codes[rows]][:, :, None, None]) / std[codes[rows]][:, :, None, None]
    assert not set(labels) & set(trained.batch_stats.labels)  # wells the model never saw
    with torch.inference_mode():
        expected = trained.model(torch.from_numpy(by_hand.astype(np.float32))).z_perturbation
    new_cells = ad.read_h5ad(new_path)
    np.testing.assert_allclose(new_cells.X[rows], expected.numpy(), atol=1e-5)
    assert set(new_cells.obs["plate"]) == {"plate3"} and new_cells.obs["holdout"].all()

    # Evaluate side by side, and together (one file, every well of old and new plates).
    complexes = str(screen / "complexes.txt")
    side = tmp_path / "report_side_by_side"
    _run(
        [
            "evaluate", str(old_path), str(new_path), "--label", "train_plates",
            "--label", "new_plate", "--corum", complexes, "--out", str(side),
        ]
    )  # fmt: skip
    metrics = json.loads((side / "metrics.json").read_text())["embeddings"]
    assert list(metrics) == ["train_plates", "new_plate"]
    assert metrics["new_plate"]["n_cells"] == len(table[table["plate"] == "plate3"])
    assert metrics["new_plate"]["well_f1_chance"] == pytest.approx(0.5, abs=0.02)  # 2 wells

    together = ad.concat(
        {"train_plates": ad.read_h5ad(old_path), "new_plate": ad.read_h5ad(new_path)},
        label="source",
        index_unique="-",
    )
    together.write_h5ad(embeddings / "all_plates.h5ad")
    report = tmp_path / "report_together"
    _run(
        [
            "evaluate", str(embeddings / "all_plates.h5ad"), "--corum", complexes,
            "--control", "nontargeting", "--out", str(report),
            "--holdout-key", "plate", "--holdout-batches", "plate3",
        ]
    )  # fmt: skip
    written = json.loads((report / "metrics.json").read_text())
    combined = written["embeddings"]["all_plates"]
    assert combined["n_cells"] == len(table)
    assert combined["well_f1_chance"] == pytest.approx(1 / 6, abs=0.02)  # all six wells
    # the held-out plate apart: its CORUM is the side-by-side new_plate file's, computed from
    # the same cells by the other path; its wells are two; held out vs rest is two-way
    held = written["holdout"]["embeddings"]["all_plates"]
    assert written["holdout"]["column"] == "plate" and written["holdout"]["values"] == ["plate3"]
    assert held["n_heldout_cells"] == metrics["new_plate"]["n_cells"]
    assert held["heldout_corum_auprc"] == pytest.approx(metrics["new_plate"]["corum_auprc"])
    assert held["heldout_well_f1_chance"] == pytest.approx(0.5, abs=0.02)
    assert 0 <= held["heldout_vs_rest_f1"] <= 1 and 0 <= held["heldout_ilisi"] <= 1
    assert "## Held-out batches" in (report / "report.md").read_text()
    assert "Held-out batches" in (report / "report.html").read_text()

    # Earlier profiles never move: embedding the training plates again gives the same z_c.
    again = embeddings / "again.h5ad"
    _run(["embed", str(run_dir), str(train_store), "--out", str(again)])
    np.testing.assert_array_equal(ad.read_h5ad(again).X, before)

    # The conventional comparator, without refitting: the baseline of the new plate in the
    # training baseline's space, mapped onto Harmony fitted on the training plates.
    base_train, base_new = tmp_path / "baseline_train.h5ad", tmp_path / "baseline_new.h5ad"
    harmony_train, harmony_new = tmp_path / "harmony_train.h5ad", tmp_path / "harmony_new.h5ad"
    _run(["baseline", str(train_store), "--out", str(base_train)])
    _run(["correct", str(base_train), "--method", "harmony", "--out", str(harmony_train)])
    fitted = ad.read_h5ad(harmony_train).X.copy()
    _run(["baseline", str(new_store), "--reference", str(base_train), "--out", str(base_new)])
    _run(
        [
            "correct", str(base_new), "--method", "harmony", "--reference", str(harmony_train),
            "--out", str(harmony_new),
        ]
    )  # fmt: skip
    mapped = ad.read_h5ad(harmony_new)
    assert mapped.n_obs == metrics["new_plate"]["n_cells"] and np.isfinite(mapped.X).all()
    np.testing.assert_array_equal(ad.read_h5ad(harmony_train).X, fitted)
    # a baseline fitted on the new plate alone is another space: refused, not mapped
    own = tmp_path / "baseline_own.h5ad"
    _run(["baseline", str(new_store), "--out", str(own)])
    refused = CliRunner().invoke(
        app, ["correct", str(own), "--method", "harmony", "--reference", str(harmony_train),
              "--out", str(tmp_path / "refused.h5ad")],
    )  # fmt: skip
    assert refused.exit_code == 1 and "baseline NEW.zarr --reference" in str(refused.exception)
