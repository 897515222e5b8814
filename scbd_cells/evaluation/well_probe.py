"""The well probe: how well a linear classifier predicts the well (batch) from a cell embedding.

Used by ``evaluate`` (the well-F1 column) and by ``train`` (the probe on z_c and z_s
logged at every validation), so it sits below both.

Paper appendix A.3: multinomial logistic regression from the embedding to the
batch label, trained on a random 60 % of the cells and scored by macro F1 on
the other 40 %. Lower is better for a perturbation embedding; the figure is
reported beside the chance level of the same split.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from scbd_cells.core.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchF1:
    """Held-out macro F1 of predicting the batch, and its chance level.

    Attributes
    ----------
    f1
        Macro F1 on the held-out cells.
    chance
        Expected macro F1 of guessing at random in proportion to the training
        batch frequencies (1 / n_batches for balanced batches).
    n_cells, n_train, n_test
        Cells used (after ``max_cells``), and the two parts of the split.
    n_batches
        Batch labels among the cells used.
    """

    f1: float
    chance: float
    n_cells: int
    n_train: int
    n_test: int
    n_batches: int


def chance_macro_f1(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Expected macro F1 of a random guesser that predicts class k with its training frequency.

    For class k with guess rate q_k and test frequency t_k, precision is t_k and
    recall is q_k in expectation, so F1_k = 2 t_k q_k / (t_k + q_k); the macro
    average runs over the classes present in either part (as sklearn's does).
    """
    classes = np.union1d(train_labels, test_labels)
    q = np.array([np.mean(train_labels == c) for c in classes])
    t = np.array([np.mean(test_labels == c) for c in classes])
    f1 = np.divide(2 * t * q, t + q, out=np.zeros_like(t), where=(t + q) > 0)
    return float(f1.mean())


def split_indices(
    labels: np.ndarray, *, train_fraction: float = 0.6, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of cell positions, stratified by label when every label allows."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 else None
    train, test = train_test_split(
        positions, train_size=train_fraction, random_state=seed, stratify=stratify
    )
    return np.sort(train), np.sort(test)


def subsample(n_cells: int, *, max_cells: int | None, seed: int) -> np.ndarray:
    """Sorted positions of at most ``max_cells`` of ``n_cells`` cells, drawn without replacement."""
    if max_cells is None or max_cells >= n_cells:
        return np.arange(n_cells)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_cells, size=max_cells, replace=False))


def batch_prediction_f1(
    embedding: np.ndarray,
    batches: np.ndarray,
    *,
    seed: int,
    train_fraction: float = 0.6,
    max_iter: int = 300,
) -> BatchF1:
    """Held-out macro F1 of a multinomial logistic regression from embedding to batch.

    Parameters
    ----------
    embedding
        (n_cells, D) cell embedding.
    batches
        (n_cells,) batch label of each cell.
    seed
        Seeds the split and the solver.
    train_fraction
        Share of cells in the training part (the paper's 60 %).
    max_iter
        Solver iterations (lbfgs); a fit that has not converged is used as it is and logged.

    Raises
    ------
    DataError
        Fewer than two batches, or too few cells to split.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    embedding = np.asarray(embedding, dtype=np.float32)
    batches = np.asarray(batches).astype(str)
    n_batches = len(np.unique(batches))
    if n_batches < 2 or len(batches) < 10:
        raise DataError(
            f"Well prediction needs at least two batches and ten cells; found {n_batches} "
            f"batch(es) and {len(batches)} cells. Check the batch column (default 'batch')."
        )
    train, test = split_indices(batches, train_fraction=train_fraction, seed=seed)
    scaler = StandardScaler().fit(embedding[train])
    classifier = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(scaler.transform(embedding[train]), batches[train])
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.info("Well classifier stopped at max_iter=%d before full convergence", max_iter)
    predicted = classifier.predict(scaler.transform(embedding[test]))
    f1 = f1_score(batches[test], predicted, average="macro", zero_division=0)
    return BatchF1(
        f1=float(f1),
        chance=chance_macro_f1(batches[train], batches[test]),
        n_cells=len(batches),
        n_train=len(train),
        n_test=len(test),
        n_batches=n_batches,
    )
