"""AnnData files: every .h5ad / .zarr scbd-cells writes goes through here.

- :func:`write_anndata` writes an in-memory AnnData under a temporary name and renames
  it into place (``baseline``, ``correct``, guide and gene profiles);
- :class:`CellsWriter` writes a cells file incrementally: the skeleton (obs, var, uns)
  first, then ``X`` / ``obsm`` batch by batch, checking the free space before each
  (``embed``);
- :func:`check_output_path` is the ownership rule for AnnData outputs
  (:mod:`scbd_cells.outputs`); :func:`store_obs_for_anndata` the store's cell table as
  ``obs``, :func:`store_label_columns` the columns its labels came from;
  :class:`LazyCells` reads a cells file's arrays without loading them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scbd_cells.data import schema
from scbd_cells.errors import InputError
from scbd_cells.outputs import (
    check_free_space,
    check_output,
    publish,
    remove_temporary,
    temporary_name,
)

if TYPE_CHECKING:
    from scbd_cells.data.store import Store

OUTPUT_SUFFIXES = (".h5ad", ".zarr")


def check_output_path(out_path: Path, *, overwrite: bool, inputs: Sequence[Any] = ()) -> None:
    """Refuse an output of unknown type, one that is an input, or one scbd-cells may not replace.

    An existing output is replaced only with ``overwrite`` and only if it is an
    AnnData that scbd-cells wrote (``uns["scbd"]``); see :mod:`scbd_cells.outputs`.
    """
    if out_path.suffix not in OUTPUT_SUFFIXES:
        raise InputError(
            f"Output {out_path} must end in .h5ad or .zarr (the AnnData format is chosen by "
            "the extension)."
        )
    check_output(out_path, kind="anndata", overwrite=overwrite, inputs=inputs)


def store_obs_for_anndata(store: Store) -> pd.DataFrame:
    """The store's cell table ready for AnnData: str index, text columns categorical."""
    obs = store.obs.copy()
    obs.index = pd.Index(obs.index.astype(str), dtype=object)
    for column in obs.columns:
        values = obs[column]
        if column == schema.CELL_ID:
            # dtype=object: pandas 3 would infer its str dtype, which anndata 0.12 will not write
            obs[column] = pd.Series(
                values.astype(str).to_numpy(dtype=object), index=obs.index, dtype=object
            )
        elif not (
            isinstance(values.dtype, pd.CategoricalDtype)
            or pd.api.types.is_numeric_dtype(values)
            or pd.api.types.is_bool_dtype(values)
        ):
            # text as the table held it; an empty field stays missing (not the text "nan")
            text = values.astype(str).where(values.notna())
            obs[column] = pd.Categorical(text.to_numpy(dtype=object))
        elif isinstance(values.dtype, pd.CategoricalDtype):
            obs[column] = values.cat.rename_categories([str(c) for c in values.cat.categories])
    return obs


def store_label_columns(store: Store) -> dict[str, Any]:
    """``uns["scbd"]["label_columns"]``: the table columns ingest made the labels from.

    ``{"perturbation": str, "guide": str (if given), "batch": [str, ...]}`` from the
    store's recorded ingest arguments (``--perturbation-column``, ``--guide-column``,
    ``--batch-columns``), so that ``export`` finds the plate and the well whatever their
    names; ``{}`` for a store that does not record them.
    """
    arguments = store.provenance.get("arguments") or {}
    if not arguments.get("perturbation_column"):
        return {}
    found: dict[str, Any] = {"perturbation": str(arguments["perturbation_column"])}
    if arguments.get("guide_column"):
        found["guide"] = str(arguments["guide_column"])
    found["batch"] = [str(name) for name in arguments.get("batch_columns") or []]
    return found


def without_none(options: dict) -> dict:
    """JSON-like ``options`` without the unset (None) ones, which not every AnnData writes."""
    return {key: value for key, value in json.loads(json.dumps(options, default=str)).items()
            if value is not None}  # fmt: skip


def anndata_bytes(obs: pd.DataFrame, n_values: int) -> int:
    """An upper estimate of an AnnData file's size: ``n_values`` float32 values plus ``obs``."""
    return 4 * n_values + int(obs.memory_usage(deep=True).sum())


def temporary_path(out_path: Path) -> Path:
    """A hidden temporary name beside ``out_path`` (:func:`scbd_cells.outputs.temporary_name`)."""
    return temporary_name(out_path)


def remove_path(path: Path) -> None:
    remove_temporary(path)


def move_into_place(tmp_path: Path, out_path: Path, *, overwrite: bool) -> None:
    """Put a finished AnnData in place, replacing only one scbd-cells wrote, and record it."""
    publish(tmp_path, out_path, kind="anndata", overwrite=overwrite)


@contextmanager
def _quiet_zarr_consolidation() -> Iterator[None]:
    # anndata consolidates zarr v3 metadata, which zarr flags as outside the v3 spec; the
    # files still read back with anndata and zarr (tested), so this one warning is not useful.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield


def _plain_strings(adata: Any) -> None:
    """Text in obs and var as plain object strings, in place, before writing.

    pandas 3 gives text columns and indexes its ``str`` dtype; anndata writes those as
    nullable-string groups (and 0.12 only when allowed), which anndata < 0.11 and this
    package's own streaming reader (``evaluation/cells.py``) cannot read. Object strings
    are written as plain string datasets by every anndata version.
    """
    for frame in (adata.obs, adata.var):
        if isinstance(frame.index.dtype, pd.StringDtype):
            frame.index = pd.Index(
                frame.index.to_numpy(dtype=object), dtype=object, name=frame.index.name
            )
        for column in frame.columns:
            if isinstance(frame[column].dtype, pd.StringDtype):
                frame[column] = pd.Series(
                    frame[column].to_numpy(dtype=object), index=frame.index, dtype=object
                )


