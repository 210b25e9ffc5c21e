"""Code fingerprints for rerun triggers.

Snakemake reruns a job when its rule's own code or ``params:`` change, but not when a module the command imports
changes. Each rule therefore passes ``fingerprint("mask", "readers")`` (the ``cytonet`` modules its stage uses) as
a param: editing one of those modules changes the param and reruns exactly the stages that depend on it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def module_files(name: str) -> list[Path]:
    """Source files of one ``cytonet`` module (``"mask"``) or sub-package (``"synth"``)."""
    path = PACKAGE / name.replace(".", "/")
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    file = path.with_suffix(".py")
    if not file.is_file():
        raise FileNotFoundError(f"no cytonet module '{name}' ({file})")
    return [file]


def fingerprint(*modules: str) -> str:
    """Short hash of the source text of the given ``cytonet`` modules (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        for file in module_files(name):
            digest.update(file.relative_to(PACKAGE).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
