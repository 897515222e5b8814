"""Embed: a trained checkpoint + a store -> cell-level AnnData (and guide/gene profiles).

The cells file is written incrementally: the AnnData skeleton (obs, var, uns)
first, then ``X`` and ``obsm`` filled batch by batch, so memory holds the cell
table plus one batch whatever the number of cells. Everything is written under
temporary names and renamed into place at the end: an interrupted or failed
run leaves no partial output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scbd_cells.data import schema
from scbd_cells.errors import DataError, InputError
from scbd_cells.outputs import check_free_space, check_output, locks_output, remove_owned
from scbd_cells.progress import progress_bar

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".h5ad", ".zarr")
REPRESENTATIONS = ("projection", "encoder")


@dataclass(frozen=True)
class EmbedResult:
    """What :func:`embed` wrote.

    Attributes
    ----------
    out_path
        The cell-level AnnData.
    n_cells
        Cells embedded.
    guides_path, genes_path
        Guide- and gene-level AnnData (``aggregate=True``), else None.
    """

    out_path: Path
    n_cells: int
    guides_path: Path | None = None
    genes_path: Path | None = None


# --------------------------------------------------------------------------- writing helpers


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


def store_obs_for_anndata(store: Any) -> pd.DataFrame:
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
            obs[column] = pd.Categorical(values.astype(str).to_numpy(dtype=object))
        elif isinstance(values.dtype, pd.CategoricalDtype):
            obs[column] = values.cat.rename_categories([str(c) for c in values.cat.categories])
    return obs


def _without_none(options: dict) -> dict:
    """JSON-like ``options`` without the unset (None) ones, which not every AnnData writes."""
    return {key: value for key, value in json.loads(json.dumps(options, default=str)).items()
            if value is not None}  # fmt: skip


def anndata_bytes(obs: pd.DataFrame, n_values: int) -> int:
    """An upper estimate of an AnnData file's size: ``n_values`` float32 values plus ``obs``."""
    return 4 * n_values + int(obs.memory_usage(deep=True).sum())


def _temporary_path(out_path: Path) -> Path:
    handle, name = tempfile.mkstemp(
        prefix=f".{out_path.stem}.tmp-", suffix=out_path.suffix, dir=out_path.parent
    )
    os.close(handle)
    os.unlink(name)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _move_into_place(tmp_path: Path, out_path: Path, *, overwrite: bool) -> None:
    if out_path.exists() or out_path.is_symlink():
        check_output(out_path, kind="anndata", overwrite=overwrite)  # again, just before
        remove_owned(out_path, kind="anndata")
    os.replace(tmp_path, out_path)


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


def _write_any(adata: Any, path: Path) -> None:
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
    tmp_path = _temporary_path(out_path)
    try:
        _write_any(adata, tmp_path)
        _move_into_place(tmp_path, out_path, overwrite=overwrite)
    except BaseException:
        _remove(tmp_path)
        raise


class _CellsWriter:
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
        _write_any(skeleton, path)
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


