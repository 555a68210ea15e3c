"""second.optim.KFAC against the KFAC operator's inverse and the exact quadratic model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import second
from kfac_cases import DT, closure_of, tanh_net
from second import KFACOperator, exact_ggn
from second.func.forward import RandomState

OPTIM_TOL = dict(rtol=1e-6, atol=1e-8)  # optimizer update vs the operator's inverse (float64)


def test_first_step_matches_operator_inverse():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(), nn.MSELoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    lam, lr = 0.1, 0.5
    M = KFACOperator(model, loss_fn, (X, y)).inverse(damping=lam, pi_damping=True)
    loss = loss_fn(model(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    want = second.parameters_to_vector(model.parameters()).detach() - lr * (M @ g)
    opt = second.optim.KFAC(model, loss_fn, lr=lr, damping=lam, fisher="type2")
    opt.step(closure_of(opt, model, loss_fn, X, y))
    torch.testing.assert_close(
        second.parameters_to_vector(model.parameters()).detach(), want, **OPTIM_TOL
    )


def test_adaptive_step_size_from_exact_quadratic_model():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    lam = 0.1
    M = KFACOperator(model, loss_fn, (X, y)).inverse(damping=lam, pi_damping=True)
    out = model(X)
    loss = loss_fn(out, y)
    g = torch.cat(
        [
            t.reshape(-1)
            for t in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        ]
    )
    Gd = exact_ggn(loss, out, list(model.parameters()))
    Delta = -(M @ g)
    alpha = float(-(g @ Delta) / (Delta @ Gd @ Delta + lam * Delta @ Delta))
    theta0 = second.parameters_to_vector(model.parameters()).detach()
    opt = second.optim.KFAC(model, loss_fn, damping=lam, fisher="type2")
    opt.step(closure_of(opt, model, loss_fn, X, y))
    assert opt.last_info["alpha"] == pytest.approx(alpha, rel=1e-8)
    torch.testing.assert_close(
        second.parameters_to_vector(model.parameters()).detach(),
        theta0 + alpha * Delta,
        **OPTIM_TOL,
    )


def _dropout_net():
    return nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Dropout(0.5), nn.Linear(12, 3)).to(DT)


def _recording_closure(opt, model, loss_fn, X, y, rngs):
    """torch.optim's closure that records the generators before each forward in ``rngs``."""

    def closure():
        rngs.append(RandomState(torch.device("cpu")))
        return closure_of(opt, model, loss_fn, X, y)()

    return closure


def test_adaptive_step_uses_the_training_forwards_dropout_masks():
    """With dropout the quadratic model is that of the network the gradient came from (the
    training forward's masks): the step ``u`` minimizes it along itself,
    ``u^T (G + lam) u = -g^T u`` with ``G`` the GGN under those masks. Fresh masks (another
    network) broke this, and on the digits MLPs with dropout refused 10-17 of 55 steps."""
    torch.manual_seed(0)
    model, loss_fn = _dropout_net(), nn.CrossEntropyLoss()
    X, y = torch.randn(32, 4, dtype=DT), torch.randint(0, 3, (32,))
    lam = 0.1
    opt = second.optim.KFAC(model, loss_fn, damping=lam, adapt_damping=False)
    params = list(model.parameters())
    rngs: list[RandomState] = []
    closure = _recording_closure(opt, model, loss_fn, X, y, rngs)

    theta0 = second.parameters_to_vector(params).detach()
    opt.step(closure)
    assert "refused" not in opt.last_info
    u = second.parameters_to_vector(params).detach() - theta0
    g = second.parameters_to_vector([p.grad for p in params])
    nn.utils.vector_to_parameters(theta0, params)  # back to the step's start
    with rngs[-1].replay():  # the training forward again
        out = model(X)
        G = exact_ggn(loss_fn(out, y), out, params)
    assert float(u @ (G @ u) + lam * (u @ u)) == pytest.approx(-float(g @ u), rel=1e-8)


@pytest.mark.parametrize("fisher", ["mc", "type2", "empirical"])
def test_optimizer_trains_plain_loop_and_closure(fisher):
    torch.manual_seed(0)
    X = torch.randn(64, 4)
    y = torch.sin(X[:, :3])
    loss_fn = nn.MSELoss()
    for use_closure in (False, True):
        model = tanh_net(torch.float32)
        opt = second.optim.KFAC(model, loss_fn, fisher=fisher, damping=0.1)
        first = loss_fn(model(X), y).item()
        if use_closure:
            for _ in range(15):
                opt.step(closure_of(opt, model, loss_fn, X, y))
        else:
            with pytest.warns(UserWarning, match="closure") as caught:  # no Levenberg-Marquardt
                for _ in range(15):
                    opt.zero_grad()
                    loss_fn(model(X), y).backward()
                    opt.step()
            assert caught[0].filename == __file__
        assert loss_fn(model(X), y).item() < 0.7 * first


