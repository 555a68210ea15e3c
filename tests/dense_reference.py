"""Dense float64 curvature references built with ``torch.func`` only (the tests' oracle).

Nothing here calls ``second``: every matrix is derived from ``functional_call`` and
``torch.func.hessian`` / ``jacrev`` on a float64 copy of the model, so a bug in the
library cannot hide in its own reference.

Also holds the small models, losses and data the product tests are built from.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

# ----------------------------------------------------------------------------- problems
IN_FEATURES = 4
OUT_FEATURES = 3
N_EXAMPLES = 6


def make_model(name: str) -> nn.Module:
    """A small float64 model (seeded by the caller)."""
    if name == "mlp_tanh":
        return nn.Sequential(
            nn.Linear(IN_FEATURES, 5), nn.Tanh(), nn.Linear(5, OUT_FEATURES)
        ).double()
    if name == "mlp_sigmoid":
        return nn.Sequential(
            nn.Linear(IN_FEATURES, 4),
            nn.Sigmoid(),
            nn.Linear(4, 3),
            nn.Sigmoid(),
            nn.Linear(3, OUT_FEATURES),
        ).double()
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, OUT_FEATURES)
        ).double()
    if name == "linear":
        return nn.Linear(IN_FEATURES, OUT_FEATURES).double()
    raise ValueError(name)


MODELS = ["mlp_tanh", "mlp_sigmoid", "cnn"]
LOSSES = ["mse", "ce", "bce"]
REDUCTIONS = ["mean", "sum"]


def make_loss(name: str, reduction: str) -> nn.Module:
    """The loss module."""
    return {
        "mse": nn.MSELoss,
        "ce": nn.CrossEntropyLoss,
        "bce": nn.BCEWithLogitsLoss,
    }[name](reduction=reduction)


def make_data(
    model_name: str, loss_name: str, n: int = N_EXAMPLES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 inputs and targets fitting the model and the loss."""
    shape = (n, 1, 5, 5) if model_name == "cnn" else (n, IN_FEATURES)
    X = torch.randn(shape, dtype=torch.float64)
    if loss_name == "mse":
        y = torch.randn(n, OUT_FEATURES, dtype=torch.float64)
    elif loss_name == "ce":
        y = torch.randint(0, OUT_FEATURES, (n,))
    else:
        y = torch.randint(0, 2, (n, OUT_FEATURES)).to(torch.float64)
    return X, y


