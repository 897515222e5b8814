"""Evaluate: read protein-complex files (CORUM 3.x/4.x, CORUM 5.x, two-column, GMT).

Four formats, recognised from the header line (or the ``.gmt`` extension):

- CORUM 3.x/4.x (``allComplexes.txt``): tab-separated, a ``subunits(Gene name)``
  column with ``;``-separated gene symbols, ``ComplexName`` and ``Organism``.
- CORUM 5.x: tab-separated, snake_case header with ``subunits_gene_name``
  (``;``-separated), ``complex_name`` and ``organism``.
- Two-column: ``name<TAB>gene gene ...`` (genes separated by spaces, ``;`` or ``,``);
  no header.
- GMT: ``name<TAB>description<TAB>gene<TAB>gene ...``; no header.

Where an organism column exists only human rows are kept (``Human`` or
``Homo sapiens``, any case).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scbd_cells.core.errors import DataError, InputError

log = logging.getLogger(__name__)

_HUMAN = {"human", "homo sapiens"}
#: The formats read from a CORUM export; the others hold any relationship groups.
CORUM_FORMATS = ("corum3", "corum5")
_MEMBER_SPLIT = re.compile(r"[;,\s]+")


@dataclass(frozen=True)
class Complexes:
    """Protein complexes: a name and a set of member gene symbols each.

    Attributes
    ----------
    names
        Complex names, in file order (duplicates made unique with ``#k``).
    members
        Member gene symbols of each complex, same order as ``names``.
    format
        The format the file was read as: ``corum3``, ``corum5``, ``two_column`` or ``gmt``.
    path
        The file read.
    """

    names: tuple[str, ...]
    members: tuple[frozenset[str], ...]
    format: str
    path: Path

    @property
    def is_corum(self) -> bool:
        """Whether the file is a CORUM export (else any relationship groups: GMT, two-column)."""
        return self.format in CORUM_FORMATS

    @property
    def label(self) -> str:
        """How the report names the file's metrics: ``CORUM``, else ``relationships (FILE)``.

        A GMT or two-column file may hold any groups (mechanisms of action, targets,
        pathways), so its metrics are not called CORUM's; ``metrics.json`` keeps the
        ``corum_*`` keys whatever the file, and records this label beside them.
        """
        return "CORUM" if self.is_corum else f"relationships ({self.path.name})"

    @property
    def genes(self) -> frozenset[str]:
        """Every gene that is a member of at least one complex."""
        return frozenset().union(*self.members) if self.members else frozenset()

    def membership(self, genes: list[str]) -> np.ndarray:
        """Boolean (n_genes, n_complexes) matrix: gene i is a member of complex k."""
        position = {gene: i for i, gene in enumerate(genes)}
        matrix = np.zeros((len(genes), len(self.members)), dtype=bool)
        for k, members in enumerate(self.members):
            rows = [position[gene] for gene in members if gene in position]
            matrix[rows, k] = True
        return matrix

    def share_complex(self, genes: list[str]) -> np.ndarray:
        """Boolean (n_genes, n_genes) matrix: genes i and j are members of a common complex."""
        membership = self.membership(genes).astype(np.float32)
        return (membership @ membership.T) > 0

    def complex_of(self, genes: list[str]) -> list[str]:
        """The first complex (file order) each gene belongs to, or ``""`` (for colouring plots)."""
        first: dict[str, str] = {}
        for name, members in zip(self.names, self.members, strict=True):
            for gene in members:
                first.setdefault(gene, name)
        return [first.get(gene, "") for gene in genes]


def _split_members(text: str) -> frozenset[str]:
    return frozenset(g for g in _MEMBER_SPLIT.split(text.strip()) if g and g.lower() != "none")


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(
            f"Complexes file {path} does not exist. Pass a CORUM file (e.g. the simulator's "
            "complexes.txt or CORUM's allComplexes.txt) with --corum."
        ) from None
    except UnicodeDecodeError as error:
        raise DataError(
            f"Complexes file {path} is not UTF-8 text ({error}). Expected a tab-separated "
            "CORUM export, a two-column or a GMT file; unzip it first if it is compressed."
        ) from None
    return [line for line in text.splitlines() if line.strip()]


def _read_table(lines: list[str], *, gene_column: str, name_columns: tuple[str, ...], path: Path):
    delimiter = "\t" if "\t" in lines[0] else ","
    rows = list(csv.reader(lines, delimiter=delimiter))
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    if gene_column.lower() not in lower:
        raise DataError(
            f"Complexes file {path}: its first line mentions {gene_column!r}, but no "
            f"{'tab' if delimiter == chr(9) else 'comma'}-separated column is named so (found "
            f"{header[:6]}). Expected CORUM's tab-separated export (allComplexes.txt), not an "
            "edited or JSON copy."
        )
    gene_at = lower.index(gene_column.lower())
    name_at = next((lower.index(c.lower()) for c in name_columns if c.lower() in lower), None)
    organism_at = lower.index("organism") if "organism" in lower else None
    names, members, n_other = [], [], 0
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) <= gene_at:
            raise DataError(
                f"Complexes file {path}, line {line_number}: expected {len(header)} "
                f"{'tab' if delimiter == chr(9) else 'comma'}-separated fields, found {len(row)}. "
                "Check that the file is an unmodified CORUM export."
            )
        if organism_at is not None and row[organism_at].strip().lower() not in _HUMAN:
            n_other += 1
            continue
        names.append(row[name_at].strip() if name_at is not None else f"complex_{line_number - 1}")
        members.append(_split_members(row[gene_at]))
    if n_other:
        log.info("Complexes: kept human rows only (%d other-organism rows skipped)", n_other)
    return names, members


def read_complexes(path: str | Path) -> Complexes:
    """Read a protein-complex file in any of the supported formats.

    Parameters
    ----------
    path
        CORUM 3.x/4.x or 5.x export, a two-column ``name<TAB>genes`` file, or a GMT file.

    Returns
    -------
    Complexes
        Names and member sets, human rows only where the file has an organism column.

    Raises
    ------
    DataError
        The file is empty, in no known format, or lists no complex with a gene.
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise DataError(f"Complexes file {path} is empty. Expected one complex per line.")
    header = lines[0].lower()
    if lines[0].lstrip().startswith(("[", "{")):
        raise DataError(
            f"Complexes file {path} looks like JSON (it starts with {lines[0].lstrip()[0]!r}). "
            "scbd-cells reads CORUM's tab-separated export (allComplexes.txt / .tsv), a "
            "two-column 'name<TAB>genes' file or a GMT file: download the text export instead."
        )
    if "subunits(gene name)" in header:
        fmt = "corum3"
        names, members = _read_table(
            lines, gene_column="subunits(Gene name)", name_columns=("ComplexName",), path=path
        )
    elif "subunits_gene_name" in header:
        fmt = "corum5"
        names, members = _read_table(
            lines, gene_column="subunits_gene_name", name_columns=("complex_name",), path=path
        )
    else:
        fields = lines[0].split("\t")
        if path.suffix.lower() == ".gmt" or len(fields) >= 3:
            fmt = "gmt"
            rows = [line.split("\t") for line in lines]
            names = [row[0].strip() for row in rows]
            members = [frozenset(g.strip() for g in row[2:] if g.strip()) for row in rows]
        elif len(fields) == 2:
            fmt = "two_column"
            rows = [line.split("\t") for line in lines]
            bad = next((i for i, row in enumerate(rows, start=1) if len(row) != 2), None)
            if bad is not None:
                raise DataError(
                    f"Complexes file {path}, line {bad}: expected 'name<TAB>gene gene ...' "
                    f"(two tab-separated fields), found {len(rows[bad - 1])} fields."
                )
            names = [row[0].strip() for row in rows]
            members = [_split_members(row[1]) for row in rows]
        else:
            raise DataError(
                f"Complexes file {path} is in no known format. Expected a CORUM export "
                "(header with 'subunits(Gene name)' or 'subunits_gene_name'), a two-column "
                "'name<TAB>gene gene ...' file, or a GMT file; found first line "
                f"{lines[0][:80]!r}."
            )
    if not any(members):
        raise DataError(
            f"Complexes file {path} ({fmt}) lists no complex with member genes"
            " (after keeping human rows). Check the organism column and the gene column."
        )
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    log.info("Read %d complexes (%s) from %s", len(unique), fmt, path)
    return Complexes(names=tuple(unique), members=tuple(members), format=fmt, path=path)
