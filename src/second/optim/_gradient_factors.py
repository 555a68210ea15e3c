r"""Kronecker factors of a gradient, and the shell of SOAP and Shampoo.

A weight matrix's gradient statistics :math:`G G^\top` and :math:`G^\top G` are Kronecker
factors (:func:`matrix_layout`, :func:`factor_increments`), decomposed with
:func:`second.kfac.eigen_blocks` into :class:`second.kfac.EigenBlock`\ s;
:class:`KroneckerFactoredOptimizer` keeps them per parameter. Under ``torch.distributed`` the
statistics are averaged over the ranks (gradients are expected averaged, as DDP does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..kfac import EigenBlock, eigen_blocks
from ._options import check_int, check_unit
from ._preconditioned import PreconditionedOptimizer, all_reduce_mean, decoupled_update

__all__ = [
    "KroneckerFactoredOptimizer",
    "MatrixLayout",
    "matrix_layout",
    "factor_increments",
    "factor_eigenbases",
]


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


def _power_step(F: Tensor, Q: Tensor, side: str) -> dict:
    """One sorted power-iteration step of the basis ``Q`` towards the eigenvectors of ``F``.

    The QR runs in ``F``'s dtype, at least float32 (there is none in bfloat16 or float16),
    as :func:`second.kfac.sym_eigh` does; the basis is returned in ``F``'s dtype.
    """
    work = F.dtype if F.dtype in (torch.float32, torch.float64) else torch.float32
    Qw = Q.to(work)
    FQ = F.to(work) @ Qw  # one product: the Rayleigh quotients' and, sorted, the QR's
    est = (Qw * FQ).sum(0).to(F.dtype)
    order = torch.argsort(est, descending=True)
    Qn = torch.linalg.qr(FQ[:, order]).Q.to(F.dtype)
    return {f"l{side}": est[order].clamp_min(0.0), f"Q{side}": Qn, f"perm_{side}": order}


class KroneckerFactoredOptimizer(PreconditionedOptimizer):
    """Shell of SOAP and Shampoo: running gradient factors and their eigenbases per parameter.

    Per parameter with a Kronecker layout the state holds ``factor_A``, ``factor_G`` (running
    averages of :func:`factor_increments` with decay ``shampoo_beta``) and the eigenbasis
    ``lA, QA, lG, QG`` of an :class:`~second.kfac.EigenBlock`, refreshed every
    ``precondition_frequency`` steps (the first step included). A subclass gives the
    direction of one parameter (``_direction``); the step around it is shared: the factors
    and eigenbases are proposed, the directions taken, AdamW's decoupled weight decay added,
    and all of it committed only when finite.
    """

    _bias_correct = True  # the eigenbases are those of the bias-corrected factors
    _refresh = "eigh"  # see _factor_phase

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_unit("shampoo_beta", group["shampoo_beta"])
        check_int("precondition_frequency", group["precondition_frequency"])
        check_int("max_precond_dim", group["max_precond_dim"], minimum=0)

    def _direction(self, group: dict, p: Tensor, layout, t: int, ns: dict) -> Tensor:
        """The direction of ``p`` at step ``t`` (the new state goes into ``ns``)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(  # type: ignore[override]  # the loss is returned as a tensor
        self, closure: Callable | None = None
    ) -> Tensor | None:
        """One step; ``closure`` (optional) re-evaluates the loss, which is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._with_grads()
        if not work:
            return loss
        params = [p for _, ps in work for p in ps]
        self._check_sparse(params)
        if not self._finite([p.grad for p in params], params[0].device):
            self._refuse("a gradient has NaN or Inf entries")
            return loss
        phase = self._factor_phase(work, bias_correct=self._bias_correct, refresh=self._refresh)
        if phase is None:
            self._refuse("a gradient factor or its eigenbasis has NaN or Inf entries")
            return loss
        entries, new = phase
        updates: list[Tensor] = []
        moments: list[Tensor] = []  # the state the directions propose (the factors are checked)
        for group, p, layout, t in entries:
            ns = new[p]
            checked = set(ns)
            d = self._direction(group, p, layout, t, ns)
            updates.append(decoupled_update(d, p, group["lr"], group["weight_decay"]))
            moments.extend(v for k, v in ns.items() if k not in checked and isinstance(v, Tensor))
        # the moments too: a finite gradient whose square overflows gives an infinite second
        # moment and a zero (finite) update; committed, the next lerp(inf, .) is NaN and every
        # later step would be refused
        if not self._finite(updates + moments, params[0].device):
            self._refuse("the update or its moments have NaN or Inf entries")
            return loss
        self._commit([e[1] for e in entries], updates, [new[e[1]] for e in entries])
        return loss

    @staticmethod
    def _layout(group: dict, p: Tensor) -> MatrixLayout | None:
        """``p``'s matrix view in ``group`` (``None``: AdamW's step, no factors)."""
        if p.dim() > 1 or group.get("precondition_1d", True):
            return matrix_layout(p.shape, group["max_precond_dim"])
        return None

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
        entries = []
        incs: list[Tensor] = []
        for group, ps in work:
            for p in ps:
                t = int(self.state[p].get("step", 0)) + 1
                layout = self._layout(group, p)
                entries.append((group, p, layout, t))
                if layout is not None:
                    incs.extend(factor_increments(layout.to_matrix(p.grad), layout))
        all_reduce_mean(incs)
        new: dict[Tensor, dict[str, Any]] = {}
        due: list[Tensor] = []
        pairs: list[tuple[Tensor, Tensor]] = []
        k = 0
        for group, p, layout, t in entries:
            st = self.state[p]
            ns: dict[str, Any] = {"step": t}
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
