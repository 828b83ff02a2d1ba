"""Tests for models/networks/npt.py: NPT's published state_dict, its forward against a naive reference
written from ../shared/reference/NPT.md, and the invariances that instance norm and 1x1 convs imply.

Invariance and reference comparisons run in float64 so that a tolerance of 1e-9 separates a property that
holds (errors ~1e-13) from one that does not (differences ~1e-3 and above).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from models.networks.npt import NPT, NPT_VARIANTS, SPAdaIN, init_npt_weights

EXACT = 1e-9
EPS = 1e-5


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """The 68 tensors NPT.md lists: every conv has .weight (out, in, 1) and .bias (out,)."""
    convs = {f"encoder.conv{k}": (c_in, c_out) for k, (c_in, c_out) in enumerate([(3, 64), (64, 128), (128, 1024)], 1)}
    convs.update({f"decoder.conv{k}": (c_in, c_out)
                  for k, (c_in, c_out) in enumerate([(1027, 1027), (1027, 513), (513, 256), (256, 3)], 1)})
    for k, channels in enumerate([1027, 513, 256], 1):
        block = f"decoder.spadain_block{k}"
        convs.update({f"{block}.{name}": (channels, channels) for name in ("conv1", "conv2", "conv_res")})
        convs.update({f"{block}.{norm}.{part}": (3, channels)
                      for norm in ("spadain1", "spadain2", "spadain_res") for part in ("conv_weight", "conv_bias")})
    shapes = {}
    for name, (c_in, c_out) in convs.items():
        shapes[f"{name}.weight"] = (c_out, c_in, 1)
        shapes[f"{name}.bias"] = (c_out,)
    return shapes


def _network(variant: str, seed: int = 0) -> NPT:
    torch.manual_seed(seed)
    network = NPT(variant).double()
    init_npt_weights(network)
    return network


def _points(batch: int, count: int, seed: int) -> torch.Tensor:
    """Float64 channel-first points (B, 3, count), roughly the published centred-body scale."""
    return torch.randn(batch, 3, count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _naive_conv(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv written as a per-vertex matrix product."""
    return torch.einsum("oi,bin->bon", state[f"{name}.weight"][:, :, 0], x) + state[f"{name}.bias"][None, :, None]


def _naive_instance_norm(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=2, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=2, keepdim=True)
    return (x - mean) / torch.sqrt(variance + EPS)


def _naive_spadain(state, name: str, x: torch.Tensor, xyz: torch.Tensor, normalize: bool) -> torch.Tensor:
    h = _naive_instance_norm(x) if normalize else x
    return _naive_conv(state, f"{name}.conv_weight", xyz) * h + _naive_conv(state, f"{name}.conv_bias", xyz)


def _naive_npt(state, pose: torch.Tensor, identity: torch.Tensor, variant: str) -> torch.Tensor:
    """NPT.md's description, step by step, from the state_dict alone."""
    x = pose
    for k in (1, 2, 3):
        x = torch.relu(_naive_instance_norm(_naive_conv(state, f"encoder.conv{k}", x)))
    if variant == "maxpool":
        x = x.max(dim=2, keepdim=True).values.repeat(1, 1, identity.shape[2])
    x = torch.cat([x, identity], dim=1)
    for k in (1, 2, 3):
        x = _naive_conv(state, f"decoder.conv{k}", x)
        block = f"decoder.spadain_block{k}"
        normalize = not (variant == "maxpool" and k == 1)

        def step(h, norm, conv):
            return _naive_conv(state, f"{block}.{conv}", torch.relu(_naive_spadain(state, f"{block}.{norm}", h,
                                                                                     identity, normalize)))
        x = step(step(x, "spadain1", "conv1"), "spadain2", "conv2") + step(x, "spadain_res", "conv_res")
    return 2 * torch.tanh(_naive_conv(state, "decoder.conv4", x))


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_state_dict_has_exactly_the_published_keys_and_shapes(variant):
    ours = {key: tuple(value.shape) for key, value in NPT(variant).state_dict().items()}
    assert len(ours) == 68
    assert ours == _expected_shapes()


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_parameter_counts_match_the_published_model(variant):
    network = NPT(variant)

    def count(module):
        return sum(p.numel() for p in module.parameters())
    assert count(network) == 6_054_941
    assert (count(network.encoder), count(network.decoder)) == (140_672, 5_914_269)
    decoder = network.decoder
    parts = [decoder.conv1, decoder.spadain_block1, decoder.conv2, decoder.spadain_block2, decoder.conv3,
             decoder.spadain_block3, decoder.conv4]
    assert [count(p) for p in parts] == [1_055_756, 3_191_916, 527_364, 803_358, 131_584, 203_520, 771]


def test_unknown_variant_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="original, maxpool"):
        NPT("max_pool")


@pytest.mark.parametrize("channels, count, normalize", list(itertools.product([1, 5, 16], [2, 9], [True, False])))
def test_spadain_equals_its_definition(channels, count, normalize):
    torch.manual_seed(channels * count)
    module = SPAdaIN(channels, normalize).double()
    generator = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(2, channels, count, generator=generator, dtype=torch.float64) + 1.5  # (B, C, N)
    xyz = _points(2, count, 2)
    expected = _naive_spadain({f"s.{k}": v for k, v in module.state_dict().items()}, "s", x, xyz, normalize)
    torch.testing.assert_close(module(x, xyz), expected, rtol=0, atol=EXACT)


