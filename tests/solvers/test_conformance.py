"""Solver conformance: SciPy's test cases, and one invariant on every one of them.

The invariant: a result that says ``converged`` has a true residual, recomputed in float64
from the returned ``x`` and the matrix the user passed, within its tolerance
``max(tol ||b||, atol)`` plus the documented rounding floor ``20 eps ||b||`` of the dtype.
Beside it, each case says what must happen: converge (a method that can solve it, in
float64), refuse (a clear error), or report honestly (any outcome, if it is the truth).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import second
from conformance_cases import cases, poisson1d, poisson2d, true_residual
from second import CallableOperator, DenseOperator, cg, dense, minres, solve
from second.solvers import neumann_solve as neumann

CASES = cases()
FLOOR = 20  # the rounding floor, in units of eps(dtype) ||b|| (see measurable_residual)
TOL = {False: 1e-8, True: 1e-5}  # by "low precision": the tol each run asks for

METHODS = {
    "cg": lambda A, b, **kw: cg(A, b, **kw),
    "minres": lambda A, b, **kw: minres(A, b, **kw),
    "minres64": lambda A, b, **kw: minres(A, b, recurrence_dtype=torch.float64, **kw),
    "dense": lambda A, b, **kw: dense(A, b, **kw),
    "auto": lambda A, b, **kw: solve(A, b, **kw),
    "neumann": lambda A, b, **kw: neumann(A, b, **kw),
    "lsmr": lambda A, b, **kw: solve(A, b, "lsmr", **kw),
}


def expected(case, method: str, A) -> str:
    """What ``method`` must do on ``case`` in float64: converge, refuse, or be honest."""
    if method in ("cg", "minres", "minres64", "neumann") and not DenseOperator(A).symmetric:
        # a symmetric-only method on a matrix that is not (the near-symmetric case's 1e-6
        # is below float32 rounding of its 1e6 entries, so in float32 it is symmetric)
        return "refuse"
    if method in ("neumann", "lsmr") and case.complex:
        return "refuse"
    if method == "lsmr":  # any square nonsingular system, if the conditioning allows
        well = ("nonsymmetric", "spd-well", "rand-diag", "poisson1d", "poisson2d")
        return "converge" if case.name in well else "honest"
    if method in ("dense", "auto"):
        return "converge"
    if method.startswith("minres"):
        # condition 1e6: MINRES loses orthogonality and needs more than its 5 n iterations
        return "honest" if case.name == "ill-spd-1e6" else "converge"
    if method == "cg":
        return "converge" if (case.pd or case.singular) else "honest"
    if method == "neumann":
        # converges on PD matrices whose contraction allows it within 1000 terms
        return "converge" if case.name == "spd-well" else "honest"
    return "honest"


def assert_honest(res, A, b, tol, atol=0.0, damping=0.0):
    """The invariant: converged => true residual within the tolerance (+ rounding floor)."""
    eps = torch.finfo(A.real.dtype if A.is_complex() else A.dtype).eps
    X = res.x if res.x.dim() == 2 else res.x.unsqueeze(1)
    B = b if b.dim() == 2 else b.unsqueeze(1)
    ok_cols = res.info.get("converged_columns", [res.converged] * B.shape[1])
    assert res.converged == all(ok_cols)
    for j in range(B.shape[1]):
        bnorm = float(
            torch.linalg.vector_norm(
                B[:, j].to(torch.complex128 if b.is_complex() else torch.float64)
            )
        )
        allowed = max(tol * bnorm, atol) + FLOOR * eps * bnorm
        if ok_cols[j]:
            r = true_residual(A, X[:, j], B[:, j], damping)
            assert r <= allowed, (
                f"{res.method} claims convergence with true residual {r:.3e} > {allowed:.3e}"
            )
    assert res.x.dtype == b.dtype  # never a silent cast


def run(method, A, b, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-convergence warnings are asserted elsewhere
        return METHODS[method](A, b, **kw)


@pytest.mark.parametrize("low", [False, True], ids=["double", "single"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(CASES))
def test_invariant_on_every_case(name, method, low):
    case = CASES[name]
    A, b = case.cast(low)
    tol = TOL[low]
    want = expected(case, method, A)
    if want == "refuse":
        with pytest.raises((ValueError, TypeError), match="symmetric|complex"):
            run(method, A, b, tol=tol)
        return
    res = run(method, A, b, tol=tol)
    assert_honest(res, A, b, tol)
    if want == "converge" and not low:
        assert res.converged, f"{method} on {name}: {res.message}"
    if not res.converged:
        assert res.message  # says why


@pytest.mark.parametrize("name", ["poisson1d", "rand-sym-pd", "hermitian-pd"])
@pytest.mark.parametrize("method", ["cg", "minres"])
def test_x0_and_jacobi_preconditioner(name, method):
    case = CASES[name]
    A, b = case.A, case.b
    x0 = torch.randn(b.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(
        b.dtype
    )
    M = torch.diag(1.0 / torch.diagonal(A))
    for kw in (dict(x0=x0), dict(M=M), dict(x0=x0, M=M)):
        res = run(method, A, b, tol=1e-10, **kw)
        assert res.converged, res.message
        assert_honest(res, A, b, 1e-10)
    # x0 = the solution: nothing to do
    x = torch.linalg.solve(A, b)
    res = run(method, A, b, tol=1e-8, x0=x)
    assert res.converged and res.iterations == 0


@pytest.mark.parametrize("low", [False, True], ids=["double", "single"])
@pytest.mark.parametrize(
    ("name", "method"),
    [
        (name, method)
        for name in ("poisson1d", "rand-sym-pd", "rand-sym")
        for method in ("cg", "minres", "dense")
        if method != "cg" or CASES[name].pd  # CG's grid is for positive definite matrices
    ],
)
def test_atol_rtol_grid(name, method, low):
    case = CASES[name]
    A, b = case.cast(low)
    bnorm = float(torch.linalg.vector_norm(case.b))
    met = 0
    for tol in (1e-1, 1e-4, 1e-8, 1e-12):
        for atol in (0.0, 1e-10 * bnorm, 1e-3 * bnorm):
            res = run(method, A, b, tol=tol, atol=atol)
            assert_honest(res, A, b, tol, atol)
            met += res.converged
    # not vacuous: the reachable corners of the grid converge
    assert met >= (6 if low else 9)


@pytest.mark.parametrize("method", ["cg", "minres", "neumann"])
def test_maxiter_is_a_limit_and_is_reported(method):
    A, b = CASES["poisson2d"].A, CASES["poisson2d"].b
    res = run(method, A, b, tol=1e-10, maxiter=3)
    assert not res.converged and "3" in res.message
    assert res.iterations <= 3
    assert_honest(res, A, b, 1e-10)
    with pytest.raises(ValueError, match="maxiter"):
        run(method, A, b, maxiter=-1)


def test_shift_minres_and_dense():
    """SciPy's shift test: (A - shift I) x = b with minres's shift = our negative damping."""
    A, b = CASES["rand-sym-pd"].A, CASES["rand-sym-pd"].b
    shift = 0.3  # makes A - shift I indefinite
    x_ref = torch.linalg.solve(A - shift * torch.eye(40, dtype=torch.float64), b)
    for method in ("minres", "dense", "auto"):
        res = run(method, A, b, tol=1e-10, damping=-shift)
        assert res.converged, res.message
        assert_honest(res, A, b, 1e-10, damping=-shift)
        assert torch.allclose(res.x, x_ref, rtol=1e-6, atol=1e-8)
    res = run("cg", A, b, tol=1e-10, damping=-shift)  # indefinite now: CG says so
    assert res.negative_curvature and not res.converged


@pytest.mark.parametrize("method", ["cg", "minres", "neumann", "dense", "auto"])
def test_zero_rhs_returns_zero_at_once(method):
    A = CASES["poisson1d"].A
    b = torch.zeros(40, dtype=torch.float64)
    kw = {} if method in ("dense", "auto") else dict(x0=torch.ones(40, dtype=torch.float64))
    if method == "neumann":
        kw["scale"] = 4.0
    res = run(method, A, b, **kw)
    assert res.converged and torch.equal(res.x, torch.zeros_like(b))
    if method in ("cg", "minres"):
        assert res.matvecs == 0


@pytest.mark.parametrize("method", ["cg", "minres", "neumann"])
def test_counts_match_an_independent_counter(method):
    for name in ("poisson1d", "rand-sym-pd", "rand-diag"):
        A, b = CASES[name].A, CASES[name].b
        calls = []

        def mv(v, A=A, calls=calls):
            calls.append(1)
            return A @ v

        op = CallableOperator(mv, A.shape[0], A.dtype)
        res = run(method, op, b, tol=1e-8)
        assert res.matvecs == len(calls)


@pytest.mark.parametrize("name", ["poisson1d", "poisson2d", "rand-sym-pd"])
def test_products_at_most_scipy_plus_one(name):
    """On cases both genuinely solve in float64, CG uses at most SciPy's products + 1 (the check)."""
    sla = pytest.importorskip("scipy.sparse.linalg")
    A, b = CASES[name].A, CASES[name].b
    count = [0]

    def mv(v):
        count[0] += 1
        return A.numpy() @ v

    op = sla.LinearOperator(A.shape, matvec=mv, dtype="float64")
    x, info = sla.cg(op, b.numpy(), rtol=1e-8, atol=0.0)
    assert info == 0
    res = cg(A, b, tol=1e-8)
    assert res.converged and res.matvecs <= count[0] + 1


