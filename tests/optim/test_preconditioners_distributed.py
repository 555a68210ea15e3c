"""SOAP, Shampoo, Sophia, SophiaH and AdaHessian under torch.distributed: two gloo ranks with
different data (DDP averages the gradients) end with equal parameters; the curvature
estimates, which differ per rank (own data, own random signs), are averaged by the optimizer.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

from distributed_cases import spawn_ranks
from preconditioner_cases import LOSS, NAMES, OPTIONS, batch, build, model

pytestmark = pytest.mark.distributed
STEPS = 4


def _worker(rank, world, out_dir):
    for name in NAMES:
        net = model()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = build(name, net, **OPTIONS[name])
        for k in range(STEPS):
            X, y = batch(100 * rank + k)  # each rank its own data

            def closure(X=X, y=y, opt=opt, ddp=ddp):
                opt.zero_grad()
                loss = LOSS(ddp(X), y)
                loss.backward()
                return loss

            opt.step(closure)
        torch.save(
            [p.detach() for p in net.parameters()], os.path.join(out_dir, f"{name}-{rank}.pt")
        )
        del ddp, opt


def test_two_ranks_end_with_equal_parameters():
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_worker, 2, tmp)
        start = [p.detach() for p in model().parameters()]
        for name in NAMES:
            p0 = torch.load(os.path.join(tmp, f"{name}-0.pt"))
            p1 = torch.load(os.path.join(tmp, f"{name}-1.pt"))
            for a, b in zip(p0, p1):
                assert torch.equal(a, b), name
            assert not torch.equal(p0[0], start[0]), name  # it moved


class _Branches(nn.Module):
    """The shared model plus a branch used on rank 1 only and a parameter no rank uses."""

    def __init__(self):
        super().__init__()
        self.net = model()
        self.branch = nn.Parameter(torch.full((3,), 0.1, dtype=torch.float64))
        self.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x, rank):
        out = self.net(x)
        return out + self.branch if rank == 1 else out


#: the optimizers that differentiate the closure's loss themselves (and average the gradient)
DIAGONAL = ["Sophia", "SophiaH", "AdaHessian"]


def _worker_unused(rank, world, out_dir):
    for name in DIAGONAL:
        torch.manual_seed(0)
        net = _Branches()
        ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
        kw = dict(OPTIONS[name], weight_decay=0.1)
        if name == "Sophia":
            opt = so_build_sophia(net, kw)
        else:
            opt = build(name, net, **kw)
        for k in range(STEPS):
            X, y = batch(100 * rank + k)

            def closure(X=X, y=y, opt=opt, ddp=ddp):
                opt.zero_grad()
                loss = LOSS(ddp(X, rank), y)
                loss.backward()
                return loss

            opt.step(closure)
        out = [p.detach() for p in net.parameters()]
        torch.save(
            (out, net.unused in opt.state and bool(opt.state[net.unused])),
            os.path.join(out_dir, f"{name}-{rank}.pt"),
        )
        del ddp, opt


def so_build_sophia(net, kw):
    import second.optim as so

    return so.Sophia(net.net, LOSS, params=net.parameters(), **kw)


def test_parameters_unused_on_some_ranks():
    # the gradient is averaged with the same tensors on every rank (zeros where a rank does
    # not use a parameter): the ranks stay equal, a parameter used on one rank is stepped on
    # all, one used on none is skipped everywhere (no state, no weight decay)
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_worker_unused, 2, tmp)
        for name in DIAGONAL:
            (p0, state0), (p1, state1) = (
                torch.load(os.path.join(tmp, f"{name}-{r}.pt")) for r in (0, 1)
            )
            for a, b in zip(p0, p1):
                assert torch.equal(a, b), name
            branch, unused = p0[0], p0[1]  # own parameters come first
            assert not torch.equal(branch, torch.full((3,), 0.1, dtype=torch.float64)), name
            assert torch.equal(unused, torch.ones(2, dtype=torch.float64)), name
            assert not state0 and not state1, name
