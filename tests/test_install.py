"""A non-editable install (a wheel in a fresh venv) has what `cytonet` needs: schemas, entry point, version.

The wheel is built from a copy of the package (the build writes build/ and *.egg-info beside pyproject.toml) and
installed with --no-deps --no-index into a fresh venv; a .pth file there makes the current venv's packages (numpy,
pandas, ...) importable, so nothing is downloaded. Every command runs outside the repository, without PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import cytonet

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = sorted(p.name for p in (REPO / "cytonet" / "schemas").glob("*.schema.yaml"))
AFFINE = "0.004 0 0 0  0 0.004 0 0  0 0 0 1.2"


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO / "cytonet", src / "cytonet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", src, "-w", tmp / "dist"])
    (whl,) = (tmp / "dist").glob("cytonet-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; its site-packages comes before the current venv's on sys.path."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", root])
    py = root / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel])
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # Paths named in a .pth file are appended to sys.path; .pth files inside them (the current venv's editable
    # cytonet finder) are not run, so `import cytonet` can only find the installed copy.
    (site / "current_venv_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return root


@pytest.fixture
def outside(tmp_path) -> Path:
    """A config with brains/sections/areas tables in a folder outside the repository (no image files)."""
    (tmp_path / "b1").mkdir()
    (tmp_path / "b1" / "sections.csv").write_text(
        f"section_id,image,z_um,transform,annotation\ns001,s001.tif,0,{AFFINE},s001.geojson\ns002,s002.tif,20,{AFFINE},\n")
    (tmp_path / "brains.csv").write_text("brain_id,sections,role\nb1,b1/sections.csv,known\n")
    (tmp_path / "areas.csv").write_text("area_id,name,color\n1,hOc1,#ff0000\n2,hOc2,#00ff00\n")
    (tmp_path / "config.yaml").write_text("brains: brains.csv\nareas: areas.csv\n")
    assert not tmp_path.resolve().is_relative_to(REPO.resolve())
    return tmp_path


def test_wheel_ships_the_schemas(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert SCHEMAS == ["areas.schema.yaml", "brains.schema.yaml", "config.schema.yaml", "sections.schema.yaml"]
    assert sorted(n.removeprefix("cytonet/schemas/") for n in names if n.startswith("cytonet/schemas/")) == SCHEMAS
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)


def test_installed_package_is_the_fresh_venvs(venv, outside):
    code = "import cytonet, cytonet.io.tables as t; print(cytonet.__file__); print(t.SCHEMA_DIR)"
    package, schemas = _run([venv / "bin" / "python", "-c", code], cwd=outside).stdout.split()
    assert Path(package).is_relative_to(venv) and Path(schemas).is_relative_to(venv)
    assert sorted(p.name for p in Path(schemas).glob("*.schema.yaml")) == SCHEMAS


def test_installed_validate_reads_config_and_tables(venv, outside):
    out = _run([venv / "bin" / "cytonet", "validate", "--no-files", "config.yaml"], cwd=outside).stdout
    assert "config config.yaml is valid: 2 areas, 1 brains, 2 sections" in out
    assert re.search(r"^  b1\b.*: 2 sections, 1 annotated$", out, re.M), out
    # the schema is really applied: a misspelt key is an error that names it
    (outside / "bad.yaml").write_text("brains: brains.csv\nareas: areas.csv\ninfer:\n  output_mu: 32\n")
    bad = subprocess.run([venv / "bin" / "cytonet", "validate", "--no-files", "bad.yaml"], cwd=outside,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "unknown config key 'infer.output_mu' (did you mean 'output_um'?)" in bad.stdout


def test_installed_version(venv, outside):
    out = _run([venv / "bin" / "cytonet", "--version"], cwd=outside).stdout
    assert out == f"cytonet {cytonet.__version__}\n"


def test_version_falls_back_to_the_package_attribute(monkeypatch, capsys):
    """Run from a tree that is not installed (no distribution metadata), --version still names the version."""
    import importlib.metadata

    from cytonet.cli import build_parser, package_version

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert package_version() == cytonet.__version__
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"cytonet {cytonet.__version__}\n"