def test_nonsymmetric_refusal_names_the_cause():
    A = CASES["nonsymmetric"].A
    for f in (cg, minres):
        with pytest.raises(ValueError, match="symmetric=False"):
            f(A, CASES["nonsymmetric"].b)
    # the same matrix declared symmetric is taken, and the answer is still checked
    res = run("dense", DenseOperator(A, symmetric=True), CASES["nonsymmetric"].b, tol=1e-10)
    assert res.converged and res.info["solved_as"] == "general"
    assert_honest(res, A, CASES["nonsymmetric"].b, 1e-10)


def test_near_symmetric_is_solved_against_the_matrix_itself():
    case = CASES["near-symmetric"]
    assert not DenseOperator(case.A).symmetric
    for method in ("auto", "dense"):
        res = run(method, case.A, case.b, tol=1e-10)
        assert res.converged
        assert_honest(res, case.A, case.b, 1e-10)


def test_complex_systems_in_complex_arithmetic():
    for name in ("hermitian-pd", "hermitian-indefinite"):
        case = CASES[name]
        x_ref = torch.linalg.solve(case.A, case.b)
        for method in ("minres", "minres64", "dense", "auto") + (("cg",) if case.pd else ()):
            res = run(method, case.A, case.b, tol=1e-10)
            assert res.converged, (method, res.message)
            assert res.x.is_complex()
            assert torch.allclose(res.x, x_ref, rtol=1e-7, atol=1e-9)
    with pytest.raises(TypeError, match="complex"):
        second.lissa([CASES["hermitian-pd"].A], CASES["hermitian-pd"].b)


