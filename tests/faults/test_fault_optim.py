"""Optimizer faults: NaN and overflowing batches, overflowing trial points, diverging LiSSA
recursions and another model's state, for every optimizer in ``second.optim``.

The documented outcomes (docs/reliability.md): a bad batch raises ``NonFiniteError`` (the
Newton-type optimizers) or is skipped with a warning (KFAC), a rejected step leaves the
parameters exactly where they were, and training then continues; a state dict saved
for other parameters is refused with ``ValueError``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from newton_cases import contract
from second import ConvergenceWarning, NonFiniteError
from second.optim import KFAC, GaussNewton, HessianFree, LiSSA, NewtonCG

DT = torch.float64
NEWTON_TYPES = [NewtonCG, GaussNewton, HessianFree, LiSSA]
ALL = [*NEWTON_TYPES, KFAC]
STEPS_AFTER = 5  # good steps after the fault


def regression(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=DT)
    return X, X @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]], dtype=DT)


def linear():
    torch.manual_seed(0)
    return nn.Linear(4, 1).to(DT)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, before):
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def make(cls, model, **kw):
    """``cls`` on ``model``: KFAC and the Gauss-Newton-type optimizers take the model."""
    if cls is KFAC:
        return KFAC(model, nn.MSELoss(), **kw)
    return cls(model if cls in (GaussNewton, HessianFree) else model.parameters(), **kw)


def setup(cls):
    """An optimizer on a least-squares problem and ``step(X, y)`` with torch.optim's closure."""
    model = linear()
    kw = {KFAC: dict(damping=1e-2), LiSSA: dict(depth=50, damping=1e-3)}.get(cls, {})
    opt = make(cls, model, **kw)

    def step(X, y):
        return opt.step(contract(opt, lambda: nn.functional.mse_loss(model(X), y)))

    return model, opt, step


def bad_batch(X, fault):
    if fault == "nan":
        X = X.clone()
        X[3, 1] = float("nan")
        return X
    return X * 1e200  # finite inputs whose squared outputs overflow float64


@pytest.mark.parametrize("fault", ["nan", "overflow"])
@pytest.mark.parametrize("cls", NEWTON_TYPES, ids=lambda c: c.__name__)
def test_a_bad_batch_raises_leaves_the_parameters_and_training_continues(cls, fault):
    X, y = regression()
    model, opt, step = setup(cls)
    for _ in range(2):
        step(X, y)
    loss_before = float(nn.functional.mse_loss(model(X), y).detach())
    before = snapshot(model)
    with pytest.raises(NonFiniteError):
        step(bad_batch(X, fault), y)
    assert unchanged(model, before)
    for _ in range(STEPS_AFTER):
        step(X, y)
    loss_after = float(nn.functional.mse_loss(model(X), y).detach())
    assert loss_after < loss_before


@pytest.mark.parametrize("fault", ["nan", "overflow"])
def test_kfac_skips_a_bad_batch_without_moving_the_parameters(fault):
    X, y = regression()
    model, opt, step = setup(KFAC)
    for _ in range(2):
        step(X, y)
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="non-finite update"):
        step(bad_batch(X, fault), y)
    assert unchanged(model, before)
    assert opt.last_info.get("skipped")


def _kfac_classifier(fisher):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(32, 4, generator=g, dtype=DT), torch.randint(0, 3, (32,), generator=g)
    return model, KFAC(model, nn.CrossEntropyLoss(), fisher=fisher), X, y


@pytest.mark.parametrize(
    ("fisher", "fault"),
    [
        ("type2", "nan"),
        ("empirical", "nan"),
        ("mc", "nan"),
        ("mc", "overflow"),
        ("type2", "overflow"),
    ],
)
def test_kfac_keeps_training_after_a_bad_batch(fisher, fault):
    model, opt, X, y = _kfac_classifier(fisher)
    loss_fn = nn.CrossEntropyLoss()

    def closure(Xb):
        def c():
            opt.zero_grad()
            loss = loss_fn(model(Xb), y)
            loss.backward()
            return loss

        return c

    for _ in range(3):
        opt.step(closure(X))
    state = copy.deepcopy(opt.state_dict()["state"])
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt.step(closure(bad_batch(X, fault)))
        except NonFiniteError:
            pass  # a clear error is a documented outcome too
    assert unchanged(model, before)
    for k, st in opt.state_dict()["state"].items():  # nothing of the bad batch was committed
        for name, v in st.items():
            if isinstance(v, torch.Tensor) and name in ("A", "G", "diag"):
                torch.testing.assert_close(v, state[k][name], rtol=0, atol=0)
    for _ in range(15):  # past the next inverse update
        opt.step(closure(X))
    assert torch.isfinite(loss_fn(model(X), y))


