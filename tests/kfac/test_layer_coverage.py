"""Layer coverage by behaviour: every rule's rows reproduce the gradient, blocks vs the dense GGN.

Two kinds of checks, in float64:

* the rows a rule reads from a forward pass (inputs, output gradients, after the
  capture) give back the exact gradient of its parameters: ``sum_t g_t a_t^T`` per
  example, summed over the batch, equals autograd's gradient of a random linear
  functional of the output (for attention: of the block's rows of ``in_proj_weight``);
* blocks against the dense GGN block of ``tests/dense_reference.py`` where the
  approximation is exact: deep linear networks (KFAC, KFAC-expand with a loss on every
  position, KFAC-reduce with positions pooled before the loss), a one-token attention,
  and the normalization layers' diagonals (eval mode, any number of examples).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dense_reference import ref_ggn
from kfac_cases import DT, EXACT_TOL, closure_of, param_slices
from second import EKFACOperator, KFACOperator
from second.func import differentiable_attention
from second.kfac import (
    MAX_KRONECKER_GROUPS,
    RULES,
    AttentionProjectionRule,
    BatchNormRule,
    Capture,
    ConvRule,
    ConvTransposeRule,
    DiagonalRule,
    EmbeddingRule,
    GroupedConvDiagonalRule,
    GroupNormRule,
    LayerNormRule,
    LinearRule,
    RMSNormRule,
    find_rules,
    rule_for,
)


class Mine(nn.Linear):
    """A user's subclass that keeps nn.Linear's forward: covered as a Linear."""


class Doubled(nn.Linear):
    """A subclass with its own forward: not ``W x + b``, so not covered by Linear's rule."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "module, rule",
    [
        (nn.MultiheadAttention(4, 2).out_proj, LinearRule),  # NonDynamicallyQuantizableLinear
        (Mine(3, 2), LinearRule),
        (Doubled(3, 2), None),
        (nn.Conv1d(2, 3, 3), ConvRule),
        (nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular"), ConvRule),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), ConvRule),
        (nn.Conv2d(2, 4, 3, groups=2), ConvRule),
        (nn.Conv2d(65, 65, 3, groups=65), ConvRule),  # > 64 groups: ConvRule builds a diagonal
        (nn.Conv3d(2, 3, 2), ConvRule),
        (nn.ConvTranspose2d(2, 3, 2, stride=2), ConvTransposeRule),
        (nn.ConvTranspose2d(2, 4, 2, groups=2), None),
        (nn.Embedding(5, 2, scale_grad_by_freq=True), None),
        (nn.MultiheadAttention(4, 2), AttentionProjectionRule),
        (nn.LayerNorm(3), LayerNormRule),
        (nn.LayerNorm(3, elementwise_affine=False), None),
        (nn.RMSNorm(3), RMSNormRule),
        (nn.GroupNorm(2, 4), GroupNormRule),
        (nn.BatchNorm1d(3), BatchNormRule),
        (nn.BatchNorm2d(3, affine=False), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else getattr(v, "__name__", "-"),
)
def test_rules_follow_behaviour_not_exact_type(module, rule):
    assert rule_for(module) is rule


# ----------------------------------------------------------------------------- rows -> gradient
def rows_reproduce_gradients(model: nn.Module, X, **kwargs) -> int:
    """Check every rule's rows against autograd; return how many blocks were checked."""
    kron, diag = find_rules(model, **kwargs)
    with Capture(kron, diag) as cap:
        out = model(X)
    if isinstance(out, tuple):
        out = out[0]
    R = torch.randn_like(out)
    calls, dcalls = cap.calls(), cap.diagonal_calls()
    params = list(model.parameters())
    wrt = [o for *_, o in calls] + [o for *_, o in dcalls] + params
    grads = [
        torch.zeros_like(t) if g is None else g
        for t, g in zip(wrt, torch.autograd.grad((out * R).sum(), wrt, allow_unused=True))
    ]
    g_calls = grads[: len(calls)]
    g_diag = grads[len(calls) : len(calls) + len(dcalls)]
    g_param = {id(p): g for p, g in zip(params, grads[len(calls) + len(dcalls) :])}
    for j, layer in enumerate(kron):
        got = 0
        for (jj, inp, _), g in zip(calls, g_calls):
            if jj != j:
                continue
            grows = layer.grad_rows(g.unsqueeze(0), inp, "expand")
            mask = layer.mask(inp)
            if mask is not None:
                grows = grows * mask[None, :, :, None].to(grows.dtype)
            got = got + layer.per_example_mats(layer.input_rows(inp, "expand"), grows).sum((0, 1))
        gb = g_param[id(layer.bias)] if layer.has_bias else None
        want = layer.matrix_of(g_param[id(layer.weight)], gb).reshape(layer.d_G, layer.d_A)
        torch.testing.assert_close(got, want, **EXACT_TOL[DT], msg=f"block {layer.name}")
    for i, rule in enumerate(diag):
        for (ii, inp, _), g in zip(dcalls, g_diag):
            if ii != i:
                continue
            for p, t in zip(rule.params(), rule.per_example(inp, g.unsqueeze(0))):
                torch.testing.assert_close(t.sum((0, 1)), g_param[id(p)], **EXACT_TOL[DT])
    return len(kron) + len(diag)


class Attention(nn.Module):
    """An attention layer called in one of the ways ``F.multi_head_attention_forward`` splits."""

    def __init__(self, how: str, batch_first: bool, bias: bool = True, kdim=None):
        super().__init__()
        self.how, self.batch_first = how, batch_first
        self.att = nn.MultiheadAttention(
            6, 2, bias=bias, batch_first=batch_first, kdim=kdim, vdim=kdim
        )
        self.kv = nn.Linear(6, kdim or 6)

    def forward(self, x):
        kv = self.kv(x)
        if self.how == "self":  # one packed projection
            return self.att(x, x, x, need_weights=False)[0]
        if self.how == "kv":  # key is value: the query's projection, then K and V packed
            return self.att(x, kv, kv)[0]
        return self.att(x, kv, torch.tanh(kv), need_weights=False)[0]  # three projections


@pytest.mark.parametrize(
    "how, batch_first, bias, kdim",
    [
        ("self", True, True, None),
        ("self", False, False, None),
        ("kv", True, True, None),
        ("three", False, True, None),
        ("three", True, True, 5),  # separate q/k/v_proj_weight
    ],
)
def test_attention_blocks_read_their_own_rows(how, batch_first, bias, kdim):
    torch.manual_seed(0)
    model = Attention(how, batch_first, bias, kdim).double()
    X = torch.randn(3, 4, 6, dtype=DT) if batch_first else torch.randn(4, 3, 6, dtype=DT)
    assert rows_reproduce_gradients(model, X) == 5  # q, k, v, out_proj, kv


def test_transformer_layer_blocks_and_norms():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    X = torch.randn(3, 5, 8, dtype=DT)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    model = _Masked(layer, mask)
    assert rows_reproduce_gradients(model, X) == 8  # q k v out_proj linear1 linear2, 2 norms


class _Masked(nn.Module):
    def __init__(self, layer, mask):
        super().__init__()
        self.layer, self.mask = layer, mask

    def forward(self, x):
        return self.layer(x, src_mask=self.mask, is_causal=True)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(2, 3, 3, padding=1),
        nn.Conv1d(2, 3, 2, stride=2, dilation=2, padding="valid"),
        nn.Conv1d(2, 3, 4, padding="same", padding_mode="circular"),
        nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect"),
        nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="replicate", bias=False),
        nn.Conv3d(2, 3, (2, 3, 2), stride=(2, 1, 1), dilation=(1, 2, 1), padding=1),
        nn.Conv3d(2, 3, 3, padding="same", padding_mode="circular", groups=1),
    ],
    ids=[
        "conv1d",
        "conv1d-strided",
        "conv1d-same-circular",
        "conv2d-same-reflect",
        "conv2d-repl",
        "conv3d-strided-dilated",
        "conv3d-same-circular",
    ],
)
def test_convolution_patches_reproduce_the_gradient(conv):
    torch.manual_seed(0)
    spatial = {nn.Conv1d: (7,), nn.Conv2d: (6, 5), nn.Conv3d: (6, 5, 4)}[type(conv)]
    X = torch.randn(3, 2, *spatial, dtype=DT)
    assert rows_reproduce_gradients(conv.double(), X) == 1


