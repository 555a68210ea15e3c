"""second.operators.wrap: declared, undeclared and known symmetry of wrapped operators.

An undeclared square callable or SciPy operator is taken as symmetric (as always: the
symmetric-only methods accept it, and the spectral ones probe it); one declared
``symmetric=False`` is refused by them at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from second import (
    CallableOperator,
    DenseOperator,
    aslinearoperator,
    cg,
    diagonal,
    eigsh,
    minres,
    solve,
    trace,
)
from second.spectral import extreme_eigenvalues

F64 = torch.float64
# the nonsymmetric matrix eigsh once took as symmetric (its largest "eigenvalue" 6.5555)
NONSYMMETRIC = np.array([[1.0, 5.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])


def _spd(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=F64)
    return B @ B.T + n * torch.eye(n, dtype=F64)


class _Declaring(sla.LinearOperator):
    """A SciPy operator that declares its symmetry (SciPy's own carry no such attribute)."""

    def __init__(self, M, symmetric):
        super().__init__(dtype=M.dtype, shape=M.shape)
        self.M, self.symmetric = M, symmetric

    def _matvec(self, x):
        return self.M @ x

    def _rmatvec(self, x):
        return self.M.T @ x


def test_the_symmetric_keyword_of_a_callable():
    S = _spd()
    f = lambda v: S @ v  # noqa: E731
    undeclared = aslinearoperator(f, 6, dtype=F64)
    assert undeclared.symmetric and not undeclared.symmetry_known  # taken as symmetric
    for declared in (True, False):
        op = aslinearoperator(f, 6, dtype=F64, symmetric=declared)
        assert op.symmetric is declared and op.symmetry_known
        direct = CallableOperator(f, 6, F64, symmetric=declared)
        assert direct.symmetric is declared and direct.symmetry_known
    # with an rmatvec, or rectangular: not symmetric, as before
    assert not CallableOperator(f, 6, F64, rmatvec=f).symmetric
    rect = CallableOperator(lambda v: v[:2], (2, 6), F64)
    assert not rect.symmetric and rect.symmetry_known
    with pytest.raises(ValueError, match="cannot be symmetric"):
        aslinearoperator(lambda v: v[:2], (2, 6), dtype=F64, symmetric=True)


def test_the_symmetric_keyword_of_a_tensor_and_an_operator():
    A = torch.tensor(NONSYMMETRIC)
    assert not aslinearoperator(A).symmetric  # the entries say so
    assert aslinearoperator(A, symmetric=True).symmetric  # declared: rounding, say
    assert aslinearoperator(A).symmetry_known
    op = DenseOperator(_spd())
    assert aslinearoperator(op) is op and aslinearoperator(op, symmetric=True) is op
    with pytest.raises(ValueError, match="contradicts the operator's own"):
        aslinearoperator(op, symmetric=False)


def test_a_scipy_operator_declares_its_symmetry_or_leaves_it_unknown():
    M = NONSYMMETRIC
    wrapped = aslinearoperator(sla.aslinearoperator(M))  # SciPy declares nothing
    assert wrapped.symmetric and not wrapped.symmetry_known
    declared = aslinearoperator(sla.aslinearoperator(M), symmetric=False)
    assert not declared.symmetric and declared.symmetry_known
    # declared nonsymmetric, a square SciPy operator keeps its rmatvec: A^T works
    torch.testing.assert_close(declared.T.to_dense(), torch.tensor(M.T))
    torch.testing.assert_close(declared.to_dense(), torch.tensor(M))
    # its own attribute, where it has one; the keyword overrides it
    own = aslinearoperator(_Declaring(M, False))
    assert not own.symmetric and own.symmetry_known
    torch.testing.assert_close(own.T.to_dense(), torch.tensor(M.T))
    S = _spd().numpy()
    own = aslinearoperator(_Declaring(S, np.bool_(True)))
    assert own.symmetric and own.symmetry_known
    assert aslinearoperator(_Declaring(M, False), symmetric=True).symmetric
    # a rectangular one is never symmetric and keeps its rmatvec, as before
    rect = aslinearoperator(sla.aslinearoperator(M[:2]))
    assert not rect.symmetric and rect.symmetry_known
    torch.testing.assert_close(rect.T.to_dense(), torch.tensor(M[:2].T))


def _declared_nonsymmetric():
    A = torch.tensor(NONSYMMETRIC)
    return {
        "callable": aslinearoperator(lambda v: A @ v, 3, dtype=F64, symmetric=False),
        "scipy keyword": aslinearoperator(sla.aslinearoperator(NONSYMMETRIC), symmetric=False),
        "scipy attribute": _Declaring(NONSYMMETRIC, False),
    }


@pytest.mark.parametrize("kind", ["callable", "scipy keyword", "scipy attribute"])
def test_a_declared_nonsymmetric_operator_is_refused_by_the_symmetric_only_methods(kind):
    op = _declared_nonsymmetric()[kind]
    b = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="eigsh needs a symmetric operator; this one declares"):
        eigsh(op, k=1)
    with pytest.raises(ValueError, match="cg needs a symmetric .*declares symmetric=False"):
        cg(op, b)
    with pytest.raises(ValueError, match="minres needs a symmetric .*declares symmetric=False"):
        minres(op, b)
    with pytest.raises(ValueError, match="needs a symmetric operator; this one declares"):
        extreme_eigenvalues(op)
    with pytest.raises(ValueError, match="xtrace.*not symmetric"):
        trace(op, 4, method="xtrace")
    # the general methods take it
    torch.testing.assert_close(
        solve(op, b, method="dense").x, torch.linalg.solve(torch.tensor(NONSYMMETRIC), b)
    )
    assert torch.isfinite(trace(op, 4, method="hutchinson"))


