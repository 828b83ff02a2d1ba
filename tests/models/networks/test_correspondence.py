"""models/networks/correspondence.py: which warp --ot auto picks."""
import warnings

import pytest
import torch

from models.networks import correspondence


@pytest.fixture
def chosen(monkeypatch):
    """Record which warp the auto rules call instead of running it; C is 1 x 10 x 12 float32 = 480 bytes."""
    calls = []
    for name in ("stored", "chunked", "dense"):
        monkeypatch.setattr(correspondence, f"{name}_warp", lambda *inputs, name=name: calls.append(name))
    monkeypatch.setattr(correspondence, "STORED_WARP_MAX_BYTES", 500)
    return calls


def test_auto_on_a_gpu_stores_the_similarity_while_it_fits(chosen):
    theta, phi, points = torch.rand(1, 4, 10), torch.rand(1, 4, 12), torch.rand(1, 12, 3)
    with torch.no_grad():  # inference: C alone, 480 bytes, fits
        correspondence.stored_or_chunked_warp(theta, phi, points)
    correspondence.stored_or_chunked_warp(theta, phi, points)  # no input needs a gradient: still C alone
    correspondence.stored_or_chunked_warp(theta.requires_grad_(), phi, points)  # training: C and dL/dC, 960 bytes
    with torch.no_grad():
        correspondence.stored_or_chunked_warp(theta, phi, points)
    assert chosen == ["stored", "stored", "chunked", "stored"]


def test_auto_on_a_gpu_counts_the_float32_similarity_beside_its_fixed_point_copy(chosen, monkeypatch):
    """With half_dtype the stored warp forms C's int16 copy while the float32 C still lives: 6 bytes an element,
    inference or training (in backward, the int16 C and the half dL/dC take 4)."""
    theta, phi, points = torch.rand(1, 4, 10), torch.rand(1, 4, 12), torch.rand(1, 12, 3)
    with torch.no_grad():  # 1 x 10 x 12 x 6 = 720 bytes
        correspondence.stored_or_chunked_warp(theta, phi, points, torch.float16)
    monkeypatch.setattr(correspondence, "STORED_WARP_MAX_BYTES", 720)
    correspondence.stored_or_chunked_warp(theta.requires_grad_(), phi, points, torch.float16)
    assert chosen == ["chunked", "stored"]


def test_auto_on_the_cpu_runs_the_dense_warp_while_the_memory_available_holds_it(chosen, monkeypatch):
    """1 x 10 x 12 elements: the dense warp's 17 bytes each without a gradient (2040), 33 with one (3960)."""
    theta, phi, points = torch.rand(1, 4, 10), torch.rand(1, 4, 12), torch.rand(1, 12, 3)
    monkeypatch.setattr(correspondence, "available_memory", lambda: 2040)
    with torch.no_grad():
        correspondence.auto_warp(theta, phi, points)
    with pytest.warns(UserWarning, match=r"would take 0\.0 GiB, more than the 0\.0 GiB of memory available: it "
                                         r"runs block by block instead \(--ot chunked"):
        correspondence.auto_warp(theta.requires_grad_(), phi, points)
    monkeypatch.setattr(correspondence, "available_memory", lambda: None)  # a system that does not say
    correspondence.auto_warp(theta, phi, points)
    assert chosen == ["dense", "chunked", "dense"]


def test_auto_on_the_cpu_falls_back_to_the_same_values():
    """Where the dense warp would not fit, the chunked one gives its warp and gradients, with one warning."""
    generator = torch.Generator().manual_seed(7)
    theta, phi = (torch.nn.functional.normalize(torch.randn(2, 8, count, generator=generator), dim=1)
                  for count in (30, 26))
    points = torch.randn(2, 26, 3, generator=generator)
    results = []
    for memory in (None, 1):
        leaf = theta.clone().requires_grad_()
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patch.setattr(correspondence, "available_memory", lambda: memory)
            warp = correspondence.auto_warp(leaf, phi, points)
        assert len(caught) == (1 if memory else 0), [str(warning.message) for warning in caught]
        results.append((warp, torch.autograd.grad(warp.square().sum(), leaf)[0]))
    for name, dense, chunked in zip(("warp", "gradient"), *results):  # float32 sums in other orders
        assert ((chunked - dense).norm() / dense.norm()).item() < 1e-4, name


