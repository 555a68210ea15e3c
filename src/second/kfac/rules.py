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

Built in, each in its own module: the Kronecker rules of :class:`~torch.nn.Linear`,
:class:`~torch.nn.Conv1d`/:class:`~torch.nn.Conv2d`/:class:`~torch.nn.Conv3d` and the
transposed ones (one rule each for all dimensions) and :class:`~torch.nn.Embedding`
(:mod:`second.kfac.layers`) and of :class:`~torch.nn.MultiheadAttention`
(:mod:`second.kfac.attention`: Q, K, V and ``out_proj`` as four blocks); the exact-diagonal
rules of the normalization layers (:mod:`second.kfac.norms`). Their names are importable
from here too.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

__all__: list[str] = [
    "LayerRule",
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


def _register(cls, module_type: type[nn.Module] | tuple[type[nn.Module], ...] | None) -> None:
    if module_type is not None:
        cls.module_type = module_type
        for t in module_type if isinstance(module_type, tuple) else (module_type,):
            RULES[t] = cls


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

    module_type: ClassVar[type[nn.Module] | tuple[type[nn.Module], ...]]
    diag_A: ClassVar[bool] = False
    behaviour: ClassVar[tuple[str, ...]] = ("forward",)
    """Methods a subclass of ``module_type`` must inherit unchanged to be covered."""
    functional: ClassVar[bool] = False
    """Captured from ``F.linear`` calls inside the module's forward (not its output)."""
    reducible: ClassVar[bool] = True
    """Whether ``weight_sharing="reduce"`` applies (else the rule always expands)."""

    def __init_subclass__(
        cls, module_type: type[nn.Module] | tuple[type[nn.Module], ...] | None = None, **kwargs
    ):
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
    def build(
        cls, name: str, module: nn.Module, weight_sharing: str
    ) -> Sequence[LayerRule | DiagonalRule]:
        """The blocks of ``module`` (default: one; a rule may also hand it to a diagonal)."""
        return [cls(name, module, weight_sharing=weight_sharing)]

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_in, d_G)``: the input width (without the bias column) and the output width."""
        raise NotImplementedError

    def features(self, inp: Tensor) -> Tensor:
        """The layer input as ``[n, T, d_in]`` rows (positions ``T``), without the bias."""
        return inp.reshape(inp.shape[0], -1, self.d_in)

    def mean_features(self, inp: Tensor) -> tuple[Tensor, int]:
        """``(rows, T)``: :meth:`features` averaged over the ``T`` positions, ``[n, 1, d_in]``.

        What ``"reduce"`` needs; a rule whose rows are costly to form (a convolution's
        patches) computes the average without them.
        """
        rows = self.features(inp)
        return rows.mean(1, keepdim=True), rows.shape[1]

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
        if self._reduce(weight_sharing):
            rows, positions = self.mean_features(inp)
        else:
            rows = self.features(inp)
            positions = rows.shape[1]
        if positions > 1:
            self.shared = True
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
    """The module inside ``DistributedDataParallel``/``DataParallel`` and ``torch.compile``.

    Parameter names (``approximations()``) are then those of the user's own module.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


# The built-in rules register themselves when their modules are imported: importing them here
# (after the base classes and the registry exist) fills RULES whichever module is imported first.
from . import layers as _layers  # noqa: E402
from .attention import AttentionProjectionRule  # noqa: E402
from .layers import *  # noqa: E402, F403  (Linear, Conv..., Embedding: their names are layers.__all__)
from .norms import (  # noqa: E402
    BatchNormRule,
    DiagonalRule,
    GroupNormRule,
    LayerNormRule,
    RMSNormRule,
)

__all__ += _layers.__all__
