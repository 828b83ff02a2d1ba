"""Running the project's command lines in tests: a subprocess helper and the one-line error check."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python ARGS...` (a script path or -m module) from the project root, without CORENET_TRACEBACK,
    with `env` added to the environment."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    env.pop("CORENET_TRACEBACK", None)
    return subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def assert_one_line_error(status: int, stderr: str, *fragments: str) -> list[str]:
    """Exit status 2, no traceback, and one 'error:' line, the last (progress bars may precede it), holding
    every fragment; return stderr's non-empty lines."""
    assert status == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in stderr and errors == lines[-1:], stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return lines
