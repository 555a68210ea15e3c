"""The inverse of an operator as an operator: every product is a solve."""

from __future__ import annotations

from torch import Tensor

from ..operators.base import DenseOperator, LinearOperator, aslinearoperator
from ._result import SolveResult, flat_solution

__all__ = ["InverseOperator"]

# methods whose solve takes an n x k block of right-hand sides in one call
BLOCK_METHODS = frozenset({"cg", "minres", "neumann", "dense"})


class InverseOperator(LinearOperator):
    r"""The operator :math:`(A + \lambda I)^{-1}`: each product solves with :func:`second.solve`.

    ``A.inverse(method, **options)`` builds it. ``Ainv @ v`` solves one system and
    ``Ainv @ V`` (``n x k``) solves ``k`` of them together: CG and Neumann advance all
    columns with one batched product of ``A`` per iteration, MINRES solves them in turn,
    ``dense`` factorizes once. With ``method="dense"`` the matrix of ``A`` is formed once,
    on the first product, and reused.

    Every solve's :class:`~second.SolveResult` is kept in ``last_result``;
    ``inner_matvecs`` counts the products of ``A`` spent so far (``matvecs`` counts the
    products of the inverse, as for any operator). A solve that does not converge warns,
    as :func:`second.solve` does; ``raise_on_failure=True`` makes it an error instead.

    Args:
        A: the operator (or dense tensor) to invert.
        method: a method of :func:`second.solve` (default ``"auto"``).
        raise_on_failure: raise :class:`RuntimeError` when a solve does not converge.
        **options: options of :func:`second.solve` (``damping``, ``tol``, ``atol``,
            ``maxiter``, ``M``, ...).

    Example:
        >>> A = DenseOperator(torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> Ainv = A.inverse("cg", tol=1e-12)
        >>> torch.allclose(A @ (Ainv @ torch.eye(2, dtype=torch.float64)), torch.eye(2, dtype=torch.float64))
        True
    """

    def __init__(self, A, method: str = "auto", *, raise_on_failure: bool = False, **options):
        op = aslinearoperator(A)
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.method = method
        self.options = options
        self.raise_on_failure = raise_on_failure
        self.symmetric = op.symmetric
        self.psd = op.psd and float(options.get("damping", 0.0)) >= 0
        self.check_finite = False  # a solve raises on non-finite products itself
        self.last_result: SolveResult | None = None
        self.inner_matvecs = 0
        self._dense: LinearOperator | None = None

    def _system(self) -> LinearOperator:
        if self.method != "dense":
            return self.op
        if self._dense is None:
            before = self.op.matvecs
            self._dense = DenseOperator(self.op.to_dense(), symmetric=self.op.symmetric)
            self.inner_matvecs += self.op.matvecs - before
        return self._dense

    def _solve(self, rhs: Tensor) -> Tensor:
        from ._solve import solve

        res = solve(self._system(), rhs, self.method, **self.options)
        self.last_result = res
        self.inner_matvecs += res.matvecs if self.method != "dense" else 0
        if self.raise_on_failure and not res.converged:
            raise RuntimeError(f"inverse product: {res.message}")
        return flat_solution(res)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._solve(v)

    def _matmat(self, V: Tensor) -> Tensor:
        chosen = self.method
        if chosen == "auto":
            from ._solve import choose_method

            chosen = choose_method(self.op, self.shape[0], float(self.options.get("damping", 0)))
        if chosen in BLOCK_METHODS:
            return self._solve(V)
        return super()._matmat(V)

    def inverse(self, method: str = "auto", **options) -> LinearOperator:  # noqa: D102
        if method == "auto" and not options:  # the inverse of the inverse is the operator
            damping = float(self.options.get("damping", 0.0))
            return self.op.damped(damping) if damping else self.op
        return super().inverse(method, **options)
