"""util/cli.py: the one line a user error becomes."""
import pytest

from util.cli import user_message


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 6400000000 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("CUDA out of memory. Tried to allocate 24.00 GiB. GPU 0 has a total capacity of 79.19 GiB\nmore"),
])
def test_running_out_of_memory_says_what_to_do(error):
    line = user_message(error)
    assert "\n" not in line and line.startswith(str(error).splitlines()[0])
    assert "--batchSize" in line and "--ot chunked" in line


def test_a_worker_error_shows_its_original_line():
    error = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                       "last):\n  File x\nValueError: mesh id0_1.obj has 5 vertices, expected 6")
    assert user_message(error) == "mesh id0_1.obj has 5 vertices, expected 6"


def test_other_errors_keep_their_first_line():
    assert user_message(RuntimeError("first\nsecond")) == "first"
    assert user_message(OSError()) == "OSError"
