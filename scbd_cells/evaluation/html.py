"""Evaluate: ``report.html``, one self-contained page (tables, provenance, images as base64).

A lab pastes it into a meeting or mails it: no folder of PNGs to carry along. The text
is the same as ``report.md``'s; the images are embedded as ``data:`` URIs.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #eef7ee; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
code { background: #f6f6f6; padding: 0 3px; }
"""


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_table(
    table: pd.DataFrame, columns: list[tuple[str, str, str]], *, best: dict[str, str] | None = None
) -> str:
    """An HTML table of ``table``'s ``(column, header, format)``; best value per column bold.

    ``best`` maps a column to ``"max"`` or ``"min"``.
    """
    best = best or {}
    marks: dict[str, Any] = {}
    for column, rule in best.items():
        values = pd.to_numeric(table[column], errors="coerce")
        if values.notna().sum() > 1:
            marks[column] = values.max() if rule == "max" else values.min()
    head = "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in columns)
    rows = []
    for _, row in table.iterrows():
        cells = []
        for column, _, fmt in columns:
            value = row[column]
            if fmt == "s":
                cells.append(f"<td>{html.escape(str(value))}</td>")
                continue
            text = "–" if pd.isna(value) else format(value, fmt)
            is_best = column in marks and not pd.isna(value) and value == marks[column]
            cells.append(f'<td class="num{" best" if is_best else ""}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def provenance_html(provenance: dict[str, Any]) -> str:
    """The provenance block: version, date, inputs with sizes and training facts."""
    items = [
        f"<li>scbd-cells {html.escape(str(provenance['scbd_cells_version']))}, "
        f"{html.escape(str(provenance['created']))}</li>",
        f"<li>complexes: <code>{html.escape(provenance['complexes']['path'])}</code> "
        f"({provenance['complexes']['bytes']:,} bytes)</li>",
    ]
    for name, entry in provenance["inputs"].items():
        facts = [f"{entry['bytes']:,} bytes", f"{entry['n_cells']:,} cells", f"key {entry['key']}"]
        for label, field in (("kind", "kind"), ("step", "checkpoint_step"), ("α", "alpha"),
                             ("steps", "steps"), ("method", "method")):
            if entry.get(field) not in (None, ""):
                facts.append(f"{label} {entry[field]}")
        items.append(
            f"<li><b>{html.escape(name)}</b>: <code>{html.escape(entry['path'])}</code> "
            f"({html.escape(', '.join(map(str, facts)))})</li>"
        )
    return "<ul>" + "".join(items) + "</ul>"


def report_html(
    *,
    title: str,
    sections: list[tuple[str, str]],
    images: list[tuple[Path, str]],
) -> str:
    """The page: ``sections`` are ``(heading, html body)``; ``images`` ``(png path, caption)``."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>{content}")
    body.append("<h2>Figures</h2>")
    for path, caption in images:
        body.append(f"<figure>{_image(path, caption)}<figcaption class='note'>"
                    f"{html.escape(caption)}</figcaption></figure>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
