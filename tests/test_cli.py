"""The `cytonet` command dispatches to stage modules and validates configs."""

import subprocess
import sys

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
