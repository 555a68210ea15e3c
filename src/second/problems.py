"""Built-in test problems: the seed notebook's model and small scikit-learn workloads.

Each builder returns a :class:`Problem` with a model, a loss function and one
``(X, y)`` batch, deterministic for a given seed. Data come from generated
tensors or from datasets that scikit-learn ships (no download).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._optional import require

__all__ = ["Problem", "seed_problem", "digits_problem", "check_problem", "PROBLEMS"]


@dataclass
class Problem:
    """A model, a loss and a batch: enough to build any curvature operator."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor

    @property
    def data(self) -> tuple[Tensor, Tensor]:
        """The ``(X, y)`` batch."""
        return self.X, self.y

    @property
    def num_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.model.parameters())

    def to(self, dtype: torch.dtype) -> Problem:
        """The same problem (same weights and data) in another dtype."""
        import copy

        model = copy.deepcopy(self.model).to(dtype)
        y = self.y.to(dtype) if self.y.is_floating_point() else self.y
        return Problem(self.name, model, self.loss_fn, self.X.to(dtype), y)


def seed_problem(seed: int = 0, dtype: torch.dtype = torch.float32) -> Problem:
    """The seed notebook's problem: 3-5-1 sigmoid MLP (26 parameters), 10 random points, MSE."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 1)).to(dtype)
    X = torch.randn(10, 3, generator=g, dtype=dtype)
    y = torch.randn(10, 1, generator=g, dtype=dtype)
    return Problem("seed", model, nn.MSELoss(), X, y)


def load_digits_tensors(dtype: torch.dtype = torch.float32, standardize: bool = True):
    """scikit-learn's digits (1,797 x 64) as tensors; standardized features by default."""
    datasets = require("sklearn.datasets", extra="data", purpose="the digits data")
    d = datasets.load_digits()
    X = torch.tensor(d.data, dtype=torch.float64)
    if standardize:
        X = (X - X.mean(0)) / X.std(0).clamp_min(1e-8)
    return X.to(dtype), torch.tensor(d.target, dtype=torch.long)


def digits_problem(
    seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 16, n: int = 500
) -> Problem:
    """A 64-``hidden``-10 tanh MLP on the first ``n`` standardized digits, cross-entropy."""
    torch.manual_seed(seed)
    X, y = load_digits_tensors(dtype)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype)
    return Problem("digits", model, nn.CrossEntropyLoss(), X[:n], y[:n])


PROBLEMS = {"seed": seed_problem, "digits": digits_problem}

# the optional packages each problem needs (import name)
_NEEDS = {"seed": (), "digits": ("sklearn.datasets",)}


def check_problem(name: str) -> None:
    """Check that ``name`` is a built-in problem and its optional dependencies are installed.

    Args:
        name: a key of ``PROBLEMS``.

    Raises:
        KeyError: ``name`` is not a built-in problem (the message lists them).
        MissingExtraError: a dependency is missing (the message names the extra to install).

    Example:
        >>> check_problem("seed")
    """
    if name not in PROBLEMS:
        raise KeyError(f"unknown problem {name!r}; valid: {', '.join(PROBLEMS)}")
    for module in _NEEDS[name]:
        require(module, purpose=f"the {name!r} problem")
