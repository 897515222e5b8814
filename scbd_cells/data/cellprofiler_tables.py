"""Ingest: the naming conventions of CellProfiler's tables, so its output is read as it comes.

CellProfiler's ExportToSpreadsheet writes a per-image table (``Image.csv``: ``ImageNumber``,
``FileName_<Image>``/``PathName_<Image>`` for every image name of NamesAndTypes,
``Metadata_*``) and one table per object (``Nuclei.csv``: ``ImageNumber``,
``ObjectNumber``, ``Location_Center_X``/``_Y``, measurements). ExportToDatabase and
merged tables prefix the names with the table (``Image_FileName_DNA``,
``Nuclei_Location_Center_X``). This module finds those columns; ingest joins the tables,
builds the paths, takes the centroids and names the cells.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.data import schema

IMAGE_NUMBER = "ImageNumber"
OBJECT_NUMBER = "ObjectNumber"
_PAIR = re.compile(r"^(?:Image_)?(PathName|FileName)_(.+)$")
_OBJECTS_PAIR = re.compile(r"^(?:Image_)?Objects(PathName|FileName)_(.+)$")
_CENTER_X = re.compile(r"^(?:(.+)_)?Location_Center_X$")


def is_metadata_column(name: object) -> bool:
    """A ``Metadata_*`` column (also ``Image_Metadata_*`` of merged CellProfiler tables)."""
    text = str(name)
    return text.startswith(schema.METADATA_PREFIX) or text.startswith(
        "Image_" + schema.METADATA_PREFIX
    )


def image_pairs(columns: Sequence[object], *, objects: bool = False) -> dict[str, tuple[str, str]]:
    """``{image name: (PathName column, FileName column)}`` for every complete pair, in order.

    ``Image_PathName_DNA`` + ``Image_FileName_DNA`` and ``PathName_DNA`` +
    ``FileName_DNA`` both give the image name ``DNA`` (the prefixed pair wins if a table
    has both). Object files (``ObjectsPathName_Nuclei``/``ObjectsFileName_Nuclei``: label
    images loaded by NamesAndTypes) count only with ``objects``; URLs are not read.
    """
    pattern = _OBJECTS_PAIR if objects else _PAIR
    found: dict[str, dict[str, str]] = {}
    for column in map(str, columns):
        match = pattern.match(column)
        if match:
            kind, name = match.groups()
            pair = found.setdefault(name, {})
            if kind not in pair or column.startswith("Image_"):
                pair[kind] = column
    return {
        name: (pair["PathName"], pair["FileName"]) for name, pair in found.items() if len(pair) == 2
    }


def choose_images(
    pairs: dict[str, tuple[str, str]], channels: Sequence[str] | None
) -> dict[str, tuple[str, str]]:
    """The pairs read as channels: those named in ``channels`` (in that order), else all."""
    if not channels:
        return pairs
    missing = [name for name in channels if name not in pairs]
    if missing:
        raise InputError(
            f"--channels names {missing}, which have no PathName_/FileName_ column pair in the "
            f"table; the image names with both columns are {list(pairs) or 'none'}."
        )
    return {name: pairs[name] for name in channels}


def image_paths(
    table: pd.DataFrame, pair: tuple[str, str], *, image_root: Path
) -> list[str | None]:
    """``image_root / PathName / FileName`` per row (an absolute PathName stays itself)."""
    path_column, file_column = pair
    folders, files = table[path_column], table[file_column]
    return [
        None if pd.isna(folder) or pd.isna(name) else str(image_root / str(folder) / str(name))
        for folder, name in zip(folders, files, strict=True)
    ]


def centroid_columns(columns: Sequence[object]) -> list[tuple[str, str]]:
    """Every ``[<Object>_]Location_Center_X`` with its ``_Y`` column, in table order."""
    names = set(map(str, columns))
    pairs = []
    for column in map(str, columns):
        if _CENTER_X.match(column):
            y_column = column[: -len("X")] + "Y"
            if y_column in names:
                pairs.append((column, y_column))
    return pairs


def join_image_table(
    objects: pd.DataFrame, images: pd.DataFrame, *, image_table: Path
) -> pd.DataFrame:
    """The object table with each row's image columns, joined on ``ImageNumber``.

    Columns both tables hold (``Metadata_*`` when the object table has them) keep the
    object table's values. Object rows whose image is not in the image table get empty
    image columns (ingest then reports them as rows without a field).
    """
    for name, frame in (("object", objects), ("image", images)):
        if IMAGE_NUMBER not in frame.columns:
            raise InputError(
                f"The {name} table has no {IMAGE_NUMBER!r} column to join the tables on; its "
                f"columns are {list(frame.columns)[:20]}. Pass CellProfiler's per-object "
                "table as TABLE and its per-image table with --image-table."
            )
    repeated = images[IMAGE_NUMBER].duplicated()
    if repeated.any():
        examples = images.loc[repeated, IMAGE_NUMBER].head(5).tolist()
        raise DataError(
            f"The image table {image_table} repeats {IMAGE_NUMBER} {examples}: it is not one "
            "row per image (tables of several CellProfiler runs concatenated?). Join each "
            "run's object and image tables yourself (on the plate and ImageNumber) and pass "
            "the merged table alone."
        )
    added = [column for column in images.columns if column not in objects.columns]
    joined = objects.merge(
        images[[IMAGE_NUMBER, *added]], on=IMAGE_NUMBER, how="left", validate="many_to_one"
    )
    return joined.set_axis(pd.RangeIndex(len(joined)))


def numbered_cell_ids(table: pd.DataFrame) -> pd.Series | None:
    """``"<ImageNumber>_<ObjectNumber>"`` per row (null where either is), if both columns exist.

    The names ``Metadata_ImageNumber`` / ``Metadata_ObjectNumber`` (pycytominer's) work too.
    """
    for prefix in ("", schema.METADATA_PREFIX):
        image, number = prefix + IMAGE_NUMBER, prefix + OBJECT_NUMBER
        if image in table.columns and number in table.columns:
            ids = [
                None if pd.isna(a) or pd.isna(b) else f"{_integer_text(a)}_{_integer_text(b)}"
                for a, b in zip(table[image], table[number], strict=True)
            ]
            return pd.Series(ids, index=table.index, dtype=object)
    return None


def _integer_text(value: object) -> str:
    """``12`` for 12, 12.0 and "12" (a column with nulls is read as float); else the text."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if np.isfinite(number) and number == int(number) else str(value)
