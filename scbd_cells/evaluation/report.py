"""Evaluate: the paper's two tasks and the field's metrics for embeddings side by side, as a report.

``evaluate`` reads every embedding first (so a bad input fails before any work),
computes the metrics (CORUM and well F1, the paper's; mAP, batch mixing, biology and the
overall score, the JUMP benchmark's: :mod:`scbd_cells.evaluation.benchmark`), then writes
the report into a temporary folder beside ``out`` and moves its files into place: a failed
run leaves no partial report. An earlier report in ``out`` is replaced file by file (those
its marker lists); anything else a person keeps in the folder stays.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.core.outputs import (
    check_output,
    locks_output,
    publish,
    remove_owned,
    remove_temporary,
    temporary_name,
    write_marker,
)
from scbd_cells.core.progress import progress_bar
from scbd_cells.data import schema
from scbd_cells.data.store import did_you_mean
from scbd_cells.evaluation.benchmark import (
    BENCHMARK_KEYS,
    BenchmarkResult,
    BenchmarkSettings,
    benchmark_metrics,
)
from scbd_cells.evaluation.cells import check_values
from scbd_cells.evaluation.complexes import Complexes, read_complexes
from scbd_cells.evaluation.corum import DEFAULT_PERCENTILES, CorumResult, corum_pr
from scbd_cells.evaluation.holdout import HOLDOUT_KEYS, Holdout, holdout_metrics
from scbd_cells.evaluation.map import DEFAULT_MAX_REPLICATES, DEFAULT_NULL_SIZE
from scbd_cells.evaluation.mixing import DEFAULT_MIXING_CELLS
from scbd_cells.evaluation.moa import MOA_KEYS, MoaSettings, moa_metrics
from scbd_cells.evaluation.overall import overall_scores
from scbd_cells.evaluation.pages import (
    ReportExtras,
    field_markdown,
    holdout_markdown,
    markdown_table,
    moa_markdown,
    paper_columns,
    write_extras,
)
from scbd_cells.evaluation.provenance import input_provenance, report_provenance
from scbd_cells.evaluation.well_probe import BatchF1, batch_prediction_f1, subsample
from scbd_cells.profiles.aggregate import aggregate_profiles
from scbd_cells.profiles.cells import Cells, close_all, open_cells, read_rows
from scbd_cells.profiles.profile_tables import check_profile_columns, is_profile_table
from scbd_cells.profiles.replicates import batch_column

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "corum_auprc",
    "corum_recall_5_95",
    "well_f1",
    "well_f1_chance",
    "n_genes",
    "n_cells",
    "corum_recall_10_90",
    *BENCHMARK_KEYS,
    "batch_score",
    "bio_score",
    "overall",
)
DEFAULT_MAX_CELLS = 50_000


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` measured and where it wrote the report.

    Attributes
    ----------
    metrics
        The content of ``metrics.json``.
    table
        One row per embedding: ``embedding`` and the :data:`METRIC_KEYS`.
    out_dir
        The report folder.
    report_path
        ``out_dir / "report.md"``.
    """

    metrics: dict[str, Any]
    table: pd.DataFrame
    out_dir: Path
    report_path: Path


