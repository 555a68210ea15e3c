"""Run a function on ``world`` gloo ranks (spawned processes) with one orderly set-up and teardown.

Every rank joins the group through a file in a fresh directory; at the end, whether the
function returned or raised, each rank drops what it holds of the group (DDP wrappers,
optimizers; collected before teardown), waits at a barrier for its peers, and leaves the
group. A rank that tears its group down while a peer still talks to it, or that leaves
gloo's threads to the interpreter's exit, can abort the process (``terminate called
without an active exception``) though every result is right; a rank that
has left its group therefore exits at once (:func:`exit_now`).
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, init_file: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_now()


def exit_now() -> None:
    """End a rank that has left its group without the interpreter's finalization.

    At finalization, gloo's worker threads can still be joinable and abort the process
    (SIGABRT, ``terminate called without an active exception``) after every result was
    written: about one run in ten on a 2-core machine with torch 2.13.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, world: int, *args) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` gloo ranks; raise if any rank fails."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_rank, args=(world, init_file, fn, args), nprocs=world, join=True)
