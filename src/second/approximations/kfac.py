r"""Kronecker-factored curvature: KFAC and eigenvalue-corrected KFAC (EK-FAC).

For a layer with weight matrix :math:`W` (bias appended as a last column), input rows
:math:`a_{it}` and output rows :math:`z_{it}` (example :math:`i`, position :math:`t`:
a token of a sequence, a pixel of a convolution's output, or ``T = 1`` for a plain
:class:`torch.nn.Linear` on vectors), the curvature block of the dataset objective is
approximated by a Kronecker product

.. math::

    B \approx A \otimes G,\qquad
    A = \frac{1}{N T}\sum_{i,t} a_{it} a_{it}^\top,\qquad
    G = w \sum_{i} \sum_k \sum_t g_{ikt} g_{ikt}^\top,\qquad
    g_{ikt} = \frac{\partial (s_{ik}^\top f_i)}{\partial z_{it}},

where :math:`f_i` is the network output, :math:`s_{ik}` are columns of a square root of
the per-example output curvature (:math:`\sum_k s_{ik} s_{ik}^\top \approx \nabla^2_f \ell_i`)
and :math:`w = 1/N` for a mean-reduced loss, :math:`1` for a sum-reduced one.

**Scaling convention.** All the loss' scale sits in :math:`G`, :math:`A` is a plain
mean. The approximation therefore has the scale of :func:`second.exact_ggn` of the
training loss as written (``nn.MSELoss()`` averages over the outputs too, so its GGN
is :math:`2/C` times the one of the sum of squares), and for a deep linear network
with one datum ``KFAC`` equals the exact GGN block of every layer. Libraries that
drop the factor 2 of the squared error, or the :math:`1/C`, differ from ours by it.

**Ordering.** ``W`` is flattened row-major (``[out, in]``), so in the parameter
ordering the weight block is ``kron(G, A)``; :meth:`KFACOperator.to_dense` follows
the order of ``model.parameters()``.

The curvature square roots :math:`s_{ik}` (``fisher=``):

* ``"type2"`` (default): the exact factorization of :math:`\nabla^2_f\ell_i`, one
  backward column per output (MSE: :math:`\sqrt{2a}\,I`; BCE-with-logits:
  :math:`\mathrm{diag}\sqrt{a\,\sigma(1-\sigma)}`; cross-entropy:
  :math:`\sqrt{a}\,(\mathrm{diag}\sqrt{p} - p\sqrt{p}^\top)`, per spatial position),
  so :math:`G` is built from the GGN itself.
* ``"mc"``: :math:`s_{ik} = \nabla_f \ell(f_i, \tilde y_{ik}) / \sqrt{a K}` with targets
  sampled from the model (``mc_samples = K``), an unbiased estimate of the same.
* ``"empirical"``: :math:`s_i = \nabla_f \ell(f_i, y_i)` with the observed targets
  (the empirical Fisher; no :math:`a`).

Here :math:`a` is the loss' scale relative to a negative log-likelihood (see
:mod:`second._losses`).

**Layers.** :class:`~torch.nn.Linear` (with or without bias, any leading dimensions as
positions), :class:`~torch.nn.Conv2d` (``groups=1``, zero padding; patches by
:func:`torch.nn.functional.unfold`, channel-major ``(C_in, k_h, k_w)`` like the weight,
output pixels as positions: the "KFC expand" convention of Grosse & Martens 2016) and
:class:`~torch.nn.Embedding` (one-hot inputs, so :math:`A` is diagonal). Every other
parameter gets a diagonal block (``fallback="diagonal"``: an unbiased Rademacher
estimate :math:`w\sum_{i,k} (\partial s_{ik}^\top f_i / \partial\theta)^2` of the curvature
diagonal, exact with one datum) or a zero block (``fallback="identity"``: only the
damping acts there, the inverse is ``I / damping``).

References:
    J. Martens, R. Grosse. Optimizing neural networks with Kronecker-factored
    approximate curvature. ICML 2015.
    R. Grosse, J. Martens. A Kronecker-factored approximate Fisher matrix for
    convolution layers. ICML 2016.
    T. George et al. Fast approximate natural gradient descent in a Kronecker-factored
    eigenbasis. NeurIPS 2018.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from .._errors import NonFiniteError
from .._losses import loss_kind, nll_scale, per_sample_losses, sample_targets
from ..operators.base import LinearOperator
from ..operators.curvature import CurvatureOperator, _dist_active, sample_generator

__all__ = ["KFACOperator", "EKFACOperator", "KFACInverseOperator", "EKFACInverseOperator"]

FISHER_TYPES = ("type2", "mc", "empirical")
FALLBACKS = ("diagonal", "identity")


# ============================================================================ layers
class _Layer:
    """A supported module: how its inputs, output gradients and weights become matrices.

    The layer's weight (and bias) as a matrix ``[d_G, d_A]``: rows indexed by outputs,
    columns by inputs (bias last). For an embedding the rows are the embedding
    dimensions and the columns the vocabulary (the weight transposed).
    """

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.weight = module.weight
        self.bias = getattr(module, "bias", None)
        self.has_bias = self.bias is not None
        if isinstance(module, nn.Linear):
            self.kind = "linear"
            self.d_in, self.d_G = module.in_features, module.out_features
        elif isinstance(module, nn.Conv2d):
            self.kind = "conv2d"
            c, kh, kw = module.weight.shape[1:]
            self.d_in, self.d_G = c * kh * kw, module.out_channels
        else:
            self.kind = "embedding"
            self.d_in, self.d_G = module.num_embeddings, module.embedding_dim
        self.d_A = self.d_in + int(self.has_bias)
        self.diag_A = self.kind == "embedding"

    @staticmethod
    def supports(module: nn.Module) -> bool:
        if type(module) is nn.Linear:
            return True
        if type(module) is nn.Conv2d:
            return (
                module.groups == 1
                and module.padding_mode == "zeros"
                and not isinstance(module.padding, str)
            )
        if type(module) is nn.Embedding:
            return module.max_norm is None and not module.sparse
        return False

    def params(self) -> list[Tensor]:
        return [self.weight] + ([self.bias] if self.has_bias else [])

    # -- inputs ----------------------------------------------------------------------------
    def input_rows(self, inp: Tensor) -> Tensor:
        """``[n, T, d_A]`` input rows (bias 1 appended); for an embedding ``[n, T]`` indices."""
        n = inp.shape[0]
        if self.kind == "embedding":
            return inp.reshape(n, -1)
        if self.kind == "linear":
            rows = inp.reshape(n, -1, self.d_in)
        else:
            m = self.module
            rows = F.unfold(
                inp, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
            ).transpose(1, 2)  # [n, T, C*kh*kw]
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)
        return rows

    def grad_rows(self, g: Tensor) -> Tensor:
        """Output gradients ``[K, n, ...]`` as ``[K, n, T, d_G]``."""
        K, n = g.shape[:2]
        if self.kind == "conv2d":
            return g.reshape(K, n, self.d_G, -1).transpose(2, 3)
        return g.reshape(K, n, -1, self.d_G)

    def mask(self, inp: Tensor) -> Tensor | None:
        """For an embedding with ``padding_idx``: ``[n, T]`` positions that get gradient."""
        if self.kind == "embedding" and self.module.padding_idx is not None:
            return inp.reshape(inp.shape[0], -1) != self.module.padding_idx
        return None

    # -- factor statistics -------------------------------------------------------------------
    def a_stats(self, rows: Tensor) -> tuple[Tensor, float]:
        """``(sum_{i,t} a a^T, n*T)``; for an embedding the diagonal (counts)."""
        n, T = rows.shape[0], rows.shape[1]
        if self.kind == "embedding":
            idx = rows.reshape(-1)
            counts = torch.zeros(self.d_A, dtype=self.weight.dtype, device=rows.device)
            counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
            return counts, float(n * T)
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.T @ flat, float(n * T)

    @staticmethod
    def g_stats(grows: Tensor) -> Tensor:
        flat = grows.reshape(-1, grows.shape[-1])
        return flat.T @ flat

    # -- per-example gradients (EK-FAC) ----------------------------------------------------
    def per_example_mats(self, arows: Tensor, grows: Tensor) -> Tensor:
        """``[K, n, d_G, d_A]``: per-example, per-column gradient of the weight matrix."""
        if self.kind == "embedding":
            K, n, T, dG = grows.shape
            out = grows.new_zeros(K, n, dG, self.d_A)
            idx = arows.reshape(1, n, 1, T).expand(K, n, dG, T)
            return out.scatter_add_(3, idx, grows.transpose(2, 3))
        return torch.einsum("kntg,nta->knga", grows, arows)

    # -- parameter <-> matrix --------------------------------------------------------------
    def to_mat(self, vw: Tensor, vb: Tensor | None) -> Tensor:
        """Parameter-shaped ``[k, *W.shape]`` (and ``[k, out]``) to ``[k, d_G, d_A]``."""
        k = vw.shape[0]
        if self.kind == "embedding":
            return vw.transpose(1, 2)
        m = vw.reshape(k, self.d_G, self.d_in)
        if self.has_bias:
            m = torch.cat([m, vb.unsqueeze(-1)], dim=-1)
        return m

    def from_mat(self, m: Tensor) -> tuple[Tensor, Tensor | None]:
        k = m.shape[0]
        if self.kind == "embedding":
            return m.transpose(1, 2), None
        vw = m[..., : self.d_in].reshape(k, *self.weight.shape)
        vb = m[..., self.d_in] if self.has_bias else None
        return vw, vb


def find_layers(model: nn.Module, params: Sequence[Tensor] | None = None) -> list[_Layer]:
    """Supported modules of ``model`` whose parameters all require grad (and are in ``params``)."""
    allowed = None if params is None else {id(p) for p in params}
    layers = []
    for name, m in model.named_modules():
        if not _Layer.supports(m):
            continue
        layer = _Layer(name, m)
        ps = layer.params()
        if not all(p.requires_grad for p in ps):
            continue
        if allowed is not None and not all(id(p) in allowed for p in ps):
            continue
        layers.append(layer)
    seen: set[int] = set()
    out = []
    for layer in layers:  # a weight shared by two modules: the first one owns it
        ids = {id(p) for p in layer.params()}
        if ids & seen:
            continue
        seen |= ids
        out.append(layer)
    return out


class _Capture:
    """Forward hooks storing every supported layer's input and output tensor."""

    def __init__(self, layers: Sequence[_Layer]):
        self.layers = list(layers)
        self.inputs: dict[int, list[Tensor]] = {}
        self.outputs: dict[int, list[Tensor]] = {}
        self.handles: list = []
        self.active = True

    def __enter__(self):
        for j, layer in enumerate(self.layers):
            self.handles.append(layer.module.register_forward_hook(self._hook(j)))
        return self

    def _hook(self, j: int):
        def hook(module, args, output):
            if (
                not self.active
                or not torch.is_grad_enabled()
                or module is not self.layers[j].module
            ):
                return
            self.inputs.setdefault(j, []).append(args[0].detach())
            self.outputs.setdefault(j, []).append(output)

        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ============================================================================ output curvature
