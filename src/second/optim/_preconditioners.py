r"""Shared machinery of the preconditioned first-order optimizers (SOAP, Shampoo, Sophia, AdaHessian).

* :class:`PreconditionedOptimizer`: the ``torch.optim.Optimizer`` shell. A subclass proposes,
  for every parameter with a gradient, an update and its new state (fresh tensors, never
  written in place); the shell commits them only when every proposed tensor is finite
  on every rank. Otherwise the step is *refused*: parameters and state stay as they were,
  ``n_refused`` in :attr:`PreconditionedOptimizer.counters` grows and a ``RuntimeWarning`` is
  given once per optimizer.
* Gradient factors: a weight matrix's gradient statistics :math:`G G^\top` and
  :math:`G^\top G` are Kronecker factors (:func:`matrix_layout`, :func:`factor_increments`),
  decomposed with :func:`second.kfac.eigen_blocks` into :class:`second.kfac.EigenBlock`\ s.
* Diagonal curvature estimates: :func:`hutchinson_diagonal` (:math:`z \odot Hz`) and
  :func:`gnb_diagonal` (Gauss-Newton-Bartlett, :math:`\hat g \odot \hat g` with targets
  sampled from the model).

Under ``torch.distributed`` the statistics and estimates are averaged over the ranks through
:mod:`second.distributed`; gradients are expected to be averaged already (as DDP does).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import distributed as dist
from ..func import differentiable_attention
from ..func.products import grad_checked
from ..kfac import EigenBlock, curvature_columns, eigen_blocks
from ._base import PARAM_SHAPES, call_closure, check_state_dict_params

__all__ = [
    "PreconditionedOptimizer",
    "MatrixLayout",
    "matrix_layout",
    "factor_increments",
    "factor_eigenbases",
    "rademacher",
    "hutchinson_diagonal",
    "gnb_diagonal",
    "all_reduce_mean",
    "check_betas",
    "reject_module",
    "closure_gradients",
]


def reject_module(owner: str, params) -> None:
    """Raise ``TypeError`` when a model is passed where its parameters belong."""
    if isinstance(params, nn.Module):
        raise TypeError(f"{owner} takes parameters: pass model.parameters(), not the model")


def check_betas(betas) -> None:
    """Raise ``ValueError`` unless ``betas`` is a pair of numbers in ``[0, 1)`` (torch.optim's rule)."""
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2
    ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
    if not (ok and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` over the ranks in place (nothing outside a process group)."""
    ts = [t for t in tensors if t.numel()]
    if ts and dist.active():
        dist.all_reduce_sum(ts)
        w = dist.world_size()
        for t in ts:
            t.div_(w)


def rademacher(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Independent signs ``+-1`` shaped and typed like ``like``."""
    r = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return (2 * r - 1).to(like.dtype)


# --------------------------------------------------------------------------- gradient factors
@dataclass(frozen=True)
class MatrixLayout:
    """How a parameter is seen as a matrix ``M [d_G, d_A]`` for Kronecker factors.

    Attributes:
        d_G: rows (the side with a full factor ``L = M M^T``).
        d_A: columns (the side of ``R = M^T M``, held as its diagonal when ``diag_A``).
        transpose: ``M`` is the transpose of the parameter's ``[shape[0], -1]`` view.
        diag_A: ``R`` is kept as its diagonal (a side above ``max_precond_dim``, or 1).
    """

    d_G: int
    d_A: int
    transpose: bool
    diag_A: bool

    def to_matrix(self, t: Tensor) -> Tensor:
        """The parameter-shaped ``t`` as ``M``."""
        m = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
        if t.dim() == 1:
            m = t.reshape(-1, 1)
        return m.T if self.transpose else m

    def from_matrix(self, m: Tensor, like: Tensor) -> Tensor:
        """``M`` back in the shape of ``like``."""
        return (m.T if self.transpose else m).reshape(like.shape)


def matrix_layout(shape: Sequence[int], max_precond_dim: int) -> MatrixLayout | None:
    """The matrix view of a parameter, or ``None`` when neither side can have a full factor.

    A parameter ``[n_0, n_1, ...]`` is the matrix ``[n_0, n_1 n_2 ...]`` (a convolution
    kernel as ``[out, in k_h k_w]``, as in :mod:`second.kfac`), a vector ``[n]`` is
    ``[n, 1]``. A side above ``max_precond_dim`` becomes the ``A`` side with a diagonal
    factor (a side of 1 is diagonal too); when both are above it there is no Kronecker layout.

    Example:
        >>> matrix_layout((100, 3), 64)
        MatrixLayout(d_G=3, d_A=100, transpose=True, diag_A=True)
        >>> matrix_layout((5,), 64), matrix_layout((100, 100), 64)
        (MatrixLayout(d_G=5, d_A=1, transpose=False, diag_A=True), None)
    """
    rows = int(shape[0]) if len(shape) else 1
    cols = int(math.prod(shape[1:])) if len(shape) > 1 else 1
    if min(rows, cols) > max_precond_dim:
        return None
    transpose = rows > max_precond_dim
    d_G, d_A = (cols, rows) if transpose else (rows, cols)
    return MatrixLayout(d_G, d_A, transpose, d_A > max_precond_dim or d_A == 1)


def factor_increments(M: Tensor, layout: MatrixLayout) -> tuple[Tensor, Tensor]:
    r"""One gradient's factor statistics :math:`(M^\top M,\; M M^\top)`.

    ``A`` is held as its diagonal when ``layout.diag_A``; the order ``(A, G)`` is the one of
    :func:`second.kfac.eigen_blocks`.

    Example:
        >>> M = torch.tensor([[1.0, 2.0]])
        >>> factor_increments(M, matrix_layout((1, 2), 8))
        (tensor([[1., 2.],
                [2., 4.]]), tensor([[5.]]))
    """
    A = (M * M).sum(0) if layout.diag_A else M.T @ M
    return A, M @ M.T


def factor_eigenbases(
    factors: Sequence[tuple[Tensor, Tensor]], scale: float = 1.0
) -> list[EigenBlock]:
    """Eigenbases of ``(scale A, scale G)`` pairs, decomposed once over the ranks.

    :func:`second.kfac.eigen_blocks` with ``split=True``: pair ``j`` is decomposed on rank
    ``j % world_size`` and shared (the factors are equal on every rank).

    Example:
        >>> (E,) = factor_eigenbases([(torch.tensor([1.0, 4.0]), torch.eye(1))])
        >>> E.eigenvalues
        tensor([[1., 4.]])
    """
    return eigen_blocks(factors, scale, split=True)


# --------------------------------------------------------------------------- diagonal estimates
def hutchinson_diagonal(
    grads: Sequence[Tensor], params: Sequence[Tensor], generator: torch.Generator | None
) -> list[Tensor]:
    r"""Hutchinson's estimate :math:`z \odot H z` of the Hessian diagonal, :math:`z` Rademacher.

    Unbiased: :math:`\mathbb E[z_i (Hz)_i] = \sum_j H_{ij}\mathbb E[z_i z_j] = H_{ii}`. One
    Hessian-vector product through ``grads`` (built with ``create_graph=True``).

    Args:
        grads: the gradient, with its graph.
        params: the parameters it was taken with respect to.
        generator: the generator of the signs.

    Returns:
        One detached estimate per parameter.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = torch.autograd.grad((w ** 3).sum(), [w], create_graph=True)
        >>> hutchinson_diagonal([g], [w], torch.Generator().manual_seed(0))  # exact: diagonal H
        [tensor([ 6., 12.])]
    """
    zs = [rademacher(p, generator) for p in params]
    hz = grad_checked(list(grads), list(params), zs, retain_graph=True, zeros_for_unused=True)
    return [(z * h).detach() for z, h in zip(zs, hz)]


def gnb_diagonal(
    output: Tensor,
    loss_fn: Callable,
    params: Sequence[Tensor],
    generator: torch.Generator | None,
) -> list[Tensor]:
    r"""The Gauss-Newton-Bartlett estimate :math:`\hat g \odot \hat g` of the GGN diagonal.

    With targets :math:`\tilde y_i` sampled from the model's predictive and :math:`s_i`
    the matching curvature column (:func:`second.kfac.curvature_columns`, ``fisher="mc"``;
    :math:`\mathbb E[s_i s_i^\top]` is the output Hessian of example :math:`i` and
    :math:`\mathbb E[s_i] = 0`), :math:`\hat g = \sum_i J_i^\top s_i` (one backward pass) has
    :math:`\mathbb E[\hat g \hat g^\top] = \sum_i J_i^\top \mathbb E[s_i s_i^\top] J_i`, the
    GGN of the loss as written (``w = 1/N`` for a mean, 1 for a sum); so
    :math:`\hat g \odot \hat g` is an unbiased estimate of its diagonal (Liu et al. 2023,
    Algorithm 2, where the mean's :math:`B` is written out).

    Args:
        output: the network output ``f [N, ...]`` with its graph.
        loss_fn: the training loss (``nn.MSELoss``, ``nn.CrossEntropyLoss`` or
            ``nn.BCEWithLogitsLoss``, mean or sum).
        params: the parameters.
        generator: the generator of the sampled targets.

    Returns:
        One detached estimate per parameter.

    Raises:
        NotImplementedError: a loss without a known output curvature.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> f = net(torch.ones(4, 2))
        >>> est = gnb_diagonal(f, torch.nn.MSELoss(), list(net.parameters()), None)
        >>> [tuple(e.shape) for e in est]
        [(1, 2), (1,)]
    """
    reduction = getattr(loss_fn, "reduction", "mean")
    S = curvature_columns(loss_fn, output, None, reduction, "mc", 1, generator)[0]
    w = 1.0 / output.shape[0] if reduction == "mean" else 1.0
    g = grad_checked(
        output, list(params), S.to(output.dtype), retain_graph=True, zeros_for_unused=True
    )
    return [(gi.detach() * gi.detach()) * w for gi in g]


def closure_gradients(
    owner: str, closure: Callable, params: Sequence[Tensor], *, create_graph: bool
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run a closure under torch.optim's contract and differentiate its loss here.

    The closure's ``backward()`` is deferred (:func:`second.optim._base.call_closure`): the
    gradient is taken once, with its graph when ``create_graph`` (a Hessian-vector product
    follows), and written to ``.grad`` detached, averaged over the ranks under
    torch.distributed (DDP's hooks only run in ``backward()``).

    Returns:
        ``(loss, grads)``: the loss (graph kept) and the gradients.
    """
    res = call_closure(owner, closure, graph=True)
    grads = grad_checked(
        res.loss, list(params), create_graph=create_graph, retain_graph=True, zeros_for_unused=True
    )
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.grad = g.detach().clone()
        # the loss is differentiated here, not by backward(), so DDP's hooks do not average
        # the gradient: it is averaged over the ranks now
        all_reduce_mean([p.grad for p in params])
    return res.loss, grads


# --------------------------------------------------------------------------- the shell
class PreconditionedOptimizer(Optimizer):
    """``torch.optim.Optimizer`` shell that commits a step only when all of it is finite.

    Subclasses implement ``_propose(group_params) -> (updates, new_states)``; this class
    checks, commits or refuses, keeps the counters (:attr:`counters`: ``n_refused``) and
    round-trips ``state_dict`` with the parameter shapes and the random generator.
    """

    _owner = "PreconditionedOptimizer"

    def __init__(self, params: Iterable, defaults: dict, seed: int | None = None):
        reject_module(type(self).__name__, params)
        super().__init__(params, defaults)
        self._warned = False
        self._seed = seed
        self._generator: torch.Generator | None = None
        self._gen_state: Tensor | None = None

    # -- state ---------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def counters(self) -> dict:
        """Optimizer-wide counters (saved by ``state_dict``): ``n_refused`` steps."""
        st = self.state[self._params()[0]]
        st.setdefault("n_refused", 0)
        return st

    @property
    def _state(self) -> dict:  # the name the benchmarks read refused-step counters from
        return self.counters

    def generator(self, device: torch.device) -> torch.Generator:
        """The optimizer's random generator (seeded with ``seed`` plus the rank)."""
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            seed = self._seed if self._seed is not None else 0
            self._generator.manual_seed(seed + dist.rank())
            if self._gen_state is not None:
                self._generator.set_state(self._gen_state)
        return self._generator

    def state_dict(self) -> dict:
        """The state of ``torch.optim.Optimizer``, the parameter shapes and the generator."""
        sd = super().state_dict()
        sd[PARAM_SHAPES] = [list(p.shape) for p in self._params()]
        if self._generator is not None:
            sd["generator_state"] = self._generator.get_state()
        elif self._gen_state is not None:
            sd["generator_state"] = self._gen_state.clone()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`.

        Raises:
            ValueError: if it was saved for another number or shapes of parameters.
        """
        check_state_dict_params(type(self).__name__, self._params(), state_dict)
        state_dict = dict(state_dict)
        gen = state_dict.pop("generator_state", None)
        state_dict.pop(PARAM_SHAPES, None)
        super().load_state_dict(state_dict)
        self._generator = None
        self._gen_state = gen.clone() if isinstance(gen, Tensor) else None

    # -- the step ------------------------------------------------------------------------
    def _refuse(self, why: str) -> None:
        self.counters["n_refused"] += 1
        if not self._warned:
            warnings.warn(
                f"{type(self).__name__}: {why}; the step was refused (parameters and state "
                "unchanged; counted in optimizer.counters['n_refused'])",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned = True

    @staticmethod
    def _finite(tensors: Iterable[Tensor | None], device: torch.device) -> bool:
        """Whether every tensor is finite, on every rank (one collective)."""
        flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.numel()]
        ok = bool(torch.stack(flags).all()) if flags else True
        return dist.all_ranks(ok, device)

    @torch.no_grad()
    def _commit(
        self, params: Sequence[Tensor], updates: Sequence[Tensor], states: Sequence[dict]
    ) -> None:
        for p, u, new in zip(params, updates, states):
            p.add_(u)
            self.state[p].update(new)

    def _with_grads(self) -> list[tuple[dict, list[Tensor]]]:
        out = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                out.append((group, ps))
        return out

    def _check_sparse(self, params: Sequence[Tensor]) -> None:
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")


def _power_step(F: Tensor, Q: Tensor, side: str) -> dict:
    """One sorted power-iteration step of the basis ``Q`` towards the eigenvectors of ``F``."""
    est = (Q * (F @ Q)).sum(0)
    order = torch.argsort(est, descending=True)
    Qn = torch.linalg.qr(F @ Q[:, order]).Q
    return {f"l{side}": est[order].clamp_min(0.0), f"Q{side}": Qn, f"perm_{side}": order}


class KroneckerFactoredOptimizer(PreconditionedOptimizer):
    """Shell of SOAP and Shampoo: running gradient factors and their eigenbases per parameter.

    Per parameter with a Kronecker layout the state holds ``factor_A``, ``factor_G`` (running
    averages of :func:`factor_increments` with decay ``shampoo_beta``) and the eigenbasis
    ``lA, QA, lG, QG`` of an :class:`~second.kfac.EigenBlock`, refreshed every
    ``precondition_frequency`` steps (the first step included).
    """

    def _factor_phase(self, work, bias_correct: bool, refresh: str = "eigh"):
        r"""New factors (and eigenbases where due) for every parameter, or ``None`` if not finite.

        ``refresh="eigh"`` decomposes the factors afresh (:func:`factor_eigenbases`);
        ``"power"`` (SOAP's) does it the first time only, then takes one step of power
        iteration from the current basis, :math:`Q \leftarrow \mathrm{qr}(F Q)`, with the
        columns first sorted by :math:`\mathrm{diag}(Q^\top F Q)` (descending; the order is
        returned as ``perm_G``/``perm_A`` so that quantities held in the basis follow it).

        Returns:
            ``(entries, new)``: ``entries`` a list of ``(group, p, layout, step)``, ``new`` the
            proposed state per parameter.
        """
        entries, incs = [], []
        for group, ps in work:
            for p in ps:
                t = int(self.state[p].get("step", 0)) + 1
                layout = matrix_layout(p.shape, group["max_precond_dim"])
                entries.append((group, p, layout, t))
                if layout is not None:
                    incs.extend(factor_increments(layout.to_matrix(p.grad), layout))
        all_reduce_mean(incs)
        new: dict[Tensor, dict] = {}
        due, pairs, k = [], [], 0
        for group, p, layout, t in entries:
            st, ns = self.state[p], {"step": t}
            new[p] = ns
            if layout is None:
                continue
            b = group["shampoo_beta"]
            for key, inc in (("factor_A", incs[k]), ("factor_G", incs[k + 1])):
                old = st.get(key)
                ns[key] = inc * (1 - b) if old is None else torch.lerp(old, inc, 1 - b)
            k += 2
            if (t - 1) % group["precondition_frequency"] != 0 and "QG" in st:
                continue
            if refresh == "power" and "QG" in st:
                ns.update(_power_step(ns["factor_G"], st["QG"], "G"))
                if st.get("QA") is not None:
                    ns.update(_power_step(ns["factor_A"], st["QA"], "A"))
                else:
                    ns["lA"] = ns["factor_A"]
                continue
            s = 1.0 / (1.0 - b**t) if bias_correct else 1.0
            due.append(p)
            pairs.append((ns["factor_A"] * s, ns["factor_G"] * s))
        device = entries[0][1].device
        proposed = [t for ns in new.values() for t in ns.values() if isinstance(t, Tensor)]
        if not self._finite(proposed, device):
            return None
        if due:
            blocks = factor_eigenbases(pairs)
            for p, E in zip(due, blocks):
                new[p].update(lA=E.lA, lG=E.lG, QG=E.QG)
                if E.QA is not None:
                    new[p]["QA"] = E.QA
            if not self._finite([t for E in blocks for t in (E.lA, E.QA, E.lG, E.QG)], device):
                return None
        return entries, new

    def _block(self, p: Tensor, ns: dict) -> EigenBlock:
        """The eigenbasis of ``p``: the proposed one where refreshed, else the stored one."""
        st = self.state[p]
        get = lambda k: ns[k] if k in ns else st.get(k)  # noqa: E731
        return EigenBlock(get("lA"), get("QA"), get("lG"), get("QG"))


class DiagonalHessianOptimizer(PreconditionedOptimizer):
    """Shell of Sophia and AdaHessian: a diagonal curvature estimate every ``update_period`` steps.

    ``step(closure)`` runs the closure with its ``backward()`` deferred, differentiates the
    loss once (with the graph a Hessian-vector product needs, on the steps that estimate),
    leaves the gradient in ``.grad``, asks :meth:`_estimate` for the diagonal, averages it
    over the ranks and hands everything to ``_propose``. ``counters`` holds ``n_steps``
    (committed steps) and ``n_refused``.
    """

    _estimator = "hutchinson"

    def _trainable(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _due(self) -> bool:
        period = self.param_groups[0]["update_period"]
        return int(self.counters.get("n_steps", 0)) % period == 0

    def _estimate(
        self, loss: Tensor, grads: Sequence[Tensor], params: list[Tensor]
    ) -> list[Tensor]:
        """Hutchinson's diagonal (override for another estimator)."""
        return hutchinson_diagonal(grads, params, self.generator(params[0].device))

    def _gradients(self, closure: Callable | None, due: bool):
        """``(loss, params, grads, estimate or None)`` from the closure or from ``.grad``."""
        params = self._trainable()
        owner = type(self).__name__
        if closure is not None:
            # a Hessian-vector product through attention needs the math kernel
            second_order = due and self._estimator == "hutchinson"
            with torch.enable_grad(), differentiable_attention() if second_order else nullcontext():
                loss, grads = closure_gradients(owner, closure, params, create_graph=second_order)
                if not due:
                    return loss.detach(), params, [p.grad for p in params], None
                if not self._finite(grads, params[0].device):
                    return loss.detach(), params, [p.grad for p in params], None
                est = self._estimate(loss, grads, params)
            return loss.detach(), params, [p.grad for p in params], est
        grads = [p.grad for p in params]
        if not due:
            return None, params, grads, None
        if self._estimator != "hutchinson":
            raise RuntimeError(
                f"{owner} estimates its Hessian diagonal from the model's outputs: pass a "
                "closure to step() (torch.optim's contract: zero the gradients, compute the "
                "loss, call loss.backward(), return the loss)"
            )
        if any(g is None or g.grad_fn is None for g in grads):
            raise RuntimeError(
                f"{owner} needs the gradient's graph for its Hessian estimate: pass a closure "
                "to step(), or call loss.backward(create_graph=True) before step()"
            )
        with torch.enable_grad():
            est = self._estimate(None, grads, params)
        for p in params:
            p.grad = p.grad.detach()
        return None, params, [p.grad for p in params], est

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Tensor | None:
        """One step; ``closure`` follows torch.optim's contract and its loss is returned.

        Raises:
            RuntimeError: a curvature estimate is due and neither a closure nor a gradient
                with its graph (``loss.backward(create_graph=True)``) was given.
        """
        due = self._due()
        loss, params, grads, est = self._gradients(closure, due)
        if not params:
            return loss
        device = params[0].device
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        if not self._finite([g for _, g in pairs], device):
            self._refuse("a gradient has NaN or Inf entries")
            return loss
        if est is not None:
            all_reduce_mean(est)
            if not self._finite(est, device):
                self._refuse("the curvature estimate has NaN or Inf entries")
                return loss
        estimate = dict(zip(params, est)) if est is not None else {}
        index = {p: i for i, p in enumerate(params)}
        ps, updates, states = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p not in index or grads[index[p]] is None:
                    continue
                u, ns = self._propose(p, grads[index[p]], estimate.get(p), group)
                ps.append(p)
                updates.append(u)
                states.append(ns)
        if not self._finite(
            updates + [t for ns in states for t in ns.values() if isinstance(t, Tensor)], device
        ):
            self._refuse("the update has NaN or Inf entries")
            return loss
        self._commit(ps, updates, states)
        self.counters["n_steps"] = int(self.counters.get("n_steps", 0)) + 1
        return loss