def test_norm_rows_in_training_mode_and_without_bias():
    # training-mode BatchNorm normalizes with the batch's statistics: the per-example
    # gradients of its affine parameters are still exact
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.LayerNorm(4, bias=False)
    ).double()
    assert rows_reproduce_gradients(model, torch.randn(5, 3, dtype=DT)) == 3


def test_user_subclass_embedding_and_norm_rows():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(7, 4, padding_idx=0), Mine(4, 4), nn.LayerNorm(4), nn.RMSNorm(4)
    ).double()
    X = torch.tensor([[1, 0, 3], [6, 2, 2]])
    assert rows_reproduce_gradients(model, X) == 4


# ----------------------------------------------------------------------------- dense references
def ggn_blocks(model, loss_fn, X, y, **kwargs):
    """``(KFAC dense, exact GGN)`` of a float64 model (type-2, one batch)."""
    K = KFACOperator(model, loss_fn, (X, y), **kwargs)
    with differentiable_attention():  # the reference's jacrev batches attention's backward
        G = ref_ggn(model, loss_fn, X, y)
    return K, K.to_dense(), G


def assert_blocks_exact(model, D, G, names):
    slices = dict(zip([n for n, _ in model.named_parameters()], param_slices(model)))
    for name in names:
        s = slices[name]
        torch.testing.assert_close(D[s, s], G[s, s], **EXACT_TOL[DT], msg=name)


