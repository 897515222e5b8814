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

Columns, in this order:

- ``Metadata_Plate``, ``Metadata_Well``: from obs ``Metadata_Plate`` / ``Metadata_Well``
  when present; else from the batch columns the file records (``uns["scbd"]
  ["label_columns"]["batch"]``, what ``ingest --batch-columns`` named) or ``--batch-key``
  names (``Metadata_Plate,Metadata_Well``), the one whose name holds ``plate`` / ``well``;
  else from obs ``plate`` / ``well``; else empty. A group whose cells span several plates
  (wells) gets ``"mixed"``;
- ``Metadata_Batch``, ``Metadata_Guide``, ``Metadata_Perturbation`` (from the
  ``--batch-key``, ``--guide-key``, ``--perturbation-key`` columns), ``Metadata_n_cells``
  (int);
- cell level only: ``Metadata_Cell_ID`` (obs ``cell_id``), ``Metadata_ImageNumber`` and
  ``Metadata_ObjectNumber`` (obs ``ImageNumber`` / ``ObjectNumber``, as CellProfiler
  numbers them), when obs has them: each row joins back to the lab's CellProfiler tables;
- every other ``Metadata_*`` column of obs, under its own name and with its values as
  obs holds them: at the cell level all of them, at the other levels those constant within
  every group (a plate's ``Metadata_Plate_Map``, a compound's ``Metadata_MoA``); the others
  are left out (logged);
- then the features: the AnnData's ``var_names`` for ``X``, the recorded feature names for
  a baseline's ``X_features`` (CellProfiler-style), else ``{key}_0 ...``. Values are the
  raw means: normalise them downstream (e.g.
  ``pycytominer.normalize(..., samples="Metadata_Perturbation == 'nontargeting'")``).

The input may also be a pycytominer profile table (``.parquet``, ``.csv``: see
:mod:`scbd_cells.profiles.profile_tables`); name its columns with the keys
(``--batch-key Metadata_Plate --perturbation-key Metadata_broad_sample``).
"""

from __future__ import annotations

import logging
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
    remove_temporary,
    temporary_name,
)
from scbd_cells.data import schema
from scbd_cells.profiles.cells import Cells, open_cells, read_rows
from scbd_cells.profiles.profile_tables import check_profile_columns, is_profile_table
from scbd_cells.profiles.replicates import (
    ROW_CHUNK,
    CellGroups,
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


def feature_columns(cells: Cells, key: str, width: int) -> list[str]:
    """Names of the feature columns: var_names, recorded feature names, or ``{key}_{i}``."""
    if key == "X":
        names = [str(n) for n in cells.var_names]
        if len(names) == width:
            return names
    names = cells.provenance().get("feature_names")
    if key == schema.OBSM_FEATURES and names is not None and len(names) == width:
        return [str(n) for n in names]
    return [f"{key}_{i}" for i in range(width)]


def _plate_well_columns(adata: Cells, batch_key: str) -> tuple[str | None, str | None]:
    """The obs columns of the plate and the well (see the module docstring), or None."""
    columns = [str(c) for c in adata.obs.columns]
    labels = adata.provenance().get(schema.UNS_LABEL_COLUMNS) or {}
    recorded = labels.get("batch") if hasattr(labels, "get") else None
    sources = [str(c) for c in np.atleast_1d(recorded if recorded is not None else [])]
    sources += [part.strip() for part in batch_key.split(",") if part.strip()]

    def find(word: str, metadata_name: str) -> str | None:
        if metadata_name in columns:
            return metadata_name
        named = [c for c in sources if word in c.lower() and c in columns]
        if named:
            return named[0]
        return next((c for c in columns if c.lower() == word), None)

    return find("plate", schema.METADATA_PLATE), find("well", schema.METADATA_WELL)


def _verbatim(values: pd.Series) -> np.ndarray:
    """A column's values as obs holds them: numbers as they are, text as str (nulls None)."""
    if isinstance(values.dtype, pd.CategoricalDtype):  # through the categories: no str a cell
        labels = values.cat.categories.astype(str).to_numpy(dtype=object)
        return np.append(labels, None)[values.cat.codes.to_numpy()]  # code -1 (null): None
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values.to_numpy()
    return np.asarray([None if pd.isna(v) else str(v) for v in values.to_numpy()], dtype=object)


