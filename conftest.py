"""Tests started from an interpreter without the project's dependencies (a bare `python3 -m pytest`) run again
in the project's virtual environment, .venv, which the README's install command makes; without one, pytest
stops with one line saying how to make it. Without a GPU, Triton kernels run in Triton's interpreter."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

VENV_PYTHON = Path(__file__).resolve().parent / ".venv" / "bin" / "python"
# Set in the re-run, so that a .venv without torch stops with the message instead of re-running forever.
RERUN_MARK = "CORENET_TESTS_RERUN_IN_VENV"


def pytest_configure(config: pytest.Config) -> None:
    if importlib.util.find_spec("torch") is not None:
        _interpret_triton_without_a_gpu()
        return
    if VENV_PYTHON.exists() and not os.environ.get(RERUN_MARK):
        # Output captured so far goes to pytest's temporary files; give the re-run the terminal back.
        config.pluginmanager.getplugin("capturemanager").suspend_global_capture(in_=True)
        print(f"torch is not installed for {sys.executable}; running the tests with {VENV_PYTHON}", file=sys.stderr,
              flush=True)
        os.environ[RERUN_MARK] = "1"
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), "-m", "pytest", *config.invocation_params.args])
    raise pytest.UsageError(f"torch is not installed for {sys.executable}: run the README's install command "
                            f"(it makes .venv), then `. .venv/bin/activate` and run the tests again")


def _interpret_triton_without_a_gpu() -> None:
    """Without a GPU, Triton kernels (models/networks/ot/fused.py, where triton is installed) run on CPU tensors
    in Triton's interpreter, which must be chosen before anything imports triton."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
