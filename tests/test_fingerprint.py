"""Code fingerprints come from the static import closure of a stage's module, so they cannot miss a module."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cytonet.cli import COMMANDS
from cytonet.io import fingerprint as fp

REPO = Path(__file__).resolve().parents[1]


def _package(tmp_path: Path) -> Path:
    """A small package ``cytonet`` with a stage importing one module lazily and one at the top."""
    pkg = tmp_path / "cytonet"
    for sub in ("io", "stage", "data"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "readers.py").write_text("X = 1\n")
    (pkg / "io" / "tables.py").write_text("from .readers import X\n")
    (pkg / "io" / "unused.py").write_text("Z = 1\n")
    (pkg / "data" / "values.csv").write_text("a,b\n1,2\n")
    (pkg / "stage" / "run.py").write_text(
        "from cytonet.io import tables\n\n\ndef go():\n    from cytonet import data\n    import cytonet.cli\n")
    (pkg / "cli.py").write_text("")
    return pkg


def test_closure_follows_top_level_lazy_and_relative_imports(tmp_path):
    pkg = _package(tmp_path)
    closure = fp.import_closure("cytonet.stage.run", pkg)
    assert closure == {"cytonet", "cytonet.stage", "cytonet.stage.run", "cytonet.io", "cytonet.io.tables",
                       "cytonet.io.readers", "cytonet.data"}  # not cli (the entry point), not io.unused


@pytest.mark.parametrize("edited, changes", [
    ("io/readers.py", True),      # imported through tables: a transitive import
    ("io/tables.py", True),
    ("data/values.csv", True),    # a package's data files count as its code
    ("stage/__init__.py", True),
    ("io/unused.py", False),      # outside the closure
    ("cli.py", False),
])
def test_edit_changes_fingerprint_exactly_inside_the_closure(tmp_path, edited, changes):
    pkg = _package(tmp_path)
    before = fp.fingerprint_modules(fp.import_closure("cytonet.stage.run", pkg), pkg)
    path = pkg / edited
    path.write_text(path.read_text() + "\n# edited\n")
    after = fp.fingerprint_modules(fp.import_closure("cytonet.stage.run", pkg), pkg)
    assert (before != after) is changes


def test_log_formatting_reruns_nothing(tmp_path):
    """cytonet.io.logs only formats log lines: it is in the closures but not in the hash."""
    pkg = _package(tmp_path)
    (pkg / "io" / "logs.py").write_text("LEVEL = 1\n")
    run = pkg / "stage" / "run.py"
    run.write_text("from cytonet.io import logs\n" + run.read_text())
    before = fp.fingerprint_modules(fp.import_closure("cytonet.stage.run", pkg), pkg)
    assert "cytonet.io.logs" in fp.import_closure("cytonet.stage.run", pkg)
    (pkg / "io" / "logs.py").write_text("LEVEL = 2\n")
    assert fp.fingerprint_modules(fp.import_closure("cytonet.stage.run", pkg), pkg) == before
    real = fp.import_closure("cytonet.io.logs")
    assert real <= {"cytonet", "cytonet.io", "cytonet.io.logs"}, "logs must import no module that could change outputs"


def test_unknown_stage_and_module_are_named():
    with pytest.raises(KeyError, match="no cytonet command 'nope'"):
        fp.fingerprint_stage("nope")
    with pytest.raises(FileNotFoundError, match="no cytonet module 'cytonet.nope'"):
        fp.direct_imports("cytonet.nope")


def test_real_stage_closures_hold_the_modules_they_use():
    assert "cytonet.io.readers" in fp.import_closure(fp.stage_module("section-metrics"))
    assert "cytonet.io.annotations" in fp.import_closure(fp.stage_module("section-metrics"))
    assert "cytonet.io.metrics" in fp.import_closure(fp.stage_module("aggregate"))
    assert "cytonet.nn.checkpoints" in fp.import_closure(fp.stage_module("infer"))
    assert len(fp.fingerprint_stage("mask")) == 16


def _rules() -> list[tuple[str, str]]:
    """(rule file, rule text) for every rule of the workflow."""
    out = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=\s*rule\b)", smk.read_text()):
            if re.match(r"\s*rule\b", block):
                out.append((smk.name, block))
    return out


def test_every_rule_that_runs_cytonet_fingerprints_its_own_command():
    """A rule whose shell runs ``cytonet X`` passes the fingerprint of X, so no imported module can be missed."""
    checked = 0
    for name, block in _rules():
        commands = set(re.findall(r"cytonet ([a-z][a-z0-9-]*)", block)) & set(COMMANDS)
        if not commands:
            continue
        stages = set(re.findall(r'fingerprint_stage\("([a-z0-9-]+)"\)', block))
        assert stages == commands, f"{name}: rule runs cytonet {sorted(commands)} but fingerprints {sorted(stages)}"
        checked += 1
    assert checked >= 11


def test_training_specs_fingerprint_their_stage_closures():
    text = (REPO / "workflow" / "rules" / "training.smk").read_text()
    for stage in ("pretrain", "finetune", "evaluate"):
        assert f'training_code("{stage}")' in text
