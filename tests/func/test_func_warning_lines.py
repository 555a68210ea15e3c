"""The per-example loop's and the dense assembly's fall-back warnings point at the caller's line,
whichever entry point reached them (the fixed stacklevel=3 landed one frame past a direct call,
in per_example.py under per_example_gradients, in second's spectral, influence and solvers
modules, and in _root.py under an implicit_root's backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import second
from dense_reference import GRUNet
from second.data import Task
from second.func import (
    ModelFunction,
    dense_from_matmat,
    exact_hessian,
    map_examples,
    per_example_jacobians,
)
from second.spectral import ggn_diagonal
from warning_lines import caught_at

LOOP = "vmap over examples failed"
COLUMNS = "assembling the matrix column by column"


def _gru_data():
    torch.manual_seed(0)
    model = GRUNet().double()  # nn.GRU writes its hidden state in place: vmap fails
    X, y = torch.randn(6, 5, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    return model, X, y


def _branchy(x):
    return x * 2 if x.sum() > 0 else x  # data-dependent control flow: vmap fails


PER_EXAMPLE = {
    "map_examples": lambda m, X, y: map_examples(_branchy, torch.ones(3, 2)),
    "per_example_jacobians": lambda m, X, y: per_example_jacobians(m, list(m.parameters()), X),
    "per_example_gradients": lambda m, X, y: second.per_example_gradients(
        m, nn.CrossEntropyLoss(), X, y
    ),
    "ModelFunction.gradients": lambda m, X, y: ModelFunction(
        m, Task(nn.CrossEntropyLoss())
    ).gradients(X, y),
    "ggn_diagonal": lambda m, X, y: ggn_diagonal(m, nn.CrossEntropyLoss(), (X, y)),
    "Influence.scores": lambda m, X, y: second.Influence(
        m, nn.CrossEntropyLoss(), (X, y), damping=1.0, progressbar=False
    ).scores((X[:2], y[:2])),
}


@pytest.mark.parametrize("entry", list(PER_EXAMPLE))
def test_the_loop_over_examples_warns_at_the_callers_line(entry):
    model, X, y = _gru_data()
    caught_at(PER_EXAMPLE[entry], match=LOOP, args=(model, X, y))


class _Cube(torch.autograd.Function):
    """x^3 whose backward reads a value in Python (.item()): no batched (vmap) backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if float(g.abs().sum()) == 0.0:
            return torch.zeros_like(x)
        return 3 * x**2 * g


class _CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_Cube.apply(self.a(x)))


def _hessian_operator():
    torch.manual_seed(0)
    model = _CubeNet().double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    H = second.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    return H, torch.ones(H.shape[0], dtype=torch.float64)


def _no_batching(E):
    raise RuntimeError("vmap: this operator has no batching rule")


DENSE = {
    "dense_from_matmat": lambda H, b: dense_from_matmat(
        _no_batching, H.matvec, H.shape[0], dtype=b.dtype, device=b.device
    ),
    "to_dense": lambda H, b: H.to_dense(),
    "second.dense": lambda H, b: second.dense(H, b, damping=1.0),
    "second.solve": lambda H, b: second.solve(H, b, "dense", damping=1.0),
    "A.inverse": lambda H, b: H.inverse("dense", damping=1.0) @ b,
}


@pytest.mark.parametrize("entry", list(DENSE))
def test_the_column_by_column_assembly_warns_at_the_callers_line(entry):
    H, b = _hessian_operator()
    caught_at(DENSE[entry], match=COLUMNS, args=(H, b))


def test_exact_hessian_column_by_column_warns_at_the_callers_line():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    caught_at(lambda: exact_hessian(_Cube.apply(w).sum() ** 2, [w]), match=COLUMNS)


def test_a_nonsymmetric_implicit_roots_jacobian_column_by_column_warns_at_the_callers_line():
    @second.implicit_root(lambda w, h: _Cube.apply(w) - h, symmetric=False)
    def cube_root(h):
        return h ** (1 / 3)

    h = torch.tensor([1.0, 8.0], dtype=torch.float64, requires_grad=True)
    caught_at(lambda: cube_root(h).sum().backward(), match=COLUMNS)
