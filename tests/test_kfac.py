"""KFAC / EK-FAC operators and the KFAC optimizer against dense float64 references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import second
from second import EKFACOperator, GGNOperator, KFACOperator, exact_fisher, exact_ggn
from second.approximations.kfac import output_hessian_sqrt

# Tolerances (named; loosening one is a visible, commented change).
EXACT_TOL = {  # KFAC vs the exact block where KFAC is exact
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
}
INVERSE_TOL = dict(rtol=1e-8, atol=1e-10)  # float64 inverses vs dense inverses
MC_REL_TOL = 0.1  # Monte-Carlo G with 4,000 samples vs the type-2 G (sampling error ~3%)
EKFAC_SLACK = 1e-10  # EK-FAC error <= KFAC error + this * ||block|| (both exact: roundoff)
ORIENTATION_FAIL = 1e-2  # a transposed eigenbasis must be at least this wrong (relative)
OPTIM_TOL = dict(rtol=1e-6, atol=1e-8)  # optimizer update vs the operator's inverse (float64)

DT = torch.float64


LOSSES = {
    "mse-mean": (lambda: nn.MSELoss(), lambda n, c: torch.randn(n, c, dtype=DT)),
    "mse-sum": (lambda: nn.MSELoss(reduction="sum"), lambda n, c: torch.randn(n, c, dtype=DT)),
    "ce-mean": (lambda: nn.CrossEntropyLoss(), lambda n, c: torch.randint(0, c, (n,))),
    "ce-sum": (
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        lambda n, c: torch.randint(0, c, (n,)),
    ),
    "bce-mean": (lambda: nn.BCEWithLogitsLoss(), lambda n, c: torch.rand(n, c, dtype=DT).round()),
    "bce-sum": (
        lambda: nn.BCEWithLogitsLoss(reduction="sum"),
        lambda n, c: torch.rand(n, c, dtype=DT).round(),
    ),
}


def deep_linear(dtype=DT, bias=(True, False, True)):
    return nn.Sequential(
        nn.Linear(4, 5, bias=bias[0]), nn.Linear(5, 6, bias=bias[1]), nn.Linear(6, 3, bias=bias[2])
    ).to(dtype)


def tanh_net(dtype=DT):
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(dtype)


def param_slices(model):
    out, off = [], 0
    for p in model.parameters():
        out.append(slice(off, off + p.numel()))
        off += p.numel()
    return out


def layer_blocks(model):
    """Index ranges of every layer's (weight, bias) block in the flat parameter vector."""
    blocks, off = [], 0
    for m in model.modules():
        ps = list(m.parameters(recurse=False))
        if ps:
            n = sum(p.numel() for p in ps)
            blocks.append(slice(off, off + n))
            off += n
    return blocks


def dense_ggn(model, loss_fn, X, y):
    out = model(X)
    return exact_ggn(loss_fn(out, y), out, list(model.parameters()))


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_kfac_equals_ggn_block_deep_linear_one_datum(loss, dtype):
    make_loss, make_y = LOSSES[loss]
    model, loss_fn = deep_linear(dtype), make_loss()
    X, y = torch.randn(1, 4, dtype=dtype), make_y(1, 3)
    y = y.to(dtype) if y.is_floating_point() else y
    K = KFACOperator(model, loss_fn, (X, y)).to_dense()
    G = dense_ggn(model, loss_fn, X, y)
    for s in layer_blocks(model):
        torch.testing.assert_close(K[s, s], G[s, s], **EXACT_TOL[dtype])


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
def test_kfac_exact_one_datum_nonlinear(loss):
    make_loss, make_y = LOSSES[loss]
    model, loss_fn = tanh_net(), make_loss()
    X, y = torch.randn(1, 4, dtype=DT), make_y(1, 3)
    K = KFACOperator(model, loss_fn, (X, y)).to_dense()
    G = dense_ggn(model, loss_fn, X, y)
    for s in layer_blocks(model):
        torch.testing.assert_close(K[s, s], G[s, s], **EXACT_TOL[DT])


