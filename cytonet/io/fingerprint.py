"""Code fingerprints for rerun triggers, derived from the imports of the code that a rule runs.

Snakemake reruns a job when its rule's own code or ``params:`` change, but not when a module that the command
imports changes. Each rule therefore passes ``fingerprint_stage("infer")`` as a param: a hash of every ``cytonet``
module in the import closure of the stage's command module (found by a static walk of the ``import`` statements,
lazy ones inside functions included), so editing any of them reruns exactly the stages that use it. Nobody types
the lists, so they cannot drift.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.name  # "cytonet"
ENTRY = f"{ROOT}.cli"  # how every stage is started; it only names the stage modules, so it is not followed
# Modules that cannot change any output (log formatting): followed for their imports, but not hashed, so a new
# log line does not rerun a brain's worth of jobs. Keep this set to modules that write nothing but logs.
OUTPUT_NEUTRAL = frozenset({f"{ROOT}.io.logs"})


def module_path(module: str, package: Path | None = None) -> Path | None:
    """Source file of a dotted ``cytonet`` module (``cytonet.io.readers``), its package's ``__init__.py``, or None."""
    base = (package or PACKAGE).parent
    path = base.joinpath(*module.split("."))
    if path.is_dir() and (path / "__init__.py").is_file():
        return path / "__init__.py"
    file = path.with_suffix(".py")
    return file if file.is_file() else None


def _resolve_relative(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    parts = module.split(".")
    drop = node.level - 1 if is_package else node.level
    base = parts[: len(parts) - drop] if drop else parts
    return ".".join(base + ([node.module] if node.module else []))


def direct_imports(module: str, package: Path | None = None) -> set[str]:
    """``cytonet`` modules that ``module`` imports anywhere in its source (top level or inside functions)."""
    path = module_path(module, package)
    if path is None:
        raise FileNotFoundError(f"no {ROOT} module '{module}'")
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, node, path.name == "__init__.py") if node.level else node.module
            # `from cytonet.io import readers` imports a module; `from cytonet.io.readers import x` a name
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name and (name == ROOT or name.startswith(ROOT + ".")) and module_path(name, package):
                found.add(name)
    return found - {module, ENTRY}


def _parents(module: str) -> list[str]:
    """Packages whose ``__init__`` runs when ``module`` is imported: cytonet, cytonet.io, ..."""
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def import_closure(module: str, package: Path | None = None) -> set[str]:
    """``module`` and every ``cytonet`` module it imports, directly or through others (with their packages)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(direct_imports(name, package))
        todo.extend(p for p in _parents(name) if module_path(p, package))
    return seen


def stage_module(stage: str) -> str:
    """The module that runs ``cytonet <stage>`` (``infer`` or ``section-metrics``), from the CLI's table."""
    from cytonet.cli import COMMANDS

    if stage not in COMMANDS:
        raise KeyError(f"no cytonet command '{stage}'; commands: {', '.join(COMMANDS)}")
    return COMMANDS[stage][0]


def module_files(name: str, package: Path | None = None) -> list[Path]:
    """The files whose text is a module's code: its source, and for a package its data files beside __init__.py."""
    path = module_path(name, package)
    if path is None:
        raise FileNotFoundError(f"no {ROOT} module '{name}'")
    if path.name != "__init__.py":
        return [path]
    return [path] + sorted(p for p in path.parent.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc"))


def fingerprint_modules(modules: set[str] | list[str], package: Path | None = None) -> str:
    """Short hash of the code of the given modules (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(set(modules) - OUTPUT_NEUTRAL):
        for file in module_files(name, package):
            digest.update(f"{name}:{file.name}".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint_stage(*stages: str) -> str:
    """Fingerprint of the code that ``cytonet <stage>`` runs (the union over several stages)."""
    modules: set[str] = set()
    for stage in stages:
        modules |= import_closure(stage_module(stage))
    return fingerprint_modules(modules)