def _check_loss(loss_fn: Callable, fisher: str) -> str:
    kind = loss_kind(loss_fn)
    if kind is None and fisher != "empirical":
        raise NotImplementedError(
            f"KFAC with fisher={fisher!r} needs the output curvature of the loss: supported are "
            f"MSELoss, CrossEntropyLoss and BCEWithLogitsLoss, got {type(loss_fn).__name__} "
            "(use fisher='empirical')"
        )
    if kind is not None:
        if (
            getattr(loss_fn, "weight", None) is not None
            or getattr(loss_fn, "pos_weight", None) is not None
        ):
            raise NotImplementedError("weighted losses (weight=/pos_weight=) are not supported")
        if getattr(loss_fn, "label_smoothing", 0.0):
            raise NotImplementedError("label smoothing is not supported")
    return kind


def output_hessian_sqrt(loss_fn: Callable, f: Tensor, reduction: str) -> Tensor:
    r"""Columns ``S [K, n, *f.shape[1:]]`` with :math:`\sum_k s_{ik} s_{ik}^\top = \nabla^2_f \ell_i`.

    Exact factorizations of the per-example output Hessian (see the module docstring).
    """
    kind = loss_kind(loss_fn)
    f = f.detach()
    a = nll_scale(loss_fn, f, reduction)
    n = f.shape[0]
    if kind in ("mse", "bce"):
        D = f[0].numel()
        if kind == "mse":
            diag = torch.full_like(f, math.sqrt(2.0 * a)).reshape(n, D)
        else:
            s = torch.sigmoid(f)
            diag = (a * s * (1 - s)).sqrt().reshape(n, D)
        eye = torch.eye(D, dtype=f.dtype, device=f.device)
        S = eye.unsqueeze(1) * diag.unsqueeze(0)  # [D, n, D]
        return S.reshape(D, *f.shape)
    # cross-entropy over dim 1, spatial positions after it
    C = f.shape[1]
    p = torch.softmax(f, dim=1).movedim(1, -1).reshape(n, -1, C)  # [n, P, C]
    P = p.shape[1]
    sq = p.sqrt()
    # column c at position q: sqrt(a) (sqrt(p_c) e_c - p sqrt(p_c)) at q, zero elsewhere
    cols = torch.diag_embed(sq) - p.unsqueeze(-1) * sq.unsqueeze(-2)  # [n, P, C(out), C(col)]
    cols = cols * math.sqrt(a)
    eye = torch.eye(P, dtype=f.dtype, device=f.device)
    S = torch.einsum("iqoc,qr->cqior", cols, eye)  # [C(col), P(col), n, C, P]
    return S.reshape(C * P, *f.shape)


