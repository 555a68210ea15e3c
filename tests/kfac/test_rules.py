"""Layer rules: the registry by module type, supported modules, the matrix form."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kfac_cases import DT, EXACT_TOL, dense_ggn, layer_blocks
from second import KFACOperator
from second.kfac import (
    RULES,
    ConvRule,
    ConvTransposeRule,
    EmbeddingRule,
    LinearRule,
    find_layers,
    rule_for,
)


class Dense(nn.Module):
    """A user's own linear layer (not an nn.Linear): unsupported until a rule registers."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@pytest.fixture
def dense_rule():
    """Register a rule for ``Dense`` the way a newcomer would, and unregister it after."""

    class DenseRule(LinearRule, module_type=Dense):
        def dims(self, module):
            return module.weight.shape[1], module.weight.shape[0]

    yield DenseRule
    RULES.pop(Dense)


def test_registering_a_rule_makes_a_layer_kronecker_factored(dense_rule):
    torch.manual_seed(0)
    model = nn.Sequential(Dense(4, 5), Dense(5, 3)).double()
    X, y = torch.randn(1, 4, dtype=DT), torch.randn(1, 3, dtype=DT)
    assert RULES[Dense] is dense_rule
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    assert [type(r) for r in K.rules] == [dense_rule, dense_rule]
    assert K.fallback_parameters == []
    D, G = K.to_dense(), dense_ggn(model, nn.MSELoss(), X, y)
    for s in layer_blocks(model):  # a deep linear network, one datum: exact
        torch.testing.assert_close(D[s, s], G[s, s], **EXACT_TOL[DT])


def test_unregistered_layer_falls_back_to_a_diagonal():
    model = nn.Sequential(Dense(4, 3)).double()
    X, y = torch.randn(1, 4, dtype=DT), torch.randn(1, 3, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    assert K.rules == [] and len(K.fallback_parameters) == 2


@pytest.mark.parametrize(
    "module, rule",
    [
        (nn.Linear(3, 2), LinearRule),
        (nn.Conv2d(2, 3, 3), ConvRule),
        (nn.Embedding(5, 2, padding_idx=0), EmbeddingRule),
        (nn.Conv2d(2, 4, 3, groups=2), ConvRule),
        (nn.Conv2d(65, 65, 3, groups=65), ConvRule),  # > 64 groups: an exact diagonal (build)
        (nn.Conv3d(2, 3, 2), ConvRule),
        (nn.ConvTranspose2d(2, 3, 2, stride=2), ConvTransposeRule),
        (nn.ConvTranspose2d(2, 4, 2, groups=2), None),
        (nn.Conv2d(2, 3, 3, padding="same"), ConvRule),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), ConvRule),
        (nn.Embedding(5, 2, sparse=True), None),
        (nn.Embedding(5, 2, max_norm=1.0), None),
        (nn.LazyLinear(2), None),  # a subclass of Linear, but its weight is not there yet
        (nn.Tanh(), None),
    ],
)
def test_rule_for(module, rule):
    assert rule_for(module) is rule


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(3, 2),
        nn.Linear(3, 2, bias=False),
        nn.Conv1d(2, 3, 2),
        nn.Conv2d(2, 3, 2),
        nn.Embedding(5, 2),
    ],
    ids=["linear", "linear-nobias", "conv1d", "conv2d", "embedding"],
)
def test_matrix_form_round_trip(module):
    (layer,) = find_layers(module)
    k = 3
    vw = torch.randn(k, *layer.weight.shape)
    vb = torch.randn(k, *layer.bias.shape) if layer.has_bias else None
    M = layer.to_mat(vw, vb)
    assert M.shape == (k, layer.d_G, layer.d_A)
    bw, bb = layer.from_mat(M)
    assert torch.equal(bw, vw) and (bb is None or torch.equal(bb, vb))
    m1 = layer.matrix_of(vw[0], None if vb is None else vb[0])
    torch.testing.assert_close(m1.reshape(layer.d_G, layer.d_A), M[0], rtol=0, atol=0)
    w1, b1 = layer.params_of(m1)
    assert torch.equal(w1, vw[0]) and (b1 is None or torch.equal(b1, vb[0]))


def test_linear_matrix_form_is_weight_then_bias_column():
    (layer,) = find_layers(nn.Linear(4, 3))
    gw, gb = torch.randn(3, 4), torch.randn(3)
    torch.testing.assert_close(
        layer.matrix_of(gw, gb), torch.cat([gw, gb[:, None]], 1), rtol=0, atol=0
    )


def test_shared_weight_belongs_to_the_first_module():
    a = nn.Linear(3, 3)
    b = nn.Linear(3, 3)
    b.weight, b.bias = a.weight, a.bias
    layers = find_layers(nn.Sequential(a, nn.Tanh(), b))
    assert [layer.name for layer in layers] == ["0"]


def test_frozen_and_excluded_parameters_are_skipped():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    net[0].weight.requires_grad_(False)
    assert [layer.name for layer in find_layers(net)] == ["1"]
    assert find_layers(net, params=[net[1].weight]) == []


CONV_CASES = [
    # (dims, kernel, stride, dilation, padding, padding_mode, groups)
    (1, 3, 1, 1, 1, "zeros", 1),
    (1, 2, 3, 2, 0, "zeros", 2),
    (1, 3, 1, 2, "same", "circular", 1),
    (2, 3, 1, 1, 1, "zeros", 1),
    (2, 3, 2, 1, 1, "reflect", 2),
    (2, 2, 3, 2, 0, "zeros", 1),
    (2, 2, 1, 1, "same", "zeros", 1),  # even kernel: asymmetric padding
    (2, 1, 2, 1, 0, "zeros", 1),
    (3, 3, 2, 1, 1, "circular", 1),
    (3, 2, 1, 2, 0, "zeros", 2),
]


@pytest.mark.parametrize("dims, k, s, d, pad, mode, groups", CONV_CASES)
def test_conv_position_average_without_patches_equals_the_patches_average(
    dims, k, s, d, pad, mode, groups
):
    # "reduce" averages a convolution's patches over the output positions; the rule does
    # it by one convolution with a kernel of ones instead of unfolding
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    m = conv_type(4, 6, k, stride=s, dilation=d, padding=pad, padding_mode=mode, groups=groups)
    x = torch.randn(3, 4, *(9,) * dims, dtype=DT)
    m = m.to(DT)
    for g in range(groups):
        rule = ConvRule("c", m, group=g)
        patches = rule.features(x)
        mean, T = rule.mean_features(x)
        assert T == patches.shape[1] > 1
        torch.testing.assert_close(mean, patches.mean(1, keepdim=True), rtol=1e-12, atol=1e-14)
        reduced = rule.input_rows(x, weight_sharing="reduce")
        assert reduced.shape == (3, 1, rule.d_A) and rule.shared
        torch.testing.assert_close(reduced[:, :, : rule.d_in], mean, rtol=0, atol=0)