def test_conv_and_embedding_exact_one_position():
    # a kernel covering the image has one output position: KFAC is exact per layer
    conv = nn.Sequential(nn.Conv2d(2, 3, kernel_size=3), nn.Flatten(), nn.Linear(3, 2)).double()
    X, y = torch.randn(1, 2, 3, 3, dtype=DT), torch.randint(0, 2, (1,))
    loss_fn = nn.CrossEntropyLoss()
    K = KFACOperator(conv, loss_fn, (X, y)).to_dense()
    G = dense_ggn(conv, loss_fn, X, y)
    for s in layer_blocks(conv):
        torch.testing.assert_close(K[s, s], G[s, s], **EXACT_TOL[DT])

    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(3, 2)).double()
    idx, t = torch.tensor([[2]]), torch.randn(1, 2, dtype=DT)
    K = KFACOperator(emb, nn.MSELoss(), (idx, t)).to_dense()
    G = dense_ggn(emb, nn.MSELoss(), idx, t)
    for s in layer_blocks(emb):
        torch.testing.assert_close(K[s, s], G[s, s], **EXACT_TOL[DT])


def test_conv_patches_follow_weight_layout():
    # one output channel summed over 9 positions, MSE: the exact block is
    # 2 (sum_t a_t)(sum_t a_t)^T and KFAC's (expand convention) 2 sum_t a_t a_t^T, with
    # a_t the patches in the weight's (C_in, kh, kw) order and a trailing 1 for the bias
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 1, kernel_size=2, padding=1, stride=2, bias=True)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(9, 1, bias=False)).double()
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    X, y = torch.randn(1, 2, 5, 5, dtype=DT), torch.randn(1, 1, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y)).to_dense()
    G = dense_ggn(model, nn.MSELoss(), X, y)
    s = layer_blocks(model)[0]
    patches = nn.functional.unfold(X, 2, padding=1, stride=2)[0].T  # [T, C*kh*kw]
    a = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=DT)], 1)
    asum = a.sum(0, keepdim=True)
    torch.testing.assert_close(G[s, s], 2 * asum.T @ asum, **EXACT_TOL[DT])  # layout check
    torch.testing.assert_close(K[s, s], 2 * a.T @ a, **EXACT_TOL[DT])


def test_empirical_kfac_equals_empirical_fisher_one_datum():
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    X, y = torch.randn(1, 4, dtype=DT), torch.randint(0, 3, (1,))
    K = KFACOperator(model, loss_fn, (X, y), fisher="empirical").to_dense()
    losses = nn.functional.cross_entropy(model(X), y, reduction="none")
    Fm = exact_fisher(losses, list(model.parameters()))
    for s in layer_blocks(model):
        torch.testing.assert_close(K[s, s], Fm[s, s], **EXACT_TOL[DT])


def test_mc_fisher_estimates_type2():
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    X, y = torch.randn(3, 4, dtype=DT), torch.randint(0, 3, (3,))
    exact = KFACOperator(model, loss_fn, (X, y))
    mc = KFACOperator(model, loss_fn, (X, y), fisher="mc", mc_samples=4000)
    for (_, A1, G1), (_, A2, G2) in zip(exact.layers, mc.layers):
        torch.testing.assert_close(A1, A2)
        assert torch.linalg.norm(G1 - G2) / torch.linalg.norm(G1) < MC_REL_TOL


def test_output_hessian_sqrt_factorizes_hessian():
    f = torch.randn(2, 4, 3, dtype=DT)  # cross-entropy with one spatial dimension
    loss_fn = nn.CrossEntropyLoss()
    S = output_hessian_sqrt(loss_fn, f, "mean").reshape(12, 2, 12)
    y = torch.randint(0, 4, (2, 3))
    for i in range(2):
        H = torch.autograd.functional.hessian(
            lambda z, i=i: nn.functional.cross_entropy(z.reshape(1, 4, 3), y[i : i + 1]),
            f[i].reshape(-1),
        )
        torch.testing.assert_close(S[:, i].T @ S[:, i], H, **EXACT_TOL[DT])


