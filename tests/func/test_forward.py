"""second.func.forward: module JVPs by forward mode, by reverse over reverse, and the replay
of a training forward's random draws (dropout)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from second.func.forward import RandomState, module_jvp

DT = torch.float64
EXACT = dict(rtol=0, atol=0)  # the same operations on the same numbers
JVP_TOL = dict(rtol=1e-10, atol=1e-12)  # J v against a dense float64 Jacobian


def _dense_jv(model, names, params, X, tangents, rng=None):
    """``J v`` for each vector from the dense Jacobian (under ``rng``'s draws)."""

    def f(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (X,))

    with rng.replay() if rng is not None else nullcontext():
        J = torch.autograd.functional.jacobian(f, tuple(params))
    m = J[0].numel() // params[0].numel()  # the output's size
    return [
        sum(Jp.reshape(m, -1) @ t[i].reshape(-1) for Jp, t in zip(J, tangents))
        for i in range(tangents[0].shape[0])
    ]


def test_module_jvp_one_per_vector_matches_vmapped_and_dense():
    """The per-vector JVPs (convolutional models) equal the vmapped ones and dense J v."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    X = torch.randn(5, 1, 4, 4, dtype=DT)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    tangents = [torch.randn(2, *p.shape, dtype=DT) for p in params]
    out_v, Jv_v = module_jvp(model, names, params, ((X,), {}), tangents)
    out_l, Jv_l = module_jvp(model, names, params, ((X,), {}), tangents, vectorize=False)
    out_r, Jv_r = module_jvp(model, names, params, ((X,), {}), tangents, reverse=True)
    torch.testing.assert_close(out_l, out_v, **EXACT)
    torch.testing.assert_close(out_r, out_v, **EXACT)
    torch.testing.assert_close(Jv_l, Jv_v, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(Jv_r, Jv_v, rtol=1e-12, atol=1e-13)
    for i, dense in enumerate(_dense_jv(model, names, params, X, tangents)):
        torch.testing.assert_close(Jv_l[i].reshape(-1), dense, **JVP_TOL)


def test_random_state_replays_the_draws_and_restores_the_generator():
    drop = nn.Dropout(0.5)
    rng = RandomState(torch.device("cpu"))
    first = drop(torch.ones(64))
    after = torch.get_rng_state()
    with rng.replay():
        again = drop(torch.ones(64))
    torch.testing.assert_close(again, first, **EXACT)
    # the caller's stream goes on as if the replay had not happened
    assert torch.equal(torch.get_rng_state(), after)
    fresh = drop(torch.ones(64))
    assert not torch.equal(fresh, first)


@pytest.mark.parametrize("engine", ["vmap", "loop", "reverse"])
def test_module_jvp_draws_the_training_forwards_dropout_masks(engine):
    """With ``rng``, every engine differentiates the function the training forward computed:
    its primal output is that forward's, ``J v`` the dense Jacobian's under the same masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT)
    X = torch.randn(6, 4, dtype=DT)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    tangents = [torch.randn(2, *p.shape, dtype=DT) for p in params]
    rng = RandomState(torch.device("cpu"))
    trained = model(X).detach()  # the training forward: its masks follow the recording
    options = dict(vmap={}, loop=dict(vectorize=False), reverse=dict(reverse=True))[engine]
    out, Jv = module_jvp(model, names, params, ((X,), {}), tangents, rng=rng, **options)
    torch.testing.assert_close(out, trained, **EXACT)
    for i, dense in enumerate(_dense_jv(model, names, params, X, tangents, rng)):
        torch.testing.assert_close(Jv[i].reshape(-1), dense, **JVP_TOL)
    # without the recording the forward draws other masks: another function
    fresh, _ = module_jvp(model, names, params, ((X,), {}), tangents, **options)
    assert not torch.equal(fresh, trained)
