"""Evaluate, on a terminal: the results table as Rich tables that fit the console's width."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table

# The paper's tasks: (column, header, format)
PAPER_COLUMNS = [
    ("embedding", "embedding", "s"),
    ("corum_auprc", "AUPRC", ".4f"),
    ("corum_recall_5_95", "recall@5/95", ".3f"),
    ("well_f1", "well F1", ".3f"),
    ("well_f1_chance", "chance", ".3f"),
    ("n_genes", "genes", "d"),
    ("n_cells", "cells", ",d"),
]


def result_tables(
    table: pd.DataFrame, *, relationships: str = "CORUM", width: int
) -> list[Table]:
    """The evaluation's table (one row per embedding) as Rich tables: the paper's tasks, then
    the field's metrics, mechanism of action and held-out batches where the table has them.
    """
    from scbd_cells.evaluation.pages import FIELD_COLUMNS

    title = f"Evaluation ({relationships} AUPRC, recall: higher is better; well F1: lower)"
    views = rich_tables(title, table, PAPER_COLUMNS, arrows=False, width=width)
    if "overall" in table:
        title = "The field's metrics (JUMP benchmark; all: higher is better)"
        views += rich_tables(title, table, FIELD_COLUMNS, arrows=False, width=width)
    if "nsc" in table:
        from scbd_cells.evaluation.moa import MOA_COLUMNS

        title = "Mechanism of action: 1-NN accuracy, not same compound (NSC) / or batch (NSCB)"
        views += rich_tables(title, table, MOA_COLUMNS, arrows=True, width=width)
    if "heldout_corum_auprc" in table:
        from scbd_cells.evaluation.holdout import HOLDOUT_COLUMNS

        title = "Held-out batches, apart from the rest"
        views += rich_tables(title, table, HOLDOUT_COLUMNS, arrows=True, width=width)
    return views


def rich_tables(
    title: str,
    table: pd.DataFrame,
    columns: list[tuple[str, str, str]],
    *,
    arrows: bool,
    width: int,
) -> list[Table]:
    """``table``'s ``(column, header, format)`` as Rich tables that fit ``width`` columns.

    No number is squeezed to ``0.…`` and no name is cut: when the columns do not fit the
    console (80 columns in a log or a pipe) the table is split into parts of whole columns,
    each repeating the first (the embedding's name).
    """
    from rich.table import Table

    headers = [header if arrows else header.replace(" ↑", "") for _, header, _ in columns]
    cells = [
        [
            str(row[c]) if f == "s" else ("–" if row[c] != row[c] else format(row[c], f))
            for c, _, f in columns
        ]
        for _, row in table.iterrows()
    ]

    def needed(i: int) -> int:  # the widest value or header word, plus the borders
        words = [len(word) for word in headers[i].split()]
        return max([*words, *(len(row[i]) for row in cells)]) + 3

    parts: list[list[int]] = [[]]
    used = 1 + needed(0)
    for i in range(1, len(columns)):
        if parts[-1] and used + needed(i) > width:
            parts.append([])
            used = 1 + needed(0)
        parts[-1].append(i)
        used += needed(i)
    views = []
    for number, part in enumerate(parts, start=1):
        suffix = f" ({number}/{len(parts)})" if len(parts) > 1 else ""
        view = Table(title=title + suffix)
        for i in [0, *part]:
            view.add_column(
                headers[i],
                justify="left" if i == 0 else "right",
                no_wrap=i == 0,
                width=needed(i) - 3,  # headers wrap between words, values stay whole
            )
        for row in cells:
            view.add_row(*[row[i] for i in [0, *part]])
        views.append(view)
    return views
