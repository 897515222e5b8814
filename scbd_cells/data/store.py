"""Store: the Zarr v3 group that holds a screen's cell images, labels, split and statistics.

Layout (docs/store.md explains the reasoning)::

    STORE.zarr/
      zarr.json          group attributes: format, format_version, complete, channel_names,
                         channel_stats, control, class_ranges, split_fractions, seed, store_id,
                         layout, provenance
      images/            (N, C, H, W) array in the input dtype, chunks of whole cells
      obs.parquet        the per-cell table in store order (categorical labels)
      rejected.csv       rows skipped by ``--skip-bad`` (row, cell_id, reason)

Cells are stored grouped by perturbation (one contiguous run per class, classes
in sorted order), shuffled within each class with the ingest seed so that wells
mix. A store is written into ``STORE.zarr.partial`` and renamed to
``STORE.zarr`` only once complete, so a finished-looking store is a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import FsspecStore, LocalStore

from scbd_cells import __version__
from scbd_cells.core.errors import DataError, InputError, StoreError
from scbd_cells.core.outputs import check_output, object_url, remove_owned, write_text_atomic
from scbd_cells.data import schema

log = logging.getLogger(__name__)

IMAGES_KEY = "images"
OBS_FILE = "obs.parquet"
#: The obs columns training reads (:attr:`Store.labels`).
LABEL_COLUMNS = (schema.PERTURBATION, schema.GUIDE, schema.BATCH, schema.SPLIT)
REJECTED_FILE = "rejected.csv"
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "ingest_state.json"
#: Per chunk file (a shard when the store is sharded), by index along the cells: the CRC32C
#: that ends the file. It binds each chunk to its place (docs/store.md, "Chunks in their place").
CHUNK_CHECKSUMS_FILE = "chunk_checksums.npy"
WRITTEN_FILE = "written_blocks.txt"
TABLE_ROW = "table_row"

DEFAULT_SPLIT_FRACTIONS = (0.83, 0.02, 0.15)
DEFAULT_BATCH_COLUMNS = ("plate", "well")
BATCH_SEPARATOR = "_"
STAT_NAMES = ("mean", "std", "min", "max", "p01", "p99")

# Chunks of about 1 MiB: large enough that zarr's per-chunk overhead is small,
# small enough that a class-balanced batch (a few cells from each of many
# classes) does not decode much it does not use. Writes go in blocks of whole
# chunks of about 64 MiB, the unit of resumption after a crash.
_CHUNK_TARGET_BYTES = 1 << 20
_BLOCK_TARGET_BYTES = 64 << 20
_MAX_ROWS_IN_MESSAGE = 5
# Store.read: up to this many runs of chunks are read as slices, more in one scattered read
_MAX_SLICED_RUNS = 8


def CHUNK_CODECS() -> list:  # noqa: N802 (a constant made fresh for each array)
    """Bytes-to-bytes codecs of every image chunk: blosc-lz4, then a CRC32C checksum.

    The checksum lets every reader (zarr-python, tensorstore) tell a damaged
    chunk from a good one instead of decoding garbage.
    """
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]


# Every chunk is written, even one whose cells are all zero: a missing chunk file then always
# means damage, never "all fill value", and reads refuse it (CheckedLocalStore).
WRITE_CONFIG = {"write_empty_chunks": True}


# ---------------------------------------------------------------------------
# labels, layout and split
# ---------------------------------------------------------------------------


def describe_rows(rows: Sequence[Any], *, limit: int = _MAX_ROWS_IN_MESSAGE) -> str:
    """``"rows 3, 7, 9 (and 12 more)"`` for an error message."""
    rows = list(rows)
    shown = ", ".join(str(row) for row in rows[:limit])
    more = f" (and {len(rows) - limit} more)" if len(rows) > limit else ""
    return f"row{'s' if len(rows) != 1 else ''} {shown}{more}"


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``"Did you mean 'nontargeting'? "`` for the closest of ``choices`` (case ignored), or ``""``.

    For a control label or a column name typed slightly wrong: the right one is named
    even when it is not among the first few alphabetically. A column name also finds the
    prefixed column of other tools (``plate``: ``Metadata_Plate``).
    """
    import difflib

    by_lower = {str(choice).lower(): str(choice) for choice in choices}
    wanted = str(word).lower()
    close = difflib.get_close_matches(wanted, list(by_lower), n=3, cutoff=0.6)
    close += [name for name in by_lower if name.endswith(f"_{wanted}") and name not in close]
    close = close[:3]
    if not close:
        return ""
    names = " or ".join(repr(by_lower[match]) for match in close)
    return f"Did you mean {names}? "


@dataclass
class LabelledTable:
    """The canonical per-cell table built from an input table, in table order."""

    obs: pd.DataFrame
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (row, cell_id, reason)


def label_table(
    table: pd.DataFrame,
    *,
    perturbation_column: str,
    guide_column: str | None = None,
    batch_columns: Sequence[str] = DEFAULT_BATCH_COLUMNS,
    control: str | None = None,
    skip_bad: bool = False,
    cell_id_column: str | None = None,
) -> LabelledTable:
    """Check the label columns and build ``cell_id, perturbation, guide, batch`` plus metadata.

    Parameters
    ----------
    table
        One row per cell, in input order (``table_row`` = position in it).
    perturbation_column, guide_column, batch_columns
        Columns holding the labels; the batch columns are joined with ``_``.
        Without a guide column the guide is the perturbation label.
    control
        The control's perturbation label; must occur in the table.
    skip_bad
        Reject rows with null labels or repeated cell ids instead of raising.
    cell_id_column
        The column naming the cells (default ``cell_id`` if the table has one, else the
        row numbers name them); kept under its own name too.

    Returns
    -------
    LabelledTable
        ``obs`` (string labels, not yet categorical, rejected rows dropped) and
        the rejected rows.
    """
    batch_columns = list(batch_columns)
    label_columns = [perturbation_column, *([guide_column] if guide_column else []), *batch_columns]
    _check_label_columns(table, label_columns, cell_id_column=cell_id_column)
    id_column = cell_id_column or (schema.CELL_ID if schema.CELL_ID in table.columns else None)
    table = table.reset_index(drop=True)
    cell_id, bad, rejected = _bad_rows(table, label_columns, id_column, skip_bad=skip_bad)
    perturbation = table[perturbation_column].astype(str)
    if control is not None and not (perturbation[~bad] == str(control)).any():
        known = perturbation[~bad].unique().tolist()
        raise InputError(
            f"The control label {control!r} does not occur in column {perturbation_column!r} "
            f"({len(known):,} labels). {did_you_mean(str(control), known)}Pass the control's "
            "exact label with --control (or leave it out)."
        )
    canonical = {
        schema.CELL_ID: cell_id,
        schema.PERTURBATION: perturbation,
        schema.GUIDE: table[guide_column].astype(str) if guide_column else perturbation,
        schema.BATCH: _batch_labels(table, batch_columns),
    }
    sources = {
        schema.CELL_ID: id_column,
        schema.PERTURBATION: perturbation_column,
        schema.GUIDE: guide_column,
    }
    obs = _with_table_columns(canonical, table, sources=sources)
    obs = obs[~bad].reset_index(drop=True)
    return LabelledTable(obs=obs, rejected=sorted(rejected))


def _check_label_columns(
    table: pd.DataFrame, label_columns: list[str], *, cell_id_column: str | None
) -> None:
    """The table has rows, the label columns and the cell id column, else a named error."""
    if len(table) == 0:
        raise DataError(
            "The cells table is empty: expected one row per cell, found none. "
            "Check the file (and any filter that produced it)."
        )
    missing = [name for name in label_columns if name not in table.columns]
    if missing:
        raise InputError(
            f"The cells table has no column {', '.join(map(repr, missing))}: expected the label "
            f"columns {label_columns}, found columns {list(table.columns)}. "
            f"{''.join(did_you_mean(name, list(table.columns)) for name in missing)}Pass the right "
            "--perturbation-column / --guide-column / --batch-columns."
        )
    if cell_id_column is not None and cell_id_column not in table.columns:
        raise InputError(
            f"The cells table has no column {cell_id_column!r} (--cell-id-column). "
            f"{did_you_mean(cell_id_column, list(map(str, table.columns)))}"
            "Name the column that holds each cell's id."
        )