def output_hessian_product(loss_fn: Callable, f: Tensor, t: Tensor, reduction: str) -> Tensor:
    r"""Per-example :math:`(\nabla^2_f \ell_i)\, t_i` for ``t`` shaped ``[k, *f.shape]``."""
    kind = loss_kind(loss_fn)
    f = f.detach()
    a = nll_scale(loss_fn, f, reduction)
    if kind == "mse":
        return 2.0 * a * t
    if kind == "bce":
        s = torch.sigmoid(f)
        return a * s * (1 - s) * t
    if kind == "ce":
        p = torch.softmax(f, dim=1)
        return a * (p * t - p * (p * t).sum(dim=2, keepdim=True))
    raise NotImplementedError(f"no output curvature for {type(loss_fn).__name__}")


def curvature_columns(
    loss_fn: Callable,
    f: Tensor,
    y: Tensor | None,
    reduction: str,
    fisher: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The backward columns ``[K, n, ...]`` of the chosen Fisher type (module docstring)."""
    if fisher == "type2":
        return output_hessian_sqrt(loss_fn, f, reduction)
    kind = loss_kind(loss_fn)
    ii = getattr(loss_fn, "ignore_index", -100)
    closed = kind is not None and not (kind == "ce" and 0 <= ii < f.shape[1])
    if closed and fisher == "empirical" and kind == "ce":
        closed = not bool((y == ii).any())  # ignored targets: let the loss handle them
    if closed:
        # closed forms of the per-example loss gradients (no autograd pass)
        fd = f.detach()
        a = nll_scale(loss_fn, fd, reduction)
        if fisher == "empirical":
            return _loss_gradient(kind, fd, y, a).unsqueeze(0)
        cols = [
            _loss_gradient(kind, fd, sample_targets(loss_fn, fd, generator), a)
            for _ in range(mc_samples)
        ]
        return torch.stack(cols) / math.sqrt(a * mc_samples)
    fd = f.detach().requires_grad_(True)
    with torch.enable_grad():
        if fisher == "empirical":
            (s,) = torch.autograd.grad(per_sample_losses(loss_fn, fd, y, reduction).sum(), fd)
            return s.unsqueeze(0)
        a = nll_scale(loss_fn, fd, reduction)
        cols = []
        for _ in range(mc_samples):
            yt = sample_targets(loss_fn, fd, generator)
            (s,) = torch.autograd.grad(per_sample_losses(loss_fn, fd, yt, reduction).sum(), fd)
            cols.append(s)
    return torch.stack(cols) / math.sqrt(a * mc_samples)


def _loss_gradient(kind: str, f: Tensor, y: Tensor, a: float) -> Tensor:
    r""":math:`\nabla_f \ell_i(f_i, y_i)` of the per-example losses in closed form."""
    if kind == "mse":
        return 2.0 * a * (f - y)
    if kind == "bce":
        return a * (torch.sigmoid(f) - y)
    p = torch.softmax(f, dim=1)
    onehot = torch.zeros_like(p).scatter_(1, y.unsqueeze(1), 1.0)
    return a * (p - onehot)


def backprop_columns(
    f: Tensor, S: Tensor, targets: Sequence[Tensor], retain_graph: bool = True
) -> list[Tensor]:
    """``d (S_k . f) / d target`` for every column ``k``: each result ``[K, *target.shape]``."""
    if not targets:
        return []
    K = S.shape[0]
    if K == 1:
        gs = torch.autograd.grad(f, targets, S[0], retain_graph=retain_graph, allow_unused=True)
        gs = [None if g is None else g.unsqueeze(0) for g in gs]
    else:
        gs = torch.autograd.grad(
            f, targets, S, retain_graph=retain_graph, allow_unused=True, is_grads_batched=True
        )
    return [
        torch.zeros((K, *t.shape), dtype=t.dtype, device=t.device) if g is None else g
        for g, t in zip(gs, targets)
    ]


def _rademacher(shape, like: Tensor, generator) -> Tensor:
    r = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * r - 1).to(like.dtype)


# ============================================================================ the statistics
class _Stats:
    """Sums of factor statistics over batches (and ranks), normalized at the end."""

    def __init__(
        self, layers: Sequence[_Layer], fallback_params: Sequence[Tensor], lazy: bool = False
    ):
        self.layers, self.fallback_params = list(layers), list(fallback_params)
        self.lazy = lazy  # keep the rows of the products (add_rows) instead of forming them
        self.A = [None] * len(self.layers)
        self.G = [None] * len(self.layers)
        self.nA = [0.0] * len(self.layers)
        self.diag = [None] * len(self.fallback_params)
        self.n = 0.0
        # pending rows ``(a [m, d_A], g [m', d_G])`` whose products ``a^T a``, ``g^T g``
        # are not formed yet: a consumer may fold them into its own sums (one addmm)
        self.rows: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.layers]

    def add(self, j: int, A: Tensor, nA: float, G: Tensor) -> None:
        self.A[j] = A if self.A[j] is None else self.A[j] + A
        self.G[j] = G if self.G[j] is None else self.G[j] + G
        self.nA[j] += nA

    def add_rows(self, j: int, a: Tensor, nA: float, g: Tensor) -> None:
        """Add ``a^T a`` and ``g^T g`` later (see :meth:`take_rows`, :meth:`tensors`)."""
        self.rows[j].append((a, g))
        self.nA[j] += nA

    def take_rows(self, j: int) -> list[tuple[Tensor, Tensor]]:
        """The pending rows of layer ``j`` (its products with ``A[j]``, ``G[j]`` still to add)."""
        rows, self.rows[j] = self.rows[j], []
        return rows

    def tensors(self) -> list[Tensor]:
        out = []
        for j in range(len(self.rows)):
            for a, g in self.take_rows(j):
                A, G = a.T @ a, g.T @ g
                self.A[j] = A if self.A[j] is None else self.A[j] + A
                self.G[j] = G if self.G[j] is None else self.G[j] + G
        for j, layer in enumerate(self.layers):
            w = layer.weight
            if self.A[j] is None:
                shape = (layer.d_A,) if layer.diag_A else (layer.d_A, layer.d_A)
                self.A[j] = w.new_zeros(shape)
                self.G[j] = w.new_zeros(layer.d_G, layer.d_G)
            out += [self.A[j], self.G[j]]
        for i, p in enumerate(self.fallback_params):
            if self.diag[i] is None:
                self.diag[i] = torch.zeros_like(p)
            out.append(self.diag[i])
        return out

    def all_reduce(self) -> None:
        ts = self.tensors()
        ref = self.layers[0].weight if self.layers else self.fallback_params[0]
        counts = ref.new_tensor([self.n, *self.nA])
        buf = torch.cat([t.reshape(-1) for t in ts] + [counts])
        dist.all_reduce(buf)
        off = 0
        for t in ts:
            t.copy_(buf[off : off + t.numel()].view_as(t))
            off += t.numel()
        self.n = float(buf[off])
        self.nA = [float(c) for c in buf[off + 1 :]]


def batch_statistics(
    layers: Sequence[_Layer],
    fallback_params: Sequence[Tensor],
    f: Tensor,
    S: Tensor,
    capture: _Capture,
    stats: _Stats,
    *,
    generator: torch.Generator | None = None,
    retain_graph: bool = True,
) -> None:
    """Add one batch's factor sums (columns ``S`` backpropagated from output ``f``)."""
    js = [j for j in range(len(layers)) if j in capture.outputs]
    outs = [o for j in js for o in capture.outputs[j]]
    if fallback_params:
        eps = _rademacher((S.shape[0], S.shape[1]), S, generator)
        S_fb = S * eps.reshape(eps.shape + (1,) * (S.dim() - 2))
        gp = backprop_columns(f, S_fb, list(fallback_params), retain_graph=True)
        for i, g in enumerate(gp):
            d = (g * g).sum(0)
            stats.diag[i] = d if stats.diag[i] is None else stats.diag[i] + d
    gouts = backprop_columns(f, S, outs, retain_graph=retain_graph)
    pos = 0
    for j in js:
        layer = layers[j]
        for inp in capture.inputs[j]:
            add_layer_statistics(stats, j, layer, inp, gouts[pos])
            pos += 1
    stats.n += f.shape[0]


def add_layer_statistics(stats, j: int, layer, inp: Tensor, g: Tensor) -> None:
    """Add one use of layer ``j``'s factor sums: input rows ``inp``, backpropagated columns ``g``.

    Padding positions (``layer.mask``, e.g. an embedding's padding index) are dropped from
    the input factor and zeroed in the gradient factor.
    """
    arows = layer.input_rows(inp)
    grows = layer.grad_rows(g)
    mask = layer.mask(inp)
    if mask is not None:
        arows = arows[mask].reshape(1, -1)
        grows = grows * mask.reshape(1, *mask.shape, 1).to(grows.dtype)
    if layer.kind == "embedding" or not stats.lazy:
        A, nA = layer.a_stats(arows)
        stats.add(j, A, nA, layer.g_stats(grows))
    else:
        a = arows.reshape(-1, arows.shape[-1])
        stats.add_rows(j, a, float(a.shape[0]), grows.reshape(-1, grows.shape[-1]))


# ============================================================================ eigen-blocks
def _sym_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix; eigenvalues clamped at 0.

    Computed in the factor's dtype (at least float32); if LAPACK fails to converge it is
    retried in float64 with a tiny diagonal shift.
    """
    work = M.dtype if M.dtype in (torch.float32, torch.float64) else torch.float32
    Mw = M.to(work)
    Mw = 0.5 * (Mw + Mw.T)
    if not bool(torch.isfinite(Mw).all()):
        raise NonFiniteError("a Kronecker factor has NaN or Inf entries")
    try:
        lam, Q = torch.linalg.eigh(Mw)
        return lam.clamp_min(0.0).to(M.dtype), Q.to(M.dtype).contiguous()
    except RuntimeError:
        pass
    M64 = M.to(torch.float64)
    M64 = 0.5 * (M64 + M64.T)
    if not bool(torch.isfinite(M64).all()):
        raise NonFiniteError("a Kronecker factor has NaN or Inf entries")
    try:
        lam, Q = torch.linalg.eigh(M64)
    except RuntimeError:  # ill-conditioned: a tiny diagonal shift makes LAPACK converge
        shift = 1e-12 * float(M64.diagonal().abs().max().clamp_min(1.0))
        lam, Q = torch.linalg.eigh(
            M64 + shift * torch.eye(M64.shape[0], dtype=M64.dtype, device=M64.device)
        )
        lam = lam - shift
    return lam.clamp_min(0.0).to(M.dtype), Q.to(M.dtype).contiguous()  # eigh returns column-major Q


class _Eigen:
    """``G = Q_G diag(l_G) Q_G^T``, ``A = Q_A diag(l_A) Q_A^T`` (``Q_A = None``: diagonal ``A``)."""

    def __init__(self, A: Tensor, G: Tensor, diag_A: bool):
        self.lG, self.QG = _sym_eigh(G)
        if diag_A:
            self.lA, self.QA = A.clamp_min(0.0), None
        else:
            self.lA, self.QA = _sym_eigh(A)

    @classmethod
    def from_parts(cls, lA: Tensor, QA: Tensor | None, lG: Tensor, QG: Tensor) -> _Eigen:
        """An eigendecomposition from stored parts (``QA=None``: diagonal ``A``)."""
        e = cls.__new__(cls)
        e.lA, e.QA, e.lG, e.QG = lA, QA, lG, QG
        return e

    def rotate(self, M: Tensor) -> Tensor:
        """``Q_G^T M Q_A`` for ``M [k, d_G, d_A]``."""
        out = self.QG.T @ M
        return out if self.QA is None else out @ self.QA

    def unrotate(self, M: Tensor) -> Tensor:
        """``Q_G M Q_A^T``."""
        out = self.QG @ M
        return out if self.QA is None else out @ self.QA.T

    def pi(self) -> float:
        tA = float(self.lA.mean())
        tG = float(self.lG.mean())
        if tA <= 0 or tG <= 0:
            return 1.0
        return math.sqrt(tA / tG)


def pi_damped_scale(eig: _Eigen, damping: float) -> Tensor:
    r"""``(l_G + \sqrt{\lambda}/\pi)(l_A + \pi\sqrt{\lambda})^\top``: the per-factor damped spectrum."""
    pi = eig.pi()
    r = math.sqrt(damping)
    return (eig.lG + r / pi).unsqueeze(1) * (eig.lA + r * pi).unsqueeze(0)


# ============================================================================ operators
class _BlockDiagonal(LinearOperator):
    """Shared product plumbing: split a vector into layers and fallback parameters."""

    psd = True

    def _setup(
        self, params: Sequence[Tensor], layers: Sequence[_Layer], fallback: Sequence[Tensor]
    ):
        index = {id(p): i for i, p in enumerate(params)}
        offsets, off = [], 0
        for p in params:
            offsets.append(off)
            off += p.numel()
        self._params = list(params)
        self._offsets = offsets
        self._layer_idx = [
            (index[id(layer.weight)], index[id(layer.bias)] if layer.has_bias else None)
            for layer in layers
        ]
        self._fallback_idx = [index[id(p)] for p in fallback]

    def _slice(self, V: Tensor, i: int) -> Tensor:
        p = self._params[i]
        return V[self._offsets[i] : self._offsets[i] + p.numel()].T.reshape(V.shape[1], *p.shape)

    def _put(self, out: Tensor, i: int, t: Tensor) -> None:
        p = self._params[i]
        out[self._offsets[i] : self._offsets[i] + p.numel()] = t.reshape(t.shape[0], -1).T

    def _block_product(self, j: int, M: Tensor) -> Tensor:
        raise NotImplementedError

    def _fallback_product(self, i: int, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for j, (iw, ib) in enumerate(self._layer_idx):
            layer = self._layers[j]
            M = layer.to_mat(self._slice(V, iw), None if ib is None else self._slice(V, ib))
            vw, vb = layer.from_mat(self._block_product(j, M))
            self._put(out, iw, vw)
            if ib is not None:
                self._put(out, ib, vb)
        for k, i in enumerate(self._fallback_idx):
            self._put(out, i, self._fallback_product(k, self._slice(V, i)))
        return out

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)


class KFACOperator(CurvatureOperator, _BlockDiagonal):
    r"""The KFAC approximation :math:`\mathrm{blockdiag}(A_l \otimes G_l) + \lambda I` of the GGN/Fisher.

    Built once from the data (two passes for :class:`EKFACOperator`); call
    :meth:`refresh` after the parameters change. Conventions (factor scaling,
    Fisher types, layers, fallback) are in the module docstring
    :mod:`second.approximations.kfac`: in short, for a deep linear network and one
    datum, ``KFACOperator(...).to_dense()`` equals :func:`second.exact_ggn` on every
    layer's diagonal block.

    Args:
        model: the network; its supported layers are found with ``named_modules``.
        loss_fn: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` (any loss for
            ``fisher="empirical"``), reduction ``"mean"`` or ``"sum"``.
        data: one ``(X, y)`` batch or an iterable of batches (as for
            :class:`~second.GGNOperator`).
        fisher: ``"type2"`` (default, exact output-curvature square root), ``"mc"``
            (sampled targets) or ``"empirical"`` (observed targets).
        damping: :math:`\lambda \ge 0` added as ``lambda * I`` (default 0).
        mc_samples: targets per example for ``fisher="mc"`` (default 1).
        fallback: ``"diagonal"`` (default) or ``"identity"`` for parameters outside
            supported layers.
        generator: its state at construction seeds the MC targets and the Rademacher
            signs of the diagonal fallback (default: seed 0). The operator draws from a
            private copy, so ``generator`` itself is never advanced or reset.
        reduction, check_deterministic, distributed, progressbar: as for
            :class:`~second.CurvatureOperator`. Under ``torch.distributed`` the factor
            sums and counts are all-reduced, so every rank holds the factors of all
            the data.

    Raises:
        ValueError: an unknown ``fisher``/``fallback``, negative damping, ``mc_samples < 1``.
        NotImplementedError: ``fisher="type2"``/``"mc"`` with an unsupported loss.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> X, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
        >>> model = model.double()
        >>> K = KFACOperator(model, torch.nn.MSELoss(), (X, y))
        >>> loss = torch.nn.MSELoss()(out := model(X), y)
        >>> from second import exact_ggn
        >>> G = exact_ggn(loss, out, list(model.parameters()))
        >>> torch.allclose(K.to_dense()[:16, :16], G[:16, :16])   # first layer, exact here
        True
    """

    psd = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data,
        *,
        fisher: str = "type2",
        damping: float = 0.0,
        mc_samples: int = 1,
        fallback: str = "diagonal",
        generator: torch.Generator | None = None,
        reduction: str | None = None,
        check_deterministic: bool = True,
        distributed: bool | None = None,
        progressbar: bool = False,
    ):
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be finite and >= 0, got {damping}")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        _check_loss(loss_fn, fisher)
        super().__init__(
            _unwrap(model),
            loss_fn,
            data,
            None,
            reduction=reduction,
            check_deterministic=check_deterministic,
            distributed=distributed,
            progressbar=progressbar,
        )
        self.fisher, self.damping, self.mc_samples = fisher, float(damping), int(mc_samples)
        self.fallback = fallback
        self.generator = sample_generator(generator, self.device)  # private: see its docs
        self._generator_state = self.generator.get_state()
        self._layers = find_layers(self.model, self.params)
        owned = {id(p) for layer in self._layers for p in layer.params()}
        self._fallback = [p for p in self.params if id(p) not in owned]
        self._setup(self.params, self._layers, self._fallback)
        self.refresh()

    # -- construction ----------------------------------------------------------------------
    def _passes(self):
        """Yield ``(f, S, capture)`` for every batch, the graph kept while the caller works."""
        self.generator.set_state(self._generator_state)
        for X, y in self._batches():
            with _Capture(self._layers) as cap:
                out, _ = self._forward(X, y)
            S = curvature_columns(
                self.loss_fn, out, y, self.reduction, self.fisher, self.mc_samples, self.generator
            )
            yield out, S, cap
            del out, S, cap

    def _compute_factors(self) -> _Stats:
        stats = _Stats(self._layers, self._fallback if self.fallback == "diagonal" else [])
        for out, S, cap in self._passes():
            batch_statistics(
                self._layers,
                stats.fallback_params,
                out,
                S,
                cap,
                stats,
                generator=self.generator,
                retain_graph=False,
            )
        stats.tensors()
        if _dist_active(self.distributed):
            stats.all_reduce()
        self._num_data = int(stats.n)
        w = 1.0 / stats.n if self.reduction == "mean" else 1.0
        self.A = [A / max(nA, 1.0) for A, nA in zip(stats.A, stats.nA)]
        self.G = [G * w for G in stats.G]
        self.diag = (
            [d * w for d in stats.diag]
            if stats.diag
            else [torch.zeros_like(p) for p in self._fallback]
        )
        for t in [*self.A, *self.G, *self.diag]:
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError("a KFAC factor has NaN or Inf entries")
        return stats

    def refresh(self) -> None:
        """Recompute the factors (after the parameters changed)."""
        self._state = None
        self._eig: list[_Eigen] | None = None
        self._compute_factors()

    @property
    def layers(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(module name, A, G)`` for every Kronecker-factored layer (embedding ``A``: its diagonal)."""
        return [(layer.name, A, G) for layer, A, G in zip(self._layers, self.A, self.G)]

    @property
    def fallback_parameters(self) -> list[Tensor]:
        """Parameters outside supported layers (diagonal or identity blocks)."""
        return list(self._fallback)

    def eigen(self) -> list[_Eigen]:
        """The factors' eigendecompositions (cached until :meth:`refresh`)."""
        if self._eig is None:
            self._eig = [
                _Eigen(A, G, layer.diag_A) for layer, A, G in zip(self._layers, self.A, self.G)
            ]
        return self._eig

    # -- products --------------------------------------------------------------------------
    def _block_product(self, j: int, M: Tensor) -> Tensor:
        A, G = self.A[j], self.G[j]
        GM = G @ M
        out = GM * A if self._layers[j].diag_A else GM @ A
        return out + self.damping * M if self.damping else out

    def _fallback_product(self, i: int, v: Tensor) -> Tensor:
        return (self.diag[i] + self.damping) * v

    _matmat = _BlockDiagonal._matmat
    _matvec = _BlockDiagonal._matvec

    def inverse(self, damping: float | None = None, *, pi_damping: bool = False) -> LinearOperator:
        r"""The inverse of the damped approximation, by eigendecomposition of the factors.

        .. math::

            \text{exact:}\ (A\otimes G + \lambda I)^{-1}
              = (Q_A\otimes Q_G)\,\mathrm{diag}(l_A \otimes l_G + \lambda)^{-1} (Q_A\otimes Q_G)^\top,
            \qquad
            \text{pi:}\ \big((A + \pi\sqrt\lambda I)\otimes(G + \tfrac{\sqrt\lambda}{\pi} I)\big)^{-1},

        with :math:`\pi = \sqrt{(\mathrm{tr}A/d_A)/(\mathrm{tr}G/d_G)}` (Martens & Grosse,
        section 6.3). Fallback blocks use :math:`(d + \lambda)^{-1}`. Eigenvalues are
        clamped at 0, so singular factors (constant inputs) are fine when
        :math:`\lambda > 0`.

        Args:
            damping: :math:`\lambda`; default the operator's own ``damping``.
            pi_damping: factored (per-factor) damping instead of the exact one.

        Returns:
            A positive-definite :class:`KFACInverseOperator`, usable as ``M=`` in
            :func:`second.solve`.

        Raises:
            ValueError: negative damping, or a singular block with zero damping.
        """
        lam = self.damping if damping is None else float(damping)
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"damping must be finite and >= 0, got {lam}")
        scales = []
        for eig in self.eigen():
            if pi_damping:
                scales.append(pi_damped_scale(eig, lam))
            else:
                scales.append(eig.lG.unsqueeze(1) * eig.lA.unsqueeze(0) + lam)
        diag = [d + lam for d in self.diag]
        return KFACInverseOperator(self, self.eigen(), scales, diag)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel``."""
    return (
        model.module
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
        else model
    )


class _EigenInverse(_BlockDiagonal):
    def __init__(
        self, base: KFACOperator, eig: list[_Eigen], scales: list[Tensor], diag: list[Tensor]
    ):
        LinearOperator.__init__(self, base.shape[0], base.dtype, base.device)
        self._layers = base._layers
        self._setup(base.params, base._layers, base._fallback)
        for s in [*scales, *diag]:
            if bool((s <= 0).any()):
                raise ValueError(
                    "the approximation is singular (a factor has a zero eigenvalue, e.g. from a "
                    "constant input feature): pass damping > 0 to invert it"
                )
        self.eig, self.scales, self.diag = eig, scales, diag

    def _block_product(self, j: int, M: Tensor) -> Tensor:
        e = self.eig[j]
        return e.unrotate(e.rotate(M) / self.scales[j])

    def _fallback_product(self, i: int, v: Tensor) -> Tensor:
        return v / self.diag[i]


class KFACInverseOperator(_EigenInverse):
    """Inverse of a damped KFAC approximation (see :meth:`KFACOperator.inverse`)."""


class EKFACInverseOperator(_EigenInverse):
    """Inverse of a damped EK-FAC approximation (see :meth:`EKFACOperator.inverse`)."""


class EKFACOperator(KFACOperator):
    r"""Eigenvalue-corrected KFAC: KFAC's eigenbasis with re-fitted eigenvalues.

    .. math::

        B \approx (Q_A \otimes Q_G)\,\mathrm{diag}(s)\,(Q_A \otimes Q_G)^\top + \lambda I,\qquad
        s = w \sum_{i,k} \big(\mathrm{vec}(Q_G^\top \nabla_{W} (s_{ik}^\top f_i)\, Q_A)\big)^2,

    the second moments of the per-example gradients in the Kronecker eigenbasis
    (George et al. 2018). With the same Fisher type, :math:`s` is the diagonal of the
    exact block in that basis, so EK-FAC is the Frobenius-closest matrix with KFAC's
    eigenvectors and at least as accurate as KFAC. Costs a second pass over the data.
    Arguments as :class:`KFACOperator`.

    Example:
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> E = EKFACOperator(model, torch.nn.MSELoss(), (X, y))
        >>> E.to_dense().shape
        torch.Size([8, 8])
    """

    def refresh(self) -> None:
        """Recompute factors, eigenbases and the corrected eigenvalues (two data passes)."""
        super().refresh()
        eig = self.eigen()
        sums = [
            torch.zeros(layer.d_G, layer.d_A, dtype=self.dtype, device=self.device)
            for layer in self._layers
        ]
        for out, S, cap in self._passes():
            js = [j for j in range(len(self._layers)) if j in cap.outputs]
            outs = [o for j in js for o in cap.outputs[j]]
            gouts = backprop_columns(out, S, outs, retain_graph=False)
            pos = 0
            for j in js:
                layer = self._layers[j]
                per = None
                for inp in cap.inputs[j]:  # a module used twice: its gradients add up
                    grows = layer.grad_rows(gouts[pos])
                    pos += 1
                    mask = layer.mask(inp)
                    if mask is not None:
                        grows = grows * mask.reshape(1, *mask.shape, 1).to(grows.dtype)
                    m = layer.per_example_mats(layer.input_rows(inp), grows)
                    per = m if per is None else per + m
                sums[j] += (eig[j].rotate(per.reshape(-1, layer.d_G, layer.d_A)) ** 2).sum(0)
        if _dist_active(self.distributed):
            buf = torch.cat([s.reshape(-1) for s in sums])
            dist.all_reduce(buf)
            off = 0
            for s in sums:
                s.copy_(buf[off : off + s.numel()].view_as(s))
                off += s.numel()
        w = 1.0 / self.num_data if self.reduction == "mean" else 1.0
        self.scales = [s * w for s in sums]

    def _block_product(self, j: int, M: Tensor) -> Tensor:
        e = self._eig[j]
        out = e.unrotate(e.rotate(M) * self.scales[j])
        return out + self.damping * M if self.damping else out

    def inverse(self, damping: float | None = None, *, pi_damping: bool = False) -> LinearOperator:
        r"""``(B + \lambda I)^{-1} = (Q_A\otimes Q_G)\,\mathrm{diag}(s + \lambda)^{-1}(Q_A\otimes Q_G)^\top``.

        Args:
            damping: :math:`\lambda` (default: the operator's own).
            pi_damping: not defined for EK-FAC; ``True`` raises.

        Returns:
            An :class:`EKFACInverseOperator`.

        Raises:
            ValueError: ``pi_damping=True``, negative damping, or singular with zero damping.
        """
        if pi_damping:
            raise ValueError(
                "EK-FAC has no per-factor damping: use the exact damping (pi_damping=False)"
            )
        lam = self.damping if damping is None else float(damping)
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"damping must be finite and >= 0, got {lam}")
        return EKFACInverseOperator(
            self, self.eigen(), [s + lam for s in self.scales], [d + lam for d in self.diag]
        )
