"""The batch manifest of one multi-section ``cytonet infer`` job, and publishing a section's manifest from it.

A Snakemake job can declare only outputs whose names follow from its wildcards, so a job that maps a batch of
sections (``infer.sections_per_job`` > 1) cannot declare each section's ``<name>_infer.json``. With
``--batch-manifest PATH`` the job therefore writes every section's maps as usual but stages each manifest under
``PATH.parts/``; once every rank is done, rank 0 gathers them into PATH (written last, atomically: it vouches for
the whole batch). The workflow's local rule ``infer_section`` then writes each section's ``<name>_infer.json`` from
PATH with :func:`publish_section`: byte for byte what a one-section job writes. No torch here, so the Snakemake
process can import this module.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORMAT = "cytonet-infer-batch/1"


class BatchError(ValueError):
    """A batch manifest that is missing, incomplete or does not list a section; the message names the file."""


def parts_dir(batch: str | os.PathLike) -> Path:
    """Where the ranks stage the section manifests of ``batch`` until rank 0 gathers them."""
    return Path(f"{batch}.parts")


def staged_manifest(batch: str | os.PathLike, model_index: int, name: str) -> Path:
    """Staged manifest of section ``name`` mapped with the ``model_index``-th model (its --out)."""
    return parts_dir(batch) / str(model_index) / f"{name}_infer.json"


def write_batch_manifest(batch: str | os.PathLike, outs: Sequence[str], names: Sequence[str],
                         info: dict[str, Any] | None = None) -> Path:
    """Gather the staged manifests of every (out, section) into ``batch``; then drop the staging folder."""
    from cytonet.io.atomic import atomic_write_text

    maps = []
    for k, out in enumerate(outs):
        for name in names:
            staged = staged_manifest(batch, k, name)
            if not staged.is_file():
                raise BatchError(f"batch manifest {batch}: no manifest of section {name} for --out {out} "
                                 f"(expected {staged}; did a rank fail?)")
            maps.append({"out": str(out), "section": name, "manifest": json.loads(staged.read_text())})
    doc = {"format": FORMAT, "sections": list(names), "outs": [str(o) for o in outs], **(info or {}), "maps": maps}
    atomic_write_text(Path(batch), json.dumps(doc, indent=2))  # last: it vouches for every section's maps
    shutil.rmtree(parts_dir(batch), ignore_errors=True)
    return Path(batch)


def read_batch_manifest(batch: str | os.PathLike) -> dict[str, Any]:
    path = Path(batch)
    if not path.is_file():
        raise BatchError(f"batch manifest {path} does not exist (the batch's infer job did not finish)")
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise BatchError(f"batch manifest {path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def publish_section(batch: str | os.PathLike, section: str, manifests: Sequence[str | os.PathLike]) -> list[Path]:
    """Write ``<out>/<section>_infer.json`` for each path in ``manifests`` from the batch manifest.

    Each manifest's folder must be an --out of the batch, and the maps the manifest lists must exist there.
    """
    from cytonet.io.atomic import atomic_write_text

    doc = read_batch_manifest(batch)
    entries = {(os.path.normpath(m["out"]), m["section"]): m["manifest"] for m in doc["maps"]}
    written = []
    for target in map(Path, manifests):
        if target.name != f"{section}_infer.json":
            raise BatchError(f"{target}: not the manifest of section {section}")
        manifest = entries.get((os.path.normpath(target.parent), section))
        if manifest is None:
            raise BatchError(f"batch manifest {batch} has no maps of section {section} in {target.parent}")
        missing = [f for f in manifest.get("outputs", {}).values() if not (target.parent / f).exists()]
        if missing:
            raise BatchError(f"batch manifest {batch}: maps of section {section} missing in {target.parent}: "
                             f"{', '.join(missing)}")
        # the same text SectionMapWriter writes (json.dumps(manifest, indent=2)): floats and key order round-trip
        written.append(atomic_write_text(target, json.dumps(manifest, indent=2)))
    return written