@pytest.mark.parametrize("method", ["cg", "minres", "neumann", "dense"])
def test_block_of_right_hand_sides(method):
    A = CASES["spd-well"].A
    B = torch.randn(40, 7, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    res = run(method, A, B, tol=1e-10)
    assert res.converged and res.x.shape == (40, 7)
    assert_honest(res, A, B, 1e-10)
    assert torch.allclose(res.x, torch.linalg.solve(A, B), rtol=1e-6, atol=1e-8)
    for j in (0, 6):  # each column is the single solve's
        single = run(method, A, B[:, j], tol=1e-10)
        assert torch.allclose(res.x[:, j], single.x, rtol=1e-6, atol=1e-9)


def test_neumann_block_takes_one_matrix_product_per_term():
    A = CASES["rand-sym-pd"].A / 3.0
    B = torch.randn(40, 88, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    calls = []

    def mm(V):
        calls.append(V.shape)
        return A @ V

    op = CallableOperator(lambda v: A @ v, 40, torch.float64, matmat=mm)
    res = run("neumann", op, B, scale=2.0, maxiter=10)
    assert len(calls) == 11 and all(s == (40, 88) for s in calls)  # 10 terms + the last residual
    assert res.matvecs == 11 * 88


@pytest.mark.parametrize("method", ["cg", "minres", "dense", "auto"])
def test_inverse_is_an_operator(method):
    A = CASES["rand-sym-pd"].A
    Ainv = DenseOperator(A).inverse(method, tol=1e-12)
    eye = torch.eye(40, dtype=torch.float64)
    assert torch.allclose(Ainv @ eye, torch.linalg.inv(A), rtol=1e-7, atol=1e-9)
    v = CASES["rand-sym-pd"].b
    assert torch.allclose(A @ (Ainv @ v), v, atol=1e-9)
    assert Ainv.last_result.converged and Ainv.symmetric
    assert Ainv.inverse() is not None and torch.allclose(Ainv.inverse() @ v, A @ v)


# ---------------------------------------------------------------- float32 stagnation
POISSON_SCIPY_PRODUCTS = {"1d": 40, "2d": 87}  # SciPy cg, float32, rtol 1e-5 (bench_conformance)


@pytest.mark.parametrize("dim", ["1d", "2d"])
@pytest.mark.parametrize("method", ["cg", "minres"])
def test_float32_stagnation_stops_early_with_the_best_iterate(method, dim):
    A64 = poisson1d(40) if dim == "1d" else poisson2d(40)
    A = A64.float()
    b = torch.arange(A.shape[0], dtype=torch.float32)
    seen = []

    def watch(x):
        seen.append(true_residual(A, x, b))

    res = run(method, A, b, tol=1e-5, callback=watch)
    assert_honest(res, A, b, 1e-5)
    assert res.matvecs <= 3 * POISSON_SCIPY_PRODUCTS[dim]
    if not res.converged:
        assert "stagnated" in res.message and res.info["stagnated"]
    returned = true_residual(A, res.x, b)
    assert returned <= 1.5 * min(seen)  # the best iterate, up to the float32 noise of the check
    # the solver measures its residual with the operator's own float32 product, which is
    # exact to about eps ||A|| ||x||; the reported figure must agree with the truth to that
    noise = (
        20
        * torch.finfo(torch.float32).eps
        * (float(torch.linalg.matrix_norm(A64, 2)) * float(res.x.double().norm()) + float(b.norm()))
    )
    assert abs(res.info["true_residual"] - returned) <= noise