def test_optimizer_fixed_lr_clipping_weight_decay_conv_embedding():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    X, y = torch.randn(32, 1, 5, 5), torch.randint(0, 3, (32,))
    loss_fn = nn.CrossEntropyLoss()
    opt = second.optim.KFAC(
        model, loss_fn, lr=0.1, momentum=0.9, kl_clip=1e-2, weight_decay=1e-4, max_update_norm=1.0
    )
    first = loss_fn(model(X), y).item()
    for _ in range(20):
        opt.step(closure_of(opt, model, loss_fn, X, y))
    assert loss_fn(model(X), y).item() < first

    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    idx, t = torch.randint(0, 10, (32, 2)), torch.randn(32, 2)
    opt = second.optim.KFAC(emb, nn.MSELoss(), damping=0.1)
    first = nn.MSELoss()(emb(idx), t).item()
    for _ in range(10):
        opt.step(closure_of(opt, emb, nn.MSELoss(), idx, t))
    assert nn.MSELoss()(emb(idx), t).item() < first


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(damping=0.0),
        dict(damping=-1.0),
        dict(damping=float("nan")),
        dict(lr=0.0),
        dict(lr=-0.1),
        dict(momentum=1.0),
        dict(momentum=-0.1),
        dict(weight_decay=-1e-3),
        dict(factor_decay=1.0),
        dict(damping_adaptation_decay=1.0),
        dict(damping_adaptation_interval=0),
        dict(inverse_update_period=0),
        dict(factor_update_period=2.5),
        dict(mc_samples=0),
        dict(kl_clip=0.0),
        dict(max_update_norm=-1.0),
        dict(fisher="exact"),
        dict(fallback="none"),
        dict(min_damping=1.0, damping=0.1),
    ],
)
def test_optimizer_validation(kwargs):
    with pytest.raises(ValueError):
        second.optim.KFAC(tanh_net(torch.float32), nn.MSELoss(), **kwargs)


def test_optimizer_needs_statistics():
    model = tanh_net(torch.float32)
    opt = second.optim.KFAC(model, nn.MSELoss())
    with pytest.raises(RuntimeError, match="forward"):
        opt.step()


def test_state_dict_round_trip():
    torch.manual_seed(0)
    X = torch.randn(32, 4, dtype=DT)
    y = torch.randn(32, 3, dtype=DT)
    loss_fn = nn.MSELoss()
    model = tanh_net()
    opt = second.optim.KFAC(model, loss_fn, damping=0.05, fisher="type2", inverse_update_period=3)
    for _ in range(4):
        opt.step(closure_of(opt, model, loss_fn, X, y))
    state = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = second.optim.KFAC(model2, loss_fn, fisher="type2", inverse_update_period=3)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
    assert opt2.param_groups[0]["step"] == 4
    w, w2 = model[0].weight, model2[0].weight
    torch.testing.assert_close(opt2.state[w2]["A"], opt.state[w]["A"], rtol=0, atol=0)
    torch.testing.assert_close(opt2.state[w2]["QG"], opt.state[w]["QG"], rtol=0, atol=0)
    for _ in range(3):
        opt.step(closure_of(opt, model, loss_fn, X, y))
        opt2.step(closure_of(opt2, model2, loss_fn, X, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_nan_step_refused():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(torch.float32), nn.MSELoss()
    X, y = torch.randn(16, 4), torch.randn(16, 3)
    opt = second.optim.KFAC(model, loss_fn, damping=0.1)
    opt.step(closure_of(opt, model, loss_fn, X, y))
    before = [p.detach().clone() for p in model.parameters()]
    damping = opt.param_groups[0]["damping"]
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        opt.step()
    assert caught[0].filename == __file__
    assert opt.last_info["skipped"]
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    assert opt.param_groups[0]["damping"] > damping


def test_optimizer_constant_input_features():
    # digits-like blank pixels: zero columns in the input never crash the eigensolver
    torch.manual_seed(0)
    X = torch.rand(64, 8)
    X[:, :3] = 0.0
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 8), nn.Sigmoid())
    loss_fn = nn.MSELoss()
    opt = second.optim.KFAC(
        model, loss_fn, damping=1e-3, min_damping=1e-12, inverse_update_period=1
    )
    first = loss_fn(model(X), X).item()
    for _ in range(12):
        opt.step(closure_of(opt, model, loss_fn, X, X))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert loss_fn(model(X), X).item() < first