def test_available_memory_reads_linux_memavailable_or_says_nothing(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   23456789 kB\n")
    assert correspondence.available_memory(str(meminfo)) == 23456789 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")  # a kernel too old to say
    assert correspondence.available_memory(str(meminfo)) is None
    assert correspondence.available_memory(str(tmp_path / "absent")) is None  # not Linux


def _trained_mode_gradients(model: correspondence.Correspondence, identity_points, pose_points, upstream):
    warp_out, identity_features = model(identity_points, pose_points)
    loss = (warp_out * upstream).sum() + identity_features.square().mean()
    return (warp_out, identity_features), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("warp", ["dense", "stored"])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_half_precision_gradients_keep_the_float32_forward(warp, compiled):
    """half_dtype changes no forward value on the CPU (training mode included) but the stored warp's, whose C it
    keeps in 16-bit fixed point, and moves every parameter gradient only by half-precision rounding; compiled, the
    same holds (torch.compile traces the custom backward)."""
    torch.manual_seed(0)
    exact = correspondence.Correspondence(ngf=4, warp=correspondence.WARPS[warp])
    half = correspondence.Correspondence(ngf=4, warp=correspondence.WARPS[warp], half_dtype=torch.bfloat16)
    half.load_state_dict(exact.state_dict())
    if compiled:
        torch._dynamo.reset()
        half.compile_layers()
    generator = torch.Generator().manual_seed(1)
    identity_points, pose_points = (torch.rand(2, 3, 50, generator=generator) - 0.5 for _ in range(2))
    upstream = torch.randn(2, 50, 3, generator=generator)
    outputs_exact, grads_exact = _trained_mode_gradients(exact, identity_points, pose_points, upstream)
    outputs_half, grads_half = _trained_mode_gradients(half, identity_points, pose_points, upstream)
    (warp_half, features_half), (warp_exact, features_exact) = outputs_half, outputs_exact
    torch.testing.assert_close(features_half, features_exact, rtol=1e-5, atol=1e-5)  # compiled: float32 rounding
    if warp == "dense":
        torch.testing.assert_close(warp_half, warp_exact, rtol=1e-5, atol=1e-5)
    else:  # C rounded to steps of 1 / 32767 moves this warp by 8.8e-5 relative
        fixed_point_error = (torch.linalg.norm(warp_half - warp_exact) / torch.linalg.norm(warp_exact)).item()
        assert 0 < fixed_point_error < 3e-4, fixed_point_error
    total_exact = torch.cat([g.flatten() for g in grads_exact])
    total_half = torch.cat([g.flatten() for g in grads_half])
    error = (torch.linalg.norm(total_half - total_exact) / torch.linalg.norm(total_exact)).item()
    assert 0 < error < 2e-2, error


@pytest.mark.parametrize("pose_vertices", [50, 40])
def test_both_meshes_in_one_feature_pass_match_separate_passes(pose_vertices):
    """Meshes of one shape share a feature pass (concatenated along the batch); outputs and every parameter
    gradient equal those from one pass per mesh (which meshes of different sizes take) to float32 rounding."""
    torch.manual_seed(0)
    model = correspondence.Correspondence(ngf=4, warp=correspondence.WARPS["stored"])
    generator = torch.Generator().manual_seed(1)
    identity_points = torch.rand(2, 3, 50, generator=generator) - 0.5
    pose_points = torch.rand(2, 3, pose_vertices, generator=generator) - 0.5
    upstream = torch.randn(2, 50, 3, generator=generator)
    outputs, gradients = _trained_mode_gradients(model, identity_points, pose_points, upstream)

    def separate_passes(identity, pose):
        identity_features, pose_features = model.features(identity), model.features(pose)
        theta = correspondence.normalize_features(model.theta(identity_features))
        phi = correspondence.normalize_features(model.phi(pose_features))
        return model.warp(theta, phi, pose.transpose(1, 2)), identity_features

    model.forward = separate_passes
    expected_outputs, expected_gradients = _trained_mode_gradients(model, identity_points, pose_points, upstream)
    for actual, expected in zip([*outputs, *gradients], [*expected_outputs, *expected_gradients]):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
