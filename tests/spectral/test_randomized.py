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
    plain = diagonal(A, 50, return_result=True)
    cv = diagonal(A, 50, control=C, return_result=True)
    cv_given = diagonal(A, 50, control=(C, torch.diagonal(C)), return_result=True)
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


def test_spectral_density_standard_error_covers_the_truth():
    from second.spectral import spectral_density

    A = decaying(decades=1)
    ev = torch.linalg.eigvalsh(A)
    res = spectral_density(A, num_probes=30, lanczos_steps=40, grid=50, return_result=True)
    sigma = 0.01 * float(res.nodes.max() - res.nodes.min())
    true = torch.exp(-0.5 * ((res.grid[:, None] - ev[None]) / sigma) ** 2).sum(1)
    true = true / (len(ev) * sigma * (2 * torch.pi) ** 0.5)
    z = (res.density - true).abs() / res.std_error.clamp_min(1e-12)
    assert float((z < 4).double().mean()) > 0.9
    assert res.matvecs == 30 * 40
