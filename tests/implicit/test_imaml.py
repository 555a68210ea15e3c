"""second.implicit.imaml against dense solves and the hypergradient; the examples (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import hessian, jacrev

import second
from implicit_cases import (
    COSINE_MIN,
    REL_TOL,
    rel,
)
from second import hypergradient
from second.implicit import imaml


# ----------------------------------------------------------------------------- iMAML
def imaml_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(10, 1, generator=g, dtype=torch.float64)
    y = torch.sin(3 * X)
    Xq = torch.randn(10, 1, generator=g, dtype=torch.float64)
    yq = torch.sin(3 * Xq)
    theta = {
        "w1": 0.5 * torch.randn(8, 1, generator=g, dtype=torch.float64),
        "b1": torch.zeros(8, dtype=torch.float64),
        "w2": 0.5 * torch.randn(1, 8, generator=g, dtype=torch.float64),
    }

    def net(p, x):
        return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T

    def task(p):
        return ((net(p, X) - y) ** 2).mean()

    def test(p):
        return ((net(p, Xq) - yq) ** 2).mean()

    return theta, task, test


def test_imaml_meta_gradient_matches_dense_and_hypergradient():
    theta, task, test = imaml_task()
    lam = 2.0
    w = imaml.adapt(task, theta, lam, steps=3000, lr=0.1, momentum=0.9)
    result = imaml.meta_gradient(task, test, w, lam)
    assert isinstance(result, imaml.MetaGradient)  # a named tuple: one return type
    grad, res = result
    assert result.grad is grad and result.solve is res
    assert res.converged and set(grad) == set(theta)

    keys = list(theta)
    shapes = [theta[k].shape for k in keys]

    def unflat(z):
        out, o = {}, 0
        for k, s in zip(keys, shapes, strict=True):
            n = int(torch.Size(s).numel())
            out[k] = z[o : o + n].reshape(s)
            o += n
        return out

    z = torch.cat([w[k].reshape(-1) for k in keys])
    H = hessian(lambda z: task(unflat(z)))(z)
    g = jacrev(lambda z: test(unflat(z)))(z)
    dense = torch.linalg.solve(torch.eye(len(z), dtype=z.dtype) + H / lam, g)
    got = torch.cat([grad[k].reshape(-1) for k in keys])
    assert second.cosine_similarity(got, dense) >= COSINE_MIN
    assert rel(got, dense) <= REL_TOL[torch.float64]

    # the same thing through the general API: d test / d theta through the proximal problem
    hg = hypergradient(imaml.proximal(task, lam), lambda p, t: test(p), w, theta)
    assert rel(torch.cat([hg.grad[k].reshape(-1) for k in keys]), dense) <= REL_TOL[torch.float64]


def test_imaml_adapt_solves_the_proximal_problem():
    f = lambda w: ((w - 3.0) ** 2).sum()
    w = imaml.adapt(f, torch.zeros(3, dtype=torch.float64), lam=2.0, steps=300, lr=0.1)
    assert torch.allclose(w, torch.full((3,), 1.5, dtype=torch.float64))
    theta = (torch.zeros(2, requires_grad=True),)
    w = imaml.adapt(lambda p: (p[0] ** 2).sum(), theta, 1.0, steps=2)
    assert isinstance(w, tuple) and not w[0].requires_grad


def test_imaml_bad_arguments():
    f = lambda w: (w**2).sum()
    with pytest.raises(ValueError, match="lam"):
        imaml.proximal(f, 0.0)
    with pytest.raises(ValueError, match="lam"):
        imaml.meta_gradient(f, f, torch.zeros(2), -1.0)
    with pytest.raises(ValueError, match="momentum"):
        imaml.adapt(f, torch.zeros(2), 1.0, momentum=1.0)


def test_imaml_frozen_parameters_are_refused():
    # a frozen nn.Parameter (requires_grad=False) silently became an adapted inner variable
    theta, task, test = imaml_task()
    net = {k: torch.nn.Parameter(v.clone()) for k, v in theta.items()}
    net["b1"].requires_grad_(False)
    with pytest.raises(ValueError, match=r"params holds frozen parameters .*params\['b1'\]"):
        imaml.meta_gradient(task, test, net, 2.0)
    with pytest.raises(ValueError, match=r"theta holds frozen parameters .*theta\['b1'\]"):
        imaml.adapt(task, net, 2.0, steps=1)

    # leaving it out (a constant of task and test) gives the dense meta-gradient
    b1 = theta["b1"]
    free = {k: v for k, v in theta.items() if k != "b1"}
    task_w = lambda p: task({**p, "b1": b1})
    test_w = lambda p: test({**p, "b1": b1})
    w = imaml.adapt(task_w, free, 2.0, steps=3000, lr=0.1, momentum=0.9)
    grad, _ = imaml.meta_gradient(task_w, test_w, w, 2.0)
    keys = list(free)

    def unflat(z):
        out, o = {}, 0
        for k in keys:
            n = free[k].numel()
            out[k] = z[o : o + n].reshape(free[k].shape)
            o += n
        return out

    z = torch.cat([w[k].reshape(-1) for k in keys])
    H = hessian(lambda z: task_w(unflat(z)))(z)
    g = jacrev(lambda z: test_w(unflat(z)))(z)
    dense = torch.linalg.solve(torch.eye(len(z), dtype=z.dtype) + H / 2.0, g)
    assert set(grad) == set(keys)
    assert rel(torch.cat([grad[k].reshape(-1) for k in keys]), dense) <= REL_TOL[torch.float64]


def test_imaml_negative_damping_is_refused():
    f = lambda w: (w**2).sum()
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            imaml.meta_gradient(f, f, torch.zeros(2), 1.0, damping=bad)


# ----------------------------------------------------------------------------- examples (slow)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name, *args, timeout=900):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_weight_decay_example_lowers_validation_loss(tmp_path):
    out = run_example(
        "hyperparameter_weight_decay.py", "--outer-steps", "15", "--out", str(tmp_path / "wd.png")
    )
    line = next(ln for ln in out.splitlines() if ln.startswith("validation CE"))
    before, after = (float(t.rstrip(",")) for t in line.split()[2:5:2])
    assert after < 0.5 * before
    assert (tmp_path / "wd.png").stat().st_size > 0


@pytest.mark.slow
def test_imaml_example_beats_first_order_maml(tmp_path):
    out = run_example("imaml_sinusoid.py", "--quick", "--out", str(tmp_path / "imaml.png"))
    assert "(below first-order MAML)" in out
    assert (tmp_path / "imaml.png").stat().st_size > 0
