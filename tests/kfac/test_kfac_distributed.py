"""KFAC under torch.distributed: two gloo processes equal one process on the whole batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

import second
from distributed_cases import spawn_ranks

DIST_TOL = dict(rtol=1e-9, atol=1e-11)  # float64; all-reduce only changes summation order
STEPS = 3

# torch.func's forward-mode (the optimizer's quadratic model) still scripts with torch.jit
pytestmark = pytest.mark.distributed
N = 16


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return X, y


def _train(model, X, y, ddp_model=None):
    loss_fn = nn.CrossEntropyLoss()
    net = ddp_model if ddp_model is not None else model
    opt = second.optim.KFAC(
        net, loss_fn, fisher="type2", damping=0.1, damping_adaptation_interval=1
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(net(X), y)
        loss.backward()
        return loss

    for _ in range(STEPS):
        opt.step(closure)
    # the operator, too: factors of all ranks' data
    K = second.KFACOperator(net, loss_fn, (X, y), fisher="type2")
    return (
        [p.detach().clone() for p in model.parameters()],
        K.layers[0][1],
        opt.param_groups[0]["damping"],
    )


def _worker(rank, world, out_file):
    X, y = _data()
    shard = slice(rank * N // world, (rank + 1) * N // world)
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    result = _train(model, X[shard], y[shard], ddp)
    if rank == 0:
        torch.save(result, out_file)
    del ddp


def test_two_processes_equal_one_process():
    X, y = _data()
    model = _model()
    params, A0, damping = _train(model, X, y)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "out.pt")
        spawn_ranks(_worker, 2, out_file)
        dparams, dA0, ddamping = torch.load(out_file)
    assert ddamping == pytest.approx(damping, rel=1e-9)
    torch.testing.assert_close(dA0, A0, **DIST_TOL)
    for p, q in zip(dparams, params):
        torch.testing.assert_close(p, q, **DIST_TOL)
