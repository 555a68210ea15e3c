r"""The Fisher operator: empirical, Monte-Carlo or type-2 (``FisherOperator(fisher=...)``)."""

from __future__ import annotations

import torch

from .._deprecation import renamed_keyword, renamed_property
from .._losses import (
    nll_scale,
    per_sample_losses,
    sample_targets,
    target_weights,
    weigh_columns,
)
from ..data import sample_generator
from ..func.graphs import GGNGraph, JacobianGraph
from .curvature import CurvatureOperator, GGNOperator  # noqa: F401  (GGNOperator: the example)

__all__ = ["FisherOperator", "FISHERS"]

FISHERS = ("empirical", "mc", "type2")


class _FisherState:
    def __init__(self, op: FisherOperator, batch):
        task = op.task
        out, _ = op._forward(batch)  # the loss is checked to be a scalar
        loss_fn = task.loss_fn
        if loss_fn is None:  # _forward has refused a task without one
            raise ValueError("a Fisher operator needs a loss_fn")
        n = out.shape[0]
        w = 1.0 / n if op.reduction == "mean" else 1.0
        self.w = w
        self.out_dim = out.dim()
        if op.fisher == "empirical":
            losses = per_sample_losses(loss_fn, out, task.targets(batch), op.reduction)
            self.graph = JacobianGraph(losses, op.params)
            self.scores = self.outer = None
        else:
            a = nll_scale(loss_fn, out, op.reduction)
            # all K samples of all n examples in one batch of K * n (one backward, no loop)
            K = op.mc_samples
            f = out.detach().unsqueeze(0).expand(K, *out.shape).reshape(K * n, *out.shape[1:])
            f = f.clone().requires_grad_(True)
            yt = sample_targets(loss_fn, f, op._sampler)
            ls = per_sample_losses(loss_fn, f, yt, op.reduction, sampled=True)
            (s,) = torch.autograd.grad(ls.sum(), f)
            s = s.reshape(K, *out.shape)  # [K, n, ...]
            # the likelihood's scores, weighted as the loss weighs its targets (ignored, classes)
            c = target_weights(loss_fn, out, task.targets(batch), op.reduction)
            self.scores = weigh_columns(s, c)
            self.w = w / (a * op.mc_samples)
            # with few outputs per example, sum the K outer products once: [n, m, m]
            m = out[0].numel()
            Sf = self.scores.reshape(K, n, m)
            self.outer = torch.einsum("kni,knj->nij", Sf, Sf) if m <= K else None
            self.graph = JacobianGraph(out, op.params)