# --------------------------------------------------------------------------- embed


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@locks_output("out")
def embed(
    run_dir: str | Path,
    store_path: str | Path,
    *,
    out: str | Path,
    aggregate: bool = False,
    representation: str = "projection",
    batch_size: int = 1024,
    device: str | None = None,
    which: str = "best",
    workers: int = 2,
    overwrite: bool = False,
) -> EmbedResult:
    """Embed every cell of a store with a trained SCBD model and write AnnData.

    Parameters
    ----------
    run_dir
        Training run folder (or a checkpoint ``.pt`` file).
    store_path
        The store to embed (channels and size must fit the checkpoint).
    out
        Cells AnnData, ``.h5ad`` or ``.zarr``: ``X`` = z_c (float32),
        ``obsm["X_scbd_batch"]`` = z_s, ``obs`` = the store's cell table,
        ``uns["scbd"]`` = provenance.
    aggregate
        Also write ``guides.h5ad`` and ``genes.h5ad`` beside ``out`` (paper A.3 profiles).
    representation
        ``projection`` (z only) or ``encoder`` (also the encoder outputs r_c, r_s in
        ``obsm["X_scbd_encoder"]``, ``obsm["X_scbd_batch_encoder"]``).
    batch_size
        Cells per forward pass.
    device
        ``cuda``, ``cuda:1``, ``cpu``...; default CUDA when available.
    which
        Checkpoint of the run: ``best`` or ``last``.
    workers
        Store reader threads.
    overwrite
        Replace existing outputs.

    Returns
    -------
    EmbedResult
    """
    import torch

    from scbd_cells import __version__
    from scbd_cells.checkpoint import check_argument_order, load_trained
    from scbd_cells.data.loader import iter_cells
    from scbd_cells.data.store import open_store
    from scbd_cells.distributed import barrier, cleanup, gather_pieces, init_distributed
    from scbd_cells.profiles import aggregate_profiles

    out_path = Path(out)
    if representation not in REPRESENTATIONS:
        raise InputError(
            f"--representation must be one of {', '.join(REPRESENTATIONS)}; found "
            f"{representation!r}."
        )
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1; found {batch_size}.")
    inputs = [run_dir, store_path]
    check_output_path(out_path, overwrite=overwrite, inputs=inputs)
    aggregate_paths = {
        "guides": out_path.parent / "guides.h5ad",
        "genes": out_path.parent / "genes.h5ad",
    }
    if aggregate:
        for path in aggregate_paths.values():
            check_output_path(path, overwrite=overwrite, inputs=inputs)

    check_argument_order(run_dir, store_path)
    store = open_store(store_path)
    # Under torchrun each rank embeds every world_size-th piece; rank 0 gathers and writes.
    dist_info = init_distributed(device or _default_device())
    device = str(dist_info.device)
    trained = load_trained(run_dir, which=which, device=device)
    trained.check_store(store)
    preprocessor = trained.preprocessor_for(store)
    batch_codes = torch.from_numpy(np.asarray(store.codes(schema.BATCH)[0], dtype=np.int64))
    control = store.control or schema.CONTROL_LABEL
    if aggregate:  # fail before the long pass, not after it
        _, perturbations = store.codes(schema.PERTURBATION)
        if control not in perturbations:
            raise DataError(
                f"--aggregate subtracts the non-targeting control, but the store {store.path} "
                f"has no perturbation {control!r} (it records control "
                f"{store.control!r}). Re-ingest with --control LABEL, or embed without "
                "--aggregate and aggregate later with scbd_cells.aggregate_profiles(control=...)."
            )

    torch_device = torch.device(device)
    on_cuda = torch_device.type == "cuda"
    model = trained.model.to(memory_format=torch.channels_last) if on_cuda else trained.model
    z_dim = int(trained.model_args["z_dim"])
    widths = {"X": z_dim, schema.OBSM_BATCH_EMBEDDING: z_dim}
    if representation == "encoder":
        with torch.inference_mode():
            probe = torch.zeros(
                (1, store.n_channels, *[int(trained.model_args["image_size"])] * 2),
                device=torch_device,
            )
            r_width = int(model(probe).r_perturbation.shape[1])
        widths[schema.OBSM_ENCODER] = r_width
        widths[schema.OBSM_BATCH_ENCODER] = r_width

    obs = store_obs_for_anndata(store)
    if dist_info.is_main:  # HDF5 cannot recover from a full disk mid-write: check first
        check_free_space(out_path, anndata_bytes(obs, store.n_cells * sum(widths.values())))
    uns = {
        schema.UNS_SCBD: {
            "kind": "scbd",
            "checkpoint": str(Path(trained.checkpoint_path).resolve()),
            "step": int(trained.step),
            # nested dicts, as scanpy keeps parameters in uns (unset options left out)
            "config": _without_none(trained.config),
            "model_args": _without_none(trained.model_args),
            "store": str(Path(store_path).resolve()),
            "store_id": store.store_id,
            "control": control,
            "representation": representation,
            "version": __version__,
        }
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_paths: list[Path] = []
    try:
        cells_tmp = _temporary_path(out_path)
        writer = None
        if dist_info.is_main:
            tmp_paths += [cells_tmp, cells_tmp.with_name(cells_tmp.name + ".reserve")]
            writer = _CellsWriter(cells_tmp, obs=obs, widths=widths, uns=uns)
        with ExitStack() as stack:
            if writer is not None:
                stack.callback(writer.close)
            bar = stack.enter_context(progress_bar(unit="cells"))
            task = bar.add_task("Embedding cells", total=store.n_cells)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda)
            stack.enter_context(torch.inference_mode())
            for indices, images in iter_cells(
                store,
                np.arange(store.n_cells),
                batch_size=batch_size,
                workers=workers,
                rank=dist_info.rank,
                world_size=dist_info.world_size,
            ):
                host = torch.from_numpy(images)
                if host.dtype == torch.uint16:  # few kernels (and no CUDA indexing) for uint16
                    host = host.to(torch.int32)
                if on_cuda:
                    host = host.pin_memory()
                pixels = host.to(torch_device, non_blocking=True)
                codes = batch_codes[torch.from_numpy(np.asarray(indices, dtype=np.int64))]
                inputs = preprocessor(pixels, codes)  # (B, C, S, S) float32
                if on_cuda:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                with autocast:
                    output = model(inputs)
                values = {
                    "X": output.z_perturbation,
                    schema.OBSM_BATCH_EMBEDDING: output.z_batch,
                }
                if representation == "encoder":
                    values[schema.OBSM_ENCODER] = output.r_perturbation
                    values[schema.OBSM_BATCH_ENCODER] = output.r_batch
                gathered = gather_pieces(torch.as_tensor(indices, device=torch_device), values)
                if writer is None or gathered is None or len(gathered[0]) == 0:
                    continue
                indices, values = gathered
                arrays = {k: v.float().cpu().numpy() for k, v in values.items()}
                if not all(np.isfinite(array).all() for array in arrays.values()):
                    raise DataError(
                        f"the model gave non-finite (NaN or infinite) embeddings for cells "
                        f"{int(indices[0])}-{int(indices[-1])} of {store.path}: nothing was "
                        "written. Check those cells' images (scbd-cells info --verify) and the "
                        "checkpoint (another --which, or retrain)."
                    )
                writer.write(int(indices[0]), arrays)
                bar.advance(task, len(indices))

        result_paths: dict[str, Path] = {}
        if not dist_info.is_main:
            barrier()  # rank 0 writes the one result
            if dist_info.distributed:
                cleanup()
            return EmbedResult(out_path=out_path, n_cells=store.n_cells)
        if aggregate:
            cells = LazyCells(cells_tmp, obs)
            try:
                profiles = aggregate_profiles(cells, control=control)
            finally:
                cells.close()
            for level, adata in (("guides", profiles.guides), ("genes", profiles.genes)):
                adata.uns[schema.UNS_SCBD] = dict(uns[schema.UNS_SCBD], level=level)
                tmp = _temporary_path(aggregate_paths[level])
                tmp_paths.append(tmp)
                _write_any(adata, tmp)
                result_paths[level] = tmp
        _move_into_place(cells_tmp, out_path, overwrite=overwrite)
        for level, tmp in result_paths.items():
            _move_into_place(tmp, aggregate_paths[level], overwrite=overwrite)
    except BaseException:
        for path in tmp_paths:
            _remove(path)
        raise
    barrier()
    if dist_info.distributed:
        cleanup()
    log.info("Embedded %d cells -> %s", store.n_cells, out_path)
    return EmbedResult(
        out_path=out_path,
        n_cells=store.n_cells,
        guides_path=aggregate_paths["guides"] if aggregate else None,
        genes_path=aggregate_paths["genes"] if aggregate else None,
    )
