"""Profiles in: a pycytominer profile table (Parquet or CSV) as the AnnData the commands take.

A lab's existing profiles (pycytominer's ``aggregate`` / ``normalize`` / ``feature_select``
output, CellProfiler single-cell tables, DeepProfiler profiles) are a table with
``Metadata_*`` columns and feature columns. :func:`read_profile_table` turns one into the
in-memory AnnData that ``correct``, ``evaluate`` and ``export`` read:

- ``X`` (float32): the feature columns, found by pycytominer's convention
  (``pycytominer.cyto_utils.infer_cp_features``): the numeric columns that start with a
  CellProfiler compartment (``Cells_``, ``Nuclei_``, ``Cytoplasm_``); a table with none
  (DeepProfiler, an scbd-cells export, any embedding) has every numeric column that does
  not start with ``Metadata_`` as a feature;
- ``var_names``: the feature columns' names;
- ``obs``: every other column, names kept (``Metadata_Plate`` stays ``Metadata_Plate``;
  text as categorical strings; a CSV's ``Metadata_*`` columns are read as the text the file
  holds, so plate ``0001`` stays ``"0001"``, and as numbers only where the numbers write
  back as the same text, as ``ObjectNumber`` ``7``);
- ``uns["scbd"]``: ``kind = "profile_table"``, the source and the feature names.

Which ``Metadata_*`` column is the batch, the perturbation or the guide is the command's
``--batch-key`` / ``--perturbation-key`` / ``--guide-key``;
:func:`check_profile_columns` refuses a name the table does not have and names the close
ones. pycytominer itself is not imported at run time: importing it changes a pandas option
for the whole process (``mode.copy_on_write``), and the convention is a prefix test
(``tests/test_profile_tables.py`` checks it against ``infer_cp_features``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.data import schema
from scbd_cells.data.store import did_you_mean

if TYPE_CHECKING:
    import anndata

    from scbd_cells.profiles.cells import Cells

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz")
METADATA_PREFIX = schema.METADATA_PREFIX
# pycytominer's default compartments (infer_cp_features(compartments=...))
CELLPROFILER_COMPARTMENTS = ("Cells", "Nuclei", "Cytoplasm")
KIND = "profile_table"


def is_profile_table(path: str | Path) -> bool:
    """Whether ``path`` names a profile table (``.parquet``, ``.csv``, ``.csv.gz``)."""
    return str(path).lower().endswith(TABLE_SUFFIXES)


def profile_feature_columns(frame: pd.DataFrame) -> list[str]:
    """The feature columns of a profile table, by pycytominer's convention.

    The numeric columns that start with a CellProfiler compartment (``Cells_``,
    ``Nuclei_``, ``Cytoplasm_``, as ``infer_cp_features`` finds them), else every numeric
    column whose name does not start with ``Metadata_``. Boolean columns are not features.
    """

    def numeric(name: Any) -> bool:
        values = frame[name]
        return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)

    compartments = tuple(f"{name.title()}_" for name in CELLPROFILER_COMPARTMENTS)
    cellprofiler = [c for c in frame.columns if str(c).startswith(compartments) and numeric(c)]
    if cellprofiler:
        return [str(c) for c in cellprofiler]
    return [str(c) for c in frame.columns if not str(c).startswith(METADATA_PREFIX) and numeric(c)]


def _lossless_numbers(text: pd.Series) -> pd.Series:
    """A CSV text column as numbers where that loses nothing (``"7"``), else as text.

    Plate ``"0001"`` or well ``"1e3"`` stay text: the numbers would write back differently.
    """
    present = text.dropna()
    try:
        numbers = pd.to_numeric(present)
    except (ValueError, TypeError):
        return text
    if len(present) == 0 or not numbers.astype(str).equals(present.astype(str)):
        return text
    return pd.to_numeric(text)


def _read_frame(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    # Metadata_ columns as the text the file holds (plate "0001" is not the number 1),
    # numbers only where they write back as the same text (ImageNumber, ObjectNumber)
    header = pd.read_csv(path, nrows=0).columns
    text = {name: str for name in header if str(name).startswith(METADATA_PREFIX)}
    frame = pd.read_csv(path, dtype=text, keep_default_na=True)
    for name in text:
        frame[name] = _lossless_numbers(frame[name])
    return frame


def read_profile_table(path: str | Path) -> anndata.AnnData:
    """Read a pycytominer profile table (Parquet or CSV) as an in-memory AnnData.

    Parameters
    ----------
    path
        ``.parquet``, ``.csv`` or ``.csv.gz``: one row per profile (a cell, a well, a
        treatment), ``Metadata_*`` columns and feature columns.

    Returns
    -------
    anndata.AnnData
        ``X`` = the features (float32), ``var_names`` = their names, ``obs`` = the other
        columns under their own names, ``uns["scbd"]`` = ``{"kind": "profile_table",
        "source": ..., "feature_names": [...]}``.

    Raises
    ------
    InputError
        The file does not exist or is not a table this reads.
    DataError
        It cannot be parsed, has no rows, or no feature column.
    """
    import anndata as ad

    source = Path(path)
    if not is_profile_table(source):
        raise InputError(
            f"{source} is not a profile table: expected .parquet, .csv or .csv.gz (pycytominer's "
            "output), or an AnnData (.h5ad, .zarr)."
        )
    if not source.is_file():
        raise InputError(
            f"Profile table {source} does not exist. Pass a pycytominer table (Parquet or CSV "
            "with Metadata_ columns and feature columns) or an AnnData (.h5ad, .zarr)."
        )
    try:
        frame = _read_frame(source)
    except Exception as error:  # pandas/pyarrow raise many types for a bad file
        raise DataError(
            f"Could not read {source} as a table ({type(error).__name__}: {error})."
        ) from None
    if frame.columns.duplicated().any():
        repeated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
        raise DataError(f"{source} repeats the column name(s) {', '.join(repeated)}; rename them.")
    if len(frame) == 0:
        raise DataError(f"{source} has no rows: expected one row per profile.")
    features = profile_feature_columns(frame)
    if not features:
        raise DataError(
            f"{source} has no feature column: expected numeric columns that are not Metadata_ "
            f"(found {', '.join(map(str, frame.columns[:12]))}). pycytominer's convention: "
            "metadata columns start with Metadata_, features are numeric."
        )
    kept = set(features)
    obs = frame[[c for c in frame.columns if c not in kept]].copy()
    obs.columns = [str(c) for c in obs.columns]
    obs.index = pd.Index([str(i) for i in range(len(frame))], dtype=object)
    for column in obs.columns:
        values = obs[column]
        if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
            text = values.astype(object).where(values.notna(), None)
            obs[column] = pd.Categorical(text.map(lambda v: v if v is None else str(v)))
    non_metadata = [c for c in obs.columns if not c.startswith(METADATA_PREFIX)]
    if non_metadata:
        log.info(
            "%s: %d column(s) that are neither Metadata_ nor features kept in obs: %s",
            source, len(non_metadata), ", ".join(non_metadata[:8]),
        )  # fmt: skip
    values = frame[features].to_numpy(dtype=np.float32)  # (n_profiles, n_features)
    missing = ~np.isfinite(values).all(axis=0)
    if missing.any():  # the commands refuse them; say where they are and what removes them
        named = [name for name, bad in zip(features, missing, strict=True) if bad]
        log.warning(
            "%s: %d feature(s) hold NaN or infinite values (%s); drop them first, e.g. "
            "pycytominer.feature_select(..., operation='drop_na_columns').",
            source, len(named), ", ".join(named[:5]),
        )  # fmt: skip
    adata = ad.AnnData(X=values, obs=obs)
    adata.var_names = pd.Index(features, dtype=object)
    adata.uns[schema.UNS_SCBD] = {
        "kind": KIND,
        "source": str(source.resolve()),
        "feature_names": list(features),
    }
    log.info(
        "Read %s: %d profiles x %d features, %d metadata columns",
        source, adata.n_obs, adata.n_vars, obs.shape[1],
    )  # fmt: skip
    return adata


def check_profile_columns(
    adata: anndata.AnnData | Cells, keys: Mapping[str, str | None], *, source: Path
) -> None:
    """Refuse an option that names a column the profiles do not have; name the close ones.

    Parameters
    ----------
    adata
        What :func:`read_profile_table` returned.
    keys
        ``{option: column}``, e.g. ``{"--batch-key": "Metadata_Plate,Metadata_Well"}``; a
        comma list names several columns, None is skipped.
    source
        The table, for the message.
    """
    columns = [str(c) for c in adata.obs.columns]
    metadata = [c for c in columns if c.startswith(METADATA_PREFIX)]
    for option, value in keys.items():
        if value is None:
            continue
        for name in (part.strip() for part in value.split(",") if part.strip()):
            if name in columns:
                continue
            raise DataError(
                f"{source} has no column {name!r} for {option}. {did_you_mean(name, columns)}"
                f"Its metadata columns: {', '.join(metadata[:20]) or 'none'}. A pycytominer "
                f"table names its labels itself: pass them, e.g. {option} "
                f"{metadata[0] if metadata else 'Metadata_Plate'}."
            )


def profile_table_frame(adata: anndata.AnnData, values: np.ndarray) -> pd.DataFrame:
    """``obs`` (text as plain strings, nulls kept) then one column per feature of ``values``."""
    obs = adata.obs
    columns: dict[str, Any] = {}
    for column in obs.columns:
        series = obs[column]
        if isinstance(series.dtype, pd.CategoricalDtype):
            series = series.astype(object).where(series.notna(), None)
        columns[str(column)] = series.to_numpy()
    frame = pd.DataFrame(columns)
    features = pd.DataFrame(np.asarray(values), columns=[str(n) for n in adata.var_names])
    return pd.concat([frame, features], axis=1)


def write_profile_table(frame: pd.DataFrame, out_path: Path, *, overwrite: bool) -> None:
    """Write ``frame`` as Parquet or CSV (by suffix; ``.csv.gz`` gzipped) into place atomically.

    The output's ownership is recorded (``outputs.publish``), and an existing file is
    replaced only with ``overwrite`` and only if scbd-cells wrote it.
    """
    from scbd_cells.core.outputs import atomic_path

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path, kind="table", overwrite=overwrite) as tmp_path:
        if out_path.suffix == ".parquet":
            frame.to_parquet(tmp_path, index=False)
        else:  # the temporary name keeps the last suffix, so ".gz" still means gzip
            frame.to_csv(tmp_path, index=False)
