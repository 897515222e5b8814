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
from scbd_cells.embedding.forward import encode_pieces
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
    import pandas as pd
    import torch

    from scbd_cells.core.distributed import DistInfo
    from scbd_cells.data.store import Store
    from scbd_cells.model.preprocess import ImagePreprocessor
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
        Checkpoint of the run: ``best``, ``last``, ``best_total`` or ``best_z_c``
        (:func:`scbd_cells.training.checkpoint.load_trained`).
    workers
        Store reader threads.
    overwrite
        Replace existing outputs.

    Returns
    -------
    EmbedResult
    """
    from scbd_cells.core.distributed import barrier, cleanup, init_distributed
    from scbd_cells.data.store import open_store
    from scbd_cells.training.checkpoint import check_argument_order, load_trained

    out_path = Path(out)
    profile_paths = _check_options(  # None without --aggregate
        out_path, inputs=[run_dir, store_path], representation=representation,
        batch_size=batch_size, aggregate=aggregate, overwrite=overwrite,
    )  # fmt: skip
    check_argument_order(run_dir, store_path)
    store = open_store(store_path)
    # Under torchrun each rank embeds every world_size-th piece; rank 0 gathers and writes.
    dist_info = init_distributed(device or _default_device())
    trained = load_trained(run_dir, which=which, device=str(dist_info.device))
    trained.check_store(store)
    preprocessor = trained.preprocessor_for(store)
    control = _control(store, aggregate=profile_paths is not None)
    cells = _CellsOutput.plan(trained, store, dist_info.device, representation=representation)
    uns = _uns(trained, store, store_path, control=control, representation=representation)
    written = _embed_and_write(
        store, preprocessor, cells, uns, out_path=out_path, dist_info=dist_info,
        profile_paths=profile_paths, control=control,
        representation=representation, batch_size=batch_size, workers=workers,
        overwrite=overwrite,
    )  # fmt: skip
    barrier()  # rank 0 writes the one result
    if dist_info.distributed:
        cleanup()
    if written:
        log.info("Embedded %d cells -> %s", store.n_cells, out_path)
    paths = profile_paths if written and profile_paths else {}
    return EmbedResult(
        out_path=out_path,
        n_cells=store.n_cells,
        guides_path=paths.get("guides"),
        genes_path=paths.get("genes"),
    )


# --------------------------------------------------------------------------- embed's stages


def _check_options(
    out_path: Path,
    *,
    inputs: list[str | Path],
    representation: str,
    batch_size: int,
    aggregate: bool,
    overwrite: bool,
) -> dict[str, Path] | None:
    """Refuse bad option values and outputs that are not ours; the profile paths (aggregate)."""
    if representation not in REPRESENTATIONS:
        raise InputError(
            f"--representation must be one of {', '.join(REPRESENTATIONS)}; found "
            f"{representation!r}."
        )
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1; found {batch_size}.")
    check_output_path(out_path, overwrite=overwrite, inputs=inputs)
    if not aggregate:
        return None
    profile_paths = {
        "guides": out_path.parent / "guides.h5ad",
        "genes": out_path.parent / "genes.h5ad",
    }
    for path in profile_paths.values():
        check_output_path(path, overwrite=overwrite, inputs=inputs)
    return profile_paths


def _control(store: Store, *, aggregate: bool) -> str:
    """The store's control label; ``--aggregate`` subtracts it, so refuse a store without it
    (before the long pass, not after it)."""
    control = store.control or schema.CONTROL_LABEL
    if aggregate and control not in store.codes(schema.PERTURBATION)[1]:
        raise DataError(
            f"--aggregate subtracts the non-targeting control, but the store {store.path} "
            f"has no perturbation {control!r} (it records control "
            f"{store.control!r}). Re-ingest with --control LABEL, or embed without "
            "--aggregate and aggregate later with scbd_cells.aggregate_profiles(control=...)."
        )
    return control


@dataclass(frozen=True)
class _CellsOutput:
    """The model as embed runs it and the cells file's layout (obs, value widths)."""

    model: torch.nn.Module
    obs: pd.DataFrame
    widths: dict[str, int]

    @property
    def n_values(self) -> int:
        return sum(self.widths.values())

    @classmethod
    def plan(
        cls, trained: TrainedModel, store: Store, device: torch.device, *, representation: str
    ) -> _CellsOutput:
        import torch

        on_cuda = torch.device(device).type == "cuda"
        model = trained.model.to(memory_format=torch.channels_last) if on_cuda else trained.model
        z_dim = int(trained.model_args["z_dim"])
        widths = {"X": z_dim, schema.OBSM_BATCH_EMBEDDING: z_dim}
        if representation == "encoder":
            with torch.inference_mode():
                probe = torch.zeros(
                    (1, store.n_channels, *[int(trained.model_args["image_size"])] * 2),
                    device=device,
                )
                r_width = int(model(probe).r_perturbation.shape[1])
            widths[schema.OBSM_ENCODER] = r_width
            widths[schema.OBSM_BATCH_ENCODER] = r_width
        return cls(model, store_obs_for_anndata(store), widths)