def test_scaling_convention_mean_vs_sum():
    # MSELoss(mean) is the sum over N examples and C outputs divided by N*C
    model = tanh_net()
    X, y = torch.randn(7, 4, dtype=DT), torch.randn(7, 3, dtype=DT)
    Km = KFACOperator(model, nn.MSELoss(), (X, y)).to_dense()
    Ks = KFACOperator(model, nn.MSELoss(reduction="sum"), (X, y)).to_dense()
    torch.testing.assert_close(Ks, 7 * 3 * Km, **EXACT_TOL[DT])


def test_batches_equal_concatenated_batch():
    model, loss_fn = tanh_net(), nn.MSELoss()
    X, y = torch.randn(10, 4, dtype=DT), torch.randn(10, 3, dtype=DT)
    whole = KFACOperator(model, loss_fn, (X, y)).to_dense()
    parts = KFACOperator(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])]).to_dense()
    torch.testing.assert_close(parts, whole, **EXACT_TOL[DT])


def test_operator_interface_and_damping():
    model = tanh_net()
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    Kd = KFACOperator(model, nn.MSELoss(), (X, y), damping=0.3)
    n = K.shape[0]
    assert K.psd and K.symmetric
    D = K.to_dense()
    torch.testing.assert_close(D, D.T)
    assert torch.linalg.eigvalsh(D).min() > -1e-12
    torch.testing.assert_close(Kd.to_dense(), D + 0.3 * torch.eye(n, dtype=DT))
    v = torch.randn(n, dtype=DT)
    torch.testing.assert_close(K @ v, D @ v)


# ----------------------------------------------------------------------------- inverses
def test_inverse_exact_and_pi_damping():
    model = tanh_net()
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    n, lam = K.shape[0], 0.05
    D = K.to_dense()
    inv = K.inverse(damping=lam).to_dense()
    torch.testing.assert_close(
        inv, torch.linalg.inv(D + lam * torch.eye(n, dtype=DT)), **INVERSE_TOL
    )
    # per-factor damping: blockdiag of ((G + sqrt(lam)/pi I) kron (A + pi sqrt(lam) I))^-1
    pinv = K.inverse(damping=lam, pi_damping=True).to_dense()
    for s, (_, A, G) in zip(layer_blocks(model), K.layers):
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        r = math.sqrt(lam)
        Ad = A + pi * r * torch.eye(A.shape[0], dtype=DT)
        Gd = G + r / pi * torch.eye(G.shape[0], dtype=DT)
        block = torch.kron(torch.linalg.inv(Gd), torch.linalg.inv(Ad))
        # the layer's (W, b) columns: the bias is the last column of the matrix form
        d_in = A.shape[0] - 1
        perm = [o * (d_in + 1) + i for o in range(G.shape[0]) for i in range(d_in)]
        perm += [o * (d_in + 1) + d_in for o in range(G.shape[0])]
        torch.testing.assert_close(pinv[s, s], block[perm][:, perm], **INVERSE_TOL)


def test_inverse_as_preconditioner_in_solve():
    # softmax regression on badly scaled features: KFAC captures the input scaling
    torch.manual_seed(3)
    model = nn.Linear(6, 4).double()
    X = torch.randn(64, 6, dtype=DT) * torch.logspace(-1, 2, 6, dtype=DT)
    y = torch.randint(0, 4, (64,))
    G = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    M = KFACOperator(model, nn.CrossEntropyLoss(), (X, y)).inverse(damping=1e-4)
    b = torch.randn(G.shape[0], dtype=DT)
    plain = second.solve(G, b, method="cg", damping=1e-4, tol=1e-8, maxiter=500)
    pre = second.solve(G, b, method="cg", damping=1e-4, tol=1e-8, maxiter=500, M=M)
    assert pre.converged and plain.converged
    assert pre.iterations < plain.iterations