def test_conv1d_and_subclass_blocks_are_exact_for_a_deep_linear_network():
    # one output position per example: standard KFAC, exact for MSE and any N
    torch.manual_seed(0)
    # (and a user's Linear subclass, covered as a Linear)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), Mine(3, 2)).double()
    X, y = torch.randn(5, 2, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    K, D, G = ggn_blocks(model, nn.MSELoss(), X, y)
    assert set(K.approximations().values()) == {"kronecker"}
    assert_blocks_exact(model, D, G, ["0.weight", "0.bias", "2.weight", "2.bias"])


def test_attention_blocks_are_exact_on_one_token():
    # one token: the attention weights are 1, the output is out_proj(V x), linear in x;
    # Q and K get no gradient (their exact blocks are zero)
    torch.manual_seed(0)
    model = Attention("self", batch_first=True).double()
    X, y = torch.randn(4, 1, 6, dtype=DT), torch.randn(4, 1, 6, dtype=DT)
    K, D, G = ggn_blocks(model, nn.MSELoss(), X, y)
    assert [r.name for r in K.rules] == ["att.q", "att.k", "att.v", "att.out_proj", "kv"]
    assert K.fallback_parameters == []
    s = param_slices(model)[0]  # in_proj_weight [18, 6]: rows of q, k, v
    torch.testing.assert_close(D[s, s], G[s, s], **EXACT_TOL[DT])
    assert bool(G[s, s][72:, 72:].abs().max() > 1e-3)  # the V block is not trivially zero
    assert_blocks_exact(
        model, D, G, ["att.in_proj_bias", "att.out_proj.weight", "att.out_proj.bias"]
    )
    assert set(K.approximations().values()) == {"kronecker"}
    # EK-FAC re-fits the eigenvalues in KFAC's eigenbasis: exact wherever KFAC is
    E = EKFACOperator(model, nn.MSELoss(), (X, y)).to_dense()
    torch.testing.assert_close(E[s, s], G[s, s], **EXACT_TOL[DT])


class _Pool(nn.Module):
    def forward(self, x):
        return x.mean(1)


def sequence_net(pool: bool):
    """A deep linear network on sequences ``[N, T, 4]``: per-position outputs, or pooled."""
    layers = [nn.Linear(4, 5), nn.Linear(5, 3)] + ([_Pool()] if pool else [])
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("exact, other", [("expand", "reduce"), ("reduce", "expand")])
def test_expand_and_reduce_each_exact_in_their_setting(exact, other):
    # expand: a loss on every position; reduce: positions pooled before the loss
    torch.manual_seed(0)
    model = sequence_net(pool=exact == "reduce")
    X = torch.randn(3, 6, 4, dtype=DT)
    y = torch.randn(3, 3, dtype=DT) if exact == "reduce" else torch.randn(3, 6, 3, dtype=DT)
    K, D, G = ggn_blocks(model, nn.MSELoss(), X, y, weight_sharing=exact)
    assert set(K.approximations().values()) == {f"kronecker-{exact}"}
    names = [n for n, _ in model.named_parameters()]
    assert_blocks_exact(model, D, G, names)
    _, D2, _ = ggn_blocks(model, nn.MSELoss(), X, y, weight_sharing=other)
    s = param_slices(model)[0]
    assert (D2[s, s] - G[s, s]).abs().max() > 1e-3  # the other one is not exact here


def test_weight_sharing_per_layer():
    torch.manual_seed(0)
    model = sequence_net(pool=True)
    X, y = torch.randn(2, 4, 4, dtype=DT), torch.randn(2, 3, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y), weight_sharing={"1": "reduce"})
    assert K.approximations() == {
        "0.weight": "kronecker-expand",
        "0.bias": "kronecker-expand",
        "1.weight": "kronecker-reduce",
        "1.bias": "kronecker-reduce",
    }
    by_type = KFACOperator(model, nn.MSELoss(), (X, y), weight_sharing={nn.Linear: "reduce"})
    assert set(by_type.approximations().values()) == {"kronecker-reduce"}
    with pytest.raises(ValueError, match="weight_sharing"):
        KFACOperator(model, nn.MSELoss(), (X, y), weight_sharing="sum")


