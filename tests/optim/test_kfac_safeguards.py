"""KFAC's safeguards: refused quadratic-model steps, damping bounds, taken-back steps, counters.

The non-finite batches (NaN and overflowing inputs, every Fisher type) are in
tests/faults/test_fault_optim.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import second
import second.optim._kfac_update as kfac_module
from kfac_cases import DT, closure_of, tanh_net
from second import KFACOperator, exact_ggn

OPTIM_TOL = dict(rtol=1e-6, atol=1e-8)  # optimizer update vs the operator's inverse (float64)

BAD_MODELS = {  # (alpha, mu, predicted change) a broken quadratic model could return
    "negative-lr": (-0.0026, 0.0, -1.0),
    "negative-momentum": (0.5, -22.3, -1.0),
    "nan": (math.nan, math.nan, math.nan),
    "inf-lr": (math.inf, 0.0, -math.inf),
    "wrong-sign-prediction": (0.5, 0.1, 0.3),
}


def _problem():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    return model, loss_fn, X, y


def _direction(model, loss_fn, X, y, lam):
    """``Delta = -M g`` (the operator's pi-damped inverse), the GGN and the gradient, dense."""
    M = KFACOperator(model, loss_fn, (X, y), fisher="type2").inverse(damping=lam, pi_damping=True)
    out = model(X)
    loss = loss_fn(out, y)
    params = list(model.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, retain_graph=True)])
    return -(M @ g), exact_ggn(loss, out, params), g