def test_singular_factors_constant_inputs():
    # constant (zero) input features make A singular, like digits' blank pixels
    model = tanh_net()
    X, y = torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT)
    X[:, :2] = 0.0
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    assert torch.linalg.eigvalsh(K.layers[0][1]).min() < 1e-12
    inv = K.inverse(damping=1e-2)
    v = torch.randn(K.shape[0], dtype=DT)
    x = inv @ v
    torch.testing.assert_close(K.damped(1e-2) @ x, v, **INVERSE_TOL)
    with pytest.raises(ValueError, match="singular"):
        K.inverse(damping=0.0)
    E = EKFACOperator(model, nn.MSELoss(), (X, y))
    assert torch.isfinite(E.inverse(damping=1e-2) @ v).all()


def test_fallback_parameters():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))

        def forward(self, x):
            return self.lin(x) * self.scale

    model = Scaled().double()
    X, y = torch.randn(1, 4, dtype=DT), torch.randn(1, 3, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    assert K.fallback_parameters[0] is model.scale
    G = dense_ggn(model, nn.MSELoss(), X, y)
    s = param_slices(model)[[id(p) for p in model.parameters()].index(id(model.scale))]
    D = K.to_dense()
    torch.testing.assert_close(D[s, s], torch.diag(G[s, s].diagonal()), **EXACT_TOL[DT])
    Ki = KFACOperator(model, nn.MSELoss(), (X, y), fallback="identity", damping=0.5)
    torch.testing.assert_close(Ki.to_dense()[s, s], 0.5 * torch.eye(3, dtype=DT))


# ----------------------------------------------------------------------------- EK-FAC
@pytest.mark.parametrize("loss", ["mse-mean", "ce-mean", "bce-sum"])
def test_ekfac_at_least_as_accurate_as_kfac(loss):
    make_loss, make_y = LOSSES[loss]
    model, loss_fn = tanh_net(), make_loss()
    X, y = torch.randn(16, 4, dtype=DT), make_y(16, 3)
    G = dense_ggn(model, loss_fn, X, y)
    K = KFACOperator(model, loss_fn, (X, y)).to_dense()
    E = EKFACOperator(model, loss_fn, (X, y)).to_dense()
    for s in layer_blocks(model):
        err_k = torch.linalg.norm(K[s, s] - G[s, s])
        err_e = torch.linalg.norm(E[s, s] - G[s, s])
        assert err_e <= err_k + EKFAC_SLACK * torch.linalg.norm(G[s, s])
    assert torch.linalg.norm(E - E.T) < 1e-12


def _orientation_error(op, G, model):
    """Relative error of EK-FAC's eigenvalues vs diag(Q^T B Q) of the exact block B."""
    errs = []
    for j, s in enumerate(layer_blocks(model)):
        e, layer = op.eigen()[j], op._layers[j]
        d_A = layer.d_A
        # columns of the eigenbasis in parameter ordering: unrotate unit matrices
        E = torch.eye(layer.d_G * d_A, dtype=DT).reshape(-1, layer.d_G, d_A)
        Qcols = e.unrotate(E)  # [d_G*d_A, d_G, d_A]
        vw, vb = layer.from_mat(Qcols)
        Q = torch.cat([vw.reshape(vw.shape[0], -1), vb.reshape(vb.shape[0], -1)], 1).T
        want = (Q.T @ G[s, s] @ Q).diagonal().reshape(layer.d_G, d_A)
        errs.append(float(torch.linalg.norm(op.scales[j] - want) / torch.linalg.norm(want)))
    return max(errs)


def test_eigenbasis_orientation():
    model, loss_fn = tanh_net(), nn.MSELoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    G = dense_ggn(model, loss_fn, X, y)
    E = EKFACOperator(model, loss_fn, (X, y))
    assert _orientation_error(E, G, model) < 1e-10
    # the same check must catch a transposed eigenbasis
    bad = copy.copy(E)
    bad._eig = []
    for e in E.eigen():
        t = copy.copy(e)
        t.QG, t.QA = e.QG.T.contiguous(), e.QA.T.contiguous()
        bad._eig.append(t)
    assert _orientation_error(bad, G, model) > ORIENTATION_FAIL
    # and the inverse reproduces (B + lam I)^-1 only with the right orientation
    v = torch.randn(E.shape[0], dtype=DT)
    torch.testing.assert_close(E.damped(0.1) @ (E.inverse(damping=0.1) @ v), v, **INVERSE_TOL)


def test_ekfac_inverse_and_errors():
    model = tanh_net()
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    E = EKFACOperator(model, nn.MSELoss(), (X, y))
    n = E.shape[0]
    torch.testing.assert_close(
        E.inverse(damping=0.2).to_dense(),
        torch.linalg.inv(E.to_dense() + 0.2 * torch.eye(n, dtype=DT)),
        **INVERSE_TOL,
    )
    with pytest.raises(ValueError, match="per-factor"):
        E.inverse(damping=0.2, pi_damping=True)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(fisher="kfac"), ValueError),
        (dict(fallback="zero"), ValueError),
        (dict(damping=-1.0), ValueError),
        (dict(mc_samples=0), ValueError),
    ],
)
def test_operator_validation(kwargs, err):
    X, y = torch.randn(2, 4, dtype=DT), torch.randn(2, 3, dtype=DT)
    with pytest.raises(err):
        KFACOperator(tanh_net(), nn.MSELoss(), (X, y), **kwargs)


