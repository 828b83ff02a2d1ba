"""Parity with the published code on the golden fixture (SPEC.md, "Parity fixture").

Tolerances are SPEC.md's: eval-mode warp_out and output within max |diff| 5e-4 and relative L2 5e-5;
training-mode losses within 1e-5 relative; gradient norms within 3e-4 relative (ill-conditioned through
Sinkhorn at temperature 0.03, so SPEC.md widens the core issue's 1e-4).
"""
import json
import math

import numpy as np
import pytest
import torch

from models.networks.correspondence import WARPS, Correspondence
from models.networks.ot import similarity_warp_stored
from models.pose_transfer_model import PoseTransferModel
from tests.golden import GOLDEN_DIR, golden_inputs, load_golden_model

pytestmark = pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason=f"golden fixture not found at {GOLDEN_DIR}")


@pytest.fixture(scope="module")
def expected():
    return json.loads((GOLDEN_DIR / "expected.json").read_text())


def assert_matches(actual: torch.Tensor, expected_path, name: str) -> None:
    expected = np.load(expected_path).astype(np.float64)
    actual = actual.detach().double().numpy().reshape(expected.shape)
    max_diff = np.abs(actual - expected).max()
    relative_l2 = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert max_diff < 5e-4 and relative_l2 < 5e-5, f"{name}: max |diff| {max_diff:.3g}, relative L2 {relative_l2:.3g}"


def test_eval_mode_outputs_match_published():
    model = load_golden_model(PoseTransferModel()).eval()
    batch = golden_inputs()
    with torch.no_grad():
        outputs = model.transfer(batch["identity_points"], batch["pose_points"])
    warp_out, fake_points = outputs["warp_out"], outputs["fake_points"]
    assert_matches(warp_out[0], GOLDEN_DIR / "expected_warp_out.npy", "warp_out")
    assert_matches(fake_points[0], GOLDEN_DIR / "expected_fake_points.npy", "fake_points")


def test_eval_mode_output_statistics(expected):
    model = load_golden_model(PoseTransferModel()).eval()
    batch = golden_inputs()
    with torch.no_grad():
        fake = model.transfer(batch["identity_points"], batch["pose_points"])["fake_points"].double()
    assert fake.abs().mean().item() == pytest.approx(expected["fake_points_abs_mean"], rel=1e-5)
    assert fake.std().item() == pytest.approx(expected["fake_points_std"], rel=1e-5)


def gradient_norm(network: torch.nn.Module) -> float:
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for _, p in network.named_parameters()))


def test_training_mode_losses_and_gradients(expected):
    model = load_golden_model(PoseTransferModel()).train()
    _, losses = model(golden_inputs())
    assert losses["rec"].item() == pytest.approx(expected["train_mode_rec_loss_x1000"], rel=1e-5)
    assert losses["edge"].item() == pytest.approx(expected["train_mode_edge_loss_x0.5"], rel=1e-5)
    (losses["rec"] + losses["edge"]).backward()
    assert gradient_norm(model.G) == pytest.approx(expected["grad_norm_G"], rel=3e-4)
    assert gradient_norm(model.corr) == pytest.approx(expected["grad_norm_Corr"], rel=3e-4)


@pytest.mark.parametrize("ot, fold_linear", [("chunked", False), ("dense", True),
                                             pytest.param("stored", True, marks=pytest.mark.slow)])
def test_fast_path_in_fp32_matches_published(ot, fold_linear):
    """The fast path's warps and folded generator (issue 4) keep SPEC.md's tolerance in float32."""
    model = load_golden_model(PoseTransferModel(ot=ot, fold_linear=fold_linear)).eval()
    batch = golden_inputs()
    with torch.no_grad():
        outputs = model.transfer(batch["identity_points"], batch["pose_points"])
    assert_matches(outputs["warp_out"][0], GOLDEN_DIR / "expected_warp_out.npy", "warp_out")
    assert_matches(outputs["fake_points"][0], GOLDEN_DIR / "expected_fake_points.npy", "fake_points")


@pytest.mark.parametrize("fold_linear", [False, True])
def test_fp16_generator_stays_within_one_percent_of_the_reference(fold_linear):
    """Mixed precision (issue 4), folded as --fold_linear auto does or not: the output within 1e-2
    relative L2 of the float32 reference."""
    batch = golden_inputs()
    with torch.no_grad():
        reference = load_golden_model(PoseTransferModel()).eval().transfer(
            batch["identity_points"], batch["pose_points"])["fake_points"]
        mixed = load_golden_model(PoseTransferModel(precision="fp16", fold_linear=fold_linear)).eval().transfer(
            batch["identity_points"], batch["pose_points"])["fake_points"]
    assert mixed.dtype == torch.float32
    assert (torch.linalg.norm(mixed - reference) / torch.linalg.norm(reference)).item() < 1e-2


def test_fixed_point_similarity_moves_the_warp_by_its_rounding_alone():
    """The mixed-precision stored warp keeps C in 16-bit fixed point (steps of 1 / 32767): warp_out stays within
    1e-4 relative L2 of the published one (3.5e-5 measured in float64), a hundredth of the mixed-precision bound."""
    model = load_golden_model(PoseTransferModel()).eval()
    model.corr.warp = lambda theta, phi, points, half_dtype: similarity_warp_stored(
        theta, phi, points, torch.float16, similarity_bound=1.0, fixed_point=True)
    batch = golden_inputs()
    with torch.no_grad():
        warp_out = model.transfer(batch["identity_points"], batch["pose_points"])["warp_out"][0].double()
    expected = torch.from_numpy(np.load(GOLDEN_DIR / "expected_warp_out.npy")).double().reshape(warp_out.shape)
    error = (torch.linalg.norm(warp_out - expected) / torch.linalg.norm(expected)).item()
    assert 1e-5 < error < 1e-4, error


def _corr_gradient(model: PoseTransferModel) -> torch.Tensor:
    model.train()
    _, losses = model(golden_inputs())
    sum(losses.values()).backward()
    return torch.cat([p.grad.flatten() for p in model.corr.parameters()])


@pytest.mark.slow  # three ngf-64 models in CPU half-precision autocast: about 33 s each precision
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_corr_backward_adds_little_to_the_generators_rounding(precision):
    """--precision fp16/bf16 runs Corr's backward products in half precision (its forward stays float32).
    Its gradient then differs from the float32 reference's mostly through the generator's autocast
    (measured 2.7% relative L2 with fp16, 7.9% with bf16); the half-precision products add at most a
    twentieth of that."""
    reference = _corr_gradient(load_golden_model(PoseTransferModel(ot="dense")))
    mixed_model = load_golden_model(PoseTransferModel(ot="dense", precision=precision, fold_linear=True))
    assert mixed_model.corr.half_dtype == mixed_model.generator_dtype
    mixed = _corr_gradient(mixed_model)
    float32_corr_model = PoseTransferModel(ot="dense", precision=precision, fold_linear=True)
    float32_corr_model.corr = Correspondence(warp=WARPS["dense"])  # the same, but Corr's backward in float32
    float32_corr = _corr_gradient(load_golden_model(float32_corr_model))

    def error(gradient: torch.Tensor) -> float:
        return (torch.linalg.norm(gradient - reference) / torch.linalg.norm(reference)).item()

    assert error(float32_corr) < 0.1
    assert abs(error(mixed) - error(float32_corr)) < 0.05 * error(float32_corr)
    assert not torch.equal(mixed, float32_corr)  # the half-precision products did run
