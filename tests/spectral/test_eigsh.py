"""eigsh: block Lanczos with thick restarts, against torch.linalg.eigh."""

from __future__ import annotations

import pytest
import torch

import second
from second import ConvergenceWarning
from second.spectral import COPY_CHECK_STEPS, EigshResult, eigsh

EIG_TOL = 1e-8  # eigenvalue error allowed at tol=1e-10 (float64)
EIGENVALUE_CRITERION_TOL = 1e-3  # the relative eigenvalue accuracy


def sym(n, seed=0, spectrum=None):
    g = torch.Generator().manual_seed(seed)
    if spectrum is None:
        M = torch.randn(n, n, generator=g, dtype=torch.float64)
        return M + M.T
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.as_tensor(spectrum, dtype=torch.float64)) @ Q.T
    return 0.5 * (A + A.T)


def reference(ev, k, which):
    if which == "LA":
        return ev[-k:]
    if which == "SA":
        return ev[:k]
    if which == "LM":
        return ev[torch.argsort(ev.abs())[-k:]].sort().values
    return torch.cat([ev[: k // 2], ev[len(ev) - (k - k // 2) :]])


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("k", [1, 4])
def test_against_eigh(which, k):
    spectrum = torch.cat([-torch.logspace(0, 1.7, 20), torch.logspace(-1, 2, 40)])  # no tie in |.|
    A = sym(60, spectrum=spectrum)
    ev = torch.linalg.eigvalsh(A)
    res = eigsh(A, k=k, which=which, tol=1e-10, return_result=True)
    assert isinstance(res, EigshResult) and res.converged
    torch.testing.assert_close(res.eigenvalues, reference(ev, k, which), rtol=0, atol=EIG_TOL)
    V = res.eigenvectors
    assert torch.allclose(A @ V, V * res.eigenvalues, atol=1e-7)  # they are eigenpairs
    assert torch.allclose(V.T @ V, torch.eye(k, dtype=V.dtype), atol=1e-8)


def test_multiplicity_is_seen():
    vals = eigsh(torch.eye(6, dtype=torch.float64), k=3, return_eigenvectors=False)
    torch.testing.assert_close(vals, torch.ones(3, dtype=torch.float64))
    # a triple top eigenvalue among distinct ones
    A = sym(30, spectrum=[5.0, 5.0, 5.0] + torch.linspace(0.1, 3.0, 27).tolist())
    vals = eigsh(A, k=4, which="LA", tol=1e-10, return_eigenvectors=False)
    torch.testing.assert_close(vals, torch.tensor([3.0, 5.0, 5.0, 5.0], dtype=torch.float64))


def test_smallest_of_low_rank_matrices_are_zeros():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(8, 2, generator=g, dtype=torch.float64)
    vals = eigsh(U @ U.T, k=4, which="SA", return_eigenvectors=False)
    torch.testing.assert_close(vals, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-10)
    U = torch.randn(300, 45, generator=g, dtype=torch.float64)  # rank 45 of 300, like a GGN
    res = eigsh(U @ U.T, k=6, which="SA", return_result=True)
    assert res.converged
    assert float(res.eigenvalues.abs().max()) <= 1e-6 * float(torch.linalg.matrix_norm(U, 2)) ** 2


def test_passes_count_block_products():
    A = sym(50, spectrum=torch.linspace(1.0, 50.0, 50).tolist())
    calls = []

    def mm(V):
        calls.append(V.shape[1])
        return A @ V

    def mv(v):  # a block of one column (the basis filled up to ncv) goes by the vector path
        calls.append(1)
        return A @ v

    op = second.CallableOperator(mv, 50, torch.float64, matmat=mm)
    res = eigsh(op, k=3, block_size=3, return_result=True)
    assert res.passes == len(calls) and res.matvecs == sum(calls)


def test_uncertified_pairs_are_reported():
    A = sym(200, seed=3)  # a semicircle spectrum: no gaps, slow convergence
    with pytest.warns(ConvergenceWarning, match="certified"):
        res = eigsh(A, k=5, maxiter=20, return_result=True)
    assert not res.converged and not all(res.certified)
    assert res.matvecs <= 20 + 5  # stops at the first block past the limit


def test_hessian_operator_of_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model.double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    H = second.HessianOperator(model, torch.nn.MSELoss(), (X, y))
    ev = torch.linalg.eigvalsh(H.to_dense())
    vals = eigsh(H, k=3, which="BE", tol=1e-10, return_eigenvectors=False)
    torch.testing.assert_close(vals, reference(ev, 3, "BE"), rtol=0, atol=1e-8)


class CountingLoader:
    """A fixed list of batches that counts the examples read from it."""

    def __init__(self, X, y, batch):
        self.batches = [(X[i : i + batch], y[i : i + batch]) for i in range(0, len(X), batch)]
        self.n, self.examples = len(X), 0

    def __iter__(self):
        for b in self.batches:
            self.examples += len(b[0])
            yield b

    def __len__(self):
        return len(self.batches)


def small_hessian(n=40, batch=10):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model.double()
    X, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    loader = CountingLoader(X, y, batch)
    H = second.HessianOperator(model, torch.nn.CrossEntropyLoss(), loader)
    return H, loader


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("k", [1, 3])
def test_eigenvalue_criterion_meets_its_tolerance_in_fewer_products(which, k):
    spectrum = torch.cat([-torch.logspace(0, 1.5, 20), torch.logspace(-1, 2, 80)])
    A = sym(100, spectrum=spectrum)
    want = reference(torch.linalg.eigvalsh(A), k, which)
    scale = float(spectrum.abs().max())
    tol = EIGENVALUE_CRITERION_TOL
    fast = eigsh(A, k=k, which=which, tol=tol, criterion="eigenvalue", return_result=True)
    strict = eigsh(A, k=k, which=which, tol=tol, return_result=True)
    assert fast.converged and fast.info["criterion"] == "eigenvalue"
    err = (fast.eigenvalues - want).abs()
    assert float(err.max()) <= tol * scale
    # the reported bounds hold and are what certified the pairs
    assert all(e <= b * (1 + 1e-6) + 1e-12 for e, b in zip(err.tolist(), fast.error_bounds))
    assert all(b <= tol * scale for b in fast.error_bounds)
    assert fast.matvecs < strict.matvecs


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spectrum", ["flat", "semicircle"])
def test_eigenvalue_criterion_on_spectra_without_a_gap(spectrum, seed):
    # Ritz values alone overstate the gap here; the neighbours' residuals correct it
    if spectrum == "flat":
        A = sym(300, seed=seed, spectrum=torch.linspace(0.0, 1.0, 300).tolist())
    else:
        A = sym(300, seed=seed)
    ev = torch.linalg.eigvalsh(A)
    tol, scale = 1e-2, float(ev.abs().max())
    res = eigsh(A, k=1, tol=tol, criterion="eigenvalue", return_result=True)
    assert res.converged and float((res.eigenvalues - ev[-1:]).abs().max()) <= tol * scale


def test_top_eigenvalue_uses_block_size_one_by_default():
    A = sym(60, spectrum=torch.logspace(-2, 1, 60).tolist())
    res = eigsh(A, k=1, return_result=True)
    assert res.info["block_size"] == 1 and res.passes == res.matvecs
    res = eigsh(A, k=3, return_result=True)  # k > 1: a block as wide as k, no check needed
    assert res.info["block_size"] == 3 and res.info["copy_check"] == 0
    res = eigsh(A, k=3, block_size=1, return_result=True)  # one vector: with the copy check
    assert res.info["block_size"] == 1 and res.info["copy_check"] == COPY_CHECK_STEPS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_copy_check_finds_a_copy_a_single_vector_misses(seed, monkeypatch):
    # a triple top eigenvalue above a spectrum in [0, 1): one Krylov vector certifies 2, 2 and
    # the largest of the rest; the check from a fresh vector finds the third copy
    g = torch.Generator().manual_seed(100 + seed)
    A = sym(100, seed, [2.0, 2.0, 2.0] + torch.rand(97, generator=g, dtype=torch.float64).tolist())
    ref = torch.linalg.eigvalsh(A)[-3:]
    with monkeypatch.context() as m:
        m.setattr("second.spectral._eigsh.COPY_CHECK_STEPS", 0)  # plain single-vector Lanczos
        plain = eigsh(A, k=3, block_size=1, criterion="eigenvalue", tol=1e-3, return_result=True)
    assert float((plain.eigenvalues - ref).abs().max()) > 0.5  # the failure the check is for
    res = eigsh(A, k=3, block_size=1, criterion="eigenvalue", tol=1e-3, return_result=True)
    assert res.converged and res.info["copies_found"] >= 1
    assert float((res.eigenvalues - ref).abs().max()) <= 1e-3 * 2.0
    assert res.matvecs <= plain.matvecs + 4 * COPY_CHECK_STEPS


@pytest.mark.parametrize("k, block_size", [(1, None), (2, 1), (2, 2)])
def test_data_passes_are_counted_by_a_counting_loader(k, block_size):
    H, loader = small_hessian()
    res = eigsh(H, k=k, block_size=block_size, tol=1e-8, criterion="eigenvalue", return_result=True)
    ref = reference(torch.linalg.eigvalsh(H.to_dense()), k, "LA")
    torch.testing.assert_close(res.eigenvalues, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    loader.examples = 0
    res = eigsh(H, k=k, block_size=block_size, tol=1e-8, criterion="eigenvalue", return_result=True)
    # every block product reads the data once; a data pass is one product's worth of it
    assert loader.examples == res.passes * loader.n
    assert res.data_passes == res.matvecs == res.passes * res.info["block_size"]


def test_trace_data_passes_with_a_counting_loader():
    H, loader = small_hessian()
    loader.examples = 0
    est = second.trace(H, 12, method="hutchinson", return_result=True)
    assert loader.examples == est.passes * loader.n  # one block of 12 columns: one read
    assert est.data_passes == est.matvecs == 12


def test_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        eigsh(torch.eye(3, dtype=torch.float64), k=4)
    with pytest.raises(ValueError, match="which"):
        eigsh(torch.eye(3, dtype=torch.float64), k=1, which="XX")
    with pytest.raises(ValueError, match="criterion"):
        eigsh(torch.eye(3, dtype=torch.float64), k=1, criterion="ritz")
    with pytest.raises(ValueError, match="symmetric"):
        eigsh(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64), k=1)


FLOAT32_EIG_RTOL = 1e-5  # eigenvalues from float32 products, against float64 eigvalsh


def test_a_tolerance_below_the_products_rounding_level_stops_early_and_says_so():
    """float32 products cannot resolve tol 1e-9: eigsh stops once the bounds stop falling
    (uncertified, with a warning naming the dtype) instead of spending 20 n products."""
    g = torch.Generator().manual_seed(0)
    n = 400
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    A = ((Q * evals) @ Q.T).float()
    with pytest.warns(ConvergenceWarning, match="stagnated .* torch.float32"):
        res = eigsh(A, k=2, tol=1e-9, return_result=True)
    assert not res.converged and res.matvecs < 20 * n // 4
    top = torch.linalg.eigvalsh(A.double())[-2:]
    torch.testing.assert_close(res.eigenvalues.double(), top, rtol=FLOAT32_EIG_RTOL, atol=0)
    # the same in float64 converges
    res64 = eigsh(A.double(), k=2, tol=1e-9, return_result=True)
    assert res64.converged


def test_many_pairs_with_one_vector_match_the_dense_eigenvalues():
    # k = 16: Rayleigh-Ritz every k // RITZ_EVERY_PAIRS = 2 products; the same answer
    A = sym(120, seed=3, spectrum=torch.logspace(-3, 1, 120).tolist())
    ev = torch.linalg.eigvalsh(A)
    res = eigsh(A, k=16, block_size=1, tol=1e-10, return_result=True)
    assert res.converged and res.info["block_size"] == 1 and res.passes == res.matvecs
    torch.testing.assert_close(res.eigenvalues, ev[-16:], rtol=0, atol=EIG_TOL)
    V = res.eigenvectors
    assert torch.allclose(A @ V, V * res.eigenvalues, atol=1e-8)


@pytest.mark.parametrize("n, k", [(26, 20), (10, 7), (30, 12)])
@pytest.mark.parametrize("block", [None, "k"])
def test_many_pairs_of_a_small_operator(n, k, block):
    # a block as wide as k with n < 2k: the basis fills up to n with a partial block (the
    # thick restart used to keep nothing there and ran to the product limit, uncertified)
    A = sym(n, seed=n, spectrum=torch.logspace(-2, 1, n).tolist())
    res = eigsh(A, k=k, block_size=k if block else None, tol=1e-8, return_result=True)
    assert res.converged and res.matvecs <= 2 * n
    torch.testing.assert_close(
        res.eigenvalues, torch.linalg.eigvalsh(A)[-k:], rtol=0, atol=1e-7 * 10
    )


@pytest.mark.parametrize("mult", [2, 3])
def test_the_default_block_sees_copies_close_to_the_rest_of_the_spectrum(mult):
    # a repeated top eigenvalue 5% of the spread above a continuum: one Krylov vector (even
    # with the copy check) misses copies here; the default block as wide as k does not
    n = 200
    spectrum = [1.05] * mult + torch.linspace(0, 1, n - mult).tolist()
    for seed in range(3):
        A = sym(n, seed=seed, spectrum=spectrum)
        res = eigsh(A, k=mult, return_result=True, generator=torch.Generator().manual_seed(seed))
        assert res.converged and res.info["block_size"] == mult
        torch.testing.assert_close(
            res.eigenvalues, torch.full((mult,), 1.05, dtype=torch.float64), rtol=0, atol=1e-6
        )


def test_the_copy_check_compares_the_wanted_values_as_a_set():
    # which="LM" on a spectrum symmetric about 0: +s and -s trade places in the order by |s| at
    # rounding level; that is no move (it used to restart the check 64 times)
    g = torch.Generator().manual_seed(0)
    m = 60
    B = torch.randn(m, m, generator=g, dtype=torch.float64)
    A = torch.zeros(2 * m, 2 * m, dtype=torch.float64)
    A[:m, m:], A[m:, :m] = B, B.T
    res = eigsh(A, k=6, which="LM", block_size=1, tol=1e-8, return_result=True)
    ev = torch.linalg.eigvalsh(A)
    ref = ev[ev.abs().argsort()[-6:]].sort().values
    assert res.converged and res.info["copies_found"] == 0
    torch.testing.assert_close(res.eigenvalues, ref, rtol=0, atol=1e-6)


def test_the_product_limit_during_the_copy_check_is_reported_as_such():
    A = sym(50, spectrum=torch.linspace(0.1, 10, 50).tolist())
    full = eigsh(A, k=2, block_size=1, tol=1e-6, return_result=True)
    res = eigsh(
        A, k=2, block_size=1, tol=1e-6, maxiter=full.matvecs - 2, return_result=True, warn=False
    )
    assert "during the copy check" in res.message and not res.info["copy_check_complete"]
    assert full.info["copy_check_complete"]


@pytest.mark.parametrize("block_size", [1, 3])
def test_a_long_float32_basis_stays_orthonormal_and_its_ritz_values_in_the_spectrum(block_size):
    # inner products over 400k float32 entries are good to ~1e-4 relative only; the
    # basis is orthonormalized and projected with float64 accumulation, so its Ritz values
    # stay within float32 rounding of the spectrum (before: a Ritz value above the largest
    # eigenvalue and an eigenvalue-criterion estimate 2e-3 off at 1e-3 on a 10M-parameter CNN)
    n = 400_000
    d = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 5.0
    top = torch.tensor([30.0, 9.25, 7.0])
    d[:3] = top
    op = second.CallableOperator(lambda v: d * v, n, torch.float32, matmat=lambda V: d[:, None] * V)
    res = eigsh(
        op, k=3, which="LA", tol=1e-4, block_size=block_size, return_result=True, warn=False
    )
    assert res.converged
    Y = res.eigenvectors.to(torch.float64)
    torch.testing.assert_close(Y.T @ Y, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-5)
    vals = res.eigenvalues.to(torch.float64)
    assert bool((vals <= top.max().double() * (1 + 1e-6)).all())
    torch.testing.assert_close(vals, top.sort().values.double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_operators(dtype):
    # the share of a direction's norm below which it counts as vanished is capped at 1e-2
    # (1e3 eps would discard every Krylov direction of a half-precision operator)
    d = torch.rand(200, generator=torch.Generator().manual_seed(0))
    d[:3] = torch.tensor([3.0, 2.5, 2.0])
    res = eigsh(torch.diag(d).to(dtype), k=3, tol=3e-2, return_result=True, warn=False)
    assert res.converged and res.matvecs <= 30
    torch.testing.assert_close(
        res.eigenvalues.float(), torch.tensor([2.0, 2.5, 3.0]), rtol=1e-2, atol=0
    )


def test_a_basis_of_the_whole_space_certifies_only_pairs_that_meet_tol():
    """float32, n = 30, tol 1e-10: every pair was certified "exact" with bounds 1000x tol."""
    n = 30
    A = sym(n, spectrum=torch.linspace(1.0, 2.0, n)).float()
    with pytest.warns(ConvergenceWarning, match="spans R\\^30.*below what torch.float32"):
        res = eigsh(A, k=3, tol=1e-10, return_result=True)
    assert not any(res.certified) and not res.converged
    for bound, ok in zip(res.error_bounds, res.certified):
        assert ok == (bound <= 1e-10 * float(res.eigenvalues.abs().max()))
    # a tolerance float32 resolves: certified, from the same whole-space basis
    res = eigsh(A, k=3, tol=1e-4, return_result=True)
    assert res.converged
    top = torch.linalg.eigvalsh(A.double())[-3:]
    torch.testing.assert_close(res.eigenvalues.double(), top, rtol=FLOAT32_EIG_RTOL, atol=0)
    # float64 at the default tolerance: exact
    res = eigsh(A.double(), k=3, ncv=n, return_result=True)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, top, rtol=0, atol=EIG_TOL)


NONSYMMETRIC = [[1.0, 5.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]  # eigenvalues 1, 2, 3


def test_a_nonsymmetric_scipy_operator_or_callable_is_refused():
    """SciPy operators and callables are declared symmetric when wrapped: eigsh certified 6.56."""
    import numpy as np
    import scipy.sparse.linalg as sla

    M = np.array(NONSYMMETRIC)
    T = torch.tensor(NONSYMMETRIC, dtype=torch.float64)
    for A in (sla.aslinearoperator(M), second.aslinearoperator(lambda v: T @ v, 3, dtype=T.dtype)):
        for k, block in ((1, None), (2, None), (2, 1)):
            with pytest.raises(ValueError, match="eigsh needs a symmetric operator"):
                eigsh(A, k=k, block_size=block)
    # a symmetric SciPy operator is not a false alarm (float32 and float64)
    S = sym(50, seed=3)
    for dtype in (np.float64, np.float32):
        vals = eigsh(sla.aslinearoperator(S.numpy().astype(dtype)), k=2, return_eigenvectors=False)
        torch.testing.assert_close(vals, torch.linalg.eigvalsh(S)[-2:], rtol=1e-5, atol=0)


def test_a_nonsymmetric_operator_past_the_probe_is_not_certified(monkeypatch):
    """The whole-space basis alone used to certify; now the residuals must meet tol too."""
    import scipy.sparse.linalg as sla

    from second.spectral import _eigsh

    monkeypatch.setattr(_eigsh, "check_symmetric_basis", lambda *a, **k: None, raising=False)
    with pytest.warns(ConvergenceWarning, match="likely not symmetric"):
        res = eigsh(
            sla.aslinearoperator(torch.tensor(NONSYMMETRIC).numpy()), k=1, return_result=True
        )
    assert not res.converged and res.certified == [False]


def test_eigenvectors_are_orthonormal_with_a_null_space_that_fills_the_basis():
    # a 10-dimensional null space: the basis grows columns nearly in its own span, whose
    # rounding along it the normalization multiplies; the second orthonormalization pass
    # keeps the eigenvectors orthonormal to the working precision (it was 3.7e-6 in float64)
    g = torch.Generator().manual_seed(0)
    n = 30
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.cat(
        [torch.zeros(10, dtype=torch.float64), torch.linspace(1, 2, 20, dtype=torch.float64)]
    )
    A = Q @ torch.diag(spectrum) @ Q.T
    res = second.eigsh(A, k=3, which="SA", return_result=True)
    V = res.eigenvectors
    assert res.converged
    assert float((V.T @ V - torch.eye(3, dtype=V.dtype)).abs().max()) < 1e-12
    assert float((A @ V).norm()) < 1e-12
