"""An Influence sharded over a torch.distributed group (influence/_sharding.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from influence_cases import rel
from second import Influence

DIST_RTOL = 1e-10  # 2-process gloo vs single process


WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    from second import Influence
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(23, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    res = {}
    for method in ("dense", "cg"):
        inf = Influence(model, nn.CrossEntropyLoss(), (X, y), curvature="ggn", method=method,
                        damping=0.1, batch_size=4, progressbar=False)
        res[method] = dict(scores=inf.scores((X[:5], y[:5])), self=inf.self_influence(),
                           loo=inf.newton_loo((X[:2], y[:2]), [1, 7, 20]))
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's finalization (distributed_cases.py)
    """
)


@pytest.mark.distributed
def test_two_process_gloo_equals_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    out = tmp_path / "res.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    got = torch.load(out)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(23, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    for method in ("dense", "cg"):
        inf = Influence(
            model,
            nn.CrossEntropyLoss(),
            (X, y),
            curvature="ggn",
            method=method,
            damping=0.1,
            batch_size=4,
            progressbar=False,
        )
        assert rel(got[method]["scores"], inf.scores((X[:5], y[:5]))) < DIST_RTOL
        assert rel(got[method]["self"], inf.self_influence()) < DIST_RTOL
        assert rel(got[method]["loo"], inf.newton_loo((X[:2], y[:2]), [1, 7, 20])) < DIST_RTOL
