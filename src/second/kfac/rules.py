r"""Layer rules: how a module's inputs, output gradients and weight become matrices.

A :class:`LayerRule` describes one kind of layer. Its weight (and bias) is viewed as a
matrix ``[d_G, d_A]``: rows indexed by outputs, columns by inputs, the bias as a last
column. The rule turns

* the layer's input into rows :math:`a_{it}` of width ``d_A`` (``input_rows``),
* the gradient at its output into rows :math:`g_{it}` of width ``d_G`` (``grad_rows``),
* parameter-shaped tensors into that matrix form and back (``to_mat``/``from_mat``).

A :class:`DiagonalRule` describes a layer whose block is kept as its exact diagonal (the
normalization layers): it turns the layer's input and output gradient into the squared
per-example gradients of its parameters.

**Registration, by behaviour.** A subclass declared as
``class MyRule(LayerRule, module_type=MyModule)`` is used for ``MyModule`` and for every
subclass of it that keeps the methods the rule relies on (``behaviour``, by default
``forward``): ``NonDynamicallyQuantizableLinear`` (``nn.MultiheadAttention``'s
``out_proj``) or a user's ``class MyLinear(nn.Linear)`` without its own ``forward`` are
Kronecker-factored as ``nn.Linear``; a subclass with its own ``forward`` is not (its
output may not be ``W x + b``) until a rule is registered for it. Adding a layer type
means one rule class and nothing else: everything downstream (statistics, blocks,
operators, the optimizer) works on the matrix form.

**Weight sharing** (``weight_sharing=``, Eschenhagen et al. 2023). A layer applied at
several positions of one example (the tokens of a sequence, the pixels of a convolution's
output) has input rows ``[n, T, d_A]``. ``"expand"`` (the default) treats every position as
an example: :math:`A = \frac{1}{NT}\sum_{i,t} a_{it}a_{it}^\top`,
:math:`G = w\sum_{i,t} g_{it}g_{it}^\top`, exact for a deep linear network whose loss sums
over the positions (a language model). ``"reduce"`` aggregates the positions first,
:math:`\bar a_i = \frac1T\sum_t a_{it}`, :math:`\bar g_i = \sum_t g_{it}`, then
:math:`A = \frac1N\sum_i \bar a_i \bar a_i^\top`, :math:`G = w\sum_i \bar g_i\bar g_i^\top`:
exact for a deep linear network whose positions are pooled before the loss (a
classifier over a sequence or an image), and ``T`` times cheaper to accumulate. The
operators' default is ``"expand"`` everywhere. The KFAC optimizer's default, ``"auto"``
(:data:`AUTO_WEIGHT_SHARING`), reduces ``nn.Conv2d`` and expands everything else: a
language model needs ``"expand"`` (the zoo's character transformer, 400 steps: validation
loss 1.87 with ``"expand"``, 2.31 with ``"reduce"``), while on the zoo's digits CNN
``{nn.Conv2d: "reduce"}`` reached 0.975/0.972/0.975 test accuracy on seeds 0-2 against
0.961/0.972/0.972 with ``"expand"`` at 0.7x the CPU time (BENCHMARKS.md). A
convolutional model with a loss per pixel (segmentation) should pass ``"expand"``.

Built in (Kronecker): :class:`~torch.nn.Linear` (any leading dimensions as positions),
:class:`~torch.nn.Conv1d` and :class:`~torch.nn.Conv2d` (``groups=1``, any padding mode;
patches channel-major ``(C_in, k...)`` like the weight, output pixels as positions: KFC),
:class:`~torch.nn.Embedding` (one-hot inputs, so the input factor is diagonal and held as
its diagonal), :class:`~torch.nn.MultiheadAttention` (``in_proj_weight`` as three blocks,
Q, K and V, each with its own input and output-gradient factor; ``out_proj`` as a linear
layer; both captured from the projections inside the attention's functional forward).
Diagonal (exact): :class:`~torch.nn.LayerNorm`, :class:`~torch.nn.RMSNorm`,
:class:`~torch.nn.GroupNorm` and the BatchNorm layers' affine parameters.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import ClassVar, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "LayerRule",
    "LinearRule",
    "Conv1dRule",
    "Conv2dRule",
    "EmbeddingRule",
    "AttentionProjectionRule",
    "DiagonalRule",
    "LayerNormRule",
    "RMSNormRule",
    "GroupNormRule",
    "BatchNormRule",
    "RULES",
    "AUTO_WEIGHT_SHARING",
    "rule_for",
    "find_layers",
    "find_rules",
    "approximations",
    "unwrap_model",
]

WEIGHT_SHARING = ("expand", "reduce")
"""The KFAC variants for layers shared over positions (``weight_sharing=``)."""

RULES: dict[type[nn.Module], type[LayerRule] | type[DiagonalRule]] = {}
"""The registry: module type -> rule class (filled by rule subclasses)."""

WeightSharing = str | Mapping[str | type[nn.Module], str]
"""``"expand"``, ``"reduce"``, ``"auto"``, or ``{module name pattern or type: mode}`` (else
``"expand"``)."""

AUTO_WEIGHT_SHARING: dict[str | type[nn.Module], str] = {nn.Conv2d: "reduce"}
"""``weight_sharing="auto"`` (the KFAC optimizer's default): 2-d convolutions reduce (an image
model's loss pools over the pixels), every other layer expands (a sequence model's loss is
per position). Read when the rules are found, so an entry added here applies to optimizers
built afterwards."""


def _register(cls, module_type: type[nn.Module] | None) -> None:
    if module_type is not None:
        cls.module_type = module_type
        RULES[module_type] = cls


def _sharing_for(name: str, module: nn.Module, spec: WeightSharing) -> str:
    """The weight-sharing mode of ``module`` (called ``name``) under ``spec``."""
    if spec == "auto":
        spec = AUTO_WEIGHT_SHARING
    if isinstance(spec, str):
        mode = spec
    else:
        mode = next(
            (
                m
                for key, m in spec.items()
                if (isinstance(key, str) and fnmatch.fnmatchcase(name, key))
                or (isinstance(key, type) and isinstance(module, key))
            ),
            "expand",
        )
    if mode not in WEIGHT_SHARING:
        raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got {mode!r}")
    return mode


def _initialized(*ps: Tensor | None) -> bool:
    return not any(isinstance(p, nn.parameter.UninitializedParameter) for p in ps)


class LayerRule:
    """One Kronecker-factored block: a layer's inputs, gradients and weights as matrices.

    Subclasses pass ``module_type=`` in the class statement to register themselves in
    :data:`RULES`, set ``d_in`` and ``d_G`` in :meth:`dims`, and override the methods
    whose default (a dense layer with rows ``[n, T, d_in]``) does not fit.

    A block may own only some rows of its parameters (``nn.MultiheadAttention``'s
    ``in_proj_weight`` holds three blocks): ``w_rows``/``b_rows`` are then row slices and
    ``w_offset``/``b_offset`` the offsets of those rows in the flattened parameter.
    :meth:`to_mat` and :meth:`matrix_of` take whole parameters, :meth:`from_mat` and
    :meth:`params_of` return the block's rows only.

    Attributes:
        name: the block's name (the module's name in ``model.named_modules()``).
        module: the module whose forward the capture watches; ``modules``: all of them
            (a layer whose parameters several modules share).
        weight, bias: the parameters (``bias`` may be ``None``).
        d_in, d_G: input and output widths; ``d_A = d_in + 1`` with a bias, else ``d_in``.
        diag_A: the input factor is diagonal (held as a vector of length ``d_A``).
        weight_sharing: ``"expand"`` or ``"reduce"`` (see :mod:`second.kfac.rules`).
        shared: a call with more than one position was seen.

    Example:
        >>> rule = rule_for(torch.nn.Linear(3, 2))("fc", torch.nn.Linear(3, 2))
        >>> (rule.d_G, rule.d_A), rule.input_rows(torch.ones(5, 3)).shape
        ((2, 4), torch.Size([5, 1, 4]))
    """

    module_type: ClassVar[type[nn.Module]]
    diag_A: ClassVar[bool] = False
    behaviour: ClassVar[tuple[str, ...]] = ("forward",)
    """Methods a subclass of ``module_type`` must inherit unchanged to be covered."""
    functional: ClassVar[bool] = False
    """Captured from ``F.linear`` calls inside the module's forward (not its output)."""
    reducible: ClassVar[bool] = True
    """Whether ``weight_sharing="reduce"`` applies (else the rule always expands)."""

    def __init_subclass__(cls, module_type: type[nn.Module] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        _register(cls, module_type)

    def __init__(self, name: str, module: nn.Module, *, weight_sharing: str = "expand"):
        self._setup(
            name,
            module,
            cast(Tensor, module.weight),
            cast("Tensor | None", getattr(module, "bias", None)),
            weight_sharing=weight_sharing,
        )
        self.d_in, self.d_G = self.dims(module)
        self.d_A = self.d_in + int(self.has_bias)

    def _setup(
        self,
        name: str,
        module: nn.Module,
        weight: Tensor,
        bias: Tensor | None,
        *,
        w_rows: slice | None = None,
        b_rows: slice | None = None,
        weight_sharing: str = "expand",
    ) -> None:
        self.name, self.module, self.modules = name, module, [module]
        self.weight, self.bias, self.has_bias = weight, bias, bias is not None
        self.w_rows, self.b_rows = w_rows, b_rows
        self.w_offset = 0 if w_rows is None else w_rows.start * weight[0].numel()
        self.b_offset = 0 if b_rows is None or bias is None else b_rows.start
        self.w_shape = weight.shape if w_rows is None else weight[w_rows].shape
        if weight_sharing not in WEIGHT_SHARING:
            raise ValueError(
                f"weight_sharing must be one of {WEIGHT_SHARING}, got {weight_sharing!r}"
            )
        self.weight_sharing = weight_sharing if self.reducible else "expand"
        self.shared = False

    # -- what a subclass defines --------------------------------------------------------
    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this rule covers ``module`` (its type already matched); default yes."""
        return True

    @classmethod
    def build(cls, name: str, module: nn.Module, weight_sharing: str) -> list[LayerRule]:
        """The blocks of ``module`` (default: one)."""
        return [cls(name, module, weight_sharing=weight_sharing)]

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_in, d_G)``: the input width (without the bias column) and the output width."""
        raise NotImplementedError

    def features(self, inp: Tensor) -> Tensor:
        """The layer input as ``[n, T, d_in]`` rows (positions ``T``), without the bias."""
        return inp.reshape(inp.shape[0], -1, self.d_in)

    def positions(self, g: Tensor) -> Tensor:
        """Output gradients ``[K, n, ...]`` as ``[K, n, T, d_G]`` (positions as in :meth:`features`)."""
        K, n = g.shape[:2]
        return g.reshape(K, n, -1, self.d_G)

    # -- shared behaviour --------------------------------------------------------------
    def params(self) -> list[Tensor]:
        """The layer's parameters: ``[weight]`` or ``[weight, bias]`` (whole tensors)."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def keys(self) -> set[tuple[int, int]]:
        """``(id(parameter), offset)`` of the parts this block owns."""
        out = {(id(self.weight), self.w_offset)}
        if self.bias is not None:
            out.add((id(self.bias), self.b_offset))
        return out

    def _reduce(self, mode: str | None) -> bool:
        return (mode or self.weight_sharing) == "reduce"

    def input_rows(self, inp: Tensor, weight_sharing: str | None = None) -> Tensor:
        """``[n, T, d_A]`` input rows, with the bias column of ones appended.

        With ``"reduce"`` (the rule's own mode, or ``weight_sharing=``) the positions are
        averaged first: ``[n, 1, d_A]``.
        """
        rows = self.features(inp)
        if rows.shape[1] > 1:
            self.shared = True
            if self._reduce(weight_sharing):
                rows = rows.mean(1, keepdim=True)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)
        return rows

    def grad_rows(
        self, g: Tensor, inp: Tensor | None = None, weight_sharing: str | None = None
    ) -> Tensor:
        """Output gradients ``[K, n, ...]`` (one per backward column) as ``[K, n, T, d_G]``.

        With ``"reduce"`` the positions are summed first: ``[K, n, 1, d_G]``.
        """
        rows = self.positions(g)
        if rows.shape[2] > 1 and self._reduce(weight_sharing):
            rows = rows.sum(2, keepdim=True)
        return rows

    def mask(self, inp: Tensor) -> Tensor | None:
        """``[n, T]`` positions that receive gradient, or ``None`` for all of them."""
        return None

    def a_stats(self, rows: Tensor) -> tuple[Tensor, float]:
        r"""``(\sum_{i,t} a_{it} a_{it}^\top, n T)`` of input rows ``[n, T, d_A]``."""
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.T @ flat, float(rows.shape[0] * rows.shape[1])

    @staticmethod
    def g_stats(grows: Tensor) -> Tensor:
        r""":math:`\sum g g^\top` over all leading dimensions of gradient rows."""
        flat = grows.reshape(-1, grows.shape[-1])
        return flat.T @ flat

    def per_example_mats(self, arows: Tensor, grows: Tensor) -> Tensor:
        """``[K, n, d_G, d_A]``: per-example, per-column gradient of the weight matrix."""
        return torch.einsum("kntg,nta->knga", grows, arows)

    def _rows(self, vw: Tensor, vb: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The block's rows of whole parameter-shaped ``[k, *p.shape]`` tensors."""
        if self.w_rows is not None and vw.shape[1:] != self.w_shape:
            vw = vw[:, self.w_rows]
        if vb is not None and self.b_rows is not None and vb.shape[1] != self.d_G:
            vb = vb[:, self.b_rows]
        return vw, vb

    def to_mat(self, vw: Tensor, vb: Tensor | None) -> Tensor:
        """Parameter-shaped ``[k, *W.shape]`` (and bias ``[k, *b.shape]``) to ``[k, d_G, d_A]``."""
        vw, vb = self._rows(vw, vb)
        m = vw.reshape(vw.shape[0], self.d_G, self.d_in)
        if self.has_bias:
            if vb is None:
                raise ValueError(f"layer {self.name!r} has a bias: pass its part too")
            m = torch.cat([m, vb.unsqueeze(-1)], dim=-1)
        return m

    def from_mat(self, m: Tensor) -> tuple[Tensor, Tensor | None]:
        """The inverse of :meth:`to_mat`: ``[k, d_G, d_A]`` to the block's (weight, bias) rows."""
        vw = m[..., : self.d_in].reshape(m.shape[0], *self.w_shape)
        vb = m[..., self.d_in] if self.has_bias else None
        return vw, vb

    def matrix_of(self, gw: Tensor, gb: Tensor | None) -> Tensor:
        """One weight-shaped tensor (and bias) in matrix form (a leading 1 may remain)."""
        return self.to_mat(gw.unsqueeze(0), None if gb is None else gb.unsqueeze(0))

    def params_of(self, m: Tensor) -> tuple[Tensor, Tensor | None]:
        """The inverse of :meth:`matrix_of` (the block's rows of the weight and bias)."""
        vw, vb = self.from_mat(m.reshape(1, self.d_G, self.d_A))
        return vw[0], None if vb is None else vb[0]

    def state_in(self, state: Mapping) -> dict:
        """The block's entry in an optimizer's per-parameter ``state``.

        ``state[weight]`` itself, or for a block that owns some rows of its weight (the
        attention's Q, K, V) a dict under ``state[weight]["rows[start:stop]"]``.
        """
        st = state[self.weight]
        if self.w_rows is None:
            return st
        return st.setdefault(f"rows[{self.w_rows.start}:{self.w_rows.stop}]", {})

    def approximation(self) -> str:
        """``"kronecker"``, or ``"kronecker-expand"``/``"kronecker-reduce"`` once shared."""
        return f"kronecker-{self.weight_sharing}" if self.shared else "kronecker"


class LinearRule(LayerRule, module_type=nn.Linear):
    """``nn.Linear`` (and subclasses keeping its forward): every leading dimension a position.

    Example:
        >>> rule = LinearRule("fc", torch.nn.Linear(3, 2, bias=False))
        >>> rule.matrix_of(torch.ones(2, 3), None).shape
        torch.Size([2, 3])
    """

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        return _initialized(cast(Tensor, module.weight), getattr(module, "bias", None))

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.Linear, module)
        return m.in_features, m.out_features

    def matrix_of(self, gw: Tensor, gb: Tensor | None) -> Tensor:  # noqa: D102
        return gw if gb is None else torch.cat([gw, gb.unsqueeze(1)], dim=1)

    def params_of(self, m: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        if not self.has_bias:
            return m, None
        return m[:, : self.d_in], m[:, self.d_in]


class _ConvRule(LayerRule):
    """Convolutions (``groups=1``): patches as rows, output pixels as positions (KFC).

    The input is padded the way the layer pads it (zeros or its ``padding_mode``, also
    ``padding="same"``), then unfolded channel-major like the weight.
    """

    behaviour = ("forward", "_conv_forward")
    spatial: ClassVar[int]

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        m = cast(nn.Conv2d, module)
        return m.groups == 1 and _initialized(m.weight, m.bias)

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.Conv2d, module)
        return m.weight[0].numel(), m.out_channels

    def features(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.Conv2d, self.module)
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            inp = F.pad(inp, pad, mode=mode)
        k, d, s = m.kernel_size, m.dilation, m.stride
        if self.spatial == 1:  # a 1-d convolution as a 2-d one of height 1
            inp, k, d, s = inp.unsqueeze(2), (1, k[0]), (1, d[0]), (1, s[0])
        return F.unfold(inp, k, dilation=d, stride=s).transpose(1, 2)  # [n, T, C*k...]

    def positions(self, g: Tensor) -> Tensor:  # noqa: D102
        K, n = g.shape[:2]
        return g.reshape(K, n, self.d_G, -1).transpose(2, 3)


class Conv1dRule(_ConvRule, module_type=nn.Conv1d):
    """``nn.Conv1d`` with ``groups=1``: patches ``(C_in, k)`` as rows, output steps as positions.

    Example:
        >>> conv = torch.nn.Conv1d(2, 3, kernel_size=2, padding=1)
        >>> Conv1dRule("c", conv).input_rows(torch.ones(1, 2, 4)).shape
        torch.Size([1, 5, 5])
    """

    spatial = 1


class Conv2dRule(_ConvRule, module_type=nn.Conv2d):
    """``nn.Conv2d`` with ``groups=1``: patches as rows, output pixels as positions.

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, kernel_size=2)
        >>> Conv2dRule("c", conv).input_rows(torch.ones(1, 2, 3, 3)).shape
        torch.Size([1, 4, 9])
    """

    spatial = 2


class EmbeddingRule(LayerRule, module_type=nn.Embedding):
    """``nn.Embedding``: one-hot inputs, so the input factor is diagonal (token counts).

    The matrix form is the weight transposed, ``[embedding_dim, num_embeddings]``; the
    "input rows" are the ``[n, T]`` indices, and positions at ``padding_idx`` are masked.
    Always ``"expand"`` (the averaged one-hot rows of ``"reduce"`` are not diagonal).

    Example:
        >>> rule = EmbeddingRule("e", torch.nn.Embedding(5, 3))
        >>> A, count = rule.a_stats(rule.input_rows(torch.tensor([[1, 1, 4]])))
        >>> A.tolist(), count
        ([0.0, 2.0, 0.0, 0.0, 1.0], 3.0)
    """

    diag_A = True
    reducible = False

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        m = cast(nn.Embedding, module)
        return m.max_norm is None and not m.sparse and not m.scale_grad_by_freq

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.Embedding, module)
        return m.num_embeddings, m.embedding_dim

    def input_rows(self, inp: Tensor, weight_sharing: str | None = None) -> Tensor:  # noqa: D102
        rows = inp.reshape(inp.shape[0], -1)
        self.shared = self.shared or rows.shape[1] > 1
        return rows

    def mask(self, inp: Tensor) -> Tensor | None:  # noqa: D102
        padding_idx = cast(nn.Embedding, self.module).padding_idx
        if padding_idx is None:
            return None
        return torch.ne(inp.reshape(inp.shape[0], -1), padding_idx)

    def a_stats(self, rows: Tensor) -> tuple[Tensor, float]:  # noqa: D102
        n, T = rows.shape[0], rows.shape[1]
        idx = rows.reshape(-1)
        counts = torch.zeros(self.d_A, dtype=self.weight.dtype, device=rows.device)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
        return counts, float(n * T)

    def per_example_mats(self, arows: Tensor, grows: Tensor) -> Tensor:  # noqa: D102
        K, n, T, dG = grows.shape
        out = grows.new_zeros(K, n, dG, self.d_A)
        idx = arows.reshape(1, n, 1, T).expand(K, n, dG, T)
        return out.scatter_add_(3, idx, grows.transpose(2, 3))

    def to_mat(self, vw: Tensor, vb: Tensor | None) -> Tensor:  # noqa: D102
        return vw.transpose(1, 2)

    def from_mat(self, m: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        return m.transpose(1, 2), None


class AttentionProjectionRule(LayerRule, module_type=nn.MultiheadAttention):
    """``nn.MultiheadAttention``: the Q, K and V projections and ``out_proj`` as four blocks.

    The attention never calls its ``out_proj`` module: it hands ``in_proj_weight`` (or
    ``q/k/v_proj_weight``) and ``out_proj.weight`` to
    :func:`torch.nn.functional.multi_head_attention_forward`, which applies them with
    ``F.linear``. The capture (:class:`~second.kfac.Capture`) records those calls while
    the module runs: the Q, K and V blocks own rows ``[0, E)``, ``[E, 2E)`` and
    ``[2E, 3E)`` of ``in_proj_weight``/``in_proj_bias`` (or a whole ``*_proj_weight``),
    with the query, key and value as inputs; ``out_proj`` has the attention's output.
    Inputs are stored batch-first ``[N, T, d]``, gradients arrive sequence-first.
    ``bias_k``/``bias_v`` (``add_bias_kv``) stay outside (a diagonal block).

    Example:
        >>> mha = torch.nn.MultiheadAttention(4, 2)
        >>> " ".join(f"{r.name}:{r.d_G}x{r.d_A}" for r in rule_for(mha).build("att", mha, "expand"))
        'att.q:4x5 att.k:4x5 att.v:4x5 att.out_proj:4x5'
    """

    functional = True

    def __init__(
        self,
        name: str,
        module: nn.Module,
        weight: Tensor,
        bias: Tensor | None,
        w_rows: slice | None,
        b_rows: slice | None,
        weight_sharing: str,
    ):
        self._setup(
            name, module, weight, bias, w_rows=w_rows, b_rows=b_rows, weight_sharing=weight_sharing
        )
        self.d_G, self.d_in = self.w_shape
        self.d_A = self.d_in + int(self.has_bias)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        m = cast(nn.MultiheadAttention, module)
        return _initialized(*(p for _, p in m.named_parameters(recurse=False)))

    @classmethod
    def build(cls, name: str, module: nn.Module, weight_sharing: str) -> list[LayerRule]:  # noqa: D102
        m = cast(nn.MultiheadAttention, module)
        E, prefix = m.embed_dim, f"{name}." if name else ""
        b = m.in_proj_bias
        out: list[LayerRule] = []
        for i, part in enumerate("qkv"):
            rows = slice(i * E, (i + 1) * E)
            if m._qkv_same_embed_dim:
                w, w_rows = cast(Tensor, m.in_proj_weight), rows
            else:
                w, w_rows = cast(Tensor, getattr(m, f"{part}_proj_weight")), None
            out.append(cls(prefix + part, m, w, b, w_rows, rows, weight_sharing))
        o = m.out_proj
        out.append(cls(prefix + "out_proj", m, o.weight, o.bias, None, None, weight_sharing))
        return out

    def positions(self, g: Tensor) -> Tensor:  # noqa: D102
        # the functional forward is sequence-first: [K, T, N, d_G] (out_proj: [K, T*N, d_G]
        # is reshaped by the capture)
        return g.transpose(1, 2)

    def span(self) -> tuple[int, int]:
        """The rows ``[start, stop)`` of ``weight`` this block owns."""
        if self.w_rows is None:
            return 0, self.weight.shape[0]
        return self.w_rows.start, self.w_rows.stop


class DiagonalRule:
    r"""A layer whose block is kept as its exact diagonal: per-example gradients squared.

    Subclasses register with ``module_type=`` like :class:`LayerRule` and define
    :meth:`per_example` (the per-example, per-column gradients of the parameters from
    the layer's input and the gradient at its output). The block's diagonal is then
    :math:`w\sum_{i,k} (\partial s_{ik}^\top f_i/\partial\theta)^2`: the exact diagonal
    of the GGN (``fisher="type2"``) or of the Fisher estimate in use.

    Attributes:
        name, module: the module and its name.
        weight, bias: its affine parameters (either may be ``None``).

    Example:
        >>> ln = torch.nn.LayerNorm(3)
        >>> rule = LayerNormRule("ln", ln)
        >>> x, g = torch.randn(2, 3), torch.ones(1, 2, 3)
        >>> [tuple(t.shape) for t in rule.squared_grads(x, g)]   # weight, bias
        [(3,), (3,)]
    """

    module_type: ClassVar[type[nn.Module]]
    behaviour: ClassVar[tuple[str, ...]] = ("forward",)
    functional: ClassVar[bool] = False
    modules: list[nn.Module]

    def __init_subclass__(cls, module_type: type[nn.Module] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        _register(cls, module_type)

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module, self.modules = name, module, [module]
        self.weight = cast("Tensor | None", getattr(module, "weight", None))
        self.bias = cast("Tensor | None", getattr(module, "bias", None))

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether the module has trainable affine parameters to cover."""
        ps = [getattr(module, "weight", None), getattr(module, "bias", None)]
        return any(p is not None for p in ps) and _initialized(*ps)

    @classmethod
    def build(cls, name: str, module: nn.Module, weight_sharing: str) -> list[DiagonalRule]:
        """The rule of ``module`` (one)."""
        return [cls(name, module)]

    def params(self) -> list[Tensor]:
        """The affine parameters (weight, then bias; those that exist)."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def keys(self) -> set[tuple[int, int]]:
        """``(id(parameter), 0)`` of the parameters."""
        return {(id(p), 0) for p in self.params()}

    def normalized(self, inp: Tensor) -> Tensor:
        """The layer's normalized input, before the affine map."""
        raise NotImplementedError

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:
        """Dimensions of ``x [n, ...]`` summed over for the per-example gradients."""
        raise NotImplementedError

    def per_example(self, inp: Tensor, g: Tensor) -> list[Tensor]:
        """Per-example, per-column gradients ``[K, n, *p.shape]`` of :meth:`params`."""
        xh = self.normalized(inp.detach()).to(g.dtype)
        dims = tuple(d + 1 for d in self.channel_dims(xh))  # g has the leading K
        out = []
        if self.weight is not None:
            out.append((g * xh).sum(dims) if dims else g * xh)
        if self.bias is not None:
            out.append(g.sum(dims) if dims else g)
        return [t.reshape(t.shape[0], t.shape[1], *p.shape) for t, p in zip(out, self.params())]

    def squared_grads(self, inp: Tensor, g: Tensor) -> list[Tensor]:
        r""":math:`\sum_{k,i}` of the squared per-example gradients, shaped like :meth:`params`."""
        return [(t * t).sum((0, 1)) for t in self.per_example(inp, g)]

    def approximation(self) -> str:
        """``"diagonal-exact"``."""
        return "diagonal-exact"


class LayerNormRule(DiagonalRule, module_type=nn.LayerNorm):
    r"""``nn.LayerNorm``: :math:`\hat x = (x - \mu)/\sigma` over the normalized shape.

    Example:
        >>> LayerNormRule("ln", torch.nn.LayerNorm(3)).normalized(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[-1.2247,  0.0000,  1.2247]])
    """

    def normalized(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.LayerNorm, self.module)
        return F.layer_norm(inp, m.normalized_shape, None, None, m.eps)

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:  # noqa: D102
        nd = len(cast(nn.LayerNorm, self.module).normalized_shape)
        return tuple(range(1, x.dim() - nd))


class RMSNormRule(DiagonalRule, module_type=nn.RMSNorm):
    r"""``nn.RMSNorm``: :math:`\hat x = x / \mathrm{rms}(x)` over the normalized shape.

    Example:
        >>> RMSNormRule("norm", torch.nn.RMSNorm(2)).normalized(torch.tensor([[3.0, 4.0]]))
        tensor([[0.8485, 1.1314]])
    """

    def normalized(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.RMSNorm, self.module)
        return F.rms_norm(inp, m.normalized_shape, None, m.eps)

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:  # noqa: D102
        nd = len(cast(nn.RMSNorm, self.module).normalized_shape)
        return tuple(range(1, x.dim() - nd))


class GroupNormRule(DiagonalRule, module_type=nn.GroupNorm):
    """``nn.GroupNorm``: per-channel scale and shift of the group-normalized input.

    Example:
        >>> rule = GroupNormRule("gn", torch.nn.GroupNorm(1, 2))
        >>> rule.normalized(torch.tensor([[[1.0], [3.0]]])).flatten()
        tensor([-1.0000,  1.0000])
    """

    def normalized(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.GroupNorm, self.module)
        return F.group_norm(inp, m.num_groups, None, None, m.eps)

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:  # noqa: D102
        return tuple(range(2, x.dim()))


class BatchNormRule(DiagonalRule, module_type=nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d/2d/3d): the running statistics in eval mode, the batch's in training.

    In training mode an example's output depends on the whole batch; the per-example
    gradients of the affine parameters are still exact (the normalized input does not
    depend on them), the GGN itself couples the examples.

    Example:
        >>> rule = BatchNormRule("bn", torch.nn.BatchNorm1d(2).eval())  # running mean 0, var 1
        >>> rule.normalized(torch.tensor([[1.0, 3.0]])), rule.approximation()
        (tensor([[1.0000, 3.0000]]), 'diagonal-exact')
    """

    def normalized(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.BatchNorm1d, self.module)
        batch = m.training or m.running_mean is None
        rm, rv = (None, None) if batch else (m.running_mean, m.running_var)
        return F.batch_norm(inp, rm, rv, None, None, batch, 0.0, m.eps)

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:  # noqa: D102
        return tuple(range(2, x.dim()))


def rule_for(module: nn.Module) -> type[LayerRule] | type[DiagonalRule] | None:
    """The registered rule class for ``module``, or ``None`` if unsupported.

    The closest registered type in ``module``'s class hierarchy is used, provided the
    module inherits that rule's ``behaviour`` methods unchanged (a subclass with its own
    ``forward`` is not covered by ``nn.Linear``'s rule) and the rule ``supports`` it.

    Example:
        >>> rule_for(torch.nn.Linear(2, 2)).__name__, rule_for(torch.nn.Tanh())
        ('LinearRule', None)
        >>> class Scaled(torch.nn.Linear):
        ...     def forward(self, x): return 2 * super().forward(x)
        >>> rule_for(torch.nn.MultiheadAttention(4, 1).out_proj).__name__, rule_for(Scaled(2, 2))
        ('LinearRule', None)
    """
    typ = type(module)
    for base in typ.__mro__:
        cls = RULES.get(base)
        if cls is None:
            continue
        if base is not typ and any(
            getattr(typ, meth, None) is not getattr(base, meth, None) for meth in cls.behaviour
        ):
            return None
        return cls if cls.supports(module) else None
    return None


def find_rules(
    model: nn.Module,
    params: Sequence[Tensor] | None = None,
    *,
    weight_sharing: WeightSharing = "expand",
) -> tuple[list[LayerRule], list[DiagonalRule]]:
    """The Kronecker blocks and the exact-diagonal layers of ``model``.

    Only modules whose parameters all require grad (and are in ``params``) count. A
    parameter shared by several modules (weight tying) keeps a rule when all of them
    are the same kind of layer with the same parameters: one block, whose statistics
    add up over every module's calls; otherwise the shared parameters (and their
    modules' other parameters) are left outside, to the fallback (a diagonal block).

    Args:
        model: the network.
        params: the parameters to cover (default: all).
        weight_sharing: ``"expand"`` (default) or ``"reduce"`` for every layer, a
            mapping ``{module name pattern or module type: mode}`` (a pattern as in
            :func:`fnmatch.fnmatch`, a type by ``isinstance``; the first match counts,
            unmatched layers expand), e.g. ``{nn.Conv2d: "reduce"}``, or ``"auto"``
            (:data:`AUTO_WEIGHT_SHARING`: that mapping).

    Returns:
        ``(kronecker rules, diagonal rules)``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        >>> kron, diag = find_rules(net)
        >>> [r.name for r in kron], [r.name for r in diag]
        (['0'], ['1'])
    """
    allowed = None if params is None else {id(p) for p in params}
    users: Counter[int] = Counter()
    for m in model.modules():
        users.update(id(p) for p in m.parameters(recurse=False))
    candidates: list[LayerRule | DiagonalRule] = []
    inside: set[int] = set()  # parameters a functional rule (attention) applies itself
    for name, m in model.named_modules():
        cls = rule_for(m)
        if cls is None and isinstance(m, nn.MultiheadAttention):
            # an attention without a rule (its own forward) still applies out_proj's weights
            # functionally: out_proj's module is never called, so it gets no block either
            inside |= {id(p) for p in m.parameters()}
        if cls is None or all(id(p) in inside for p in m.parameters(recurse=False)):
            continue
        for rule in cls.build(name, m, _sharing_for(name, m, weight_sharing)):
            ps = rule.params()
            if not all(p.requires_grad for p in ps):
                continue
            if allowed is not None and not all(id(p) in allowed for p in ps):
                continue
            candidates.append(rule)
            if rule.functional:
                inside |= {id(p) for p in ps}
    # weight tying: the rules of several modules that own the same parameters
    groups: dict[frozenset, list[LayerRule | DiagonalRule]] = {}
    for rule in candidates:
        groups.setdefault(frozenset(rule.keys()), []).append(rule)
    claimed = Counter(key for key in (k for g in groups for k in g))
    shared = {key[0] for key, c in claimed.items() if c > 1}  # used by two different blocks
    kron: list[LayerRule] = []
    diag: list[DiagonalRule] = []
    for rules in groups.values():
        first = rules[0]
        ids = {id(p) for p in first.params()}
        same = all(
            type(r) is type(first)
            and getattr(r, "w_shape", None) == getattr(first, "w_shape", None)
            for r in rules
        )
        # a module that uses one of these parameters without being one of the rules
        outsiders = not first.functional and any(users[i] > len(rules) for i in ids)
        if not same or outsiders or ids & shared:
            continue
        first.modules = [r.module for r in rules]
        if isinstance(first, DiagonalRule):
            diag.append(first)
        else:
            kron.append(first)
    return kron, diag


def find_layers(
    model: nn.Module,
    params: Sequence[Tensor] | None = None,
    *,
    weight_sharing: WeightSharing = "expand",
) -> list[LayerRule]:
    """The Kronecker blocks of ``model`` (:func:`find_rules`, without the diagonal layers).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> " ".join(f"{r.name}:{type(r).__name__}" for r in find_layers(net))
        '0:LinearRule 2:LinearRule'
    """
    return find_rules(model, params, weight_sharing=weight_sharing)[0]


def approximations(
    model: nn.Module,
    layers: Sequence[LayerRule],
    diagonal: Sequence[DiagonalRule],
    params: Sequence[Tensor],
    fallback: str = "diagonal",
) -> dict[str, str]:
    """``{parameter name: approximation}`` for the parameters ``params`` of ``model``.

    Values: ``"kronecker"`` (a layer seen at one position per example so far),
    ``"kronecker-expand"``/``"kronecker-reduce"`` (a layer shared over positions, by its
    ``weight_sharing``), ``"diagonal-exact"`` (normalization layers), ``"diagonal"`` (a
    Rademacher estimate of the curvature diagonal: every other parameter, tied
    parameters of different layers included) or ``"identity"`` (``fallback="identity"``:
    damping only). ``nn.MultiheadAttention``'s ``in_proj_weight`` holds three blocks
    (Q, K, V) with one label.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        >>> kron, diag = find_rules(net)
        >>> approximations(net, kron, diag, list(net.parameters()))
        {'0.weight': 'kronecker', '0.bias': 'kronecker', '1.weight': 'diagonal-exact', '1.bias': 'diagonal-exact'}
    """
    label: dict[int, str] = {}
    rules: list[LayerRule | DiagonalRule] = [*layers, *diagonal]
    for rule in rules:
        for p in rule.params():
            label[id(p)] = rule.approximation()
    if fallback == "identity":
        label.update({id(p): "identity" for r in diagonal for p in r.params()})
    rest = "identity" if fallback == "identity" else "diagonal"
    wanted = {id(p) for p in params}
    return {name: label.get(id(p), rest) for name, p in model.named_parameters() if id(p) in wanted}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (else ``model``).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model
