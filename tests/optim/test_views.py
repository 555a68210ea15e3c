"""The loss input as a re-arrangement of the model output (``second.optim._views``)."""

from __future__ import annotations

import pytest
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
    find = _views.affine_selection
    monkeypatch.setattr(_views, "affine_selection", lambda x, out: calls.append(1) or find(x, out))
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
    for view in results:
        assert view.dim == 2 and torch.equal(view.target, results[0].target)
        assert view.scale == 1.0 and view.values is None
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
    # one cast (bfloat16 logits to float32) is known from the ends; two are not
    assert graph_signature(out.float().reshape(-1, 5), out) is not None
    assert graph_signature(out.half().double().reshape(-1, 5), out) is None


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


def test_graphs_that_cannot_be_read_are_not_mapped_and_do_not_raise():
    # a graph already freed (a loss evaluated again after its backward), a compiled one (no
    # double backward): no map, no error; an in-place op on a slice hides its operand, so
    # such graphs are searched every time rather than cached
    import torch.nn as nn

    lin = nn.Linear(3, 3).double()
    y = torch.randint(0, 3, (8,))
    a = lin(torch.randn(2, 4, 3, dtype=torch.float64))
    a.sum().backward()
    b = lin(torch.randn(2, 4, 3, dtype=torch.float64))
    assert graph_signature(a.reshape(-1, 3), b) is None
    assert loss_on_output(a.reshape(-1, 3), b, y, -100) is None

    @torch.compile(backend="aot_eager")
    def shift(t):
        return t[:, :-1].reshape(-1, t.shape[-1])

    out = _output()
    assert loss_on_output(shift(out), out, torch.randint(0, 5, (20,)), -100) is None

    out = _output()
    x = out.clone()
    x[..., 0].mul_(0.5)
    assert graph_signature(x.reshape(-1, 5), out) is None
    assert loss_on_output(x.reshape(-1, 5), out, torch.randint(0, 5, (24,)), -100) is None


def test_smoothed_probabilities_are_mapped_only_onto_all_positions():
    # label smoothing is not linear in the targets: on a shifted copy the positions the loss
    # does not see would get weight eps, so no map; a full re-arrangement maps
    out = _output()
    p = torch.softmax(torch.randn(4, 6, 5, dtype=torch.float64), -1)
    shifted = out[:, :-1].reshape(-1, 5), p[:, :-1].reshape(-1, 5)
    assert loss_on_output(*shifted[:1], out, shifted[1], -100, "mean", 0.2) is None
    assert loss_on_output(*shifted[:1], out, shifted[1], -100, "mean", 0.0) is not None
    view = loss_on_output(out.reshape(-1, 5), out, p.reshape(-1, 5), -100, "mean", 0.2)
    assert view.dim == 2 and torch.equal(view.target, p.transpose(1, 2))


def test_a_scaled_or_shifted_selection_is_found_and_keyed_by_its_numbers():
    # x = s * (elements of out) + c: found with its scale and cached; a shift's constant does
    # not change the map (same key), a scale does (another key)
    from second.optim._views import affine_selection, path_kind

    out = _output()
    bias, mask = torch.randn(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    mask[:2] = float("-inf")
    for x, scale in (
        ((out / 3.0).reshape(-1, 5), 1 / 3),
        ((out + bias).reshape(-1, 5), 1.0),
        ((out + mask).reshape(-1, 5), 1.0),
        ((bias - 0.5 * out)[:, :-1].reshape(-1, 5), -0.5),
        (-(out * torch.tensor(2.0, dtype=torch.float64)).transpose(1, 2), -2.0),
    ):
        assert path_kind(x, out) in ("scaled", "shifted")
        sel, s, shifted = affine_selection(x, out)
        assert shifted == (path_kind(x, out) == "shifted") and s == pytest.approx(scale, rel=1e-15)
        c = x - s * out.reshape(-1)[sel]
        assert torch.allclose(c, c.reshape(-1, 5)[:1].expand_as(c.reshape(-1, 5)).reshape(c.shape))
    assert graph_signature((out + bias).reshape(-1, 5), out) == graph_signature(
        (out + 7.0).reshape(-1, 5), out
    )
    assert graph_signature((out / 2.0).reshape(-1, 5), out) != graph_signature(
        (out / 3.0).reshape(-1, 5), out
    )
    assert graph_signature((bias - out).reshape(-1, 5), out) != graph_signature(
        (out - bias).reshape(-1, 5), out
    )


def test_what_is_not_a_scaled_or_shifted_selection_is_refused_without_a_search(monkeypatch):
    # arithmetic with something that is not a number (per-class factors), with another tensor
    # that requires gradients, a replacement (masked_fill), a nonlinearity: no map, found by a
    # walk of the graph (no backward pass: the search is never called)
    from second.optim._views import path_kind

    def no_search(*args, **kwargs):
        raise AssertionError("searched")

    monkeypatch.setattr(_views, "_search", no_search)
    out = _output()
    other = torch.randn(5, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([True, True, False, True, True])
    y = torch.randint(0, 5, (24,))
    for x in (
        out * torch.linspace(1, 2, 5, dtype=torch.float64),
        out + other,
        out + out,
        1.0 / out,
        out.masked_fill(~keep, float("-inf")),
        5.0 * torch.tanh(out / 5.0),
        out.softmax(-1),
        torch.cat([out, torch.zeros(1, 6, 5, dtype=torch.float64)]),  # rows from a constant
    ):
        assert path_kind(x.reshape(-1, 5), out) is None
        assert loss_on_output(x.reshape(-1, 5), out, y, -100) is None
    assert path_kind(out[torch.ones(4, 6, dtype=torch.bool)], out) == "selection"
    assert path_kind(torch.cat([out[:2], out[2:]]).reshape(-1, 5), out) == "selection"
