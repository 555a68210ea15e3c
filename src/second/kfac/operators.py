r"""KFAC as a linear operator over the parameters, and the layout of its blocks.

:class:`KFACOperator` gathers the factor statistics over the data (one pass) and acts as
:math:`\mathrm{blockdiag}(A_l \otimes G_l) + \lambda I` in the order of
``model.parameters()``, mapped to its blocks by :class:`BlockLayout`; its
``inverse(damping, pi_damping=...)`` returns an operator whose product solves the damped
system block by block (:mod:`second.kfac.inverse`). :class:`~second.kfac.EKFACOperator`
(:mod:`second.kfac.ekfac`) re-fits the eigenvalues in the Kronecker eigenbasis (a second
pass). Conventions (scaling, Fisher types, layers, fallback) are in :mod:`second.kfac`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import distributed as dist
from .._errors import NonFiniteError
from .._losses import needs_targets, target_weights
from ..data import Task, sample_generator
from ..operators.base import LinearOperator
from ..operators.curvature import CurvatureOperator
from .blocks import DiagonalBlock, EigenBlock, KroneckerBlock
from .capture import Capture
from .columns import FISHER_TYPES, check_loss, curvature_columns
from .damping import check_damping
from .inverse import KFACInverseOperator, _inverse_damping
from .rules import (
    LayerRule,
    WeightSharing,
    approximations,
    find_rules,
    unwrap_model,
)
from .stats import FactorStats, batch_statistics

__all__ = ["FALLBACKS", "BlockLayout", "KFACOperator"]

FALLBACKS = ("diagonal", "identity")
"""Blocks for parameters outside supported layers: a diagonal estimate, or damping only."""


class BlockLayout:
    """Maps between a flat vector in parameter order and the blocks' matrix forms.

    Args:
        params: the parameters, in the order of the flat vector.
        layers: the layer rules (each layer's weight and bias are among ``params``).
        fallback: the remaining parameters, each with a diagonal block.

    Example:
        >>> from second.kfac import find_layers
        >>> net = torch.nn.Linear(2, 1)
        >>> layout = BlockLayout(list(net.parameters()), find_layers(net), [])
        >>> V = torch.arange(3.0).reshape(3, 1)   # (w1, w2, b) as one column
        >>> layout.apply(V, lambda j, M: 2 * M, lambda i, v: v).T
        tensor([[0., 2., 4.]])
    """

    def __init__(
        self, params: Sequence[Tensor], layers: Sequence[LayerRule], fallback: Sequence[Tensor]
    ):
        index = {id(p): i for i, p in enumerate(params)}
        offsets, off = [], 0
        for p in params:
            offsets.append(off)
            off += p.numel()
        self.params, self.offsets, self.layers = list(params), offsets, list(layers)
        self.layer_index = [
            (index[id(layer.weight)], index[id(layer.bias)] if layer.has_bias else None)
            for layer in layers
        ]
        self.fallback_index = [index[id(p)] for p in fallback]
        # every block's (offset, shape) of its weight and bias rows in the flat vector
        self.layer_parts = []
        for layer, (iw, ib) in zip(layers, self.layer_index):
            w = (offsets[iw] + layer.w_offset, tuple(layer.w_shape))
            b = None
            if ib is not None:
                b = (offsets[ib] + layer.b_offset, (layer.d_G,))
            self.layer_parts.append((w, b))

    def _slice(self, V: Tensor, i: int) -> Tensor:
        return self._part(V, (self.offsets[i], tuple(self.params[i].shape)))

    def _put(self, out: Tensor, i: int, t: Tensor) -> None:
        self._put_part(out, (self.offsets[i], tuple(self.params[i].shape)), t)

    @staticmethod
    def _part(V: Tensor, part: tuple[int, tuple]) -> Tensor:
        off, shape = part
        numel = math.prod(shape)
        return V[off : off + numel].T.reshape(V.shape[1], *shape)

    @staticmethod
    def _put_part(out: Tensor, part: tuple[int, tuple], t: Tensor) -> None:
        off = part[0]
        out[off : off + t[0].numel()] = t.reshape(t.shape[0], -1).T

    def apply(
        self,
        V: Tensor,
        layer_fn: Callable[[int, Tensor], Tensor],
        fallback_fn: Callable[[int, Tensor], Tensor],
    ) -> Tensor:
        """``V [n, k]`` mapped block by block: ``layer_fn(j, M [k, d_G, d_A])``, ``fallback_fn(i, v)``."""
        out = torch.zeros_like(V)
        for j, (w, b) in enumerate(self.layer_parts):
            layer = self.layers[j]
            M = layer.to_mat(self._part(V, w), None if b is None else self._part(V, b))
            vw, vb = layer.from_mat(layer_fn(j, M))
            self._put_part(out, w, vw)
            if b is not None and vb is not None:
                self._put_part(out, b, vb)
        for k, i in enumerate(self.fallback_index):
            self._put(out, i, fallback_fn(k, self._slice(V, i)))
        return out


class KFACOperator(CurvatureOperator):
    r"""The KFAC approximation :math:`\mathrm{blockdiag}(A_l \otimes G_l) + \lambda I` of the GGN/Fisher.

    Built once from the data (two passes for :class:`EKFACOperator`); call
    :meth:`refresh` after the parameters change. Conventions (factor scaling, Fisher
    types, layers, fallback) are in :mod:`second.kfac`: in short, for a deep linear
    network and one datum, ``KFACOperator(...).to_dense()`` equals
    :func:`second.exact_ggn` on every layer's diagonal block.

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
            the Kronecker-factored layers (``"identity"`` also for the normalization
            layers, which otherwise get their exact diagonal).
        weight_sharing: ``"expand"`` (default) or ``"reduce"`` for layers applied at
            several positions of an example (sequences, convolutions, attention), or
            ``{module name pattern or type: mode}`` per layer (see :mod:`second.kfac.rules`).
        generator: its state at construction seeds the MC targets and the Rademacher
            signs of the diagonal fallback (default: seed 0). The operator draws from a
            private copy, so ``generator`` itself is never advanced or reset. With
            ``fisher="mc"`` under ``torch.distributed`` the seed is offset by the rank (rank
            0 draws the samples of one process), so the ranks' samples are independent.
        task: how to run the model on a batch (:class:`second.Task`; default: ``(X, y)``
            pairs and dicts of tensors with the targets under ``"labels"``).
        reduction: ``"mean"`` or ``"sum"``; default ``loss_fn.reduction``.
        check_deterministic: check that the data is the same on every pass and the model
            not stochastic (as for :class:`~second.CurvatureOperator`).
        distributed: all-reduce the factor sums and counts over the process group (default:
            when one is initialized), so every rank holds the factors of all the data.
        progressbar: show a progress bar over the batches.

    Attributes:
        rules: the :class:`~second.kfac.LayerRule` of every Kronecker-factored block.
        diagonal_rules: the :class:`~second.kfac.DiagonalRule` of the normalization layers
            (their parameters are among the fallback ones, with an exact diagonal).
        blocks: their :class:`KroneckerBlock`.
        diagonals: the fallback parameters' :class:`DiagonalBlock`.
        layout: the :class:`BlockLayout` between parameter order and the blocks.
        A: per layer, the input factor (an embedding's: its diagonal).
        G: per layer, the gradient factor.
        diag: per fallback parameter, the estimated curvature diagonal.

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
        task: Task | None = None,
        reduction: str | None = None,
        check_deterministic: bool = True,
        distributed: bool | None = None,
        progressbar: bool = False,
        weight_sharing: WeightSharing = "expand",
    ):
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        damping = check_damping(damping)
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        check_loss(loss_fn, fisher, targets_known=True)
        super().__init__(
            unwrap_model(model),
            loss_fn,
            data,
            None,
            task=task,
            reduction=reduction,
            check_deterministic=check_deterministic,
            distributed=distributed,
            progressbar=progressbar,
        )
        self.fisher, self.damping, self.mc_samples = fisher, damping, int(mc_samples)
        self.fallback = fallback
        per_rank = fisher == "mc" and distributed is not False  # independent samples per rank
        self.generator = sample_generator(generator, self.device, per_rank=per_rank)
        self._generator_state = self.generator.get_state()
        self.weight_sharing = weight_sharing
        self.rules, self.diagonal_rules = find_rules(
            self.model, self.params, weight_sharing=weight_sharing
        )
        if fallback == "identity":
            self.diagonal_rules = []
        owned = {id(p) for layer in self.rules for p in layer.params()}
        self._fallback = [p for p in self.params if id(p) not in owned]
        self.layout = BlockLayout(self.params, self.rules, self._fallback)
        self.refresh()

    # -- construction ----------------------------------------------------------------------
    def _passes(self, with_keep: bool = False):
        """Yield ``(f, S, capture)`` for every batch, the graph kept while the caller works.

        ``with_keep``: ``(f, S, capture, keep)``, ``keep`` marking the loss terms that are
        not ignored (``[n, *positions]``; ``None``: all); the ignored examples' or positions'
        inputs stay out of the input factors (their columns are zero already), as the
        optimizer leaves them out.
        """
        self.generator.set_state(self._generator_state)
        self._weight_total = self._examples_total = 0.0
        for batch in self._batches():
            # torch's mean divides a batch by W_b (its valid targets' weights): the batch's
            # share of the mean over all the data is W_b / W, not n_b / N (refresh divides)
            n_b = self.task.batch_size(batch)
            w_b = self._batch_weight(batch, n_b)
            self._weight_total += w_b
            self._examples_total += n_b
            if self._skipped(w_b):
                continue  # every target ignored: no datum (and a NaN batch loss)
            with Capture(self.rules, self.diagonal_rules) as cap:
                out, _ = self._forward(batch)
            # the targets: the empirical Fisher's, and any loss whose curvature they weigh
            wanted = self.fisher == "empirical" or needs_targets(self.loss_fn)
            y = self.task.targets(batch) if wanted else None
            S = curvature_columns(
                self.loss_fn, out, y, self.reduction, self.fisher, self.mc_samples, self.generator
            )
            if self.reduction == "mean" and w_b != n_b:  # statistics are quadratic in S
                # the empirical Fisher is quadratic in the losses too: its batch counts
                # (W_b / n_b)^2, as FisherOperator's does
                S = S * (w_b / n_b if self.fisher == "empirical" else math.sqrt(w_b / n_b))
            if with_keep:
                c = target_weights(self.loss_fn, out, y, self.reduction)
                keep = None if c is None else c > 0
                yield out, S, cap, keep
            else:
                yield out, S, cap
            del out, S, cap

    def _compute_factors(self) -> None:
        stats = FactorStats(self.rules, self._fallback if self.fallback == "diagonal" else [])
        for out, S, cap, keep in self._passes(with_keep=True):
            batch_statistics(
                self.rules,
                stats.fallback_params,
                out,
                S,
                cap,
                stats,
                generator=self.generator,
                retain_graph=False,
                keep=keep,
            )
        stats.tensors()
        total, examples = self._weight_total, self._examples_total
        if dist.active(self.distributed):
            stats.all_reduce()
            buf = torch.tensor([total, examples], dtype=torch.float64, device=self.device)
            dist.all_reduce_sum(buf)
            total, examples = float(buf[0]), float(buf[1])
        if stats.n == 0:  # no datum on any rank: empty data, or every target ignored
            _ = self.num_data  # raises on every rank if the data holds no example
        self._check_total(total)
        self._num_data = int(examples)  # every example, those of all-ignored batches too
        # sum_b (W_b / n_b) (n_b-sums of batch b) / W: each batch by its share W_b / W; the
        # empirical Fisher, quadratic in the losses, by (W_b / n_b)^2 N / W^2 (FisherOperator's)
        self._mean_scale = examples / total if self.reduction == "mean" else 1.0
        if self.fisher == "empirical":
            self._mean_scale = self._mean_scale**2
        w = self._mean_scale / examples if self.reduction == "mean" else 1.0
        A_sums, G_sums, diags = stats.sums()
        self.A: list[Tensor] = [A / max(nA, 1.0) for A, nA in zip(A_sums, stats.nA)]
        self.G: list[Tensor] = [G * w for G in G_sums]
        self.diag: list[Tensor] = (
            [d * w for d in diags] if diags else [torch.zeros_like(p) for p in self._fallback]
        )
        for t in [*self.A, *self.G, *self.diag]:
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError("a KFAC factor has NaN or Inf entries")
        self.blocks = [KroneckerBlock(A, G) for A, G in zip(self.A, self.G)]
        self.diagonals = [DiagonalBlock(d) for d in self.diag]

    def refresh(self) -> None:
        """Recompute the factors (after the parameters changed)."""
        self._states = None
        self._eigen: list[EigenBlock] | None = None
        self._compute_factors()

    def restrict(self, batch) -> KFACOperator:
        """The same approximation on ``batch`` (see :meth:`~second.CurvatureOperator.restrict`).

        ``fisher``, ``damping``, ``mc_samples``, ``fallback``, ``weight_sharing``, the task,
        ``reduction`` and the sampling state are kept; local to this process, not re-checked.

        Example:
            >>> model = torch.nn.Linear(3, 2).double()
            >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
            >>> K = KFACOperator(model, torch.nn.MSELoss(), [(X[:3], y[:3]), (X[3:], y[3:])])
            >>> K1 = KFACOperator(model, torch.nn.MSELoss(), (X[:3], y[:3]))
            >>> torch.equal(K.restrict((X[:3], y[:3])).to_dense(), K1.to_dense())
            True
        """
        generator = torch.Generator(device=self.device)
        generator.set_state(self._generator_state)
        return type(self)(
            self.model,
            self.loss_fn,
            batch,
            fisher=self.fisher,
            damping=self.damping,
            mc_samples=self.mc_samples,
            fallback=self.fallback,
            generator=generator,
            task=self.task,
            reduction=self.reduction,
            check_deterministic=False,
            distributed=False,
            weight_sharing=self.weight_sharing,
        )

    @property
    def layers(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(module name, A, G)`` for every Kronecker-factored layer (embedding ``A``: its diagonal)."""
        return [(layer.name, A, G) for layer, A, G in zip(self.rules, self.A, self.G)]

    def approximations(self) -> dict[str, str]:
        """``{parameter name: approximation}``: how each parameter's block is approximated.

        ``"kronecker"``, ``"kronecker-expand"``/``"kronecker-reduce"`` (a layer shared over
        positions, e.g. a sequence or a convolution's pixels), ``"diagonal-exact"``
        (normalization layers), ``"diagonal"`` (an estimate of the curvature diagonal) or
        ``"identity"`` (damping only); see :func:`second.kfac.approximations`.

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(4, 1))
            >>> X, y = torch.randn(4, 1, 4), torch.randn(4, 1)
            >>> KFACOperator(net, torch.nn.MSELoss(), (X, y)).approximations()["0.weight"]
            'kronecker-expand'
        """
        return approximations(
            self.model, self.rules, self.diagonal_rules, self.params, self.fallback
        )

    @property
    def fallback_parameters(self) -> list[Tensor]:
        """Parameters outside supported layers (diagonal or identity blocks)."""
        return list(self._fallback)

    def eigen(self) -> list[EigenBlock]:
        """The blocks in their factors' eigenbasis (cached until :meth:`refresh`)."""
        if self._eigen is None:
            self._eigen = [block.eigen() for block in self.blocks]
        return self._eigen

    # -- products --------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        lam = self.damping
        return self.layout.apply(
            V,
            lambda j, M: self.blocks[j].matmul(M, lam),
            lambda i, v: self.diagonals[i].matmul(v, lam),
        )

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def inverse(  # type: ignore[override]  # KFAC's inverse is by factors, not by a method
        self, damping: float | None = None, *, pi_damping: bool = False
    ) -> LinearOperator:
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
            damping: :math:`\lambda`; default the operator's own ``damping``. A given
                ``damping`` *replaces* the operator's own (the inverse of
                :math:`B_{\text{undamped}} + \lambda I`), unlike ``A.inverse(method,
                damping=...)`` and ``solve(A, b, damping=...)``, which add to it (docs/
                glossary.md, *damping*). This is deprecated on an operator with a nonzero
                damping of its own (``SecondDeprecationWarning``; from 0.3 it adds): build
                the operator with ``damping=0`` and pass ``damping=`` here, or call
                ``inverse()`` for the operator's own, which mean the same in both.
            pi_damping: factored (per-factor) damping instead of the exact one.

        Returns:
            A positive-definite :class:`KFACInverseOperator`, usable as ``M=`` in
            :func:`second.solve`.

        Raises:
            ValueError: negative damping, or a singular block with zero damping.
        """
        lam = check_damping(_inverse_damping(self, damping))
        return KFACInverseOperator(self, lam, "pi" if pi_damping else "exact")
