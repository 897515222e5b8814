"""Simulate: a synthetic optical pooled screen (cells table, uint16 images, complexes, truth).

The screen is built in two stages:

1. The *design* (one seeded generator, cheap, held in memory): genes grouped
   into complexes with shared morphological effect vectors, guides with
   efficacies, the non-targeting control, wells with technical effects, and
   every cell's perturbation, well, field of view and position.
2. The *images* (streamed, chunk by chunk, optionally in parallel): each chunk
   is a few fields of view of one well, drawn from its own seed, so the output
   does not depend on ``workers``. Cells are drawn vectorised (all cells of a
   chunk at once) into fields, the well's technical effects are applied to the
   whole field, and then either the fields (``layout="fields"``) or one crop per
   cell (``layout="crops"``) are written as TIFF.

A crop written in the crops layout is exactly the window that ingest cuts out
of the matching field in the fields layout (same seed), so both layouts show
the same cells. docs/simulator.md describes the model and its parameters.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage

from scbd_cells import __version__
from scbd_cells.core.errors import InputError
from scbd_cells.core.outputs import locks_output, prepare_folder
from scbd_cells.core.progress import progress_bar
from scbd_cells.data.schema import CONTROL_LABEL, SIM_CHANNELS

logger = logging.getLogger(__name__)

#: Interpretable morphological parameters a gene can shift (per-cell values are
#: standard normal in these units, so an effect of 0.5 is half a cell-to-cell SD).
MORPHOLOGY = (
    "cell_size",
    "cell_elongation",
    "nucleus_size",
    "dna_intensity",
    "foci_count",
    "damage_intensity",
    "actin_intensity",
    "fibre_density",
    "microtubule_intensity",
    "microtubule_density",
)
LAYOUTS = ("crops", "fields", "arrayed")
#: The negative control of an arrayed screen (one vehicle well: concentration 0).
ARRAYED_CONTROL = "DMSO"
#: The relationship file of an arrayed screen: mechanism-of-action groups of compounds (GMT).
ARRAYED_RELATIONSHIPS = "moa.gmt"
MIN_CROP_SIZE = 16
#: Drawing sizes are defined for a 64 px crop and scaled to ``crop_size``.
REFERENCE_CROP = 64


@dataclass(frozen=True)
class SimulationParams:
    """Sizes and strengths of a simulated screen (a preset, possibly with overrides).

    Attributes
    ----------
    n_genes
        Targeted genes (the control comes on top).
    n_complexes
        Protein complexes; about ``fraction_in_complexes`` of the genes belong to one.
    guides_per_gene
        Guides (sgRNAs) per targeted gene.
    control_guides
        Guides of the non-targeting control.
    cells_per_guide
        Cells per targeting guide (spread over all wells).
    control_cells_per_guide
        Cells per control guide.
    plates, wells_per_plate
        Plates and wells; every well holds cells of every guide (a pooled screen).
    crop_size
        Side of a cell crop in pixels (and the slot pitch in a field).
    field_grid
        A field of view holds up to ``field_grid**2`` cells on a jittered grid.
    effect_strength
        Multiplies every gene effect (1: typical effects 0.3-1 cell-to-cell SDs).
    batch_strength
        Multiplies every per-well technical effect (0: no batch effect).
    fraction_in_complexes
        Fraction of genes that belong to a complex.
    fraction_unassigned_with_effect
        Of the genes outside complexes, the fraction with an effect of their own
        (the others have none).
    cells_per_chunk
        Cells drawn together (memory per worker grows with it).
    holdout_plates
        The last ``holdout_plates`` plates are *held out*: their wells get technical
        effects from a shifted distribution, outside the range of the other plates
        (:func:`_holdout_well_effects`), to test a model on a plate unlike any it
        was trained on. 0: none (the screen is then byte-identical to one made
        before the option existed).
    """

    n_genes: int
    n_complexes: int
    guides_per_gene: int
    control_guides: int
    cells_per_guide: int
    control_cells_per_guide: int
    plates: int
    wells_per_plate: int
    crop_size: int = 64
    field_grid: int = 6
    effect_strength: float = 1.0
    batch_strength: float = 1.0
    fraction_in_complexes: float = 0.7
    fraction_unassigned_with_effect: float = 0.3
    cells_per_chunk: int = 1024
    holdout_plates: int = 0

    @property
    def n_cells(self) -> int:
        return (
            self.n_genes * self.guides_per_gene * self.cells_per_guide
            + self.control_guides * self.control_cells_per_guide
        )


PRESETS: dict[str, SimulationParams] = {
    # Tests: ~1.4 k cells at 32 px, seconds.
    "tiny": SimulationParams(
        n_genes=16,
        n_complexes=4,
        guides_per_gene=2,
        control_guides=4,
        cells_per_guide=40,
        control_cells_per_guide=40,
        plates=2,
        wells_per_plate=2,
        crop_size=32,
        field_grid=5,
        cells_per_chunk=512,
    ),
    # The demo / main job: ~15 k cells at 64 px, trained at 32 px on a laptop CPU in minutes.
    "demo": SimulationParams(
        n_genes=80,
        n_complexes=14,
        guides_per_gene=4,
        control_guides=24,
        cells_per_guide=40,
        control_cells_per_guide=60,
        plates=2,
        wells_per_plate=6,
        crop_size=64,
        field_grid=6,
        effect_strength=3.0,
    ),
    # Benchmarks: ~1.02 M cells at 32 px (about 12 GB of crops), written in parallel.
    "large": SimulationParams(
        n_genes=500,
        n_complexes=90,
        guides_per_gene=4,
        control_guides=100,
        cells_per_guide=480,
        control_cells_per_guide=600,
        plates=4,
        wells_per_plate=8,
        crop_size=32,
        field_grid=8,
        cells_per_chunk=4096,
    ),
}


@dataclass(frozen=True)
class ArrayedParams:
    """Sizes and strengths of a simulated arrayed screen (``layout="arrayed"``).

    Every plate holds each treatment (a compound at one concentration) in one well and
    ``control_wells`` wells of the vehicle (:data:`ARRAYED_CONTROL`); consecutive plates
    form batches of ``plates_per_batch`` (plates imaged together share part of their
    technical effects).

    Attributes
    ----------
    n_compounds
        Compounds (the control comes on top).
    n_mechanisms
        Mechanisms of action; each compound belongs to one (at least two compounds each).
    concentrations
        Concentrations of every compound (µM); a treatment is a compound at one of them.
    control_wells
        Vehicle wells per plate.
    cells_per_well
        Cells imaged per well.
    plates, plates_per_batch
        Replicate plates and how many form one batch (``plates`` must be a multiple).
    crop_size, field_grid, effect_strength, batch_strength, cells_per_chunk
        As in :class:`SimulationParams`.
    """

    n_compounds: int
    n_mechanisms: int
    concentrations: tuple[float, ...]
    control_wells: int
    cells_per_well: int
    plates: int
    plates_per_batch: int
    crop_size: int = 64
    field_grid: int = 6
    effect_strength: float = 1.0
    batch_strength: float = 1.0
    cells_per_chunk: int = 1024

    @property
    def wells_per_plate(self) -> int:
        return self.n_compounds * len(self.concentrations) + self.control_wells

    @property
    def n_cells(self) -> int:
        return self.plates * self.wells_per_plate * self.cells_per_well


ARRAYED_PRESETS: dict[str, ArrayedParams] = {
    # Tests: 880 cells at 32 px (22 wells x 4 plates in 2 batches), seconds.
    "tiny": ArrayedParams(
        n_compounds=6,
        n_mechanisms=3,
        concentrations=(1.0, 10.0),
        control_wells=4,
        cells_per_well=16,
        plates=4,
        plates_per_batch=2,
        crop_size=32,
        field_grid=4,
        effect_strength=2.0,
        cells_per_chunk=512,
    ),
    # The demo: ~13 k cells at 64 px (56 wells x 6 plates in 3 batches).
    "demo": ArrayedParams(
        n_compounds=24,
        n_mechanisms=8,
        concentrations=(0.3, 3.0),
        control_wells=8,
        cells_per_well=40,
        plates=6,
        plates_per_batch=2,
        crop_size=64,
        field_grid=6,
        effect_strength=3.0,
    ),
    # Benchmarks: ~1 M cells at 32 px (352 wells of a 384-well plate x 8 plates in 4 batches).
    "large": ArrayedParams(
        n_compounds=80,
        n_mechanisms=16,
        concentrations=(0.1, 0.3, 1.0, 3.0),
        control_wells=32,
        cells_per_well=360,
        plates=8,
        plates_per_batch=2,
        crop_size=32,
        field_grid=8,
        cells_per_chunk=4096,
    ),
}


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` wrote.

    Attributes
    ----------
    out_dir
        The screen's folder.
    cells_path, complexes_path, truth_path
        ``cells.csv``, ``complexes.txt`` (CORUM 5.x; arrayed: ``moa.gmt``, the compounds'
        mechanism-of-action groups) and ``truth.json``.
    preview_path
        ``preview.png`` when asked for, else None.
    layout
        ``"crops"``, ``"fields"`` or ``"arrayed"``.
    n_cells, n_genes, n_complexes, n_wells, n_fields
        Sizes (``n_genes`` without the control; arrayed: compounds and mechanisms).
    params
        The parameters used.
    seconds
        Wall time.
    """

    out_dir: Path
    cells_path: Path
    complexes_path: Path
    truth_path: Path
    preview_path: Path | None
    layout: str
    n_cells: int
    n_genes: int
    n_complexes: int
    n_wells: int
    n_fields: int
    params: SimulationParams | ArrayedParams
    seconds: float


# ---------------------------------------------------------------------------
# Design: genes, complexes, guides, wells, cells
# ---------------------------------------------------------------------------