def _bad_rows(
    table: pd.DataFrame, label_columns: list[str], id_column: str | None, *, skip_bad: bool
) -> tuple[pd.Series, np.ndarray, list[tuple[int, str, str]]]:
    """Each row's cell id, which rows are bad and why (null labels or ids, repeated ids).

    Without ``skip_bad`` the first kind of bad row found raises instead.
    """
    rejected: list[tuple[int, str, str]] = []
    if id_column is not None:
        cell_id = table[id_column].astype(str)
        null_ids = table[id_column].isna().to_numpy()
    else:
        cell_id = pd.Series([str(row) for row in range(len(table))])
        null_ids = np.zeros(len(table), bool)
    bad = np.zeros(len(table), bool)
    for name in label_columns:
        nulls = table[name].isna().to_numpy()
        if nulls.any():
            rows = np.flatnonzero(nulls).tolist()
            if not skip_bad:
                raise DataError(
                    f"Column {name!r} has empty (null) labels in {describe_rows(rows)} of the "
                    "cells table (rows count from 0, header excluded). Every cell needs a "
                    "label: fill or drop those rows, or pass --skip-bad to leave them out."
                )
            for row in rows:
                if not bad[row]:
                    rejected.append((row, cell_id[row], f"null label in column {name!r}"))
            bad |= nulls
    if null_ids.any():
        rows = np.flatnonzero(null_ids).tolist()
        if not skip_bad:
            raise DataError(
                f"Column {id_column!r} is empty in {describe_rows(rows)}. Fill in the cell "
                "ids, drop the column (ids are then the row numbers), or pass --skip-bad."
            )
        rejected.extend((row, "", "null cell id") for row in rows if not bad[row])
        bad |= null_ids
    duplicated = cell_id.duplicated(keep="first").to_numpy() & ~bad
    if duplicated.any():
        rows = np.flatnonzero(duplicated).tolist()
        if not skip_bad:
            examples = ", ".join(f"{row} ({cell_id[row]!r})" for row in rows[:_MAX_ROWS_IN_MESSAGE])
            raise DataError(
                f"Column {id_column!r} repeats cell ids: {len(rows)} rows reuse an id seen "
                f"earlier, e.g. rows {examples}. Cell ids must be unique: fix the table or pass "
                "--skip-bad to keep only the first row of each id."
            )
        rejected.extend((row, cell_id[row], "duplicate cell id") for row in rows)
        bad |= duplicated
    return cell_id, bad, rejected


def _batch_labels(table: pd.DataFrame, batch_columns: list[str]) -> pd.Series:
    """The batch columns joined with :data:`BATCH_SEPARATOR`; ``all`` without any."""
    if not batch_columns:
        return pd.Series(["all"] * len(table))
    batch = table[batch_columns[0]].astype(str)
    for name in batch_columns[1:]:
        batch = batch + BATCH_SEPARATOR + table[name].astype(str)
    return batch


def _with_table_columns(
    canonical: dict[str, pd.Series], table: pd.DataFrame, *, sources: dict[str, str | None]
) -> pd.DataFrame:
    """The canonical columns, then every column of the table, then ``table_row``.

    A table column named like a store label is kept as ``<name>_input``, unless it is
    the one the canonical column was read from (``sources``).
    """
    obs = pd.DataFrame({name: values.to_numpy(dtype=object) for name, values in canonical.items()})
    for name in table.columns:
        target = str(name)
        if target in canonical or target in (schema.SPLIT, TABLE_ROW):
            if sources.get(target) == name:
                continue  # the canonical column already holds it
            target = f"{target}_input"
            log.info(
                "Column %r of the table is kept as %r (the name is a store label).", name, target
            )
        obs[target] = table[name]  # same RangeIndex; keeps categoricals and nullable dtypes
    obs[TABLE_ROW] = np.arange(len(table), dtype=np.int64)
    return obs


