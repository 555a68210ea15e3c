"""second.distributed: no-ops on one process, the collectives under a one-rank gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from second import distributed as dist


def test_without_a_process_group_everything_is_local():
    assert (dist.active(), dist.rank(), dist.world_size(), dist.is_main()) == (False, 0, 1, True)
    a, b = torch.ones(2), torch.arange(3.0)
    assert dist.all_reduce_sum([a, b])[1] is b
    torch.testing.assert_close(b, torch.arange(3.0))
    torch.testing.assert_close(dist.all_gather(a), a[None])
    assert dist.all_ranks(False, a.device) is False
    dist.check_same_across_ranks("x", "abc", a.device)
    with dist.failure_barrier("p", a.device):
        pass
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        dist.active(True)
    assert dist.active(False) is False


@pytest.fixture
def one_rank_group(tmp_path):
    if not tdist.is_available() or not tdist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tdist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    yield
    tdist.destroy_process_group()


def test_collectives_in_a_group(one_rank_group):
    assert (dist.active(), dist.rank(), dist.world_size()) == (True, 0, 1)
    assert dist.active(False) is False
    a, b = torch.ones(2, 2), torch.arange(3.0)
    out = dist.all_reduce_sum([a, b])  # packed into one buffer and unpacked in place
    torch.testing.assert_close(out[0], torch.ones(2, 2))
    torch.testing.assert_close(out[1], torch.arange(3.0))
    torch.testing.assert_close(dist.all_gather(b), b[None])
    assert dist.all_ranks(True, b.device) is True
    dist.check_same_across_ranks("the data", "0123456789abcdef", b.device)
    with pytest.raises(ValueError, match="local failure"):
        with dist.failure_barrier("a phase", b.device):
            raise ValueError("local failure")
