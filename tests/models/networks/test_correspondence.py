"""models/networks/correspondence.py: which warp --ot auto picks."""
import pytest
import torch

from models.networks import correspondence


@pytest.fixture
def chosen(monkeypatch):
    """Record which warp auto_warp calls instead of running it; C is 1 x 10 x 12 float32 = 480 bytes."""
    calls = []
    monkeypatch.setattr(correspondence, "stored_warp", lambda *inputs: calls.append("stored"))
    monkeypatch.setattr(correspondence, "sinkhorn_warp_chunked", lambda *inputs: calls.append("chunked"))
    monkeypatch.setattr(correspondence, "STORED_WARP_MAX_BYTES", 500)
    return calls


def test_auto_stores_the_similarity_while_it_fits(chosen):
    theta, phi, points = torch.rand(1, 4, 10), torch.rand(1, 4, 12), torch.rand(1, 12, 3)
    with torch.no_grad():  # inference: C alone, 480 bytes, fits
        correspondence.auto_warp(theta, phi, points)
    correspondence.auto_warp(theta, phi, points)  # no input needs a gradient: still C alone
    correspondence.auto_warp(theta.requires_grad_(), phi, points)  # training: C and dL/dC, 960 bytes
    with torch.no_grad():
        correspondence.auto_warp(theta, phi, points)
    assert chosen == ["stored", "stored", "chunked", "stored"]
