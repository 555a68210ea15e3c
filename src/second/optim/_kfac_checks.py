"""KFAC's checks: parameter groups, refused quadratic-model steps, damping bounds, finiteness.

Module-level helpers of :class:`second.optim.KFAC` (its step's safeguards), kept apart from
the optimizer's state handling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor, nn

from ..func.checks import finite_flags

OVERRATE = 2.0
"""A quadratic model predicting a decrease of more than ``OVERRATE`` times a nonnegative loss is refused.

(1: the physical bound, which refused 21 of the digits CNN's 55 steps and cost 4 points of
accuracy; 10 let the character transformer reach a loss of 600 first; 2 keeps both.)
"""
NONNEGATIVE_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.NLLLoss)
"""Losses bounded below by 0: a quadratic model predicting a larger decrease than the loss is refused."""


def parameter_groups(model_params: list[Tensor], groups: Iterable[dict] | None) -> list[dict]:
    """Parameter groups over the model's trainable parameters; the unlisted ones form a last group.

    Raises:
        ValueError: a group that is not a dict with ``"params"``, or a parameter that is not
            a trainable parameter of the model or that is listed twice.
    """
    if groups is None:
        return [{"params": model_params}]
    own = {id(p) for p in model_params}
    seen: set[int] = set()
    out = []
    for g in groups:
        if not isinstance(g, dict) or "params" not in g:
            raise ValueError("KFAC's params= takes parameter groups: dicts with a 'params' entry")
        ps = [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])
        for p in ps:
            if id(p) not in own:
                raise ValueError(
                    "a parameter group holds a tensor that is not a trainable "
                    "parameter of the model"
                )
            if id(p) in seen:
                raise ValueError("a parameter appears in more than one parameter group")
            seen.add(id(p))
        out.append({**g, "params": ps})
    rest = [p for p in model_params if id(p) not in seen]
    if rest:
        out.append({"params": rest})
    return out


def refusal(alpha: float, mu: float, pred: float, floor: float = -math.inf) -> str | None:
    """Why the quadratic model's ``(alpha, mu)`` and predicted change are refused, or ``None``.

    ``floor``: the lowest plausible change (``-OVERRATE`` times a loss bounded below by 0).
    """
    if not (math.isfinite(alpha) and math.isfinite(mu) and math.isfinite(pred)):
        return f"a non-finite step (learning rate {alpha:.3g}, momentum {mu:.3g})"
    if alpha <= 0.0:
        return f"a non-positive learning rate {alpha:.3g}"
    if not 0.0 <= mu < 1.0:
        return f"a momentum {mu:.3g} outside [0, 1)"
    if pred >= 0.0:
        return f"a step that does not reduce the model (predicted change {pred:.3g})"
    if pred < floor:
        return f"a decrease {-pred:.3g} larger than the loss {-floor:.3g} (a model that overrates its step)"
    return None


def clamp_damping(lam: float, group: dict) -> float:
    """``lam`` within ``[min_damping, max_damping]`` (a non-finite value: the upper bound)."""
    if not math.isfinite(lam):
        return float(group["max_damping"])
    return float(min(max(lam, group["min_damping"]), group["max_damping"]))


def first_nonfinite(ts: list[Tensor]) -> int | None:
    """The index of the first tensor with a NaN or Inf entry (or whose sum overflows), or ``None``.

    One reduction per tensor and one synchronization (:func:`~second.func.checks.finite_flags`).
    """
    finite = finite_flags(ts)
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])


def check_positive(name: str, value: float, strict: bool = False) -> None:
    ok = (
        isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > 0 if strict else value >= 0)
    )
    if not ok:
        raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'} and finite, got {value!r}")
