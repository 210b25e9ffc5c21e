"""Atomic writes: complete files only, nothing left behind on error, and the mode other new files get."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cytonet.io.atomic import atomic_path, atomic_write_text


def test_written_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = atomic_write_text(tmp_path / "table.md", "| a |\n")
        assert out.read_text() == "| a |\n"
        assert out.stat().st_mode & 0o777 == 0o644  # readable by the lab, as `open()` would have made it
    finally:
        os.umask(old)


def test_failed_write_leaves_neither_file_nor_temporary(tmp_path: Path) -> None:
    (tmp_path / "old.csv").write_text("previous\n")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "old.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert (tmp_path / "old.csv").read_text() == "previous\n"  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]
