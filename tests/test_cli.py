"""The installed ``geocache`` entry point answers --help and --version."""

import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import geocache
from geocache_cli.main import main


def test_help_and_version_through_click():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "geometry-aware" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"geocache, version {geocache.__version__}"


def test_installed_console_script_runs():
    exe = shutil.which("geocache", path=str(Path(sys.executable).parent)) or shutil.which("geocache")
    assert exe, "the geocache console script is not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"geocache, version {geocache.__version__}"
    bad = subprocess.run([exe, "no-such-command"], capture_output=True, text=True)
    assert bad.returncode != 0 and "No such command" in bad.stderr


def test_cli_is_not_installed_as_a_bare_top_level_module():
    import importlib.util

    assert importlib.util.find_spec("geocache_cli") is not None
    spec = importlib.util.find_spec("cli")
    assert spec is None or "site-packages" not in str(spec.origin or "")
