"""The linters configured in pyproject.toml pass, so style drift fails the suite."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# mypy takes about 25 s of one core with a cold cache (a fresh clone). Started when this
# module is collected, it runs beside the tests that come first (most of their time is
# spent waiting on servers), and its test below only collects the answer.
_MYPY = subprocess.Popen([sys.executable, "-m", "mypy"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "common", "functions",
                             "infra", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing_in_common():
    output, _ = _MYPY.communicate(timeout=300)
    assert _MYPY.returncode == 0, output
