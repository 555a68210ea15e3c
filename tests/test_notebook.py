"""The seed notebook's own steps, run through ``from second import *``, checked in float64.

``NOTEBOOK`` is the notebook's code cells, verbatim except for one line: cell [30]
called ``torch.eig``, which torch removed in 2.0; it uses ``torch.linalg.eigvalsh``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import second
from conftest import PRODUCT_TOL, SOLVE_TOL
from dense_reference import assert_close, ref_gradient, ref_hessian
from second import NegativeCurvatureWarning

NOTEBOOK = [
    # In [2]
    """
import torch
import torch.nn as nn
from torch.autograd import grad
from second import *
""",
    # In [3]
    '''
def conjugate_gradient(mvp, vector, parameters, cg_iter=10, eps=0.):
    """
    Conjugate gradient method
    """
    x = vector.clone().detach()
    # residual
    r = vector.clone().detach() - mvp(x)
    p = r.clone().detach()
    for _ in range(cg_iter):
        Ap = mvp(p)
        alpha = (r @ r) / (p @ Ap + eps)
        x = x + alpha * p
        r_new = r - alpha * Ap
        beta = (r_new @ r_new) / (r @ r + eps)
        p = r_new + beta * p
        r = r_new.clone().detach()
    return x
''',
    # In [4]
    """
input_dim = 3
output_dim = 1
model = nn.Sequential(
    nn.Linear(input_dim, 5),
    nn.Sigmoid(),
    nn.Linear(5, output_dim)
)

x = torch.randn(10, input_dim)
y = torch.randn(10, output_dim)
criterion = nn.MSELoss()
""",
    # In [5]
    """
def cg_mvp(vector):
    return hvp(loss, tuple(model.parameters()), vector)
    # return gvp(loss, logit, tuple(model.parameters()), vector)
""",
    # In [6]
    """
logit = model(x)
loss = criterion(logit, y)
gradient = grad(loss,tuple(model.parameters()), retain_graph=True)
cg_inv_hvp = conjugate_gradient(cg_mvp, vector=parameters_to_vector(gradient), parameters=tuple(model.parameters()), cg_iter=40)
""",
    # In [7]
    """
def exact_hessian(loss, parameters):
    gradient = grad(
        loss,
        parameters,
        create_graph=True,
        retain_graph=True
    )
    gradient = parameters_to_vector(gradient)
    hessian = torch.zeros((gradient.numel(), gradient.numel()))
    for i in range(gradient.numel()):
        H_i = grad(
            gradient[i],
            parameters,
            retain_graph=True
        )
        H_i = parameters_to_vector(H_i)
        hessian[i] = H_i
    return hessian
""",
    # In [8]
    """
logit = model(x)
loss = criterion(logit, y)
hessian = exact_hessian(loss, tuple(model.parameters()))
""",
    # In [9]
    """
exact_inv_hvp = torch.inverse(hessian) @ parameters_to_vector(gradient)
""",
    # In [30] (torch.eig was removed from torch; eigvalsh is its symmetric replacement)
    """
values = torch.linalg.eigvalsh(hessian)
torch.max(values)
""",
    # In [10]
    """
relative_error = torch.norm(cg_inv_hvp - exact_inv_hvp) / torch.norm(exact_inv_hvp)
relative_error
""",
    # In [11]
    """
cosine_similarity = cg_inv_hvp @ exact_inv_hvp / (torch.norm(cg_inv_hvp) * torch.norm(exact_inv_hvp))
cosine_similarity
""",
    # In [12]
    """
def neumann(mvp, parameters, vector, truncate_iter=10):
    p = v = vector
    for _ in range(truncate_iter):
        p = v + p - mvp(p)
    return p
""",
    # In [13]
    """
nm_inv_hvp= neumann(cg_mvp, tuple(model.parameters()), vector=parameters_to_vector(gradient))
""",
    # In [65]
    """
def neuman_this_case(parameters, vector, truncate_iter=10):
    v = vector
    p = v.clone().detach()
    for i in range(truncate_iter):
        x_i = x[i]
        y_i = y[i]
        output_i = model(x_i)
        loss_i = criterion(output_i, y_i)
        p = v + p - hvp(loss, parameters, p)/4.5

    return p

nm_inv_hvp = neuman_this_case(tuple(model.parameters()), vector=parameters_to_vector(gradient))
nm_inv_hvp
""",
    # In [63]
    """
