"""evaluate: report files and keys, names, atomic output, and the bad inputs of DESIGN.md."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.evaluation.report import METRIC_KEYS, evaluate

COMPLEXES = {"cA": ["g0", "g1", "g2", "g3"], "cB": ["g4", "g5", "g6"], "cC": ["g7", "g8", "g9"]}


def _cells(path: Path, *, biology: float, well: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(12)] + ["nontargeting"]
    n = 1300
    gene = np.array(genes)[np.arange(n) % len(genes)]
    batch = np.array(["w1", "w2", "w3", "w4"])[rng.integers(0, 4, n)]
    centre = {g: rng.normal(size=16) for g in genes}
    for members in COMPLEXES.values():
        shared = rng.normal(size=16)
        for g in members:
            centre[g] = centre[g] + 2 * shared
    centre["nontargeting"] = np.zeros(16)
    well_shift = {w: rng.normal(size=16) for w in ["w1", "w2", "w3", "w4"]}
    x = rng.normal(size=(n, 16))
    x += biology * np.stack([centre[g] for g in gene]) + well * np.stack(
        [well_shift[b] for b in batch]
    )
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(gene),
            "guide": [f"{g}_{i % 3}" for i, g in enumerate(gene)],
            "batch": pd.Categorical(batch),
        },
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs, obsm={"alt": x[:, :8].astype(np.float32)})
    adata.write_h5ad(path)
    return path


@pytest.fixture
def corum_file(tmp_path: Path, write_corum) -> Path:
    return write_corum(tmp_path / "complexes.txt", COMPLEXES)


def test_report(tmp_path: Path, corum_file: Path) -> None:
    good = _cells(tmp_path / "good.h5ad", biology=1.0, well=0.0)
    bad = _cells(tmp_path / "bad.h5ad", biology=0.0, well=2.0, seed=1)
    result = evaluate([good, bad], corum=corum_file, out=tmp_path / "report", max_cells=1000)
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == [
        ".scbd-cells.json",  # the marker: these files are scbd-cells' to replace
        "corum_pr.csv", "corum_pr.png", "map_activity.csv", "map_consistency.csv",
        "metrics.json", "report.html", "report.md", "tradeoff.png", "umap.png", "well_f1.png",
    ]  # fmt: skip
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics["embeddings"]) == {"good", "bad"}
    assert all(set(METRIC_KEYS) <= set(m) for m in metrics["embeddings"].values())
    design_keys = {
        "corum_auprc", "corum_recall_5_95", "well_f1", "well_f1_chance", "n_genes", "n_cells",
        "map_activity", "fraction_active", "map_consistency", "fraction_consistent",
        "corum_recall_10_90", "ilisi", "silhouette_batch", "graph_connectivity", "kbet",
        "silhouette_label", "leiden_nmi", "leiden_ari", "overall",
    }  # fmt: skip
    assert design_keys <= set(METRIC_KEYS)
    good_m, bad_m = metrics["embeddings"]["good"], metrics["embeddings"]["bad"]
    assert good_m["corum_auprc"] > bad_m["corum_auprc"]
    assert bad_m["well_f1"] > 2 * bad_m["well_f1_chance"]
    assert good_m["well_f1"] < 1.5 * good_m["well_f1_chance"]
    assert good_m["n_genes"] == 10 and good_m["n_cells"] == 1300
    # the field's metrics agree with the paper's on which embedding is better
    for key in ("map_activity", "map_consistency", "ilisi", "kbet", "silhouette_label"):
        assert good_m[key] > bad_m[key], key
    assert good_m["overall"] == 1.0 and bad_m["overall"] == 0.0  # min-max over two
    at_90 = pd.read_csv(tmp_path / "report" / "corum_pr.csv").query(
        "embedding == 'good' and percentile == 90"
    )
    assert good_m["corum_recall_10_90"] == at_90["recall"].item() >= good_m["corum_recall_5_95"]
    assert good_m["n_mixing_cells"] == 1300
    provenance = metrics["provenance"]
    assert provenance["scbd_cells_version"] and provenance["created"]
    assert provenance["inputs"]["good"]["bytes"] == good.stat().st_size
    assert provenance["complexes"]["bytes"] == corum_file.stat().st_size
    activity = pd.read_csv(tmp_path / "report" / "map_activity.csv")
    assert list(activity.columns) == [
        "embedding", "perturbation", "mean_average_precision", "p_value", "corrected_p_value",
        "retrieved",
    ]  # fmt: skip
    assert len(activity) == 2 * 12
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and 'src="http' not in page
    assert "Provenance" in page and "good" in page
    text = result.report_path.read_text()
    assert "| overall ↑ |" in text and "## Provenance" in text
    curve = pd.read_csv(tmp_path / "report" / "corum_pr.csv")
    assert list(curve.columns) == ["embedding", "percentile", "precision", "recall"]
    assert len(curve) == 40
    assert "| good |" in result.report_path.read_text()
    again = evaluate(
        [good, bad], corum=corum_file, out=tmp_path / "again", max_cells=1000, umap=False
    )
    pd.testing.assert_frame_equal(result.table, again.table)

    keyed = evaluate([good], corum=corum_file, out=tmp_path / "keyed", keys=["alt"], umap=False)
    assert keyed.metrics["embeddings"]["good:alt"]["overall"] is None  # one embedding: no rank
    assert list(keyed.metrics["embeddings"]) == ["good:alt"]
    labelled = evaluate(
        [good], corum=corum_file, out=tmp_path / "lab", labels=["mine"], umap=False
    )
    assert list(labelled.table["embedding"]) == ["mine"]


def test_undefined_field_metric_is_null(tmp_path: Path, corum_file: Path) -> None:
    """Each gene in one well only (an arrayed plate): activity mAP is undefined, not fatal."""
    cells = ad.read_h5ad(_cells(tmp_path / "good.h5ad", biology=1.0, well=0.0))
    genes = cells.obs["perturbation"].astype(str)
    wells = {g: f"w{i % 4}" for i, g in enumerate(sorted(genes.unique()))}
    cells.obs["batch"] = pd.Categorical(genes.map(wells))
    cells.write_h5ad(tmp_path / "arrayed.h5ad")
    result = evaluate(
        [tmp_path / "arrayed.h5ad", tmp_path / "good.h5ad"], corum=corum_file,
        out=tmp_path / "report", umap=False,
    )  # fmt: skip
    arrayed = result.metrics["embeddings"]["arrayed"]
    assert arrayed["map_activity"] is None and arrayed["fraction_active"] is None
    assert arrayed["map_consistency"] is not None and arrayed["corum_auprc"] > 0
    assert arrayed["overall"] is not None  # the undefined metric is left out for both rows


def test_bad_inputs_leave_nothing(tmp_path: Path, corum_file: Path, entries) -> None:
    good = _cells(tmp_path / "good.h5ad", biology=1.0, well=0.0)
    other = tmp_path / "other.txt"
    other.write_text("x\tZZ1 ZZ2\n")
    with pytest.raises(DataError, match="shares 0 gene"):
        evaluate([good], corum=other, out=tmp_path / "r1")
    with pytest.raises(DataError, match="control label 'NTC'"):
        evaluate([good], corum=corum_file, out=tmp_path / "r2", control="NTC")
    nobatch = ad.read_h5ad(good)
    del nobatch.obs["batch"]
    nobatch.write_h5ad(tmp_path / "nobatch.h5ad")
    with pytest.raises(DataError, match="no batch column 'batch'"):
        evaluate([tmp_path / "nobatch.h5ad"], corum=corum_file, out=tmp_path / "r3")
    with pytest.raises(InputError, match="does not exist"):
        evaluate([tmp_path / "missing.h5ad"], corum=corum_file, out=tmp_path / "r4")
    assert entries(tmp_path) == [
        "complexes.txt",
        "good.h5ad",
        "nobatch.h5ad",
        "other.txt",
    ]
    (tmp_path / "r5").mkdir()
    (tmp_path / "r5" / "keep").write_text("")
    with pytest.raises(InputError, match="not a scbd-cells report folder"):
        evaluate([good], corum=corum_file, out=tmp_path / "r5", overwrite=True)
    assert entries(tmp_path / "r5") == ["keep"]


def test_cli_bad_complexes_exit_code(tmp_path: Path) -> None:
    """Through the command line: exit 1, the message, no traceback, no report folder."""
    import subprocess
    import sys

    good = _cells(tmp_path / "good.h5ad", biology=1.0, well=0.0)
    other = tmp_path / "other.txt"
    other.write_text("x\tZZ1 ZZ2\n")
    result = subprocess.run(
        [sys.executable, "-m", "scbd_cells", "evaluate", str(good), "--corum", str(other),
         "--out", str(tmp_path / "report")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "shares 0 gene" in result.stderr
    assert not (tmp_path / "report").exists()
