"""The workflow passes its own linters: `snakemake --lint` on the demo config and `snakefmt --check` (make lint)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/, where `make test` installed snakemake and snakefmt


def _tool(name: str) -> str:
    """Path of a command-line tool from the test interpreter's venv (else PATH), or skip the test."""
    path = BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[workflow,dev]' installs it)")
    return found


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_snakemake_lint_is_clean_on_the_demo_config():
    """Every rule has a log, a conda env, no hard-coded output prefix in params; the rule files hold no functions."""
    result = _run([_tool("snakemake"), "--lint"])
    assert result.returncode == 0, f"snakemake --lint found problems:\n{result.stdout}\n{result.stderr}"


def test_snakefmt_leaves_the_workflow_unchanged():
    """Snakefile and workflow/rules/*.smk are formatted (pyproject.toml [tool.snakefmt], line length 120)."""
    result = _run([_tool("snakefmt"), "--check", "Snakefile", "workflow/rules"])
    assert result.returncode == 0, (
        "snakefmt would reformat (run `snakefmt Snakefile workflow/rules`):\n" + result.stdout + result.stderr
    )