def _bad_model(case):
    real = kfac_module.step_coefficients

    def coefficients(Fq, nrm, gV, damping, weight_decay, momentum):
        if momentum is None:  # the optimizer's own solve: broken
            return BAD_MODELS[case]
        return real(Fq, nrm, gV, damping, weight_decay, momentum)

    return coefficients


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_a_bad_quadratic_model_is_refused_for_its_step_without_momentum(case, monkeypatch):
    model, loss_fn, X, y = _problem()
    lam = 0.1
    Delta, Gd, g = _direction(model, loss_fn, X, y, lam)
    alpha = float(-(g @ Delta) / (Delta @ Gd @ Delta + lam * Delta @ Delta))
    theta0 = second.parameters_to_vector(model.parameters()).detach()
    monkeypatch.setattr(kfac_module, "step_coefficients", _bad_model(case))
    opt = second.optim.KFAC(model, loss_fn, damping=lam, fisher="type2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure_of(opt, model, loss_fn, X, y))
    said = "refused and replaced by the quadratic model's step"
    [refused] = [w for w in caught if said in str(w.message)]
    assert issubclass(refused.category, RuntimeWarning)
    assert refused.filename == __file__  # the opt.step line, not torch's step decorator
    assert opt.counters == {"n_skipped_steps": 0, "n_refused_steps": 1}
    assert opt.last_info["refused"]
    assert opt.last_info["alpha"] == pytest.approx(alpha, rel=1e-8)
    assert opt.last_info["mu"] == 0.0
    torch.testing.assert_close(
        second.parameters_to_vector(model.parameters()).detach(),
        theta0 + alpha * Delta,
        **OPTIM_TOL,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second refusal is only counted
        opt.step(closure_of(opt, model, loss_fn, X, y))
    assert opt.counters["n_refused_steps"] == 2


def test_a_broken_curvature_gives_the_kl_clipped_step_and_more_damping(monkeypatch):
    model, loss_fn, X, y = _problem()
    lam = 0.1
    Delta, _, g = _direction(model, loss_fn, X, y, lam)
    nu = min(1.0, math.sqrt(kfac_module.SAFE_KL_CLIP / float(-(g @ Delta))))
    theta0 = second.parameters_to_vector(model.parameters()).detach()
    monkeypatch.setattr(
        second.optim.KFAC,
        "_quadratic_terms",
        lambda self, V: torch.full((len(V), len(V)), math.nan),
    )
    opt = second.optim.KFAC(model, loss_fn, damping=lam, fisher="type2")
    with pytest.warns(RuntimeWarning, match="KL-clipped natural-gradient step"):
        opt.step(closure_of(opt, model, loss_fn, X, y))
    assert opt.counters["n_refused_steps"] == 1
    assert opt.param_groups[0]["damping"] > lam
    torch.testing.assert_close(
        second.parameters_to_vector(model.parameters()).detach(), theta0 + nu * Delta, **OPTIM_TOL
    )


def test_damping_stays_within_its_bounds(monkeypatch):
    model, loss_fn, X, y = _problem()
    monkeypatch.setattr(
        second.optim.KFAC,
        "_quadratic_terms",
        lambda self, V: torch.full((len(V), len(V)), math.nan),
    )
    opt = second.optim.KFAC(model, loss_fn, damping=0.5, max_damping=1.0, min_damping=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(6):  # every refusal raises the damping
            opt.step(closure_of(opt, model, loss_fn, X, y))
    assert opt.param_groups[0]["damping"] == 1.0
    monkeypatch.undo()
    # an exact quadratic model on a linear least-squares fit: rho ~ 1, the damping falls
    torch.manual_seed(0)
    lin = nn.Linear(4, 2).to(DT)
    Xr = torch.randn(64, 4, dtype=DT)
    yr = Xr @ torch.randn(4, 2, dtype=DT)
    opt = second.optim.KFAC(
        lin,
        nn.MSELoss(),
        damping=1e-2,
        min_damping=1e-3,
        damping_adaptation_interval=1,
        damping_adaptation_decay=0.5,
    )
    for _ in range(10):
        opt.step(closure_of(opt, lin, nn.MSELoss(), Xr, yr))
    assert opt.param_groups[0]["damping"] == 1e-3
    assert opt.counters["n_refused_steps"] == 0


def test_a_step_whose_loss_is_not_finite_is_taken_back(monkeypatch):
    model, loss_fn, X, y = _problem()
    loss_fn = nn.MSELoss()
    y = torch.randn(16, 3, dtype=DT)
    opt = second.optim.KFAC(model, loss_fn, damping=0.1, damping_adaptation_interval=1)
    opt.step(closure_of(opt, model, loss_fn, X, y))
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items() if k in ("A", "G")}
    damping = opt.param_groups[0]["damping"]
    # a finite, accepted model step so long that the loss after it overflows
    monkeypatch.setattr(kfac_module, "step_coefficients", lambda *a, **k: (1e300, 0.0, -1e-3))
    with pytest.warns(RuntimeWarning, match="non-finite loss after the step") as caught:
        opt.step(closure_of(opt, model, loss_fn, X, y))
    assert caught[0].filename == __file__
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    for k, v in state.items():  # the statistics of the taken-back step are not kept
        torch.testing.assert_close(opt.state[model[0].weight][k], v, rtol=0, atol=0)
    assert opt.counters["n_skipped_steps"] == 1
    assert opt.param_groups[0]["damping"] > damping
    monkeypatch.undo()
    loss0 = float(loss_fn(model(X), y).detach())
    for _ in range(5):
        opt.step(closure_of(opt, model, loss_fn, X, y))
    assert float(loss_fn(model(X), y)) < loss0


def test_counters_travel_with_the_state_dict():
    model, loss_fn, X, y = _problem()
    opt = second.optim.KFAC(model, loss_fn)
    opt.step(closure_of(opt, model, loss_fn, X, y))
    opt.param_groups[0]["n_refused_steps"] = 3
    sd = opt.state_dict()
    opt2 = second.optim.KFAC(model, loss_fn)
    opt2.load_state_dict(sd)
    assert opt2.counters == {"n_skipped_steps": 0, "n_refused_steps": 3}
    del sd["param_groups"][0]["n_refused_steps"]  # a state saved before the counters
    opt3 = second.optim.KFAC(model, loss_fn)
    opt3.load_state_dict(sd)
    opt3.step(closure_of(opt3, model, loss_fn, X, y))
    assert opt3.counters["n_refused_steps"] >= 0


def test_a_model_predicting_a_negative_loss_is_refused_and_the_damping_raised(monkeypatch):
    """A loss bounded below by 0 cannot fall by more than its value: such a model is refused."""
    model, loss_fn, X, y = _problem()
    lam = 0.1
    Delta, Gd, g = _direction(model, loss_fn, X, y, lam)
    loss0 = float(loss_fn(model(X), y))
    alpha = float(-(g @ Delta) / (Delta @ Gd @ Delta + lam * Delta @ Delta))
    real = kfac_module.step_coefficients

    def overrated(Fq, nrm, gV, damping, weight_decay, momentum):
        a, m, p = real(Fq, nrm, gV, damping, weight_decay, momentum)
        return (a, m, -1.01 * kfac_module.OVERRATE * loss0) if momentum is None else (a, m, p)

    monkeypatch.setattr(kfac_module, "step_coefficients", overrated)
    opt = second.optim.KFAC(model, loss_fn, damping=lam, fisher="type2")
    with pytest.warns(RuntimeWarning, match="larger than the loss") as caught:
        opt.step(closure_of(opt, model, loss_fn, X, y))
    # the closure's loss is loss_fn's own: no hint about another reduction
    assert not any("not computed by KFAC's loss_fn" in str(w.message) for w in caught)
    assert opt.counters["n_refused_steps"] == 1
    assert opt.param_groups[0]["damping"] > lam
    assert opt.last_info["alpha"] == pytest.approx(alpha, rel=1e-8)  # its step without momentum


def test_a_refusal_from_a_closure_loss_of_another_reduction_says_so():
    # a sum where loss_fn takes the mean: every step is refused (the gradient is the batch
    # size times the curvature's); the warning names the likely cause
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    opt = second.optim.KFAC(model, nn.CrossEntropyLoss())

    def closure(reduction):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y, reduction=reduction)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="not computed by KFAC's loss_fn"):
        opt.step(lambda: closure("sum"))
