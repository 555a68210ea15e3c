"""SOAP, Shampoo, Sophia, SophiaH and AdaHessian under torch.distributed: two gloo ranks with
different data (DDP averages the gradients) end with equal parameters; the curvature
estimates, which differ per rank (own data, own random signs), are averaged by the optimizer.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from preconditioner_cases import LOSS, NAMES, OPTIONS, batch, build, model

pytestmark = pytest.mark.distributed
STEPS = 4


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
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
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_with_equal_parameters():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        start = [p.detach() for p in model().parameters()]
        for name in NAMES:
            p0 = torch.load(os.path.join(tmp, f"{name}-0.pt"))
            p1 = torch.load(os.path.join(tmp, f"{name}-1.pt"))
            for a, b in zip(p0, p1):
                assert torch.equal(a, b), name
            assert not torch.equal(p0[0], start[0]), name  # it moved
