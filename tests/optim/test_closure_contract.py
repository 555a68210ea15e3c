"""torch.optim's closure contract for every Newton-type optimizer in ``second.optim``.

The closure zeroes the gradients, computes the loss, calls ``backward()`` and returns the
loss. The old forms (no ``backward()``; GaussNewton's ``(loss, output)``) still work with a
``DeprecationWarning`` naming the contract; a closure that returns no loss is a
``TypeError`` whose message shows the closure to write. KFAC (optim/kfac.py) is tested by
its owner.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from second._errors import SecondDeprecationWarning
from second.optim import GaussNewton, HessianFree, LiSSA, NewtonCG
from second.optim._closure import CLOSURE_EXAMPLE

DT = torch.float64
SOLUTION_TOL = 1e-6  # linear least squares solved by every method to this (float64)


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 3, generator=g, dtype=DT)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + 0.1 * torch.randn(40, generator=g, dtype=DT)
    model = torch.nn.Linear(3, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()
    w_star = torch.linalg.lstsq(X, y).solution
    return model, X, y.unsqueeze(1), w_star


def make(cls, model):
    if cls is NewtonCG:
        return NewtonCG(model.parameters(), maxiter=20, initial_radius=10.0)
    if cls is GaussNewton:
        return GaussNewton(model, maxiter=20, damping=1e-10)
    if cls is HessianFree:
        return HessianFree(model, damping=1e-8, cg_maxiter=10)
    return LiSSA(model.parameters(), depth=400)


def contract_closure(opt, model, X, y, forwards):
    def closure():
        opt.zero_grad()
        forwards.append(1)
        loss = 0.5 * ((model(X) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


OPTIMIZERS = [NewtonCG, GaussNewton, HessianFree, LiSSA]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_the_contract_closure_solves_least_squares_without_deprecation(cls):
    model, X, y, w_star = problem()
    opt = make(cls, model)
    closure = contract_closure(opt, model, X, y, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for _ in range(10):
            opt.step(closure)
    torch.testing.assert_close(model.weight.detach().reshape(-1), w_star, atol=SOLUTION_TOL, rtol=0)
    # .grad holds the gradient at a point the optimizer evaluated (as for LBFGS)
    assert model.weight.grad is not None and model.weight.grad.grad_fn is None


def test_grad_is_the_gradient_at_the_current_point():
    model, X, y, _ = problem()
    opt = NewtonCG(model.parameters(), maxiter=1, initial_radius=0.1)
    closure = contract_closure(opt, model, X, y, [])
    opt.step(closure)
    opt.step(closure)  # evaluates the accepted point first
    w = model.weight.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(0.5 * ((X @ w.T - y) ** 2).mean(), w)
    torch.testing.assert_close(model.weight.grad, ref)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_the_contract_costs_no_extra_forward_pass(cls):
    """The same iterations run as many forward passes under the contract as in the old form."""
    counts = {}
    for form in ("contract", "old"):
        model, X, y, _ = problem()
        if form == "old" and cls in (GaussNewton, HessianFree):
            opt = cls(list(model.parameters()), **make(cls, model).defaults)
        else:
            opt = make(cls, model)
        forwards: list = []

        def old_closure(model=model, forwards=forwards, X=X, y=y):
            forwards.append(1)
            out = model(X)
            loss = 0.5 * ((out - y) ** 2).mean()
            return (loss, out) if cls in (GaussNewton, HessianFree) else loss

        closure = (
            contract_closure(opt, model, X, y, forwards) if form == "contract" else old_closure
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for _ in range(3):
                opt.step(closure)
        counts[form] = (len(forwards), opt.state[model.weight]["nfev"])
    assert counts["contract"] == counts["old"] and counts["contract"][0] > 0


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_a_closure_that_returns_no_loss_is_a_type_error_naming_the_contract(cls):
    model, X, y, _ = problem()
    opt = make(cls, model)

    def closure():
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean()
        loss.backward()  # ... and forgets to return it

    with pytest.raises(TypeError, match=r"calls backward\(\) and returns the loss") as err:
        opt.step(closure)
    assert "opt.zero_grad(); loss = loss_fn(model(X), y); loss.backward(); return loss" in str(
        err.value
    )
    assert model.weight.detach().abs().max() == 0  # the parameters never moved


@pytest.mark.parametrize("cls", [NewtonCG, LiSSA, HessianFree], ids=lambda c: c.__name__)
def test_the_old_closure_without_backward_warns_with_the_contract(cls):
    model, X, y, w_star = problem()
    opt = make(cls, model)
    if cls is HessianFree:
        opt = HessianFree(model.parameters(), curvature="hessian", damping=1e-8, cg_maxiter=10)
    match = rf"a {cls.__name__} closure that returns the loss without calling loss\.backward\(\) "
    match += r"is deprecated and stops working in 0\.3: use torch\.optim's closure: "
    match += re.escape(CLOSURE_EXAMPLE)
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        for _ in range(10):
            opt.step(lambda: 0.5 * ((model(X) - y) ** 2).mean())
    # every closure call's warning points at the user's opt.step line (the step runs under
    # torch's decorators, at a depth that depends on the optimizer)
    assert {w.filename for w in rec if w.category is SecondDeprecationWarning} == {__file__}
    torch.testing.assert_close(model.weight.detach().reshape(-1), w_star, atol=SOLUTION_TOL, rtol=0)


@pytest.mark.parametrize("cls", [GaussNewton, HessianFree], ids=lambda c: c.__name__)
def test_the_old_pair_closure_warns_and_names_the_model_constructor(cls):
    model, X, y, w_star = problem()
    opt = cls(model.parameters(), damping=1e-10 if cls is GaussNewton else 1e-8)

    def closure():
        out = model(X)
        return 0.5 * ((out - y) ** 2).mean(), out

    name = cls.__name__
    match = rf"a {name} closure returning \(loss, output\) is deprecated and stops working in "
    match += rf"0\.3: use the optimizer built from the model, {name}\(model, \.\.\.\), and "
    match += r"torch\.optim's closure: " + re.escape(CLOSURE_EXAMPLE)
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        for _ in range(10):
            opt.step(closure)
    assert {w.filename for w in rec if w.category is SecondDeprecationWarning} == {__file__}
    torch.testing.assert_close(model.weight.detach().reshape(-1), w_star, atol=SOLUTION_TOL, rtol=0)


@pytest.mark.parametrize("cls", [GaussNewton, HessianFree], ids=lambda c: c.__name__)
def test_ggn_from_parameters_with_a_contract_closure_says_what_to_write(cls):
    model, X, y, _ = problem()
    opt = cls(model.parameters())
    closure = contract_closure(opt, model, X, y, [])
    with pytest.raises(TypeError, match=rf"build it from the model, {cls.__name__}\(model"):
        opt.step(closure)


def test_gauss_newton_refuses_a_model_run_twice_in_one_closure():
    model, X, y, _ = problem()
    opt = GaussNewton(model)

    def closure():
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean() + ((model(X) - y) ** 2).mean()
        loss.backward()
        return loss

    with pytest.raises(TypeError, match="ran 2 times"):
        opt.step(closure)


@pytest.mark.parametrize(
    "cls, old, new",
    [
        (NewtonCG, "tolerance_grad", "gtol"),
        (NewtonCG, "max_iter", "maxiter"),
        (NewtonCG, "cg_max_iter", "cg_maxiter"),
        (GaussNewton, "tolerance_grad", "gtol"),
        (GaussNewton, "max_iter", "maxiter"),
        (GaussNewton, "cg_max_iter", "cg_maxiter"),
        (HessianFree, "tolerance_grad", "gtol"),
        (HessianFree, "cg_max_iter", "cg_maxiter"),
        (LiSSA, "tolerance_grad", "gtol"),
    ],
)
def test_deprecated_option_names_map_onto_the_glossary(cls, old, new):
    model, *_ = problem()
    with pytest.warns(DeprecationWarning, match=rf"{old}=.*use {new}="):
        opt = cls(model.parameters(), **{old: 7})
    assert opt.defaults[new] == 7 and old not in opt.defaults
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        cls(model.parameters(), bogus=1)
    with pytest.raises(ValueError, match=f"pass {new} only"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cls(model.parameters(), **{old: 7, new: 9})


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton], ids=lambda c: c.__name__)
def test_cg_rtol_is_the_deprecated_spelling_of_cg_tol(cls):
    weights, groups = [], []
    for spelling in ("cg_tol", "cg_rtol"):
        model, X, y, _ = problem()
        params = model if cls is GaussNewton else model.parameters()
        if spelling == "cg_rtol":
            with pytest.warns(SecondDeprecationWarning, match=r"\(cg_rtol=.*use cg_tol="):
                opt = cls(params, maxiter=5, cg_rtol=1e-3)
        else:
            opt = cls(params, maxiter=5, cg_tol=1e-3)
        opt.step(contract_closure(opt, model, X, y, []))
        weights.append(model.weight.detach().clone())
        groups.append(opt.param_groups[0])
    assert torch.equal(weights[0], weights[1])  # the same run, to the bit
    assert groups[1]["cg_tol"] == 1e-3 and "cg_rtol" not in groups[1]
    with pytest.raises(ValueError, match="pass cg_tol only"), warnings.catch_warnings():
        warnings.simplefilter("ignore", SecondDeprecationWarning)
        cls(params, cg_rtol=1e-3, cg_tol=1e-4)
    with pytest.raises(ValueError, match="cg_tol must lie in"):
        cls(params, cg_tol=1.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'cg_rtol'"):
        HessianFree(model, cg_rtol=1e-3)  # it never had one


def test_a_state_saved_with_the_old_option_names_loads():
    model, X, y, _ = problem()
    opt = NewtonCG(model.parameters(), maxiter=3, cg_tol=1e-3)
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    group["tolerance_grad"], group["max_iter"] = group.pop("gtol"), group.pop("maxiter")
    group["cg_rtol"] = group.pop("cg_tol")
    opt2 = NewtonCG(model.parameters())
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["maxiter"] == 3 and "max_iter" not in opt2.param_groups[0]
    assert opt2.param_groups[0]["cg_tol"] == 1e-3 and "cg_rtol" not in opt2.param_groups[0]


def test_the_deprecated_nhvp_counter_reads_matvecs():
    model, X, y, _ = problem()
    opt = NewtonCG(model.parameters(), maxiter=2)
    opt.step(contract_closure(opt, model, X, y, []))
    st = opt.state[model.weight]
    assert st["matvecs"] > 0 and "nhvp" in st
    match = r"counter 'nhvp' is deprecated and stops working in 0\.3: use 'matvecs'"
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        assert st["nhvp"] == st["matvecs"]
    with pytest.warns(SecondDeprecationWarning, match=match) as rec_get:
        assert st.get("nhvp") == st["matvecs"]
    with pytest.warns(SecondDeprecationWarning, match=match) as rec_history:
        assert opt.history[-1]["nhvp"] == opt.history[-1]["matvecs"]
    for caught in (rec, rec_get, rec_history):  # each points at the reading line
        assert caught[0].filename == __file__
    sd = opt.state_dict()  # a state saved before the renaming loads with the new key
    saved = dict(sd["state"][0])
    saved["nhvp"] = saved.pop("matvecs")
    sd["state"][0] = saved
    opt2 = NewtonCG(model.parameters())
    opt2.load_state_dict(sd)
    assert dict.get(opt2.state[model.weight], "matvecs") == st["matvecs"]


class _TinyEncoder(torch.nn.Module):
    """nn.TransformerEncoderLayer: its fused attention kernel has no double backward."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.block(x).mean(1))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_curvature_through_attention_in_the_users_closure(cls):
    """The closure's forward runs the fused attention; the optimizer runs it in the math
    kernel, so its curvature products work and its steps equal those of a closure that
    selects the math kernel itself."""
    from second.func import differentiable_attention

    torch.manual_seed(0)
    X, y = torch.randn(6, 4, 8, dtype=DT), torch.randn(6, 1, dtype=DT)
    models = [_TinyEncoder().to(DT).eval() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    # LiSSA: damped and scaled so that its recursion converges on this indefinite Hessian
    opts = [
        LiSSA(m.parameters(), depth=20, damping=10.0, scale=100.0) if cls is LiSSA else make(cls, m)
        for m in models
    ]
    start = models[0].out.weight.detach().clone()
    for _ in range(3):
        for k, (m, opt) in enumerate(zip(models, opts)):

            def closure(m=m, opt=opt, k=k):
                opt.zero_grad()
                with differentiable_attention() if k else torch.enable_grad():
                    loss = 0.5 * ((m(X) - y) ** 2).mean()
                loss.backward()
                return loss

            opt.step(closure)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(models[0].out.weight, start)  # it moved


# -- what the closure does beyond the contract is ignored, and said once -------------------

DIFFERENTIATE_THE_LOSS = OPTIMIZERS + ["SophiaH", "AdaHessian", "Sophia"]


def _make_any(cls, model):
    import second.optim as so

    if cls == "Sophia":
        return so.Sophia(model, torch.nn.MSELoss(), lr=0.01)
    if isinstance(cls, str):
        return getattr(so, cls)(model.parameters(), lr=0.01)
    return make(cls, model)


def _name(c):
    return c if isinstance(c, str) else c.__name__


def _misuse_warnings(record):
    return [w for w in record if "beyond torch.optim's contract" in str(w.message)]


@pytest.mark.parametrize("cls", DIFFERENTIATE_THE_LOSS, ids=_name)
def test_gradient_accumulation_in_the_closure_warns_once(cls):
    """Two micro-batches, backward() on each, the last loss returned: the optimizer
    differentiates the returned loss only, and says so once, naming the fix."""
    model, X, y, _ = problem()
    opt = _make_any(cls, model)
    halves = (slice(0, 20), slice(20, 40))

    def closure():
        opt.zero_grad()
        for rows in halves:
            loss = 0.5 * ((model(X[rows]) - y[rows]) ** 2).mean()
            loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        if cls in (GaussNewton, HessianFree):  # the model ran twice: no single output
            with pytest.raises(TypeError, match="ran 2 times"):
                opt.step(closure)
        else:
            for _ in range(3):
                opt.step(closure)
    (w,) = _misuse_warnings(rec)
    assert issubclass(w.category, UserWarning)
    assert "called backward() 2 times" in str(w.message)
    assert "sum of their losses" in str(w.message) and "loss.backward(); return loss" in str(
        w.message
    )
    assert w.filename == __file__  # it points at the user's step() call


@pytest.mark.parametrize("cls", [NewtonCG, "SophiaH", "AdaHessian"], ids=_name)
def test_the_gradient_used_is_the_returned_losss(cls):
    # the documented behaviour behind the warning, against float64 autograd
    model, X, y, _ = problem()
    w0 = model.weight.detach().clone()
    opt = _make_any(cls, model)

    def closure():
        opt.zero_grad()
        for rows in (slice(0, 20), slice(20, 40)):
            loss = 0.5 * ((model(X[rows]) - y[rows]) ** 2).mean()
            loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt.step(closure)
    if cls is NewtonCG:  # one exact Newton step on the last micro-batch's quadratic
        Xb, yb = X[20:], y[20:].reshape(-1)
        expect = torch.linalg.solve(Xb.T @ Xb, Xb.T @ yb)
        torch.testing.assert_close(model.weight.detach().reshape(-1), expect)
        return
    w = w0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(0.5 * ((X[20:] @ w.T - y[20:]) ** 2).mean(), w)
    torch.testing.assert_close(model.weight.grad, g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [NewtonCG, "SophiaH"], ids=_name)
@pytest.mark.parametrize("misuse", ["clip", "grad_changed", "scaled"])
def test_clipping_or_editing_grad_in_the_closure_warns(cls, misuse):
    model, X, y, _ = problem()
    opt = _make_any(cls, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def closure():
        opt.zero_grad(set_to_none=misuse != "grad_changed")
        loss = 0.5 * ((model(X) - y) ** 2).mean()
        (loss * 2.0 if misuse == "scaled" else loss).backward()
        if misuse == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        elif misuse == "grad_changed":
            model.weight.grad.mul_(0.5)  # an edit in place, where .grad exists
        return loss

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step(closure)
    (w,) = _misuse_warnings(rec)
    expect = {
        "clip": "clip_grad_norm_",
        "grad_changed": "changed .grad after backward()",
        "scaled": "on a tensor other than the loss it returns",
    }[misuse]
    assert expect in str(w.message)


@pytest.mark.parametrize("cls", DIFFERENTIATE_THE_LOSS, ids=_name)
def test_the_contract_closure_does_not_warn(cls):
    model, X, y, _ = problem()
    opt = _make_any(cls, model)
    closure = contract_closure(opt, model, X, y, [])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(closure)
    assert not _misuse_warnings(rec)
    # and the patched functions are restored after the closure
    assert torch.nn.utils.clip_grad_norm_ is torch.nn.utils.clip_grad.clip_grad_norm_
    assert torch.nn.utils.clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"