class FisherOperator(CurvatureOperator):
    r"""The Fisher matrix: empirical, Monte-Carlo or type-2 (the exact GGN).

    * ``fisher="empirical"``: :math:`w \sum_i \nabla\ell_i \nabla\ell_i^\top` with the observed
      targets (per-example losses as in :mod:`second._losses`, whose mean is the dataset
      loss: with class weights or ignored targets under a mean, each batch's are rescaled
      from its own mean to the dataset's, so the batching does not change the matrix).
    * ``fisher="mc"``: :math:`\frac{w}{a K} \sum_i \sum_k J_i^\top s_{ik} s_{ik}^\top J_i`
      with :math:`s_{ik} = \nabla_f \ell(f_i, \tilde y_{ik})`, targets :math:`\tilde y_{ik}`
      sampled from the model's predictive distribution (``mc_samples`` of them). Every
      product draws the same samples, so the operator is one fixed matrix. Its expectation
      is the GGN. Supported for MSE, cross-entropy and BCE-with-logits.
    * ``fisher="type2"``: :math:`\sum_b w_b J_b^\top (\nabla^2_f L_b) J_b`, the GGN (equal to
      the true Fisher for exponential-family losses), as :class:`GGNOperator`.

    Args:
        fisher: ``"empirical"`` (default), ``"mc"`` or ``"type2"`` (``docs/glossary.md``).
        mc_samples: samples per example for ``"mc"``.
        generator: a ``torch.Generator`` whose state at construction seeds the samples
            (default: seed 0). The operator draws from a private copy of that state
            (:func:`second.data.sample_generator`), so ``generator`` itself is never
            advanced or reset. For ``"mc"`` under ``torch.distributed`` the seed is offset
            by the rank (rank 0 draws the samples of one process), so the ranks' samples
            are independent.
        kind: the deprecated spelling of ``fisher`` (``SecondDeprecationWarning``; removal in
            0.3).
        other arguments: see :class:`CurvatureOperator`.

    Raises:
        ValueError: an unknown ``fisher``, ``mc_samples < 1``, or both ``fisher`` and ``kind``.

    Example:
        >>> model = torch.nn.Linear(3, 4).double()
        >>> X, y = torch.randn(50, 3, dtype=torch.float64), torch.randint(0, 4, (50,))
        >>> F = FisherOperator(model, torch.nn.CrossEntropyLoss(), (X, y), fisher="mc",
        ...                    mc_samples=1000)
        >>> G = GGNOperator(model, torch.nn.CrossEntropyLoss(), (X, y)).to_dense()
        >>> float((F.to_dense() - G).norm() / G.norm()) < 0.1   # E[MC Fisher] = GGN
        True
    """

    psd = True

    def __init__(
        self,
        model,
        loss_fn,
        data,
        params=None,
        *,
        fisher: str | None = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        kind: str | None = None,
        **kwargs,
    ):
        if kind is not None:  # a keyword of its own: the other kwargs go to the base class
            fisher = renamed_keyword("FisherOperator", {"kind": kind}, "kind", "fisher", fisher)
        fisher = "empirical" if fisher is None else fisher
        if fisher not in FISHERS:
            raise ValueError(f"fisher (kind) must be one of {FISHERS}, got {fisher!r}")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.fisher = fisher
        self.mc_samples = int(mc_samples)
        self.generator = generator
        per_rank = fisher == "mc" and self.distributed is not False
        self._sampler = sample_generator(generator, self.device, per_rank=per_rank)
        self._sampler_state = self._sampler.get_state()

    def _restrict_options(self) -> dict:
        # the samples start where this operator's started, whatever the caller's generator
        # did since; fisher= replaces a deprecated kind= so the restriction does not warn
        start = torch.Generator(device=self.device)
        start.set_state(self._sampler_state)
        return {"generator": start, "fisher": self.fisher, "kind": None}

    kind = renamed_property("kind", "fisher")

    def _batch_state(self, batch):
        if self.fisher == "type2":
            out, loss = self._forward(batch)
            return GGNGraph(loss, out, self.params)
        return _FisherState(self, batch)

    # The empirical Fisher is quadratic in the per-example losses. With a loss whose mean
    # divides by the targets' weights (ignore_index, class weights: W_b, see curvature.py),
    # a batch's per-example losses are scaled by n_b / W_b, the dataset's by N / W: the batch's
    # product is summed with weight W_b^2 / n_b and the sum divided by W^2 / N (n_b and N
    # for other losses, as for the other operators).
    def _scale(self, n_b: float, w_b: float) -> float:
        if self.fisher == "empirical" and self.reduction == "mean":
            return w_b * w_b / n_b
        return super()._scale(n_b, w_b)

    def _divisor(self, count: float, total: float) -> float:
        if self.fisher == "empirical" and self.reduction == "mean":
            return total * total / count
        return super()._divisor(count, total)

    def _apply(self, V, batched):
        # the same samples on every pass over the data: the operator is one fixed matrix
        self._sampler.set_state(self._sampler_state)
        return super()._apply(V, batched)

    def _batch_product(self, state, vs, batched):
        if isinstance(state, GGNGraph):
            return state.gvp(vs, batched)
        jv = state.graph.jvp(vs, batched)
        if state.scores is None:
            t = jv * state.w
        elif state.outer is not None:
            n, m = state.outer.shape[:2]
            jf = jv.reshape(*jv.shape[: jv.dim() - state.out_dim], n, m)
            t = torch.einsum("nij,...nj->...ni", state.outer, jf).reshape(jv.shape) * state.w
        else:
            S = state.scores  # [K, n, ...]
            n = S.shape[1]
            Sf = S.reshape(S.shape[0], n, -1)
            if batched:
                jf = jv.reshape(jv.shape[0], 1, n, -1)
                coef = (Sf.unsqueeze(0) * jf).sum(-1, keepdim=True)  # [k, K, n, 1]
                t = (coef * Sf.unsqueeze(0)).sum(1).reshape(jv.shape) * state.w
            else:
                jf = jv.reshape(1, n, -1)
                coef = (Sf * jf).sum(-1, keepdim=True)
                t = (coef * Sf).sum(0).reshape(jv.shape) * state.w
        return state.graph.vjp(t, batched)
