"""What an Influence refuses, or warns about, when it is built or refreshed.

A damping that is not a finite real number >= 0, a model whose examples' losses depend on
each other through batch statistics, and a loss without ``.reduction`` that looks like a sum.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor, nn

from ..data import Task, batch_coupled_modules, iterate_batches

__all__: list[str] = []


def _real(val, name: str) -> float:
    """``val`` as a float when it is a finite real scalar >= 0 (Python, NumPy, 0-d tensor)."""
    x = None
    if isinstance(val, bool):
        pass
    elif isinstance(val, numbers.Real):  # int, float, NumPy's real scalars
        x = float(val)
    elif isinstance(val, torch.Tensor):
        if val.dim() == 0 and not val.dtype.is_complex and val.dtype != torch.bool:
            x = float(val)
    elif type(val).__module__ == "numpy" and getattr(val, "ndim", None) == 0:
        if getattr(val.dtype, "kind", "") in ("f", "i", "u"):
            x = float(val)
    if x is None or not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite real number >= 0, got {val!r}")
    return x


def _refuse_batch_coupled(model: nn.Module) -> None:
    """Refuse batch norm that normalizes with the batch's statistics in eval mode too."""
    coupled = [m for m in batch_coupled_modules(model) if "BatchNorm" in m]
    if coupled:
        raise ValueError(
            f"the model normalizes with each batch's statistics ({', '.join(coupled[:5])}: "
            "batch norm with track_running_stats=False does so in eval mode too), so an "
            "example's loss depends on the other examples of its batch and the training loss "
            "is not a sum over examples: influence is not defined for it. Use running "
            "statistics (track_running_stats=True and eval()), or a per-example "
            "normalization (LayerNorm, GroupNorm)"
        )


def _warn_if_summing(task: Task, model: nn.Module, data, device) -> bool:
    """Warn when a loss without ``.reduction`` sums its first batch's halves, not averages them.

    Advisory: a loss that cannot be evaluated on half a batch is left alone. Returns
    whether it warned.
    """
    try:
        batch = task.to(next(iter(iterate_batches(data, task))), device)
        n = task.batch_size(batch)
        if n < 2:
            return False
        k = n // 2
        with torch.no_grad():
            out = task.output(model, batch)
            if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != n:
                return False
            whole = float(task.loss(out, batch))
            a = float(task.loss(out[:k], task.take(batch, slice(0, k))))
            b = float(task.loss(out[k:], task.take(batch, slice(k, n))))
    except Exception:  # noqa: BLE001  (only a hint: never fail for it)
        return False
    summed, averaged = a + b, (k * a + (n - k) * b) / n
    tol = 1e-4 * max(abs(whole), abs(summed), abs(averaged))
    if abs(whole - summed) <= tol < abs(whole - averaged):
        warnings.warn(
            "Influence: loss_fn has no .reduction, so it is taken to be a mean over the batch "
            "(each example weighs 1/n), but its value on a batch is the sum of its values on "
            "the two halves: it looks like a sum. Pass Influence(..., reduction='sum') if it "
            "is one (or reduction='mean' to silence this warning)",
            UserWarning,
            stacklevel=3,
        )
        return True
    return False
