"""Well-prediction F1 checked against sklearn; chance level checked by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from scbd_cells.core.errors import DataError
from scbd_cells.evaluation.well_probe import (
    batch_prediction_f1,
    chance_macro_f1,
    split_indices,
    subsample,
)


def _data(shift: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = np.repeat(np.array(["A", "B", "C", "D"]), 100)
    embedding = rng.normal(size=(400, 6))
    embedding[:, 0] += shift * np.repeat(np.arange(4), 100)
    return embedding, batches


def test_f1_equals_sklearn_on_same_split() -> None:
    embedding, batches = _data(2.0)
    result = batch_prediction_f1(embedding, batches, seed=3)
    train, test = split_indices(batches, seed=3)
    assert len(train) == 240 and len(test) == 160 and not set(train) & set(test)
    # an independent reference: the paper's A.3 probe as a plain sklearn pipeline, on a
    # stratified 60/40 split sklearn draws itself
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline

    x_train, x_test, y_train, y_test = train_test_split(
        embedding, batches, train_size=0.6, random_state=3, stratify=batches
    )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, random_state=3))
    expected = f1_score(y_test, probe.fit(x_train, y_train).predict(x_test), average="macro")
    assert result.f1 == pytest.approx(expected)
    assert result.chance == pytest.approx(0.25)
    assert result.f1 > 2 * result.chance


def test_no_signal_is_near_chance() -> None:
    embedding, batches = _data(0.0)
    result = batch_prediction_f1(embedding, batches, seed=0)
    assert abs(result.f1 - result.chance) < 0.12


def test_chance_matches_random_guessing() -> None:
    rng = np.random.default_rng(0)
    train = rng.choice(["a", "b", "c"], p=[0.6, 0.3, 0.1], size=200_000)
    test = rng.choice(["a", "b", "c"], p=[0.6, 0.3, 0.1], size=200_000)
    guesses = rng.choice(train, size=test.size)
    assert chance_macro_f1(train, test) == pytest.approx(
        f1_score(test, guesses, average="macro"), abs=0.01
    )


def test_subsample_seeded() -> None:
    a = subsample(1000, max_cells=100, seed=1)
    assert np.array_equal(a, subsample(1000, max_cells=100, seed=1)) and len(np.unique(a)) == 100
    assert np.array_equal(subsample(10, max_cells=None, seed=0), np.arange(10))


def test_one_batch_refused() -> None:
    with pytest.raises(DataError, match="two batches"):
        batch_prediction_f1(np.zeros((20, 2)), np.array(["A"] * 20), seed=0)
