"""Export: profiles as a Parquet (or CSV) table that pycytominer and copairs read as they are.

``scbd-cells export EMBEDDING.h5ad --level cell|well|guide|gene --out profiles.parquet``
writes one row per unit with the image-profiling community's ``Metadata_`` columns (plain
strings, so pandas and pycytominer group by them without exploding categorical
combinations) and one named column per feature:

- ``cell``: one row per cell;
- ``well``: one row per well (batch label), the mean of its cells (for a Cell Painting
  plate, the usual well-level profile; for a pooled screen, the well's average, for QC);
  ``Metadata_Perturbation`` / ``Metadata_Guide`` hold the well's perturbation when it has
  one, else ``"mixed"``;
- ``guide``: one row per guide x well, the mean of the guide's cells in that well: the
  replicate profiles that copairs' mAP ranks (a guide's wells are its replicates);
- ``gene``: one row per gene x well, the mean of the gene's cells in that well.

Columns: ``Metadata_Plate``, ``Metadata_Well`` (from obs ``plate`` / ``well`` when present,
else empty), ``Metadata_Batch``, ``Metadata_Guide``, ``Metadata_Perturbation``,
``Metadata_n_cells`` (int), then the features: the AnnData's ``var_names`` for ``X``, the
recorded feature names for a baseline's ``X_features`` (CellProfiler-style), else
``{key}_0 ...``. Values are the raw means: normalise them downstream (e.g.
``pycytominer.normalize(..., samples="Metadata_Perturbation == 'nontargeting'")``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scbd_cells.data import schema
from scbd_cells.errors import DataError, InputError
from scbd_cells.outputs import check_output, locks_output, remove_owned, write_file_marker
from scbd_cells.replicates import (
    ROW_CHUNK,
    batch_column,
    cell_groups,
    group_means,
    obs_column,
)

log = logging.getLogger(__name__)

LEVELS = ("cell", "well", "guide", "gene")
SUFFIXES = (".parquet", ".csv")
MIXED = "mixed"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote.

    Attributes
    ----------
    out_path
        The table.
    level
        ``cell``, ``well``, ``guide`` or ``gene``.
    n_rows, n_features
        Profiles and feature columns.
    """

    out_path: Path
    level: str
    n_rows: int
    n_features: int


def feature_columns(adata: Any, key: str, width: int) -> list[str]:
    """Names of the feature columns: var_names, recorded feature names, or ``{key}_{i}``."""
    if key == "X":
        names = [str(n) for n in adata.var_names] if hasattr(adata, "var_names") else []
        if len(names) == width:
            return names
    recorded = {}
    if hasattr(adata, "provenance"):
        recorded = adata.provenance()
    elif hasattr(adata, "uns"):
        recorded = dict(adata.uns.get(schema.UNS_SCBD, {}))
    names = recorded.get("feature_names")
    if key == schema.OBSM_FEATURES and names is not None and len(names) == width:
        return [str(n) for n in names]
    return [f"{key}_{i}" for i in range(width)]


