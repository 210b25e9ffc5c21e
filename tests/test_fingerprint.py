"""Code fingerprints change exactly when the named modules change."""

import pytest

from cytonet.io import fingerprint as fp


def test_fingerprint_tracks_module_text(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "b.py").write_text("y = 1\n")
    (pkg / "sub" / "c.py").write_text("z = 1\n")
    monkeypatch.setattr(fp, "PACKAGE", pkg)
    a, ab, sub = fp.fingerprint("a"), fp.fingerprint("a", "b"), fp.fingerprint("sub")
    assert fp.fingerprint("b", "a") == ab  # order does not matter
    (pkg / "b.py").write_text("y = 2\n")
    assert fp.fingerprint("a") == a  # untouched module: same fingerprint
    assert fp.fingerprint("a", "b") != ab
    (pkg / "sub" / "c.py").write_text("z = 2\n")
    assert fp.fingerprint("sub") != sub


def test_unknown_module_is_named():
    with pytest.raises(FileNotFoundError, match="no cytonet module 'nope'"):
        fp.fingerprint("nope")


def test_real_modules_have_fingerprints():
    assert len(fp.fingerprint("mask", "readers")) == 16