def test_unsupported_loss_needs_empirical():
    X, y = torch.randn(2, 4, dtype=DT), torch.randn(2, 3, dtype=DT)
    with pytest.raises(NotImplementedError, match="empirical"):
        KFACOperator(tanh_net(), nn.L1Loss(), (X, y))
    K = KFACOperator(tanh_net(), nn.L1Loss(), (X, y), fisher="empirical")
    assert torch.isfinite(K.to_dense()).all()


# ----------------------------------------------------------------------------- optimizer
def _closure(opt, model, loss_fn, X, y):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    return closure


def test_first_step_matches_operator_inverse():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(), nn.MSELoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    lam, lr = 0.1, 0.5
    M = KFACOperator(model, loss_fn, (X, y)).inverse(damping=lam, pi_damping=True)
    loss = loss_fn(model(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    want = second.parameters_to_vector(model.parameters()).detach() - lr * (M @ g)
    opt = second.optim.KFAC(model, loss_fn, lr=lr, damping=lam, fisher="type2")
    opt.step(_closure(opt, model, loss_fn, X, y))
    torch.testing.assert_close(
        second.parameters_to_vector(model.parameters()).detach(), want, **OPTIM_TOL
    )


def test_adaptive_step_size_from_exact_quadratic_model():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    lam = 0.1
    M = KFACOperator(model, loss_fn, (X, y)).inverse(damping=lam, pi_damping=True)
    out = model(X)
    loss = loss_fn(out, y)
    g = torch.cat(
        [
            t.reshape(-1)
            for t in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        ]
    )
    Gd = exact_ggn(loss, out, list(model.parameters()))
    Delta = -(M @ g)
    alpha = float(-(g @ Delta) / (Delta @ Gd @ Delta + lam * Delta @ Delta))
    theta0 = second.parameters_to_vector(model.parameters()).detach()
    opt = second.optim.KFAC(model, loss_fn, damping=lam, fisher="type2")
    opt.step(_closure(opt, model, loss_fn, X, y))
    assert opt.last_info["alpha"] == pytest.approx(alpha, rel=1e-8)
    torch.testing.assert_close(
        second.parameters_to_vector(model.parameters()).detach(),
        theta0 + alpha * Delta,
        **OPTIM_TOL,
    )


@pytest.mark.parametrize("fisher", ["mc", "type2", "empirical"])
def test_optimizer_trains_plain_loop_and_closure(fisher):
    torch.manual_seed(0)
    X = torch.randn(64, 4)
    y = torch.sin(X[:, :3])
    loss_fn = nn.MSELoss()
    for use_closure in (False, True):
        model = tanh_net(torch.float32)
        opt = second.optim.KFAC(model, loss_fn, fisher=fisher, damping=0.1)
        first = loss_fn(model(X), y).item()
        if use_closure:
            for _ in range(15):
                opt.step(_closure(opt, model, loss_fn, X, y))
        else:
            with pytest.warns(UserWarning, match="closure"):  # no Levenberg-Marquardt
                for _ in range(15):
                    opt.zero_grad()
                    loss_fn(model(X), y).backward()
                    opt.step()
        assert loss_fn(model(X), y).item() < 0.7 * first


def test_optimizer_fixed_lr_clipping_weight_decay_conv_embedding():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    X, y = torch.randn(32, 1, 5, 5), torch.randint(0, 3, (32,))
    loss_fn = nn.CrossEntropyLoss()
    opt = second.optim.KFAC(
        model, loss_fn, lr=0.1, momentum=0.9, kl_clip=1e-2, weight_decay=1e-4, max_update_norm=1.0
    )
    first = loss_fn(model(X), y).item()
    for _ in range(20):
        opt.step(_closure(opt, model, loss_fn, X, y))
    assert loss_fn(model(X), y).item() < first

    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    idx, t = torch.randint(0, 10, (32, 2)), torch.randn(32, 2)
    opt = second.optim.KFAC(emb, nn.MSELoss(), damping=0.1)
    first = nn.MSELoss()(emb(idx), t).item()
    for _ in range(10):
        opt.step(_closure(opt, emb, nn.MSELoss(), idx, t))
    assert nn.MSELoss()(emb(idx), t).item() < first


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(damping=0.0),
        dict(damping=-1.0),
        dict(damping=float("nan")),
        dict(lr=0.0),
        dict(lr=-0.1),
        dict(momentum=1.0),
        dict(momentum=-0.1),
        dict(weight_decay=-1e-3),
        dict(factor_decay=1.0),
        dict(damping_adaptation_decay=1.0),
        dict(damping_adaptation_interval=0),
        dict(inverse_update_period=0),
        dict(factor_update_period=2.5),
        dict(mc_samples=0),
        dict(kl_clip=0.0),
        dict(max_update_norm=-1.0),
        dict(fisher="exact"),
        dict(fallback="none"),
        dict(min_damping=1.0, damping=0.1),
    ],
)
def test_optimizer_validation(kwargs):
    with pytest.raises(ValueError):
        second.optim.KFAC(tanh_net(torch.float32), nn.MSELoss(), **kwargs)


