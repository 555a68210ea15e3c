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
