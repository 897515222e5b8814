"""Reconstruct: pictures of what z_c and z_s hold, from the additive decoder (paper A.1.1).

``train --decoder`` trains ``x_hat = d_c(z_c) + d_s(z_s)`` on detached
embeddings, so the decoder learns to draw a cell from its two embeddings
without changing them. :func:`reconstruct` uses it for three grids:

- ``reconstructions``: a few cells of each chosen perturbation, original beside
  reconstruction (how much of the cell the two embeddings keep);
- ``swap_well``: z_c of a cell with z_s of cells from other wells, "this cell
  as if imaged in well B" (what z_s holds: the well's look);
- ``swap_perturbation``: z_s of a cell with z_c of typical cells of other
  perturbations, "well A's look with perturbation B" (what z_c holds).

Every picture is in the model's normalised space (the preprocessed input the
decoder was trained to reproduce), originals and reconstructions on one display
scale per channel. ``index.csv`` lists every cell drawn and its role.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scbd_cells.core.errors import CheckpointError, DataError, InputError
from scbd_cells.core.outputs import atomic_path, locks_output, prepare_folder
from scbd_cells.data import schema
from scbd_cells.embedding.forward import EncodedCells, encode_cells

if TYPE_CHECKING:
    from matplotlib.figure import Figure, SubFigure

    from scbd_cells.data.store import Store
    from scbd_cells.training.checkpoint import TrainedModel

log = logging.getLogger(__name__)

#: Grid names, in the order they are drawn; each gives ``NAME.png`` and ``NAME_channels.png``.
GRIDS = ("reconstructions", "swap_well", "swap_perturbation")
INDEX_FILE = "index.csv"
INDEX_COLUMNS = [
    "grid",
    "row",
    "column",
    "role",
    "store_row",
    schema.CELL_ID,
    schema.PERTURBATION,
    schema.GUIDE,
    schema.BATCH,
    schema.SPLIT,
]
#: Every file :func:`reconstruct` writes (``overwrite`` replaces these and nothing else).
OUTPUT_FILES = (
    *(f"{name}{suffix}.png" for name in GRIDS for suffix in ("", "_channels")),
    INDEX_FILE,
)
#: Perturbations chosen when none are named (besides the control).
DEFAULT_N_PERTURBATIONS = 4
#: Most cells a perturbation shows in the reconstruction grid (two pictures each).
MAX_GRID_CELLS = 64
#: Cells per perturbation encoded to rank perturbations and to find typical cells.
SAMPLE_PER_PERTURBATION = 16
#: Display range of each channel: these percentiles of the originals shown.
DISPLAY_PERCENTILES = (1.0, 99.5)

# Stain colours (RGB) for channel names labs use; other channels take the palette in order.
_NAMED_COLOURS = {
    "dna": (0.15, 0.35, 1.0),
    "dapi": (0.15, 0.35, 1.0),
    "hoechst": (0.15, 0.35, 1.0),
    "nuclei": (0.15, 0.35, 1.0),
    "actin": (0.85, 0.1, 0.75),
    "phalloidin": (0.85, 0.1, 0.75),
    "microtubules": (0.1, 0.9, 0.2),
    "tubulin": (0.1, 0.9, 0.2),
    "dna_damage": (1.0, 0.85, 0.0),
    "gh2ax": (1.0, 0.85, 0.0),
}
_PALETTE = (
    (0.1, 0.9, 0.2),
    (0.85, 0.1, 0.75),
    (1.0, 0.85, 0.0),
    (0.0, 0.85, 0.9),
    (1.0, 0.3, 0.1),
    (0.15, 0.35, 1.0),
    (0.8, 0.8, 0.8),
)


@dataclass(frozen=True)
class Grid:
    """One picture grid: panels of (C, S, S) images in the model's normalised space.

    Attributes
    ----------
    name
        ``reconstructions``, ``swap_well`` or ``swap_perturbation``.
    title
        What the grid shows, for a person.
    images
        (rows, columns, C, S, S) float32; an empty panel is all NaN.
    row_labels, column_labels
        Text beside each row and above each column.
    row_breaks, column_breaks
        Rows and columns followed by a wider gap (they close a group: a header row,
        a cell's pair of panels).
    """

    name: str
    title: str
    images: np.ndarray
    row_labels: list[str]
    column_labels: list[str]
    row_breaks: tuple[int, ...] = ()
    column_breaks: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReconstructResult:
    """What :func:`reconstruct` wrote.

    Attributes
    ----------
    out_dir
        The output folder.
    figure_paths
        Grid name -> composite PNG (all channels in their stain colours).
    channel_figure_paths
        Grid name -> PNG with one block of panels per channel.
    index_path
        ``index.csv``: one row per cell in each panel (grid, row, column, role,
        store_row, cell_id, perturbation, guide, batch, split).
    perturbations
        The perturbations shown (the control first when the store has one).
    grids
        The arrays drawn, by name (for notebooks and tests).
    """

    out_dir: Path
    figure_paths: dict[str, Path]
    channel_figure_paths: dict[str, Path]
    index_path: Path
    perturbations: list[str]
    grids: dict[str, Grid]


# --------------------------------------------------------------------------- model pieces


def decode(
    trained: TrainedModel, z_perturbation: np.ndarray, z_batch: np.ndarray, *, batch_size: int = 512
) -> np.ndarray:
    """The additive decoder's image ``d_c(z_c) + d_s(z_s)`` for each pair of rows.

    Parameters
    ----------
    trained
        A :class:`~scbd_cells.training.checkpoint.TrainedModel` trained with ``--decoder``.
    z_perturbation, z_batch
        (n, z) embeddings; row i of each makes picture i (same cell: a
        reconstruction; different cells: a swap).

    Returns
    -------
    numpy.ndarray
        (n, C, S, S) float32 in the model's normalised space.
    """
    import torch

    check_decoder(trained)
    device = next(trained.model.parameters()).device
    pieces = []
    with torch.inference_mode():
        for start in range(0, len(z_perturbation), batch_size):
            z_c = torch.as_tensor(z_perturbation[start : start + batch_size], device=device)
            z_s = torch.as_tensor(z_batch[start : start + batch_size], device=device)
            pieces.append(trained.model.decode(z_c.float(), z_s.float()).float().cpu().numpy())
    return np.concatenate(pieces)


def check_decoder(trained: TrainedModel) -> None:
    """Raise :class:`CheckpointError` when the run was trained without ``--decoder``."""
    if not trained.model_args.get("decoder") or trained.model.decoder_perturbation is None:
        raise CheckpointError(
            f"the run {trained.checkpoint_path} was trained without the decoder, so it cannot "
            "draw cells from z_c and z_s. Train with the decoder: `scbd-cells train STORE "
            "--out RUN_DIR --decoder` (the decoder learns from detached embeddings, so z_c and "
            "z_s are those of the same run without it), then rerun reconstruct on that run."
        )


# --------------------------------------------------------------------------- choosing cells


@dataclass(frozen=True)
class _Labels:
    """The store's labels as arrays, and the pool of cells pictures are drawn from."""

    perturbation_codes: np.ndarray
    perturbation_names: list[str]
    batch_codes: np.ndarray
    batch_names: list[str]
    pool: np.ndarray  # bool (N,): test-split cells when the store has them, else all
    control: str | None

    @classmethod
    def of(cls, store: Store) -> _Labels:
        perturbation_codes, perturbation_names = store.codes(schema.PERTURBATION)
        batch_codes, batch_names = store.codes(schema.BATCH)
        split = store.obs[schema.SPLIT].astype(str).to_numpy()
        pool = split == "test"
        if not pool.any():
            pool = np.ones(store.n_cells, dtype=bool)
        control = store.control if store.control in perturbation_names else None
        return cls(
            np.asarray(perturbation_codes, dtype=np.int64),
            perturbation_names,
            np.asarray(batch_codes, dtype=np.int64),
            batch_names,
            pool,
            control,
        )

    def rows_of(self, perturbation: int, *, batch: int | None = None) -> np.ndarray:
        """Pool rows of a perturbation (all its rows if none is in the pool), in one batch."""
        mask = self.perturbation_codes == perturbation
        if batch is not None:
            mask &= self.batch_codes == batch
        in_pool = np.flatnonzero(mask & self.pool)
        return in_pool if in_pool.size else np.flatnonzero(mask)


def _sample_per_class(
    codes: np.ndarray, rows: np.ndarray, per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``per_class`` random rows of each code among ``rows`` (sorted)."""
    rows = rng.permutation(rows)
    order = np.argsort(codes[rows], kind="stable")
    rows = rows[order]
    sorted_codes = codes[rows]
    rank = np.arange(rows.size) - np.searchsorted(sorted_codes, sorted_codes, side="left")
    return np.sort(rows[rank < per_class])


def _choose_perturbations(
    labels: _Labels,
    sample: EncodedCells,
    requested: Sequence[str] | None,
) -> list[int]:
    """Codes of the perturbations to show: the control first, then the requested or the
    ones whose mean z_c lies farthest from the control's (the clearest phenotypes)."""
    names = labels.perturbation_names
    control = names.index(labels.control) if labels.control is not None else None
    if requested:
        chosen = [names.index(p) for p in dict.fromkeys(requested) if names.index(p) != control]
    else:
        sample_codes = labels.perturbation_codes[sample.rows]
        present = np.unique(sample_codes)
        means = np.stack([sample.z_perturbation[sample_codes == c].mean(axis=0) for c in present])
        reference = (
            means[np.flatnonzero(present == control)[0]]
            if control is not None
            else sample.z_perturbation.mean(axis=0)
        )
        distance = np.linalg.norm(means - reference, axis=1)
        ranked = [int(present[i]) for i in np.argsort(-distance, kind="stable")]
        chosen = [c for c in ranked if c != control][:DEFAULT_N_PERTURBATIONS]
    chosen = ([control] if control is not None else []) + chosen
    if not chosen:
        raise InputError("no perturbation to show; name some with --perturbations.")
    return chosen


def _typical_cell(sample: EncodedCells, rows: np.ndarray) -> int:
    """The row among ``rows`` whose z_c is closest to their mean z_c (an edited, typical cell)."""
    z = sample.z_perturbation[sample.position(rows)]
    centre = z.mean(axis=0)
    return int(rows[np.argmin(np.linalg.norm(z - centre, axis=1))])


def _pick(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, size=min(k, rows.size), replace=False)) if rows.size else rows


@dataclass(frozen=True)
class _Plan:
    """Which store rows go where: the three grids as (z_c row, z_s row) or original panels."""

    perturbations: list[int]
    recon_rows: list[np.ndarray]  # per perturbation: the cells shown
    home_batch: int  # well A of the well swaps
    well_rows: list[int]  # per perturbation: the cell whose z_c is kept
    donor_wells: list[int]  # batch codes, columns of swap_well
    well_donors: list[int]  # per donor well: the cell whose z_s is used
    style_rows: list[int]  # rows of swap_perturbation: cells whose z_s is kept, one per well
    perturbation_donors: list[int]  # per non-control perturbation: a typical cell (z_c)

    def rows_needed(self) -> np.ndarray:
        """Every store row the grids draw or take an embedding from."""
        return np.concatenate(
            [
                *self.recon_rows,
                self.well_rows,
                self.well_donors,
                self.style_rows,
                self.perturbation_donors,
            ]
        ).astype(np.int64)


def _plan(
    labels: _Labels,
    sample: EncodedCells,
    perturbations: list[int],
    *,
    cells: int,
    wells: int,
    rng: np.random.Generator,
) -> _Plan:
    recon_rows = [_pick(labels.rows_of(p), cells, rng) for p in perturbations]

    # Well A: a well holding pool cells of every chosen perturbation (pooled screens: any).
    n_batches = len(labels.batch_names)
    holds = np.zeros(n_batches, dtype=np.int64)
    for p in perturbations:
        holds[np.unique(labels.batch_codes[labels.rows_of(p)])] += 1
    candidates = np.flatnonzero(holds == holds.max())
    home = int(rng.choice(candidates))
    well_rows = []
    for p in perturbations:
        in_home = labels.rows_of(p, batch=home)
        well_rows.append(int(rng.choice(in_home if in_home.size else labels.rows_of(p))))

    # Donor wells: other wells, their cells of the control (or of any perturbation).
    occupied = np.bincount(labels.batch_codes, minlength=n_batches) > 0
    others = np.array([b for b in np.flatnonzero(occupied) if b != home], dtype=np.int64)
    donor_wells = sorted(int(b) for b in _pick(others, wells, rng))
    style_source = perturbations[0]  # the control when the store has one

    def cell_in(batch: int) -> int:
        rows = labels.rows_of(style_source, batch=batch)
        if rows.size == 0:
            rows = np.flatnonzero((labels.batch_codes == batch) & labels.pool)
        if rows.size == 0:
            rows = np.flatnonzero(labels.batch_codes == batch)
        return int(rng.choice(rows))

    well_donors = [cell_in(b) for b in donor_wells]
    style_rows = [cell_in(b) for b in [home, *donor_wells]]
    targets = perturbations[1:] if labels.control is not None else perturbations
    perturbation_donors = [
        _typical_cell(sample, sample.rows[labels.perturbation_codes[sample.rows] == p])
        for p in targets
    ]
    return _Plan(
        perturbations=perturbations,
        recon_rows=recon_rows,
        home_batch=home,
        well_rows=well_rows,
        donor_wells=donor_wells,
        well_donors=well_donors,
        style_rows=style_rows,
        perturbation_donors=perturbation_donors,
    )


# --------------------------------------------------------------------------- building grids


class _GridBuilder:
    """Fills a grid panel by panel and records each panel's cells for index.csv."""

    def __init__(self, name: str, title: str, n_rows: int, n_columns: int, shape: tuple) -> None:
        self.name, self.title = name, title
        self.images = np.full((n_rows, n_columns, *shape), np.nan, dtype=np.float32)
        self.row_labels = [""] * n_rows
        self.column_labels = [""] * n_columns
        self.row_breaks: tuple[int, ...] = ()
        self.column_breaks: tuple[int, ...] = ()
        self.records: list[dict[str, Any]] = []
        self.decodes: list[tuple[int, int, int, int]] = []  # (row, column, z_c row, z_s row)

    def original(self, row: int, column: int, store_row: int, encoded: EncodedCells) -> None:
        self.images[row, column] = encoded.inputs[encoded.position([store_row])[0]]
        self.records.append(self._record(row, column, "original", store_row))

    def decoded(self, row: int, column: int, z_c_row: int, z_s_row: int) -> None:
        self.decodes.append((row, column, z_c_row, z_s_row))
        if z_c_row == z_s_row:
            self.records.append(self._record(row, column, "reconstruction", z_c_row))
        else:
            self.records.append(self._record(row, column, "z_c", z_c_row))
            self.records.append(self._record(row, column, "z_s", z_s_row))

    def _record(self, row: int, column: int, role: str, store_row: int) -> dict[str, Any]:
        return {
            "grid": self.name,
            "row": row,
            "column": column,
            "role": role,
            "store_row": store_row,
        }

    def finish(self, trained: TrainedModel, encoded: EncodedCells) -> Grid:
        if self.decodes:
            z_c_rows = encoded.position([d[2] for d in self.decodes])
            z_s_rows = encoded.position([d[3] for d in self.decodes])
            pictures = decode(trained, encoded.z_perturbation[z_c_rows], encoded.z_batch[z_s_rows])
            for (row, column, _, _), picture in zip(self.decodes, pictures, strict=True):
                self.images[row, column] = picture
        return Grid(
            self.name,
            self.title,
            self.images,
            self.row_labels,
            self.column_labels,
            self.row_breaks,
            self.column_breaks,
        )


def _build_grids(
    plan: _Plan, labels: _Labels, encoded: EncodedCells, trained: TrainedModel, *, cells: int
) -> tuple[list[Grid], list[dict[str, Any]]]:
    """The three grids, decoded, and the records of every panel's cells (for index.csv)."""
    shape = encoded.inputs.shape[1:]
    builders = (
        _reconstruction_grid(plan, labels, encoded, shape, cells=cells),
        _swap_well_grid(plan, labels, encoded, shape),
        _swap_perturbation_grid(plan, labels, encoded, shape),
    )
    grids = [builder.finish(trained, encoded) for builder in builders]
    return grids, [record for builder in builders for record in builder.records]


def _describe(labels: _Labels, row: int) -> str:
    """A row label: the cell's perturbation over its well."""
    perturbation = labels.perturbation_names[labels.perturbation_codes[row]]
    return f"{perturbation}\n{labels.batch_names[labels.batch_codes[row]]}"


def _reconstruction_grid(
    plan: _Plan, labels: _Labels, encoded: EncodedCells, shape: tuple, *, cells: int
) -> _GridBuilder:
    """A row per perturbation: each cell's original beside its reconstruction."""
    recon = _GridBuilder(
        "reconstructions",
        "Cells and their reconstructions from (z_c, z_s)",
        len(plan.perturbations),
        2 * cells,
        shape,
    )
    recon.column_breaks = tuple(range(1, 2 * cells - 1, 2))
    for j in range(cells):
        recon.column_labels[2 * j] = f"cell {j + 1}\noriginal"
        recon.column_labels[2 * j + 1] = f"cell {j + 1}\nreconstruction"
    for i, (p, rows) in enumerate(zip(plan.perturbations, plan.recon_rows, strict=True)):
        recon.row_labels[i] = labels.perturbation_names[p]
        for j, row in enumerate(rows):
            recon.original(i, 2 * j, int(row), encoded)
            recon.decoded(i, 2 * j + 1, int(row), int(row))
    return recon


def _swap_well_grid(
    plan: _Plan, labels: _Labels, encoded: EncodedCells, shape: tuple
) -> _GridBuilder:
    """z_c of cells from well A with z_s of cells from other wells (the donors on top)."""
    bname = labels.batch_names
    swap_well = _GridBuilder(
        "swap_well",
        f"z_c of cells from well {bname[plan.home_batch]} with z_s of cells from other wells: "
        "each cell as if imaged in that well",
        1 + len(plan.well_rows),
        2 + len(plan.donor_wells),
        shape,
    )
    swap_well.row_breaks, swap_well.column_breaks = (0,), (1,)
    swap_well.row_labels[0] = "z_s donors\n(originals)"
    swap_well.column_labels[:2] = ["original", "reconstruction"]
    for j, (batch, donor) in enumerate(zip(plan.donor_wells, plan.well_donors, strict=True)):
        swap_well.column_labels[2 + j] = f"z_s of\n{bname[batch]}"
        swap_well.original(0, 2 + j, donor, encoded)
    for i, row in enumerate(plan.well_rows, start=1):
        swap_well.row_labels[i] = _describe(labels, row)
        swap_well.original(i, 0, row, encoded)
        swap_well.decoded(i, 1, row, row)
        for j, donor in enumerate(plan.well_donors):
            swap_well.decoded(i, 2 + j, row, donor)
    return swap_well


def _swap_perturbation_grid(
    plan: _Plan, labels: _Labels, encoded: EncodedCells, shape: tuple
) -> _GridBuilder:
    """z_s of cells from several wells with z_c of typical cells of other perturbations."""
    pname = labels.perturbation_names
    swap = _GridBuilder(
        "swap_perturbation",
        f"z_s of {pname[plan.perturbations[0]]} cells from several wells with z_c of typical "
        "cells of other perturbations: each well's look with that perturbation",
        1 + len(plan.style_rows),
        2 + len(plan.perturbation_donors),
        shape,
    )
    swap.row_breaks, swap.column_breaks = (0,), (1,)
    swap.row_labels[0] = "z_c donors\n(originals)"
    swap.column_labels[:2] = ["original", "reconstruction"]
    for j, donor in enumerate(plan.perturbation_donors):
        swap.column_labels[2 + j] = f"z_c of\n{pname[labels.perturbation_codes[donor]]}"
        swap.original(0, 2 + j, donor, encoded)
    for i, row in enumerate(plan.style_rows, start=1):
        swap.row_labels[i] = _describe(labels, row)
        swap.original(i, 0, row, encoded)
        swap.decoded(i, 1, row, row)
        for j, donor in enumerate(plan.perturbation_donors):
            swap.decoded(i, 2 + j, donor, row)
    return swap


# --------------------------------------------------------------------------- drawing


def channel_colours(channel_names: Sequence[str]) -> list[tuple[float, float, float]]:
    """An RGB colour per channel: the usual stain colour for a known name, else a palette."""
    colours: list[tuple[float, float, float] | None] = [
        _NAMED_COLOURS.get(name.lower()) for name in channel_names
    ]
    free = [c for c in _PALETTE if c not in colours]
    for i, colour in enumerate(colours):
        if colour is None:
            colours[i] = free.pop(0) if free else _PALETTE[i % len(_PALETTE)]
    return [c for c in colours if c is not None]


def display_ranges(grids: Sequence[Grid], records: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) per channel: percentiles of every original panel's pixels."""
    originals = []
    for grid in grids:
        panels = records[(records["grid"] == grid.name) & (records["role"] == "original")]
        for row, column in zip(panels["row"], panels["column"], strict=True):
            originals.append(grid.images[row, column])
    pixels = np.stack(originals)  # (n, C, S, S)
    low, high = np.percentile(pixels, DISPLAY_PERCENTILES, axis=(0, 2, 3))
    return low, np.maximum(high, low + 1e-3)


def _scaled(image: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(C, S, S) -> per-channel [0, 1] on the display range."""
    return np.clip((image - low[:, None, None]) / (high - low)[:, None, None], 0, 1)


def _composite(image: np.ndarray, colours: np.ndarray, low: np.ndarray, high: np.ndarray):
    return np.clip(np.einsum("chw,ck->hwk", _scaled(image, low, high), colours), 0, 1)


# The figure's size, from its panels and labels (inches); matplotlib's compressed layout
# (constrained layout for grids of images) places every panel, label and title within it.
_PANEL_INCHES = 0.62
_PANEL_PAD = 0.02  # around each panel (the layout's w_pad, h_pad)
_BREAK_SPACE = 0.2  # the wider gap after a grid's breaks, in panels
_ROW_LABELS_INCHES, _COLUMN_LABELS_INCHES, _BLOCK_TITLE_INCHES = 0.95, 0.35, 0.3
_EDGE_INCHES = 0.12  # right of the last column: its labels are wider than a panel


def _space_note(normalize: str) -> str:
    if normalize == "batch":
        return "each channel standardised with its own well's statistics"
    if normalize == "arcsinh":
        return "(arcsinh(x) - 7) / 7 of the raw intensities, the paper's code's transform"
    return "each channel standardised with the store's statistics"


def _wrap(text: str, width_in: float, points: float) -> str:
    """``text`` in lines that fit ``width_in`` inches at ``points`` (about 0.6 em a character)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, max(30, int(width_in * 120 / points))))


