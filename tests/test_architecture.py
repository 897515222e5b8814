"""Layers only look down: the import graph of the package, checked against docs/architecture.md.

Every ``scbd_cells`` import in the package (module level and inside functions; imports
under ``if TYPE_CHECKING`` are for annotations only and do not count) must go to a module
of the same or a lower layer; the commands of one layer do not import each other; the
model does not import the data layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scbd_cells"

# The layers of docs/architecture.md, lowest first (a module takes its longest prefix).
LAYERS = {
    # 0: used by every part
    "scbd_cells.core": 0,
    "scbd_cells.data": 0,  # the package itself: schema
    "scbd_cells.data.schema": 0,
    # 1: data, simulator and model side by side, and the small numeric pieces
    "scbd_cells.data.store": 1,
    "scbd_cells.data.ingest": 1,
    "scbd_cells.data.cellprofiler_tables": 1,
    "scbd_cells.data.ome_zarr": 1,
    "scbd_cells.data.batch_stats": 1,
    "scbd_cells.data.sampler": 1,
    "scbd_cells.data.loader": 1,
    "scbd_cells.data.dask_cluster": 1,
    "scbd_cells.data.object_store": 1,
    "scbd_cells.sim": 1,
    "scbd_cells.model": 1,
    "scbd_cells.evaluation.well_probe": 1,  # a metric training's validation uses too
    "scbd_cells.profiles": 1,  # the package: its docstring
    "scbd_cells.profiles.cellprofiler": 1,
    "scbd_cells.profiles.aggregate": 1,
    "scbd_cells.profiles.replicates": 1,
    # 2: what joins data and model, and the AnnData and profile files
    "scbd_cells.training": 2,  # the package: its docstring
    "scbd_cells.training.checkpoint": 2,
    "scbd_cells.profiles.anndata_io": 2,
    "scbd_cells.profiles.profile_tables": 2,
    "scbd_cells.profiles.cells": 2,
    # 3: the commands that make embeddings
    "scbd_cells.training.loop": 3,
    "scbd_cells.embedding": 3,
    "scbd_cells.profiles.features": 3,
    "scbd_cells.profiles.corrections": 3,
    # 4: the commands that read embeddings
    "scbd_cells.evaluation": 4,
    "scbd_cells.profiles.exports": 4,
    # 5: what runs several commands, and the entry points
    "scbd_cells.training.sweeping": 5,
    "scbd_cells.pipeline": 5,
    "scbd_cells.cli": 6,
    "scbd_cells.__main__": 6,
    "scbd_cells": 6,  # the package's lazy public names
}
COMMANDS = {
    "scbd_cells.training.loop",
    "scbd_cells.embedding.encode",
    "scbd_cells.embedding.reconstruction",
    "scbd_cells.profiles.features",
    "scbd_cells.profiles.corrections",
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer: add it to LAYERS and docs/architecture.md")


def command_of(module: str) -> str | None:
    return next((c for c in COMMANDS if module == c or module.startswith(c + ".")), None)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST) -> list[str]:
    """The scbd_cells modules a file imports when it runs (not under ``if TYPE_CHECKING``)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        module = getattr(node, "module", None) or ""
        if isinstance(node, ast.ImportFrom) and module.startswith("scbd_cells"):
            names = [alias.name for alias in node.names]
            if node.module == "scbd_cells" and names == ["__version__"]:
                found.append("scbd_cells.core.errors")  # the version string: layer 0
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.startswith("scbd_cells"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, list[str]]:
    return {
        module_name(path): runtime_imports(ast.parse(path.read_text()))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_every_import_looks_down() -> None:
    wrong = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not wrong, "\n".join(wrong)


def test_commands_do_not_import_each_other_and_the_model_not_the_data() -> None:
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            own, other = command_of(module), command_of(target)
            if own and other and own != other:
                wrong.append(f"{module} imports the command module {target}")
            if module.startswith("scbd_cells.model") and target.startswith("scbd_cells.data."):
                wrong.append(f"{module} (model) imports {target} (data)")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_violation() -> None:
    """The parser finds function-level imports and ignores TYPE_CHECKING ones."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from scbd_cells.data.store import Store\n"
        "def f():\n    from scbd_cells.evaluation.report import evaluate\n"
    )
    assert runtime_imports(tree) == ["scbd_cells.evaluation.report"]
    assert layer_of("scbd_cells.evaluation.report") > layer_of("scbd_cells.training.loop")


def test_the_tree_shows_the_stages() -> None:
    """Only the entry points sit loose beside the stage packages (docs/architecture.md)."""
    loose = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "cli.py", "pipeline.py"]
    packages = sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))
    assert packages == [
        "core", "data", "embedding", "evaluation", "model", "profiles", "sim", "training",
    ]  # fmt: skip


def test_every_public_name_is_importable_from_the_package() -> None:
    import scbd_cells

    for name in scbd_cells.__all__:
        assert callable(getattr(scbd_cells, name)) or name == "__version__", name