def check_split_fractions(split_fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative fractions (train, val, test) that sum to 1."""
    fractions = tuple(float(value) for value in split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(
            f"Split fractions must be three non-negative numbers (train, val, test) summing to 1; "
            f"found {fractions}. Example: 0.83,0.02,0.15."
        )
    return fractions  # type: ignore[return-value]


def layout_order(perturbation: pd.Series, *, seed: int) -> np.ndarray:
    """Store order: rows grouped by perturbation (classes sorted), shuffled within each class.

    Returns the table positions (int64) in store order.
    """
    rng = np.random.default_rng([seed, 0])
    codes, categories = pd.factorize(perturbation, sort=True)
    shuffled = rng.permutation(len(codes))
    # stable sort of a random permutation by class = random order within each class
    return shuffled[np.argsort(codes[shuffled], kind="stable")].astype(np.int64)


def assign_split(
    perturbation: pd.Series, *, split_fractions: Sequence[float], seed: int
) -> np.ndarray:
    """A train/val/test label per cell, stratified by perturbation and seeded.

    Each class gives ``n * fraction`` cells to val and to test: the integer part
    always, the fractional part with that probability, so small classes are
    represented in proportion on average and every class keeps at least one
    training cell.
    """
    train_fraction, val_fraction, test_fraction = check_split_fractions(split_fractions)
    rng = np.random.default_rng([seed, 1])
    codes, _ = pd.factorize(perturbation, sort=True)
    split = np.zeros(len(codes), np.int8)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for members in np.split(order, bounds):
        size = len(members)
        counts = []
        for fraction in (val_fraction, test_fraction):
            expected = size * fraction
            counts.append(int(expected) + int(rng.random() < expected - int(expected)))
        n_val, n_test = counts
        while n_val + n_test >= size and (n_val or n_test) and train_fraction > 0:
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        members = rng.permutation(members)
        split[members[:n_val]] = 1
        split[members[n_val : n_val + n_test]] = 2
    return np.asarray(schema.SPLITS, dtype=object)[split]


def finalise_obs(obs: pd.DataFrame, *, split_fractions: Sequence[float], seed: int) -> pd.DataFrame:
    """Order cells for the store, add the split, make labels categorical, index by cell id."""
    split = assign_split(obs[schema.PERTURBATION], split_fractions=split_fractions, seed=seed)
    obs = obs.assign(**{schema.SPLIT: split})
    order = layout_order(obs[schema.PERTURBATION], seed=seed)
    obs = obs.iloc[order].reset_index(drop=True)
    for name in (schema.PERTURBATION, schema.GUIDE, schema.BATCH):
        obs[name] = pd.Categorical(obs[name].astype(str))
    obs[schema.SPLIT] = pd.Categorical(
        obs[schema.SPLIT].astype(str), categories=list(schema.SPLITS)
    )
    obs[schema.CELL_ID] = obs[schema.CELL_ID].astype(str)
    columns = [schema.CELL_ID, schema.PERTURBATION, schema.GUIDE, schema.BATCH, schema.SPLIT]
    obs = obs[columns + [name for name in obs.columns if name not in columns]]
    obs.index = pd.Index(obs[schema.CELL_ID].to_numpy(dtype=object), dtype=object)
    return obs


def class_ranges_of(perturbation: pd.Series) -> dict[str, tuple[int, int]]:
    """``{class: (start, stop)}`` of a perturbation column already in store order."""
    values = perturbation.astype(str).to_numpy()
    if len(values) == 0:
        return {}
    starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
    stops = np.concatenate([starts[1:], [len(values)]])
    ranges = {
        str(values[start]): (int(start), int(stop))
        for start, stop in zip(starts, stops, strict=True)
    }
    if len(ranges) != len(starts):
        raise StoreError("The store's cells are not grouped by perturbation; re-ingest it.")
    return ranges


# ---------------------------------------------------------------------------
# per-channel statistics, accumulated block by block
# ---------------------------------------------------------------------------


class ChannelStats:
    """Running per-channel mean, std, min, max and 1st/99th percentiles of raw intensities.

    Integer images of up to 16 bits keep one histogram per channel, from which
    every statistic is exact (percentiles as ``numpy.percentile(...,
    method="inverted_cdf")``) and updating costs one ``bincount`` per channel.
    Other dtypes combine per-block mean and variance exactly (Chan et al.'s
    parallel update) and take percentiles from a seeded sample of up to 2,048
    pixels per channel and block. Std is the population std (ddof 0).
    """

    def __init__(self, n_channels: int, dtype: np.dtype, *, seed: int = 0) -> None:
        self.n_channels = n_channels
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._histogram: np.ndarray | None = None
        self._offset = 0
        if self.dtype.kind in "ui" and self.dtype.itemsize <= 2:
            self._offset = int(np.iinfo(self.dtype).min)
            self._histogram = np.zeros((n_channels, 1 << (8 * self.dtype.itemsize)), np.int64)
        self.mean = np.zeros(n_channels)
        self.m2 = np.zeros(n_channels)
        self.minimum = np.full(n_channels, np.inf)
        self.maximum = np.full(n_channels, -np.inf)
        self._samples: list[np.ndarray] = []
        self._rng = np.random.default_rng([seed, 2])
        self.n_blank = 0  # cells whose every pixel is 0, over all splits (count_blank)

    def count_blank(self, images: np.ndarray) -> None:
        """Count the cells of (n, C, H, W) ``images`` that are entirely zero (all splits)."""
        self.n_blank += int(len(images) - np.count_nonzero(images.reshape(len(images), -1).any(1)))

    def update(self, images: np.ndarray) -> None:
        """Add a block of cells, (n, C, H, W)."""
        if len(images) == 0:
            return
        count = images.size // self.n_channels
        if self._histogram is not None:
            bins = self._histogram.shape[1]
            for channel in range(self.n_channels):
                values = images[:, channel].ravel()
                if self._offset:
                    values = values.astype(np.int32) - self._offset
                self._histogram[channel] += np.bincount(values, minlength=bins)
            self.count += count
            return
        pixels = images.transpose(1, 0, 2, 3).reshape(self.n_channels, -1)  # (C, n*H*W)
        block_mean = pixels.mean(axis=1, dtype=np.float64)
        block_m2 = ((pixels - block_mean[:, None]) ** 2).sum(axis=1, dtype=np.float64)
        total = self.count + count
        delta = block_mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + block_m2 + delta**2 * self.count * count / total
        self.count = total
        self.minimum = np.minimum(self.minimum, pixels.min(axis=1))
        self.maximum = np.maximum(self.maximum, pixels.max(axis=1))
        columns = self._rng.choice(count, size=min(count, 2048), replace=False)
        self._samples.append(pixels[:, columns].astype(np.float64))

    def merge(self, other: ChannelStats) -> None:
        """Add the pixels another accumulator has seen (e.g. a worker's)."""
        self.n_blank += other.n_blank
        if other.count == 0:
            return
        if self._histogram is not None:
            self._histogram += other._histogram
            self.count += other.count
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * other.count / total
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / total
        self.count = total
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)
        self._samples.extend(other._samples)

    def __getstate__(self) -> dict:
        # a worker's histogram is mostly zeros: send only the occupied bins
        state = self.__dict__.copy()
        if self._histogram is not None:
            channel, value = np.nonzero(self._histogram)
            state["_histogram"] = (
                self._histogram.shape,
                channel,
                value,
                self._histogram[channel, value],
            )
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("_histogram"), tuple):
            shape, channel, value, counts = state["_histogram"]
            histogram = np.zeros(shape, np.int64)
            histogram[channel, value] = counts
            state["_histogram"] = histogram
        self.__dict__.update(state)

    def result(self) -> dict[str, list[float]]:
        """``{"mean": [...], "std": [...], "min", "max", "p01", "p99"}``, one value per channel."""
        if self.count == 0:
            nan = [float("nan")] * self.n_channels
            return {name: list(nan) for name in STAT_NAMES}
        if self._histogram is not None:
            values = np.arange(self._histogram.shape[1], dtype=np.float64) + self._offset
            counts = self._histogram.astype(np.float64)
            mean = counts @ values / self.count
            variance = (counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / self.count
            occupied = self._histogram > 0
            minimum = occupied.argmax(axis=1) + self._offset
            maximum = occupied.shape[1] - 1 - occupied[:, ::-1].argmax(axis=1) + self._offset
            cumulative = np.cumsum(self._histogram, axis=1)
            percentiles = []
            for quantile in (0.01, 0.99):
                # inverted CDF: smallest value whose cumulative count reaches q * n
                target = np.ceil(quantile * self.count)
                percentiles.append((cumulative < target).sum(axis=1) + self._offset)
            p01, p99 = percentiles
        else:
            mean, variance = self.mean, self.m2 / self.count
            minimum, maximum = self.minimum, self.maximum
            samples = np.concatenate(self._samples, axis=1)
            p01, p99 = np.quantile(samples, [0.01, 0.99], axis=1, method="inverted_cdf")
        std = np.sqrt(np.maximum(variance, 0))
        values = (mean, std, minimum, maximum, p01, p99)
        return {
            name: [float(v) for v in value] for name, value in zip(STAT_NAMES, values, strict=True)
        }


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def _is_partial_store(path: Path) -> bool:
    """Whether ``path`` is an unfinished store that scbd-cells began (safe to discard)."""
    try:
        attributes = json.loads((path / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return attributes.get("format") == schema.STORE_FORMAT and attributes.get("complete") is False


def check_partial(path: Path) -> None:
    """Refuse when ``STORE.zarr.partial`` exists but is not an unfinished store of ours."""
    partial = partial_path_of(Path(path))
    if (partial.exists() or partial.is_symlink()) and not _is_partial_store(partial):
        raise InputError(
            f"{partial} exists but is not an unfinished store written by scbd-cells (no store "
            "format in it); ingest writes there first, so it stops rather than touch it. Move it "
            "away, or choose another --out."
        )


def partial_path_of(path: Path) -> Path:
    """Where a store is written before it is complete: ``STORE.zarr.partial``."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def chunk_cells_for(cell_bytes: int) -> int:
    """Cells per chunk: about 1 MiB of raw pixels, between 8 and 1,024 cells."""
    return int(min(1024, max(8, _CHUNK_TARGET_BYTES // max(cell_bytes, 1))))


def _fsync_append(path: Path, line: str) -> None:
    with open(path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _to_json(value: Any) -> Any:
    """Make numpy scalars and tuples JSON-friendly for zarr attributes."""
    return json.loads(
        json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item))
    )


class StoreWriter:
    """Writes a store block by block into ``PATH.partial`` and renames it when complete.

    A rerun with the same ``plan_key`` (same table, options and seed) resumes:
    blocks listed in ``written_blocks.txt`` (appended, fsync'd, after each block
    is stored) are kept, the rest are written again. A different ``plan_key``
    discards the partial store and starts afresh.

    Parameters
    ----------
    path
        The final store path (``STORE.zarr``).
    obs
        The per-cell table in store order (from :func:`finalise_obs`).
    image_shape
        (C, H, W) of every cell.
    dtype
        Pixel dtype of the stored images.
    plan_key
        A string identifying everything that decides the store's content.
    """

    def __init__(
        self,
        path: Path,
        *,
        obs: pd.DataFrame,
        image_shape: tuple[int, int, int],
        dtype: np.dtype,
        channel_names: Sequence[str],
        control: str | None,
        split_fractions: Sequence[float],
        seed: int,
        provenance: dict,
        plan_key: str,
        overwrite: bool = False,
        chunk_cells: int | None = None,
        shard_cells: int | None = None,
        block_cells: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.partial_path = partial_path_of(self.path)
        self.obs = obs
        self.image_shape = tuple(int(size) for size in image_shape)
        self.dtype = np.dtype(dtype)
        self.overwrite = overwrite
        self.plan_key = plan_key
        n_channels, height, width = self.image_shape
        if len(channel_names) != n_channels:
            raise InputError(
                f"Expected {n_channels} channel names (the images have {n_channels} channels), "
                f"found {len(channel_names)}: {list(channel_names)}. Pass one name per channel."
            )
        check_output(self.path, kind="store", overwrite=overwrite)
        cell_bytes = n_channels * height * width * self.dtype.itemsize
        self.chunk_cells = int(chunk_cells or chunk_cells_for(cell_bytes))
        self.shard_cells = int(shard_cells) if shard_cells else None
        unit = self.shard_cells or self.chunk_cells
        if self.shard_cells and self.shard_cells % self.chunk_cells:
            raise InputError(f"shard_cells ({shard_cells}) must be a multiple of chunk_cells.")
        self.block_cells = unit * max(1, _BLOCK_TARGET_BYTES // (unit * cell_bytes))
        if block_cells:
            self.block_cells = unit * max(1, -(-int(block_cells) // unit))
        self.n_cells = len(obs)
        self.n_blocks = -(-self.n_cells // self.block_cells)
        self.train_mask = (obs[schema.SPLIT].astype(str) == "train").to_numpy()
        if not self.train_mask.any():
            log.warning("No cell is in the train split; channel statistics use all cells.")
            self.train_mask[:] = True
        self.stats = ChannelStats(n_channels, self.dtype, seed=seed)
        self.attributes = {
            "format": schema.STORE_FORMAT,
            "format_version": schema.STORE_FORMAT_VERSION,
            "complete": False,
            "n_cells": self.n_cells,
            "channel_names": [str(name) for name in channel_names],
            "dtype": self.dtype.name,
            "image_size": [height, width],
            "control": None if control is None else str(control),
            "split_fractions": list(check_split_fractions(split_fractions)),
            "seed": int(seed),
            "class_ranges": {
                name: list(bounds)
                for name, bounds in class_ranges_of(obs[schema.PERTURBATION]).items()
            },
            "layout": {
                "order": "grouped by perturbation (sorted), shuffled within class",
                "chunk_cells": self.chunk_cells,
                "shard_cells": self.shard_cells,
                "block_cells": self.block_cells,
            },
            "provenance": _to_json(provenance),
        }
        self.done_blocks = self._open()

    # -- setup -----------------------------------------------------------------

    def _open(self) -> set[int]:
        state_path = self.partial_path / STATE_FILE
        if self.partial_path.exists():
            state = None
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError):
                pass
            if state is not None and state.get("plan_key") == self.plan_key:
                self.attributes["store_id"] = state["store_id"]
                self.group = zarr.open_group(self.partial_path, mode="r+")
                self.images = zarr.open_array(
                    self.partial_path / IMAGES_KEY, mode="r+", config=WRITE_CONFIG
                )
                # the unfinished store's own geometry wins over this run's defaults
                self.chunk_cells = int(self.images.chunks[0])
                shards = getattr(self.images, "shards", None)
                self.shard_cells = int(shards[0]) if shards else None
                self.block_cells = int(state["block_cells"])
                self.n_blocks = -(-self.n_cells // self.block_cells)
                self.attributes["layout"].update(
                    chunk_cells=self.chunk_cells, block_cells=self.block_cells
                )
                written = self.partial_path / WRITTEN_FILE
                lines = written.read_text().split() if written.exists() else []
                done = {int(line) for line in lines}
                log.info(
                    "Resuming the unfinished store %s: %d of %d blocks already written.",
                    self.partial_path,
                    len(done),
                    self.n_blocks,
                )
                self._restore_stats(done)
                return done
            check_partial(self.path)
            log.info(
                "Discarding an unfinished store from a different command: %s", self.partial_path
            )
            shutil.rmtree(self.partial_path)
        store_id = uuid.uuid4().hex
        self.attributes["store_id"] = store_id
        # the format attribute is in the group's first zarr.json: a partial folder without it
        # was not made here (and is never deleted)
        self.group = zarr.open_group(
            self.partial_path, mode="w", zarr_format=3, attributes=self.attributes
        )
        n_channels, height, width = self.image_shape
        self.images = self.group.create_array(
            IMAGES_KEY,
            shape=(self.n_cells, n_channels, height, width),
            dtype=self.dtype,
            chunks=(self.chunk_cells, n_channels, height, width),
            shards=(self.shard_cells, n_channels, height, width) if self.shard_cells else None,
            compressors=CHUNK_CODECS(),
            fill_value=0,
            dimension_names=("cell", "channel", "y", "x"),
            config=WRITE_CONFIG,
        )
        self.obs.to_parquet(self.partial_path / OBS_FILE, index=False)
        (self.partial_path / WRITTEN_FILE).write_text("")
        # the state file goes last: a partial store without it is simply restarted
        state = {"plan_key": self.plan_key, "store_id": store_id, "block_cells": self.block_cells}
        write_text_atomic(state_path, json.dumps(state, indent=1))
        return set()

    def _restore_stats(self, done: set[int]) -> None:
        for block in sorted(done):
            start, stop = self.block_bounds(block)
            images = self.images[start:stop]
            self.stats.update(images[self.train_mask[start:stop]])
            self.stats.count_blank(images)

    # -- writing ----------------------------------------------------------------

    def block_bounds(self, block: int) -> tuple[int, int]:
        """Store rows ``[start, stop)`` of a write block."""
        start = block * self.block_cells
        return start, min(start + self.block_cells, self.n_cells)

    def pending_blocks(self) -> list[int]:
        """Blocks not yet written, in order."""
        return [block for block in range(self.n_blocks) if block not in self.done_blocks]

    def write_block(self, block: int, images: np.ndarray) -> None:
        """Store one block of cells (``block_bounds(block)``) and record it as written."""
        start, stop = self.block_bounds(block)
        expected = (stop - start, *self.image_shape)
        if images.shape != expected:
            raise DataError(
                f"Block {block}: expected images of shape {expected}, got {images.shape}."
            )
        images = np.ascontiguousarray(images, dtype=self.dtype)
        self.images[start:stop] = images
        self.stats.update(images[self.train_mask[start:stop]])
        self.stats.count_blank(images)
        _fsync_append(self.partial_path / WRITTEN_FILE, str(block))
        self.done_blocks.add(block)

    def record_block(self, block: int, stats: ChannelStats) -> None:
        """Record a block whose chunks workers stored (:func:`write_cells`), with their stats."""
        self.stats.merge(stats)
        _fsync_append(self.partial_path / WRITTEN_FILE, str(block))
        self.done_blocks.add(block)

    @property
    def write_unit(self) -> int:
        """Cells that only one writer may touch at a time: a shard, or else a chunk."""
        return self.shard_cells or self.chunk_cells

    @property
    def store_id(self) -> str:
        return str(self.attributes["store_id"])

    @property
    def images_path(self) -> Path:
        """The images array inside the partial store, for workers that write whole chunks."""
        return self.partial_path / IMAGES_KEY

    def finish(
        self, *, rejected: Sequence[tuple[int, str, str]] = (), extra: dict | None = None
    ) -> Path:
        """Write the statistics and the completion flag, then rename ``.partial`` to the store."""
        missing = self.pending_blocks()
        if missing:
            raise StoreError(f"Cannot finish the store: blocks {missing[:5]} were not written.")
        rejected_table = pd.DataFrame(list(rejected), columns=["row", schema.CELL_ID, "reason"])
        rejected_table.to_csv(self.partial_path / REJECTED_FILE, index=False)
        checksums_record = _write_chunk_checksums(self.partial_path, self.images)
        if self.stats.n_blank:
            log.warning(
                "%d of %d cells are entirely zero (every pixel of every channel): check the "
                "images (blank crops, failed exports); `scbd-cells info` counts them.",
                self.stats.n_blank,
                self.n_cells,
            )
        attributes = {
            "channel_stats": self.stats.result(),
            "n_rejected": len(rejected_table),
            "n_blank": self.stats.n_blank,
            "chunk_checksums": checksums_record,
            **(_to_json(extra) if extra else {}),
            "complete": True,
        }
        self.group.attrs.update(attributes)
        replaced = None
        if self.path.exists():
            # checked when the writer started; checked again now, just before the rename
            check_output(self.path, kind="store", overwrite=self.overwrite)
            replaced = self.path.with_name(f"{self.path.name}.replaced-{os.getpid()}")
            os.replace(self.path, replaced)
        os.replace(self.partial_path, self.path)
        # bookkeeping goes after the rename: a kill before it leaves a resumable partial store
        for name in (STATE_FILE, WRITTEN_FILE):
            (self.path / name).unlink(missing_ok=True)
        if replaced is not None:
            remove_owned(replaced, kind="store")
        log.info("Wrote %s (%d cells).", self.path, self.n_cells)
        return self.path


def _chunk_file_cells(array: zarr.Array) -> int:
    """Cells per chunk file: a shard's when the array is sharded, else a chunk's."""
    return int(array.metadata.chunk_grid.chunk_shape[0])


def _chunk_file_key(array: zarr.Array, index: int) -> str:
    """The key of chunk file ``index`` (along the cells) inside the images array."""
    return array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))


def _file_tail(path: Path | str) -> int:
    """The last 4 bytes of a file, as the little-endian CRC32C zarr's codec appends."""
    if isinstance(path, str):  # a chunk file on object storage
        # [-4:]: a server that ignores suffix ranges (the GCS emulator) sends the whole object
        return int.from_bytes(_read_bytes(path, start=-4)[-4:], "little")
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return int.from_bytes(handle.read(4), "little")


def _write_chunk_checksums(store_path: Path, array: zarr.Array) -> dict[str, str]:
    """Record every chunk file's closing CRC32C by its index (:data:`CHUNK_CHECKSUMS_FILE`).

    A chunk file ends with the CRC32C of its bytes (of its index, for a shard), which
    differs from chunk to chunk: a file copied or moved to another chunk's place still
    passes its own checksum but not the one recorded for that place. Returns the group
    attribute that names the list and its SHA-256.
    """
    import hashlib
    import io

    n_files = -(-int(array.shape[0]) // _chunk_file_cells(array))
    images_dir = store_path / IMAGES_KEY
    try:
        tails = [_file_tail(images_dir / _chunk_file_key(array, i)) for i in range(n_files)]
    except OSError as error:
        raise StoreError(f"Cannot finish the store: a chunk file is unreadable ({error})") from None
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(tails, dtype="<u4"), allow_pickle=False)
    (store_path / CHUNK_CHECKSUMS_FILE).write_bytes(buffer.getvalue())
    return {"file": CHUNK_CHECKSUMS_FILE, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}


def _read_chunk_checksums(path: Path | str, attributes: dict) -> np.ndarray | None:
    """The store's per-place chunk checksums; None for a store written before they existed."""
    import hashlib
    import io

    record = attributes.get("chunk_checksums")
    if record is None:
        return None
    file_path = _join(path, str(record.get("file", CHUNK_CHECKSUMS_FILE)))
    try:
        data = _read_bytes(file_path)
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise ValueError("its SHA-256 is not the one recorded in zarr.json")
        checksums = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise StoreError(
            f"The store {path} is damaged: its list of chunk checksums {file_path} cannot be "
            f"used ({error}), so chunks cannot be checked against their place. Re-ingest the "
            "table (or restore the store from a copy)."
        ) from None
    return checksums.astype(np.uint32, copy=False)


class ChunkPlacementError(ValueError):
    """A chunk file that passes its own checksum but was written for another place."""


_OPEN_ARRAYS: dict[str, zarr.Array] = {}


def write_cells(
    images_path: Path, start: int, images: np.ndarray, *, train: np.ndarray, store_id: str
) -> ChannelStats:
    """Store cells ``start ... start + len(images)`` of a partial store (in a worker).

    ``start`` must be chunk-aligned (and the run whole chunks, or the end of
    the array) so that workers never write the same chunk. Returns the
    statistics of the ``train`` cells among them, for
    :meth:`StoreWriter.record_block`.
    """
    key = f"{images_path}:{store_id}"
    if key not in _OPEN_ARRAYS:
        _OPEN_ARRAYS.clear()  # one store at a time per worker
        _OPEN_ARRAYS[key] = zarr.open_array(
            images_path, mode="r+", zarr_format=3, config=WRITE_CONFIG
        )
    array = _OPEN_ARRAYS[key]
    array[start : start + len(images)] = images
    stats = ChannelStats(array.shape[1], array.dtype)
    stats.update(images[train])
    stats.count_blank(images)
    return stats


def create_store(
    path: str | os.PathLike,
    *,
    images: np.ndarray,
    obs: pd.DataFrame,
    channel_names: Sequence[str],
    perturbation_column: str,
    guide_column: str | None = None,
    batch_columns: Sequence[str] = DEFAULT_BATCH_COLUMNS,
    control: str | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    overwrite: bool = False,
    chunk_cells: int | None = None,
    shard_cells: int | None = None,
) -> Store:
    """Write in-memory images and their table as a store (tests, small screens, benchmarks).

    Parameters
    ----------
    path
        The store to create (``*.zarr``).
    images
        (N, C, H, W) pixels, row i belonging to row i of ``obs``; the dtype is kept.
    obs
        The cells table (a ``cell_id`` column, if present, names the cells).
    channel_names
        One name per channel.
    perturbation_column, guide_column, batch_columns, control
        Label columns, as for :func:`scbd_cells.ingest`.
    split_fractions, seed
        Train/val/test fractions and the seed of the split and the layout.
    overwrite
        Replace an existing store.
    chunk_cells, shard_cells
        Override the chunk (and optional shard) length in cells.

    Returns
    -------
    Store
        The finished store, opened.
    """
    path = Path(path)
    images = np.asarray(images)
    if images.ndim != 4 or len(images) != len(obs):
        raise InputError(
            f"Expected images of shape (N, C, H, W) with N = {len(obs)} (rows of obs); "
            f"found shape {images.shape}."
        )
    labelled = label_table(
        obs,
        perturbation_column=perturbation_column,
        guide_column=guide_column,
        batch_columns=batch_columns,
        control=control,
    )
    store_obs = finalise_obs(labelled.obs, split_fractions=split_fractions, seed=seed)
    order = store_obs[TABLE_ROW].to_numpy()
    writer = StoreWriter(
        path,
        obs=store_obs,
        image_shape=images.shape[1:],
        dtype=images.dtype,
        channel_names=channel_names,
        control=control,
        split_fractions=split_fractions,
        seed=seed,
        provenance=_in_memory_provenance(),
        plan_key=uuid.uuid4().hex,  # in-memory input: never resumed
        overwrite=overwrite,
        chunk_cells=chunk_cells,
        shard_cells=shard_cells,
    )
    for block in writer.pending_blocks():
        start, stop = writer.block_bounds(block)
        writer.write_block(block, images[order[start:stop]])
    return open_store(writer.finish())


def _in_memory_provenance() -> dict[str, Any]:
    """What :func:`create_store` records as the store's source: arrays, no table."""
    return {
        "command": "create_store",
        "table_sha256": None,
        "version": __version__,
        "created": pd.Timestamp.now(tz="UTC").isoformat(),
        "source": "in-memory arrays",
    }


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


class _CheckedChunks:
    """Reads of a finished store: a missing image chunk is an error, not zeros.

    zarr reads a missing chunk file as the fill value; every chunk of a store is
    written (:data:`WRITE_CONFIG`), so here a missing one means damage.
    """

    #: Set by :func:`open_store`: the recorded closing CRC32C of each chunk file, by index
    #: (None for a store written before they were recorded), and the key prefix of those files.
    chunk_checksums: np.ndarray | None = None
    chunk_prefix = f"{IMAGES_KEY}/c/"

    def where(self, key: str) -> Path | str:
        raise NotImplementedError

    def checked(self, key: str, value: Any, byte_range: Any) -> Any:
        """``value`` read for ``key``, after the checks above."""
        if not key.startswith(self.chunk_prefix):
            return value
        if value is None:
            raise FileNotFoundError(f"chunk file {self.where(key)} is missing")
        # a whole chunk file, or a shard's index read from its end: both end with the file's tail
        if self.chunk_checksums is not None and (
            byte_range is None or isinstance(byte_range, SuffixByteRequest)
        ):
            index = int(key[len(self.chunk_prefix) :].split("/", 1)[0])
            found = int.from_bytes(value.as_numpy_array()[-4:].tobytes(), "little")
            if index >= len(self.chunk_checksums) or found != self.chunk_checksums[index]:
                check_chunk_place(self.where(key), index, found, self.chunk_checksums)
        return value


class CheckedLocalStore(_CheckedChunks, LocalStore):
    """A zarr ``LocalStore`` for finished stores (:class:`_CheckedChunks`)."""

    def where(self, key: str) -> Path:
        return self.root / key

    async def get(self, key, prototype=None, byte_range=None):  # noqa: ANN001 (zarr's signature)
        return self.checked(key, await super().get(key, prototype, byte_range), byte_range)


class CheckedFsspecStore(_CheckedChunks, FsspecStore):
    """A zarr ``FsspecStore`` for finished stores on object storage (:class:`_CheckedChunks`)."""

    url = ""  # set by :func:`open_store`

    def where(self, key: str) -> str:
        return f"{self.url}/{key}"

    async def get(self, key, prototype=None, byte_range=None):  # noqa: ANN001 (zarr's signature)
        return self.checked(key, await super().get(key, prototype, byte_range), byte_range)


def check_chunk_place(path: Path | str, index: int, found: int, checksums: np.ndarray) -> None:
    """Raise :class:`ChunkPlacementError` when chunk file ``index`` is not the one written there."""
    expected = int(checksums[index]) if index < len(checksums) else None
    if found != expected:
        raise ChunkPlacementError(
            f"chunk file {path} is not the chunk written at this place: it ends with checksum "
            f"{found:08x}, and ingest recorded "
            + (f"{expected:08x}" if expected is not None else "no chunk")
            + " for this position (a chunk file copied or moved here from elsewhere)"
        )


class ImageArray:
    """A store's (N, C, H, W) image array, read lazily; a damaged chunk is a :class:`StoreError`.

    Slicing (``images[a:b]``) and ``get_orthogonal_selection`` return numpy
    arrays as zarr's do. A read that meets a missing chunk file, a checksum
    mismatch or undecodable bytes raises a :class:`StoreError` naming the store,
    the damaged cell ranges and ``scbd-cells info --verify``.
    """

    def __init__(
        self,
        array: zarr.Array,
        store_path: Path | str,
        *,
        chunk_checksums: np.ndarray | None = None,
    ) -> None:
        self.array = array
        self.store_path = store_path
        self.chunk_checksums = chunk_checksums
        self.file_cells = _chunk_file_cells(array)
        # chunk files whose place was checked (readers that bypass zarr check each once)
        self._placed = np.zeros(-(-int(array.shape[0]) // self.file_cells), bool)
        self.shape = tuple(int(size) for size in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.chunks = tuple(int(size) for size in array.chunks)
        shards = getattr(array, "shards", None)
        self.shards = tuple(int(size) for size in shards) if shards else None
        self.ndim = len(self.shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, selection: Any) -> np.ndarray:
        try:
            return self.array[selection]
        except Exception as error:
            raise self.read_error(_rows_of(selection, self.shape[0]), error) from error

    def get_orthogonal_selection(self, selection: Any) -> np.ndarray:
        try:
            return self.array.get_orthogonal_selection(selection)
        except Exception as error:
            raise self.read_error(_rows_of(selection, self.shape[0]), error) from error

    def check_placement(self, rows: np.ndarray) -> None:
        """Check, once per chunk file, that the files holding ``rows`` are in their place.

        For readers that do not go through zarr-python (tensorstore): the last 4 bytes of
        each file not checked yet are compared with the checksum recorded for its index;
        zarr-python reads are checked on every read (:class:`CheckedLocalStore`).

        Raises
        ------
        StoreError
            A chunk file holds a chunk written for another place, naming its cells.
        """
        if self.chunk_checksums is None or len(rows) == 0:
            return
        files = np.unique(np.asarray(rows, dtype=np.int64) // self.file_cells)
        for index in files[~self._placed[files]].tolist():
            path = _join(self.store_path, f"{IMAGES_KEY}/{_chunk_file_key(self.array, index)}")
            start = index * self.file_cells
            rows_of_file = (start, min(start + self.file_cells, self.shape[0]))
            try:
                check_chunk_place(path, index, _file_tail(path), self.chunk_checksums)
            except (OSError, ChunkPlacementError) as error:
                raise self.read_error(rows_of_file, error) from error
            self._placed[index] = True

    def damaged_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Cell ranges ``[a, b)`` within ``[start, stop)`` whose chunk cannot be read."""
        unit = self.chunks[0]
        damaged: list[tuple[int, int]] = []
        for first in range(start - start % unit, stop, unit):
            last = min(first + unit, self.shape[0])
            try:
                self.array[first:last]
            except Exception:  # any reason: missing, checksum, decoding
                if damaged and damaged[-1][1] == first:
                    damaged[-1] = (damaged[-1][0], last)
                else:
                    damaged.append((first, last))
        return damaged

    def read_error(self, rows: tuple[int, int], error: BaseException) -> StoreError:
        """The error for a failed read of rows ``[start, stop)``, naming the damaged cells."""
        start, stop = rows
        damaged = self.damaged_ranges(start, stop) if stop - start <= 2**20 else []
        where = (
            "cells " + ", ".join(f"{a}-{b - 1}" for a, b in damaged[:5])
            + (f" (and {len(damaged) - 5} more ranges)" if len(damaged) > 5 else "")
            if damaged
            else f"cells {start}-{stop - 1}"
        )
        return StoreError(
            f"The store {self.store_path} is damaged: {where} cannot be read "
            f"({type(error).__name__}: {error}). Run `scbd-cells info {self.store_path} "
            "--verify` to list every damaged range; re-ingest the table (or restore the store "
            "from a copy) to repair it."
        )


def _rows_of(selection: Any, n_cells: int) -> tuple[int, int]:
    """The first and one-past-last cell a selection touches (for error messages)."""
    first = selection[0] if isinstance(selection, tuple) else selection
    if isinstance(first, slice):
        start, stop, _ = first.indices(n_cells)
        return start, max(start + 1, stop)
    if isinstance(first, int | np.integer):
        return int(first), int(first) + 1
    values = np.asarray(first).reshape(-1)
    if values.size == 0:
        return 0, 0
    return int(values.min()), int(values.max()) + 1


class Store:
    """A finished store, read-only. Use :func:`open_store`.

    Attributes
    ----------
    path, format_version, n_cells, n_channels, image_size (H, W), dtype, channel_names,
    control, channel_stats, provenance
        What the names say; ``channel_stats`` holds per-channel ``mean, std, min,
        max, p01, p99`` of raw intensities over the train split.
    images
        The (N, C, H, W) :class:`ImageArray`, read lazily (``store.images[a:b]`` is
        numpy); a damaged chunk raises :class:`StoreError` naming its cells.
    """

    def __init__(self, path: Path | str, group: zarr.Group) -> None:
        self.path = path  # a Path, or the store's URL on object storage
        self._group = group
        attributes = dict(group.attrs)
        self.attributes = attributes
        checksums = _read_chunk_checksums(path, attributes)
        if isinstance(group.store, _CheckedChunks):
            group.store.chunk_checksums = checksums
        self.images = ImageArray(group[IMAGES_KEY], path, chunk_checksums=checksums)
        self.format_version = int(attributes["format_version"])
        self.n_cells, self.n_channels, height, width = (int(size) for size in self.images.shape)
        self.image_size = (height, width)
        self.dtype = np.dtype(self.images.dtype)
        self.channel_names = list(attributes["channel_names"])
        self.control = attributes.get("control")
        self.channel_stats = {
            name: list(values) for name, values in attributes["channel_stats"].items()
        }
        self.provenance = dict(attributes.get("provenance", {}))
        self.store_id = str(attributes["store_id"])
        self.split_fractions = tuple(attributes.get("split_fractions", DEFAULT_SPLIT_FRACTIONS))
        self.layout = dict(attributes.get("layout", {}))

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, n_cells={self.n_cells}, channels={self.channel_names}, "
            f"image_size={self.image_size}, dtype={self.dtype.name})"
        )

    def __len__(self) -> int:
        return self.n_cells

    @cached_property
    def obs(self) -> pd.DataFrame:
        """The per-cell table in store order, indexed by cell id (str)."""
        try:
            obs = pd.read_parquet(_table_source(self.path, OBS_FILE))
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise _obs_error(self.path, error) from error
        obs.index = pd.Index(obs[schema.CELL_ID].astype(str).to_numpy(dtype=object), dtype=object)
        return obs

    @cached_property
    def labels(self) -> pd.DataFrame:
        """The label columns of :attr:`obs` alone (perturbation, guide, batch, split:
        categoricals, a few bytes a cell), in store order, indexed 0 ... N - 1.

        Read without the rest of the cell table when that is not in memory yet: training
        needs only these, and the whole table (ids, paths, the lab's metadata as text) holds
        about 440 bytes a cell; reading it made training's set-up 514 bytes a cell, 12 GiB
        per rank for a 26 M-cell screen (92 bytes without it; docs/scaling.md).
        """
        if "obs" in self.__dict__:  # the whole table is read already
            columns = [c for c in LABEL_COLUMNS if c in self.obs.columns]
            return self.obs[columns].reset_index(drop=True)
        import pyarrow.parquet as pq

        try:
            source = _table_source(self.path, OBS_FILE)
            present = set(pq.read_schema(source).names)
            if hasattr(source, "seek"):
                source.seek(0)
            return pd.read_parquet(source, columns=[c for c in LABEL_COLUMNS if c in present])
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise _obs_error(self.path, error) from error

    @cached_property
    def rejected(self) -> pd.DataFrame:
        """Rows of the input table left out by ``--skip-bad`` (``row, cell_id, reason``)."""
        if not _exists(_join(self.path, REJECTED_FILE)):
            return pd.DataFrame(columns=["row", schema.CELL_ID, "reason"])
        source = _table_source(self.path, REJECTED_FILE)
        return pd.read_csv(source, dtype={schema.CELL_ID: str, "reason": str})

    def codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        """Integer codes (int32, (N,)) and the categories of an ``obs`` column (a label
        column is read alone, :attr:`labels`)."""
        if column in self.labels.columns:
            values = self.labels[column]
        elif column not in self.obs.columns:
            raise InputError(
                f"The store has no column {column!r}; its columns are {list(self.obs.columns)}. "
                f"{did_you_mean(column, list(self.obs.columns))}".rstrip()
            )
        else:
            values = self.obs[column]
        if isinstance(values.dtype, pd.CategoricalDtype):
            return values.cat.codes.to_numpy().astype(np.int32), [
                str(c) for c in values.cat.categories
            ]
        codes, categories = pd.factorize(values.astype(str), sort=True)
        return codes.astype(np.int32), [str(c) for c in categories]

    def class_ranges(self) -> dict[str, tuple[int, int]]:
        """``{perturbation: (start, stop)}``: each class is one contiguous run of store rows."""
        return {name: (int(a), int(b)) for name, (a, b) in self.attributes["class_ranges"].items()}

    def fingerprint(self) -> dict:
        """What a checkpoint records about the store it was trained on."""
        return {
            "n_channels": self.n_channels,
            "image_size": list(self.image_size),
            "dtype": self.dtype.name,
            "channel_names": list(self.channel_names),
            "store_id": self.store_id,
        }

    def summary(self) -> dict:
        """What ``scbd-cells info`` shows, JSON-friendly."""
        obs = self.obs
        per_class = obs[schema.PERTURBATION].value_counts()
        if isinstance(self.path, str):  # on object storage: the sizes the bucket lists
            size_bytes = _filesystem(self.path).du(self.path, total=True)
        else:
            size_bytes = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        control_cells = (
            int((obs[schema.PERTURBATION].astype(str) == self.control).sum())
            if self.control is not None
            else None
        )
        splits = obs[schema.SPLIT].astype(str).value_counts()
        return {
            "path": str(self.path),
            "format": f"{schema.STORE_FORMAT} v{self.format_version}",
            "format_version": self.format_version,
            "n_cells": self.n_cells,
            "n_channels": self.n_channels,
            "channel_names": list(self.channel_names),
            "image_size": list(self.image_size),
            "dtype": self.dtype.name,
            "size_bytes": int(size_bytes),
            "raw_bytes": int(self.n_cells * self.n_channels * np.prod(self.image_size))
            * self.dtype.itemsize,
            "n_perturbations": int(len(per_class)),
            "cells_per_perturbation": {
                "min": int(per_class.min()),
                "median": float(per_class.median()),
                "max": int(per_class.max()),
            },
            "n_guides": int(obs[schema.GUIDE].nunique()),
            "n_batches": int(obs[schema.BATCH].nunique()),
            "control": self.control,
            "control_cells": control_cells,
            "splits": {name: int(splits.get(name, 0)) for name in schema.SPLITS},
            "n_rejected": int(self.attributes.get("n_rejected", 0)),
            "n_border": int(self.attributes.get("n_border", 0)),
            "n_blank": int(self.attributes.get("n_blank", 0)),
            "chunk_cells": int(self.images.chunks[0]),
            "store_id": self.store_id,
            "created": self.provenance.get("created"),
            "version": self.provenance.get("version"),
        }

    def verify(self, *, workers: int = 2) -> list[tuple[int, int]]:
        """Read and check every chunk; return the damaged cell ranges ``[start, stop)``.

        Each chunk is read through zarr, which checks its CRC32C checksum and
        decodes it; a missing chunk file counts as damaged, and so does one that is not
        the chunk written at its place (another chunk's file copied or moved there), in a
        store that records each chunk's place (all stores written since that was added).
        """
        from concurrent.futures import ThreadPoolExecutor

        from scbd_cells.core.progress import progress_bar

        if self.images.chunk_checksums is None:
            log.warning(
                "%s was written before scbd-cells recorded where each chunk belongs: every "
                "chunk's own checksum is checked, but a chunk file copied or moved to another "
                "chunk's place would pass. Re-ingest the table to have that checked too.",
                self.path,
            )

        unit = self.images.chunks[0]
        step = unit * max(1, (64 << 20) // max(1, unit * self.images.nbytes // max(1, len(self))))
        pieces = [(a, min(a + step, self.n_cells)) for a in range(0, self.n_cells, step)]

        def check(piece: tuple[int, int]) -> list[tuple[int, int]]:
            try:
                self.images.array[piece[0] : piece[1]]
                return []
            except Exception:
                return self.images.damaged_ranges(*piece)

        damaged: list[tuple[int, int]] = []
        with (
            progress_bar(unit="cells") as bar,
            ThreadPoolExecutor(max(1, workers), "scbd-verify") as executor,
        ):
            task = bar.add_task("Verifying", total=self.n_cells)
            for piece, found in zip(pieces, executor.map(check, pieces), strict=True):
                for a, b in found:  # merge ranges that touch across pieces
                    if damaged and damaged[-1][1] == a:
                        damaged[-1] = (damaged[-1][0], b)
                    else:
                        damaged.append((a, b))
                bar.advance(task, piece[1] - piece[0])
        return damaged

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images of the given store rows, (len(indices), C, H, W), in the order given.

        Rows are sorted and de-duplicated and their chunks merged into runs of
        neighbouring chunks. A few runs are read as slices of whole chunks
        (contiguous requests cost one slice); many scattered runs are read in
        one orthogonal selection, in which zarr decodes every touched chunk
        once, concurrently.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out_shape = (len(indices), self.n_channels, *self.image_size)
        if len(indices) == 0:
            return np.empty(out_shape, self.dtype)
        if indices.min() < 0 or indices.max() >= self.n_cells:
            raise InputError(
                f"Store rows must lie in [0, {self.n_cells}); "
                f"found {indices.min()}..{indices.max()}."
            )
        unique, inverse = np.unique(indices, return_inverse=True)
        chunk = int(self.images.chunks[0])
        chunk_ids = np.unique(unique // chunk)
        # touched chunks merged into runs of consecutive chunks
        breaks = np.flatnonzero(np.diff(chunk_ids) != 1) + 1
        runs = np.split(chunk_ids, breaks)
        if len(runs) > _MAX_SLICED_RUNS:
            # scattered rows: one zarr call decodes every touched chunk once, concurrently
            gathered = self.images.get_orthogonal_selection((unique,))
            return gathered[inverse]
        pieces = []
        for run in runs:
            start = int(run[0]) * chunk
            stop = min((int(run[-1]) + 1) * chunk, self.n_cells)
            wanted = unique[(unique >= start) & (unique < stop)]
            if len(wanted) == stop - start:
                pieces.append(self.images[start:stop])
            else:
                pieces.append(self.images[start:stop][wanted - start])
        gathered = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        return gathered[inverse]


def open_store(path: str | os.PathLike) -> Store:
    """Open a finished store read-only: a local path, or a ``str`` URL on object storage.

    ``s3://bucket/key.zarr`` (or ``gs://``) is read through zarr's fsspec store with the
    credentials and endpoint of the environment (docs/scaling.md, "Stores on object
    storage"); ``store.path`` is then that URL.

    Raises
    ------
    StoreError
        If the path is missing, unfinished (an ingest is still running or was
        killed), not a scbd-cells store, or of another format version.
    InputError
        A URL of another scheme, or s3fs (gcsfs) is not installed.
    """
    url = object_url(path)
    if url is not None:
        return _open_remote_store(url)
    path = Path(path)
    partial = partial_path_of(path)
    if not path.exists():
        if partial.exists():
            raise StoreError(
                f"The store {path} is unfinished: an ingest into it was interrupted or is still "
                f"running ({partial} exists). Rerun the same `scbd-cells ingest` command to "
                "resume it."
            )
        raise StoreError(
            f"No store at {path}. Create one with `scbd-cells ingest TABLE --out {path}`."
        )
    try:
        group = zarr.open_group(CheckedLocalStore(path, read_only=True), mode="r", zarr_format=3)
    except Exception as error:  # zarr raises several types for "not a group"
        raise StoreError(
            f"{path} is not a Zarr v3 store written by scbd-cells ({error}). "
            "Create one with `scbd-cells ingest`."
        ) from error
    return _checked_store(path, group)


def _checked_store(path: Path | str, group: zarr.Group) -> Store:
    """The :class:`Store` of an opened group, after its format, version and completion checks."""
    attributes = dict(group.attrs)
    if attributes.get("format") != schema.STORE_FORMAT:
        raise StoreError(
            f"{path} is a Zarr group but not a scbd-cells store (format "
            f"{attributes.get('format')!r}, expected {schema.STORE_FORMAT!r}). "
            "Create one with `scbd-cells ingest`."
        )
    version = attributes.get("format_version")
    if version != schema.STORE_FORMAT_VERSION:
        raise StoreError(
            f"{path} has store format version {version}; this scbd-cells (version {__version__}) "
            f"reads version {schema.STORE_FORMAT_VERSION}. Re-ingest the table with this version."
        )
    if attributes.get("complete") is not True:
        raise StoreError(
            f"The store {path} is unfinished (its completion flag is not set). Rerun the ingest "
            "command that made it, with --overwrite if needed."
        )
    try:
        store = Store(path, group) if IMAGES_KEY in group else None
    except (zarr.errors.BaseZarrError, ValueError, TypeError, KeyError) as error:
        raise StoreError(
            f"The store {path} has image metadata ({path / IMAGES_KEY / 'zarr.json'}) that "
            f"zarr {zarr.__version__} cannot read ({type(error).__name__}: {error}): a codec "
            "it does not know, or an edited file. Open it with the scbd-cells and zarr that "
            "wrote it, or re-ingest the table with --overwrite."
        ) from error
    if store is None:
        raise StoreError(
            f"The store {path} is damaged: it is marked complete but its images array is "
            f"missing ({path / IMAGES_KEY / 'zarr.json'} is not there). Restore the store from "
            "a copy, or re-ingest the table with --overwrite."
        )
    _check_consistent(store)
    return store


def _obs_error(path: Path | str, error: BaseException) -> StoreError:
    return StoreError(
        f"The store {path} is damaged: its cell table {_join(path, OBS_FILE)} cannot be read "
        f"({type(error).__name__}: {error}). Re-ingest the table to rebuild the store."
    )


def _check_consistent(store: Store) -> None:
    """The image shape, the recorded cell count and the cell table agree (cheap: metadata only)."""
    import pyarrow.parquet as pq

    try:
        n_rows = pq.read_metadata(_table_source(store.path, OBS_FILE)).num_rows
    except Exception as error:  # missing, truncated or not parquet
        raise _obs_error(store.path, error) from error
    attributes = store.attributes
    found = {
        "cells in images/zarr.json": store.n_cells,
        "n_cells attribute": attributes.get("n_cells", store.n_cells),
        f"rows of {OBS_FILE}": n_rows,
    }
    problems = []
    if len(set(found.values())) > 1:
        problems.append(", ".join(f"{name}: {value:,}" for name, value in found.items()))
    if store.n_channels != len(store.channel_names):
        problems.append(
            f"{store.n_channels} image channels but {len(store.channel_names)} channel names"
        )
    if list(attributes.get("image_size", store.image_size)) != list(store.image_size):
        problems.append(
            f"images of {store.image_size} px but image_size {attributes.get('image_size')}"
        )
    if attributes.get("dtype", store.dtype.name) != store.dtype.name:
        problems.append(f"images of dtype {store.dtype.name} but dtype {attributes.get('dtype')}")
    if problems:
        raise StoreError(
            f"The store {store.path} contradicts itself ({'; '.join(problems)}): its metadata "
            "was edited or damaged after ingest. Re-ingest the table to rebuild it."
        )


# ---------------------------------------------------------------------------
# stores on object storage (docs/scaling.md, "Stores on object storage")
# ---------------------------------------------------------------------------

_S3_EXTRA = (
    "Stores on object storage need an optional dependency: "
    "`pip install 'scbd-cells[s3]'` (s3fs) for s3://, `pip install 'scbd-cells[gs]'` "
    "(gcsfs) for gs://."
)


def _filesystem(url: str) -> Any:
    """The fsspec file system of ``url``; credentials and endpoint from the environment.

    s3fs (botocore) reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE`` and ``~/.aws/``;
    gcsfs reads Google's application default credentials
    (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``) and
    ``STORAGE_EMULATOR_HOST``; scbd-cells passes none of them itself.
    """
    import fsspec

    try:
        return fsspec.filesystem(url.split("://", 1)[0])
    except ImportError as error:
        raise InputError(f"{_S3_EXTRA} ({error})") from None


def _join(location: Path | str, name: str) -> Path | str:
    """``location / name`` for a local store, ``location/name`` for one on object storage."""
    return f"{location}/{name}" if isinstance(location, str) else location / name


def _read_bytes(target: Path | str, *, start: int | None = None) -> bytes:
    """A file's bytes (from ``start``, negative from the end); OSError when it cannot be read."""
    if isinstance(target, Path):
        return target.read_bytes() if start is None else target.read_bytes()[start:]
    try:
        return _filesystem(target).cat_file(target, start=start)
    except OSError:
        raise
    except Exception as error:  # botocore and network errors
        raise OSError(f"{type(error).__name__}: {error}") from error


def _exists(target: Path | str) -> bool:
    return target.exists() if isinstance(target, Path) else _filesystem(target).exists(target)


def _has_objects(url: str) -> bool:
    """Whether any object is at or under ``url`` (a fresh listing, not s3fs's cache)."""
    fs = _filesystem(url)
    fs.invalidate_cache()
    return bool(fs.find(url))


def _table_source(location: Path | str, name: str) -> Path | Any:
    """What pandas and pyarrow read a store's table file from (its path, or its bytes)."""
    import io

    target = _join(location, name)
    return target if isinstance(target, Path) else io.BytesIO(_read_bytes(target))


def unreachable(url: str, error: Exception, *, doing: str) -> StoreError:
    """The error for object storage that did not answer (no credentials, access denied,
    endpoint unreachable): what failed, and where the credentials come from."""
    return StoreError(
        f"Cannot {doing} {url} ({type(error).__name__}: {error}). Check the credentials and "
        "endpoint in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_ENDPOINT_URL or ~/.aws/; docs/scaling.md)."
    )


def _open_remote_store(url: str) -> Store:
    """:func:`open_store` for a store on object storage (read-only, through zarr's fsspec store)."""
    try:
        exists = _exists(f"{url}/zarr.json")
        partial_exists = not exists and _exists(f"{url}{PARTIAL_SUFFIX}/zarr.json")
        # an upload puts the root zarr.json last: objects without it are an unfinished store
        uploading = not exists and not partial_exists and _has_objects(url)
    except InputError:
        raise
    except Exception as error:  # botocore: no credentials, access denied, endpoint unreachable
        raise unreachable(url, error, doing="reach the store") from None
    if not exists:
        if partial_exists:
            raise StoreError(
                f"The store {url} is unfinished: an ingest into it was interrupted or is still "
                f"running ({url}{PARTIAL_SUFFIX} exists)."
            )
        if uploading:
            raise StoreError(
                f"The store {url} is unfinished: objects are under it but not its root "
                "zarr.json, which `scbd-cells ingest` uploads last (an upload was interrupted or "
                'is still running; docs/scaling.md, "Stores on object storage").'
            )
        raise StoreError(
            f"No store at {url}. Create one with `scbd-cells ingest TABLE --out {url}`."
        )
    try:
        zarr_store = CheckedFsspecStore.from_url(url, read_only=True)
        zarr_store.url = url
        group = zarr.open_group(zarr_store, mode="r", zarr_format=3)
    except ImportError as error:
        raise InputError(f"{_S3_EXTRA} ({error})") from None
    except Exception as error:
        raise StoreError(
            f"{url} is not a Zarr v3 store written by scbd-cells ({type(error).__name__}: "
            f"{error}). Create one with `scbd-cells ingest`."
        ) from error
    return _checked_store(url, group)
