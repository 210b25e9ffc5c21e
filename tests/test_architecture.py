"""The layering of the package (docs/architecture.md): stages never import stages, layers import downwards only,
torch stays out of preprocessing, Snakemake out of the package, and functions stay short."""

from __future__ import annotations

import ast

import pytest

from cytonet.cli import COMMANDS
from cytonet.io.fingerprint import PACKAGE, direct_imports, import_closure

STAGES = {module for module, _ in COMMANDS.values()} - {"cytonet.io.config"}  # `validate` is a check, not a stage
LAYER = {"io": 0, "nn": 1}  # shared layers; every other sub-package holds stages (layer 2)
MAX_FUNCTION_LINES = 100


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        names.append(".".join(rel.parts).removesuffix(".__init__"))
    return names


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER.get(parts[1], 2) if len(parts) > 2 else 0


def _subpackage(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _imports_anywhere(module: str) -> set[str]:
    """Top-level names of every module imported anywhere in ``module``'s source (``torch``, ``snakemake``, ...)."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_stage_imports_another_stage():
    for stage in sorted(STAGES):
        reached = import_closure(stage) & STAGES - {stage}
        assert not reached, f"{stage} imports the stage module(s) {sorted(reached)}"


def test_layers_import_downwards_and_stage_packages_stay_apart():
    for module in _modules():
        for target in direct_imports(module):
            if target in ("cytonet", "cytonet.data") or _subpackage(target) == _subpackage(module):
                continue
            assert _layer(target) < _layer(module) or _layer(module) == 0 and _layer(target) == 0, \
                f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"


def test_io_preprocess_synth_and_exchange_never_import_torch():
    for module in _modules():
        if _subpackage(module) in ("io", "preprocess", "synth", "exchange"):
            for reached in import_closure(module):
                assert "torch" not in _imports_anywhere(reached) and "torchvision" not in _imports_anywhere(reached), \
                    f"{module} reaches torch through {reached}"


def test_package_never_imports_snakemake():
    for module in _modules():
        assert "snakemake" not in _imports_anywhere(module), module


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