def _slots(n: int, breaks: Sequence[int]) -> tuple[list[float], list[int]]:
    """Along one axis: the GridSpec's slot ratios (a panel is 1, a thin empty slot follows
    each break) and the slot of each of the ``n`` panels."""
    ratios: list[float] = []
    slot_of = []
    for k in range(n):
        slot_of.append(len(ratios))
        ratios.append(1.0)
        if k in breaks and k < n - 1:
            ratios.append(_BREAK_SPACE)
    return ratios, slot_of


def _panel_axes(figure: Figure | SubFigure, grid: Grid) -> np.ndarray:
    """(rows, columns) axes on one GridSpec, a wider gap after each of the grid's breaks."""
    height_ratios, row_slots = _slots(grid.images.shape[0], grid.row_breaks)
    width_ratios, column_slots = _slots(grid.images.shape[1], grid.column_breaks)
    spec = figure.add_gridspec(
        len(height_ratios), len(width_ratios),
        height_ratios=height_ratios, width_ratios=width_ratios, hspace=0, wspace=0,
    )  # fmt: skip
    axes = np.empty(grid.images.shape[:2], dtype=object)
    for i, row in enumerate(row_slots):
        for j, column in enumerate(column_slots):
            axes[i, j] = figure.add_subplot(spec[row, column])
    return axes