def write_any(adata: Any, path: Path) -> None:
    _plain_strings(adata)
    if path.suffix == ".zarr":
        import anndata as ad

        # zarr v3 (the store's format too); anndata < 0.11 has no such setting
        if hasattr(ad.settings, "zarr_write_format"):
            options = {"zarr_write_format": 3}
            if hasattr(ad.settings, "auto_shard_zarr_v3"):
                options["auto_shard_zarr_v3"] = False  # small chunks suit row reads
            with ad.settings.override(**options), _quiet_zarr_consolidation():
                adata.write_zarr(path)
        else:
            adata.write_zarr(path)
    else:
        adata.write_h5ad(path)


def write_anndata(adata: Any, out_path: Path, *, overwrite: bool) -> None:
    """Write AnnData (``.h5ad`` or ``.zarr``) under a temporary name, then rename into place."""
    check_output_path(out_path, overwrite=overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temporary_path(out_path)
    try:
        write_any(adata, tmp_path)
        move_into_place(tmp_path, out_path, overwrite=overwrite)
    except BaseException:
        remove_path(tmp_path)
        raise


class CellsWriter:
    """Writes a cells AnnData skeleton, then fills ``X`` / ``obsm`` arrays batch by batch.

    HDF5 cannot recover from a full disk: a write or close that fails for want
    of room leaves the library in a state that crashes the interpreter. So,
    before each batch, the writer checks that the disk still has room for
    everything left to write, and it holds a 1 MiB reserve file beside the
    output that it deletes before closing: if someone else filled the disk, the
    file can still be closed cleanly (then removed as unfinished).
    """

    RESERVE_BYTES = 1 << 20

    def __init__(self, path: Path, *, obs: pd.DataFrame, widths: dict[str, int], uns: dict):
        import anndata as ad

        self.path = path
        self.remaining_bytes = 4 * len(obs) * sum(widths.values())
        self.reserve_path = path.with_name(path.name + ".reserve")
        if path.suffix == ".h5ad":
            _reserve(self.reserve_path, self.RESERVE_BYTES)
        key_x = widths["X"]
        var = pd.DataFrame(index=[f"z{i}" for i in range(key_x)])
        skeleton = ad.AnnData(obs=obs, var=var, uns=uns)
        write_any(skeleton, path)
        n_cells = len(obs)
        chunk = max(1, min(n_cells, 65536))
        if path.suffix == ".zarr":
            import zarr

            self.root = zarr.open_group(path, mode="r+")
            obsm = self.root["obsm"]

            def create(group, name, width):
                array = group.create_array(
                    name, shape=(n_cells, width), dtype="float32", chunks=(chunk, width)
                )
                array.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                return array
        else:
            import h5py

            self.root = h5py.File(path, "r+")
            obsm = self.root.require_group("obsm")

            def create(group, name, width):
                array = group.create_dataset(
                    name, shape=(n_cells, width), dtype="float32", chunks=(min(chunk, 4096), width)
                )
                array.attrs["encoding-type"] = "array"
                array.attrs["encoding-version"] = "0.2.0"
                return array

        self.arrays = {
            key: create(self.root if key == "X" else obsm, key, width)
            for key, width in widths.items()
        }

    def write(self, start: int, values: dict[str, np.ndarray]) -> None:
        check_free_space(self.path, self.remaining_bytes)
        for key, block in values.items():
            self.arrays[key][start : start + len(block)] = block
            self.remaining_bytes -= block.nbytes

    def close(self) -> None:
        if self.path.suffix == ".zarr":
            import zarr

            with _quiet_zarr_consolidation():  # the arrays added after anndata's consolidation
                zarr.consolidate_metadata(self.path)
        else:
            self.reserve_path.unlink(missing_ok=True)  # room for HDF5's last metadata writes
            self.arrays.clear()
            root, self.root = self.root, None
            root.close()


def _reserve(path: Path, n_bytes: int) -> None:
    """A file that really occupies ``n_bytes`` on disk (not a sparse or compressible one)."""
    with open(path, "wb") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, n_bytes)
        except (AttributeError, OSError):  # no fallocate here: random bytes do not compress
            handle.write(os.urandom(n_bytes))


class LazyCells:
    """A read-only, AnnData-like view of a cells file's ``X``/``obsm`` arrays (no full load).

    Has what :func:`scbd_cells.profiles.aggregate_profiles` reads: ``obs``,
    ``X``, ``obsm``, ``n_obs``, ``n_vars``.
    """

    def __init__(self, path: Path, obs: pd.DataFrame) -> None:
        if path.suffix == ".zarr":
            import zarr

            self._root = zarr.open_group(path, mode="r")
        else:
            import h5py

            self._root = h5py.File(path, "r")
        self.obs = obs
        self.X = self._root["X"]
        self.obsm = {key: self._root["obsm"][key] for key in self._root["obsm"].keys()}
        self.n_obs = int(self.X.shape[0])
        self.n_vars = int(self.X.shape[1])

    def close(self) -> None:
        if hasattr(self._root, "close"):
            self._root.close()
