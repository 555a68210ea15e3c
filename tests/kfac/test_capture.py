"""Capture: the layer calls of a forward pass; watch_forward: hooks around the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from second.kfac import Capture, find_layers, watch_forward


def test_records_every_call_and_a_reused_module_twice():
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.Tanh(), lin)
    layers = find_layers(net)
    assert len(layers) == 1  # one module, one rule
    X = torch.randn(4, 3)
    with Capture(layers) as cap:
        out = net(X)
    calls = cap.calls()
    assert [j for j, _, _ in calls] == [0, 0]
    torch.testing.assert_close(calls[0][1], X, rtol=0, atol=0)
    assert not calls[0][1].requires_grad  # inputs detached, outputs keep their graph
    assert calls[1][2] is out and out.requires_grad
    assert lin._forward_hooks == {}  # removed on exit


def test_inactive_or_no_grad_records_nothing():
    net = nn.Linear(2, 2)
    cap = Capture(find_layers(net)).__enter__()
    cap.active = False
    net(torch.randn(1, 2))
    cap.active = True
    with torch.no_grad():
        net(torch.randn(1, 2))
    assert cap.calls() == []
    cap.close()


def test_on_output_grads_sees_the_backward_of_each_call():
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.Tanh(), lin)
    X = torch.randn(4, 3)
    z1 = lin(X)  # reference: the gradient of the output sum at the first call's output
    (g1,) = torch.autograd.grad(lin(torch.tanh(z1)).sum(), z1)
    seen = []
    with Capture(find_layers(net)) as cap:
        out = net(X)
        cap.on_output_grads(lambda j, inp, g: seen.append((j, inp, g)))
    assert cap.calls() == []  # handed over to the tensor hooks
    out.sum().backward()
    assert len(seen) == 2 and all(j == 0 for j, _, _ in seen)
    by_input = {"first" if torch.equal(inp, X) else "second": g for _, inp, g in seen}
    torch.testing.assert_close(by_input["first"], g1)
    torch.testing.assert_close(by_input["second"], torch.ones(4, 3))


def test_watch_forward_ignores_deep_copies_and_dead_owners():
    class Owner:
        def __init__(self):
            self.before = self.after = 0

        def on_before(self, module, args):
            self.before += 1

        def on_after(self, module, args, kwargs, output):
            self.after += 1

    net, owner = nn.Linear(2, 1), Owner()
    watch = watch_forward(net, owner.on_before, owner.on_after)
    net(torch.ones(1, 2))
    copy.deepcopy(net)(torch.ones(1, 2))  # the copy carries the hooks, which ignore it
    assert (owner.before, owner.after) == (1, 1)
    del owner  # held weakly: the hooks become no-ops
    net(torch.ones(1, 2))
    watch.remove()
    assert net._forward_hooks == {} and net._forward_pre_hooks == {}


def test_attention_capture_restores_f_linear_even_when_the_forward_raises():
    from torch.nn import functional as F

    original = F.linear
    att = nn.MultiheadAttention(4, 2)
    layers = find_layers(att)
    assert len(layers) == 4  # q, k, v, out_proj
    with Capture(layers) as cap:
        x = torch.randn(3, 2, 4)
        att(x, x, x)
        assert F.linear is original  # wrapped only while the attention runs
        assert sorted(cap.outputs) == [0, 1, 2, 3]
        with pytest.raises(RuntimeError):
            att(x, torch.randn(3, 2, 5), torch.randn(3, 2, 5))  # wrong key width
        assert F.linear is original
    assert att._forward_hooks == {} and att._forward_pre_hooks == {}


def test_two_captures_both_see_the_attention():
    att = nn.MultiheadAttention(4, 2)
    x = torch.randn(3, 2, 4)
    with Capture(find_layers(att)) as a, Capture(find_layers(att)) as b:
        out = att(x, x, x)[0]
    assert sorted(a.outputs) == sorted(b.outputs) == [0, 1, 2, 3]
    for cap in (a, b):  # each capture's pieces lead to the output
        (g,) = torch.autograd.grad(out.sum(), cap.outputs[3], retain_graph=True)
        assert bool(g.abs().sum() > 0)


def test_an_input_passed_by_name_is_recorded():
    net = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with Capture(find_layers(net)) as cap:
        net(input=x)
    torch.testing.assert_close(cap.inputs[0][0], x, rtol=0, atol=0)