def _plate_well(adata: Any, rows: pd.DataFrame, batch_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Plate and well of each group, read through its batch label (one plate/well a batch)."""
    n = len(rows)
    columns = adata.obs.columns
    if schema.PLATE not in columns or schema.WELL not in columns:
        return np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    groups = cell_groups(adata, [batch_key, schema.PLATE, schema.WELL])
    table = groups.labels.drop_duplicates(batch_key).set_index(batch_key)
    plate = table[schema.PLATE].reindex(rows[batch_key]).fillna("").to_numpy(dtype=object)
    well = table[schema.WELL].reindex(rows[batch_key]).fillna("").to_numpy(dtype=object)
    return plate, well


def _metadata(
    rows: pd.DataFrame, *, plate: np.ndarray, well: np.ndarray, guide: Any, perturbation: Any
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            schema.METADATA_PLATE: plate.astype(str),
            schema.METADATA_WELL: well.astype(str),
            schema.METADATA_BATCH: rows["batch"].astype(str).to_numpy(),
            schema.METADATA_GUIDE: np.asarray(guide, dtype=object).astype(str),
            schema.METADATA_PERTURBATION: np.asarray(perturbation, dtype=object).astype(str),
            schema.METADATA_N_CELLS: rows["n_cells"].to_numpy(dtype=np.int64),
        }
    )


def _single_or_mixed(adata: Any, key: str, batch_key: str, batches: pd.Series) -> np.ndarray:
    groups = cell_groups(adata, [batch_key, key]).labels
    per_batch = groups.groupby(batch_key, sort=True)[key]
    first = per_batch.first()
    single = per_batch.nunique() == 1
    values = first.where(single, MIXED)
    return values.reindex(batches).to_numpy(dtype=object)


def _write(frame: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def _cell_table(adata: Any, key: str, out_path: Path, names: list[str], keys: dict) -> int:
    """Write the cell level chunk by chunk (a 1 M-cell table is never built whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scbd_cells.evaluation.cells import read_rows

    data = adata.X if key == "X" else adata.obsm[key]
    n_obs = int(data.shape[0])

    def column(name: str | None) -> np.ndarray:
        if name is None or name not in adata.obs.columns:
            return np.full(n_obs, "", dtype=object)
        return adata.obs[name].astype(str).to_numpy(dtype=object)

    meta = {
        schema.METADATA_PLATE: column(schema.PLATE),
        schema.METADATA_WELL: column(schema.WELL),
        schema.METADATA_BATCH: column(keys["batch"]),
        schema.METADATA_GUIDE: column(keys["guide"]),
        schema.METADATA_PERTURBATION: column(keys["perturbation"]),
    }
    writer = None
    header = True
    try:
        for start in range(0, n_obs, ROW_CHUNK):
            stop = min(start + ROW_CHUNK, n_obs)
            values = read_rows(data, np.arange(start, stop))
            frame = pd.DataFrame({k: v[start:stop] for k, v in meta.items()})
            frame[schema.METADATA_N_CELLS] = np.ones(stop - start, dtype=np.int64)
            frame = pd.concat([frame, pd.DataFrame(values, columns=names)], axis=1)
            if out_path.suffix == ".csv":
                frame.to_csv(out_path, mode="w" if header else "a", header=header, index=False)
                header = False
                continue
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(out_path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return n_obs


@locks_output("out")
def export(
    embedding_path: str | Path,
    *,
    level: str,
    out: str | Path,
    key: str = "X",
    perturbation_key: str = schema.PERTURBATION,
    guide_key: str = schema.GUIDE,
    batch_key: str = schema.BATCH,
    overwrite: bool = False,
) -> ExportResult:
    """Write an embedding's profiles at one level as a table pycytominer and copairs read.

    Parameters
    ----------
    embedding_path
        Cell-level AnnData (``.h5ad`` or ``.zarr``), read lazily.
    level
        ``cell``, ``well``, ``guide`` (guide x well) or ``gene`` (gene x well).
    out
        ``.parquet`` (default choice) or ``.csv``; written under a temporary name, then
        renamed into place.
    key
        ``X`` or an obsm key (e.g. ``X_features``, ``X_scbd_batch``).
    perturbation_key, guide_key, batch_key
        obs columns.
    overwrite
        Replace an existing table.

    Returns
    -------
    ExportResult
    """
    from scbd_cells.evaluation.cells import close_all, read_embedding

    if level not in LEVELS:
        raise InputError(f"--level must be one of {', '.join(LEVELS)}; found {level!r}.")
    out_path = Path(out)
    if out_path.suffix not in SUFFIXES:
        raise InputError(f"--out {out_path} must end in .parquet or .csv.")
    source = Path(embedding_path)
    check_output(out_path, kind="table", overwrite=overwrite, inputs=[source])
    adata = read_embedding(source)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{out_path.stem}.tmp-", suffix=out_path.suffix, dir=out_path.parent
    )
    os.close(handle)
    tmp_path = Path(name)
    try:
        if key != "X" and key not in adata.obsm:
            raise DataError(
                f"{source} has no obsm key {key!r} (keys: "
                f"{', '.join(adata.obsm.keys()) or 'none'}). Choose one of them or 'X'."
            )
        data = adata.X if key == "X" else adata.obsm[key]
        if data is None:
            raise DataError(f"{source} has no X; name an obsm key with --key.")
        if int(data.shape[0]) == 0 or int(data.shape[1]) == 0:
            raise DataError(
                f"{source} holds no profiles to export: {int(data.shape[0]):,} cells x "
                f"{int(data.shape[1]):,} features in {key}. Export the cell-level file that "
                "embed, baseline or correct wrote."
            )
        names = feature_columns(adata, key, int(data.shape[1]))
        batch_key = batch_column(adata, batch_key)
        obs_column(adata, batch_key, "batch")
        keys = {
            "batch": batch_key,
            "perturbation": perturbation_key if perturbation_key in adata.obs.columns else None,
            "guide": guide_key if guide_key in adata.obs.columns else None,
        }
        _refuse_non_finite(adata, data, source=source, key=key)
        if level == "cell":
            n_rows = _cell_table(adata, key, tmp_path, names, keys)
        else:
            frame = _group_table(adata, key, level, names, keys)
            _write(frame, tmp_path)
            n_rows = len(frame)
        if check_output(out_path, kind="table", overwrite=overwrite):  # again, just before
            remove_owned(out_path, kind="table")
        os.replace(tmp_path, out_path)
        write_file_marker(out_path, kind="table")
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        close_all([adata])
    log.info("Exported %d %s profiles x %d features -> %s", n_rows, level, len(names), out_path)
    return ExportResult(out_path=out_path, level=level, n_rows=n_rows, n_features=len(names))


def _refuse_non_finite(adata: Any, data: Any, *, source: Path, key: str) -> None:
    """Refuse NaN or infinite values, naming the first cells that hold them (one pass)."""
    from scbd_cells.anndata_io import non_finite_rows, rows_named

    bad: list[np.ndarray] = []
    for start in range(0, int(data.shape[0]), ROW_CHUNK):
        block = data[start : start + ROW_CHUNK]
        bad.append(start + non_finite_rows(block))
    rows = np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)
    if not len(rows):
        return
    shown = rows[:5]
    if isinstance(adata.obs, pd.DataFrame):
        cell_names = [str(adata.obs.index[i]) for i in shown]
    else:  # a lazily read cells file (ObsColumns)
        cell_names = adata.obs.names_at(shown)
    raise DataError(
        f"{source} holds NaN, infinite or beyond-float32 (±3.4e38) values in {key} for "
        f"{len(rows):,} of "
        f"{int(data.shape[0]):,} cells (cells {rows_named(cell_names, np.arange(len(shown)))}"
        f"{f' and {len(rows) - 5:,} more' if len(rows) > 5 else ''}): their profiles would be "
        "NaN. Drop or impute those cells first; nothing was written."
    )


def _refuse_guides_that_are_wells(rows: pd.DataFrame, *, guide: str, batch: str) -> None:
    """Refuse a guide column that is really gene x well: each guide in one well only.

    Guide profiles are guide x well means, whose replicates are a guide's other wells;
    a column with one value per gene and well gives the gene x well profiles again, none
    with a replicate.
    """
    n_guides = rows[guide].nunique()
    n_batches = rows[batch].nunique()
    if n_batches < 2 or len(rows) != n_guides:  # some guide is in several wells
        return
    example = rows.iloc[0]
    raise DataError(
        f"--guide-key {guide!r} holds {n_guides:,} values, each in a single well (e.g. "
        f"{example[guide]!r} only in {example[batch]!r}): it names gene x well, not the "
        "guide (sgRNA), so guide profiles would have no replicate wells. Name the sgRNA "
        "column with --guide-key, or export --level gene (gene x well) or --level well."
    )


def _group_table(adata: Any, key: str, level: str, names: list[str], keys: dict) -> pd.DataFrame:
    batch_key = keys["batch"]
    if level in ("guide", "gene") and keys["perturbation"] is None:
        raise DataError(
            f"--level {level} needs the perturbation column in obs; name it with "
            "--perturbation-key."
        )
    if level == "guide":
        by = [batch_key, keys["perturbation"]]
        if keys["guide"] is not None:
            by.append(keys["guide"])
    elif level == "gene":
        by = [batch_key, keys["perturbation"]]
    else:
        by = [batch_key]
    groups = cell_groups(adata, by)
    if level == "guide" and keys["guide"] is not None:
        _refuse_guides_that_are_wells(groups.labels, guide=keys["guide"], batch=batch_key)
    values = group_means(adata, groups, use_rep=key)
    rows = groups.labels.rename(columns={batch_key: "batch"})
    batches = rows["batch"]
    plate, well = _plate_well(adata, groups.labels, batch_key)
    if level == "well":
        perturbation = (
            _single_or_mixed(adata, keys["perturbation"], batch_key, batches)
            if keys["perturbation"] else np.full(len(rows), "", dtype=object)
        )
        guide = (
            _single_or_mixed(adata, keys["guide"], batch_key, batches)
            if keys["guide"] else np.full(len(rows), "", dtype=object)
        )
    else:
        perturbation = rows[keys["perturbation"]].to_numpy(dtype=object)
        guide = (
            rows[keys["guide"]].to_numpy(dtype=object)
            if level == "guide" and keys["guide"] is not None
            else np.full(len(rows), "", dtype=object)
        )
    meta = _metadata(rows, plate=plate, well=well, guide=guide, perturbation=perturbation)
    return pd.concat([meta, pd.DataFrame(values, columns=names)], axis=1)
