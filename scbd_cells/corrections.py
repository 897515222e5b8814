"""Correct: the field's standard profile-level batch corrections, as comparators for SCBD.

``scbd-cells correct PROFILES.h5ad --method M --batch-key COLUMN --out OUT.h5ad`` applies
one of the corrections the JUMP Cell Painting batch-correction benchmark (Arevalo et al.
2024) compares, to any cell-level AnnData (the baseline's features or PCA, z_c, a lab's
own CellProfiler profiles), and writes an AnnData that ``evaluate`` reads:

- ``harmony``: Harmony (``harmonypy.run_harmony``, Korsunsky et al. 2019) on the
  embedding, batch = the batch column, seeded;
- ``sphering``: ZCA whitening fitted on the control cells (mean and covariance of the
  controls, ``W = U diag(1 / sqrt(lambda + epsilon)) U^T``), applied to every cell: the
  directions in which control cells vary (the wells' signature among them) are scaled
  down to unit variance. The batch column is not used. Equal to pycytominer's
  ``Spherize(method="ZCA")`` (tested);
- ``combat``: ComBat (``scanpy.pp.combat``), batch = the batch column;
- ``center-scale``: each feature standardised (mean 0, standard deviation 1) within each
  batch: what ``baseline --normalize batch`` does to the features.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scbd_cells.data import schema
from scbd_cells.errors import DataError, InputError
from scbd_cells.outputs import locks_output
from scbd_cells.replicates import batch_column

log = logging.getLogger(__name__)

METHODS = ("harmony", "sphering", "combat", "center-scale")
SPHERING_EPSILON = 1e-6


@dataclass(frozen=True)
class CorrectResult:
    """What :func:`correct` wrote.

    Attributes
    ----------
    out_path
        The corrected AnnData.
    method
        The correction applied.
    n_cells, n_features
        Shape of the corrected ``X``.
    n_batches
        Batches in the batch column (0 for sphering, which does not use it).
    """

    out_path: Path
    method: str
    n_cells: int
    n_features: int
    n_batches: int


def center_scale(values: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Each column standardised within each batch (constant columns only centred)."""
    out = np.empty_like(values, dtype=np.float64)
    codes, _ = pd.factorize(np.asarray(batches).astype(str))
    for code in np.unique(codes):
        rows = codes == code
        block = values[rows].astype(np.float64)
        spread = block.std(axis=0)
        out[rows] = (block - block.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    return out


def zca_sphering(
    values: np.ndarray, reference: np.ndarray, *, epsilon: float = SPHERING_EPSILON
) -> np.ndarray:
    """ZCA whitening of ``values`` with the mean and covariance of ``reference`` rows."""
    reference = np.asarray(reference, dtype=np.float64)
    if len(reference) < 2:
        raise DataError(
            f"Sphering is fitted on the control cells; found {len(reference)}. Name the "
            "control with --control, as given at ingest."
        )
    mean = reference.mean(axis=0)
    covariance = np.cov(reference - mean, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(np.atleast_2d(covariance))
    whitening = eigenvectors @ np.diag(1.0 / np.sqrt(eigenvalues + epsilon)) @ eigenvectors.T
    return (np.asarray(values, dtype=np.float64) - mean) @ whitening


def harmony(values: np.ndarray, batches: np.ndarray, *, seed: int) -> np.ndarray:
    """Harmony-corrected embedding (harmonypy), cells x features."""
    import harmonypy

    meta = pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = harmonypy.run_harmony(
            np.asarray(values, dtype=np.float64), meta, ["batch"], random_state=seed,
            verbose=False,
        )
    corrected = np.asarray(model.Z_corr)
    # harmonypy has returned (features x cells) in older releases, (cells x features) in newer
    return corrected.T if corrected.shape[0] != len(meta) else corrected


def combat(values: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """ComBat (scanpy.pp.combat) with the batch column as the batch."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(
        X=np.asarray(values, dtype=np.float64),
        obs=pd.DataFrame(
            {"batch": pd.Categorical(np.asarray(batches).astype(str))},
            index=pd.RangeIndex(len(values)).astype(str),
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # constant features within a batch
        sc.pp.combat(adata, key="batch")
    return np.asarray(adata.X)


def _read(path: Path) -> Any:
    import anndata as ad

    if not path.exists():
        raise InputError(
            f"Profiles {path} do not exist. Pass a cell-level AnnData written by `scbd-cells "
            "embed`, `scbd-cells baseline` or another tool (.h5ad or .zarr)."
        )
    try:
        return ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)
    except Exception as error:  # anndata/h5py/zarr raise many types for a bad file
        raise DataError(
            f"Could not read {path} as AnnData ({type(error).__name__}: {error})."
        ) from None


@locks_output("out")
def correct(
    profiles_path: str | Path,
    *,
    method: str,
    out: str | Path,
    batch_key: str = schema.BATCH,
    key: str = "X",
    control: str | None = None,
    perturbation_key: str = schema.PERTURBATION,
    seed: int = 0,
    overwrite: bool = False,
) -> CorrectResult:
    """Correct a cell-level embedding or feature table with a standard method.

    Parameters
    ----------
    profiles_path
        Cell-level AnnData (``.h5ad`` or ``.zarr``): one row per cell, the batch column in
        obs.
    method
        ``harmony``, ``sphering``, ``combat`` or ``center-scale``.
    out
        AnnData to write (``.h5ad`` or ``.zarr``): ``X`` = the corrected values (float32),
        ``obs`` = the input's, ``uns["scbd"]`` = the input's record plus the correction.
    batch_key
        obs column of the batch (well) corrected for (not used by sphering).
    key
        ``X`` or the obsm key to correct (e.g. ``X_features`` of a baseline).
    control
        Control label, for sphering (default: the file's ``uns["scbd"]["control"]``, else
        ``nontargeting``).
    perturbation_key
        obs column holding the control label.
    seed
        Seeds Harmony.
    overwrite
        Replace an existing output.

    Returns
    -------
    CorrectResult
    """
    from scbd_cells import __version__
    from scbd_cells.anndata_io import check_output_path, write_anndata

    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}; found {method!r}.")
    source = Path(profiles_path)
    out_path = Path(out)
    check_output_path(out_path, overwrite=overwrite, inputs=[source])
    adata = _read(source)
    if key == "X":
        values = adata.X
    elif key in adata.obsm:
        values = adata.obsm[key]
    else:
        raise DataError(
            f"{source} has no obsm key {key!r} (keys: {', '.join(adata.obsm.keys()) or 'none'})."
            " Choose one of them or 'X' with --key."
        )
    values = np.asarray(values.toarray() if hasattr(values, "toarray") else values, np.float64)
    if not np.isfinite(values).all():
        raise DataError(
            f"{source} ({key}) holds NaN or infinite values; {method} needs finite numbers. "
            "Drop or impute those cells or features first."
        )
    recorded = dict(adata.uns.get(schema.UNS_SCBD, {}))
    n_batches = 0
    if method == "sphering":
        label = control or str(recorded.get("control") or schema.CONTROL_LABEL)
        if perturbation_key not in adata.obs.columns:
            raise DataError(
                f"{source} has no column {perturbation_key!r} in obs; sphering needs it to "
                "find the control cells."
            )
        is_control = adata.obs[perturbation_key].astype(str).to_numpy() == label
        corrected = zca_sphering(values, values[is_control])
    else:
        batch_key = batch_column(adata, batch_key)
        if batch_key not in adata.obs.columns:
            raise DataError(
                f"{source} has no batch column {batch_key!r} in obs (columns: "
                f"{', '.join(map(str, adata.obs.columns[:12]))}). Name it with --batch-key."
            )
        batches = adata.obs[batch_key].astype(str).to_numpy()
        n_batches = len(np.unique(batches))
        if n_batches < 2:
            raise DataError(
                f"The batch column {batch_key!r} holds one batch only; nothing to correct."
            )
        if method == "harmony":
            corrected = harmony(values, batches, seed=seed)
        elif method == "combat":
            corrected = combat(values, batches)
        else:
            corrected = center_scale(values, batches)

    import anndata as ad

    result = ad.AnnData(X=corrected.astype(np.float32), obs=adata.obs.copy())
    names = recorded.get("feature_names")
    if key == "X" and adata.n_vars == corrected.shape[1]:
        result.var_names = adata.var_names
    elif names is not None and len(names) == corrected.shape[1]:  # a baseline's X_features
        result.var_names = [str(n) for n in names]
    recorded.update(
        {
            "kind": f"correct:{method}",
            "method": method,
            "source": str(source.resolve()),
            "source_key": key,
            "batch_key": batch_key,
            "seed": seed,
            "version": __version__,
        }
    )
    result.uns[schema.UNS_SCBD] = recorded
    write_anndata(result, out_path, overwrite=overwrite)
    log.info("Corrected %s (%s) with %s -> %s", source, key, method, out_path)
    return CorrectResult(
        out_path=out_path,
        method=method,
        n_cells=result.n_obs,
        n_features=result.n_vars,
        n_batches=n_batches,
    )