def test_optimizer_needs_statistics():
    model = tanh_net(torch.float32)
    opt = second.optim.KFAC(model, nn.MSELoss())
    with pytest.raises(RuntimeError, match="forward"):
        opt.step()


def test_state_dict_round_trip():
    torch.manual_seed(0)
    X = torch.randn(32, 4, dtype=DT)
    y = torch.randn(32, 3, dtype=DT)
    loss_fn = nn.MSELoss()
    model = tanh_net()
    opt = second.optim.KFAC(model, loss_fn, damping=0.05, fisher="type2", inverse_update_period=3)
    for _ in range(4):
        opt.step(_closure(opt, model, loss_fn, X, y))
    state = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = second.optim.KFAC(model2, loss_fn, fisher="type2", inverse_update_period=3)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
    assert opt2.param_groups[0]["step"] == 4
    w, w2 = model[0].weight, model2[0].weight
    torch.testing.assert_close(opt2.state[w2]["A"], opt.state[w]["A"], rtol=0, atol=0)
    torch.testing.assert_close(opt2.state[w2]["QG"], opt.state[w]["QG"], rtol=0, atol=0)
    for _ in range(3):
        opt.step(_closure(opt, model, loss_fn, X, y))
        opt2.step(_closure(opt2, model2, loss_fn, X, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_nan_step_refused():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(torch.float32), nn.MSELoss()
    X, y = torch.randn(16, 4), torch.randn(16, 3)
    opt = second.optim.KFAC(model, loss_fn, damping=0.1)
    opt.step(_closure(opt, model, loss_fn, X, y))
    before = [p.detach().clone() for p in model.parameters()]
    damping = opt.param_groups[0]["damping"]
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.last_info["skipped"]
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    assert opt.param_groups[0]["damping"] > damping


def test_optimizer_constant_input_features():
    # digits-like blank pixels: zero columns in the input never crash the eigensolver
    torch.manual_seed(0)
    X = torch.rand(64, 8)
    X[:, :3] = 0.0
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 8), nn.Sigmoid())
    loss_fn = nn.MSELoss()
    opt = second.optim.KFAC(
        model, loss_fn, damping=1e-3, min_damping=1e-12, inverse_update_period=1
    )
    first = loss_fn(model(X), X).item()
    for _ in range(12):
        opt.step(_closure(opt, model, loss_fn, X, X))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert loss_fn(model(X), X).item() < first


