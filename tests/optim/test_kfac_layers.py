"""second.optim.KFAC on the layers of second.kfac.rules: attention, norms, weight sharing.

The optimizer's first fixed-step direction (type-2 Fisher, one factor update, so the
bias-corrected running factors are the batch's) equals the KFAC operator's pi-damped
inverse applied to the gradient: the attention's Q/K/V rows, ``out_proj`` and the
normalization layers' exact diagonals land where they belong in the optimizer too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kfac_cases import DT, INVERSE_TOL, closure_of
from second import KFACOperator
from second.optim import KFAC


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x)
        h = self.norm(h + self.att(h, h, h, need_weights=False)[0])
        return self.out(h).mean(1)


def _first_direction(model, loss_fn, X, y, lam, **kwargs):
    opt = KFAC(model, loss_fn, lr=1.0, momentum=0.0, damping=lam, fisher="type2", **kwargs)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    opt.step(closure)
    delta = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())])
    return opt, delta


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_first_step_is_the_operators_damped_inverse(weight_sharing):
    torch.manual_seed(0)
    model = TinyTransformer().double()
    X, y = torch.randn(5, 4, 3, dtype=DT), torch.randint(0, 4, (5,))
    loss_fn, lam = nn.CrossEntropyLoss(), 0.1
    ref = copy.deepcopy(model)
    K = KFACOperator(ref, loss_fn, (X, y), weight_sharing=weight_sharing)
    assert K.fallback_parameters == [ref.norm.weight, ref.norm.bias]
    loss = loss_fn(ref(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(ref.parameters()))])
    want = K.inverse(lam, pi_damping=True) @ g
    opt, delta = _first_direction(model, loss_fn, X, y, lam, weight_sharing=weight_sharing)
    torch.testing.assert_close(delta, want, **INVERSE_TOL)
    labels = opt.approximations()
    assert labels["att.in_proj_weight"] == f"kronecker-{weight_sharing}"
    assert labels["norm.weight"] == "diagonal-exact"
    assert labels == K.approximations()


def test_state_dict_round_trip_keeps_the_attention_blocks():
    torch.manual_seed(0)
    model = TinyTransformer()
    X, y = torch.randn(6, 4, 3), torch.randint(0, 4, (6,))
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(model, loss_fn)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    st = opt.state[model.att.in_proj_weight]
    assert {"rows[0:8]", "rows[8:16]", "rows[16:24]"} <= set(st)  # Q, K, V factors
    sd = copy.deepcopy(opt.state_dict())
    opt2 = KFAC(model, loss_fn)
    opt2.load_state_dict(sd)
    st2 = opt2.state[model.att.in_proj_weight]
    for key in ("rows[0:8]", "rows[16:24]"):
        for name in ("A", "G"):
            torch.testing.assert_close(st2[key][name], st[key][name], rtol=0, atol=0)


def test_auto_weight_sharing_reduces_conv2d_and_expands_the_rest():
    """The default ``"auto"``: an image convolution reduces, attention and a Conv1d expand."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.conv1d = nn.Conv1d(2, 4, 3)
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv1d(torch.tanh(self.conv(x)).flatten(2)).transpose(1, 2)  # [n, T, 4]
            h = self.att(h, h, h, need_weights=False)[0]
            return self.head(h.mean(1))

    torch.manual_seed(0)
    model, loss_fn = Net().to(DT), nn.CrossEntropyLoss()
    X, y = torch.randn(8, 1, 6, 6, dtype=DT), torch.randint(0, 3, (8,))
    opt = KFAC(model, loss_fn)
    loss_fn(model(X), y).backward()
    opt.step()
    got = opt.approximations()
    assert got["conv.weight"] == got["conv.bias"] == "kronecker-reduce"
    assert got["conv1d.weight"] == "kronecker-expand"
    assert got["att.in_proj_weight"] == got["att.out_proj.weight"] == "kronecker-expand"
    assert (
        KFAC(copy.deepcopy(model), loss_fn, weight_sharing="expand").layers[0].weight_sharing
        == "expand"
    )


def test_grouped_convolution_blocks_in_the_optimizer_and_its_state_dict():
    """A depthwise convolution: one block per group in the optimizer's state (rows of the
    weight); a saved and restored optimizer continues bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.Flatten(),
        nn.Linear(4 * 25, 3),
    )
    X, y = torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(model, loss_fn)

    for _ in range(3):
        opt.step(closure_of(opt, model, loss_fn, X, y))
    assert {f"rows[{j}:{j + 1}]" for j in range(4)} <= set(opt.state[model[2].weight])
    assert opt.approximations()["2.weight"] == "kronecker-reduce"
    twin = copy.deepcopy(model)
    opt2 = KFAC(twin, loss_fn)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        opt.step(closure_of(opt, model, loss_fn, X, y))
        opt2.step(closure_of(opt2, twin, loss_fn, X, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
