"""Distributed influence faults under gloo with a short process-group timeout.

Two processes run every scenario in turn (starting them dominates the cost): different
training data per rank, different test data, a rank whose share of the work raises, and
then a normal call, which must still work and equal the single-process result (the
ranks stayed in step), also with a cache directory per rank that only rank 0's run fills
with the dense curvature. Each rank records what it saw; the parent checks that every rank
failed with the message naming the cause, and none waited for the timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

from second import Influence

pytestmark = pytest.mark.distributed

TIMEOUT_S = 20  # the process group's: a rank left waiting would fail with gloo's timeout
DIST_RTOL = 1e-10

WORKER = textwrap.dedent(
    """
    import datetime, json, os, sys, torch, torch.distributed as dist
    from torch import nn
    from second import Influence
    rank, world, init, out, timeout = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=float(timeout)))

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)

    train, test = data(12, 1), data(2, 2)
    kw = dict(curvature="ggn", method="dense", damping=0.1, batch_size=4, progressbar=False)
    seen = {}

    def attempt(name, fn):
        try:
            fn()
            seen[name] = ["ok", ""]
        except Exception as e:
            seen[name] = [type(e).__name__, str(e)]

    # 1. rank 1 holds other training data
    attempt("train", lambda: Influence(model(), nn.CrossEntropyLoss(), train if rank == 0 else data(12, 7), **kw))
    # 2. same training data, other test data on rank 1
    inf = Influence(model(), nn.CrossEntropyLoss(), train, **kw)
    attempt("test", lambda: inf.scores(test if rank == 0 else data(2, 8)))
    # 3. rank 1 raises in its share of the training pass (it owns chunk 1 of 3)
    inf = Influence(model(), nn.CrossEntropyLoss(), train, **kw)
    inf.inverse_hvps(test)
    if rank == 1:
        def broken(X, y):
            raise RuntimeError("injected failure on rank 1")
        inf.fn.gradients = broken
    attempt("raise", lambda: inf.scores(test))
    # 4. the ranks are still in step: a normal call works
    S = Influence(model(), nn.CrossEntropyLoss(), train, **kw).scores(test)
    # 5. node-local cache directories: only rank 0 stores the dense curvature, so on the
    # second run only rank 0 finds it; the ranks agree to recompute it together
    cache = out + f".cache{rank}"
    Influence(model(), nn.CrossEntropyLoss(), train, cache_dir=cache, **kw).scores(test)
    S_cached = Influence(model(), nn.CrossEntropyLoss(), train, cache_dir=cache, **kw).scores(test)
    torch.save([S, S_cached], out + f".rank{rank}.pt")
    with open(out + f".rank{rank}.json", "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's finalization (distributed_cases.py)
    """
)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("dist-faults")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    init, out = f"file://{tmp / 'rendezvous'}", str(tmp / "res")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, out, str(TIMEOUT_S)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=10 * TIMEOUT_S)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return [
        (json.loads(open(f"{out}.rank{r}.json").read()), torch.load(f"{out}.rank{r}.pt"))
        for r in range(2)
    ]


def test_different_training_data_fails_on_every_rank(outcomes):
    for seen, _ in outcomes:
        kind, msg = seen["train"]
        assert kind == "ValueError" and "training data differs between ranks" in msg
        assert "rank(s) [1]" in msg


def test_different_test_data_fails_on_every_rank(outcomes):
    for seen, _ in outcomes:
        kind, msg = seen["test"]
        assert kind == "ValueError" and "test data differs between ranks" in msg


def test_a_raising_rank_makes_its_peer_raise_instead_of_wait(outcomes):
    (seen0, _), (seen1, _) = outcomes
    assert seen1["raise"] == ["RuntimeError", "injected failure on rank 1"]
    kind, msg = seen0["raise"]
    assert kind == "RuntimeError" and "rank(s) [1] raised an error" in msg
    assert "timed out" not in msg.lower() and "timeout" not in msg.lower()


def test_the_ranks_stay_in_step_after_the_failures(outcomes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
            0, 3, (n,), generator=g
        )

    expected = Influence(
        model,
        nn.CrossEntropyLoss(),
        data(12, 1),
        curvature="ggn",
        method="dense",
        damping=0.1,
        batch_size=4,
        progressbar=False,
        distributed=False,
    ).scores(data(2, 2))
    for _, results in outcomes:
        for S in results:  # a plain call, and one with node-local caches
            torch.testing.assert_close(S, expected, rtol=DIST_RTOL, atol=0)