# ---------------------------------------------------------------------------- trial points
class _Exp(nn.Module):
    """exp(w x) from w = 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=DT))

    def forward(self, X):
        return torch.exp(self.w * X)


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton, HessianFree], ids=lambda c: c.__name__)
def test_an_overflowing_trial_point_is_rejected_and_the_parameters_restored(cls):
    """exp(w x) fit to 1e4 from w = 0: the first Newton/LM step lands near w = 1e4, where exp overflows."""
    X, y = torch.ones(4, 1, dtype=DT), torch.full((4, 1), 1e4, dtype=DT)
    model = _Exp()
    w = model.w
    kw = dict(initial_radius=1e4) if cls is NewtonCG else dict(damping=1e-8)
    opt = make(cls, model, **kw)
    closure = contract(opt, lambda: 0.5 * ((model(X) - y) ** 2).mean())
    opt.step(closure)
    st = opt.state[w]
    assert float(w.detach()) == 0.0 and st["n_rejected"] == 1
    if cls is NewtonCG:
        assert st["radius"] < 1e4
    else:
        assert st["damping"] > 1e-8
    for _ in range(60):  # the safeguard lets it recover
        opt.step(closure)
    torch.testing.assert_close(w.detach(), torch.tensor([9.210340371976184], dtype=DT))


def test_lissa_refuses_a_diverging_recursion():
    """scale 10 below the largest eigenvalue 100: the probe's w reached 4.6e46 in one step."""
    A = torch.diag(torch.tensor([100.0, 1.0], dtype=DT))
    w = torch.ones(2, dtype=DT, requires_grad=True)
    opt = LiSSA([w], scale=10.0, depth=50)
    for k in range(1, 3):
        with pytest.warns(ConvergenceWarning, match="recursion diverged") as caught:
            opt.step(contract(opt, lambda: 0.5 * w @ A @ w))
        assert caught[0].filename == __file__
        assert torch.equal(w.detach(), torch.ones(2, dtype=DT))
        st = opt.state[w]
        assert st["n_rejected"] == k and st["n_diverged"] == k and st["n_iter"] == 0


def test_lissa_refuses_exploding_steps_from_tiny_curvature_batches():
    """Automatic scale, 4-example Hessians: the probe's |w| reached 1.3e5 (solution norm ~1)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 5, generator=g, dtype=DT) * torch.tensor([1, 1, 1, 1, 10.0], dtype=DT)
    y = X @ torch.ones(5, dtype=DT)
    w = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = LiSSA([w], depth=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for _ in range(10):
            i = torch.randint(0, 256, (4,), generator=g)
            opt.step(
                contract(opt, lambda: ((X @ w - y) ** 2).mean()),
                contract(opt, lambda i=i: ((X[i] @ w - y[i]) ** 2).mean()),
            )
            assert bool(torch.isfinite(w).all())
    st = opt.state[w]
    refusals = [c for c in caught if issubclass(c.category, ConvergenceWarning)]
    assert st["n_diverged"] >= 1 and len(refusals) == st["n_diverged"]
    assert float(w.detach().abs().max()) < 10.0


# ---------------------------------------------------------------------------- state dicts
def _two_layer(a, b):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(a, b), nn.Tanh(), nn.Linear(b, 1)).to(DT)


def _trained(cls, model):
    X = torch.randn(16, model[0].in_features, dtype=DT)
    y = torch.randn(16, 1, dtype=DT)
    opt = make(cls, model, **({"damping": 1.0} if cls is LiSSA else {}))
    closure = contract(opt, lambda: nn.functional.mse_loss(model(X), y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        opt.step(closure)
    return opt, closure


def _fresh(cls, model):
    return make(cls, model)


# a state dict saved before the shapes were recorded is checked through the tensors it holds
# (KFAC's per-parameter update, HessianFree's flat direction); the others hold none
CASES = [(cls, False) for cls in ALL] + [(KFAC, True), (HessianFree, True)]


@pytest.mark.parametrize(
    ("cls", "legacy"),
    CASES,
    ids=lambda c: c.__name__ if isinstance(c, type) else ("legacy" if c else ""),
)
def test_another_models_state_is_refused(cls, legacy):
    src, _ = _trained(cls, _two_layer(4, 8))
    sd = src.state_dict()
    if legacy:
        sd = {k: v for k, v in sd.items() if k != "param_shapes"}
    target_model = _two_layer(3, 5)
    target = _fresh(cls, target_model)
    with pytest.raises(ValueError, match="another model"):
        target.load_state_dict(sd)
    # the refused load left the optimizer as it was: it still trains its own model
    assert not target.state_dict()["state"]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_state_for_another_number_of_parameters_is_refused(cls):
    src, _ = _trained(cls, _two_layer(4, 8))
    model = nn.Sequential(nn.Linear(4, 1, bias=False)).to(DT)
    target = make(cls, model)
    with pytest.raises(ValueError, match="saved for 4 parameter tensors, this optimizer has 1"):
        target.load_state_dict(src.state_dict())


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_the_own_state_still_loads(cls):
    model = _two_layer(4, 8)
    src, _ = _trained(cls, model)
    twin = _fresh(cls, _two_layer(4, 8))
    twin.load_state_dict(src.state_dict())
    saved, loaded = src.state_dict(), twin.state_dict()
    assert saved.keys() == loaded.keys() and saved["state"].keys() == loaded["state"].keys()

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b or (a != a and b != b)  # NaN-valued entries count as equal

    assert same(saved, loaded)