@dataclass
class _Design:
    genes: list[str]  # targeted genes, then the control
    gene_complex: list[int]  # complex index per targeted gene, -1 if none
    gene_effects: np.ndarray  # (n_genes + 1, P) in per-cell SD units; control row zero
    complex_names: list[str]
    complex_effects: np.ndarray  # (n_complexes, P)
    guides: list[str]
    guide_gene: np.ndarray  # (n_guides,) gene index
    guide_efficacy: np.ndarray  # (n_guides,) fraction of cells edited
    plates: list[str]
    wells: list[str]  # well name within its plate, per well
    well_plate: np.ndarray  # (n_wells,) plate index
    well_effects: list[dict[str, Any]]
    # per cell (cell id = position), ordered by well, field, slot
    cell_guide: np.ndarray
    cell_well: np.ndarray
    cell_tile: np.ndarray  # field index within the well
    cell_field: np.ndarray  # global field index
    cell_x: np.ndarray  # centroid column in the field (float)
    cell_y: np.ndarray  # centroid row in the field (float)
    cell_shift: np.ndarray  # (n_cells, P) float32 morphological shift of each cell
    field_size: int
    fields: list[tuple[int, int]] = field(default_factory=list)  # (well, tile) per global field
    holdout_plates: list[str] = field(default_factory=list)  # plates with shifted effects


def _well_name(index: int) -> str:
    return f"{'ABCDEFGHIJKLMNOP'[index // 12]}{index % 12 + 1:02d}"


def _design(params: SimulationParams, rng: np.random.Generator) -> _Design:
    """Genes in complexes with their effects, guides, wells, then the cells of every guide.

    The stages draw from ``rng`` in this order; changing it changes every simulated screen.
    """
    genes = [f"GENE{i + 1:04d}" for i in range(params.n_genes)] + [CONTROL_LABEL]
    gene_complex = _complexes(params, rng)
    complex_effects, gene_effects = _gene_effects(params, gene_complex, rng)
    guides, guide_gene, guide_efficacy = _guides(params, genes, rng)
    plates = [f"plate{p + 1}" for p in range(params.plates)]
    wells = [_well_name(w) for _p in range(params.plates) for w in range(params.wells_per_plate)]
    well_plate = np.repeat(np.arange(params.plates), params.wells_per_plate)
    well_effects = _well_effects(params, rng, well_plate)
    cell_guide, cell_well = _pooled_cells(params, guide_gene, n_wells=len(wells), rng=rng)
    placement = _place_cells(cell_well, crop_size=params.crop_size, grid=params.field_grid, rng=rng)
    # Edited or not, per cell (a guide's efficacy is the fraction of its cells edited).
    edited = rng.random(cell_guide.size) < guide_efficacy[cell_guide]
    cell_shift = (gene_effects[guide_gene[cell_guide]] * edited[:, None]).astype(np.float32)
    return _placed(
        placement,
        genes=genes,
        gene_complex=gene_complex.tolist(),
        gene_effects=gene_effects,
        complex_names=[f"Simulated complex {i + 1}" for i in range(params.n_complexes)],
        complex_effects=complex_effects,
        guides=guides,
        guide_gene=guide_gene,
        guide_efficacy=guide_efficacy,
        plates=plates,
        wells=wells,
        well_plate=well_plate,
        well_effects=well_effects,
        cell_guide=cell_guide,
        cell_well=cell_well,
        cell_shift=cell_shift,
    )


def _placed(placement: _Placement, **design: Any) -> _Design:
    """A :class:`_Design` of ``design``'s fields, its cells where ``placement`` puts them."""
    return _Design(
        **design,
        cell_tile=placement.tile,
        cell_field=placement.field,
        cell_x=placement.x,
        cell_y=placement.y,
        field_size=placement.field_size,
        fields=placement.fields,
    )


def _complexes(params: SimulationParams, rng: np.random.Generator) -> np.ndarray:
    """Complex index per gene, -1 if none: a fraction of the genes, in groups (>= 2 each)."""
    n_genes, n_complexes = params.n_genes, params.n_complexes
    if not n_complexes:
        return np.full(n_genes, -1, dtype=int)
    n_members = min(n_genes, max(2 * n_complexes, round(params.fraction_in_complexes * n_genes)))
    return _random_groups(rng.permutation(n_genes)[:n_members], n_complexes, n_genes, rng)


def _random_groups(
    members: np.ndarray, n_groups: int, n_items: int, rng: np.random.Generator
) -> np.ndarray:
    """Group index per item, -1 outside ``members``: ``members`` in turn, in groups of random size.

    Every group gets at least two members (the callers check there are enough).
    """
    n_members = members.size
    cuts = np.sort(rng.choice(np.arange(1, n_members), size=n_groups - 1, replace=False))
    sizes = _at_least(np.diff(np.concatenate([[0], cuts, [n_members]])), 2)
    group = np.full(n_items, -1, dtype=int)
    start = 0
    for index, size in enumerate(sizes):
        group[members[start : start + size]] = index
        start += size
    return group


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    """A unit vector over :data:`MORPHOLOGY` that moves 2-4 of the parameters."""
    vector = np.zeros(len(MORPHOLOGY))
    chosen = rng.choice(len(MORPHOLOGY), size=int(rng.integers(2, 5)), replace=False)
    vector[chosen] = rng.normal(size=chosen.size)
    return vector / np.linalg.norm(vector)


