"""Evaluate: one overall score per embedding, in the form of the JUMP / scIB benchmarks.

Each metric is min-max scaled across the embeddings of the table (``(x - min) / (max -
min)``; a metric equal for all embeddings scales to 0 for all, as sklearn's
``MinMaxScaler`` does in scib-metrics' ``Benchmarker``); the batch score is the mean of the
scaled batch-mixing metrics, the bio score the mean of the scaled biology metrics, and

    overall = 0.4 x batch + 0.6 x bio.

The score ranks the embeddings *of one table*: it changes when an embedding is added or
removed, and one embedding alone has no overall score. A metric that could not be computed
for some embedding (NaN) is left out of the scores of all embeddings, so that they stay
comparable.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

BATCH_METRICS = ("ilisi", "silhouette_batch", "graph_connectivity", "kbet")
BIO_METRICS = ("map_activity", "map_consistency", "silhouette_label", "leiden_nmi", "leiden_ari")
BATCH_WEIGHT = 0.4
BIO_WEIGHT = 0.6


def min_max_scaled(values: pd.Series) -> pd.Series:
    """``(x - min) / (max - min)``; all zeros when the values are all equal."""
    low, high = values.min(), values.max()
    if not np.isfinite(high - low) or high == low:
        return pd.Series(0.0, index=values.index)
    return (values - low) / (high - low)


def overall_scores(table: pd.DataFrame) -> pd.DataFrame:
    """``batch_score``, ``bio_score`` and ``overall`` for each row of a metrics table.

    Parameters
    ----------
    table
        One row per embedding with the :data:`BATCH_METRICS` and :data:`BIO_METRICS` columns.

    Returns
    -------
    pandas.DataFrame
        Same index, columns ``batch_score``, ``bio_score``, ``overall``; all NaN when the
        table has fewer than two embeddings.
    """
    scores = pd.DataFrame(index=table.index, columns=["batch_score", "bio_score", "overall"])
    scores = scores.astype(np.float64)
    if len(table) < 2:
        return scores
    for column, metrics in (("batch_score", BATCH_METRICS), ("bio_score", BIO_METRICS)):
        usable = [m for m in metrics if table[m].notna().all()]
        dropped = sorted(set(metrics) - set(usable))
        if dropped:
            log.info("Overall score: %s left out (not computed for every embedding)", dropped)
        if usable:
            scaled = pd.concat(
                [min_max_scaled(table[m].astype(np.float64)) for m in usable], axis=1
            )
            scores[column] = scaled.mean(axis=1)
    scores["overall"] = BATCH_WEIGHT * scores["batch_score"] + BIO_WEIGHT * scores["bio_score"]
    return scores
