"""second.optim.KFAC as a torch.optim citizen: accumulation, autocast, groups, schedulers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import second
from kfac_cases import DT, TokenModel, closure_of, tanh_net

OPTIM_TOL = dict(rtol=1e-6, atol=1e-8)  # optimizer update vs the operator inverse (float64)
FACTOR_TOL = dict(rtol=1e-10, atol=1e-12)  # float64 factors, two summation orders


def _factors(opt, model):
    return [opt.state[m.weight][k] for m in model if isinstance(m, nn.Linear) for k in ("A", "G")]


@pytest.mark.parametrize("fisher", ["type2", "mc"])
def test_accumulated_micro_batches_give_the_big_batch_statistics(fisher):
    """Two micro-batches (losses halved, two backward calls, one step) == one batch of 16.

    ("mc": the same sampled targets, since both draw from one seeded generator in order.)
    """
    torch.manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    big, micro = tanh_net(), tanh_net()
    micro.load_state_dict(big.state_dict())
    opts = [second.optim.KFAC(m, loss_fn, lr=0.5, fisher=fisher) for m in (big, micro)]
    for _ in range(2):
        torch.manual_seed(1)
        loss_fn(big(X), y).backward()
        opts[0].step()
        opts[0].zero_grad()
        torch.manual_seed(1)
        for part in (slice(0, 8), slice(8, 16)):
            (loss_fn(micro(X[part]), y[part]) / 2).backward()
        opts[1].step()
        opts[1].zero_grad()
    for a, b in zip(_factors(*opts[:1], big), _factors(opts[1], micro)):
        torch.testing.assert_close(a, b, **FACTOR_TOL)
    for p, q in zip(big.parameters(), micro.parameters()):
        torch.testing.assert_close(p, q, **FACTOR_TOL)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.view(-1, 1, 4, 4))).flatten(1))


@pytest.mark.parametrize("make", [lambda: tanh_net(torch.float32), _ConvNet])
def test_bfloat16_autocast_trains_with_float32_factors(make):
    torch.manual_seed(0)
    model, loss_fn = make(), nn.CrossEntropyLoss()
    X = torch.randn(32, 16 if isinstance(model, _ConvNet) else 4)
    y = torch.randint(0, 3, (32,))
    opt = second.optim.KFAC(model, loss_fn)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    first = float(closure())
    losses = [float(opt.step(closure)) for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * first
    assert opt.counters == {"n_skipped_steps": 0, "n_refused_steps": 0}
    for st in opt.state.values():
        for k in ("A", "G", "QA", "QG"):
            if k in st and st[k] is not None:
                assert st[k].dtype == torch.float32


def _weights_and_biases(model):
    ws = [m.weight for m in model if isinstance(m, nn.Linear)]
    bs = [m.bias for m in model if isinstance(m, nn.Linear)]
    return ws, bs


def test_parameter_groups_decay_only_the_weights():
    """No weight decay on biases: gradient + eta*W on weights only, blocks damped by lam + eta."""
    torch.manual_seed(0)
    model, loss_fn = tanh_net(), nn.MSELoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    lam, eta, lr = 0.1, 0.05, 0.5
    ws, bs = _weights_and_biases(model)
    M = second.KFACOperator(model, loss_fn, (X, y)).inverse(damping=lam + eta, pi_damping=True)
    params = list(model.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model(X), y), params)])
    decay = torch.cat([(eta * p if any(p is w for w in ws) else 0 * p).reshape(-1) for p in params])
    theta0 = second.parameters_to_vector(params).detach()
    opt = second.optim.KFAC(
        model,
        loss_fn,
        params=[{"params": ws, "weight_decay": eta}, {"params": bs, "weight_decay": 0.0}],
        lr=lr,
        damping=lam,
        fisher="type2",
    )
    opt.step(closure_of(opt, model, loss_fn, X, y))
    want = theta0 - lr * (M @ (g + decay.detach()))
    torch.testing.assert_close(second.parameters_to_vector(params).detach(), want, **OPTIM_TOL)


def test_parameter_groups_per_group_lr_in_fixed_mode():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(), nn.MSELoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    ws, bs = _weights_and_biases(model)
    M = second.KFACOperator(model, loss_fn, (X, y)).inverse(damping=0.1, pi_damping=True)
    params = list(model.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model(X), y), params)])
    lrs = torch.cat(
        [torch.full((p.numel(),), 0.5 if p.dim() == 2 else 0.1, dtype=DT) for p in params]
    )
    theta0 = second.parameters_to_vector(params).detach()
    opt = second.optim.KFAC(
        model, loss_fn, params=[{"params": bs, "lr": 0.1}], lr=0.5, damping=0.1, fisher="type2"
    )
    assert len(opt.param_groups) == 2  # the weights: a last group with the defaults
    opt.step(closure_of(opt, model, loss_fn, X, y))
    torch.testing.assert_close(
        second.parameters_to_vector(params).detach(), theta0 - lrs * (M @ g), **OPTIM_TOL
    )


def test_state_dict_round_trip_with_groups():
    torch.manual_seed(0)
    loss_fn = nn.MSELoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    models = [tanh_net() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())

    def make(model):
        ws, bs = _weights_and_biases(model)
        groups = [{"params": ws, "weight_decay": 1e-2}, {"params": bs, "weight_decay": 0.0}]
        return second.optim.KFAC(model, loss_fn, params=groups)

    a = make(models[0])
    for _ in range(3):
        a.step(closure_of(a, models[0], loss_fn, X, y))
    models[1].load_state_dict(models[0].state_dict())
    b = make(models[1])
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert [g["weight_decay"] for g in b.param_groups] == [1e-2, 0.0]
    for _ in range(3):
        for m, o in zip(models, (a, b)):
            o.step(closure_of(o, m, loss_fn, X, y))
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("lr", [None, 0.3])
def test_a_scheduler_scales_the_step(lr):
    """Adaptive mode: lr multiplies the quadratic model's step; fixed mode: lr is the lr."""
    torch.manual_seed(0)
    loss_fn = nn.MSELoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    models = [tanh_net() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    theta0 = second.parameters_to_vector(models[0].parameters()).detach()
    opts = [second.optim.KFAC(m, loss_fn, lr=lr, fisher="type2") for m in models]
    sched = torch.optim.lr_scheduler.LambdaLR(opts[1], lambda k: 0.25)
    assert opts[1].param_groups[0]["lr"] == 0.25 * (1.0 if lr is None else lr)
    for m, o in zip(models, opts):
        o.step(closure_of(o, m, loss_fn, X, y))
    sched.step()
    full, quarter = (second.parameters_to_vector(m.parameters()).detach() - theta0 for m in models)
    torch.testing.assert_close(quarter, 0.25 * full, **OPTIM_TOL)
    if lr is None:
        assert opts[1].last_info["lr_scale"] == 0.25
        pred = [o.last_info["predicted_change"] for o in opts]
        assert pred[0] < pred[1] < 0  # a quarter of the model's step: a smaller decrease


def test_groups_are_checked():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(), nn.MSELoss()
    ws, bs = _weights_and_biases(model)
    opt = second.optim.KFAC(model, loss_fn, params=[{"params": ws, "lr": 0.5}])
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    with pytest.raises(ValueError, match="same in every parameter group"):
        opt.step(closure_of(opt, model, loss_fn, X, y))
    with pytest.raises(ValueError, match="given at construction"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="more than one"):
        second.optim.KFAC(model, loss_fn, params=[{"params": ws}, {"params": ws[:1]}])
    with pytest.raises(ValueError, match="not a trainable parameter"):
        second.optim.KFAC(model, loss_fn, params=[{"params": [torch.zeros(2)]}])


def test_mc_targets_follow_the_predictive_distribution():
    """The MC Fisher's class targets (inverse-CDF sampling): frequencies match the softmax."""
    from second._losses import sample_targets

    logits = torch.tensor([[2.0, 0.0, -1.0, -torch.inf], [0.0, 0.0, 0.0, 0.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    y = sample_targets(nn.CrossEntropyLoss(), logits, g)
    for row in range(2):
        freq = torch.bincount(y[row::2], minlength=4).double() / 20000
        p = torch.softmax(logits[row].double(), 0)
        torch.testing.assert_close(freq, p, rtol=0, atol=0.015)  # ~4 standard deviations
    assert int((y[0::2] == 3).sum()) == 0  # probability 0: never drawn


@pytest.mark.parametrize("conv", [False, True], ids=["mlp-batchnorm1d", "cnn-batchnorm2d"])
def test_batchnorm_in_training_mode_trains_with_defaults_and_counts_each_batch_once(conv):
    """The adaptive mode's extra forwards (quadratic model, damping trial) leave BatchNorm's
    running statistics alone: only the training forward counts, once per step."""
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)
        )
        X = torch.randn(64, 1, 8, 8)
    else:
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        X = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    loss_fn = nn.CrossEntropyLoss()
    opt = second.optim.KFAC(model, loss_fn)
    steps = 12  # two damping adaptations (every 5 steps)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    first = float(loss_fn(model(X), y))
    for _ in range(steps):
        opt.step(closure)
    bn = model[1]
    assert int(bn.num_batches_tracked) == steps + 1  # the steps' forwards and `first`
    last = float(loss_fn(model(X), y))
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert last < first
    assert opt.counters["n_skipped_steps"] == 0


def test_a_compiled_model_takes_the_steps_of_the_eager_one():
    # the capture hooks run eagerly (the compiler breaks its graph there); the names are the
    # user's module's, not the compiled wrapper's
    def run(compiled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        net = torch.compile(model, backend="eager") if compiled else model
        X, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
        loss_fn = nn.CrossEntropyLoss()
        opt = second.optim.KFAC(net, loss_fn)
        assert set(opt.approximations()) == {n for n, _ in model.named_parameters()}
        closure = closure_of(opt, net, loss_fn, X, y)
        torch.manual_seed(1)  # the MC Fisher's samples
        return torch.stack([opt.step(closure).detach() for _ in range(8)])

    eager, compiled = run(False), run(True)
    assert eager[-1] < 0.7 * eager[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def _flat_loss(loss_fn, out, y):
    return loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _token_run(x, y, *, view: bool = True, steps: int = 2, loss=None, model=None, **options):
    """KFAC's factors and parameters after ``steps`` steps on one batch of tokens.

    ``loss(loss_fn, out, y)``: how the closure computes the loss (default: on
    ``out.reshape(-1, V)`` for ``view``, else on the ``[B, V, T]`` output as it is).
    """
    torch.manual_seed(0)
    model = model or TokenModel(classes_first=not view)
    model = model.double()
    loss_fn = nn.CrossEntropyLoss()
    opt = second.optim.KFAC(model, loss_fn, **{"fisher": "type2", **options})
    loss = loss or (_flat_loss if view else (lambda fn, out, y: fn(out, y)))

    def closure():
        opt.zero_grad()
        value = loss(loss_fn, model(x), y)
        value.backward()
        return value

    for _ in range(steps):
        opt.step(closure)
    factors = [layer.state_in(opt.state)[key].clone() for layer in opt.layers for key in ("A", "G")]
    return factors, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "options", [{}, {"fisher": "empirical"}, {"factor_update_period": 2}], ids=str
)
def test_a_loss_on_a_reshaped_view_of_the_output_gets_its_own_curvature(options):
    # logits [B, T, V] with the loss on out.reshape(-1, V) (classes last, the common language
    # model pattern) must give the curvature of the loss as written: the same factors and
    # steps as logits [B, V, T] given to the loss directly (the output's dim 1 is not the
    # classes here, as KFAC assumed when it gathered its statistics and took the quadratic
    # model's curvature; the empirical Fisher's factors never depended on it, its quadratic
    # model did; between factor updates the quadratic model still needs the view)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 20, (6, 5), generator=g), torch.randint(0, 20, (6, 5), generator=g)
    f_view, p_view = _token_run(x, y, view=True, steps=3, **options)
    f_ref, p_ref = _token_run(x, y, view=False, steps=3, **options)
    for a, b in zip(f_view + p_view, f_ref + p_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("view", [True, False])
def test_ignored_targets_leave_the_statistics_as_if_the_positions_were_not_there(view, fisher):
    # padding (ignore_index) in a position-wise model: the factors and steps equal those of
    # the batch without the padded positions (before, they counted as data; the empirical
    # Fisher's, gathered from the user's backward, counted them in A and scaled G by the
    # padded share until the sixth session)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 20, (6, 7), generator=g), torch.randint(0, 20, (6, 7), generator=g)
    padded = y.clone()
    padded[:, 5:] = -100
    f_pad, p_pad = _token_run(x, padded, view=view, fisher=fisher)
    f_cut, p_cut = _token_run(x[:, :5], y[:, :5], view=view, fisher=fisher)
    for a, b in zip(f_pad + p_pad, f_cut + p_cut):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_class_probability_targets_on_a_reshaped_or_shifted_view(fisher):
    # distillation-style targets (probabilities, shaped like the loss input) on
    # out.reshape(-1, V) and on the shifted copy out[:, :-1].reshape(-1, V): the factors and
    # steps of the loss as written (before, the view was not mapped for such targets and the
    # statistics took the output's dim 1, the positions, for the classes: 20-340% off)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 20, (6, 5), generator=g)
    p = torch.softmax(torch.randn(6, 5, 20, generator=g, dtype=torch.float64), -1)

    def flat(fn, out, y):
        return fn(out.reshape(-1, 20), y.reshape(-1, 20))

    def shifted(fn, out, y):
        return fn(out[:, :-1].reshape(-1, 20), y[:, :-1].reshape(-1, 20))

    def classes_first(fn, out, y):
        return fn(out, y.transpose(1, 2))

    want = _token_run(x, p, view=False, loss=classes_first, fisher=fisher)
    got = _token_run(x, p, view=True, loss=flat, fisher=fisher)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the shifted copy: the batch without the last position (the model is position-wise)
    want = _token_run(x[:, :-1], p[:, :-1], view=False, loss=classes_first, fisher=fisher)
    got = _token_run(x, p, view=True, loss=shifted, fisher=fisher)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("norm", [False, True], ids=["mlp", "layernorm"])
def test_the_empirical_fisher_leaves_out_ignored_examples(reduction, norm):
    # one row per example, 3 of 8 targets ignored: the factors (and a LayerNorm's fallback
    # diagonal) of the 5 kept examples (before: A 55% and G 60% off, the ignored rows counted
    # and G scaled by 8/5)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    y[[1, 4, 6]] = -100
    kept = y != -100

    def factors(Xb, yb):
        torch.manual_seed(1)
        mods = [nn.Linear(5, 4), *([nn.LayerNorm(4)] if norm else []), nn.Tanh(), nn.Linear(4, 3)]
        model = nn.Sequential(*mods).double()
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        opt = second.optim.KFAC(model, loss_fn, fisher="empirical", lr=0.1, momentum=0.0)
        opt.step(closure_of(opt, model, loss_fn, Xb, yb))
        out = [layer.state_in(opt.state)[k].clone() for layer in opt.layers for k in ("A", "G")]
        return out + [opt.state[p]["diag"].clone() for p in opt.fallback_params]

    padded, cut = factors(X, y), factors(X[kept], y[kept])
    assert len(padded) == (6 if norm else 4)
    for a, b in zip(padded, cut):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_loss_call_leaves_the_global_random_stream_alone():
    # the empirical Fisher's statistics re-done at a loss call with ignored targets draw no
    # random signs for a fallback diagonal (it comes from the gradient at the step)
    X = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    y[[1, 4]] = -100
    draws = []
    for attach in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
        model = model.double()
        loss_fn = nn.CrossEntropyLoss()
        if attach:
            second.optim.KFAC(model, loss_fn, fisher="empirical", lr=0.1)
        torch.manual_seed(123)
        loss_fn(model(X), y)
        draws.append(torch.rand(1).item())
    assert draws[0] == draws[1]


def test_a_loss_computed_without_loss_fn_costs_one_batch_of_statistics_and_says_so():
    torch.manual_seed(0)
    model = TokenModel()
    loss_fn = nn.CrossEntropyLoss()
    opt = second.optim.KFAC(model, loss_fn)
    x, y = torch.randint(0, 20, (4, 5)), torch.randint(0, 20, (4, 5))

    def closure(functional=False):
        opt.zero_grad()
        logits = model(x).reshape(-1, 20)
        if functional:
            loss = nn.functional.cross_entropy(logits, y.reshape(-1))
        else:
            loss = loss_fn(logits, y.reshape(-1))
        loss.backward()
        return loss

    opt.step(closure)  # the loss call re-did the statistics: the next forward leaves them to it
    steps = opt.param_groups[0]["factor_steps"]
    with pytest.warns(RuntimeWarning, match="adds no curvature statistics") as caught:
        opt.step(lambda: closure(functional=True))
    assert caught[0].filename == __file__
    assert opt.param_groups[0]["factor_steps"] == steps  # this batch added none
    opt.step(lambda: closure(functional=True))  # gathered in the forward pass again
    assert opt.param_groups[0]["factor_steps"] == steps + 1


def _assert_same(run_a, run_b, factors_only=False):
    (fa, pa), (fb, pb) = run_a, run_b
    pairs = zip(fa, fb) if factors_only else zip(fa + pa, fb + pb)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_loss_may_be_called_by_keyword_or_on_a_shifted_copy_or_a_transpose():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 20, (4, 6), generator=g), torch.randint(0, 20, (4, 6), generator=g)
    ref = _token_run(x, y, view=False)
    by_name = _token_run(
        x, y, loss=lambda fn, out, y: fn(input=out.reshape(-1, 20), target=y.reshape(-1))
    )
    _assert_same(by_name, ref)
    # the transformers' shifted copy: logits[:, :-1].contiguous().view(-1, V) against y[:, 1:]
    shifted = _token_run(
        x,
        y,
        loss=lambda fn, out, y: fn(out[:, :-1].contiguous().view(-1, 20), y[:, 1:].reshape(-1)),
    )
    ref_shifted = _token_run(x, y, view=False, loss=lambda fn, out, y: fn(out[:, :, :-1], y[:, 1:]))
    _assert_same(shifted, ref_shifted)
    # T == V: a transpose has the output's shape but not its classes
    xs, ys = torch.randint(0, 20, (3, 20), generator=g), torch.randint(0, 20, (3, 20), generator=g)
    square = _token_run(xs, ys, loss=lambda fn, out, y: fn(out.transpose(1, 2), y))
    _assert_same(square, _token_run(xs, ys, view=False))


class _SeqFirst(nn.Module):
    """Logits ``[T, B, V]`` (a sequence-first model) from rows in ``[T, B]`` order."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 6), nn.Linear(6, 20)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x.T)))


def test_a_sequence_first_output_and_layers_with_padding():
    # the loss on out.permute(1, 2, 0) ([B, V, T]) of a [T, B, V] output: the classes and the
    # ignored positions are the loss', mapped onto the output's [T, B] positions, which are
    # the layers' rows here (B == T: a mask taken by shape alone could be transposed)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 20, (5, 5), generator=g), torch.randint(0, 20, (5, 5), generator=g)
    padded = y.clone()
    padded[:, 3:] = -100

    def seq_loss(fn, out, y):
        return fn(out.permute(1, 2, 0), y)

    ref = TokenModel(classes_first=True)
    model = _SeqFirst()
    model.load_state_dict(ref.state_dict())
    _assert_same(
        _token_run(x, y, model=model, loss=seq_loss), _token_run(x, y, view=False, model=ref)
    )
    (f_pad, _), (f_cut, _) = (
        _token_run(x, padded, model=copy.deepcopy(model), loss=seq_loss, steps=1),
        _token_run(x[:, :3], y[:, :3], model=copy.deepcopy(model), loss=seq_loss, steps=1),
    )
    for a, b in zip(f_pad, f_cut):  # A and G: the padded positions left out of both
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_accumulation_with_every_forward_before_the_losses():
    # micro-batches whose forwards all run before their losses (padded, on views): after one
    # step the factors of the big batch, and later (when the loss calls do the statistics)
    # those of forward-loss pairs (before, all but the last micro-batch were dropped)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 20, (6, 5), generator=g), torch.randint(0, 20, (6, 5), generator=g)
    y[:, 4:] = -100

    def run(chunks, forwards_first, steps):
        torch.manual_seed(0)
        model = TokenModel().double()
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        opt = second.optim.KFAC(model, loss_fn, fisher="type2")

        def closure():
            opt.zero_grad()
            pairs = zip(x.chunk(chunks), y.chunk(chunks))
            if forwards_first:
                outs = [(model(xb), yb) for xb, yb in pairs]
            else:
                outs = ((model(xb), yb) for xb, yb in pairs)
            total = torch.zeros((), dtype=torch.float64)
            for out, yb in outs:
                loss = _flat_loss(loss_fn, out, yb)
                loss.backward()
                total = total + loss.detach()
            return total

        for _ in range(steps):
            opt.step(closure)
        return [layer.state_in(opt.state)[k] for layer in opt.layers for k in ("A", "G")]

    for a, b in zip(run(1, False, 1), run(2, True, 1)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(run(2, False, 3), run(2, True, 3)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class _Mixing(nn.Module):
    """Tokens -> Linear -> a causal running mean over positions -> Linear: positions coupled."""

    def __init__(self, classes_first=False):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(20, 6), nn.Linear(6, 6), nn.Linear(6, 20)
        self.classes_first = classes_first

    def forward(self, x):
        h = torch.tanh(self.mid(self.emb(x)))
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        out = self.head(h.cumsum(1) / steps)
        return out.transpose(1, 2) if self.classes_first else out


def test_position_coupling_layers_and_a_gradient_taken_before_the_loss():
    # layers that couple positions (attention does): the type-2 columns are one per class and
    # position of the output, as for the loss on [B, V, T]; and a backward through the output
    # before the cross-entropy call (an auxiliary z-loss) changes nothing
    g = torch.Generator().manual_seed(6)
    x, y = torch.randint(0, 20, (4, 5), generator=g), torch.randint(0, 20, (4, 5), generator=g)
    ref = _Mixing(classes_first=True)
    model = _Mixing()
    model.load_state_dict(ref.state_dict())
    _assert_same(_token_run(x, y, model=model), _token_run(x, y, view=False, model=ref))

    def with_z_loss(fn, out, y):
        (out.logsumexp(-1) ** 2).mean().mul(1e-4).backward(retain_graph=True)
        return _flat_loss(fn, out, y)

    (f_z, _), (f_ref, _) = (
        _token_run(x, y, model=copy.deepcopy(model), loss=with_z_loss, steps=1),
        _token_run(x, y, model=copy.deepcopy(ref), view=False, steps=1),
    )
    for a, b in zip(f_z, f_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_segmentation_loss_on_flattened_pixels_is_the_loss_on_the_output():
    # [B, C, H, W] logits with the loss on out.permute(0, 2, 3, 1).reshape(-1, C): the same
    # curvature as the loss on the output (a convolution in KFAC's "reduce" mode)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1)).double()
    x = torch.randn(3, 2, 5, 5, dtype=DT)
    y = torch.randint(0, 3, (3, 5, 5))
    runs = []
    for flat in (False, True):
        model = copy.deepcopy(net)
        loss_fn = nn.CrossEntropyLoss()
        opt = second.optim.KFAC(model, loss_fn, fisher="type2")

        def closure(model=model, loss_fn=loss_fn, opt=opt, flat=flat):
            opt.zero_grad()
            out = model(x)
            if flat:
                loss = loss_fn(out.permute(0, 2, 3, 1).reshape(-1, 3), y.reshape(-1))
            else:
                loss = loss_fn(out, y)
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        runs.append([layer.state_in(opt.state)[k] for layer in opt.layers for k in ("A", "G")])
        runs[-1] += [p.detach().clone() for p in model.parameters()]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_selection_map_is_exact_and_refuses_what_is_not_one():
    from second.optim._views import selection

    w = torch.ones((), requires_grad=True)
    out = torch.randn(2, 4, 5) * w
    for x in (
        out.reshape(-1, 5),
        out[:, :-1].contiguous().view(-1, 5),
        out.transpose(1, 2),
        out.reshape(-1, 5).bfloat16(),
    ):
        sel = selection(x, out)
        assert sel is not None and torch.equal(out.reshape(-1)[sel].to(x.dtype), x)
    for x in (2 * out, out.sum(-1), 0.5 * (out[..., :-1] + out[..., 1:]), torch.randn(3)):
        assert selection(x, out) is None


def test_a_batch_with_padding_after_one_without_computes_its_statistics_once(monkeypatch):
    # the loss call re-does a padded batch's statistics; once it has, later forwards leave
    # them to it, so a padded batch after an unpadded one is not computed twice (forward and
    # loss call): Monte-Carlo columns drawn 2, 1, 1 times for padded, plain, padded batches
    import second.optim._kfac_capture as capture_module

    calls = []
    real = capture_module.curvature_columns

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_module, "curvature_columns", counted)
    torch.manual_seed(0)
    model = TokenModel(classes_first=True).double()
    loss_fn = nn.CrossEntropyLoss()
    opt = second.optim.KFAC(model, loss_fn)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 20, (6, 7), generator=g), torch.randint(0, 20, (6, 7), generator=g)
    padded = y.clone()
    padded[:, 5:] = -100
    per_step = []
    for targets in (padded, y, padded):
        calls.clear()
        opt.step(closure_of(opt, model, loss_fn, x, targets))
        per_step.append(len(calls))
    assert per_step == [2, 1, 1]


class _Affine(nn.Module):
    """``inner(x) * scale + shift``: the model whose output is what the loss sees."""

    def __init__(self, inner, scale, shift):
        super().__init__()
        self.inner, self.scale, self.shift = inner, scale, shift

    def forward(self, x):
        return self.inner(x) * self.scale + self.shift


AFFINE_CASES = {  # (scale, shift over the classes): a temperature, a logit bias, an additive mask
    "temperature": (0.5, 0.0),
    "odd temperature": (1 / 3, 0.0),
    "logit bias": (1.0, "bias"),
    "additive mask": (1.0, "mask"),
    "temperature and bias": (-0.7, "bias"),
}


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat view", "classes first"])
@pytest.mark.parametrize("case", list(AFFINE_CASES))
def test_a_loss_on_a_scaled_or_shifted_output_gets_the_curvature_at_its_input(case, flat, fisher):
    # loss_fn(out / T + b) (distillation's temperature, a logit adjustment, a mask of classes):
    # KFAC takes the curvature of the loss as written, at its input's values and times the
    # scale on the way back, i.e. the factors and steps of a model whose output is
    # out / T + b itself; on the flat view of [B, T, V] logits as on [B, V, T] ones
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 20, (4, 6), generator=g), torch.randint(2, 20, (4, 6), generator=g)
    scale, kind = AFFINE_CASES[case]
    shift = torch.zeros(20, dtype=DT)
    if kind == "bias":
        shift = torch.randn(20, generator=g, dtype=DT)
    elif kind == "mask":
        shift[:2] = -1e4  # classes 0 and 1 masked off (no target is one of them)

    def on_flat(loss_fn, out, t):
        return loss_fn((out * scale + shift).reshape(-1, 20), t.reshape(-1))

    def on_classes_first(loss_fn, out, t):
        return loss_fn(out * scale + shift.reshape(20, 1), t)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mapped: no "unmapped" warning
        if flat:
            run = _token_run(x, y, loss=on_flat, fisher=fisher)
        else:
            run = _token_run(x, y, view=False, loss=on_classes_first, fisher=fisher)
    reference = _Affine(TokenModel(classes_first=True), scale, shift.reshape(20, 1))
    torch.manual_seed(0)  # the same inner parameters as _token_run's model
    reference.inner = TokenModel(classes_first=True)
    want = _token_run(x, y, view=False, model=reference, fisher=fisher)
    _assert_same(run, want)


def test_a_loss_on_a_function_of_the_output_is_reported_once():
    # a soft-capped output (tanh) is not a re-arrangement of the output's elements, scaled or
    # shifted: the curvature KFAC takes is loss_fn's on the output itself, and it says so,
    # once; a loss on a temperature (mapped) or on another tensor says nothing
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    opt = second.optim.KFAC(model, loss_fn)
    X, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))

    def closure(cap):
        def run():
            opt.zero_grad()
            out = model(X)
            value = loss_fn(out / 2.0 if cap is None else cap * torch.tanh(out / cap), y)
            value.backward()
            return value

        return run

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt.step(closure(None))
        unrelated = loss_fn(torch.randn(5, 3, requires_grad=True), y[:5])
        unrelated.backward()
        assert not [w for w in seen if "re-arrangement" in str(w.message)]
        opt.step(closure(5.0))
        opt.step(closure(5.0))
    found = [w for w in seen if "re-arrangement of its elements" in str(w.message)]
    assert len(found) == 1 and issubclass(found[0].category, RuntimeWarning)
    assert found[0].filename == __file__  # the loss line in the closure, not torch's Module


def test_a_clipped_update_is_compared_with_the_model_of_the_step_taken():
    # max_update_norm scales the step after the quadratic model chose it: the damping
    # adaptation must compare the loss change with the model's change of the clipped step
    # (it used the unclipped one: rho ~0.015 instead of ~0.99, the damping rose every time)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(32, 3, dtype=DT), torch.randint(0, 3, (32,))
    opt = second.optim.KFAC(
        model, loss_fn, fisher="type2", damping_adaptation_interval=1, max_update_norm=0.05
    )
    for _ in range(4):
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        out = model(X)
        loss = loss_fn(out, y)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, retain_graph=True)])
        F = second.exact_ggn(loss, out, params)

        def closure():
            opt.zero_grad()
            value = loss_fn(model(X), y)
            value.backward()
            return value

        opt.step(closure)
        d = torch.cat([(p.detach() - q).reshape(-1) for p, q in zip(model.parameters(), before)])
        assert float(d.norm()) == pytest.approx(0.05, rel=1e-9)
        damping = opt.last_info["damping"]
        taken = float(g @ d + 0.5 * d @ F @ d + 0.5 * damping * d @ d)
        assert opt.last_info["predicted_change"] == pytest.approx(taken, rel=0.05)
        assert 0.75 < opt.last_info["rho"] < 1.25


def test_parameters_without_a_gradient_do_not_move():
    # as in torch.optim: a parameter the loss does not use (grad None) gets no weight decay,
    # no momentum and no step; the others step as without it
    class TwoHeads(nn.Module):  # a second head this loss does not use
        def __init__(self, trunk):
            super().__init__()
            self.trunk, self.unused = trunk, nn.Linear(8, 2).double()

        def forward(self, x):
            return self.trunk(x)

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    alone = copy.deepcopy(trunk)
    model = TwoHeads(trunk)
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 3, (16,))
    nets = (model, alone)
    opts = [
        second.optim.KFAC(n, loss_fn, lr=0.1, momentum=0.9, weight_decay=0.1, fisher="type2")
        for n in nets
    ]
    unused = [p.detach().clone() for p in model.unused.parameters()]
    for _ in range(3):
        for opt, net in zip(opts, nets):
            opt.zero_grad()
            loss_fn(net(X), y).backward()
            opt.step()
    for p, q in zip(model.unused.parameters(), unused):
        assert torch.equal(p, q) and p.grad is None
    for p, q in zip(trunk.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_resumed_monte_carlo_run_gathers_its_statistics_where_the_uninterrupted_one_does():
    # whether a loss call re-does the forwards' statistics is part of the state: a resumed run
    # draws the same Monte-Carlo targets as the uninterrupted one (it drew them twice)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 20, (4, 6), generator=g), torch.randint(0, 20, (4, 6), generator=g)

    def run(split: int | None):
        torch.manual_seed(0)
        model = TokenModel().double()
        loss_fn = nn.CrossEntropyLoss()
        opt = second.optim.KFAC(model, loss_fn, fisher="mc", inverse_update_period=2)

        def closure():
            opt.zero_grad()
            value = _flat_loss(loss_fn, model(x), y)
            value.backward()
            return value

        for k in range(6):
            if k == split:
                state, weights, rng = (
                    opt.state_dict(),
                    copy.deepcopy(model.state_dict()),
                    (torch.get_rng_state()),
                )
                model = TokenModel().double()
                model.load_state_dict(weights)
                opt = second.optim.KFAC(model, loss_fn, fisher="mc", inverse_update_period=2)
                opt.load_state_dict(state)
                torch.set_rng_state(rng)
            opt.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(None), run(3)):
        assert torch.equal(a, b)


def test_losses_kfac_cannot_see_as_written_are_reported_once():
    # an elementwise loss on a slice of the output, or a cross-entropy computed without the
    # loss_fn given to KFAC on [B, T, V] logits: the curvature KFAC takes is another loss's,
    # so it says so (once); the same losses on the whole output or through loss_fn say nothing
    torch.manual_seed(0)
    X, Y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    x, y = torch.randint(0, 20, (4, 5)), torch.randint(0, 20, (4, 5))

    def steps(model, loss_fn, loss_of, data, n=2):
        opt = second.optim.KFAC(model, loss_fn, fisher="type2")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(n):

                def closure():
                    opt.zero_grad()
                    value = loss_of(model(data[0]), data[1])
                    value.backward()
                    return value

                opt.step(closure)
        return [str(w.message) for w in seen if "KFAC:" in str(w.message)]

    mse = nn.MSELoss()
    sliced = steps(tanh_net(), mse, lambda out, t: mse(out[:, -1:], t[:, -1:]), (X, Y))
    assert len(sliced) == 1 and "not all of its elements" in sliced[0]
    assert not steps(tanh_net(), mse, lambda out, t: mse(out.reshape(-1), t.reshape(-1)), (X, Y))
    ce = nn.CrossEntropyLoss()
    functional = steps(
        TokenModel().double(),
        ce,
        lambda out, t: nn.functional.cross_entropy(out.reshape(-1, 20), t.reshape(-1)),
        (x, y),
    )
    assert len(functional) == 1 and "classes along dim 1" in functional[0]
    assert not steps(TokenModel().double(), ce, lambda out, t: _flat_loss(ce, out, t), (x, y))