def test_damping_adapts_with_closure():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(torch.float32), nn.MSELoss()
    X, y = torch.randn(64, 4), torch.randn(64, 3)
    opt = second.optim.KFAC(model, loss_fn, damping=1.0, damping_adaptation_interval=1)
    opt.step(closure_of(opt, model, loss_fn, X, y))
    assert "rho" in opt.last_info
    assert opt.param_groups[0]["damping"] != 1.0


@pytest.mark.parametrize(
    "act", [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.Identity, nn.GELU, nn.SiLU, nn.LeakyReLU]
)
@pytest.mark.parametrize("bias", [True, False])
def test_quadratic_model_mlp_path_matches_forward_mode(act, bias):
    """The plain-MLP JVPs (captured forward reused) equal the generic forward-mode AD."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6, bias=bias), act(), nn.Linear(6, 5), act(), nn.Linear(5, 3), nn.Sigmoid()
    ).to(DT)
    loss_fn = nn.MSELoss()
    opt = second.optim.KFAC(model, loss_fn)
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    loss_fn(model(X), y).backward()
    assert opt._fwd is not None
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(2, n, dtype=DT)
    with torch.no_grad():
        fast = opt._quadratic_terms(V)
        opt._fwd = None
        generic = opt._quadratic_terms(V)
    torch.testing.assert_close(fast, generic, rtol=1e-10, atol=1e-12)


def test_quadratic_model_generic_path_for_other_models():
    """A model that is not a plain Sequential MLP keeps the forward-mode AD path."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Net().to(DT)
    opt = second.optim.KFAC(model, nn.MSELoss())
    assert opt._chain is None
    seq = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).to(DT)
    assert second.optim.KFAC(seq, nn.MSELoss())._chain is None


def test_adaptive_trajectory_same_with_and_without_mlp_path():
    torch.manual_seed(0)
    models = [tanh_net(), tanh_net()]
    models[1].load_state_dict(models[0].state_dict())
    loss_fn = nn.MSELoss()
    opts = [second.optim.KFAC(m, loss_fn, fisher="type2") for m in models]
    opts[1]._chain = None  # forward-mode AD on the captured batch
    for _ in range(12):
        X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
        for m, o in zip(models, opts):
            o.step(closure_of(o, m, loss_fn, X, y))
        assert "mu" in opts[0].last_info
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


CHAIN_LAYOUTS = {
    "act-dropout": lambda: [nn.Linear(4, 12), nn.GELU(), nn.Dropout(0.3), nn.Linear(12, 3)],
    "input-dropout": lambda: [nn.Dropout(0.2), nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 3)],
    "dropout-before-act": lambda: [nn.Linear(4, 12), nn.Dropout(0.5), nn.Tanh(), nn.Linear(12, 3)],
    "eval-dropout": lambda: [nn.Linear(4, 12), nn.SiLU(), nn.Dropout(0.5).eval(), nn.Linear(12, 3)],
    "one-dropout-twice": lambda: _twice(nn.Dropout(0.4)),
    # in-place modules overwrite the captured activations: only ReLU's keeps the chain path
    "relu-inplace": lambda: [nn.Linear(4, 12), nn.ReLU(inplace=True), nn.Linear(12, 3)],
    "silu-inplace": lambda: [nn.Linear(4, 12), nn.SiLU(inplace=True), nn.Linear(12, 3)],
    "dropout-inplace-gelu": lambda: [
        nn.Linear(4, 12),
        nn.Dropout(0.3, inplace=True),
        nn.GELU(),
        nn.Linear(12, 3),
    ],
}
CHAIN_PATH = {"silu-inplace": False, "dropout-inplace-gelu": False}


def _twice(drop):
    """One dropout module at two places of the chain (a mask per call)."""
    return [nn.Linear(4, 12), nn.Tanh(), drop, nn.Linear(12, 8), nn.GELU(), drop, nn.Linear(8, 3)]


