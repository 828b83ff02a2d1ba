"""scripts/plan_passes_probe.py: the final softmax's warp and column sums as grouped Triton kernels, against stored.py's
passes in float64 (on a GPU, or in Triton's interpreter, which the root conftest.py selects without one), at layouts
that leave partial groups, partial chunks and programs of unequal rows; its --check mode and its registers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.networks.ot import fused
from scripts import plan_passes_probe as probe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_UNAVAILABLE = fused.unsupported_reason(torch.empty(1, 1, 1, device=DEVICE))
requires_kernels = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))


@requires_kernels
@pytest.mark.parametrize("fixed_point", [False, True])
@pytest.mark.parametrize("shape, layout", [((2, 37, 45), fused.PassLayout(4, 16, 4, 1, 1)),
                                           ((1, 20, 70), fused.PassLayout(8, 32, 4, 2, 1)),
                                           ((3, 9, 16), fused.PassLayout(2, 16, 2, 1, 1)),
                                           ((1, 5, 3), probe.LAYOUTS[0])])
def test_plan_kernels_equal_the_float64_references(fixed_point, shape, layout):
    errors = probe.pass_errors(probe.probe_inputs(*shape, DEVICE, fixed_point, seed=sum(shape)), layout)
    assert sorted(errors) == ["column_sums", "total", "warp"]
    for name, error in errors.items():
        assert error < probe.CHECK_TOLERANCE, (name, error)


@requires_kernels
def test_check_mode_prints_each_error(capsys):
    probe.main(["--check"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("largest relative error" in line for line in lines)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="--vertices must be at least 1"):
        probe.main(["--vertices", "0"])


@requires_kernels
def test_inputs_of_the_wrong_shape_are_refused():
    inputs = probe.probe_inputs(1, 4, 6, DEVICE, fixed_point=False)
    with pytest.raises(ValueError, match=r"pose_points must have shape \(1, 6, 3\)"):
        probe.plan_warp(inputs["similarity"], inputs["log_b"], inputs["pose_points"][:, :5], inputs["shift"],
                        probe.EPSILON)
    with pytest.raises(ValueError, match=r"row_weights must have shape \(1, 4, 4\)"):
        probe.plan_column_sums(inputs["similarity"], inputs["log_b"], inputs["shift"], inputs["row_weights"][..., :3],
                               probe.EPSILON)


@pytest.mark.skipif(fused.triton is None, reason="needs triton")
def test_default_layout_lets_two_programs_share_an_sm():
    """Both kernels at LAYOUTS[0] take at most 65,536 / (programs_per_sm x threads) registers a thread for sm_90a and
    spill nothing, on either form of C. In a process of its own: the interpreter, which this one may run the kernels
    in, cannot compile."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    program = ("import json; from scripts import plan_passes_probe as probe; "
               "from util.triton_offline import hopper_ptx, ptxas_usage; layout = probe.LAYOUTS[0]; "
               "constants = {'GROUP_ROWS': layout.group_rows, 'CHUNK_LANES': layout.chunk_lanes, "
               "'NUM_STAGES': layout.stages}; "
               "print(json.dumps([ptxas_usage(hopper_ptx(kernel, c_type, constants, layout.num_warps)) "
               "for kernel in (probe._plan_warp_kernel, probe._plan_column_kernel) for c_type in ('*fp32', '*i16')]))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    layout = probe.LAYOUTS[0]
    budget = 65536 // (layout.programs_per_sm * 32 * layout.num_warps)
    for usage in json.loads(done.stdout.splitlines()[-1]):
        assert usage["registers"] <= budget and usage["spill_store_bytes"] == 0, usage
