"""How the optimizers run a closure: torch.optim's contract, its ``backward()`` deferred."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import SecondDeprecationWarning

__all__ = ["ClosureCall", "call_closure", "deferred_backward", "CLOSURE_EXAMPLE"]

_BACKWARD_LOCK = threading.RLock()


@contextmanager
def deferred_backward(calls: list) -> Iterator[None]:
    """While active, ``loss.backward()`` records ``loss`` in ``calls`` instead of running.

    ``Tensor.backward`` goes through ``torch.autograd.backward``, which is replaced for the
    duration (under a lock, restored on exit). A Newton-type optimizer then differentiates the
    loss itself, with the graph it needs for curvature products (``create_graph``, or the
    output's graph kept for Gauss-Newton), and a trial point that is rejected costs no backward
    pass at all: the closure's ``backward()`` costs nothing extra, and no second forward pass
    is needed.
    """

    def record(tensors, grad_tensors=None, retain_graph=None, create_graph=False, **kw):
        calls.append(tensors)

    with _BACKWARD_LOCK:
        original = torch.autograd.backward
        torch.autograd.backward = record  # type: ignore[assignment]  # a recorder takes any kw
        try:
            yield
        finally:
            torch.autograd.backward = original


#: The closure the contract asks for, as one line for messages.
CLOSURE_EXAMPLE = (
    "def closure(): opt.zero_grad(); loss = loss_fn(model(X), y); loss.backward(); return loss"
)


@dataclass
class ClosureCall:
    """What one closure call produced.

    Attributes:
        loss: the scalar loss, with its graph when it was run under autograd.
        output: the network output (the deprecated ``(loss, output)`` form), else ``None``.
        backward: whether the closure called ``loss.backward()`` (the contract).
    """

    loss: Tensor
    output: Tensor | None
    backward: bool


def call_closure(
    owner: str, closure: Callable, *, pair: str = "refuse", graph: bool = True
) -> ClosureCall:
    """Run a closure under torch.optim's contract, its ``backward()`` deferred.

    The contract: the closure zeroes the gradients, computes the loss, calls
    ``loss.backward()`` and returns the loss. The old forms keep working for one release
    with a ``DeprecationWarning`` naming the contract: a loss returned without
    ``backward()`` (NewtonCG, LiSSA, HessianFree) and, where ``pair="deprecated"``, a
    ``(loss, output)`` pair (GaussNewton, HessianFree built from parameters).

    Args:
        owner: the optimizer's name, for the messages.
        closure: the closure.
        pair: ``"refuse"`` (a pair is an error), ``"deprecated"`` (accepted with a warning)
            or ``"accept"`` (accepted silently: an internal closure).
        graph: run under ``torch.enable_grad()`` (else ``torch.no_grad()``: a value only).

    Returns:
        A :class:`ClosureCall`.

    Raises:
        TypeError: the closure returned neither a scalar tensor nor an accepted pair, with
            the closure the contract asks for.
    """
    calls: list = []
    with deferred_backward(calls), torch.set_grad_enabled(graph):
        out = closure()
        if isinstance(out, Tensor) and out.numel() == 1:
            out = out.reshape(())  # under autograd: the view keeps the graph
    output = None
    if isinstance(out, (tuple, list)) and len(out) == 2 and pair != "refuse":
        out, output = out
        if pair == "deprecated":
            warnings.warn(
                f"a {owner} closure returning (loss, output) is deprecated and stops working "
                f"in 0.3: build the optimizer from the model, {owner}(model, ...), and write "
                f"torch.optim's closure: {CLOSURE_EXAMPLE}",
                SecondDeprecationWarning,
                stacklevel=4,
            )
    if not (isinstance(out, Tensor) and out.numel() == 1):
        got = type(out).__name__ if not isinstance(out, Tensor) else f"shape {tuple(out.shape)}"
        raise TypeError(
            f"{owner}'s closure must return the scalar loss (got {got}); the contract is "
            f"torch.optim's: the closure zeroes the gradients, computes the loss, calls "
            f"backward() and returns the loss: {CLOSURE_EXAMPLE}"
        )
    called = bool(calls)
    if not called and graph and output is None and out.requires_grad:
        warnings.warn(
            f"a {owner} closure that returns the loss without calling loss.backward() is "
            f"deprecated and stops working in 0.3: write torch.optim's closure: "
            f"{CLOSURE_EXAMPLE}",
            SecondDeprecationWarning,
            stacklevel=4,
        )
    if out.dim():
        with torch.set_grad_enabled(graph):
            out = out.reshape(())
    return ClosureCall(out, output, called)
