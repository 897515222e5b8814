"""Embed: a trained checkpoint + a store -> cell-level AnnData (and guide/gene profiles).

The cells file is written incrementally: the AnnData skeleton (obs, var, uns)
first, then ``X`` and ``obsm`` filled batch by batch, so memory holds the cell
table plus one batch whatever the number of cells. Everything is written under
temporary names and renamed into place at the end: an interrupted or failed
run leaves no partial output.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scbd_cells.core.errors import DataError, InputError
from scbd_cells.core.outputs import check_free_space, location_text, locks_output
from scbd_cells.core.progress import progress_bar
from scbd_cells.data import schema
from scbd_cells.profiles.anndata_io import (
    CellsWriter,
    anndata_bytes,
    check_output_path,
    move_into_place,
    remove_path,
    store_label_columns,
    store_obs_for_anndata,
    temporary_path,
    without_none,
    write_any,
)

if TYPE_CHECKING:
    from scbd_cells.data.store import Store
    from scbd_cells.training.checkpoint import TrainedModel

log = logging.getLogger(__name__)

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

    from scbd_cells.core.distributed import barrier, cleanup, init_distributed
    from scbd_cells.data.store import open_store
    from scbd_cells.training.checkpoint import check_argument_order, load_trained

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
        schema.UNS_SCBD: _provenance(
            trained, store, store_path, control=control, representation=representation
        )
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_paths: list[Path] = []
    try:
        cells_tmp = temporary_path(out_path)
        writer = None
        if dist_info.is_main:
            tmp_paths += [cells_tmp, cells_tmp.with_name(cells_tmp.name + ".reserve")]
            writer = CellsWriter(cells_tmp, obs=obs, widths=widths, uns=uns, shown_as=out_path)
        _embed_cells(
            model, store, preprocessor, writer,
            representation=representation, batch_size=batch_size, workers=workers,
            dist_info=dist_info,
        )  # fmt: skip
        result_paths: dict[str, Path] = {}
        if not dist_info.is_main:
            barrier()  # rank 0 writes the one result
            if dist_info.distributed:
                cleanup()
            return EmbedResult(out_path=out_path, n_cells=store.n_cells)
        if aggregate:
            result_paths = _write_profiles(
                cells_tmp, uns, control=control, paths=aggregate_paths, tmp_paths=tmp_paths
            )
        move_into_place(cells_tmp, out_path, overwrite=overwrite)
        for level, tmp in result_paths.items():
            move_into_place(tmp, aggregate_paths[level], overwrite=overwrite)
    except BaseException:
        for path in tmp_paths:
            remove_path(path)
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


# --------------------------------------------------------------------------- embed's stages


def _embed_cells(
    model: Any,
    store: Store,
    preprocessor: Any,
    writer: CellsWriter | None,
    *,
    representation: str,
    batch_size: int,
    workers: int,
    dist_info: Any,
) -> None:
    """Every cell through the model, in store order, into ``writer`` (rank 0's).

    Under torchrun each rank embeds every world_size-th piece and rank 0 gathers and writes.
    """
    import torch

    from scbd_cells.core.distributed import gather_pieces
    from scbd_cells.data.loader import images_to_device, iter_cells
    from scbd_cells.model.scbd import device_autocast, run_model

    torch_device = dist_info.device
    batch_codes = torch.from_numpy(np.asarray(store.codes(schema.BATCH)[0], dtype=np.int64))
    with ExitStack() as stack:
        if writer is not None:
            stack.push(writer.finish)  # closes, or discards after an error
        bar = stack.enter_context(progress_bar(unit="cells"))
        task = bar.add_task("Embedding cells", total=store.n_cells)
        autocast = device_autocast(torch_device)
        stack.enter_context(torch.inference_mode())
        for indices, images in iter_cells(
            store,
            np.arange(store.n_cells),
            batch_size=batch_size,
            workers=workers,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        ):
            pixels = images_to_device(images, torch_device)
            codes = batch_codes[torch.from_numpy(np.asarray(indices, dtype=np.int64))]
            inputs = preprocessor(pixels, codes)  # (B, C, S, S) float32
            output = run_model(model, inputs, autocast=autocast)
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


def _write_profiles(
    cells_path: Path,
    uns: dict,
    *,
    control: str,
    paths: dict[str, Path],
    tmp_paths: list[Path],
) -> dict[str, Path]:
    """Guide and gene profiles of the cells just written, under temporary names."""
    from scbd_cells.profiles.aggregate import aggregate_profiles
    from scbd_cells.profiles.cells import open_cells

    with open_cells(cells_path) as cells:
        profiles = aggregate_profiles(cells, control=control)
    written = {}
    for level, adata in (("guides", profiles.guides), ("genes", profiles.genes)):
        adata.uns[schema.UNS_SCBD] = dict(uns[schema.UNS_SCBD], level=level)
        tmp = temporary_path(paths[level])
        tmp_paths.append(tmp)
        write_any(adata, tmp, shown_as=paths[level])
        written[level] = tmp
    return written


def _provenance(
    trained: TrainedModel,
    store: Store,
    store_path: str | Path,
    *,
    control: str,
    representation: str,
) -> dict[str, Any]:
    """``uns["scbd"]`` of the files embed writes."""
    from scbd_cells import __version__

    return {
        "kind": "scbd",
        "checkpoint": str(Path(trained.checkpoint_path).resolve()),
        "step": int(trained.step),
        # nested dicts, as scanpy keeps parameters in uns (unset options left out)
        "config": without_none(trained.config),
        "model_args": without_none(trained.model_args),
        "store": location_text(store_path),
        "store_id": store.store_id,
        "control": control,
        "representation": representation,
        "version": __version__,
        schema.UNS_LABEL_COLUMNS: store_label_columns(store),
    }