def test_damping_adapts_with_closure():
    torch.manual_seed(0)
    model, loss_fn = tanh_net(torch.float32), nn.MSELoss()
    X, y = torch.randn(64, 4), torch.randn(64, 3)
    opt = second.optim.KFAC(model, loss_fn, damping=1.0, damping_adaptation_interval=1)
    opt.step(_closure(opt, model, loss_fn, X, y))
    assert "rho" in opt.last_info
    assert opt.param_groups[0]["damping"] != 1.0


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.Identity])
@pytest.mark.parametrize("bias", [True, False])
def test_quadratic_model_mlp_path_matches_forward_mode(act, bias):
    """The plain-MLP JVPs (captured forward reused) equal the generic forward-mode AD."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6, bias=bias), act(), nn.Linear(6, 5), act(), nn.Linear(5, 3), nn.Sigmoid()
    ).to(DT)
    loss_fn = nn.MSELoss()
    opt = second.optim.KFAC(model, loss_fn)
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    loss_fn(model(X), y).backward()
    assert opt._fwd is not None
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(2, n, dtype=DT)
    with torch.no_grad():
        fast = opt._quadratic_terms(V)
        opt._fwd = None
        generic = opt._quadratic_terms(V)
    torch.testing.assert_close(fast, generic, rtol=1e-10, atol=1e-12)


def test_quadratic_model_generic_path_for_other_models():
    """A model that is not a plain Sequential MLP keeps the forward-mode AD path."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Net().to(DT)
    opt = second.optim.KFAC(model, nn.MSELoss())
    assert opt._chain is None
    seq = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).to(DT)
    assert second.optim.KFAC(seq, nn.MSELoss())._chain is None


def test_adaptive_trajectory_same_with_and_without_mlp_path():
    torch.manual_seed(0)
    models = [tanh_net(), tanh_net()]
    models[1].load_state_dict(models[0].state_dict())
    loss_fn = nn.MSELoss()
    opts = [second.optim.KFAC(m, loss_fn, fisher="type2") for m in models]
    opts[1]._chain = None  # forward-mode AD on the captured batch
    for _ in range(12):
        X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
        for m, o in zip(models, opts):
            o.step(_closure(o, m, loss_fn, X, y))
        assert "mu" in opts[0].last_info
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