def test_reduce_is_the_expand_of_pooled_rows():
    # reduce = KFAC on (mean of the inputs, sum of the gradients) per example
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    (rule,) = find_rules(lin, weight_sharing="reduce")[0]
    x, g = torch.randn(2, 5, 4, dtype=DT), torch.randn(1, 2, 5, 3, dtype=DT)
    a = rule.input_rows(x)
    torch.testing.assert_close(a[..., :4], x.mean(1, keepdim=True))
    torch.testing.assert_close(rule.grad_rows(g), g.sum(2, keepdim=True))
    assert rule.a_stats(a)[1] == 2.0  # one row per example


NORMS = {
    "layernorm": lambda: nn.Sequential(
        nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)
    ),
    "rmsnorm": lambda: nn.Sequential(nn.Linear(4, 5), nn.RMSNorm(5), nn.Tanh(), nn.Linear(5, 3)),
    "batchnorm1d": lambda: nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)
    ),
    "groupnorm": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)
    ),
    "batchnorm2d": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 2), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)
    ),
}


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_norm_layers_get_their_exact_diagonal(name, loss):
    torch.manual_seed(0)
    model = NORMS[name]().double()
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
        if isinstance(m, nn.RMSNorm):
            nn.init.normal_(m.weight)
    model.eval()
    n = 6
    if name in ("groupnorm", "batchnorm2d"):
        X = torch.randn(n, 1, 3, 3, dtype=DT)
    else:
        X = torch.randn(n, 4, dtype=DT)
    y = torch.randint(0, 3, (n,)) if loss == "ce" else torch.randn(n, 3, dtype=DT)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss(reduction="sum")
    K, D, G = ggn_blocks(model, loss_fn, X, y)
    (rule,) = K.diagonal_rules
    assert isinstance(rule, DiagonalRule)
    slices = dict(zip([k for k, _ in model.named_parameters()], param_slices(model)))
    for pname in ("1.weight", "1.bias"):
        if pname not in slices:
            continue
        s = slices[pname]
        torch.testing.assert_close(D[s, s].diagonal(), G[s, s].diagonal(), **EXACT_TOL[DT])
        assert K.approximations()[pname] == "diagonal-exact"
    # the estimate the same parameters had before (Rademacher) is not exact with n > 1
    K2 = KFACOperator(model, loss_fn, (X, y), fallback="identity")
    assert K2.approximations()["1.weight"] == "identity"


