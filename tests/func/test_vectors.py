"""Flat vectors <-> parameter-shaped tensors (``second.func.vectors``)."""

from __future__ import annotations

import pytest
import torch

from second.func import add_vector_to_parameters, parameters_to_vector, vector_to_parameters


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 2, generator=g, dtype=dtype).requires_grad_(True),
        torch.randn(4, generator=g, dtype=dtype).requires_grad_(True),
        torch.randn(1, 1, 2, generator=g, dtype=dtype).requires_grad_(True),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_vector_to_parameters_adds_in_place_untracked(dtype):
    params = _params(dtype)
    before = [p.detach().clone() for p in params]
    versions = [p._version for p in params]
    d = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=dtype)
    add_vector_to_parameters(d, params, alpha=-0.5)
    for p, b, piece, v in zip(params, before, vector_to_parameters(d, params), versions):
        assert torch.equal(p.detach(), b.add(piece, alpha=-0.5))  # bitwise p.add_(piece, alpha)
        assert p._version > v and p.is_leaf and p.requires_grad and p.grad_fn is None
    add_vector_to_parameters(d, iter(params))  # alpha 1; any iterable of parameters
    assert torch.equal(params[1].detach(), before[1] - 0.5 * d[6:10] + d[6:10])


def test_add_vector_to_parameters_refuses_a_wrong_size():
    params = _params()
    with pytest.raises(ValueError, match="13 entries but the parameters have 12"):
        add_vector_to_parameters(torch.zeros(13, dtype=torch.float64), params)
    with pytest.raises(ValueError, match="1-D"):
        add_vector_to_parameters(torch.zeros(12, 1, dtype=torch.float64), params)


def test_vector_to_parameters_gives_views_and_checks_sizes():
    params = _params()
    v = torch.arange(12.0, dtype=torch.float64)
    parts = vector_to_parameters(v, params)
    assert [t.shape for t in parts] == [p.shape for p in params]
    assert all(t._base is v for t in parts)  # views, no copy
    assert torch.equal(parameters_to_vector(parts), v)
    for n in (11, 13):
        with pytest.raises(ValueError, match=f"{n} entries but the parameters have 12 in total"):
            vector_to_parameters(torch.zeros(n), params)
    assert vector_to_parameters(torch.zeros(0), []) == ()


def test_parameters_to_vector_keeps_the_graph_and_refuses_none_or_empty():
    params = _params()
    flat = parameters_to_vector(params)
    (flat * torch.arange(12.0, dtype=torch.float64)).sum().backward()
    assert torch.equal(parameters_to_vector([p.grad for p in params]), torch.arange(12.0).double())
    with pytest.raises(ValueError, match="empty sequence"):
        parameters_to_vector([])
    with pytest.raises(ValueError, match="entry 1 is None"):
        parameters_to_vector([params[0], None])
    with pytest.raises(RuntimeError):  # not a None or an empty list: torch's own error
        parameters_to_vector([torch.zeros(2), torch.zeros(2, device="meta")])
