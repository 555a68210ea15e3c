"""The shared shell of the Newton-type optimizers (optim/_base.py): state dicts,
hyperparameter validation, the evaluation cache."""

from __future__ import annotations

import pytest
import torch

from newton_cases import (
    DT,
    EXACT,
    ResidualModel,
    contract,
    least_squares_closure,
    rosen,
    rosen_residual,
)
from second.optim import (
    GaussNewton,
    HessianFree,
    LiSSA,
    NewtonCG,
)

BAD = [
    (NewtonCG, dict(initial_radius=0.0)),
    (NewtonCG, dict(initial_radius=2.0, max_radius=1.0)),
    (NewtonCG, dict(eta=0.3)),
    (NewtonCG, dict(maxiter=0)),
    (NewtonCG, dict(cg_rtol=1.5)),
    (NewtonCG, dict(gtol=-1.0)),
    (NewtonCG, dict(preconditioner=3)),
    (GaussNewton, dict(damping=-1.0)),
    (GaussNewton, dict(damping=1e-20)),
    (GaussNewton, dict(solver="qr")),
    (GaussNewton, dict(eta=1.0)),
    (GaussNewton, dict(cg_maxiter=0)),
    (HessianFree, dict(damping=0.0)),
    (HessianFree, dict(curvature="fisher")),
    (HessianFree, dict(cg_decay=1.5)),
    (HessianFree, dict(boost=0.5)),
    (HessianFree, dict(drop=1.0)),
    (HessianFree, dict(max_line_search=-1)),
    (LiSSA, dict(lr=0.0)),
    (LiSSA, dict(depth=0)),
    (LiSSA, dict(scale=-1.0)),
    (LiSSA, dict(scale_margin=0.5)),
    (LiSSA, dict(damping=-1.0)),
]


def _make(cls, x0):
    """``(optimizer, its parameter, torch.optim's closure)`` on Rosenbrock (least squares for
    the Gauss-Newton-type optimizers, built from a model)."""
    if cls in (GaussNewton, HessianFree):
        model = ResidualModel(rosen_residual, x0)
        opt = cls(model)
        return opt, model.x, least_squares_closure(opt, model)
    x = torch.as_tensor(x0, dtype=DT).clone().requires_grad_(True)
    opt = cls([x], **({"depth": 20} if cls is LiSSA else {}))
    return opt, x, contract(opt, lambda: rosen(x))


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton, HessianFree, LiSSA])
def test_state_dict_round_trip(cls):
    x0 = [-1.2, 1.0] if cls is not LiSSA else [0.9, 0.8]  # LiSSA needs convexity
    opt, x, closure = _make(cls, x0)
    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    opt2, x2, closure2 = _make(cls, x.detach())
    opt2.load_state_dict(sd)
    s1, s2 = opt.state[x], opt2.state[x2]
    assert set(s1) == set(s2)
    for k in ("n_iter", "nfev", "ngev", "matvecs", "radius", "damping", "scale"):
        if k in s1:
            assert s1[k] == s2[k]
    assert opt2.param_groups[0] == {**opt.param_groups[0], "params": opt2.param_groups[0]["params"]}
    # the reloaded optimizer continues exactly like the original
    opt.step(closure)
    opt2.step(closure2)
    torch.testing.assert_close(x2.detach(), x.detach(), **EXACT)


@pytest.mark.parametrize(("cls", "kwargs"), BAD)
def test_bad_hyperparameters_raise(cls, kwargs):
    x = torch.ones(2, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError):
        cls([x], **kwargs)


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton, HessianFree, LiSSA])
def test_parameter_groups_and_missing_closure_raise(cls):
    a = torch.ones(2, dtype=DT, requires_grad=True)
    b = torch.ones(2, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="parameter groups"):
        cls([{"params": [a]}, {"params": [b]}])
    with pytest.raises(ValueError, match="closure"):
        cls([a]).step(None)


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton])
def test_a_new_closure_is_evaluated_afresh(cls):
    """Mini-batch use: a new closure object (new batch) is not served the cached evaluation."""
    g = torch.Generator().manual_seed(0)
    XA, XB = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, 3, generator=g, dtype=DT)
    yA, yB = torch.randn(20, 1, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    model = torch.nn.Linear(3, 1).to(DT)

    opt = cls(model.parameters() if cls is NewtonCG else model)

    def make(X, y):
        return contract(opt, lambda: torch.nn.functional.mse_loss(model(X), y))

    cA = make(XA, yA)
    opt.step(cA)
    opt.step(cA)  # same closure: reuses the accepted trial's evaluation
    nfev = opt.state[model.weight]["nfev"]
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model(XB), yB))
    opt.step(make(XB, yB))
    assert opt.history[-1]["loss"] == pytest.approx(expected, rel=1e-12)
    assert opt.state[model.weight]["nfev"] == nfev + 2  # fresh evaluation + one trial