@pytest.mark.parametrize("variant, num_pose, num_identity",
                         [("original", 6, 6), ("original", 11, 11), ("maxpool", 6, 6), ("maxpool", 4, 9),
                          ("maxpool", 13, 5)])
def test_forward_equals_the_naive_reference(variant, num_pose, num_identity):
    network = _network(variant)
    pose, identity = _points(2, num_pose, 1), _points(2, num_identity, 2)
    expected = _naive_npt(network.state_dict(), pose, identity, variant)
    torch.testing.assert_close(network(pose, identity), expected, rtol=0, atol=EXACT)


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_output_has_the_identity_shape_and_lies_in_the_tanh_range(variant):
    torch.manual_seed(0)
    network = NPT(variant)  # float32, PyTorch's default init: larger activations than N(0, 0.02)
    identity = _points(3, 10, 1).float()
    output = network(5 * _points(3, 10, 2).float(), identity)
    assert output.shape == (3, 3, 10) and output.dtype == torch.float32
    assert output.abs().max() < 2 and output.std() > 0


def test_original_variant_refuses_differing_vertex_counts():
    network = NPT("original")
    with pytest.raises(ValueError, match=r"got 7 pose and 9 identity vertices; use --npt_variant maxpool"):
        network(torch.randn(1, 3, 7), torch.randn(1, 3, 9))


@pytest.mark.parametrize("num_pose, num_identity", [(2, 8), (8, 3), (17, 17)])
def test_maxpool_variant_accepts_any_vertex_counts(num_pose, num_identity):
    output = NPT("maxpool")(torch.randn(2, 3, num_pose), torch.randn(2, 3, num_identity))
    assert output.shape == (2, 3, num_identity) and torch.isfinite(output).all()


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_output_ignores_the_pose_mesh_translation(variant):
    # encoder.conv1(pose + t) adds W t to every vertex alike, and the first instance norm removes it.
    network = _network(variant)
    pose, identity = _points(2, 8, 1), _points(2, 8, 2)
    shifted = pose + torch.tensor([3.0, -1.5, 0.7], dtype=torch.float64)[None, :, None]
    torch.testing.assert_close(network(shifted, identity), network(pose, identity), rtol=0, atol=EXACT)


def test_output_depends_on_the_identity_translation():
    # SPAdaIN's gamma and beta are affine in the raw identity xyz, so no such invariance holds there.
    network = _network("original")
    pose, identity = _points(1, 8, 1), _points(1, 8, 2)
    change = network(pose, identity + 0.5) - network(pose, identity)
    assert change.abs().max() > 1e-4


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_permuting_both_meshes_alike_permutes_the_output(variant):
    # Every conv is per-vertex and instance-norm statistics ignore vertex order.
    network = _network(variant)
    pose, identity = _points(2, 9, 1), _points(2, 9, 2)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    output = network(pose[:, :, order], identity[:, :, order])
    torch.testing.assert_close(output, network(pose, identity)[:, :, order], rtol=0, atol=EXACT)


def test_maxpool_output_ignores_the_pose_vertex_order():
    network = _network("maxpool")
    pose, identity = _points(2, 9, 1), _points(2, 6, 2)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(network(pose[:, :, order], identity), network(pose, identity), rtol=0, atol=EXACT)


def test_original_output_depends_on_how_pose_vertices_pair_with_identity_vertices():
    # Pose feature i is concatenated with identity vertex i: reordering only the pose changes the result.
    network = _network("original")
    pose, identity = _points(1, 9, 1), _points(1, 9, 2)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    assert (network(pose[:, :, order], identity) - network(pose, identity)).abs().max() > 1e-4


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_samples_of_a_batch_do_not_interact(variant):
    network = _network(variant)
    pose, identity = _points(3, 7, 1), _points(3, 7, 2)
    together = network(pose, identity)
    for b in range(3):
        torch.testing.assert_close(together[b:b + 1], network(pose[b:b + 1], identity[b:b + 1]), rtol=0, atol=EXACT)


@pytest.mark.parametrize("variant", NPT_VARIANTS)
def test_train_and_eval_modes_give_the_same_output(variant):
    # Instance norm without running statistics, no dropout: nothing depends on the mode.
    network = _network(variant)
    pose, identity = _points(2, 7, 1), _points(2, 7, 2)
    trained = network.train()(pose, identity)
    assert torch.equal(network.eval()(pose, identity), trained)
    assert not list(network.buffers())


def test_init_draws_conv_weights_from_normal_0_002_and_keeps_the_biases():
    torch.manual_seed(0)
    network = NPT("original")
    before = {key: value.clone() for key, value in network.state_dict().items()}
    init_npt_weights(network)
    after = network.state_dict()
    weights = torch.cat([after[key].flatten() for key in after if key.endswith(".weight")])
    assert weights.numel() == 6_054_941 - sum(after[key].numel() for key in after if key.endswith(".bias"))
    assert abs(weights.mean().item()) < 1e-4 and abs(weights.std().item() - 0.02) < 1e-4
    for key in after:
        assert torch.equal(after[key], before[key]) == key.endswith(".bias"), key
    # Each layer separately, not only the pool: the largest and a small one.
    for key in ("decoder.conv1.weight", "encoder.conv2.weight"):
        assert abs(after[key].std().item() - 0.02) < 0.002, key
