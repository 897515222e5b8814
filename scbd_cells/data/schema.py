"""Schema: the names every stage shares (store keys, table columns, AnnData keys).

Keep names here so that a rename happens in one place; tests and docs refer to
these constants rather than to string literals.
"""

from __future__ import annotations

# --- store ------------------------------------------------------------------
STORE_FORMAT = "scbd-cells-store"
# 2: every chunk written and CRC32C-checksummed (1 had neither)
STORE_FORMAT_VERSION = 2

# Canonical per-cell columns in ``Store.obs`` (besides the carried metadata).
CELL_ID = "cell_id"  # a string per cell: --cell-id-column, ImageNumber_ObjectNumber, or the row
PERTURBATION = "perturbation"
GUIDE = "guide"
BATCH = "batch"
SPLIT = "split"
SPLITS = ("train", "val", "test")

# Columns carried verbatim (as the table's text) from the table to the store and AnnData.
METADATA_PREFIX = "Metadata_"
# Store attribute: how a crop treats the other objects of a label image (--mask-neighbours).
MASK_NEIGHBOURS = "mask_neighbours"
MASK_NEIGHBOURS_CHOICES = ("zero", "keep")

# --- simulated screen -------------------------------------------------------
CONTROL_LABEL = "nontargeting"
SIM_CHANNELS = ("dna_damage", "actin", "dna", "microtubules")

# --- AnnData ----------------------------------------------------------------
OBSM_BATCH_EMBEDDING = "X_scbd_batch"
OBSM_ENCODER = "X_scbd_encoder"
OBSM_BATCH_ENCODER = "X_scbd_batch_encoder"
UNS_SCBD = "scbd"
N_CELLS = "n_cells"
N_GUIDES = "n_guides"
OBSM_PCA = "X_pca"
OBSM_FEATURES = "X_features"
PLATE = "plate"
WELL = "well"

# --- profiles other tools read (pycytominer, copairs) ----------------------
# Metadata columns of `scbd-cells export` and of the replicate profiles that evaluate
# scores with copairs: plain strings (pycytominer groups by them).
METADATA_PLATE = "Metadata_Plate"
METADATA_WELL = "Metadata_Well"
METADATA_BATCH = "Metadata_Batch"
METADATA_GUIDE = "Metadata_Guide"
METADATA_PERTURBATION = "Metadata_Perturbation"
METADATA_N_CELLS = "Metadata_n_cells"
METADATA_COMPLEX = "Metadata_Complex"
METADATA_COLUMNS = (
    METADATA_PLATE,
    METADATA_WELL,
    METADATA_BATCH,
    METADATA_GUIDE,
    METADATA_PERTURBATION,
    METADATA_N_CELLS,
)

# --- what export adds so that rows join back to the lab's tables -------------
IMAGE_NUMBER = "ImageNumber"  # CellProfiler's image and object numbers
OBJECT_NUMBER = "ObjectNumber"
METADATA_PREFIX = "Metadata_"
METADATA_CELL_ID = "Metadata_Cell_ID"
METADATA_IMAGE_NUMBER = "Metadata_ImageNumber"
METADATA_OBJECT_NUMBER = "Metadata_ObjectNumber"
# uns["scbd"]["label_columns"]: the input columns the labels came from
# ({"perturbation": str, "guide": str | None, "batch": [str, ...]})
UNS_LABEL_COLUMNS = "label_columns"
