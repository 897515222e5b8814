"""A lab's first hour: defaults that fit the screen, outputs other tools read, mistakes named.

The cases of the "first hour" issue that are behaviour (wording is left to the messages).
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile

from scbd_cells import baseline, correct, embed, evaluate, export, ingest, open_store, train
from scbd_cells.core.errors import DataError, InputError


def crops(root: Path, *, n: int = 30, ome_names: list[str] | None = None) -> Path:
    """A crops table with 3-channel TIFFs (OME-TIFF with channel names when given)."""
    rng = np.random.default_rng(0)
    (root / "crops").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = rng.integers(1, 1000, size=(3, 8, 8)).astype(np.uint16)
        path = root / f"crops/{i}.ome.tif"
        if ome_names:
            tifffile.imwrite(path, image, metadata={"axes": "CYX", "Channel": {"Name": ome_names}})
        else:
            tifffile.imwrite(path, image)
        rows.append(
            {
                "image_path": f"crops/{i}.ome.tif",
                "gene": ["g1", "g2", "nontargeting"][i % 3],
                "plate": "P1",
                "well": ["A01", "B01"][i % 2],
            }
        )
    pd.DataFrame(rows).to_csv(root / "cells.csv", index=False)
    return root / "cells.csv"


def test_a_misspelled_control_names_the_right_one(tmp_path: Path) -> None:
    table_path = crops(tmp_path)
    table = pd.read_csv(table_path)
    extra = pd.DataFrame({"gene": [f"AAA{i:02d}" for i in range(20)]})  # sort before it
    table = pd.concat([table, table.iloc[:20].assign(gene=extra["gene"])], ignore_index=True)
    table.to_csv(table_path, index=False)
    with pytest.raises(InputError, match="Did you mean 'nontargeting'"):
        ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene",
               control="non-targeting")  # fmt: skip


def test_channel_names_come_from_ome_metadata(tmp_path: Path) -> None:
    table_path = crops(tmp_path, ome_names=["DAPI", "Actin", "Tubulin"])
    result = ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene")
    assert result.channel_names == ["DAPI", "Actin", "Tubulin"]
    assert open_store(tmp_path / "s.zarr").channel_names == ["DAPI", "Actin", "Tubulin"]


def test_baseline_asks_which_channel_holds_the_nuclei(tmp_path: Path) -> None:
    table_path = crops(tmp_path)  # no names anywhere: ch0, ch1, ch2
    ingest(table_path, out=tmp_path / "s.zarr", perturbation_column="gene")
    with pytest.raises(InputError, match="--nucleus-channel"):
        baseline(tmp_path / "s.zarr", out=tmp_path / "b.h5ad")
    assert not (tmp_path / "b.h5ad").exists()
    result = baseline(tmp_path / "s.zarr", out=tmp_path / "b.h5ad", nucleus_channel="ch1")
    adata = ad.read_h5ad(result.out_path)
    assert adata.uns["scbd"]["nucleus_channel"] == "ch1"
    # scanpy's conventions: the PCA in obsm["X_pca"] with uns["pca"], named components
    np.testing.assert_array_equal(adata.obsm["X_pca"], adata.X)
    assert list(adata.var_names[:2]) == ["PC1", "PC2"]
    ratio = adata.uns["pca"]["variance_ratio"]
    assert len(ratio) == adata.n_vars and np.all(np.diff(ratio) <= 1e-6)


@pytest.fixture(scope="module")
def embedded(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("first_hour")
    train(tiny_store, out=out / "run", steps=2, encoder="tiny", classes_per_batch=8,
          cells_per_class=4, z_dim=8, device="cpu", workers=0)  # fmt: skip
    embed(out / "run", tiny_store, out=out / "cells.h5ad", aggregate=True)
    return out


def test_one_var_naming_and_config_as_a_dict(embedded: Path) -> None:
    cells = ad.read_h5ad(embedded / "cells.h5ad")
    assert list(cells.var_names[:2]) == ["z0", "z1"]
    for level in ("guides", "genes"):
        profiles = ad.read_h5ad(embedded / f"{level}.h5ad")
        assert list(profiles.var_names) == list(cells.var_names)
    config = cells.uns["scbd"]["config"]
    assert isinstance(config, dict) and config["encoder"] == "tiny" and config["z_dim"] == 8


def test_evaluate_says_it_needs_cells_not_genes(embedded, tmp_path, write_corum) -> None:
    corum = write_corum(tmp_path / "c.txt", {"c": ["GENE0001", "GENE0002"]})
    with pytest.raises(DataError, match="needs the cell-level file"):
        evaluate([embedded / "genes.h5ad"], corum=corum, out=tmp_path / "r")


def test_a_batch_of_several_columns(embedded: Path, tmp_path: Path, write_corum) -> None:
    cells = embedded / "cells.h5ad"
    genes = sorted(set(ad.read_h5ad(cells).obs["perturbation"].astype(str)) - {"nontargeting"})
    corum = write_corum(tmp_path / "c.txt", {"c1": genes[:3], "c2": genes[3:6]})
    joined = evaluate([cells], corum=corum, out=tmp_path / "joined", batch_key="plate,well",
                      umap=False)  # fmt: skip
    one = evaluate([cells], corum=corum, out=tmp_path / "one", umap=False)  # batch = plate_well
    assert joined.metrics["embeddings"]["cells"]["well_f1"] == pytest.approx(
        one.metrics["embeddings"]["cells"]["well_f1"]
    )
    report = (tmp_path / "one" / "report.md").read_text()  # umap=False: no link to umap.png
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert links and all((tmp_path / "one" / link).is_file() for link in links), links
    corrected = correct(cells, method="center-scale", batch_key="plate,well",
                        out=tmp_path / "centred.h5ad")  # fmt: skip
    assert "plate_well" in ad.read_h5ad(corrected.out_path).obs.columns
    table = export(cells, level="well", batch_key="plate,well", out=tmp_path / "wells.parquet")
    assert table.n_rows == ad.read_h5ad(cells).obs["batch"].nunique()


def test_default_classes_per_batch_fits_a_small_library(tiny_store: Path, tmp_path: Path) -> None:
    """The tiny screen has 17 perturbations: the default 256 becomes all of them, said once."""
    result = train(tiny_store, out=tmp_path / "run", steps=1, encoder="tiny", z_dim=8,
                   device="cpu", workers=0)  # fmt: skip
    n_train = len(set(open_store(tiny_store).obs.query("split == 'train'")["perturbation"]))
    assert result.config.classes_per_batch == n_train
    # a value the user chose is theirs: refused, not changed, and no run folder left
    with pytest.raises(InputError, match="--classes-per-batch 256"):
        train(tiny_store, out=tmp_path / "mine", steps=1, encoder="tiny", classes_per_batch=256,
              device="cpu", workers=0)  # fmt: skip
    assert not (tmp_path / "mine").exists()


def test_best_checkpoint_is_lean_and_follows_the_umask(embedded: Path) -> None:
    import stat

    import torch

    best = torch.load(embedded / "run/checkpoints/best.pt", weights_only=True)
    last = torch.load(embedded / "run/checkpoints/last.pt", weights_only=True)
    assert "optimizer" not in best and "sampler" not in best
    assert {"optimizer", "sampler"} <= set(last) and set(best) < set(last)
    umask = __import__("os").umask(0o022)
    __import__("os").umask(umask)
    for name in ("best.pt", "last.pt"):
        mode = stat.S_IMODE((embedded / "run/checkpoints" / name).stat().st_mode)
        assert mode == 0o666 & ~umask


def test_swapped_embed_arguments_are_named(embedded: Path, tiny_store: Path) -> None:
    with pytest.raises(InputError, match="look swapped.*RUN_DIR STORE"):
        embed(tiny_store, embedded / "run", out=embedded / "swapped.h5ad")
    assert not (embedded / "swapped.h5ad").exists()


def test_quiet_and_verbose_after_the_subcommand(tiny_store: Path) -> None:
    from typer.testing import CliRunner

    from scbd_cells.cli import app

    for flag in ("-q", "--quiet", "-v", "--verbose"):
        result = CliRunner().invoke(app, ["info", str(tiny_store), flag])
        assert result.exit_code == 0, result.output
        assert "cells" in result.output


def test_help_follows_the_conventions() -> None:
    """Upper-case argument names, choices listed, no type shown for on/off flags."""
    from typer.testing import CliRunner

    from scbd_cells.cli import app

    def help_of(*command: str) -> str:
        return CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output

    train_help = help_of("train")
    assert "train [OPTIONS] STORE_PATH" in train_help and "{store_path}" not in train_help
    assert "[resnet18|resnet50|densenet121|small|tiny]" in train_help
    assert " INTEGER " in train_help and " FLOAT " in train_help
    simulate_help = help_of("simulate")
    assert "[tiny|demo|large]" in simulate_help and "OUT_DIR" in simulate_help
    assert "Targeted genes [default: set by --preset]" in simulate_help
    helps = {name: help_of(name) for name in ("info", "ingest", "embed", "evaluate", "correct")}
    for text in [help_of(), train_help, simulate_help, *helps.values()]:
        # no type for on/off flags, upper-case value names, one way of writing defaults
        assert "<" not in text and "[default: False]" not in text and "(default" not in text
    assert "no-decoder]" in train_help  # [default: no-decoder], as click writes --overwrite's
    assert "simulate" not in helps["info"]  # --workers' help is about info's own workers


def test_rates_below_one_per_second_read_as_seconds_per_item() -> None:
    from scbd_cells.core.progress import format_rate

    assert format_rate(0.25, "steps") == "4.0 s/step"
    assert format_rate(3.456, "steps") == "3.5 steps/s"
    assert format_rate(12_345.6, "cells") == "12,346 cells/s"


def test_logs_are_plain_unwrapped_lines_when_piped(tiny_screen: Path, tmp_path: Path) -> None:
    """Through a pipe: one line per message, paths whole, no other library's chatter."""
    import subprocess
    import sys

    out = tmp_path / "a very long folder name that would be wrapped at eighty columns" / "s.zarr"
    completed = subprocess.run(
        [sys.executable, "-m", "scbd_cells", "ingest", str(tiny_screen / "cells.csv"),
         "--out", str(out), "--perturbation-column", "gene", "--guide-column", "guide",
         "--control", "nontargeting"],
        capture_output=True, text=True, cwd=tiny_screen, env={**__import__("os").environ,
                                                             "COLUMNS": "80"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    lines = completed.stderr.splitlines()
    assert any(str(out) in line for line in lines), completed.stderr
    assert all(" INFO " in line or " WARNING " in line for line in lines), completed.stderr


def test_piped_progress_is_a_plain_line_at_most_every_30_s(caplog) -> None:
    """Off a terminal: step count, rate and ETA as a log line, at most every 30 s (fake clock)."""
    import io

    from rich.console import Console

    from scbd_cells.core import progress

    now = [0.0]
    assert not Console(file=io.StringIO()).is_terminal  # what a pipe or a log file looks like
    bar = progress.LogProgress(unit="steps", clock=lambda: now[0])
    task = bar.add_task("Training", total=1000, completed=100)  # a resumed run
    with caplog.at_level("INFO", logger="scbd_cells.core.progress"):
        for _ in range(100):  # 100 steps of 0.5 s: 50 s, so one line at 30 s
            now[0] += 0.5
            bar.advance(task)
            bar.update(task, description="Training [dim]loss 4.2[/]")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["Training loss 4.2: 160/1,000 steps (16 %), 2.0 steps/s, ETA 7 min"]


def test_progress_bar_logs_lines_when_stderr_is_not_a_terminal() -> None:
    from scbd_cells.core import progress

    with progress.progress_bar(unit="cells") as bar:  # pytest captures stderr: not a terminal
        assert isinstance(bar, progress.LogProgress)
    progress.set_quiet(True)
    try:
        with progress.progress_bar(unit="cells") as bar:
            assert not isinstance(bar, progress.LogProgress)
    finally:
        progress.set_quiet(False)


def test_a_cpu_run_planned_for_hours_says_so_early(caplog: pytest.LogCaptureFixture) -> None:
    """The default ResNet-18 run on a laptop: after a few timed steps, the time and a short run."""
    import torch

    from scbd_cells.core.config import TrainConfig
    from scbd_cells.training.loop import _PaceCheck

    now = [0.0]
    pace = _PaceCheck(0, TrainConfig(), device=torch.device("cpu"), is_main=True,
                      clock=lambda: now[0])  # fmt: skip
    with caplog.at_level("WARNING", logger="scbd_cells.training.loop"):
        for step in range(1, 11):
            now[0] += 12.0  # 12 s per step
            pace.check(step)
    [warning] = [record.getMessage() for record in caplog.records]
    assert "about 33.3 h" in warning and "9,993 steps left at 12.0 s/step" in warning
    assert "--steps 50 " in warning and "--encoder small" in warning

    caplog.clear()
    fast = _PaceCheck(0, TrainConfig(steps=300), device=torch.device("cpu"), is_main=True,
                      clock=lambda: now[0])  # fmt: skip
    gpu = _PaceCheck(0, TrainConfig(), device=torch.device("cuda"), is_main=True,
                     clock=lambda: now[0])  # fmt: skip
    with caplog.at_level("WARNING", logger="scbd_cells.training.loop"):
        for step in range(1, 11):
            now[0] += 1.0  # 300 steps of 1 s: 5 minutes, no warning
            fast.check(step)
            gpu.check(step)
    assert caplog.records == []


def test_results_tables_read_at_80_columns() -> None:
    """Every number whole at 80 columns: the field's table is split, never squeezed to 0.…"""
    import io

    from rich.console import Console

    from scbd_cells.evaluation.console import rich_tables
    from scbd_cells.evaluation.pages import FIELD_COLUMNS

    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.uniform(size=(3, len(FIELD_COLUMNS) - 1)),
                         columns=[c for c, _, _ in FIELD_COLUMNS[1:]])  # fmt: skip
    table.insert(0, "embedding", ["scbd_alpha0_a_long_name", "baseline_harmony", "scbd"])
    table.loc[1, "kbet"] = np.nan
    views = rich_tables("The field's metrics", table, FIELD_COLUMNS, arrows=False, width=80)
    assert len(views) > 1
    out = io.StringIO()
    console = Console(file=out, width=80)
    for view in views:
        console.print(view)
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for _, row in table.iterrows():  # every value, formatted, on the embedding's line
        name = f"│ {row['embedding']} "
        assert sum(line.startswith(name) for line in text.splitlines()) == len(views)
        for column, _, fmt in FIELD_COLUMNS[1:]:
            if row[column] == row[column]:
                assert format(row[column], fmt) in text


def test_result_lines_keep_paths_whole_at_80_columns(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scbd_cells.cli import app

    out = tmp_path / "a folder name long enough to be wrapped at eighty columns" / "screen"
    result = CliRunner().invoke(app, ["simulate", str(out), "--preset", "tiny", "--n-genes", "4",
                                      "--n-complexes", "2"], env={"COLUMNS": "80"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert str(out / "cells.csv") in result.stdout


def test_did_you_mean_for_choices_and_column_names(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scbd_cells.cli import app
    from scbd_cells.data.store import did_you_mean

    result = CliRunner().invoke(app, ["correct", "x.h5ad", "--method", "harmoni", "--out", "y"])
    assert result.exit_code == 2 and "Did you mean 'harmony'?" in result.output

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"perturbation": ["g1", "g2"] * 10, "well": ["A01"] * 10 + ["B01"] * 10},
                       index=[f"c{i}" for i in range(20)])  # fmt: skip
    cells = ad.AnnData(rng.normal(size=(20, 3)).astype(np.float32), obs=obs)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(DataError, match="Did you mean 'well'"):
        correct(tmp_path / "cells.h5ad", method="center-scale", batch_key="wel",
                out=tmp_path / "c.h5ad")  # fmt: skip
    # another tool's prefixed names (pycytominer, CellProfiler)
    assert "'Metadata_Plate'" in did_you_mean("plate", ["Metadata_Plate", "Metadata_Well"])


def test_decoder_sized_to_the_encoder_and_counts_printed_apart() -> None:
    """small's decoder is not the paper's 9 M parameters; counts are per part, never 0.0 M."""
    from scbd_cells.core.config import TrainConfig
    from scbd_cells.model.encoders import count_parameters
    from scbd_cells.model.scbd import SCBDModel, default_decoder_width
    from scbd_cells.training.loop import _parameter_counts

    assert TrainConfig().decoder_width is None  # sized when the run is set up
    assert default_decoder_width("small", 32) == default_decoder_width("tiny", 32) == 32
    assert default_decoder_width("resnet18", 64) == 256  # the paper's
    assert default_decoder_width("resnet18", 32) == 128
    model = SCBDModel({"encoder": "small", "decoder": True, "decoder_width": 32})
    decoder = count_parameters(model.decoder_perturbation) + count_parameters(model.decoder_batch)
    paper = SCBDModel({"encoder": "small", "decoder": True, "decoder_width": 256})
    assert decoder < 200_000 < 2 * count_parameters(paper.decoder_batch)  # 0.16 M, not 9 M
    encoder = count_parameters(model.encoder_perturbation)
    text = _parameter_counts(model)
    assert f"encoders 2 x {encoder / 1e3:.3g} k" in text and "decoder 2 x" in text
    assert "0.0 M" not in text
