"""Logging a person can follow: setup_logging levels and idempotence, progress bars only on a terminal, and the
progress lines pretraining and finetuning write."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cytonet.io import logs  # noqa: E402
from learning_fixtures import make_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


@pytest.fixture
def clean_logging():
    """Leave the root and cytonet loggers as they were (setup_logging changes process-wide state)."""
    root, pkg = logging.getLogger(), logging.getLogger("cytonet")
    handlers, root_level, pkg_level = list(root.handlers), root.level, pkg.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(root_level)
    pkg.setLevel(pkg_level)


def _ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, logs._HANDLER_MARK, False)]


def test_setup_logging_is_idempotent_and_sets_levels(clean_logging, capsys) -> None:
    logs.setup_logging()
    logs.setup_logging()
    assert len(_ours()) == 1
    assert logging.getLogger("cytonet").getEffectiveLevel() == logging.INFO
    logs.setup_logging(1)
    assert len(_ours()) == 1
    assert logging.getLogger("cytonet.learn.pretrain").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("numba").getEffectiveLevel() == logging.WARNING  # other libraries stay quiet at -v
    logs.setup_logging(-1)
    assert logging.getLogger("cytonet").getEffectiveLevel() == logging.WARNING
    logs.setup_logging(0)
    logging.getLogger("cytonet.test").info("step %d/%d", 3, 10)
    logging.getLogger("cytonet.test").debug("not shown")
    err = capsys.readouterr().err  # the handler writes to the current sys.stderr, so capsys sees it
    lines = err.splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]) and lines[0].endswith("INFO cytonet.test: step 3/10")


def test_level_for() -> None:
    assert [logs.level_for(v) for v in (-2, -1, 0, 1, 2)] == [logging.ERROR, logging.WARNING, logging.INFO,
                                                              logging.DEBUG, logging.DEBUG]


def test_progress_is_the_plain_iterable_off_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a tty, like a Snakemake/Slurm log file
    items = [1, 2, 3]
    assert logs.progress(items, desc="x") is items
    bar = logs.progress(None, desc="x", total=3)  # manual bars do nothing
    bar.update(2)
    bar.set_postfix(loss=1.0)
    bar.close()
    assert sys.stderr.getvalue() == ""


def test_progress_draws_a_bar_on_a_terminal(monkeypatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    items = [1, 2, 3]
    bar = logs.progress(items, desc="tiles", unit="tile")
    assert bar is not items and list(bar) == items
    assert "tiles" in sys.stderr.getvalue()
    assert logs.progress(items, desc="x", enabled=False) is items  # --no-progress


def test_format_duration() -> None:
    assert logs.format_duration(5) == "0:05"
    assert logs.format_duration(3725) == "1:02:05"
    assert logs.format_duration(float("nan")) == "?"


def test_logs_do_not_import_torch() -> None:
    code = "import sys, cytonet.io.logs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------------- training progress
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("logs"), "k1", n_sections=3, grid=6, patch_px=32, seed=1)


def test_pretrain_logs_progress_lines(store: Path, tmp_path: Path, caplog) -> None:
    from cytonet.learn.pretrain import pretrain

    cfg = {"steps": 4, "batch_size": 4, "num_workers": 0, "radius_mm": 0.6, "threads": 1, "log_every": 2}
    with caplog.at_level(logging.INFO, logger="cytonet.learn.pretrain"):
        pretrain([store], tmp_path / "a", cfg)
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [m.split()[1] for m in steps] == ["2/4", "4/4"]
    assert all("samples/s" in m and "loss" in m and "ETA" in m for m in steps)
    assert any(r.getMessage().startswith("done:") for r in caplog.records)
    # progress=False (--no-progress): the step lines move to debug level
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cytonet.learn.pretrain"):
        pretrain([store], tmp_path / "b", cfg, progress=False)
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    return env


def test_cli_pretrain_writes_timestamped_lines_without_carriage_returns(store: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "cytonet.cli", "pretrain", "--store", str(store), "--out", str(tmp_path),
           "--param", "steps=3", "--param", "batch_size=4", "--param", "log_every=1", "--param", "num_workers=0",
           "--param", "radius_mm=0.6", "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300, check=True)
    assert "\r" not in res.stderr  # stderr is a pipe (a log file): no tqdm bar
    lines = [ln for ln in res.stderr.splitlines() if " INFO cytonet.learn.pretrain: step " in ln]
    assert len(lines) == 3 and all(LINE.match(ln) for ln in lines), res.stderr
    assert lines[-1].split(": ", 1)[1].startswith("step 3/3 (100%)") and "samples/s" in lines[-1]


def test_cli_finetune_quiet_keeps_the_stdout_summary(store: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "cytonet.cli", "-q", "finetune", "--store", str(store), "--out", str(tmp_path),
           "--known-brain", "k1", "--param", "epochs=3", "--param", "val_every=2", "--param", "num_workers=0",
           "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300, check=True)
    assert " INFO " not in res.stderr
    assert res.stdout.startswith("finetune: ") and "val_acc=" in res.stdout


def test_finetune_logs_validated_epochs(store: Path, tmp_path: Path, caplog) -> None:
    from cytonet.learn.finetune import finetune

    with caplog.at_level(logging.INFO, logger="cytonet.learn.finetune"):
        finetune([store], tmp_path, {"epochs": 5, "val_every": 2, "num_workers": 0, "threads": 1},
                 known_brains={"k1"})
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [m.split()[1] for m in epochs] == ["2/5:", "4/5:", "5/5:"]  # validated epochs only at INFO
    assert all("train loss" in m and "val loss" in m and "acc" in m and "elapsed" in m for m in epochs)