cosine_similarity = nm_inv_hvp @ exact_inv_hvp / (torch.norm(nm_inv_hvp) * torch.norm(exact_inv_hvp))
""",
]

# float32 inverse of the seed Hessian (condition number ~5e3 with this seed): its
# error is ~cond * eps32 ~ 1e-3 relative; 1e-2 leaves room for other seeds' data.
FLOAT32_INVERSE_REL_ERR = 1e-2


def run_notebook(dtype=torch.float32) -> dict:
    """Execute the cells in one namespace, as Jupyter would; return the namespace."""
    ns: dict = {"__name__": "__notebook__"}
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for cell in NOTEBOOK:
            exec(compile(cell, "<notebook>", "exec"), ns)
    finally:
        torch.set_default_dtype(old)
    return ns


def _seed_cg_reference(A: torch.Tensor, b: torch.Tensor, iters: int) -> torch.Tensor:
    # the notebook's CG loop (cell [3]) on a dense matrix
    x = b.clone()
    r = b - A @ x
    p = r.clone()
    for _ in range(iters):
        Ap = A @ p
        alpha = (r @ r) / (p @ Ap)
        x = x + alpha * p
        r_new = r - alpha * Ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


def test_star_import_gives_the_seed_names():
    ns: dict = {}
    exec("from second import *", ns)
    for name in (
        "hvp",
        "gvp",
        "jvp",
        "parameters_to_vector",
        "vector_to_parameters",
        "exact_hessian",
        "conjugate_gradient",
        "neumann",
        "fixed_point",
        "clip_grad_norm",
    ):
        assert callable(ns[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_notebook_runs_and_its_numbers_match_float64(dtype):
    ns = run_notebook(dtype)
    model, criterion, x, y = ns["model"], ns["criterion"], ns["x"], ns["y"]
    params = tuple(model.parameters())
    assert sum(p.numel() for p in params) == 26
    H64 = ref_hessian(model, criterion, x, y)
    g64 = ref_gradient(model, criterion, x, y)
    tol = PRODUCT_TOL[dtype]

    # the gradient, the notebook's loop-built Hessian, and second's vmap-built one
    assert_close(second.parameters_to_vector(ns["gradient"]), g64, tol)
    assert ns["hessian"].dtype == dtype
    assert_close(ns["hessian"], H64, tol)
    assert_close(second.exact_hessian(ns["loss"], params), H64, tol)
    # the Hessian is indefinite here: why the seed's CG is unreliable on it
    eig = torch.linalg.eigvalsh(H64)
    assert eig.min() < 0 < eig.max()
    assert float(ns["values"].max()) == pytest.approx(float(eig.max()), rel=1e-4)

    # the hvp the notebook's CG loop calls
    v = torch.randn(26, dtype=torch.float64)
    assert_close(ns["cg_mvp"](v.to(dtype)), H64 @ v, tol)

    # exact_inv_hvp = H^{-1} g
    exact = torch.linalg.solve(H64, g64)
    rel = second.relative_error(ns["exact_inv_hvp"], exact)
    assert rel < (SOLVE_TOL[dtype] if dtype == torch.float64 else FLOAT32_INVERSE_REL_ERR)

    # the notebook's CG (cell [3], hvp inside its loop) against the same loop on the dense H
    # (40 iterations of CG on an indefinite 26 x 26 matrix amplify rounding chaotically, so
    # the comparison uses the first 4, where both are still well conditioned)
    assert torch.isfinite(ns["cg_inv_hvp"]).all()
    g = second.parameters_to_vector(ns["gradient"])
    cg4 = ns["conjugate_gradient"](ns["cg_mvp"], vector=g, parameters=params, cg_iter=4)
    # float32: CG on an indefinite matrix amplifies eps32 ~1e4-fold in 4 steps here
    bound = 1e-8 if dtype == torch.float64 else 5e-2
    assert second.relative_error(cg4, _seed_cg_reference(H64, g64, 4)) < bound

    # cells [10], [11]: the notebook's error measures agree with second's
    assert float(ns["relative_error"]) == pytest.approx(
        second.relative_error(ns["cg_inv_hvp"], ns["exact_inv_hvp"]), rel=1e-4
    )

    # cell [65]: ten steps of p <- v + p - H p / 4.5, a polynomial in H
    p = g64.clone()
    for _ in range(10):
        p = g64 + p - H64 @ p / 4.5
    assert_close(ns["nm_inv_hvp"], p, tol)
    assert float(ns["cosine_similarity"]) == pytest.approx(
        second.cosine_similarity(ns["nm_inv_hvp"], ns["exact_inv_hvp"]), rel=1e-3, abs=1e-5
    )

    # cell [13] with second's seed-form neumann (the notebook shadows it with its own,
    # cell [12]): the unscaled series diverges on this indefinite Hessian, and says so
    with pytest.warns(NegativeCurvatureWarning):
        nm = second.neumann(
            ns["cg_mvp"], params, vector=second.parameters_to_vector(ns["gradient"])
        )
    assert torch.isfinite(nm).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conjugate_gradient_falls_back_to_minres_on_the_seed_hessian(dtype):
    ns = run_notebook(dtype) if dtype == torch.float64 else _quiet_notebook()
    model, loss = ns["model"], ns["loss"]
    params = tuple(model.parameters())
    g = second.parameters_to_vector(ns["gradient"])
    H64 = ref_hessian(model, ns["criterion"], ns["x"], ns["y"])
    exact = torch.linalg.solve(H64, g.double())

    def mvp(v):
        return second.hvp(loss, params, v)

    with pytest.warns(NegativeCurvatureWarning, match="MINRES"):
        x = second.conjugate_gradient(mvp, g, params, cg_iter=40)
    assert x.dtype == dtype and x.shape == g.shape
    bound = SOLVE_TOL[dtype]
    assert second.relative_error(x, exact) < bound
    assert second.cosine_similarity(x, exact) > 1 - bound
    # parameter-shaped right-hand side, the seed's keyword names
    with pytest.warns(NegativeCurvatureWarning):
        x2 = second.conjugate_gradient(
            mvp=mvp, vector=ns["gradient"], parameters=params, cg_iter=40
        )
    assert_close(x2, x, dict(rtol=0, atol=0))
    # without a fallback CG stops at the negative curvature and says so
    with pytest.warns(NegativeCurvatureWarning):
        second.conjugate_gradient(mvp, g, cg_iter=40, fallback=None)


def _quiet_notebook():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NegativeCurvatureWarning)
        return run_notebook(torch.float32)


def _spd(n=6, lam_max=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.2, lam_max, n, dtype=torch.float64)
    return Q @ torch.diag(eig) @ Q.T


def test_conjugate_gradient_on_a_positive_definite_system():
    A = _spd(8, 10.0)
    b = torch.randn(8, dtype=torch.float64)
    x = second.conjugate_gradient(lambda v: A @ v, b, cg_iter=50)
    assert second.relative_error(x, torch.linalg.solve(A, b)) < SOLVE_TOL[torch.float64]
    # eps is an explicit damping: (A + eps I) x = b
    xd = second.conjugate_gradient(lambda v: A @ v, b, cg_iter=50, eps=0.5)
    expected = torch.linalg.solve(A + 0.5 * torch.eye(8, dtype=torch.float64), b)
    assert second.relative_error(xd, expected) < SOLVE_TOL[torch.float64]
    # too few iterations is reported
    with pytest.warns(second.ConvergenceWarning):
        second.conjugate_gradient(lambda v: A @ v, b, cg_iter=2)


def test_neumann_seed_form_converges_on_a_positive_definite_system():
    A = _spd(6, 1.5)  # spectrum in (0, 2): the unscaled series converges
    b = torch.randn(6, dtype=torch.float64)
    params = (torch.zeros(2, 3, dtype=torch.float64, requires_grad=True),)
    x = second.neumann(lambda v: A @ v, params, vector=b, truncate_iter=200)
    assert second.relative_error(x, torch.linalg.solve(A, b)) < 1e-8
    # positional seed call, and truncation: K terms give the partial sum sum_{i<=K} (I - A)^i b;
    # a series still converging is the truncation asked for and does not warn (one that goes
    # wrong does: the indefinite and too-small-scale tests)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x3 = second.neumann(lambda v: A @ v, params, b, 3)
    I = torch.eye(6, dtype=torch.float64)
    M = I - A
    partial = b + M @ b + M @ M @ b + M @ M @ M @ b
    assert_close(x3, partial, PRODUCT_TOL[torch.float64])


def test_neumann_seed_form_warns_on_an_indefinite_system():
    A = torch.diag(torch.tensor([1.0, 0.5, -0.3], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    with pytest.warns(NegativeCurvatureWarning):
        x = second.neumann(lambda v: A @ v, [torch.zeros(3)], vector=b, truncate_iter=400)
    assert torch.isfinite(x).all()


SEED_SERIES_TOL = dict(rtol=1e-12, atol=1e-14)  # a few float64 products
SEED_SERIES_SOLVE_TOL = dict(rtol=1e-10, atol=1e-12)  # stopped at residual 1e-12, cond 4


def test_seed_forms_warn_whenever_the_series_has_not_converged():
    """Regression: a slowly diverging series (below the 1e4 growth guard in 10 terms) and an
    indefinite matrix returned b / s with no warning."""
    b = torch.ones(3, dtype=torch.float64)
    params = [torch.zeros(3)]
    A = torch.diag(torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64))  # lambda_max / s = 2.5
    with pytest.warns(second.ConvergenceWarning, match="contraction .* > 1.*scale is too small"):
        x = second.neumann(lambda v: A @ v, params, vector=b, truncate_iter=10)
    assert isinstance(x, torch.Tensor) and x.shape == (3,)
    Ai = torch.diag(torch.tensor([-0.5, 1.0, 1.5], dtype=torch.float64))  # the notebook's case
    with pytest.warns(NegativeCurvatureWarning, match="negative curvature detected"):
        second.neumann(lambda v: Ai @ v, params, vector=b, truncate_iter=10)
    with pytest.warns(second.ConvergenceWarning, match="contraction .* > 1"):
        second.fixed_point(lambda v: A @ v, b, num_iter=20, lr=1.0)
    with pytest.warns(NegativeCurvatureWarning, match="negative curvature detected"):
        second.fixed_point(lambda v: Ai @ v, b, num_iter=20, lr=1.0)


def test_seed_neumann_with_a_scale_returns_the_scaled_sum():
    """The documented value: (1/s) sum_{i<=K} (I - A/s)^i v, an approximation of A^-1 v."""
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    M = torch.eye(3, dtype=torch.float64) - A / 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated, converging series does not warn
        x = second.neumann(lambda v: A @ v, [torch.zeros(3)], vector=b, truncate_iter=3, scale=4.0)
    assert_close(x, (b + M @ b + M @ M @ b + M @ M @ M @ b) / 4, SEED_SERIES_TOL)
    x = second.neumann(lambda v: A @ v, [torch.zeros(3)], vector=b, truncate_iter=400, scale=4.0)
    assert_close(x, torch.linalg.solve(A, b), SEED_SERIES_SOLVE_TOL)


def test_neumann_solver_form_returns_a_result():
    A = _spd(5, 3.0)
    b = torch.randn(5, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="neumann_solve"):
        res = second.neumann(A, b, tol=1e-10, maxiter=5000)
    assert res.converged
    assert second.relative_error(res.x, torch.linalg.solve(A, b)) < 1e-8


def test_fixed_point():
    A = _spd(6, 4.0)  # lr must be < 2 / lambda_max = 0.5
    b = torch.randn(6, dtype=torch.float64)
    x = second.fixed_point(lambda v: A @ v, b, num_iter=500, lr=0.3)
    assert second.relative_error(x, torch.linalg.solve(A, b)) < 1e-8
    # lr too large (lambda_max lr = 4 > 2): the iteration diverges; not negative curvature
    with pytest.warns(second.ConvergenceWarning, match="contraction .* > 1"):
        second.fixed_point(lambda v: A @ v, b, num_iter=200, lr=1.0)
    with pytest.raises(ValueError, match="lr"):
        second.fixed_point(lambda v: A @ v, b, lr=0.0)


def test_clip_grad_norm():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]])]
    clipped, total = second.clip_grad_norm(g, max_norm=1.0)
    assert float(total) == pytest.approx(5.0)
    assert float(torch.linalg.vector_norm(second.parameters_to_vector(clipped))) == pytest.approx(
        1.0, rel=1e-5
    )
    assert clipped[1].shape == (1, 2)
    # under the limit: unchanged
    same, total = second.clip_grad_norm(g, max_norm=10.0)
    assert all(torch.equal(a, b) for a, b in zip(same, g))
    # the infinity norm
    _, tinf = second.clip_grad_norm(g, max_norm=1.0, norm_type=float("inf"))
    assert float(tinf) == 4.0
    # differentiable, not in place
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    (c,), _ = second.clip_grad_norm([w * 2], max_norm=1.0)
    assert c.requires_grad and torch.equal(w.detach(), torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="max_norm"):
        second.clip_grad_norm(g, max_norm=0.0)
    with pytest.raises(ValueError, match="no gradients"):
        second.clip_grad_norm([], max_norm=1.0)
    with pytest.raises(second.NonFiniteError):
        second.clip_grad_norm([torch.tensor([float("nan")])], max_norm=1.0)


def test_gvp_in_the_notebooks_cg_is_the_gauss_newton_product():
    # the commented-out alternative of cell [5]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 1)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    logit = model(x)
    loss = nn.MSELoss()(logit, y)
    params = tuple(model.parameters())
    G = second.exact_ggn(loss, logit, params)
    v = torch.randn(26, dtype=torch.float64)
    assert_close(second.gvp(loss, logit, params, v), G @ v, PRODUCT_TOL[torch.float64])
    g = second.parameters_to_vector(torch.autograd.grad(loss, params, retain_graph=True))
    # the GGN of this model is singular (rank <= 10 < 26): damp it to solve
    x_cg = second.conjugate_gradient(
        lambda u: second.gvp(loss, logit, params, u), g, cg_iter=200, eps=1e-3
    )
    expected = torch.linalg.solve(G + 1e-3 * torch.eye(26, dtype=torch.float64), g)
    assert second.relative_error(x_cg, expected) < 1e-6