def test_an_undeclared_nonsymmetric_scipy_operator_is_found_by_the_probes():
    """The report: eigsh(aslinearoperator(A)) returned 6.5555 for this A."""
    op = aslinearoperator(sla.aslinearoperator(NONSYMMETRIC))
    with pytest.raises(ValueError, match="eigsh needs a symmetric operator, and this one is not"):
        eigsh(op, k=1)


def test_an_undeclared_symmetric_callable_still_works_everywhere():
    S = _spd()
    f = lambda v: S @ v  # noqa: E731
    b = torch.arange(1.0, 7.0, dtype=F64)
    x = torch.linalg.solve(S, b)
    evals = torch.linalg.eigvalsh(S)
    op = aslinearoperator(f, 6, dtype=F64)
    scipy_op = aslinearoperator(sla.aslinearoperator(S.numpy()))
    for A in (f, op, scipy_op):  # a bare callable takes its size from b
        for method in ("cg", "minres", "dense"):
            torch.testing.assert_close(solve(A, b, method=method, tol=1e-12).x, x)
        torch.testing.assert_close(cg(A, b, tol=1e-12).x, x)
        torch.testing.assert_close(minres(A, b, tol=1e-12).x, x)
    for A in (op, scipy_op):
        vals = eigsh(A, k=2, which="LA", tol=1e-10, return_eigenvectors=False)
        torch.testing.assert_close(vals.sort().values, evals[-2:])
        lo, hi = extreme_eigenvalues(A, steps=6)
        assert lo == pytest.approx(float(evals[0]), rel=1e-8)
        assert hi == pytest.approx(float(evals[-1]), rel=1e-8)
        torch.testing.assert_close(trace(A, 20, method="xtrace"), torch.trace(S))
        torch.testing.assert_close(diagonal(A, 20, method="xdiag"), torch.diagonal(S))
        torch.testing.assert_close(diagonal(A, method="exact"), torch.diagonal(S))


def test_a_real_operator_takes_a_complex_vector_through_scipy():
    # the vector was cast to the operator's real dtype: the imaginary part was dropped
    A = torch.randn(5, 5, dtype=torch.float64)
    S = aslinearoperator(A).to_scipy()
    rng = np.random.default_rng(0)
    z = rng.standard_normal(5) + 1j * rng.standard_normal(5)
    out = S.matvec(z)
    assert np.iscomplexobj(out)
    np.testing.assert_allclose(out, A.numpy() @ z, rtol=1e-12, atol=1e-12)


def test_a_complex_scipy_operator_stays_complex():
    M = np.array([[1.0, 2j], [3.0, 4.0]])
    op = aslinearoperator(sla.aslinearoperator(M))
    assert op.dtype == torch.complex128
    v = torch.tensor([0.0, 1.0], dtype=torch.complex128)
    torch.testing.assert_close(op @ v, torch.tensor([2j, 4.0], dtype=torch.complex128))
