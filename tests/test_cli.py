"""The `cytonet` command dispatches to stage modules and validates configs."""

import subprocess
import sys
from types import SimpleNamespace

from cytonet.cli import COMMANDS, build_parser


def test_every_command_is_registered_with_help():
    parser = build_parser()
    help_text = parser.format_help()
    for name in COMMANDS:
        assert name in help_text


def test_validate_reports_bad_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("patches:\n  cuont: 3\n")
    result = subprocess.run([sys.executable, "-m", "cytonet.cli", "validate", str(cfg)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "unknown config key 'patches.cuont' (did you mean 'count'?)" in result.stdout


def test_light_commands_do_not_import_torch():
    code = "import sys; from cytonet.cli import build_parser; build_parser('mask'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_verbosity_options_come_before_the_command():
    args = build_parser("validate").parse_args(["-vv", "-q", "validate", "c.yaml"])
    assert (args.log_verbose, args.log_quiet, args.command) == (2, 1, "validate")
    # a sub-command's own --quiet (embed) does not overwrite the top-level count
    args = build_parser("embed").parse_args(["-q", "embed", "--encoder", "e.pt", "--store", "s", "--areas", "a.csv",
                                             "--out", "o"])
    assert args.log_quiet == 1 and args.quiet is False


def test_main_sets_up_logging_once(monkeypatch):
    import cytonet.cli as cli

    calls = []
    monkeypatch.setattr(cli, "setup_logging", calls.append)
    fake = SimpleNamespace(configure_parser=lambda p: p.add_argument("config"), run=lambda args: 0)
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: fake)
    assert cli.main(["-v", "-v", "validate", "c.yaml"]) == 0
    assert cli.main(["-q", "validate", "c.yaml"]) == 0
    assert calls == [2, -1]


def test_python_m_cytonet_runs_the_cli(tmp_path):
    """``python -m cytonet`` (what torchrun -m starts) is the ``cytonet`` command."""
    result = subprocess.run([sys.executable, "-m", "cytonet", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "section-metrics" in result.stdout