def cast(model: nn.Module, X, y, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """A copy of the problem in ``dtype`` on ``device`` (integer targets stay integers)."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
    return m, X.to(device=device, dtype=dtype), y


# the operator tests' dataset: N_DATA examples, split into batches of SPLIT examples
N_DATA = 10
SPLIT = [2, 5, 3]  # unequal batch sizes


def make_problem(model_name, loss_name, reduction, dtype, n=N_DATA, device="cpu"):
    """``(model64, X64, y64, loss_fn, model, X, y)``: a seeded float64 problem and its copy
    in ``dtype`` on ``device``."""
    torch.manual_seed(1)
    model64 = make_model(model_name)
    X64, y64 = make_data(model_name, loss_name, n)
    loss_fn = make_loss(loss_name, reduction)
    model, X, y = cast(model64, X64, y64, dtype, device)
    return model64, X64, y64, loss_fn, model, X, y


def split_batches(X, y, sizes):
    """``(X, y)`` as a list of consecutive batches of ``sizes`` examples."""
    out, start = [], 0
    for s in sizes:
        out.append((X[start : start + s], y[start : start + s]))
        start += s
    return out


def two_batch_problem(loss_name: str = "ce"):
    """``(model, loss_fn, X, y, batches)``: eight examples in two batches of four."""
    torch.manual_seed(0)
    model = make_model("mlp_tanh")
    X, y = make_data("mlp_tanh", loss_name, n=8)
    loss_fn = nn.CrossEntropyLoss() if loss_name == "ce" else nn.MSELoss()
    return model, loss_fn, X, y, [(X[:4], y[:4]), (X[4:], y[4:])]


# CPU always; an accelerator where one exists (the references stay on the CPU in float64)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------- references
def _as64(model, X, y):
    m = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    y = y.cpu().double() if y.is_floating_point() else y.cpu()
    return m, X.cpu().double(), y


def _unflatten(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def flat_params(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one detached float64 vector."""
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def loss_of_theta(model, loss_fn, X, y):
    """``theta -> loss(model_theta(X), y)`` on a float64 copy, and ``theta``."""
    m, X, y = _as64(model, X, y)
    theta = flat_params(m)

    def f(t):
        return loss_fn(functional_call(m, _unflatten(m, t), (X,)), y)

    return f, theta


def output_of_theta(model, X):
    """``theta -> model_theta(X)`` on a float64 copy, and ``theta``."""
    m = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    X = X.cpu().double()
    theta = flat_params(m)
    return (lambda t: functional_call(m, _unflatten(m, t), (X,))), theta


def ref_hessian(model, loss_fn, X, y) -> torch.Tensor:
    """``d^2 L / d theta^2``."""
    f, theta = loss_of_theta(model, loss_fn, X, y)
    return hessian(f)(theta)


def ref_gradient(model, loss_fn, X, y) -> torch.Tensor:
    """``d L / d theta``."""
    f, theta = loss_of_theta(model, loss_fn, X, y)
    return jacrev(f)(theta)


def ref_jacobian(model, X) -> torch.Tensor:
    """``d f / d theta`` as an ``[M, P]`` matrix (``M`` = number of output entries)."""
    g, theta = output_of_theta(model, X)
    J = jacrev(g)(theta)
    return J.reshape(-1, theta.numel())


def ref_output_jacobians(model, params, X) -> torch.Tensor:
    """``[n, C, P]``: the outputs ``[n, C]`` differentiated by ``params`` (in their order).

    One ``jacrev`` of the whole batch's outputs; the other parameters and the model's
    dtype are kept.
    """
    names = {id(p): k for k, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]

    def f(*ts):
        return functional_call(model, dict(zip(keys, ts)), (X,))

    Js = jacrev(f, argnums=tuple(range(len(params))))(*[p.detach() for p in params])
    n, C = Js[0].shape[:2]
    return torch.cat([J.reshape(n, C, -1) for J in Js], dim=2)


def ref_ggn(model, loss_fn, X, y) -> torch.Tensor:
    """``J^T (d^2 L / d f^2) J`` with both factors from ``torch.func``."""
    g, theta = output_of_theta(model, X)
    out = g(theta).detach()
    yy = y.cpu().double() if y.is_floating_point() else y.cpu()
    H_out = hessian(lambda o: loss_fn(o, yy))(out).reshape(out.numel(), out.numel())
    J = ref_jacobian(model, X)
    return J.T @ H_out @ J


def ref_per_example_gradients(model, loss_fn, X, y) -> torch.Tensor:
    """``[N, P]``: row ``i`` is the gradient of the loss of the batch made of example ``i``."""
    rows = [ref_gradient(model, loss_fn, X[i : i + 1], y[i : i + 1]) for i in range(X.shape[0])]
    return torch.stack(rows)


def ref_empirical_fisher(model, loss_fn, X, y, reduction: str) -> torch.Tensor:
    """``w sum_i g_i g_i^T`` with ``w = 1/N`` (mean) or ``1`` (sum)."""
    G = ref_per_example_gradients(model, loss_fn, X, y)
    w = 1.0 / X.shape[0] if reduction == "mean" else 1.0
    return w * G.T @ G


# ----------------------------------------------------------------------------- comparison
def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, msg: str = "") -> None:
    """``torch.testing.assert_close`` in float64 with ``atol`` relative to the reference's scale.

    ``atol`` in the tolerance tables is for entries of order one; a product whose
    entries are of order ``s`` gets ``atol * max(1, s)``, so cancellation in a float32
    product of large entries is not mistaken for an error.
    """
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=msg or None
    )


# every (model, loss, reduction) combination, with readable ids for parametrize
CASES = list(itertools.product(MODELS, LOSSES, REDUCTIONS))
CASE_IDS = ["-".join(c) for c in CASES]


class GRUNet(nn.Module):
    """A GRU classifier: it writes its hidden state in place, so vmap over examples fails."""

    def __init__(self, d_in: int = 3, hidden: int = 4, classes: int = 3):
        super().__init__()
        self.r, self.fc = nn.GRU(d_in, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc(self.r(x)[0][:, -1])
