"""The counted objective of the Newton core (second.newton.objective): an objective with no
autograd path to x is an error, never a zero gradient; one that ignores some coordinates is not."""

from __future__ import annotations

import pytest
import torch

from second import minimize
from second.newton import Objective
from second.newton.objective import NO_GRAPH, gradient_or_raise

DT = torch.float64
EXACT_GRAD = dict(rtol=0.0, atol=0.0)  # the gradient of a polynomial at integers is exact
SOLUTION_TOL = 1e-8  # max abs error of a converged run's solution (gtol 1e-6, H = 2)

NO_PATH = "does not depend on x through autograd"

DETACHED = {
    "x.detach()": lambda x: ((x.detach() - 1) ** 2).sum(),
    ".item() round trip": lambda x: torch.tensor(((x - 1) ** 2).sum().item(), dtype=DT),
    "under no_grad": lambda x: _no_grad(lambda: ((x - 1) ** 2).sum()),
    "a constant": lambda x: torch.tensor(3.0, dtype=DT),
}


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def test_the_message_names_the_cause():
    assert NO_PATH in NO_GRAPH and "detach" in NO_GRAPH and "item" in NO_GRAPH


@pytest.mark.parametrize("name", list(DETACHED))
def test_objective_without_a_graph_raises(name):
    obj = Objective(DETACHED[name], (3,))
    with pytest.raises(ValueError, match=NO_PATH):
        obj.value_grad(torch.zeros(3, dtype=DT))


@pytest.mark.parametrize("method", ["auto", "newton-cg", "newton-exact"])
@pytest.mark.parametrize("name", list(DETACHED))
def test_minimize_refuses_an_objective_without_a_graph(name, method):
    """It was reported converged at x0 (the missing gradient was taken as zero)."""
    with pytest.raises(ValueError, match=NO_PATH):
        minimize(DETACHED[name], torch.zeros(3, dtype=DT), method=method)


def test_minimize_refuses_an_objective_of_other_tensors_only():
    w = torch.ones(3, dtype=DT, requires_grad=True)  # a graph, but not to x
    with pytest.raises(ValueError, match=NO_PATH):
        minimize(lambda x: (w**2).sum() + 0 * x.sum().item(), torch.zeros(3, dtype=DT))


@pytest.mark.parametrize("method", ["auto", "newton-cg", "newton-exact"])
def test_coordinates_the_objective_ignores_get_zero_gradient(method):
    """A graph that reaches x at all: zeros for the coordinates f does not depend on."""
    res = minimize(lambda x: (x[0] - 2.0) ** 2, torch.zeros(3, dtype=DT), method=method)
    assert res.converged
    torch.testing.assert_close(
        res.x, torch.tensor([2.0, 0.0, 0.0], dtype=DT), rtol=0, atol=SOLUTION_TOL
    )


def test_gradient_or_raise_keeps_zeros_for_unused_coordinates():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=DT, requires_grad=True)
    g = gradient_or_raise((x[1] ** 2).reshape(()), x)
    torch.testing.assert_close(g, torch.tensor([0.0, 4.0, 0.0], dtype=DT), **EXACT_GRAD)
    with pytest.raises(ValueError, match=NO_PATH):
        gradient_or_raise(x.detach().sum(), x)


def _mlp_objective():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)

    def f(w):
        h = torch.tanh(X @ w[:12].reshape(3, 4))
        return 0.5 * ((h @ w[12:16] - y) ** 2).mean()

    return f, torch.randn(16, generator=g, dtype=DT)


def test_products_and_gradients_equal_torch_autograd_bitwise():
    """The Objective calls the autograd engine as torch.autograd.grad does: the same numbers."""
    f, w = _mlp_objective()
    obj = Objective(f, w.shape)
    fw, g, hvp = obj.value_grad(w, graph=True)
    wr = w.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(f(wr), wr, create_graph=True)
    v = torch.randn(16, generator=torch.Generator().manual_seed(1), dtype=DT)
    (hv_ref,) = torch.autograd.grad(g_ref, wr, v, retain_graph=True)
    torch.testing.assert_close(g, g_ref.detach(), **EXACT_GRAD)
    torch.testing.assert_close(hvp(v), hv_ref, **EXACT_GRAD)
    assert not hvp(v).requires_grad and obj.matvecs == 2 and obj.ngev == 1
    # a vector of another shape takes torch.autograd.grad's own path (and its checks)
    with pytest.raises(RuntimeError):
        hvp(torch.ones(3, dtype=DT))


def test_newton_cg_under_no_grad_is_the_same_run():
    """The products and gradients need no grad mode of the caller's."""
    f, w = _mlp_objective()
    res = minimize(f, w.clone(), method="newton-cg", gtol=1e-10)
    with torch.no_grad():
        quiet = minimize(f, w.clone(), method="newton-cg", gtol=1e-10)
    assert res.converged and (res.nit, res.matvecs) == (quiet.nit, quiet.matvecs)
    torch.testing.assert_close(quiet.x, res.x, **EXACT_GRAD)


def test_without_torchs_private_engine_call_the_run_is_the_same(monkeypatch):
    """A torch without the engine entry points takes torch.autograd.grad: the same run."""
    import second.newton.objective as objective

    f, w = _mlp_objective()
    res = minimize(f, w.clone(), method="newton-cg", gtol=1e-10)
    monkeypatch.setattr(objective, "_ENGINE", None)
    monkeypatch.setattr(objective, "_RUN_BACKWARD", None)
    public = minimize(f, w.clone(), method="newton-cg", gtol=1e-10)
    assert res.converged and (res.nit, res.matvecs) == (public.nit, public.matvecs)
    torch.testing.assert_close(public.x, res.x, **EXACT_GRAD)