def _embed_and_write(
    store: Store,
    preprocessor: ImagePreprocessor,
    cells: _CellsOutput,
    uns: dict,
    *,
    out_path: Path,
    dist_info: DistInfo,
    profile_paths: dict[str, Path] | None,
    control: str,
    representation: str,
    batch_size: int,
    workers: int,
    overwrite: bool,
) -> bool:
    """Embed into temporary files and move them into place (rank 0); True where written.

    Every rank embeds its pieces; an error on the way removes what was written.
    """
    if dist_info.is_main:  # HDF5 cannot recover from a full disk mid-write: check first
        check_free_space(out_path, anndata_bytes(cells.obs, store.n_cells * cells.n_values))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_paths: list[Path] = []
    try:
        cells_tmp = temporary_path(out_path)
        writer = None
        if dist_info.is_main:
            tmp_paths += [cells_tmp, cells_tmp.with_name(cells_tmp.name + ".reserve")]
            writer = CellsWriter(
                cells_tmp, obs=cells.obs, widths=cells.widths, uns=uns, shown_as=out_path
            )
        _embed_cells(
            cells.model, store, preprocessor, writer,
            representation=representation, batch_size=batch_size, workers=workers,
            dist_info=dist_info,
        )  # fmt: skip
        if not dist_info.is_main:
            return False
        result_paths: dict[str, Path] = {}
        if profile_paths is not None:
            result_paths = _write_profiles(
                cells_tmp, uns, control=control, paths=profile_paths, tmp_paths=tmp_paths
            )
        move_into_place(cells_tmp, out_path, overwrite=overwrite)
        for level, tmp in result_paths.items():
            move_into_place(tmp, profile_paths[level], overwrite=overwrite)
    except BaseException:
        for path in tmp_paths:
            remove_path(path)
        raise
    return True


def _embed_cells(
    model: torch.nn.Module,
    store: Store,
    preprocessor: ImagePreprocessor,
    writer: CellsWriter | None,
    *,
    representation: str,
    batch_size: int,
    workers: int,
    dist_info: DistInfo,
) -> None:
    """Every cell through the model, in store order, into ``writer`` (rank 0's).

    Under torchrun each rank embeds every world_size-th piece and rank 0 gathers and writes.
    """
    import torch

    from scbd_cells.core.distributed import gather_pieces

    torch_device = dist_info.device
    with ExitStack() as stack:
        if writer is not None:
            stack.push(writer.finish)  # closes, or discards after an error
        bar = stack.enter_context(progress_bar(unit="cells"))
        task = bar.add_task("Embedding cells", total=store.n_cells)
        for piece in encode_pieces(
            model, store, preprocessor, np.arange(store.n_cells), device=torch_device,
            batch_size=batch_size, workers=workers, rank=dist_info.rank,
            world_size=dist_info.world_size,
        ):  # fmt: skip
            output = piece.output
            values = {
                "X": output.z_perturbation,
                schema.OBSM_BATCH_EMBEDDING: output.z_batch,
            }
            if representation == "encoder":
                values[schema.OBSM_ENCODER] = output.r_perturbation
                values[schema.OBSM_BATCH_ENCODER] = output.r_batch
            gathered = gather_pieces(torch.as_tensor(piece.rows, device=torch_device), values)
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


def _uns(
    trained: TrainedModel,
    store: Store,
    store_path: str | Path,
    *,
    control: str,
    representation: str,
) -> dict[str, Any]:
    """``uns`` of the files embed writes: the provenance under ``uns["scbd"]``."""
    from scbd_cells import __version__

    provenance = {
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
    return {schema.UNS_SCBD: provenance}
