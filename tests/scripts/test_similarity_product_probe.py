"""scripts/similarity_product_probe.py: C's split product with the fixed-point column pass in its epilogue, against C
in float64 and against the product and column pass it would replace (on a GPU, or in Triton's interpreter, which the
root conftest.py selects without one), at tiles that leave partial row, column and contraction blocks; its refusals,
its --check mode and its registers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.networks.layers import aligned, split_operands
from models.networks.ot import fused
from scripts import similarity_product_probe as probe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_UNAVAILABLE = fused.unsupported_reason(torch.empty(1, 1, 1, device=DEVICE))
requires_kernels = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))


@requires_kernels
@pytest.mark.parametrize("shape, channels, tile", [((2, 37, 45), 24, probe.ProductTile(16, 16, 16, 4, 1, 2)),
                                                    ((1, 70, 20), 16, probe.ProductTile(32, 16, 16, 4, 2, 1)),
                                                    ((3, 17, 33), 40, probe.ProductTile(16, 32, 32, 2, 1, 3)),
                                                    ((1, 5, 3), 8, probe.ProductTile(16, 16, 16, 4, 1, 8))])
def test_fused_product_rounds_and_sums_as_the_references(shape, channels, tile):
    theta_rows, pose_phi, left, right = probe.probe_operands(*shape, DEVICE, channels=channels, seed=sum(shape))
    errors = probe.product_errors(theta_rows, pose_phi, left, right, tile=tile)
    probe.check(errors)
    # A C within rounding of a level's boundary may round to either side; few do.
    assert errors["two_pass_level_mismatches"] <= 0.01 * shape[0] * shape[1] * shape[2] + 1, errors


@requires_kernels
def test_fixed_point_rows_are_zero_past_m_and_sums_cover_every_row():
    theta_rows, pose_phi, _, _ = probe.probe_operands(2, 20, 13, DEVICE, channels=16)
    theta_rows[:, 16:] = pose_phi[..., :4].transpose(1, 2)  # C = 1 at (16 + m, m), rows of the second row tile
    left, right = split_operands(theta_rows, pose_phi)
    tile = probe.ProductTile(16, 16, 16, 4, 1, 1)
    fixed_point, column_sum = probe.fixed_point_product(left, right, 13, probe.SINKHORN_EPSILON, tile)
    padded = torch.as_strided(fixed_point, (2, 20, aligned(13)), fixed_point.stride())
    assert fixed_point.shape == (2, 20, 13) and padded.dtype == torch.int16
    assert (padded[..., 13:] == 0).all() and (padded[..., :13] != 0).any()
    terms = torch.exp((fixed_point.double() * probe.SIMILARITY_STEP - 1) / probe.SINKHORN_EPSILON)
    torch.testing.assert_close(column_sum.double(), terms.sum(1), rtol=probe.CHECK_TOLERANCE, atol=0)
    assert (terms[:, 16:, :4].sum(1) > terms[:, :16, :4].sum(1)).all()  # where the second tile's rows dominate


@requires_kernels
def test_wrong_operands_are_refused():
    _, _, left, right = probe.probe_operands(1, 4, 6, DEVICE, channels=16)
    with pytest.raises(ValueError, match="contiguous float16 left"):
        probe.fixed_point_product(left.float(), right, 6, probe.SINKHORN_EPSILON)
    with pytest.raises(ValueError, match=r"right \(B, K, 8\)"):
        probe.fixed_point_product(left, right[..., :6].contiguous(), 6, probe.SINKHORN_EPSILON)


@requires_kernels
def test_check_mode_prints_the_errors(capsys):
    probe.main(["--check"])
    line, = capsys.readouterr().out.splitlines()
    errors = json.loads(line.removeprefix("fused product: "))
    assert errors["two_pass_largest_level_difference"] <= 1


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="--vertices must be at least 1"):
        probe.main(["--vertices", "0"])


@pytest.mark.skipif(fused.triton is None, reason="needs triton")
def test_default_tile_compiles_to_hopper_tensor_core_products_without_spills():
    """The default tile for sm_90a: wgmma products, and no spills. In a process of its own: the interpreter, which this
    one may run the kernels in, cannot compile."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    program = ("import json; from scripts import similarity_product_probe as probe; "
               "from util.triton_offline import hopper_ptx, ptxas_usage; tile = probe.TILES[0]; "
               "ptx = hopper_ptx(probe._fixed_point_product_kernel, '*fp32', {'BLOCK_ROWS': tile.block_rows, "
               "'BLOCK_COLUMNS': tile.block_columns, 'BLOCK_CONTRACTION': tile.block_contraction, "
               "'GROUP_TILES': tile.group_tiles, 'NUM_STAGES': tile.stages}, tile.num_warps); "
               "print(json.dumps({**ptxas_usage(ptx), 'wgmma': ptx.count('wgmma.mma_async')}))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    usage = json.loads(done.stdout.splitlines()[-1])
    assert usage["wgmma"] > 0 and usage["spill_store_bytes"] == 0, usage
