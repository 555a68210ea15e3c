"""XTrace, XDiag, standard errors, control variates and the Frobenius norm estimate."""

from __future__ import annotations

import pytest
import torch

from second.spectral import Estimate, diagonal, frobenius_norm, trace

SEEDS = range(40)
Z_LIMIT = 4.5  # |mean error| over 40 seeds within 4.5 standard errors of that mean


def low_rank(n=120, r=4, seed=0):
    L = torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return L @ L.T


def decaying(n=150, seed=0, decades=4):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.logspace(0, -decades, n, dtype=torch.float64)) @ Q.T


def test_xtrace_and_xdiag_are_exact_below_their_rank():
    A = low_rank()
    est = trace(A, 12, method="xtrace", return_result=True)
    assert isinstance(est, Estimate) and est.matvecs == 12 and est.passes == 2
    assert torch.isclose(est.value, torch.trace(A), rtol=1e-10)
    d = diagonal(A, 12, method="xdiag", return_result=True)
    assert torch.allclose(d.value, torch.diagonal(A), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_estimates_are_unbiased_with_honest_standard_errors(method):
    A = decaying()
    true = float(torch.trace(A))
    errs, ses = [], []
    for s in SEEDS:
        e = trace(A, 30, method, generator=torch.Generator().manual_seed(s), return_result=True)
        errs.append(float(e.value) - true)
        ses.append(float(e.std_error))
    errs = torch.tensor(errs)
    sem = float(errs.std()) / len(errs) ** 0.5
    assert abs(float(errs.mean())) <= Z_LIMIT * sem  # unbiased
    rmse, mean_se = float(errs.pow(2).mean().sqrt()), sum(ses) / len(ses)
    assert 0.3 * rmse <= mean_se <= 3.0 * rmse  # the reported error is of the right size


def test_xtrace_beats_hutchinson_on_a_fast_decaying_spectrum():
    A = decaying(decades=8)
    true = float(torch.trace(A))

    def rmse(method):
        e = [
            float(trace(A, 40, method, generator=torch.Generator().manual_seed(s))) - true
            for s in SEEDS
        ]
        return float(torch.tensor(e).pow(2).mean().sqrt())

    assert rmse("xtrace") < 0.5 * rmse("hutchinson")


def test_diagonal_control_variate_shrinks_the_error():
    A = decaying(decades=2)
    C = A + 0.01 * low_rank(150, 3, seed=5) / 150  # a close operator with a known diagonal
    d = torch.diagonal(A)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (the same probes each time)
    plain = diagonal(A, 50, generator=g(), return_result=True)
    cv = diagonal(A, 50, control=C, generator=g(), return_result=True)
    cv_given = diagonal(A, 50, control=(C, torch.diagonal(C)), generator=g(), return_result=True)
    assert torch.allclose(cv.value, cv_given.value)
    err_plain = float((plain.value - d).norm() / d.norm())
    err_cv = float((cv.value - d).norm() / d.norm())
    assert err_cv < 0.1 * err_plain
    # per-entry standard errors are reported and of the right size
    z = ((cv.value - d) / cv.std_error.clamp_min(1e-300)).abs()
    assert float((z < 4).double().mean()) > 0.95


def test_frobenius_norm():
    A = decaying(decades=1)
    est = frobenius_norm(A, 400, return_result=True)
    true = float(torch.linalg.matrix_norm(A))
    assert abs(float(est.value) - true) <= 5 * float(est.std_error)
    assert est.matvecs == 400 and est.passes == 1


def test_exact_methods_report_zero_error_and_bad_methods_raise():
    A = low_rank(20, 3)
    est = trace(A, method="exact", return_result=True)
    assert float(est.std_error) == 0 and est.method == "exact"
    with pytest.raises(ValueError, match="xtrace"):
        trace(A, method="nope")
    with pytest.raises(ValueError, match="xdiag"):
        diagonal(A, method="nope")


def nonsymmetric_low_rank(n=60, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(n, r, generator=g, dtype=torch.float64)
    return L @ torch.randn(r, n, generator=g, dtype=torch.float64)


def test_xdiag_and_xtrace_refuse_a_nonsymmetric_operator():
    """Their leave-one-out formulas take A = A^T: xdiag was biased by 43 of its standard errors."""
    import scipy.sparse.linalg as sla

    M = nonsymmetric_low_rank()
    with pytest.raises(ValueError, match="'xdiag' needs a symmetric operator.*hutchinson"):
        diagonal(M, 20, method="xdiag")
    with pytest.raises(ValueError, match="'xtrace' needs a symmetric operator.*hutchinson"):
        trace(M, 20, method="xtrace")
    # a SciPy operator is declared symmetric when wrapped: the kept products show it is not
    for call in (
        lambda: diagonal(sla.aslinearoperator(M.numpy()), 20, method="xdiag"),
        lambda: trace(sla.aslinearoperator(M.numpy()), 20, method="xtrace"),
    ):
        with pytest.raises(ValueError, match="needs a symmetric operator, and this one is not"):
            call()
    # hutchinson handles it, unbiased (the z-test of the symmetric case)
    d = torch.diagonal(M)
    runs = torch.stack([diagonal(M, 20, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    z = (runs.mean(0) - d) / (runs.std(0) / len(SEEDS) ** 0.5)
    assert float(z.abs().max()) < Z_LIMIT
    # a symmetric SciPy operator passes the probe, and its low rank is still exact
    S = low_rank(60, 3)
    est = diagonal(sla.aslinearoperator(S.numpy()), 12, method="xdiag")
    torch.testing.assert_close(est, torch.diagonal(S), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [1, 5, 30])
def test_xdiag_and_xtrace_with_a_budget_beyond_the_space_are_exact(n):
    """The default budget (100) on n < 50 crashed in linalg.inv."""
    A = low_rank(n, min(n, 3)) + torch.eye(n, dtype=torch.float64)
    for m in (1, 3, 100):
        d = diagonal(A, m, method="xdiag", return_result=True)
        if d.method == "exact":
            torch.testing.assert_close(d.value, torch.diagonal(A), rtol=1e-12, atol=1e-12)
            assert float(d.std_error.abs().max()) == 0
        t = trace(A, m, method="xtrace", return_result=True)
        if t.method == "exact":
            torch.testing.assert_close(t.value, torch.trace(A), rtol=1e-12, atol=1e-12)
    assert diagonal(A, 100, method="xdiag", return_result=True).method == "exact"


def test_without_a_generator_the_probes_follow_torch_manual_seed():
    """They were seeded 0 on every call: repeated calls gave one value, whatever the seed."""
    A = decaying(decades=1)
    values = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        values.append(
            [
                float(trace(A, 10, "hutchinson")),
                float(diagonal(A, 10)[0]),
                float(frobenius_norm(A, 5)),
                float(trace(A, 10, "xtrace")),
            ]
        )
    assert values[0] == values[2]  # reproducible from the global seed
    assert all(a != b for a, b in zip(values[0], values[1]))  # and follows it
    torch.manual_seed(0)
    first, second = float(trace(A, 10, "hutchinson")), float(trace(A, 10, "hutchinson"))
    assert first != second  # repeated calls draw new probes


def test_a_single_random_term_has_an_unknown_standard_error():
    """0 is reserved for exact methods; one Hutchinson term has no spread to measure."""
    A = decaying(decades=1)
    for est in (
        trace(A, 1, "hutchinson", return_result=True),
        trace(A, 2, "hutch++", return_result=True),
        diagonal(A, 1, return_result=True),
        frobenius_norm(A, 1, return_result=True),
    ):
        assert bool(torch.isnan(est.std_error).all()), est
    assert float(trace(A, 2, "hutchinson", return_result=True).std_error) > 0