def _draw_block(
    figure: Figure | SubFigure, grid: Grid, render: Callable[[np.ndarray], np.ndarray]
) -> None:
    """Panels of one grid with row labels beside and column labels above them."""
    axes = _panel_axes(figure, grid)
    for (i, j), axis in np.ndenumerate(axes):
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_frame_on(False)
        if np.isnan(grid.images[i, j]).all():
            axis.set_aspect("equal")  # an empty panel keeps its square
        else:
            axis.imshow(render(grid.images[i, j]), interpolation="nearest")
        if i == 0:
            axis.set_title(grid.column_labels[j], fontsize=6.5, color="white", pad=3)
        if j == 0:
            axis.set_ylabel(
                grid.row_labels[i], fontsize=6.5, color="white", rotation=0,
                ha="right", va="center", labelpad=4,
            )  # fmt: skip


def _save(figure: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp_path:
            figure.savefig(tmp_path, dpi=100, facecolor="black", metadata={"Software": None})
    finally:
        plt.close(figure)


def _block_size(grid: Grid, *, titled: bool) -> tuple[float, float]:
    """Inches a block of panels wants: the panels, their gaps and breaks, the labels."""
    n_rows, n_columns = grid.images.shape[:2]
    panel = _PANEL_INCHES + 2 * _PANEL_PAD
    breaks = _BREAK_SPACE * _PANEL_INCHES
    width = _ROW_LABELS_INCHES + n_columns * panel + len(grid.column_breaks) * breaks
    height = _COLUMN_LABELS_INCHES + n_rows * panel + len(grid.row_breaks) * breaks
    return width, height + _BLOCK_TITLE_INCHES * titled


def _note(channel_names: Sequence[str], low: np.ndarray, high: np.ndarray, normalize: str) -> str:
    ranges = ", ".join(
        f"{name} {a:.2f} to {b:.2f}" for name, a, b in zip(channel_names, low, high, strict=True)
    )
    return (
        f"All panels are in the model's normalised space ({_space_note(normalize)}), the "
        "decoder's target; originals and decoder outputs share one display range per channel "
        f"(p{DISPLAY_PERCENTILES[0]:g} to p{DISPLAY_PERCENTILES[1]:g} of the originals shown): "
        f"{ranges}."
    )


def _title_and_legend(
    figure: Figure, title: str, note: str, channel_names: Sequence[str], colours: np.ndarray
) -> None:
    """The title above the panels; below them, the channel colours under ``note``."""
    from matplotlib.patches import Patch

    figure.suptitle(title, x=0.01, ha="left", fontsize=10, color="white")
    patches = [
        Patch(color=tuple(colour), label=name)
        for name, colour in zip(channel_names, colours, strict=True)
    ]
    legend = figure.legend(
        handles=patches,
        loc="outside lower left",
        ncols=len(channel_names),
        title=note,
        alignment="left",
        fontsize=7.5,
        title_fontsize=6.5,
        labelcolor=[tuple(c) for c in colours],
        frameon=False,
        handlelength=0.8,
    )
    legend.get_title().set_color("0.75")


def draw_grid(
    grid: Grid,
    figure_path: Path,
    *,
    channel_names: Sequence[str],
    low: np.ndarray,
    high: np.ndarray,
    normalize: str,
    channels: bool = False,
) -> Path:
    """Draw a grid as a PNG: an RGB composite, or (``channels``) one block per channel.

    Originals and decoded panels share the per-channel display range ``low``..``high``
    (values in the model's normalised space); the figure says so.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    colours = np.asarray(channel_colours(channel_names), dtype=np.float32)
    n_blocks = len(channel_names) if channels else 1
    block_columns = 2 if n_blocks > 1 else 1
    block_rows = math.ceil(n_blocks / block_columns)
    block_width, block_height = _block_size(grid, titled=channels)
    width = block_width * block_columns + _EDGE_INCHES
    title = _wrap(grid.title, width - 0.2, 10)
    note = _wrap(_note(channel_names, low, high, normalize), width - 0.2, 6.5)
    header = 0.2 + 0.19 * (title.count("\n") + 1) + 0.12 * (note.count("\n") + 1) + 0.25
    figure = plt.figure(
        figsize=(width, header + block_height * block_rows),
        facecolor="black",
        layout="compressed",
    )
    figure.get_layout_engine().set(
        w_pad=_PANEL_PAD, h_pad=_PANEL_PAD, wspace=0, hspace=0,
        rect=(0, 0, 1 - _EDGE_INCHES / width, 1),
    )  # fmt: skip
    _title_and_legend(figure, title, note, channel_names, colours)
    if not channels:
        _draw_block(figure, grid, lambda image: _composite(image, colours, low, high))
    else:
        blocks = figure.subfigures(
            block_rows, block_columns, squeeze=False, wspace=0.03, hspace=0.02,
            facecolor="black",
        )  # fmt: skip
        for c, (name, block) in enumerate(zip(channel_names, blocks.flat, strict=False)):

            def render(image: np.ndarray, c: int = c) -> np.ndarray:
                level = _scaled(image[c : c + 1], low[c : c + 1], high[c : c + 1])[0]
                return level[:, :, None] * colours[c][None, None, :]

            block.suptitle(
                f"{name} (display {low[c]:.2f} to {high[c]:.2f})", x=0.02, ha="left",
                fontsize=8.5, color=tuple(colours[c]),
            )  # fmt: skip
            _draw_block(block, grid, render)
    _save(figure, figure_path)
    return figure_path


# --------------------------------------------------------------------------- entry point


@locks_output()
def reconstruct(
    run_dir: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    out: str | os.PathLike,
    cells: int = 4,
    seed: int = 0,
    perturbations: Sequence[str] | None = None,
    wells: int = 5,
    which: str = "best",
    device: str | None = None,
    overwrite: bool = False,
) -> ReconstructResult:
    """Draw what z_c and z_s hold: reconstructions and swaps from a run trained with ``--decoder``.

    Parameters
    ----------
    run_dir
        Training run folder (or a checkpoint ``.pt``) trained with ``--decoder``.
    store_path
        Store whose cells are drawn (the training store, or a new plate's: its
        wells are standardised with their own statistics, as ``embed`` does).
        Cells come from its test split when it has one.
    out
        Folder for ``reconstructions.png``, ``swap_well.png``,
        ``swap_perturbation.png`` (each also as ``*_channels.png``, one block per
        channel) and ``index.csv``.
    cells
        Cells per perturbation in the reconstruction grid.
    seed
        Seeds the choice of cells and wells; same seed, same pictures.
    perturbations
        Perturbations to show (the control is always added first when the store
        has one). Default: the 4 whose mean z_c lies farthest from the control's,
        over a sample of up to 16 cells each.
    wells
        Other wells whose z_s is swapped in (columns of ``swap_well``, rows of
        ``swap_perturbation`` after the first well).
    which
        Checkpoint of the run: ``best``, ``last``, ``best_total`` or ``best_z_c``
        (:func:`scbd_cells.training.checkpoint.load_trained`).
    device
        ``cuda``, ``cpu``...; default CUDA when available.
    overwrite
        Replace pictures an earlier reconstruct wrote in ``out`` (nothing else there).

    Returns
    -------
    ReconstructResult

    Raises
    ------
    CheckpointError
        The run has no decoder (train with ``--decoder``), or does not fit the store.
    InputError
        Bad option values, unknown perturbations, an output folder that is not ours.
    """
    out_dir = Path(out)
    store, trained, labels = _open_run_and_store(
        run_dir, store_path, cells=cells, wells=wells, which=which, device=device
    )
    prepare_folder(
        out_dir, kind="pictures", overwrite=overwrite, entries=OUTPUT_FILES,
        inputs=[run_dir, store_path],
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    sample = encode_cells(trained, store, _sample_rows(labels, perturbations, rng, store=store))
    chosen = _choose_perturbations(labels, sample, perturbations)
    plan = _plan(labels, sample, chosen, cells=cells, wells=wells, rng=rng)
    encoded = encode_cells(trained, store, plan.rows_needed())
    grids, records = _build_grids(plan, labels, encoded, trained, cells=cells)
    figure_paths, channel_figure_paths, index_path = _write_pictures(
        grids, _index_table(records, store.obs), out_dir,
        channel_names=store.channel_names, normalize=trained.normalize,
    )  # fmt: skip
    shown = [labels.perturbation_names[p] for p in chosen]
    log.info("Drew %s -> %s", ", ".join(shown), out_dir)
    return ReconstructResult(
        out_dir=out_dir,
        figure_paths=figure_paths,
        channel_figure_paths=channel_figure_paths,
        index_path=index_path,
        perturbations=shown,
        grids={grid.name: grid for grid in grids},
    )


# --------------------------------------------------------------------------- reconstruct's stages


def _open_run_and_store(
    run_dir: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    cells: int,
    wells: int,
    which: str,
    device: str | None,
) -> tuple[Store, TrainedModel, _Labels]:
    """The store, the trained model (with its decoder) and the labels; the options checked."""
    from scbd_cells.core.distributed import resolve_device
    from scbd_cells.data.store import open_store
    from scbd_cells.training.checkpoint import check_argument_order, load_trained

    if cells < 1 or wells < 1:
        raise InputError(f"--cells and --wells must be at least 1; found {cells} and {wells}.")
    check_argument_order(run_dir, store_path)
    store = open_store(store_path)
    if cells > min(MAX_GRID_CELLS, store.n_cells):
        raise InputError(
            f"--cells {cells:,} asks for {cells:,} cells of each perturbation side by side "
            f"({2 * cells:,} pictures a row); the store {store.path} holds {store.n_cells:,} "
            f"cells and a row shows at most {MAX_GRID_CELLS}. Use --cells "
            f"{min(MAX_GRID_CELLS, store.n_cells)} or fewer."
        )
    device = str(resolve_device(device or "auto"))
    trained = load_trained(run_dir, which=which, device=device)
    check_decoder(trained)
    trained.check_store(store)
    labels = _Labels.of(store)
    if len(labels.batch_names) < 2:
        raise DataError(
            f"the store {store.path} has one batch label; swaps need cells from at least two wells."
        )
    return store, trained, labels


def _sample_rows(
    labels: _Labels,
    perturbations: Sequence[str] | None,
    rng: np.random.Generator,
    *,
    store: Store,
) -> np.ndarray:
    """Cells to embed first, to choose perturbations and typical cells: up to 16 of each
    named perturbation, or of every one."""
    if perturbations:
        unknown = [p for p in perturbations if p not in labels.perturbation_names]
        if unknown:
            raise InputError(
                f"--perturbations names {unknown}, which the store {store.path} does not hold; "
                f"it has {len(labels.perturbation_names)} perturbations, e.g. "
                f"{', '.join(labels.perturbation_names[:8])}."
            )
        requested = [labels.perturbation_names.index(p) for p in perturbations]
        rows = np.concatenate(
            [_pick(labels.rows_of(p), SAMPLE_PER_PERTURBATION, rng) for p in requested]
        )
    else:
        rows = _sample_per_class(
            labels.perturbation_codes,
            np.flatnonzero(labels.pool),
            SAMPLE_PER_PERTURBATION,
            rng,
        )
    log.info("Embedding %d sampled cells to choose perturbations and typical cells", len(rows))
    return rows


def _write_pictures(
    grids: Sequence[Grid],
    index: pd.DataFrame,
    out_dir: Path,
    *,
    channel_names: Sequence[str],
    normalize: str,
) -> tuple[dict[str, Path], dict[str, Path], Path]:
    """Each grid as a composite and as one block per channel, on one display range; the
    index of the cells drawn."""
    low, high = display_ranges(grids, index)
    figure_paths, channel_figure_paths = {}, {}
    for grid in grids:
        common = dict(channel_names=channel_names, low=low, high=high, normalize=normalize)
        figure_paths[grid.name] = draw_grid(grid, out_dir / f"{grid.name}.png", **common)
        channel_figure_paths[grid.name] = draw_grid(
            grid, out_dir / f"{grid.name}_channels.png", channels=True, **common
        )
    index_path = out_dir / INDEX_FILE
    with atomic_path(index_path) as tmp_path:
        index.to_csv(tmp_path, index=False)
    return figure_paths, channel_figure_paths, index_path


def _index_table(records: list[dict[str, Any]], obs: pd.DataFrame) -> pd.DataFrame:
    """index.csv: each panel's cells with their labels from the store's cell table."""
    index = pd.DataFrame.from_records(records)
    rows = index["store_row"].to_numpy()
    for column in (schema.CELL_ID, schema.PERTURBATION, schema.GUIDE, schema.BATCH, schema.SPLIT):
        values = obs[column].astype(str).to_numpy() if column in obs.columns else None
        index[column] = values[rows] if values is not None else ""
    return index[INDEX_COLUMNS]
