"""scripts/grouped_passes_probe.py: the grouped Sinkhorn passes against fused.py's float64 references (on a GPU, or
in Triton's interpreter, which the root conftest.py selects without one), at group and chunk sizes that leave
partial groups, partial chunks and programs of unequal rows; its --check mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.networks.ot import fused
from scripts import grouped_passes_probe as probe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_UNAVAILABLE = fused.unsupported_reason(torch.empty(1, 1, 1, device=DEVICE))
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))


@pytest.mark.parametrize("fixed_point", [False, True])
@pytest.mark.parametrize("shape, layout", [((2, 37, 45), probe.GroupLayout(4, 16, 4, 2, 1)),
                                           ((1, 20, 70), probe.GroupLayout(8, 32, 4, 1, 1)),
                                           ((3, 9, 16), probe.GroupLayout(2, 16, 2, 3, 1)),
                                           ((1, 5, 3), probe.GroupLayout(8, 64, 4, 1, 1))])
def test_grouped_passes_equal_the_float64_references(fixed_point, shape, layout):
    errors = probe.pass_errors(probe.probe_inputs(*shape, DEVICE, fixed_point, seed=sum(shape)), layout)
    assert len(errors) == 7
    for name, error in errors.items():
        assert error < probe.CHECK_TOLERANCE, (name, error)


def test_check_mode_prints_each_error(capsys):
    probe.main(["--check"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("largest relative error" in line for line in lines)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="--vertices must be at least 1"):
        probe.main(["--vertices", "0"])


def test_register_counts_come_from_ptxas_without_a_gpu():
    """In a process of its own: the interpreter, which this one runs the kernels in without a GPU, cannot compile."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    program = ("import json; from scripts import grouped_passes_probe as probe; "
               "print(json.dumps(probe.register_counts(probe.GroupLayout(4, 512, 4, 1, 4))))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.splitlines()[-1])
    assert sorted(counts) == ["backward_fixed_point", "backward_float32", "forward_fixed_point", "forward_float32"]
    for usage in counts.values():
        assert 16 <= usage["registers"] <= 255 and usage["spill_store_bytes"] >= 0, usage


def test_register_counts_refuse_the_interpreter():
    if not fused._INTERPRETED:
        pytest.skip("this process compiles for its GPU")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"):
        probe.register_counts(probe.LAYOUTS[0])
