"""PointwiseConv1d computes exactly what nn.Conv1d(kernel_size=1) does, with the same state_dict."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import spectral_norm

from models.networks.layers import PointwiseConv1d


@pytest.mark.parametrize("batch, channels_in, channels_out, vertices, bias",
                         list(itertools.product([1, 3], [1, 5], [2, 7], [1, 11], [True, False])))
def test_equals_conv1d(batch, channels_in, channels_out, vertices, bias):
    torch.manual_seed(batch + channels_in + channels_out + vertices)
    layer = PointwiseConv1d(channels_in, channels_out, bias=bias).double()
    x = torch.randn(batch, channels_in, vertices, dtype=torch.float64, requires_grad=True)
    expected = F.conv1d(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert list(layer.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    assert layer.weight.shape == (channels_out, channels_in, 1)


def test_spectral_norm_keys_and_values_match_conv1d():
    torch.manual_seed(0)
    ours = spectral_norm(PointwiseConv1d(4, 6))
    reference = spectral_norm(torch.nn.Conv1d(4, 6, 1))
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 9)
    torch.testing.assert_close(ours(x), reference(x))
    assert list(ours.state_dict()) == ["bias", "weight_orig", "weight_u", "weight_v"]
