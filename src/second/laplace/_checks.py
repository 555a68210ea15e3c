"""What :class:`~second.laplace.Laplace` accepts, and how its arguments are checked and read.

The options (:data:`STRUCTURES`, :data:`CURVATURES`, :data:`FISHERS`), the likelihood a loss
stands for, the last layer of ``subset="last_layer"``, regression targets ``[n]`` read as a
column, and the prior's checks (:class:`_Checked` runs them on every assignment).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__: list[str] = []

STRUCTURES = ("full", "diag", "lowrank", "kfac", "ekfac")
CURVATURES = ("ggn", "hessian", "fisher")
FISHERS = ("type2", "mc", "empirical")


def _likelihood(loss_fn) -> str:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing:
            option = "weight" if loss_fn.weight is not None else "label_smoothing"
            raise ValueError(
                f"Laplace's classification likelihood is categorical: nn.CrossEntropyLoss with "
                f"{option}= is not a log-likelihood (the posterior and its marginal likelihood "
                "would be another model's); pass nn.CrossEntropyLoss() (ignore_index is kept)"
            )
        return "classification"
    if isinstance(loss_fn, nn.MSELoss):
        return "regression"
    raise ValueError(
        "Laplace supports nn.CrossEntropyLoss (classification) and nn.MSELoss (regression), "
        f"got {type(loss_fn).__name__}"
    )


def _last_layer(model: nn.Module) -> tuple[str, nn.Module]:
    found = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            found = (name, module)
    if found is None or not isinstance(found[1], nn.Linear):
        kind = None if found is None else type(found[1]).__name__
        raise ValueError(
            f"subset='last_layer' needs an nn.Linear as the last module with parameters, got {kind}"
        )
    return found


def _check_last_output(last: nn.Module, out: Tensor, f: Tensor) -> None:
    """Refuse a last layer whose output is not the model's (last-layer Laplace would be wrong)."""
    if out.numel() != f.numel() or not torch.equal(out.reshape(f.shape), f):
        raise ValueError(
            f"subset='last_layer': the model's output is not the output of its last nn.Linear "
            f"({last}): an output layer that reuses another weight (tied embeddings) or an "
            "operation after the last Linear. Pass subset='all' or the output layer's parameters"
        )


@functools.cache
def _column_targets(cls: type) -> type:
    """``cls`` (a :class:`~second.Task`) with targets ``[n]`` read as ``[n, 1]``."""

    class ColumnTargets(cls):  # type: ignore[valid-type, misc]
        def targets(self, batch) -> Tensor:
            y = super().targets(batch)
            return y.reshape(-1, 1) if y.dim() == 1 else y

    ColumnTargets.__name__ = ColumnTargets.__qualname__ = f"{cls.__name__}ColumnTargets"
    return ColumnTargets


def _positive(value, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if t.dim() > 1 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(
            f"{name} must be positive and finite (a scalar or a 1-D tensor), got {value}"
        )
    return t


def _check_prior_precision(la, value) -> Tensor:
    t = _positive(value, "prior_precision")
    if t.dim() == 1 and t.numel() not in (1, len(la.groups)):
        raise ValueError(
            f"prior_precision has {t.numel()} values; the posterior has {len(la.groups)} "
            f"groups ({', '.join(la.groups)})"
        )
    return t.reshape(()) if t.numel() == 1 and t.dim() == 1 else t


def _check_prior_mean(la, value) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if t.dim() > 1 or (t.dim() == 1 and t.numel() != la.num_params):
        raise ValueError(f"prior_mean must be a scalar or a flat tensor of {la.num_params}")
    return t


class _Checked:
    """An attribute whose assignments go through ``check(owner, value)``."""

    def __init__(self, check: Callable, doc: str):
        self.check, self.__doc__ = check, doc

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj, value) -> None:
        setattr(obj, self.slot, self.check(obj, value))