def test_tied_weights_of_different_layers_get_a_diagonal():
    # an embedding and an output layer sharing one matrix: no single Kronecker block;
    # the shared matrix (and the head's bias) get a diagonal, exact with one datum
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 3)
            self.mid = nn.Linear(3, 3)
            self.head = nn.Linear(3, 6)
            self.head.weight = self.emb.weight

        def forward(self, idx):  # (float indices: the dense reference casts inputs)
            return self.head(torch.tanh(self.mid(self.emb(idx.long())))).transpose(1, 2)

    model = Tied().double()
    X, y = torch.tensor([[1.0, 4.0, 2.0]], dtype=DT), torch.tensor([[4, 2, 5]])
    K, D, G = ggn_blocks(model, nn.CrossEntropyLoss(), X, y)
    assert [r.name for r in K.rules] == ["mid"]
    assert K.approximations() == {
        "emb.weight": "diagonal",
        "mid.weight": "kronecker-expand",
        "mid.bias": "kronecker-expand",
        "head.bias": "diagonal",
    }
    for s in (param_slices(model)[0], param_slices(model)[3]):
        torch.testing.assert_close(D[s, s].diagonal(), G[s, s].diagonal(), **EXACT_TOL[DT])


def test_a_layer_whose_parameters_two_modules_share_is_one_block():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight, b.bias = a.weight, a.bias
    model = nn.Sequential(a, nn.Tanh(), b).double()
    (layer,), _ = find_rules(model)
    assert layer.modules == [a, b]  # both calls are captured
    assert rows_reproduce_gradients(model, torch.randn(4, 3, dtype=DT)) == 1


def test_embedding_is_always_expand():
    (rule,) = find_rules(nn.Embedding(5, 2), weight_sharing="reduce")[0]
    assert isinstance(rule, EmbeddingRule) and rule.weight_sharing == "expand"


def test_an_attention_without_a_rule_leaves_out_proj_to_the_fallback():
    # its own forward: not covered; out_proj's module is never called, so no Linear block
    class MyAttention(nn.MultiheadAttention):
        def forward(self, x):
            return super().forward(x, x, x, need_weights=False)[0]

    kron, diag = find_rules(nn.Sequential(MyAttention(4, 2), nn.Linear(4, 2)))
    assert [r.name for r in kron] == ["1"] and diag == []