@locks_output("out")
def evaluate(
    embedding_paths: list[str | Path],
    *,
    corum: str | Path,
    out: str | Path,
    keys: list[str] | None = None,
    labels: list[str] | None = None,
    control: str | None = None,
    perturbation_key: str = schema.PERTURBATION,
    guide_key: str = schema.GUIDE,
    batch_key: str = schema.BATCH,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    mixing_cells: int | None = DEFAULT_MIXING_CELLS,
    max_replicates: int | None = DEFAULT_MAX_REPLICATES,
    null_size: int = DEFAULT_NULL_SIZE,
    umap: bool = True,
    holdout_batches: list[str] | None = None,
    holdout_key: str | None = None,
    replicate_key: str | None = None,
    compound_key: str | None = None,
    concentration_key: str | None = None,
    standardize_key: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> EvaluationResult:
    """Evaluate cell embeddings: CORUM complex prediction (higher is better) and well F1 (lower).

    Parameters
    ----------
    embedding_paths
        Cell-level AnnData files (``.h5ad`` or ``.zarr``) with perturbation, guide and batch
        columns in obs, or pycytominer profile tables (``.parquet``, ``.csv``; name their
        ``Metadata_*`` columns with the keys).
    corum
        Relationship file: CORUM 3.x/4.x/5.x, or any groups (mechanisms of action,
        targets) as GMT or two-column; the report names the latter ``relationships (FILE)``.
    out
        Report folder; written atomically.
    keys
        The embedding of each file: ``"X"`` or an ``obsm`` key; one key for all files or one
        per file. Default ``"X"`` (z_c for ``scbd-cells embed`` output).
    labels
        Names in the table (default: file stem, or ``stem:key``).
    control
        Non-targeting control label (default: the embedding's ``uns["scbd"]["control"]``,
        else ``nontargeting``).
    perturbation_key, guide_key, batch_key
        obs columns.
    max_cells
        Cells (seeded subsample) for the well classifier; None uses all.
    mixing_cells
        Cells (seeded subsample) for the batch-mixing metrics (iLISI, silhouette of batch,
        graph connectivity, kBET) and the cell UMAPs; None uses all.
    max_replicates
        Guide x well profiles per gene (and control profiles per well) for mAP; None keeps
        all.
    null_size
        Permutations of copairs' null distribution for the mAP p-values.
    umap
        Draw ``umap.png`` (UMAPs of gene profiles and cells; about 30 s on 2 cores).
    holdout_batches
        Values of ``holdout_key`` that mark held-out cells (a plate imaged after
        training): CORUM from their cells alone, well F1 among their wells, and how well
        they mix with the rest are reported apart (``evaluation/holdout.py``).
    holdout_key
        obs column of ``holdout_batches`` (default: ``batch_key``), e.g. ``plate``.
    replicate_key
        The replicate unit in place of the guide, e.g. ``plate,well`` in an arrayed screen
        (one perturbation per well; several columns are joined as for ``batch_key``).
        Default: the guide column (``guide_key``).
    compound_key
        obs column of the compound: adds ``nsc`` and ``nscb`` (1-NN accuracy of the
        relationship group on treatment profiles, excluding the same compound, and also the
        same ``batch_key``; :mod:`scbd_cells.evaluation.moa`).
    concentration_key
        obs column of the concentration: a treatment is compound x concentration.
    standardize_key
        Standardise the replicate profiles for NSC/NSCB to the control cells of the same
        value of this column (e.g. ``plate``); default: no standardisation.
    seed
        Seeds every subsample, split, classifier, null distribution and clustering.
    overwrite
        Replace an existing report folder.

    Returns
    -------
    EvaluationResult
    """
    out_dir = Path(out)
    paths, keys = _paths_and_keys(embedding_paths, keys)
    names = _names(paths, keys, labels)
    holdout = None
    if holdout_batches:
        holdout = Holdout(column=holdout_key or batch_key, values=tuple(holdout_batches))
    options = _Options(
        corum=corum, control=control, perturbation_key=perturbation_key, guide_key=guide_key,
        batch_key=batch_key, replicate_key=replicate_key, holdout=holdout,
        compound_key=compound_key, concentration_key=concentration_key,
        standardize_key=standardize_key, max_cells=max_cells, mixing_cells=mixing_cells,
        max_replicates=max_replicates, null_size=null_size, umap=umap, seed=seed,
    )  # fmt: skip
    check_output(out_dir, kind="report", overwrite=overwrite, inputs=[*paths, corum])
    complexes = read_complexes(corum)
    _check_moa_options(options)
    read = _read_embeddings(paths, keys, names, options=options)
    try:
        measured = _measure_all(read, complexes=complexes, options=options)
    finally:
        close_all(read.datasets)
    table = _table(measured.rows)
    metrics = _metrics(table, read=read, measured=measured, complexes=complexes, options=options)
    extras = ReportExtras(benchmarks=measured.benchmarks, complexes=complexes, umap=umap, seed=seed)
    _write_report(
        out_dir, metrics=metrics, table=table, curves=pd.concat(measured.curves),
        overwrite=overwrite, extras=extras,
    )  # fmt: skip
    return EvaluationResult(
        metrics=metrics, table=table, out_dir=out_dir, report_path=out_dir / "report.md"
    )


# --- the inputs, read and checked ------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """What :func:`evaluate` was asked, as given (columns named as on the command line)."""

    corum: str | Path
    control: str | None
    perturbation_key: str
    guide_key: str
    batch_key: str
    replicate_key: str | None
    holdout: Holdout | None
    compound_key: str | None
    concentration_key: str | None
    standardize_key: str | None
    max_cells: int | None
    mixing_cells: int | None
    max_replicates: int | None
    null_size: int
    umap: bool
    seed: int

    @property
    def moa_columns(self) -> dict[str, str | None]:
        """The obs column each NSC/NSCB option names (None when not given)."""
        return {
            "--compound-key": self.compound_key,
            "--concentration-key": self.concentration_key,
            "--standardize-key": self.standardize_key,
        }

    @property
    def benchmark_settings(self) -> BenchmarkSettings:
        """The sizes and seed of the field's metrics."""
        return BenchmarkSettings(
            null_size=self.null_size, max_replicates=self.max_replicates,
            mixing_cells=self.mixing_cells, seed=self.seed,
        )  # fmt: skip


@dataclass(frozen=True)
class _Embedding:
    """One input file, read and checked: what every metric of it needs."""

    name: str
    path: Path
    key: str
    adata: Cells
    replicate: str  # the replicate column (the guide's, or --replicate-key's)
    held: np.ndarray | None  # the held-out cells, or None without --holdout-batches


@dataclass(frozen=True)
class _Inputs:
    """Every embedding, read and checked, in the order given."""

    embeddings: list[_Embedding]
    batch_key: str  # the batch column as the files name it (the last file's)
    value_warnings: dict[str, str]  # per embedding, when every cell has the same embedding

    @property
    def datasets(self) -> list[Cells]:
        return [embedding.adata for embedding in self.embeddings]


def _paths_and_keys(
    embedding_paths: list[str | Path], keys: list[str] | None
) -> tuple[list[Path], list[str]]:
    """The input files and the embedding key of each (one key stands for all)."""
    paths = [Path(p) for p in embedding_paths]
    if not paths:
        raise InputError("No embedding given. Pass one or more .h5ad/.zarr files.")
    keys = list(keys) if keys else ["X"]
    if len(keys) == 1:
        keys = keys * len(paths)
    if len(keys) != len(paths):
        raise InputError(
            f"Got {len(keys)} --key values for {len(paths)} embeddings; give one for all or "
            "one per embedding."
        )
    return paths, keys


def _names(paths: list[Path], keys: list[str], labels: list[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(paths):
            raise InputError(
                f"Got {len(labels)} label(s) for {len(paths)} embedding(s); give one --label "
                "per embedding, in the same order."
            )
        names = list(labels)
    else:
        names = [p.stem if k == "X" else f"{p.stem}:{k}" for p, k in zip(paths, keys, strict=True)]
    if len(set(names)) != len(names):
        raise InputError(
            f"Embedding names are not unique ({', '.join(names)}). Name them with --label."
        )
    return names


def _check_moa_options(options: _Options) -> None:
    if options.compound_key is None and (options.concentration_key or options.standardize_key):
        raise InputError(
            "--concentration-key and --standardize-key shape the NSC/NSCB treatment profiles; "
            "they need --compound-key (the obs column of the compound)."
        )


def _check_cell_level(path: Path, adata: Cells) -> None:
    """Refuse a guide- or gene-level profile file: evaluate aggregates cells itself."""
    level = adata.provenance().get("level")
    if level is None and schema.N_CELLS in adata.obs.columns:
        level = "profiles"  # one row per group with a cell count: not cells
    if level is not None and level != "cells":
        raise DataError(
            f"{path} holds {level} (one row per {str(level).rstrip('s')}, e.g. embed "
            "--aggregate's guides.h5ad or genes.h5ad); evaluate needs the cell-level file (one "
            "row per cell, e.g. the cells.h5ad of `scbd-cells embed`, or a baseline), and builds "
            "guide and gene profiles from it itself."
        )


def _some_columns(adata: Cells) -> str:
    """The first obs columns, for an error message."""
    return ", ".join(map(str, adata.obs.columns[:12]))


def _no_column(path: Path, adata: Cells, column: str, option: str, fix: str = "") -> DataError:
    return DataError(
        f"{path} has no column {column!r} in obs for {option} (columns: "
        f"{_some_columns(adata)}). {fix}".rstrip()
    )


def _read_embeddings(
    paths: list[Path], keys: list[str], names: list[str], *, options: _Options
) -> _Inputs:
    """Read every file and check it before any work (a bad input fails first); the files
    stay open for the metrics, closed here only on failure."""
    datasets: list[Cells] = []
    try:
        replicates, batch_key = [], options.batch_key
        for path, key in zip(paths, keys, strict=True):
            adata = open_cells(path)
            datasets.append(adata)
            batch_key, replicate = _check_embedding(path, key, adata, options=options)
            replicates.append(replicate)
        held = [
            _held_cells(path, adata, options.holdout)
            for path, adata in zip(paths, datasets, strict=True)
        ]
        value_warnings = _check_values(paths, names, keys, datasets)
    except BaseException:
        close_all(datasets)
        raise
    embeddings = [
        _Embedding(*fields)
        for fields in zip(names, paths, keys, datasets, replicates, held, strict=True)
    ]
    return _Inputs(embeddings=embeddings, batch_key=batch_key, value_warnings=value_warnings)


def _check_embedding(path: Path, key: str, adata: Cells, *, options: _Options) -> tuple[str, str]:
    """Refuse a file the metrics cannot read; return its batch and replicate columns."""
    if is_profile_table(path):
        check_profile_columns(
            adata,
            {
                "--perturbation-key": options.perturbation_key,
                "--guide-key": options.guide_key if options.guide_key != schema.GUIDE else None,
                "--batch-key": options.batch_key,
            },
            source=path,
        )
    adata.rep(key)  # refuses a missing X or obsm key
    _check_cell_level(path, adata)
    batch_key = batch_column(adata, options.batch_key)
    if batch_key not in adata.obs.columns:
        raise DataError(
            f"{path} has no batch column {batch_key!r} in obs (columns: {_some_columns(adata)}). "
            f"{did_you_mean(batch_key, list(adata.obs.columns))}Well prediction needs "
            "it: embed from a store (which carries 'batch'), or name the column with "
            "--batch-key."
        )
    replicate_key = options.replicate_key
    replicate = batch_column(adata, replicate_key) if replicate_key else options.guide_key
    for option, column in options.moa_columns.items():
        if column and column not in adata.obs.columns:
            raise _no_column(path, adata, column, option)
    if replicate_key and replicate not in adata.obs.columns:
        raise _no_column(
            path, adata, replicate_key, "--replicate-key",
            "Name the replicate unit, e.g. plate,well in an arrayed screen.",
        )  # fmt: skip
    return batch_key, replicate


def _held_cells(path: Path, adata: Cells, holdout: Holdout | None) -> np.ndarray | None:
    """The held-out cells of one file (None without --holdout-batches)."""
    if holdout is None:
        return None
    column = batch_column(adata, holdout.column)
    if column not in adata.obs.columns:
        raise _no_column(
            path, adata, holdout.column, "--holdout-key",
            did_you_mean(column, list(adata.obs.columns)),
        )  # fmt: skip
    return holdout.mask(adata.obs[column], path=path)


def _check_values(
    paths: list[Path], names: list[str], keys: list[str], datasets: list[Cells]
) -> dict[str, str]:
    """Refuse NaN/infinite values; return a warning per embedding that is constant."""
    found_warnings = {}
    for path, name, key, adata in zip(paths, names, keys, datasets, strict=True):
        found = check_values(adata.X if key == "X" else adata.obsm[key])
        if found.n_nonfinite:
            raise DataError(
                f"{path} holds {found.n_nonfinite:,} NaN or infinite values (float64 beyond "
                f"float32's ±3.4e38 counted) in {key}: no metric "
                "is defined on them. Re-embed the cells (embed now refuses a model that gives "
                "them), or remove the affected cells from the file."
            )
        if found.constant:
            found_warnings[name] = (
                f"every cell of {name} has the same embedding ({key} has zero variance in all "
                f"{found.n_columns} dimensions): its metrics measure nothing (a collapsed or "
                "untrained model?)."
            )
            log.warning("%s", found_warnings[name])
    return found_warnings


def _control(adata: Cells, control: str | None) -> str:
    if control is not None:
        return control
    return adata.control or schema.CONTROL_LABEL


# --- the metrics of each embedding --------------------------------------------------------------


@dataclass(frozen=True)
class _Measured:
    """The metrics of every embedding: table rows, CORUM curves, the field's, provenance."""

    rows: list[dict[str, Any]]
    curves: list[pd.DataFrame]
    benchmarks: dict[str, BenchmarkResult]
    inputs: dict[str, dict[str, Any]]


def _measure_all(read: _Inputs, *, complexes: Complexes, options: _Options) -> _Measured:
    """Every embedding's metrics, one file after the other (a progress line by cells)."""
    measured = _Measured(rows=[], curves=[], benchmarks={}, inputs={})
    with progress_bar(unit="cells") as bar:  # off a terminal: a line every 30 s
        task = bar.add_task("Evaluating", total=sum(int(a.n_obs) for a in read.datasets))
        for embedding in read.embeddings:
            _measure(embedding, measured, read=read, complexes=complexes, options=options)
            bar.advance(task, int(embedding.adata.n_obs))
    return measured


def _measure(
    embedding: _Embedding,
    measured: _Measured,
    *,
    read: _Inputs,
    complexes: Complexes,
    options: _Options,
) -> None:
    """One embedding: CORUM and well F1 (the paper's), the field's metrics, the held-out
    cells and NSC/NSCB when asked; added to ``measured``."""
    name, key, adata = embedding.name, embedding.key, embedding.adata
    log.info("Evaluating %s (%s, %d cells)", name, key, adata.n_obs)
    measured.inputs[name] = input_provenance(embedding.path, key=key, adata=adata)
    control = _control(adata, options.control)
    labels = {  # what every metric of this file needs to know of its labels and complexes
        "complexes": complexes,
        "control": control,
        "perturbation_key": options.perturbation_key,
        "guide_key": embedding.replicate,  # the guide, or the replicate unit (--replicate-key)
        "batch_key": read.batch_key,
    }
    profiles = aggregate_profiles(
        adata,
        use_rep=key,
        perturbation_key=options.perturbation_key,
        guide_key=embedding.replicate,
        control=control,
    )
    genes = profiles.genes
    corum_result: CorumResult = corum_pr(
        genes.X, list(genes.obs_names), complexes, percentiles=DEFAULT_PERCENTILES
    )
    positions = subsample(adata.n_obs, max_cells=options.max_cells, seed=options.seed)
    batches = adata.obs[read.batch_key].iloc[positions].astype(str).to_numpy()
    well = batch_prediction_f1(_rows(adata, key, positions), batches, seed=options.seed)
    # a constant embedding (warned about) has zero-norm profiles: its cosine-based
    # metrics are NaN, reported as undefined, not as numpy's divide warnings
    with warnings.catch_warnings():  # process-wide: copairs computes in threads
        if name in read.value_warnings:
            warnings.filterwarnings("ignore", "invalid value", RuntimeWarning)
        benchmark = benchmark_metrics(
            adata, key=key, profiles=profiles, settings=options.benchmark_settings, **labels
        )
    measured.benchmarks[name] = benchmark
    row = _row(name, adata, corum_result, well, benchmark)
    if embedding.held is not None:
        log.info("Evaluating %s on its %d held-out cells", name, int(embedding.held.sum()))
        row.update(
            holdout_metrics(
                adata, key=key, held=embedding.held, max_cells=options.max_cells,
                mixing_cells=options.mixing_cells, seed=options.seed, **labels,
            )  # fmt: skip
        )
    if options.compound_key is not None:
        moa_settings = MoaSettings(
            compound_key=options.compound_key,
            batch_key=read.batch_key,
            perturbation_key=options.perturbation_key,
            control=control,
            concentration_key=options.concentration_key,
            replicate_key=embedding.replicate if embedding.replicate in adata.obs.columns else None,
            standardize_key=options.standardize_key,
        )
        row.update(moa_metrics(adata, relationships=complexes, settings=moa_settings, use_rep=key))
    measured.rows.append(row)
    measured.curves.append(_curve(name, corum_result))


def _rows(adata: Cells, key: str, positions: np.ndarray) -> np.ndarray:
    return read_rows(adata.X if key == "X" else adata.obsm[key], positions)


def _row(
    name: str, adata: Cells, corum: CorumResult, well: BatchF1, benchmark: BenchmarkResult
) -> dict[str, Any]:
    """One embedding's row of the table (its first columns; held-out and NSC/NSCB follow)."""
    return {
        "embedding": name,
        "corum_auprc": corum.auprc,
        "corum_recall_5_95": corum.recall_5_95,
        "well_f1": well.f1,
        "well_f1_chance": well.chance,
        "n_genes": corum.n_genes,
        "n_cells": int(adata.n_obs),
        "corum_recall_10_90": _recall_at(corum, 90),
        **benchmark.values,
        "corum_prevalence": corum.n_positive_pairs / corum.n_pairs,
        "n_replicates": benchmark.n_replicates,
        "n_mixing_cells": benchmark.n_mixing_cells,
    }


def _curve(name: str, corum: CorumResult) -> pd.DataFrame:
    """One embedding's CORUM precision-recall points (``corum_pr.csv``)."""
    return pd.DataFrame(
        {
            "embedding": name,
            "percentile": corum.percentiles,
            "precision": corum.precision,
            "recall": corum.recall,
        }
    )


def _recall_at(result: CorumResult, percentile: int) -> float:
    """Recall at the two-tailed (100 - p) % / p % threshold, from the curve's points."""
    at = np.flatnonzero(np.asarray(result.percentiles) == percentile)
    return float(result.recall[at[0]]) if at.size else float("nan")


# --- the table and metrics.json ---------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per embedding, the overall scores (relative to this table) appended."""
    table = pd.DataFrame(rows)
    return pd.concat([table, overall_scores(table)], axis=1)


def _per_embedding(table: pd.DataFrame, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{embedding: {key: number}}`` of the table's rows, for ``metrics.json``."""
    return {
        row["embedding"]: {k: _json_number(row[k]) for k in keys}
        for row in table.to_dict("records")
    }


def _metrics(
    table: pd.DataFrame,
    *,
    read: _Inputs,
    measured: _Measured,
    complexes: Complexes,
    options: _Options,
) -> dict[str, Any]:
    """The content of ``metrics.json``: the numbers, warnings, settings and provenance."""
    extra_keys = ("corum_prevalence", "n_replicates", "n_mixing_cells")
    if options.compound_key is not None:
        extra_keys += MOA_KEYS
    holdout = options.holdout
    return {
        "embeddings": _per_embedding(table, (*METRIC_KEYS, *extra_keys)),
        "warnings": read.value_warnings,
        "holdout": {}
        if holdout is None
        else {
            "column": holdout.column,
            "values": list(holdout.values),
            "embeddings": _per_embedding(table, HOLDOUT_KEYS),
        },
        "settings": _settings(read, complexes=complexes, options=options),
        "provenance": report_provenance(measured.inputs, complexes_path=Path(options.corum)),
    }


def _settings(read: _Inputs, *, complexes: Complexes, options: _Options) -> dict[str, Any]:
    """What the report was computed with (``metrics.json``'s ``settings``)."""
    embeddings = read.embeddings
    return {
        "corum": str(Path(options.corum)),
        "complexes_format": complexes.format,
        "relationships": complexes.label,
        "replicate_key": options.replicate_key,
        "moa": None
        if options.compound_key is None
        else {
            "compound_key": options.compound_key,
            "concentration_key": options.concentration_key,
            "batch_key": read.batch_key,
            "replicate_key": options.replicate_key,
            "standardize_key": options.standardize_key,
            "profiles": "median of the replicates' cell means per treatment and batch",
            "distance": "cosine",
        },
        "percentiles": list(DEFAULT_PERCENTILES),
        "keys": {e.name: e.key for e in embeddings},
        "files": {e.name: str(e.path) for e in embeddings},
        "batch_key": read.batch_key,
        "max_cells": options.max_cells,
        "mixing_cells": options.mixing_cells,
        "max_replicates": options.max_replicates,
        "null_size": options.null_size,
        "umap": options.umap,
        "seed": options.seed,
    }


# --- the report's files ----------------------------------------------------------------------


def _json_number(value: Any) -> Any:
    """A plain Python number for ``metrics.json``; NaN (undefined) becomes null."""
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    value = float(value)
    return None if np.isnan(value) else value


def _plot_curves(
    curves: pd.DataFrame, path: Path, table: pd.DataFrame | None = None, *, label: str = "CORUM"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    auprc = {}
    if table is not None:
        auprc = dict(zip(table["embedding"], table["corum_auprc"], strict=True))
    for name, curve in curves.groupby("embedding", sort=False):
        label = f"{name} (AUPRC {auprc[name]:.3f})" if name in auprc else name
        axes.plot(curve["recall"], curve["precision"], marker="o", markersize=3, label=label)
    if table is not None:
        for prevalence in pd.unique(table["corum_prevalence"]):
            axes.axhline(prevalence, color="grey", linestyle="--", linewidth=1)
        axes.text(
            0.99,
            float(table["corum_prevalence"].max()),
            "share of pairs in a complex (random)",
            transform=axes.get_yaxis_transform(),
            ha="right",
            va="bottom",
            fontsize=7,
            color="grey",
        )
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    title = "CORUM complex prediction" if label == "CORUM" else f"{label}: pairs in a group"
    axes.set_title(f"{title} (p = 80..99)")
    axes.legend(frameon=False, fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _plot_well(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    positions = np.arange(len(table))
    axes.bar(positions, table["well_f1"], color="tab:red", alpha=0.8, label="held-out macro F1")
    axes.scatter(
        positions,
        table["well_f1_chance"],
        color="black",
        marker="_",
        s=600,
        zorder=3,
        label="chance",
    )
    axes.set_xticks(positions, table["embedding"], rotation=20, ha="right")
    axes.set_ylabel("macro F1 (lower is better)")
    axes.set_title("Predicting the well from the embedding")
    axes.legend(frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def format_table(table: pd.DataFrame) -> str:
    """The metrics table as Markdown (what ``report.md`` and the demo print)."""
    lines = [
        "| embedding | CORUM AUPRC ↑ | recall @ 5%/95% ↑ | well F1 ↓ | chance | genes | cells |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.embedding} | {row.corum_auprc:.4f} | {row.corum_recall_5_95:.3f} | "
            f"{row.well_f1:.3f} | {row.well_f1_chance:.3f} | {row.n_genes} | {row.n_cells} |"
        )
    return "\n".join(lines)


def _report_text(metrics: dict[str, Any], table: pd.DataFrame) -> str:
    settings = metrics["settings"]
    label = settings.get("relationships", "CORUM")
    notes = "".join(f"> **Warning**: {text}\n\n" for text in metrics["warnings"].values())
    pair = (
        '"the two genes share a complex"'
        if label == "CORUM"
        else '"the two perturbations share a group" (mechanism of action, target, ...)'
    )
    source = "Complexes" if label == "CORUM" else "Relationships"
    return f"""# scbd-cells evaluation

{notes}{markdown_table(table, paper_columns(label))}

- **{label} AUPRC**: area under the precision-recall curve of predicting {pair}
  from the cosine similarity of their profiles, thresholds at the p-th / (100 − p)-th
  percentiles for p = 80..99 (paper appendix A.3). Higher is better. **recall @ 5%/95%**: recall
  at p = 95 (**10%/90%**: p = 90), the known-relationship recall of perturbation-map benchmarks.
- **well F1**: held-out macro F1 of a logistic regression predicting the batch
  (`{settings["batch_key"]}`) from the cell embedding (60/40 split, standardised, seed
  {settings["seed"]}, at most {settings["max_cells"]} cells). Lower is better; **chance** is the
  expected F1 of guessing.

{source}: `{settings["corum"]}` ({settings["complexes_format"]}).
{moa_markdown(table, settings["moa"])}
![CORUM precision-recall](corum_pr.png)

![well prediction](well_f1.png)

{field_markdown(metrics, table)}
{holdout_markdown(table, metrics["holdout"])}
Files: `metrics.json`, `corum_pr.csv`, `map_activity.csv`, `map_consistency.csv`,
`report.html` (this report in one self-contained page). Protocol: docs/evaluation.md.
"""


def _write_report(
    out_dir: Path,
    *,
    metrics: dict[str, Any],
    table: pd.DataFrame,
    curves: pd.DataFrame,
    overwrite: bool,
    extras: ReportExtras,
) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = temporary_name(out_dir)  # made here, so it and its files follow the umask
    tmp_dir.mkdir()
    try:
        (tmp_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        curves.to_csv(tmp_dir / "corum_pr.csv", index=False)
        _plot_curves(
            curves, tmp_dir / "corum_pr.png", table, label=metrics["settings"]["relationships"]
        )
        _plot_well(table, tmp_dir / "well_f1.png")
        (tmp_dir / "report.md").write_text(_report_text(metrics, table))
        write_extras(tmp_dir, metrics=metrics, table=table, extras=extras)
        written = sorted(child.name for child in tmp_dir.iterdir())
        # replace only what an earlier report wrote (its marker lists it); other files stay
        if check_output(out_dir, kind="report", overwrite=overwrite):
            remove_owned(out_dir, kind="report")
        out_dir.mkdir(exist_ok=True)
        for name in written:
            publish(tmp_dir / name, out_dir / name)
        write_marker(out_dir, kind="report", entries=written)
    finally:
        remove_temporary(tmp_dir)
    log.info("Wrote the report to %s", out_dir)