@pytest.mark.parametrize("layout", CHAIN_LAYOUTS)
def test_mlp_path_matches_forward_mode_with_dropout_and_in_place_modules(layout):
    # a Sequential MLP with nn.Dropout keeps the captured-activation path: its masks are
    # re-drawn from the generators' state before each dropout; the trajectory is the one of
    # forward-mode AD replaying the whole training forward. In-place modules but ReLU leave
    # the path (they overwrite captured activations: SiLU(inplace=True) gave a wrong model)
    torch.manual_seed(0)
    models = [nn.Sequential(*CHAIN_LAYOUTS[layout]()).to(DT) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    loss_fn = nn.CrossEntropyLoss()
    opts = [second.optim.KFAC(m, loss_fn, fisher="type2") for m in models]
    chain = CHAIN_PATH.get(layout, True)
    assert (opts[0]._chain is not None) == chain
    opts[1]._chain = None  # forward-mode AD on the captured batch
    for i in range(12):
        X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
        for m, o in zip(models, opts):
            torch.manual_seed(100 + i)  # both forwards draw the same masks
            o.step(closure_of(o, m, loss_fn, X, y))
        assert (opts[0]._fwd is not None) == chain  # the step took the chain path
        a, b = opts[0].last_info, opts[1].last_info
        assert a.get("refused") == b.get("refused")
        assert a["alpha"] == pytest.approx(b["alpha"], rel=1e-9)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_damping_adaptation_reevaluates_loss_without_backward():
    """The loss after the step is a no-grad forward on the captured batch: the closure runs
    once per step, and damping and parameters follow the closure-evaluated trajectory."""
    torch.manual_seed(0)
    models = [tanh_net(), tanh_net(), tanh_net()]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    loss_fn = nn.MSELoss()
    opts = [second.optim.KFAC(m, loss_fn, fisher="type2") for m in models]
    calls = [0, 0, 0]

    def closure(k, X, y):
        def run():
            calls[k] += 1
            opts[k].zero_grad()
            out = models[k](X)
            # k = 1: the loss does not see the model's output itself; k = 2: the closure
            # returns another tensor than loss_fn's (a regularizer) -> the closure again
            loss = loss_fn(out if k != 1 else out * 1.0, y)
            if k == 2:
                loss = loss + 0.0
            loss.backward()
            return loss

        return run

    for _ in range(12):
        X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
        for k in range(3):
            opts[k].step(closure(k, X, y))
        assert len({o.param_groups[0]["damping"] for o in opts}) == 1
    assert calls == [12, 12 + 12 // 5, 12 + 12 // 5]  # adaptation every 5 steps
    assert opts[0].param_groups[0]["damping"] != opts[0].defaults["damping"]  # adapted (twice)
    for m in models[1:]:
        for p, q in zip(models[0].parameters(), m.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.r, self.fc = (
            nn.Embedding(11, 4),
            nn.LSTM(4, 5, batch_first=True),
            nn.Linear(5, 3),
        )

    def forward(self, x):
        return self.fc(self.r(self.e(x))[0][:, -1])


FLOAT32_GGN_TOL = dict(rtol=1e-4, atol=1e-6)  # a float32 quadratic form against a float64 GGN


def _weight_norm_net():
    return nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3)
    )


@pytest.mark.parametrize("kind", ["lstm", "weight_norm"])
def test_quadratic_model_on_an_lstm_and_weight_norm(kind):
    """An LSTM (float32 on CPU: its kernel has no forward-mode rule) switches the quadratic
    model to reverse-over-reverse JVPs; weight_norm runs in its plain-operation form, which
    forward mode differentiates. Both equal the dense GGN's quadratic form; KFAC trains."""
    torch.manual_seed(0)
    if kind == "lstm":
        model, X = _LSTMNet(), torch.randint(0, 11, (8, 5))
    else:
        model, X = _weight_norm_net(), torch.randn(8, 4)
    y = torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    opt = second.optim.KFAC(model, loss_fn)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loss_fn(model(X), y).backward()  # a captured training forward
    V = torch.randn(2, n)
    with torch.no_grad():
        Q = opt._quadratic_terms(V)
    assert opt._reverse_jvp == (kind == "lstm")
    X64 = X.double() if X.is_floating_point() else X
    G = second.GGNOperator(copy.deepcopy(model).double(), loss_fn, (X64, y)).to_dense()
    V64 = V.double()
    torch.testing.assert_close(Q.double(), V64 @ G @ V64.T, **FLOAT32_GGN_TOL)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(10)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