class Gain(nn.Module):
    """A user's elementwise layer ``x * g`` (no rule until one is registered)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.weight


@pytest.fixture
def gain_rule():
    """A diagonal rule for ``Gain``, registered the way a newcomer would."""

    class GainRule(DiagonalRule, module_type=Gain):
        def normalized(self, inp):
            return inp  # x itself multiplies the weight

        def channel_dims(self, x):
            return tuple(range(1, x.dim() - 1))  # positions, if any

    yield GainRule
    RULES.pop(Gain)


def test_registering_a_diagonal_rule_gives_the_exact_diagonal(gain_rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Gain(4), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    K, D, G = ggn_blocks(model, nn.CrossEntropyLoss(), X, y)
    assert [type(r) for r in K.diagonal_rules] == [gain_rule]
    assert K.approximations()["2.weight"] == "diagonal-exact"
    s = param_slices(model)[2]
    torch.testing.assert_close(D[s, s].diagonal(), G[s, s].diagonal(), **EXACT_TOL[DT])


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 6, 3, padding=1, groups=2),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise
    ],
    ids=["conv1d-groups2", "conv2d-groups3-strided", "conv2d-depthwise"],
)
def test_grouped_convolution_rows_reproduce_the_gradient_per_group(conv):
    torch.manual_seed(0)
    spatial = (7,) if isinstance(conv, nn.Conv1d) else (6, 5)
    X = torch.randn(3, conv.in_channels, *spatial, dtype=DT)
    assert rows_reproduce_gradients(conv.double(), X) == conv.groups


@pytest.mark.parametrize(
    "conv",
    [
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose2d(2, 3, (2, 3), stride=(1, 2), dilation=(2, 1), padding=(0, 2)),
        nn.ConvTranspose1d(2, 3, 4, stride=3, padding=1, output_padding=2, bias=False),
    ],
    ids=["convT2d-strided-outpad", "convT2d-dilated-cropped", "convT1d"],
)
def test_transposed_convolution_rows_reproduce_the_gradient(conv):
    torch.manual_seed(0)
    spatial = (5, 4) if isinstance(conv, nn.ConvTranspose2d) else (6,)
    X = torch.randn(3, 2, *spatial, dtype=DT)
    assert rows_reproduce_gradients(conv.double(), X) == 1


def test_transposed_convolution_block_is_exact_for_a_deep_linear_network():
    # one position (a 1x1 input and kernel): standard KFAC, exact for MSE; the channels of
    # the weight [C_in, C_out, 1, 1] are swapped into the matrix form [C_out, C_in + 1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 1), nn.Flatten(), nn.Linear(3, 2)).double()
    X, y = torch.randn(6, 2, 1, 1, dtype=DT), torch.randn(6, 2, dtype=DT)
    K, D, G = ggn_blocks(model, nn.MSELoss(), X, y)
    assert [type(r).__name__ for r in K.rules] == ["ConvTransposeRule", "LinearRule"]
    assert set(K.approximations().values()) == {"kronecker"}
    assert_blocks_exact(model, D, G, ["0.weight", "0.bias", "2.weight", "2.bias"])


def test_conv3d_block_is_exact_for_a_deep_linear_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Flatten(), nn.Linear(3, 2)).double()
    X, y = torch.randn(5, 2, 2, 2, 2, dtype=DT), torch.randn(5, 2, dtype=DT)
    K, D, G = ggn_blocks(model, nn.MSELoss(), X, y)
    assert set(K.approximations().values()) == {"kronecker"}
    assert_blocks_exact(model, D, G, ["0.weight", "0.bias", "2.weight", "2.bias"])


def test_grouped_convolution_blocks_are_exact_per_group_for_a_deep_linear_network():
    # one output position per example: each group's block is exact (the curvature between
    # groups, like that between layers, is not in the approximation)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6, 2)).double()
    X, y = torch.randn(5, 4, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    K, D, G = ggn_blocks(model, nn.MSELoss(), X, y)
    assert [r.name for r in K.rules] == ["0.group0", "0.group1", "2"]
    assert set(K.approximations().values()) == {"kronecker"}
    E = EKFACOperator(model, nn.MSELoss(), (X, y)).to_dense()
    w, b = param_slices(model)[:2]
    per = 3 * 2 * 3  # a group's weight rows: 3 output channels x 2 input channels x 3 taps
    for j in range(2):
        idx = torch.cat(
            [
                torch.arange(w.start + j * per, w.start + (j + 1) * per),
                torch.arange(b.start + 3 * j, b.start + 3 * (j + 1)),
            ]
        )
        block = (idx[:, None], idx[None, :])
        torch.testing.assert_close(D[block], G[block], **EXACT_TOL[DT], msg=f"group {j}")
        torch.testing.assert_close(E[block], G[block], **EXACT_TOL[DT], msg=f"group {j}")
    assert bool(G[w.start : w.start + per, w.start + per : w.stop].abs().max() > 1e-3)
    assert bool(D[w.start : w.start + per, w.start + per : w.stop].abs().max() == 0)


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c(x)).mean((2, 3)))


class _Split(nn.Module):
    """The grouped convolution written as two convolutions on channel slices."""

    def __init__(self, grouped: _Grouped):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for half, conv in enumerate((self.a, self.b)):
                conv.weight.copy_(grouped.c.weight[2 * half : 2 * half + 2])
                conv.bias.copy_(grouped.c.bias[2 * half : 2 * half + 2])
            self.fc.load_state_dict(grouped.fc.state_dict())

    def forward(self, x):
        h = torch.cat([self.a(x[:, :2]), self.b(x[:, 2:])], 1)
        return self.fc(torch.tanh(h).mean((2, 3)))


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_a_grouped_convolution_is_its_groups_written_as_separate_convolutions(weight_sharing):
    torch.manual_seed(0)
    grouped = _Grouped().double()
    split = _Split(grouped).double()
    X, y = torch.randn(6, 4, 5, 5, dtype=DT), torch.randint(0, 3, (6,))
    kw = dict(weight_sharing=weight_sharing)
    KG = KFACOperator(grouped, nn.CrossEntropyLoss(), (X, y), **kw).to_dense()
    KS = KFACOperator(split, nn.CrossEntropyLoss(), (X, y), **kw).to_dense()
    # grouped: weight [4, 2, 3, 3] (group 0 first), bias [4], head; split: a.w, a.b, b.w, b.b, head
    order = [*range(36), 72, 73, *range(36, 72), 74, 75, *range(76, 91)]
    torch.testing.assert_close(KG[order][:, order], KS, **EXACT_TOL[DT])


MANY = MAX_KRONECKER_GROUPS + 2  # channels of a depthwise convolution beyond the Kronecker limit


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(MANY, MANY, 3, stride=2, padding=1, groups=MANY),
        nn.Conv2d(MANY, 2 * MANY, 3, padding="same", padding_mode="circular", groups=MANY),
        nn.Conv1d(MANY, MANY, 3, dilation=2, groups=MANY, bias=False),
        nn.Conv3d(MANY, MANY, 2, groups=MANY),
    ],
    ids=["depthwise2d-strided", "depthwise2d-multiplier-circular", "depthwise1d-dilated", "3d"],
)
def test_many_groups_per_example_gradients_are_autograd_s(conv):
    torch.manual_seed(0)
    conv = conv.double()
    d = conv.weight.dim() - 2
    X = torch.randn(3, MANY, *([5] * d), dtype=DT)
    (kron, diag) = find_rules(conv)
    assert kron == [] and [type(r) for r in diag] == [GroupedConvDiagonalRule]
    out = conv(X)
    g = torch.randn(2, *out.shape, dtype=DT)  # two columns
    got = diag[0].per_example(X, g)
    for k in range(2):
        for i in range(3):
            grads = torch.autograd.grad(conv(X[i : i + 1]), conv.parameters(), g[k, i : i + 1])
            for t, ref in zip(got, grads):
                torch.testing.assert_close(t[k, i], ref, **EXACT_TOL[DT])


def test_many_groups_get_the_exact_diagonal_of_their_block():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, MANY, 2),
        nn.Tanh(),
        nn.Conv2d(MANY, MANY, 2, padding=1, groups=MANY),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(MANY * 9, 3),
    ).double()
    X, y = torch.randn(4, 1, 3, 3, dtype=DT), torch.randint(0, 3, (4,))
    K, D, G = ggn_blocks(model, nn.CrossEntropyLoss(), X, y)
    assert [type(r) for r in K.diagonal_rules] == [GroupedConvDiagonalRule]
    slices = dict(zip([k for k, _ in model.named_parameters()], param_slices(model)))
    for pname in ("2.weight", "2.bias"):
        assert K.approximations()[pname] == "diagonal-exact"
        s = slices[pname]
        torch.testing.assert_close(D[s, s].diagonal(), G[s, s].diagonal(), **EXACT_TOL[DT])
        assert not D[s, s].diagonal(-1).any()  # a diagonal block


def test_the_optimizer_trains_a_depthwise_convolution_with_many_groups():
    import second.optim

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, MANY, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(MANY, MANY, 3, padding=1, groups=MANY),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(MANY, 3),
    )
    X, y = torch.randn(32, 1, 6, 6), torch.randint(0, 3, (32,))
    loss_fn = nn.CrossEntropyLoss()
    opt = second.optim.KFAC(model, loss_fn)
    assert opt.approximations()["2.weight"] == "diagonal-exact"
    closure = closure_of(opt, model, loss_fn, X, y)
    first = closure().item()
    for _ in range(10):
        opt.step(closure)
    assert closure().item() < first
