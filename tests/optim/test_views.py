"""The loss input as a re-arrangement of the model output (``second.optim._views``)."""

from __future__ import annotations

import torch

from second.optim import _views
from second.optim._views import depends_on, graph_signature, loss_on_output


def _output():
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    return torch.randn(4, 6, 3, dtype=torch.float64) @ w  # [B, T, V] logits


def test_the_map_is_found_once_per_graph_and_reused(monkeypatch):
    # a training loop re-arranges its output the same way every step: the second call finds
    # the map in the cache (no backward pass), and gives what a fresh search gives
    calls = []
    find = _views.selection
    monkeypatch.setattr(_views, "selection", lambda x, out: calls.append(1) or find(x, out))
    monkeypatch.setattr(_views, "_placements", type(_views._placements)())
    y = torch.randint(0, 5, (4, 5))
    results = []
    for _ in range(3):
        out = _output()
        x = out[:, :-1].contiguous().view(-1, 5)
        state = torch.get_rng_state()
        results.append(loss_on_output(x, out, y.reshape(-1), -100))
        assert torch.equal(torch.get_rng_state(), state)  # the user's random stream untouched
    assert len(calls) == 1
    for dim, target in results:
        assert dim == 2 and torch.equal(target, results[0][1])
    want = torch.full((4, 6), -100)
    want[:, :-1] = y
    assert torch.equal(results[0][1], want)


def test_the_signature_tells_re_arrangements_apart():
    out = _output()
    shifted = [out[:, :-1].reshape(-1, 5), out[:, 1:].reshape(-1, 5)]
    split = out.unbind(1)[:2]
    for a, b in (shifted, split):
        assert graph_signature(a, out) != graph_signature(b, out)
    y = torch.arange(20) % 5
    first, second = (loss_on_output(x, out, y, -100)[1] for x in shifted)
    assert torch.equal(first[:, :-1], second[:, 1:]) and (first[:, -1] == -100).all()
    # a node that saves a tensor (a mask, an index) makes the map depend on values: no key
    mask = torch.ones(5, dtype=torch.float64)
    assert graph_signature((out * mask).reshape(-1, 5), out) is None
    assert graph_signature(out[:, torch.tensor([0, 2])].reshape(-1, 5), out) is None
    assert graph_signature(out.reshape(-1, 5), out) is not None


def test_depends_on_walks_the_graph_without_a_backward_pass():
    w = torch.randn(3, requires_grad=True)
    t = torch.randn(4, 3) * w
    a, b = t.split(2)
    fired = []
    t.register_hook(lambda grad: fired.append(1))  # a user's hook on the output
    assert depends_on(a * 2, a) and depends_on(a.reshape(-1), t) and depends_on(t.sum(), w)
    assert not depends_on(b * 2, a)  # the other chunk of the same split
    assert not depends_on(t, a) and not depends_on(torch.randn(3, requires_grad=True) * 1, w)
    assert not fired
