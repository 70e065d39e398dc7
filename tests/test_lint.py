"""`make lint` is clean: ruff's checks and formatting, and mypy's types in every step, as
configured in pyproject.toml."""

import subprocess
import sys

import pytest

from tools.steps import ROOT


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_step_type_checks():
    result = subprocess.run(
        [sys.executable, "tools/typecheck.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
