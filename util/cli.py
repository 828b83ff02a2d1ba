"""Command-line entry helper: user errors become one line on stderr and exit status 2.

Errors a user can cause are raised as ValueError, FileNotFoundError (any OSError) or RuntimeError with
a one-sentence message at the edge where they are detected. `run_main` prints that sentence instead of
a traceback. Set CORENET_TRACEBACK=1 to see the full traceback when debugging. `OneLineErrorParser` does the
same for argparse's usage errors.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn


def user_message(err: BaseException) -> str:
    """The one line to show for err. An error raised in a DataLoader worker arrives re-wrapped as
    "Caught ValueError in DataLoader worker process 0. Original Traceback ..."; show the original line."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    line = text.splitlines()[0] if text else type(err).__name__
    if "No working C++ compiler" in line:  # torch.compile's CPU backend (--ot stored, --compile on)
        return (f"{line}; torch.compile needs one on the CPU: install g++ or clang, or run the reference path "
                f"(--ot dense --compile off)")
    if "can't allocate memory" in line or "out of memory" in line.lower():  # the CPU's allocator, CUDA's
        return (f"{line}; use smaller meshes or a smaller --batchSize, or let the optimal transport run block by "
                f"block (--ot chunked, or --ot auto: memory linear in the vertex count, where the dense warp's grows "
                f"with its square)")
    return line


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one 'error:' line and exit status 2, like every other user error;
    argparse's default prints the whole usage block first, which buries the one line that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see --help\n")


def run_main(main: Callable[[], object]) -> None:
    """Call main(); on a user-facing error print 'error: <message>' and exit with status 2."""
    try:
        main()
    except (ValueError, OSError, RuntimeError) as err:
        if os.environ.get("CORENET_TRACEBACK") == "1":
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