def _gene_effects(
    params: SimulationParams, gene_complex: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Effects of the complexes (n_complexes, P) and of the genes (n_genes + 1, P).

    A complex shifts 2-4 interpretable parameters; its members share the direction with
    their own strength (some members none); genes outside complexes mostly have no
    effect, a few have one of their own. The control's row is zero.
    """
    n_genes, n_complexes, n_params = params.n_genes, params.n_complexes, len(MORPHOLOGY)
    complex_strength = rng.uniform(0.5, 1.5, size=n_complexes) * params.effect_strength
    complex_effects = (
        np.stack([_random_direction(rng) * s for s in complex_strength])
        if n_complexes
        else (np.zeros((0, n_params)))
    )
    gene_effects = np.zeros((n_genes + 1, n_params))
    for gene_index in range(n_genes):
        complex_index = gene_complex[gene_index]
        if complex_index >= 0:
            loading = 0.0 if rng.random() < 0.1 else rng.uniform(0.6, 1.4)
            gene_effects[gene_index] = loading * complex_effects[complex_index]
        elif rng.random() < params.fraction_unassigned_with_effect:
            gene_effects[gene_index] = (
                _random_direction(rng) * rng.uniform(0.4, 1.2) * params.effect_strength
            )
    return complex_effects, gene_effects


def _guides(
    params: SimulationParams, genes: list[str], rng: np.random.Generator
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Guide names, their gene index and efficacy: most cut well, one in six barely works."""
    guides, guide_gene, guide_efficacy = [], [], []
    for gene_index, gene in enumerate(genes[:-1]):
        for k in range(params.guides_per_gene):
            guides.append(f"{gene}_{k + 1}")
            guide_gene.append(gene_index)
            inactive = rng.random() < 1 / 6  # efficacy < 0.15
            guide_efficacy.append(rng.uniform(0.0, 0.15) if inactive else rng.uniform(0.6, 1.0))
    for k in range(params.control_guides):
        guides.append(f"{CONTROL_LABEL}_{k:04d}")
        guide_gene.append(params.n_genes)
        guide_efficacy.append(0.0)
    return guides, np.asarray(guide_gene), np.asarray(guide_efficacy)


def _pooled_cells(
    params: SimulationParams, guide_gene: np.ndarray, *, n_wells: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Guide and well of each cell, ordered by well.

    Each guide's cells go round-robin over the wells from a random start, so every well
    holds every guide (pooled screen); then shuffled within wells.
    """
    cells_per = np.where(
        guide_gene == params.n_genes, params.control_cells_per_guide, params.cells_per_guide
    )
    cell_guide = np.repeat(np.arange(guide_gene.size), cells_per)
    offsets = rng.integers(0, n_wells, size=guide_gene.size)
    rank_in_guide = np.arange(cell_guide.size) - np.repeat(
        np.cumsum(cells_per) - cells_per, cells_per
    )
    cell_well = (offsets[cell_guide] + rank_in_guide) % n_wells
    order = np.lexsort((rng.random(cell_guide.size), cell_well))
    return cell_guide[order], cell_well[order]


@dataclass(frozen=True)
class _Placement:
    """Where each cell sits: its field of view and centroid (cells ordered by well)."""

    tile: np.ndarray  # field index within the well
    field: np.ndarray  # global field index
    x: np.ndarray  # centroid column in the field (float)
    y: np.ndarray  # centroid row in the field (float)
    field_size: int
    fields: list[tuple[int, int]]  # (well, tile) per global field


def _place_cells(
    cell_well: np.ndarray, *, crop_size: int, grid: int, rng: np.random.Generator
) -> _Placement:
    """Put the cells of each well (``cell_well`` sorted) on fields of view.

    Consecutive cells of a well fill fields of up to ``grid**2`` slots; the slots are a
    jittered grid with a quarter-pitch margin, so a few cells sit so close to the border
    that their crop would leave the field (as in real data).
    """
    pitch, n_cells = crop_size, cell_well.size
    field_size = grid * pitch + pitch // 2
    per_field = grid * grid
    rank_in_well = np.arange(n_cells) - np.searchsorted(cell_well, cell_well, side="left")
    cell_tile = rank_in_well // per_field
    fields = sorted(set(zip(cell_well.tolist(), cell_tile.tolist(), strict=True)))
    field_index = {key: i for i, key in enumerate(fields)}
    cell_field = np.array(
        [field_index[key] for key in zip(cell_well.tolist(), cell_tile.tolist(), strict=True)]
    )
    slot = np.empty(n_cells, dtype=int)
    bounds = np.flatnonzero(np.diff(cell_field, prepend=-1, append=-1) != 0)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        slot[start:stop] = rng.permutation(per_field)[: stop - start]
    jitter = np.clip(np.rint(rng.normal(0, pitch / 8, size=(n_cells, 2))), -pitch // 3, pitch // 3)
    # Sub-pixel part of the centroid, kept inside (-0.5, 0.5) so round() gives the pixel drawn at.
    subpixel = rng.uniform(-0.45, 0.45, size=(n_cells, 2))
    cell_y = pitch // 4 + (slot // grid) * pitch + pitch // 2 + jitter[:, 0] + subpixel[:, 0]
    cell_x = pitch // 4 + (slot % grid) * pitch + pitch // 2 + jitter[:, 1] + subpixel[:, 1]
    return _Placement(
        tile=cell_tile, field=cell_field, x=cell_x, y=cell_y, field_size=field_size, fields=fields
    )


def _at_least(sizes: np.ndarray, minimum: int) -> np.ndarray:
    """Move members from the largest groups to groups below ``minimum``."""
    sizes = sizes.copy()
    while sizes.min() < minimum:
        sizes[np.argmax(sizes)] -= 1
        sizes[np.argmin(sizes)] += 1
    return sizes


def _well_effects(
    params: SimulationParams | ArrayedParams, rng: np.random.Generator, well_plate: np.ndarray
) -> list[dict[str, Any]]:
    """Per-well technical effects: a plate part shared by its wells plus a well part."""
    strength, n_channels, scale = params.batch_strength, len(SIM_CHANNELS), params.crop_size / 64
    plate_gain = rng.normal(0, 0.15 * strength, size=(params.plates, n_channels))
    plate_offset = rng.normal(0, 80 * strength, size=(params.plates, n_channels))
    effects = []
    for plate in well_plate:
        angle = rng.uniform(0, 2 * np.pi)
        effects.append(
            {
                "gain": np.exp(
                    plate_gain[plate] + rng.normal(0, 0.15 * strength, n_channels)
                ).tolist(),
                "offset": np.maximum(
                    50.0, 400 + plate_offset[plate] + rng.normal(0, 80 * strength, n_channels)
                ).tolist(),
                "blur_sigma": float(rng.uniform(0.0, 1.5) * strength * scale),
                "gradient": float(rng.uniform(0.0, 0.35) * strength),
                "gradient_angle": float(angle),
                "vignetting": float(rng.uniform(0.0, 0.25) * strength),
                "read_noise": float(20 + rng.uniform(0, 60) * strength),
                "shot_noise": float(1.0 + rng.uniform(0, 3) * strength),
            }
        )
    return effects


#: Column of ``cells.csv`` marking the cells of held-out plates (``--holdout-plates``).
HOLDOUT_COLUMN = "holdout"


def _holdout_well_effects(
    params: SimulationParams, rng: np.random.Generator, well_plate: np.ndarray
) -> list[dict[str, Any]]:
    """Technical effects of held-out plates, outside the range of the other plates' effects.

    A plate imaged months later (new stain lot, another microscope) differs in ways
    the training plates never showed: each channel's gain moves by e^(±0.5), a
    shift of about 2.4 well-to-well SDs in a random direction per channel; the
    background rises by 250 counts; blur, illumination gradient, vignetting and
    both noises are drawn from just above the ranges of :func:`_well_effects`.
    Everything scales with ``batch_strength`` as there.
    """
    strength, n_channels, scale = params.batch_strength, len(SIM_CHANNELS), params.crop_size / 64
    plates = np.unique(well_plate)
    direction = rng.choice([-1.0, 1.0], size=(plates.size, n_channels))
    plate_gain = direction * 0.5 * strength + rng.normal(
        0, 0.15 * strength, size=(plates.size, n_channels)
    )
    plate_offset = 250 * strength + rng.normal(0, 80 * strength, size=(plates.size, n_channels))
    effects = []
    for plate in np.searchsorted(plates, well_plate):
        effects.append(
            {
                "gain": np.exp(
                    plate_gain[plate] + rng.normal(0, 0.15 * strength, n_channels)
                ).tolist(),
                "offset": np.maximum(
                    50.0, 400 + plate_offset[plate] + rng.normal(0, 80 * strength, n_channels)
                ).tolist(),
                "blur_sigma": float(rng.uniform(1.5, 2.25) * strength * scale),
                "gradient": float(rng.uniform(0.35, 0.5) * strength),
                "gradient_angle": float(rng.uniform(0, 2 * np.pi)),
                "vignetting": float(rng.uniform(0.25, 0.35) * strength),
                "read_noise": float(20 + rng.uniform(60, 90) * strength),
                "shot_noise": float(1.0 + rng.uniform(3, 4.5) * strength),
            }
        )
    return effects


def _hold_out_plates(design: _Design, params: SimulationParams, *, seed: int) -> None:
    """Give the last ``params.holdout_plates`` plates shifted technical effects (in place).

    The draws come from their own stream (``[seed, 1]``), so every cell, guide and
    training-plate well stays exactly as without held-out plates: only the held-out
    wells' technical effects change.
    """
    if not params.holdout_plates:
        return
    first = params.plates - params.holdout_plates
    wells = np.flatnonzero(design.well_plate >= first)
    shifted = _holdout_well_effects(
        params, np.random.default_rng([seed, 1]), design.well_plate[wells]
    )
    for well, effect in zip(wells, shifted, strict=True):
        design.well_effects[well] = effect
    design.holdout_plates = design.plates[first:]


# ---------------------------------------------------------------------------
# Arrayed design: one treatment per well, controls on every plate, plates in batches
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _ArrayedFacts:
    """What an arrayed screen adds to :class:`_Design` (its treatments are the design's guides)."""

    concentrations: np.ndarray  # (n_treatments,) µM, 0 for the control
    ec50: np.ndarray  # (n_compounds,) µM
    well_treatment: np.ndarray  # (n_wells,) treatment index
    batches: list[str]
    plate_batch: np.ndarray  # (n_plates,) batch index


def _arrayed_well_name(index: int) -> str:
    """Well names of a 384-well plate, row by row: A01 ... A24, B01 ... P24."""
    return f"{'ABCDEFGHIJKLMNOP'[index // 24]}{index % 24 + 1:02d}"


def _arrayed_design(
    params: ArrayedParams, rng: np.random.Generator
) -> tuple[_Design, _ArrayedFacts]:
    """Compounds in mechanisms, treatments (compound x concentration) in wells, cells in fields.

    A mechanism shifts 2-4 morphological parameters; its compounds share that direction
    with their own strength plus a smaller compound-specific part, scaled by a Hill
    response ``c / (c + EC50)`` to the concentration. Each plate holds every treatment
    once and ``control_wells`` vehicle wells, in a random order of its own; plates of
    one batch share a batch part of their technical effects on top of the plate part.
    The stages draw from ``rng`` in this order; changing it changes every simulated screen.
    """
    n_compounds, n_mechanisms = params.n_compounds, params.n_mechanisms
    compounds = [f"CPD{i + 1:04d}" for i in range(n_compounds)] + [ARRAYED_CONTROL]
    mechanism = _random_groups(rng.permutation(n_compounds), n_mechanisms, n_compounds, rng)
    mechanism_effects, compound_effects = _compound_effects(params, mechanism, rng)
    concentrations = np.asarray(params.concentrations, dtype=float)
    middle = float(np.exp(np.log(concentrations).mean()))
    ec50 = middle * np.exp(rng.normal(0, 0.7, size=n_compounds))
    treatments = _treatments(compounds, concentrations, ec50)

    plates = [f"plate{p + 1}" for p in range(params.plates)]
    plate_batch = np.arange(params.plates) // params.plates_per_batch
    batches = [f"batch{b + 1}" for b in range(int(plate_batch.max()) + 1)]
    well_treatment = _plate_maps(params, n_treatments=len(treatments.names), rng=rng)
    wells_per_plate = well_treatment.size // params.plates
    wells = [_arrayed_well_name(w) for _ in plates for w in range(wells_per_plate)]
    well_plate = np.repeat(np.arange(params.plates), wells_per_plate)
    well_effects = _batched_well_effects(params, rng, well_plate, plate_batch, len(batches))

    # Cells: cells_per_well in every well; about one in ten does not respond.
    cell_well = np.repeat(np.arange(len(wells)), params.cells_per_well)
    placement = _place_cells(cell_well, crop_size=params.crop_size, grid=params.field_grid, rng=rng)
    cell_treatment = well_treatment[cell_well]
    responds = rng.random(cell_well.size) < 0.9
    cell_shift = (
        compound_effects[treatments.compound[cell_treatment]]
        * (treatments.response[cell_treatment] * responds)[:, None]
    ).astype(np.float32)

    design = _placed(
        placement,
        genes=compounds,
        gene_complex=mechanism.tolist(),
        gene_effects=compound_effects,
        complex_names=[f"Simulated mechanism {k + 1}" for k in range(n_mechanisms)],
        complex_effects=mechanism_effects,
        guides=treatments.names,
        guide_gene=treatments.compound,
        guide_efficacy=treatments.response,
        plates=plates,
        wells=wells,
        well_plate=well_plate,
        well_effects=well_effects,
        cell_guide=cell_treatment,
        cell_well=cell_well,
        cell_shift=cell_shift,
    )
    facts = _ArrayedFacts(
        concentrations=treatments.concentration,
        ec50=ec50,
        well_treatment=well_treatment,
        batches=batches,
        plate_batch=plate_batch,
    )
    return design, facts


def _compound_effects(
    params: ArrayedParams, mechanism: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Effects of the mechanisms (n_mechanisms, P) and of the compounds (n_compounds + 1, P).

    A compound shares its mechanism's direction with its own strength, plus a smaller
    part of its own. The control's row is zero.
    """
    strength = params.effect_strength
    mechanism_effects = np.stack(
        [
            _random_direction(rng) * rng.uniform(0.6, 1.4) * strength
            for _ in range(params.n_mechanisms)
        ]
    )
    compound_effects = np.zeros((params.n_compounds + 1, len(MORPHOLOGY)))
    for index in range(params.n_compounds):
        own = _random_direction(rng) * 0.25 * strength
        compound_effects[index] = rng.uniform(0.7, 1.3) * mechanism_effects[mechanism[index]] + own
    return mechanism_effects, compound_effects


class _Treatments(NamedTuple):
    """An arrayed screen's treatments (the design's "guides"), the control last."""

    names: list[str]  # "<compound>@<concentration>"
    compound: np.ndarray  # (n_treatments,) compound index
    concentration: np.ndarray  # (n_treatments,) µM, 0 for the control
    response: np.ndarray  # (n_treatments,) Hill response c / (c + EC50), 0 for the control


def _treatments(compounds: list[str], concentrations: np.ndarray, ec50: np.ndarray) -> _Treatments:
    """Each compound at each concentration, then the control (``compounds``' last)."""
    n_compounds = len(compounds) - 1
    names = [f"{c}@{x:g}" for c in compounds[:-1] for x in concentrations] + [ARRAYED_CONTROL]
    compound = np.append(np.repeat(np.arange(n_compounds), concentrations.size), n_compounds)
    concentration = np.append(np.tile(concentrations, n_compounds), 0.0)
    response = np.append(
        concentration[:-1] / (concentration[:-1] + ec50[compound[:-1]]),
        0.0,
    )
    return _Treatments(names, compound, concentration, response)


def _plate_maps(
    params: ArrayedParams, *, n_treatments: int, rng: np.random.Generator
) -> np.ndarray:
    """Treatment index per well, plate after plate.

    Every plate holds every treatment once and the control wells (the last treatment), in
    a random order per plate.
    """
    on_plate = np.append(
        np.arange(n_treatments - 1), np.full(params.control_wells, n_treatments - 1)
    )
    return np.concatenate([rng.permutation(on_plate) for _ in range(params.plates)])


def _batched_well_effects(
    params: ArrayedParams,
    rng: np.random.Generator,
    well_plate: np.ndarray,
    plate_batch: np.ndarray,
    n_batches: int,
) -> list[dict[str, Any]]:
    """:func:`_well_effects` with a batch part of the gain and offset shared by its plates."""
    well_effects = _well_effects(params, rng, well_plate)
    batch_strength, n_channels = params.batch_strength, len(SIM_CHANNELS)
    batch_gain = rng.normal(0, 0.2 * batch_strength, size=(n_batches, n_channels))
    batch_offset = rng.normal(0, 100 * batch_strength, size=(n_batches, n_channels))
    for well, effect in enumerate(well_effects):
        batch = plate_batch[well_plate[well]]
        effect["gain"] = (np.asarray(effect["gain"]) * np.exp(batch_gain[batch])).tolist()
        effect["offset"] = np.maximum(
            50.0, np.asarray(effect["offset"]) + batch_offset[batch]
        ).tolist()
    return well_effects


def _arrayed_cells_table(design: _Design, facts: _ArrayedFacts) -> pd.DataFrame:
    """``cell_id, image_path, compound, concentration, plate, well, batch, tile, x, y``."""
    plate_index = design.well_plate[design.cell_well]
    plate = np.asarray(design.plates)[plate_index]
    well = np.asarray(design.wells)[design.cell_well]
    return pd.DataFrame(
        {
            "cell_id": np.arange(design.cell_well.size),
            "image_path": [
                f"images/{p}_{w}/cell{i:07d}.tif"
                for i, (p, w) in enumerate(zip(plate, well, strict=True))
            ],
            "compound": np.asarray(design.genes)[design.guide_gene[design.cell_guide]],
            "concentration": facts.concentrations[design.cell_guide],
            "plate": plate,
            "well": well,
            "batch": np.asarray(facts.batches)[facts.plate_batch[plate_index]],
            "tile": design.cell_tile,
            "x": np.round(design.cell_x, 3),
            "y": np.round(design.cell_y, 3),
        }
    )


def _write_relationships(path: Path, design: _Design) -> None:
    """GMT: ``mechanism<TAB>description<TAB>compound<TAB>compound ...``, one line per mechanism."""
    lines = []
    for index, name in enumerate(design.complex_names):
        members = [c for c, m in zip(design.genes, design.gene_complex, strict=False) if m == index]
        lines.append("\t".join([name, "simulated mechanism of action", *members]))
    path.write_text("\n".join(lines) + "\n")


def _arrayed_truth(
    design: _Design, facts: _ArrayedFacts, params: ArrayedParams, *, seed: int
) -> dict[str, Any]:
    def vector(values: np.ndarray) -> dict[str, float]:
        return {name: round(float(v), 6) for name, v in zip(MORPHOLOGY, values, strict=True)}

    return {
        "scbd_cells_version": __version__,
        "seed": seed,
        "layout": "arrayed",
        "parameters": asdict(params),
        "channels": list(SIM_CHANNELS),
        "morphology": list(MORPHOLOGY),
        "field_size": design.field_size,
        "control": ARRAYED_CONTROL,
        "relationships": ARRAYED_RELATIONSHIPS,
        "compounds": {
            compound: {
                "mechanism": design.complex_names[design.gene_complex[i]],
                "effect": vector(design.gene_effects[i]),
                "ec50": round(float(facts.ec50[i]), 6),
            }
            for i, compound in enumerate(design.genes[:-1])
        },
        "mechanisms": {
            name: {
                "members": [
                    c for c, m in zip(design.genes, design.gene_complex, strict=False) if m == k
                ],
                "effect": vector(design.complex_effects[k]),
            }
            for k, name in enumerate(design.complex_names)
        },
        "treatments": {
            treatment: {
                "compound": design.genes[design.guide_gene[t]],
                "concentration": float(facts.concentrations[t]),
                "response": round(float(design.guide_efficacy[t]), 6),
            }
            for t, treatment in enumerate(design.guides)
        },
        "batches": {
            batch: [p for p, b in zip(design.plates, facts.plate_batch, strict=True) if b == k]
            for k, batch in enumerate(facts.batches)
        },
        "wells": {
            f"{design.plates[design.well_plate[w]]}_{design.wells[w]}": {
                "treatment": design.guides[facts.well_treatment[w]],
                **{
                    key: [round(v, 6) for v in value]
                    if isinstance(value, list)
                    else round(value, 6)
                    for key, value in effect.items()
                },
            }
            for w, effect in enumerate(design.well_effects)
        },
    }


def _check_arrayed_params(params: ArrayedParams, *, workers: int) -> None:
    counts = {
        "n_compounds (--n-genes)": params.n_compounds,
        "cells_per_well (--cells-per-guide)": params.cells_per_well,
        "plates": params.plates,
        "plates_per_batch": params.plates_per_batch,
        "control_wells": params.control_wells,
        "workers": workers,
    }
    for name, value in counts.items():
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}.")
    if params.n_mechanisms < 1 or 2 * params.n_mechanisms > params.n_compounds:
        raise InputError(
            f"{params.n_mechanisms} mechanisms (--n-complexes) need between 1 and "
            f"n_compounds / 2 = {params.n_compounds // 2} (two compounds each), with "
            f"{params.n_compounds} compounds (--n-genes)."
        )
    if params.plates % params.plates_per_batch:
        raise InputError(
            f"plates ({params.plates}) must be a multiple of plates_per_batch "
            f"({params.plates_per_batch}): every batch holds the same number of plates."
        )
    if params.wells_per_plate > 384:
        raise InputError(
            f"A plate holds at most 384 wells; {params.n_compounds} compounds x "
            f"{len(params.concentrations)} concentrations + {params.control_wells} control "
            f"wells need {params.wells_per_plate}. Lower --n-genes."
        )
    if not MIN_CROP_SIZE <= params.crop_size <= 512:
        raise InputError(
            f"crop_size must be between {MIN_CROP_SIZE} and 512 px, got {params.crop_size}."
        )
    if params.effect_strength < 0 or params.batch_strength < 0:
        raise InputError(
            f"effect_strength and batch_strength must be >= 0, got {params.effect_strength} "
            f"and {params.batch_strength}."
        )


# ---------------------------------------------------------------------------
# Drawing cells (vectorised over cells)
# ---------------------------------------------------------------------------


def draw_cells(
    shift: np.ndarray, *, crop_size: int, subpixel: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw cells, one per crop, without technical effects.

    Parameters
    ----------
    shift
        (N, P) morphological shift of each cell (gene effect if edited), in
        per-cell SD units over :data:`MORPHOLOGY`.
    crop_size
        Side of each crop.
    subpixel
        (N, 2) row/column offset of the nucleus centre from the crop centre
        ``crop_size // 2``, in (-0.5, 0.5).
    rng
        Source of the cell-to-cell variation.

    Returns
    -------
    numpy.ndarray
        (N, 4, S, S) float32 photon counts before gain, blur and noise, channels
        in :data:`scbd_cells.data.schema.SIM_CHANNELS` order.
    """
    # The stages draw from ``rng`` in this order; changing it changes every simulated screen.
    cells = _cell_geometry(shift, crop_size=crop_size, subpixel=subpixel, rng=rng)
    body = _cell_body(cells, rng)
    nucleus, chromatin = _nucleus(cells, body, rng)
    images = np.empty((cells.n, 4, cells.size, cells.size), dtype=np.float32)
    # dna: Hoechst/DAPI-like nuclear stain.
    dna_level = 5000 * np.exp(0.18 * cells.p["dna_intensity"] + 0.1 * cells.cycle)
    images[:, 2] = _per_cell(dna_level) * chromatin
    images[:, 0] = _dna_damage(cells, nucleus, rng)
    images[:, 1] = _actin(cells, body, rng)
    images[:, 3] = _microtubules(cells, body, nucleus, rng)
    return images


def _per_cell(values: np.ndarray) -> np.ndarray:
    """(N,) values as float32 (N, 1, 1), to broadcast over a crop."""
    return values.astype(np.float32)[:, None, None]


@dataclass(frozen=True)
class _CellGeometry:
    """The per-cell draws of :func:`draw_cells`: morphology and where cell and nucleus sit."""

    n: int
    size: int  # crop side
    u: float  # crop side / REFERENCE_CROP: lengths scale with it
    p: dict[str, np.ndarray]  # (N,) per MORPHOLOGY parameter
    cycle: np.ndarray  # (N,) shared "cell cycle" factor
    major: np.ndarray
    minor: np.ndarray
    angle: np.ndarray
    nucleus_radius: np.ndarray
    nucleus_aspect: np.ndarray
    nucleus_angle: np.ndarray
    nucleus_y: np.ndarray
    nucleus_x: np.ndarray
    cell_y: np.ndarray
    cell_x: np.ndarray
    rows: np.ndarray  # (1, S, 1) float32
    cols: np.ndarray  # (1, 1, S) float32


def _cell_geometry(
    shift: np.ndarray, *, crop_size: int, subpixel: np.ndarray, rng: np.random.Generator
) -> _CellGeometry:
    """Morphology of each cell (its shift plus noise) and the ellipses of cell and nucleus."""
    n, size = shift.shape[0], crop_size
    u = size / REFERENCE_CROP
    z = rng.standard_normal((n, len(MORPHOLOGY))).astype(np.float32) + shift
    # A shared "cell cycle" factor: bigger cells have bigger, brighter nuclei.
    cycle = rng.standard_normal(n).astype(np.float32)
    p = {name: z[:, i] for i, name in enumerate(MORPHOLOGY)}
    radius = 16.0 * u * np.exp(0.13 * p["cell_size"] + 0.06 * cycle)
    aspect = np.exp(0.18 + 0.22 * p["cell_elongation"])
    major = np.minimum(radius * np.sqrt(aspect), 0.44 * size)
    minor = np.minimum(radius / np.sqrt(aspect), major)
    angle = rng.uniform(0, np.pi, n)
    nucleus_radius = np.minimum(
        0.42 * radius * np.exp(0.12 * p["nucleus_size"] + 0.05 * cycle), minor * 0.9
    )
    nucleus_aspect = 1 + 0.25 * np.abs(rng.standard_normal(n))
    nucleus_angle = angle + rng.normal(0, 0.4, n)
    # The nucleus is off the cell centre, towards one end of the long axis.
    nucleus_offset = rng.uniform(0, 0.35, n) * (major - nucleus_radius)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    centre = size // 2
    nucleus_y = centre + subpixel[:, 0]
    nucleus_x = centre + subpixel[:, 1]
    return _CellGeometry(
        n=n, size=size, u=u, p=p, cycle=cycle, major=major, minor=minor, angle=angle,
        nucleus_radius=nucleus_radius, nucleus_aspect=nucleus_aspect,
        nucleus_angle=nucleus_angle, nucleus_y=nucleus_y, nucleus_x=nucleus_x,
        cell_y=nucleus_y - sign * nucleus_offset * np.sin(angle),
        cell_x=nucleus_x - sign * nucleus_offset * np.cos(angle),
        rows=np.arange(size, dtype=np.float32)[None, :, None],
        cols=np.arange(size, dtype=np.float32)[None, None, :],
    )  # fmt: skip


@dataclass(frozen=True)
class _CellBody:
    """The cell body's mask and the coordinates the actin channel reuses, each (N, S, S)."""

    body: np.ndarray  # 1 inside the cell, fading to 0 at the outline and the crop border
    relative: np.ndarray  # distance from the centre relative to the outline (1 on it)
    dy: np.ndarray
    dx: np.ndarray


def _cell_body(cells: _CellGeometry, rng: np.random.Generator) -> _CellBody:
    """Cell body: an ellipse with a wavy outline (harmonics 2-5 of the polar angle)."""
    n, size, u, rows, cols = cells.n, cells.size, cells.u, cells.rows, cells.cols
    dy, dx = rows - _per_cell(cells.cell_y), cols - _per_cell(cells.cell_x)
    cos_a, sin_a = _per_cell(np.cos(cells.angle)), _per_cell(np.sin(cells.angle))
    along = dx * cos_a + dy * sin_a  # (N, S, S)
    across = -dx * sin_a + dy * cos_a
    along /= _per_cell(cells.major)
    across /= _per_cell(cells.minor)
    rho = np.sqrt(np.square(along) + np.square(across)) + 1e-6
    cos_phi, sin_phi = along / rho, across / rho
    outline = np.ones_like(rho)
    cos_k, sin_k = cos_phi, sin_phi
    for k in range(2, 6):
        cos_k, sin_k = cos_k * cos_phi - sin_k * sin_phi, sin_k * cos_phi + cos_k * sin_phi
        amplitude = rng.normal(0, 0.07 / k**0.5, n)
        phase = rng.uniform(0, 2 * np.pi, n)
        outline += (
            _per_cell(amplitude * np.cos(phase)) * cos_k
            + _per_cell(amplitude * np.sin(phase)) * sin_k
        )
    relative = rho / outline  # 1 on the cell outline
    edge = 0.08
    body = _sigmoid((1 - relative) / edge)
    # Fade to zero at the crop border so that nothing is cut off sharply.
    border = np.minimum(np.minimum(rows, size - 1 - rows), np.minimum(cols, size - 1 - cols))
    body *= np.clip(border / (2 * u + 1), 0, 1)
    return _CellBody(body=body, relative=relative, dy=dy, dx=dx)


def _nucleus(
    cells: _CellGeometry, body: _CellBody, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus: a smaller ellipse (its mask) with chromatin texture (the stained nucleus)."""
    n, size, u, rows, cols = cells.n, cells.size, cells.u, cells.rows, cells.cols
    ny, nx = rows - _per_cell(cells.nucleus_y), cols - _per_cell(cells.nucleus_x)
    cos_n, sin_n = _per_cell(np.cos(cells.nucleus_angle)), _per_cell(np.sin(cells.nucleus_angle))
    semi_major = cells.nucleus_radius * np.sqrt(cells.nucleus_aspect)
    semi_minor = cells.nucleus_radius / np.sqrt(cells.nucleus_aspect)
    n_along = (nx * cos_n + ny * sin_n) / _per_cell(semi_major)
    n_across = (-nx * sin_n + ny * cos_n) / _per_cell(semi_minor)
    n_rho2 = np.square(n_along) + np.square(n_across)
    nucleus = _sigmoid((1 - np.sqrt(n_rho2)) / 0.07)
    texture = np.zeros_like(body.relative)
    for _ in range(3):
        wavelength = rng.uniform(3, 7, n) * u
        direction = rng.uniform(0, 2 * np.pi, n)
        # cos(a x + b y + c) = cos(a x) cos(b y + c) - sin(a x) sin(b y + c): separable, cheap.
        along_x = (2 * np.pi * np.cos(direction) / wavelength)[:, None] * np.arange(size)
        along_y = (2 * np.pi * np.sin(direction) / wavelength)[:, None] * np.arange(size)
        along_y = along_y + rng.uniform(0, 2 * np.pi, n)[:, None]
        texture += (np.cos(along_y)[:, :, None] * np.cos(along_x)[:, None, :]).astype(np.float32)
        texture -= (np.sin(along_y)[:, :, None] * np.sin(along_x)[:, None, :]).astype(np.float32)
    chromatin = nucleus * (1 + 0.12 * texture) * (1 + 0.25 * (1 - n_rho2).clip(0, 1))
    return nucleus, chromatin


def _dna_damage(cells: _CellGeometry, nucleus: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """dna_damage: faint pan-nuclear signal plus foci (Poisson count, inside the nucleus)."""
    n, size, u = cells.n, cells.size, cells.u
    foci_rate = 3.0 * np.exp(0.45 * cells.p["foci_count"])
    counts = np.minimum(rng.poisson(foci_rate), 40)
    foci = np.zeros((n, size, size), dtype=np.float32)
    total = int(counts.sum())
    if total:
        owner = np.repeat(np.arange(n), counts)
        r = np.sqrt(rng.random(total)) * 0.85
        theta = rng.uniform(0, 2 * np.pi, total)
        a, b = r * np.cos(theta), r * np.sin(theta)
        semi_major = (cells.nucleus_radius * np.sqrt(cells.nucleus_aspect))[owner]
        semi_minor = (cells.nucleus_radius / np.sqrt(cells.nucleus_aspect))[owner]
        ca, sa = np.cos(cells.nucleus_angle[owner]), np.sin(cells.nucleus_angle[owner])
        fy = np.rint(cells.nucleus_y[owner] + a * semi_major * sa + b * semi_minor * ca)
        fx = np.rint(cells.nucleus_x[owner] + a * semi_major * ca - b * semi_minor * sa)
        fy = np.clip(fy.astype(int), 0, size - 1)
        fx = np.clip(fx.astype(int), 0, size - 1)
        brightness = rng.lognormal(np.log(2500), 0.4, total)
        np.add.at(foci, (owner, fy, fx), brightness)
        foci = ndimage.gaussian_filter(
            foci, sigma=(0, 1.0 * u + 0.3, 1.0 * u + 0.3), mode="constant"
        )
        foci *= 2 * np.pi * (1.0 * u + 0.3) ** 2 / 2  # peak ~ brightness / 2
    damage_level = 500 * np.exp(0.3 * cells.p["damage_intensity"])
    return _per_cell(damage_level) * nucleus + foci * nucleus


def _actin(cells: _CellGeometry, body: _CellBody, rng: np.random.Generator) -> np.ndarray:
    """actin: cortex at the cell outline plus stress fibres along the long axis."""
    n, u, p, dx, dy = cells.n, cells.u, cells.p, body.dx, body.dy
    actin_level = 2500 * np.exp(0.22 * p["actin_intensity"])
    cortex = np.exp(-np.square((body.relative - 0.97) / 0.06))
    fibre_angle = cells.angle + rng.normal(0, 0.25, n)
    spacing = 5.0 * u * np.exp(-0.25 * p["fibre_density"])
    fibre_along = dx * _per_cell(np.cos(fibre_angle)) + dy * _per_cell(np.sin(fibre_angle))
    fibre_across = -dx * _per_cell(np.sin(fibre_angle)) + dy * _per_cell(np.cos(fibre_angle))
    stripes = 0.5 + 0.5 * np.cos(
        _per_cell(2 * np.pi / spacing) * fibre_across
        + _per_cell(0.6 / u * rng.normal(0, 1, n)) * np.sin(fibre_along / (6 * u))
        + _per_cell(rng.uniform(0, 2 * np.pi, n))
    )
    stripes = np.square(stripes) * np.square(
        np.square(stripes)
    )  # ** 6, without the slow generic power
    fibres = stripes * body.body * (0.6 + 0.4 * body.relative.clip(0, 1))
    return _per_cell(actin_level) * (
        0.25 * body.body + 0.8 * cortex * body.body + 0.7 * fibres
    )


def _microtubules(
    cells: _CellGeometry, body: _CellBody, nucleus: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """microtubules: filaments radiating from the centrosome next to the nucleus, curving."""
    n, u, p, rows, cols = cells.n, cells.u, cells.p, cells.rows, cells.cols
    mt_level = 2000 * np.exp(0.22 * p["microtubule_intensity"])
    spokes = np.round(20 * np.exp(0.25 * p["microtubule_density"])).clip(6, 48)
    centrosome_y = cells.nucleus_y + (cells.cell_y - cells.nucleus_y) * 0.5
    centrosome_x = cells.nucleus_x + (cells.cell_x - cells.nucleus_x) * 0.5
    cy, cx = rows - _per_cell(centrosome_y), cols - _per_cell(centrosome_x)
    distance = np.sqrt(np.square(cy) + np.square(cx))
    polar = np.arctan2(cy, cx)
    curl = rng.normal(0, 0.12, n) / u
    # Irregular spacing: the polar angle is warped by a low harmonic before the spokes.
    warp = _per_cell(rng.uniform(0.5, 1.5, n)) * np.sin(
        3 * polar + _per_cell(rng.uniform(0, 2 * np.pi, n))
    )
    filaments = 0.5 + 0.5 * np.cos(
        _per_cell(spokes) * polar
        + warp
        + _per_cell(curl) * distance
        + _per_cell(rng.uniform(0, 2 * np.pi, n))
    )
    filaments = np.square(filaments) * np.square(np.square(filaments))  # ** 6
    aster = distance / (distance + 3 * u)
    return _per_cell(mt_level) * body.body * (0.35 + 0.8 * filaments * aster) * (1 - 0.5 * nucleus)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * values)


# ---------------------------------------------------------------------------
# Fields, technical effects, writing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """Fields of one well, drawn from one seed (picklable work item for a worker)."""

    index: int
    seed: int
    well_label: str
    well_effect: dict[str, Any]
    tiles: np.ndarray  # (F,) tile numbers of the fields
    cell_ids: np.ndarray  # (n,)
    cell_field: np.ndarray  # (n,) index into tiles
    cell_x: np.ndarray
    cell_y: np.ndarray
    cell_shift: np.ndarray
    crop_size: int
    field_size: int
    layout: str
    out_dir: Path


def _render_chunk(chunk: _Chunk) -> int:
    """Draw, degrade and write the fields (or crops) of one chunk; returns the number of cells."""
    rng = np.random.default_rng(np.random.SeedSequence(chunk.seed, spawn_key=(chunk.index,)))
    size, field_size = chunk.crop_size, chunk.field_size
    pad = size // 2 + 1
    centre_y, centre_x = np.rint(chunk.cell_y).astype(int), np.rint(chunk.cell_x).astype(int)
    subpixel = np.stack([chunk.cell_y - centre_y, chunk.cell_x - centre_x], axis=1)
    # Small batches keep the drawing's temporaries in the CPU cache (about 4x faster).
    batch = max(8, 2**18 // (size * size))
    cells = np.concatenate(
        [
            draw_cells(
                chunk.cell_shift[i : i + batch],
                crop_size=size,
                subpixel=subpixel[i : i + batch],
                rng=rng,
            )
            for i in range(0, subpixel.shape[0], batch)
        ]
    )

    canvas_size = field_size + 2 * pad
    canvas = np.zeros((chunk.tiles.size, 4, canvas_size, canvas_size), dtype=np.float32)
    top = centre_y - size // 2 + pad
    left = centre_x - size // 2 + pad
    for i in range(cells.shape[0]):
        canvas[chunk.cell_field[i], :, top[i] : top[i] + size, left[i] : left[i] + size] += cells[i]
    del cells
    fields = _degrade(canvas, chunk.well_effect, field_size=field_size, pad=pad, rng=rng)

    if chunk.layout == "fields":
        folder = chunk.out_dir / "fields" / chunk.well_label
        folder.mkdir(parents=True, exist_ok=True)
        inner = fields[:, :, pad : pad + field_size, pad : pad + field_size]
        for f, tile in enumerate(chunk.tiles):
            for c, channel in enumerate(SIM_CHANNELS):
                _write_tiff(folder / f"tile{tile:04d}_{channel}.tif", inner[f, c])
    else:
        folder = chunk.out_dir / "images" / chunk.well_label
        folder.mkdir(parents=True, exist_ok=True)
        for i, cell_id in enumerate(chunk.cell_ids):
            crop = fields[chunk.cell_field[i], :, top[i] : top[i] + size, left[i] : left[i] + size]
            _write_tiff(folder / f"cell{cell_id:07d}.tif", crop)
    return int(chunk.cell_ids.size)


def _degrade(
    canvas: np.ndarray,
    effect: dict[str, Any],
    *,
    field_size: int,
    pad: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Apply one well's technical effects to its fields: (F, C, H, W) float -> uint16."""
    sigma = effect["blur_sigma"]
    if sigma > 0.05:
        canvas = ndimage.gaussian_filter(canvas, sigma=(0, 0, sigma, sigma), mode="nearest")
    size = canvas.shape[-1]
    coords = (np.arange(size, dtype=np.float32) - pad - field_size / 2) / field_size
    yy, xx = coords[:, None], coords[None, :]
    angle = effect["gradient_angle"]
    illumination = (
        1
        + effect["gradient"] * (xx * np.cos(angle) + yy * np.sin(angle))
        - effect["vignetting"] * 2 * (xx**2 + yy**2)
    ).astype(np.float32)
    gain = np.asarray(effect["gain"], dtype=np.float32)[:, None, None]
    offset = np.asarray(effect["offset"], dtype=np.float32)[:, None, None]
    gain_map = illumination * gain  # (C, H, W)
    offset_map = offset * (0.85 + 0.15 * illumination)
    shot, read_variance = np.float32(effect["shot_noise"]), np.float32(effect["read_noise"] ** 2)
    fields = np.empty(canvas.shape, dtype=np.uint16)
    # One field at a time, in place: the temporaries stay small (much faster than whole chunks).
    for index in range(canvas.shape[0]):
        signal = canvas[index]
        signal *= gain_map
        noise = rng.standard_normal(signal.shape, dtype=np.float32)
        noise *= np.sqrt(shot * signal + read_variance)
        signal += offset_map
        signal += noise
        np.rint(signal, out=signal)
        np.clip(signal, 0, 65535, out=signal)
        fields[index] = signal
    return fields


_TIFF_HEADERS: dict[tuple[int, ...], tuple[bytes, int]] = {}


def tiff_bytes(image: np.ndarray) -> bytes:
    """The bytes ``tifffile.imwrite(path, image, photometric="minisblack")`` writes, fast.

    A (C, H, W) image becomes C pages (grey, no timestamp), which
    ``tifffile.imread`` reads back as (C, H, W).

    tifffile's header depends only on shape and dtype, so it is built once per
    shape and the pixel data are spliced in; a test checks the result against
    ``tifffile.imwrite`` byte for byte.
    """
    image = np.ascontiguousarray(image, dtype=np.uint16)
    template = _TIFF_HEADERS.get(image.shape)
    if template is None:
        probe = np.arange(image.size, dtype=np.uint16).reshape(image.shape) * np.uint16(
            7
        ) + np.uint16(1)
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, probe, photometric="minisblack")
        raw = buffer.getvalue()
        offset = raw.find(probe.tobytes())
        if (
            offset < 0 or raw.find(probe.tobytes(), offset + 1) >= 0
        ):  # pragma: no cover - tifffile layout
            buffer = io.BytesIO()
            tifffile.imwrite(buffer, image, photometric="minisblack")
            return buffer.getvalue()
        template = (raw, offset)
        _TIFF_HEADERS[image.shape] = template
    raw, offset = template
    data = image.tobytes()
    return raw[:offset] + data + raw[offset + len(data) :]


def _write_tiff(path: Path, image: np.ndarray) -> None:
    # os.open/os.write: a third less overhead than Path.write_bytes for a million small files.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(descriptor, tiff_bytes(image))
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


@locks_output("out_dir")
def simulate(
    out_dir: str | os.PathLike[str],
    *,
    preset: str = "demo",
    layout: str = "crops",
    seed: int = 0,
    overwrite: bool = False,
    preview: bool = False,
    workers: int = 1,
    n_genes: int | None = None,
    n_complexes: int | None = None,
    guides_per_gene: int | None = None,
    control_guides: int | None = None,
    cells_per_guide: int | None = None,
    control_cells_per_guide: int | None = None,
    plates: int | None = None,
    wells_per_plate: int | None = None,
    crop_size: int | None = None,
    effect_strength: float | None = None,
    batch_strength: float | None = None,
    holdout_plates: int | None = None,
) -> SimulationResult:
    """Simulate an optical pooled screen and write it to ``out_dir``.

    Parameters
    ----------
    out_dir
        Folder to write; must be missing or empty unless ``overwrite``.
    preset
        ``"tiny"`` (tests, ~1.4 k cells), ``"demo"`` (~15 k cells at 64 px) or
        ``"large"`` (~1 M cells at 32 px); see :data:`PRESETS`.
    layout
        ``"crops"``: one (C, H, W) uint16 TIFF per cell, column ``image_path``.
        ``"fields"``: one single-channel TIFF per field and channel, columns
        ``<channel>_path``; ``x`` / ``y`` locate each cell in its field.
        ``"arrayed"``: an arrayed screen (:class:`ArrayedParams`) written as crops: one
        treatment (``compound`` at ``concentration``) per well, vehicle (``DMSO``) wells on
        every plate, plates grouped in ``batch``es, no guide; ``moa.gmt`` holds the
        compounds' mechanism-of-action groups (docs/simulator.md).
    seed
        Everything is drawn from it; the same seed writes byte-identical files,
        whatever ``workers``.
    overwrite
        Replace an existing simulated screen in ``out_dir``.
    preview
        Also write ``preview.png`` (example cells per complex and per well).
    workers
        Processes drawing and writing images (started with ``spawn``: from a
        script, call :func:`simulate` under ``if __name__ == "__main__":``).
    n_genes, n_complexes, guides_per_gene, control_guides, cells_per_guide, \
control_cells_per_guide, plates, wells_per_plate, crop_size, effect_strength, batch_strength
        Override the preset (see :class:`SimulationParams`; arrayed: :data:`ARRAYED_OVERRIDES`).
    holdout_plates
        Hold out the last K plates: their wells get technical effects unlike any
        other plate's, ``cells.csv`` gains a boolean ``holdout`` column and
        ``truth.json`` a ``holdout`` entry (docs/new-plates.md). Default 0.

    Returns
    -------
    SimulationResult
        Paths and sizes of what was written.
    """
    started = time.perf_counter()
    overrides = dict(
        n_genes=n_genes, n_complexes=n_complexes, guides_per_gene=guides_per_gene,
        control_guides=control_guides, cells_per_guide=cells_per_guide,
        control_cells_per_guide=control_cells_per_guide, plates=plates,
        wells_per_plate=wells_per_plate, crop_size=crop_size, effect_strength=effect_strength,
        batch_strength=batch_strength, holdout_plates=holdout_plates,
    )  # fmt: skip
    params = _screen_params(preset, layout, overrides, preview=preview, workers=workers)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite=overwrite)
    design, facts = _draw_design(params, seed=seed)
    _render_images(
        design, facts, params, seed=seed, layout=layout, out_dir=out_dir, workers=workers
    )
    tables = _write_tables(out_dir, design, facts, params, seed=seed, layout=layout)
    preview_path = write_preview(out_dir, out_path=out_dir / "preview.png") if preview else None
    return _finished(
        out_dir, design, params, tables, preview_path=preview_path, layout=layout, started=started
    )


def _screen_params(
    preset: str, layout: str, overrides: dict[str, Any], *, preview: bool, workers: int
) -> SimulationParams | ArrayedParams:
    """The preset with the given (not None) ``overrides``, checked."""
    if preset not in PRESETS:
        raise InputError(
            f"Unknown preset {preset!r}: expected one of {', '.join(PRESETS)}. "
            "Pick a preset and override sizes with the size options."
        )
    if layout not in LAYOUTS:
        raise InputError(f"Unknown layout {layout!r}: expected 'crops', 'fields' or 'arrayed'.")
    given = {k: v for k, v in overrides.items() if v is not None}
    params: SimulationParams | ArrayedParams
    if layout == "arrayed":
        if preview:
            raise InputError(
                "--preview draws the pooled layouts only; leave it out with --layout arrayed."
            )
        params = _arrayed_params(preset, given)
        _check_arrayed_params(params, workers=workers)
    else:
        params = replace(PRESETS[preset], **given)
        _check_params(params, workers=workers)
    return params


class _Sizes(NamedTuple):
    """How many genes and complexes a screen has (compounds and mechanisms when arrayed)."""

    n_genes: int  # compounds in an arrayed screen
    n_complexes: int  # mechanisms in an arrayed screen


def _sizes(params: SimulationParams | ArrayedParams) -> _Sizes:
    """The :class:`_Sizes` of ``params``."""
    if isinstance(params, ArrayedParams):
        return _Sizes(params.n_compounds, params.n_mechanisms)
    return _Sizes(params.n_genes, params.n_complexes)


def _draw_design(
    params: SimulationParams | ArrayedParams, *, seed: int
) -> tuple[_Design, _ArrayedFacts | None]:
    """The screen's design drawn from ``seed``; the arrayed facts for an arrayed screen."""
    rng = np.random.default_rng(seed)
    if isinstance(params, ArrayedParams):
        return _arrayed_design(params, rng)
    design = _design(params, rng)
    _hold_out_plates(design, params, seed=seed)
    return design, None


def _render_images(
    design: _Design,
    facts: _ArrayedFacts | None,
    params: SimulationParams | ArrayedParams,
    *,
    seed: int,
    layout: str,
    out_dir: Path,
    workers: int,
) -> None:
    """Draw and write every cell's (or field's) images, in chunks, over ``workers`` processes."""
    n_cells, sizes = design.cell_guide.size, _sizes(params)
    logger.info(
        "Simulating %s cells (%d %s in %d groups, %d wells) at %d px into %s",
        f"{n_cells:,}",
        sizes.n_genes,
        "compounds" if facts is not None else "genes",
        sizes.n_complexes,
        len(design.wells),
        params.crop_size,
        out_dir,
    )
    chunks = list(_chunks(design, params, seed=seed, layout=layout, out_dir=out_dir))
    with progress_bar(unit="cells") as bar:
        task = bar.add_task("Simulating", total=n_cells)
        if workers == 1:
            for chunk in chunks:
                bar.advance(task, _render_chunk(chunk))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                for done in pool.map(_render_chunk, chunks):
                    bar.advance(task, done)


class _Tables(NamedTuple):
    """The tables :func:`simulate` writes beside the images."""

    cells_path: Path
    complexes_path: Path
    truth_path: Path


def _write_tables(
    out_dir: Path,
    design: _Design,
    facts: _ArrayedFacts | None,
    params: SimulationParams | ArrayedParams,
    *,
    seed: int,
    layout: str,
) -> _Tables:
    """``truth.json``, ``cells.csv`` and the complexes (or mechanisms) file."""
    truth_path = out_dir / "truth.json"
    if facts is not None:
        complexes_path = out_dir / ARRAYED_RELATIONSHIPS
        _write_relationships(complexes_path, design)
        truth = _arrayed_truth(design, facts, params, seed=seed)
        table = _arrayed_cells_table(design, facts)
    else:
        complexes_path = out_dir / "complexes.txt"
        _write_complexes(complexes_path, design)
        truth = _truth(design, params, seed=seed, layout=layout)
        table = _cells_table(design, layout=layout)
    truth_path.write_text(json.dumps(truth, indent=1) + "\n")
    cells_path = out_dir / "cells.csv"
    table.to_csv(cells_path, index=False, float_format="%.3f", lineterminator="\n")
    return _Tables(cells_path=cells_path, complexes_path=complexes_path, truth_path=truth_path)


def _finished(
    out_dir: Path,
    design: _Design,
    params: SimulationParams | ArrayedParams,
    tables: _Tables,
    *,
    preview_path: Path | None,
    layout: str,
    started: float,
) -> SimulationResult:
    """Log the time taken since ``started`` and say what :func:`simulate` wrote."""
    seconds = time.perf_counter() - started
    n_cells, sizes = design.cell_guide.size, _sizes(params)
    logger.info(
        "Wrote %s cells in %.1f s (%s cells/s)",
        f"{n_cells:,}",
        seconds,
        f"{n_cells / seconds:,.0f}",
    )
    return SimulationResult(
        out_dir=out_dir,
        cells_path=tables.cells_path,
        complexes_path=tables.complexes_path,
        truth_path=tables.truth_path,
        preview_path=preview_path,
        layout=layout,
        n_cells=n_cells,
        n_genes=sizes.n_genes,
        n_complexes=sizes.n_complexes,
        n_wells=len(design.wells),
        n_fields=len(design.fields),
        params=params,
        seconds=seconds,
    )


#: The size options that an arrayed screen reads, and the field of :class:`ArrayedParams` each sets.
ARRAYED_OVERRIDES = {
    "n_genes": "n_compounds",
    "n_complexes": "n_mechanisms",
    "cells_per_guide": "cells_per_well",
    "plates": "plates",
    "crop_size": "crop_size",
    "effect_strength": "effect_strength",
    "batch_strength": "batch_strength",
}


def _arrayed_params(preset: str, given: dict[str, Any]) -> ArrayedParams:
    """The arrayed preset with the size options that apply to it; the pooled-only ones refused."""
    pooled_only = sorted(set(given) - set(ARRAYED_OVERRIDES))
    if pooled_only:
        names = ", ".join("--" + name.replace("_", "-") for name in pooled_only)
        raise InputError(
            f"{names} size a pooled screen; --layout arrayed takes --n-genes (compounds), "
            "--n-complexes (mechanisms), --cells-per-guide (cells per well), --plates, "
            "--crop-size, --effect-strength and --batch-strength."
        )
    return replace(ARRAYED_PRESETS[preset], **{ARRAYED_OVERRIDES[k]: v for k, v in given.items()})


def _check_params(params: SimulationParams, *, workers: int) -> None:
    counts = {
        "n_genes": params.n_genes,
        "guides_per_gene": params.guides_per_gene,
        "cells_per_guide": params.cells_per_guide,
        "plates": params.plates,
        "wells_per_plate": params.wells_per_plate,
        "workers": workers,
        "control_guides": params.control_guides,
        "control_cells_per_guide": params.control_cells_per_guide,
    }
    for name, value in counts.items():
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}.")
    if params.n_complexes < 0:
        raise InputError(f"n_complexes must be 0 or more, got {params.n_complexes}.")
    if 2 * params.n_complexes > params.n_genes:
        raise InputError(
            f"{params.n_complexes} complexes need at least {2 * params.n_complexes} genes (two per "
            f"complex), got n_genes={params.n_genes}. Lower n_complexes or raise n_genes."
        )
    if not 0 <= params.holdout_plates < params.plates:
        raise InputError(
            f"holdout_plates must be between 0 and plates - 1 = {params.plates - 1} (at least one "
            f"plate to train on), got {params.holdout_plates}. Raise --plates or lower "
            "--holdout-plates."
        )
    if params.crop_size < MIN_CROP_SIZE:
        raise InputError(
            f"crop_size must be at least {MIN_CROP_SIZE} px to draw a cell, got {params.crop_size}."
        )
    if params.crop_size > 512:
        raise InputError(f"crop_size must be at most 512 px, got {params.crop_size}.")
    if params.effect_strength < 0 or params.batch_strength < 0:
        raise InputError(
            f"effect_strength and batch_strength must be >= 0, got {params.effect_strength} "
            f"and {params.batch_strength}."
        )
    if params.plates * params.wells_per_plate > 16 * 12:
        raise InputError(
            f"At most 192 wells per plate are named (A01-P12), got {params.wells_per_plate}."
        )


SCREEN_ENTRIES = (
    "cells.csv",
    "images",
    "fields",
    "complexes.txt",
    ARRAYED_RELATIONSHIPS,
    "truth.json",
    "preview.png",
)


def _prepare_out_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Make ``out_dir`` ready; replace only a screen simulate wrote (its marker lists the files)."""
    prepare_folder(out_dir, kind="screen", overwrite=overwrite, entries=SCREEN_ENTRIES)


def _chunks(
    design: _Design,
    params: SimulationParams | ArrayedParams,
    *,
    seed: int,
    layout: str,
    out_dir: Path,
):
    """Work items: runs of whole fields of one well holding about ``cells_per_chunk`` cells."""
    per_field = params.field_grid**2
    fields_per_chunk = max(1, params.cells_per_chunk // per_field)
    boundaries = np.flatnonzero(np.diff(design.cell_field, prepend=-1, append=-1) != 0)
    field_start = boundaries[:-1]  # first cell of each global field
    field_stop = boundaries[1:]
    index = 0
    for well in range(len(design.wells)):
        well_fields = [f for f, (w, _tile) in enumerate(design.fields) if w == well]
        for start in range(0, len(well_fields), fields_per_chunk):
            group = well_fields[start : start + fields_per_chunk]
            first, last = field_start[group[0]], field_stop[group[-1]]
            rows = slice(first, last)
            plate = design.plates[design.well_plate[well]]
            yield _Chunk(
                index=index,
                seed=seed,
                well_label=f"{plate}_{design.wells[well]}",
                well_effect=design.well_effects[well],
                tiles=np.array([design.fields[f][1] for f in group]),
                cell_ids=np.arange(first, last),
                cell_field=design.cell_field[rows] - group[0],
                cell_x=design.cell_x[rows],
                cell_y=design.cell_y[rows],
                cell_shift=design.cell_shift[rows],
                crop_size=params.crop_size,
                field_size=design.field_size,
                layout=layout,
                out_dir=out_dir,
            )
            index += 1


def _cells_table(design: _Design, *, layout: str) -> pd.DataFrame:
    n = design.cell_guide.size
    plate = np.asarray(design.plates)[design.well_plate[design.cell_well]]
    well = np.asarray(design.wells)[design.cell_well]
    label = np.char.add(np.char.add(plate.astype(str), "_"), well.astype(str))
    columns: dict[str, Any] = {"cell_id": np.arange(n)}
    if layout == "crops":
        columns["image_path"] = [f"images/{w}/cell{i:07d}.tif" for i, w in enumerate(label)]
    else:
        for channel in SIM_CHANNELS:
            columns[f"{channel}_path"] = [
                f"fields/{w}/tile{t:04d}_{channel}.tif"
                for w, t in zip(label, design.cell_tile, strict=True)
            ]
    columns["gene"] = np.asarray(design.genes)[design.guide_gene[design.cell_guide]]
    columns["guide"] = np.asarray(design.guides)[design.cell_guide]
    columns["plate"] = plate
    columns["well"] = well
    columns["tile"] = design.cell_tile
    columns["x"] = np.round(design.cell_x, 3)
    columns["y"] = np.round(design.cell_y, 3)
    if design.holdout_plates:  # only then: screens without held-out plates keep their bytes
        columns[HOLDOUT_COLUMN] = np.isin(plate, design.holdout_plates)
    return pd.DataFrame(columns)


def _write_complexes(path: Path, design: _Design) -> None:
    """CORUM 5.x: tab-separated, snake_case header, ``;``-separated subunits, Human rows.

    One extra Mouse row (a decoy of genes from different complexes) checks that
    readers keep Human rows only, as they must with the real file.
    """
    header = [
        "complex_id",
        "complex_name",
        "synonyms",
        "cell_line",
        "organism",
        "subunits_gene_name",
        "comment_complex",
    ]
    lines = ["\t".join(header)]
    for index, name in enumerate(design.complex_names):
        members = [g for g, c in zip(design.genes, design.gene_complex, strict=False) if c == index]
        lines.append(
            "\t".join(
                [
                    str(index + 1),
                    name,
                    "",
                    "simulated",
                    "Human",
                    ";".join(members),
                    "Members share one morphological effect (see truth.json).",
                ]
            )
        )
    if len(design.complex_names) >= 2:
        decoy = [
            design.genes[int(np.flatnonzero(np.asarray(design.gene_complex) == c)[0])]
            for c in (0, 1)
        ]
        lines.append(
            "\t".join(
                [
                    str(len(design.complex_names) + 1),
                    "Decoy mouse complex",
                    "",
                    "simulated",
                    "Mouse",
                    ";".join(decoy),
                    "Not a real relationship; readers must keep Human rows only.",
                ]
            )
        )
    path.write_text("\n".join(lines) + "\n")


def _truth(design: _Design, params: SimulationParams, *, seed: int, layout: str) -> dict[str, Any]:
    def vector(values: np.ndarray) -> dict[str, float]:
        return {name: round(float(v), 6) for name, v in zip(MORPHOLOGY, values, strict=True)}

    parameters = asdict(params)
    if not params.holdout_plates:  # written only when used: older screens keep their bytes
        parameters.pop("holdout_plates")
    truth = {
        "scbd_cells_version": __version__,
        "seed": seed,
        "layout": layout,
        "parameters": parameters,
        "channels": list(SIM_CHANNELS),
        "morphology": list(MORPHOLOGY),
        "field_size": design.field_size,
        "genes": {
            gene: {
                "complex": design.complex_names[c] if c >= 0 else None,
                "effect": vector(design.gene_effects[i]),
                "effect_norm": round(float(np.linalg.norm(design.gene_effects[i])), 6),
            }
            for i, (gene, c) in enumerate(zip(design.genes[:-1], design.gene_complex, strict=True))
        },
        "control": CONTROL_LABEL,
        "complexes": {
            name: {
                "complex_id": i + 1,
                "members": [
                    g for g, c in zip(design.genes, design.gene_complex, strict=False) if c == i
                ],
                "effect": vector(design.complex_effects[i]),
            }
            for i, name in enumerate(design.complex_names)
        },
        "guides": {
            guide: {"gene": design.genes[g], "efficacy": round(float(e), 6)}
            for guide, g, e in zip(
                design.guides, design.guide_gene, design.guide_efficacy, strict=True
            )
        },
        "wells": {
            f"{design.plates[design.well_plate[w]]}_{design.wells[w]}": {
                key: [round(v, 6) for v in value] if isinstance(value, list) else round(value, 6)
                for key, value in effect.items()
            }
            for w, effect in enumerate(design.well_effects)
        },
    }
    if design.holdout_plates:
        truth["holdout"] = {
            "plates": list(design.holdout_plates),
            "column": HOLDOUT_COLUMN,
            "effects": "shifted: gain x e^(+-0.5) per channel, background +250, blur, "
            "gradient, vignetting and noise above the training plates' ranges "
            "(docs/simulator.md)",
        }
    return truth


# ---------------------------------------------------------------------------
# Reading back and the preview figure
# ---------------------------------------------------------------------------


def read_crops(out_dir: str | os.PathLike[str], cell_ids: np.ndarray | list[int]) -> np.ndarray:
    """Crops of some cells of a simulated screen, in either layout.

    Parameters
    ----------
    out_dir
        A folder written by :func:`simulate`.
    cell_ids
        Cells to read (``cell_id`` column).

    Returns
    -------
    numpy.ndarray
        (len(cell_ids), 4, S, S) uint16; in the fields layout the window that
        ingest cuts (rows ``round(y) - S//2 ...``), zero-padded where it leaves
        the field.
    """
    out_dir = Path(out_dir)
    truth = json.loads((out_dir / "truth.json").read_text())
    size = truth["parameters"]["crop_size"]
    table = pd.read_csv(out_dir / "cells.csv").set_index("cell_id").loc[list(cell_ids)]
    crops = np.zeros((len(table), len(SIM_CHANNELS), size, size), dtype=np.uint16)
    for i, (_cell_id, row) in enumerate(table.iterrows()):
        if "image_path" in table.columns:
            crops[i] = tifffile.imread(out_dir / row["image_path"])
            continue
        top, left = round(row["y"]) - size // 2, round(row["x"]) - size // 2
        for c, channel in enumerate(SIM_CHANNELS):
            image = tifffile.imread(out_dir / row[f"{channel}_path"])
            window = image[max(top, 0) : top + size, max(left, 0) : left + size]
            crops[
                i,
                c,
                max(-top, 0) : max(-top, 0) + window.shape[0],
                max(-left, 0) : max(-left, 0) + window.shape[1],
            ] = window
    return crops


def composite(crops: np.ndarray, *, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Colour composite (N, S, S, 3) in [0, 1]: DNA blue, actin magenta, microtubules green,
    DNA-damage foci yellow, each channel scaled from ``low`` to ``high`` (per channel)."""
    colours = np.array(
        [[1.0, 0.85, 0.0], [0.85, 0.1, 0.75], [0.15, 0.35, 1.0], [0.1, 0.9, 0.2]], dtype=np.float32
    )  # dna_damage, actin, dna, microtubules
    scaled = (crops.astype(np.float32) - low[None, :, None, None]) / (high - low)[
        None, :, None, None
    ]
    scaled = scaled.clip(0, 1)
    return np.einsum("nchw,ck->nhwk", scaled, colours).clip(0, 1)


def write_preview(
    out_dir: str | os.PathLike[str], *, out_path: str | os.PathLike[str], per_row: int = 6
) -> Path:
    """Figure of example cells: one row per complex (strongest first) and the control,
    then one row per well (control cells only, so that only the well differs).

    Intensities are scaled the same way in every panel, so well-to-well
    differences in brightness, background and blur stay visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir, out_path = Path(out_dir), Path(out_path)
    truth = json.loads((out_dir / "truth.json").read_text())
    table = pd.read_csv(
        out_dir / "cells.csv", usecols=["cell_id", "gene", "guide", "plate", "well"]
    )
    rng = np.random.default_rng(truth["seed"])
    efficacy = {guide: value["efficacy"] for guide, value in truth["guides"].items()}

    complexes = sorted(
        truth["complexes"].items(),
        key=lambda item: -np.linalg.norm(list(item[1]["effect"].values())),
    )[:6]
    rows: list[tuple[str, np.ndarray]] = []
    for name, info in complexes:
        genes = [g for g in info["members"] if truth["genes"][g]["effect_norm"] > 0]
        pool = table[table["gene"].isin(genes) & (table["guide"].map(efficacy) > 0.5)]
        top_params = sorted(info["effect"].items(), key=lambda kv: -abs(kv[1]))[:2]
        label = f"{name}\n" + ", ".join(f"{k} {v:+.1f}" for k, v in top_params)
        rows.append((label, _sample(pool["cell_id"].to_numpy(), per_row, rng)))
    control = table[table["gene"] == truth["control"]]
    rows.append(
        (f"{truth['control']} (control)", _sample(control["cell_id"].to_numpy(), per_row, rng))
    )
    wells = list(dict.fromkeys(zip(control["plate"], control["well"], strict=True)))[:8]
    for plate, well in wells:
        pool = control[(control["plate"] == plate) & (control["well"] == well)]
        rows.append(
            (f"{plate} {well} (control cells)", _sample(pool["cell_id"].to_numpy(), per_row, rng))
        )

    crops = read_crops(out_dir, np.concatenate([ids for _label, ids in rows]))
    low = np.percentile(crops, 1, axis=(0, 2, 3))
    high = np.percentile(crops, 99.7, axis=(0, 2, 3))
    pictures = composite(crops, low=low, high=np.maximum(high, low + 1))

    fig, axes = plt.subplots(
        len(rows), per_row, figsize=(1.3 * per_row + 2.2, 1.3 * len(rows)), squeeze=False
    )
    position = 0
    for r, (label, ids) in enumerate(rows):
        for c in range(per_row):
            axis = axes[r, c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < ids.size:
                axis.imshow(pictures[position + c], interpolation="nearest")
            else:
                axis.set_axis_off()
        position += ids.size
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(
        f"Simulated screen: rows 1-{len(complexes)} complexes (strongest first), then control "
        "cells per well\nyellow: dna_damage, magenta: actin, blue: dna, green: microtubules",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out_path, dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out_path


def _sample(ids: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(ids, size=min(k, ids.size), replace=False)) if ids.size else ids