def _per_group(
    values: pd.Series, codes: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each group's value of an obs column, and whether the group's cells all share it."""
    frame = pd.DataFrame({"group": codes, "value": _verbatim(values)})
    frame = frame[frame["group"] >= 0]
    by_group = frame.groupby("group", sort=True)["value"]
    constant = by_group.nunique(dropna=False).reindex(range(n_groups), fill_value=0) <= 1
    first = by_group.first().reindex(range(n_groups))
    return first.to_numpy(dtype=object), constant.to_numpy(dtype=bool)


def _plate_well(adata: Cells, groups: CellGroups, keys: dict) -> tuple[np.ndarray, np.ndarray]:
    """Plate and well of each group: its cells' one value, ``"mixed"`` if several."""
    n = len(groups.labels)
    found = []
    for name in (keys["plate"], keys["well"]):
        if name is None:
            found.append(np.full(n, "", dtype=object))
            continue
        values, constant = _per_group(adata.obs[name], groups.codes, n)
        text = np.asarray(["" if v is None else str(v) for v in values], dtype=object)
        found.append(np.where(constant, text, MIXED).astype(object))
    return found[0], found[1]


def _carried_columns(adata: Cells, *, key_columns: set[str]) -> list[str]:
    """obs ``Metadata_*`` columns carried as they are (not the ones export fills itself).

    A column named like one export fills (``Metadata_Batch``, e.g. a table scbd-cells
    exported) is replaced by export's own, silently when a key names it (same values).
    """
    own = {*schema.METADATA_COLUMNS, schema.METADATA_CELL_ID}
    carried = []
    for name in (str(c) for c in adata.obs.columns):
        if not name.startswith(schema.METADATA_PREFIX):
            continue
        if name in own and name not in (schema.METADATA_PLATE, schema.METADATA_WELL):
            if name in key_columns:
                continue
            log.warning(
                "obs column %s is not carried: export writes its own %s (from the keys).",
                name, name,
            )  # fmt: skip
            continue
        if name not in (schema.METADATA_PLATE, schema.METADATA_WELL):
            carried.append(name)
    return carried


def _cell_ids(adata: Cells) -> dict[str, np.ndarray]:
    """``Metadata_Cell_ID`` / ``Metadata_ImageNumber`` / ``Metadata_ObjectNumber`` per cell."""
    columns = set(map(str, adata.obs.columns))
    found = {}
    for source, target in (
        (schema.CELL_ID, schema.METADATA_CELL_ID),
        (schema.IMAGE_NUMBER, schema.METADATA_IMAGE_NUMBER),
        (schema.OBJECT_NUMBER, schema.METADATA_OBJECT_NUMBER),
    ):
        if source in columns and target not in columns:
            values = adata.obs[source]
            found[target] = (
                values.astype(str).to_numpy(dtype=object)
                if source == schema.CELL_ID
                else _verbatim(values)
            )
    return found


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


def _single_or_mixed(adata: Cells, key: str, batch_key: str, batches: pd.Series) -> np.ndarray:
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


def _cell_table(adata: Cells, key: str, out_path: Path, names: list[str], keys: dict) -> int:
    """Write the cell level chunk by chunk (a 1 M-cell table is never built whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = adata.rep(key)
    n_obs = int(data.shape[0])

    def column(name: str | None) -> np.ndarray:
        if name is None or name not in adata.obs.columns:
            return np.full(n_obs, "", dtype=object)
        return adata.obs[name].astype(str).to_numpy(dtype=object)

    meta = {
        schema.METADATA_PLATE: column(keys["plate"]),
        schema.METADATA_WELL: column(keys["well"]),
        schema.METADATA_BATCH: column(keys["batch"]),
        schema.METADATA_GUIDE: column(keys["guide"]),
        schema.METADATA_PERTURBATION: column(keys["perturbation"]),
    }
    extra = _cell_ids(adata)
    extra.update({name: _verbatim(adata.obs[name]) for name in keys["carried"]})
    writer = None
    header = True
    try:
        for start in range(0, n_obs, ROW_CHUNK):
            stop = min(start + ROW_CHUNK, n_obs)
            values = read_rows(data, np.arange(start, stop))
            frame = pd.DataFrame({k: v[start:stop] for k, v in meta.items()})
            frame[schema.METADATA_N_CELLS] = np.ones(stop - start, dtype=np.int64)
            extras = pd.DataFrame({k: v[start:stop] for k, v in extra.items()})
            frame = pd.concat([frame, extras, pd.DataFrame(values, columns=names)], axis=1)
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
        Cell-level AnnData (``.h5ad`` or ``.zarr``), read lazily; or a pycytominer profile
        table (``.parquet``, ``.csv``), read whole.
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
    if level not in LEVELS:
        raise InputError(f"--level must be one of {', '.join(LEVELS)}; found {level!r}.")
    out_path = Path(out)
    if out_path.suffix not in SUFFIXES:
        raise InputError(f"--out {out_path} must end in .parquet or .csv.")
    source = Path(embedding_path)
    check_output(out_path, kind="table", overwrite=overwrite, inputs=[source])
    named = {"perturbation": perturbation_key, "guide": guide_key, "batch": batch_key}
    with _open_source(source, level=level, named=named) as cells:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = temporary_name(out_path)
        try:
            data = _profile_values(cells, key, source=source)
            names = feature_columns(cells, key, int(data.shape[1]))
            keys = _export_keys(cells, **named)
            _refuse_non_finite(cells, data, source=source, key=key)
            if level == "cell":
                n_rows = _cell_table(cells, key, tmp_path, names, keys)
            else:
                frame = _group_table(cells, key, level, names, keys)
                _write(frame, tmp_path)
                n_rows = len(frame)
            publish(tmp_path, out_path, kind="table", overwrite=overwrite)
        except BaseException:
            remove_temporary(tmp_path)
            raise
    log.info("Exported %d %s profiles x %d features -> %s", n_rows, level, len(names), out_path)
    return ExportResult(out_path=out_path, level=level, n_rows=n_rows, n_features=len(names))


def _open_source(source: Path, *, level: str, named: dict[str, str]) -> Cells:
    """The cells to export; a profile table must have the key columns named."""
    cells = open_cells(source)
    if is_profile_table(source):
        try:
            check_profile_columns(cells, _named_keys(
                level=level, batch_key=named["batch"],
                perturbation_key=named["perturbation"], guide_key=named["guide"],
            ), source=source)  # fmt: skip
        except BaseException:
            cells.close()
            raise
    return cells


def _profile_values(cells: Cells, key: str, *, source: Path) -> Any:
    """The representation to export (on disk for an AnnData); refuse an empty one."""
    data = cells.rep(key)
    if int(data.shape[0]) == 0 or int(data.shape[1]) == 0:
        raise DataError(
            f"{source} holds no profiles to export: {int(data.shape[0]):,} cells x "
            f"{int(data.shape[1]):,} features in {key}. Export the cell-level file that "
            "embed, baseline or correct wrote."
        )
    return data


def _export_keys(
    cells: Cells, *, perturbation: str, guide: str, batch: str
) -> dict[str, Any]:
    """The obs columns of each ``Metadata_*`` label, and the columns carried as they are."""
    # before batch_column adds a joined column
    carried = _carried_columns(cells, key_columns={batch, perturbation, guide})
    plate, well = _plate_well_columns(cells, batch)
    batch = batch_column(cells, batch)
    obs_column(cells, batch, "batch")
    return {
        "batch": batch,
        "perturbation": perturbation if perturbation in cells.obs.columns else None,
        "guide": guide if guide in cells.obs.columns else None,
        "plate": plate,
        "well": well,
        "carried": carried,
    }


def _refuse_non_finite(adata: Cells, data: Any, *, source: Path, key: str) -> None:
    """Refuse NaN or infinite values, naming the first cells that hold them (one pass)."""
    from scbd_cells.profiles.anndata_io import non_finite_rows, rows_named

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


def _group_table(adata: Cells, key: str, level: str, names: list[str], keys: dict) -> pd.DataFrame:
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
    plate, well = _plate_well(adata, groups, keys)
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
    carried = _constant_columns(adata, groups, keys["carried"], level=level)
    return pd.concat([meta, carried, pd.DataFrame(values, columns=names)], axis=1)


def _constant_columns(
    adata: Cells, groups: CellGroups, names: list[str], *, level: str
) -> pd.DataFrame:
    """The carried ``Metadata_*`` columns that are constant within every group, one row each."""
    n = len(groups.labels)
    kept, dropped = {}, []
    for name in names:
        values, constant = _per_group(adata.obs[name], groups.codes, n)
        if constant.all():
            kept[name] = values
        else:
            dropped.append(name)
    if dropped:
        log.info(
            "Not carried at the %s level (they vary within a %s): %s",
            level, level, ", ".join(dropped),
        )  # fmt: skip
    return pd.DataFrame(kept, index=pd.RangeIndex(n))


def _named_keys(*, level: str, batch_key: str, perturbation_key: str, guide_key: str) -> dict:
    """The key options a profile table must have: the batch, and those the user named."""
    needed = {"--batch-key": batch_key}
    if perturbation_key != schema.PERTURBATION or level in ("guide", "gene"):
        needed["--perturbation-key"] = perturbation_key
    if guide_key != schema.GUIDE:
        needed["--guide-key"] = guide_key
    return needed
