"""The graph engines (second.func.graphs): a stale memoized gradient graph, and losses that
reach the parameters other than through the output of a Gauss-Newton product."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from second import exact_ggn
from second.func import gvp, hvp
from second.func.graphs import GGNGraph, bypassing_parameters

DT = torch.float64
EXACT = dict(rtol=1e-12, atol=1e-12)  # float64 products of a 2-4 parameter problem
BYPASS = "other than through the output"


def _tanh_loss():
    X = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=DT)
    W = torch.tensor([0.3, -0.2], dtype=DT, requires_grad=True)
    return X, W, torch.tanh(X @ W).sum()


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "list"])
def test_a_memoized_graph_after_an_in_place_parameter_change_raises(flat):
    """tanh(X @ W) saves X and the output, not W: autograd's own version check never fires,
    and the second product silently repeated the old point's Hessian."""
    X, W, loss = _tanh_loss()
    v = torch.tensor([1.0, 0.0], dtype=DT)
    vec = v if flat else [v]
    before = hvp(loss, [W], vec)
    again = hvp(loss, [W], vec)  # unchanged parameters: the memoized graph is reused
    torch.testing.assert_close(again, before, rtol=0, atol=0)
    with torch.no_grad():
        W.add_(1.0)
    with pytest.raises(ValueError, match="modified in place"):
        hvp(loss, [W], vec)
    fresh = hvp(torch.tanh(X @ W).sum(), [W], vec)  # a loss of the new point is fine
    assert not torch.allclose(torch.as_tensor(fresh), torch.as_tensor(before))


def test_gvp_after_an_in_place_parameter_change_raises():
    w = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    out = torch.tanh(3.0 * w)
    loss = (out**2).sum()
    gvp(loss, out, [w], torch.ones(2, dtype=DT))
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(ValueError, match="modified in place"):
        gvp(loss, out, [w], torch.ones(2, dtype=DT))


def _classifier(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (16,), generator=g)
    W = torch.randn(2, 3, generator=g, dtype=DT).requires_grad_(True)
    b = torch.zeros(2, dtype=DT, requires_grad=True)
    out = X @ W.T + b
    return out, y, [W, b]


def test_weight_decay_in_the_loss_is_reported():
    """CE + wd/2 ||W||^2: exact_ggn and gvp ignored the wd I term without a word."""
    out, y, params = _classifier()
    wd = 0.1
    ce = F.cross_entropy(out, y)
    loss = ce + 0.5 * wd * (params[0] ** 2).sum()
    assert bypassing_parameters(loss, out, params) == [0]
    assert bypassing_parameters(ce, out, params) == []
    with pytest.warns(UserWarning, match=BYPASS):
        G = exact_ggn(loss, out, params)
    with pytest.warns(UserWarning, match=BYPASS):
        gvp(loss, out, params, torch.ones(8, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the data term alone: no warning
        G_ce = exact_ggn(ce, out, params)
    torch.testing.assert_close(G, G_ce, **EXACT)  # what the warning says: wd I is left out


def test_a_loss_through_the_output_only_is_not_reported():
    out, y, params = _classifier()
    view = out.reshape(-1, 2)  # views and reductions between the loss and the output
    loss = F.cross_entropy(view, y) + (out.mean() ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GGNGraph(loss, out, params)


def test_an_output_the_loss_does_not_use_is_a_clear_error():
    """It raised torch's "appears to not have been used in the graph. Set allow_unused=True",
    an argument the caller cannot pass."""
    out, y, params = _classifier()
    X = torch.ones(4, 3, dtype=DT)
    other = X @ params[0].T + params[1]
    with pytest.raises(ValueError, match="does not use the output"):
        gvp(F.cross_entropy(out, y), other, params, torch.ones(8, dtype=DT))
    with pytest.raises(ValueError, match="does not use the output"):
        exact_ggn(F.cross_entropy(out, y), other, params)
