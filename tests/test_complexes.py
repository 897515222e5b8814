"""Complex-file parsers: each format on a small file, human-only filtering, separators."""

from __future__ import annotations

from pathlib import Path

import pytest

from scbd_cells.core.errors import DataError
from scbd_cells.evaluation.complexes import read_complexes


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_corum3_human_only_and_semicolons(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "allComplexes.txt",
        "ComplexID\tComplexName\tOrganism\tsubunits(UniProt IDs)\tsubunits(Gene name)\n"
        "1\tBCL6-HDAC4\tHuman\tP1;P2\tBCL6;HDAC4\n"
        "2\tMouse thing\tMouse\tP3;P4\tAbc1;Abc2\n"
        "3\tProteasome\tHuman\tP5;P6;P7\tPSMA1;PSMA2;None;PSMA3\n",
    )
    complexes = read_complexes(path)
    assert complexes.format == "corum3"
    assert complexes.names == ("BCL6-HDAC4", "Proteasome")
    assert complexes.members == (
        frozenset({"BCL6", "HDAC4"}),
        frozenset({"PSMA1", "PSMA2", "PSMA3"}),
    )
    assert "Abc1" not in complexes.genes


def test_corum5_snake_case(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "corum5.txt",
        "complex_id\tcomplex_name\torganism\tsubunits_uniprot_id\tsubunits_gene_name\n"
        "10\tCplx A\tHuman\tx;y\tA1;A2;A3\n"
        "11\tCplx R\tRat\tx;y\tR1;R2\n"
        "12\tCplx B\tHomo sapiens\tx\tB1;B2\n",
    )
    complexes = read_complexes(path)
    assert complexes.format == "corum5"
    assert complexes.names == ("Cplx A", "Cplx B")
    assert complexes.genes == {"A1", "A2", "A3", "B1", "B2"}


def test_two_column_space_and_semicolon(tmp_path: Path) -> None:
    path = _write(tmp_path / "pairs.tsv", "c1\tG1 G2 G3\nc2\tG3;G4\n")
    complexes = read_complexes(path)
    assert complexes.format == "two_column"
    assert complexes.members == (frozenset({"G1", "G2", "G3"}), frozenset({"G3", "G4"}))


def test_gmt(tmp_path: Path) -> None:
    path = _write(tmp_path / "sets.gmt", "setA\thttp://x\tG1\tG2\nsetB\tna\tG2\tG5\tG6\n")
    complexes = read_complexes(path)
    assert complexes.format == "gmt"
    assert complexes.names == ("setA", "setB")
    assert complexes.members[1] == {"G2", "G5", "G6"}


def test_membership_and_share(tmp_path: Path) -> None:
    path = _write(tmp_path / "pairs.tsv", "c1\tG1 G2\nc2\tG2 G3\n")
    complexes = read_complexes(path)
    share = complexes.share_complex(["G1", "G2", "G3", "G9"])
    assert share[0, 1] and share[1, 2] and not share[0, 2] and not share[3].any()
    assert complexes.complex_of(["G3", "G9"]) == ["c2", ""]


def test_unknown_format_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no known format"):
        read_complexes(_write(tmp_path / "x.txt", "just one field\n"))
    with pytest.raises(DataError, match="empty"):
        read_complexes(_write(tmp_path / "e.txt", "\n"))
    with pytest.raises(DataError, match="no complex"):
        read_complexes(
            _write(
                tmp_path / "m.txt", "complex_name\torganism\tsubunits_gene_name\nA\tMouse\tX;Y\n"
            )
        )
