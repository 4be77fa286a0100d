"""ruff and mypy, configured in pyproject.toml, report nothing: `make test` is the CI command, so it enforces both.
Each runs from this venv, as `python -m`, so the pinned versions of the test extra are the ones that judge."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_ruff_finds_nothing():
    result = run("ruff", "check", "--no-fix", "--output-format", "concise", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing():
    # the files and the strictness come from [tool.mypy]; the cache in .mypy_cache makes a rerun take seconds
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
