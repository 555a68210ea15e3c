"""The Newton core's deprecated spellings: each still works, warns naming the glossary's name,
and gives the same result, to the bit, as the new spelling."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from second._errors import SecondDeprecationWarning
from second.newton import (
    RCOND,
    InnerCGResult,
    LineSearchResult,
    SubproblemResult,
    cg_subproblem,
    damped_solve,
    dense_newton_direction,
    exact_trust_region,
    model_cg,
    steihaug_cg,
    strong_wolfe,
    truncated_cg,
)
from second.newton.trust_region import SteihaugPath

DT = torch.float64


def system(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=gen, dtype=DT)
    return B @ B.T + 0.1 * torch.eye(n, dtype=DT), torch.randn(n, generator=gen, dtype=DT)


def _solvers():
    H, g = system()

    def hvp(v):
        return H @ v

    return {
        "truncated_cg": lambda **t: truncated_cg(hvp, g, maxiter=3, **t),
        "steihaug_cg": lambda **t: steihaug_cg(hvp, g, 10.0, maxiter=3, **t),
        "exact_trust_region": lambda **t: exact_trust_region(H, g, 0.5, **t),
        "cg_subproblem": lambda **t: cg_subproblem(hvp, g, maxiter=3, **t)(0.5),
        "damped_solve": lambda **t: damped_solve(g, 0.1, gvp=hvp, maxiter=3, **t),
        "model_cg": lambda **t: model_cg(hvp, g, maxiter=3, **t),
    }


def _same(a, b) -> bool:
    """Equal to the bit: tensors by ``torch.equal``, records field by field."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, SteihaugPath):  # the stored CG path: its segments
        return _same(list(vars(a).values()), list(vars(b).values()))
    return a == b


@pytest.mark.parametrize("name", list(_solvers()))
def test_rtol_is_the_deprecated_spelling_of_tol(name):
    run = _solvers()[name]
    new = run(tol=1e-3)
    with pytest.warns(SecondDeprecationWarning, match=rf"{name}\(rtol=\.\.\.\).*use tol=") as rec:
        old = run(rtol=1e-3)
    assert rec[0].filename == __file__  # the warning points at the caller's line
    assert _same(old, new)
    with pytest.raises(ValueError, match="pass tol only"):
        with pytest.warns(SecondDeprecationWarning):
            run(rtol=1e-3, tol=1e-4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        run(tol=1e-3, bogus=1)


def test_tol_stays_required_where_it_was():
    H, g = system()
    for fn in (truncated_cg, cg_subproblem):
        with pytest.raises(TypeError, match="missing required keyword argument 'tol'"):
            fn(lambda v: H @ v, g, maxiter=3)


def test_subproblem_result_hvps_is_matvecs():
    H, g = system()
    res = steihaug_cg(lambda v: H @ v, g, 10.0, tol=1e-12)
    assert res.matvecs > 0
    with pytest.warns(SecondDeprecationWarning, match=r"SubproblemResult\.hvps.*\.matvecs"):
        assert res.hvps == res.matvecs
    with pytest.warns(SecondDeprecationWarning, match=r"SubproblemResult\(hvps=.*matvecs="):
        built = SubproblemResult(res.step, 1.0, 2.0, "exact", 3, hvps=4)
    assert built == SubproblemResult(res.step, 1.0, 2.0, "exact", 3, matvecs=4)
    assert [f.name for f in dataclasses.fields(built)].count("hvps") == 0
    assert dataclasses.replace(built, status="boundary").matvecs == 4  # no warning


def test_inner_cg_result_products_is_matvecs():
    H, g = system()
    res = model_cg(lambda v: H @ v, g, tol=1e-12)
    assert isinstance(res, InnerCGResult) and res.matvecs > 0
    with pytest.warns(SecondDeprecationWarning, match=r"InnerCGResult\.products.*\.matvecs"):
        assert res.products == res.matvecs


def test_line_search_result_success_is_converged():
    res = strong_wolfe(lambda t: ((t - 3) ** 2, 2 * (t - 3), None), 9.0, -6.0)
    assert isinstance(res, LineSearchResult) and res.converged
    with pytest.warns(SecondDeprecationWarning, match=r"LineSearchResult\.success.*\.converged"):
        assert res.success is res.converged


def test_dense_newton_direction_floors_at_rcond():
    H = torch.diag(torch.tensor([1.0, 1e-12, -2.0], dtype=DT))
    g = torch.ones(3, dtype=DT)
    assert _same(dense_newton_direction(H, g), dense_newton_direction(H, g, rcond=RCOND))
    d, _ = dense_newton_direction(H, g)
    assert float(d[1]) == pytest.approx(-1.0 / (RCOND * 2.0))  # floor: rcond max|lambda|
