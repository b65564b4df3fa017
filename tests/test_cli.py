"""The ``ddpm`` command is installed and answers."""

import subprocess
import sys

import ddpm_lib


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_module_entry_point_prints_help_and_version():
    out = run(sys.executable, "-m", "ddpm_lib", "--help")
    assert out.returncode == 0 and "usage: ddpm" in out.stdout
    out = run(sys.executable, "-m", "ddpm_lib", "--version")
    assert out.returncode == 0 and ddpm_lib.__version__ in out.stdout


def test_unknown_option_exits_non_zero_without_a_traceback():
    out = run(sys.executable, "-m", "ddpm_lib", "--no-such-option")
    assert out.returncode != 0 and "Traceback" not in out.stderr
