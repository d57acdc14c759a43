"""Divergences and likelihoods under torch.inference_mode (Lightning's validate/test/predict)."""

import pytest
import torch

from fm_lightning.flow.likelihood import exact_divergence, hutchinson_divergence, log_likelihood
from fm_lightning.nets.mlp import MLP

A = torch.tensor([[0.5, -1.0, 0.0], [2.0, -0.25, 1.0], [0.0, 3.0, 1.5]])


def _linear(x, t):
    """v = A x, whose divergence is tr(A) = 1.75 everywhere."""
    return x @ A.T


def test_divergences_under_inference_mode_match_the_trace():
    with torch.inference_mode():  # inference tensors, as Lightning's validate batches are
        x, t = torch.randn(4, 3), torch.rand(4)
        probe = torch.ones(4, 3)  # eps^T A eps = sum(A) for the all-ones probe
        v, div = exact_divergence(_linear, x, t)
        _, est = hutchinson_divergence(_linear, x, t, probe)
    torch.testing.assert_close(v, x @ A.T)
    torch.testing.assert_close(div, torch.full((4,), 1.75))
    torch.testing.assert_close(est, torch.full((4,), float(A.sum())))


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_log_likelihood_under_inference_mode_equals_no_grad(divergence):
    torch.manual_seed(0)
    net, x = MLP(2, 16, 2), torch.randn(8, 2)

    def run():
        return log_likelihood(net, x, lambda z: -0.5 * z.square().sum(1), "euler", 4, divergence=divergence,
                              generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        ref = run()
    with torch.inference_mode():
        x = x.clone()  # an inference tensor
        out = run()
    torch.testing.assert_close(out.log_prob, ref.log_prob, rtol=0, atol=0)
    torch.testing.assert_close(out.x0, ref.x0, rtol=0, atol=0)
    assert out.nfe == ref.nfe == 4
