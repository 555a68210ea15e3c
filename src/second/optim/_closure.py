"""How the optimizers run a closure: torch.optim's contract, its ``backward()`` deferred."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .._deprecation import warn_deprecated
from .._errors import outside_stacklevel

__all__ = [
    "ClosureCall",
    "call_closure",
    "deferred_backward",
    "warn_closure_misuse",
    "CLOSURE_EXAMPLE",
]

_BACKWARD_LOCK = threading.RLock()


#: gradient clipping in ``torch.nn.utils``: inside a closure whose ``backward()`` is deferred
#: it finds no gradient (``deferred_backward`` records the calls)
_CLIPPERS = ("clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_")


def _recording(fn: Callable, name: str, clips: list) -> Callable:
    def clip(*args, **kwargs):
        clips.append(name)
        return fn(*args, **kwargs)

    return clip


@contextmanager
def deferred_backward(
    calls: list, on_call: Callable[[], None] | None = None, clips: list | None = None
) -> Iterator[None]:
    """While active, ``loss.backward()`` records ``loss`` in ``calls`` instead of running.

    ``on_call`` (if given) runs after each recorded call. With ``clips`` the gradient
    clipping functions of ``torch.nn.utils`` (``clip_grad_norm_``, ...), called through that
    module, record their names there (and run: they find no gradient to clip).

    ``Tensor.backward`` goes through ``torch.autograd.backward``, which is replaced for the
    duration (under a lock, restored on exit). A Newton-type optimizer then differentiates the
    loss itself, with the graph it needs for curvature products (``create_graph``, or the
    output's graph kept for Gauss-Newton), and a trial point that is rejected costs no backward
    pass at all: the closure's ``backward()`` costs nothing extra, and no second forward pass
    is needed.
    """

    def record(tensors, grad_tensors=None, retain_graph=None, create_graph=False, **kw):
        calls.append(tensors)
        if on_call is not None:
            on_call()

    with _BACKWARD_LOCK:
        original = torch.autograd.backward
        torch.autograd.backward = record  # type: ignore[assignment]  # a recorder takes any kw
        patched = []
        if clips is not None:
            for module in (torch.nn.utils, torch.nn.utils.clip_grad):
                for name in _CLIPPERS:
                    fn = getattr(module, name, None)
                    if fn is not None:
                        patched.append((module, name, fn))
                        setattr(module, name, _recording(fn, name, clips))
        try:
            yield
        finally:
            torch.autograd.backward = original
            for module, name, fn in reversed(patched):
                setattr(module, name, fn)


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
        misuse: what the closure did beyond the contract that the optimizer ignores
            (``backward()`` more than once or on another tensor than the returned loss,
            ``.grad`` changed after ``backward()``, ``torch.nn.utils.clip_grad_norm_``), else
            ``None``; see :func:`warn_closure_misuse`.
    """

    loss: Tensor
    output: Tensor | None
    backward: bool
    misuse: str | None = None


def _grad_marks(params: Sequence[Tensor]) -> list[tuple[Tensor, int] | None]:
    """Each parameter's ``.grad`` and its version (``None`` where there is none)."""
    return [None if p.grad is None else (p.grad, p.grad._version) for p in params]


def _same_marks(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x is y or (x is not None and y is not None and x[0] is y[0] and x[1] == y[1])
        for x, y in zip(a, b)
    )


def _is(tensors: object, returned: object) -> bool:
    """Whether ``backward()`` ran on ``returned`` (as ``loss.backward()`` or ``[loss]``)."""
    if isinstance(tensors, (tuple, list)) and len(tensors) == 1:
        tensors = tensors[0]
    return tensors is returned


def _misuse(calls: list, returned: object, grads_changed: bool, clips: list) -> str | None:
    """What the closure did with ``backward()`` and ``.grad`` that a deferred backward ignores."""
    what = []
    if len(calls) > 1:
        what.append(f"called backward() {len(calls)} times")
    if any(not _is(c, returned) for c in calls):
        what.append("called backward() on a tensor other than the loss it returns")
    if grads_changed:
        what.append("changed .grad after backward()")
    if clips:
        what.append(f"called torch.nn.utils.{clips[0]}() (it found no gradient to clip)")
    if not what:
        return None
    return what[0] if len(what) == 1 else ", ".join(what[:-1]) + " and " + what[-1]


def warn_closure_misuse(opt: object, res: ClosureCall) -> None:
    """Warn (once per optimizer) that what ``res.misuse`` describes was ignored.

    The optimizers that differentiate the returned loss themselves (Newton-type, Sophia,
    SophiaH, AdaHessian) defer the closure's ``backward()``: gradient accumulation over
    several ``backward()`` calls, a ``backward()`` on a scaled loss, or ``.grad`` edited
    inside the closure (``clip_grad_norm_``) have no effect on the step.
    """
    if res.misuse is None or getattr(opt, "_closure_warned", False):
        return
    owner = type(opt).__name__
    warnings.warn(
        f"{owner} ignores what this closure does beyond torch.optim's contract: it "
        f"{res.misuse}. {owner} defers the closure's backward() and differentiates the loss "
        f"the closure returns, once, so gradients accumulated over several backward() calls "
        f"and .grad changes made inside the closure (clip_grad_norm_, ...) are not used. "
        f"Return the loss to differentiate (for micro-batches, the sum of their losses) and "
        f"call backward() once, on it: {CLOSURE_EXAMPLE}",
        UserWarning,
        stacklevel=outside_stacklevel(),
    )
    opt._closure_warned = True  # type: ignore[attr-defined]  # any optimizer object


def call_closure(
    owner: str,
    closure: Callable,
    *,
    pair: str = "refuse",
    graph: bool = True,
    params: Sequence[Tensor] = (),
) -> ClosureCall:
    """Run a closure under torch.optim's contract, its ``backward()`` deferred.

    The contract: the closure zeroes the gradients, computes the loss, calls
    ``loss.backward()`` and returns the loss. The old forms keep working for one release
    with a ``SecondDeprecationWarning`` naming the contract, at the user's line (the first
    frame outside ``second`` and ``torch``, e.g. ``opt.step(closure)``): a loss returned
    without ``backward()`` (NewtonCG, LiSSA, HessianFree) and, where ``pair="deprecated"``,
    a ``(loss, output)`` pair (GaussNewton, HessianFree built from parameters).

    Args:
        owner: the optimizer's name, for the messages.
        closure: the closure.
        pair: ``"refuse"`` (a pair is an error), ``"deprecated"`` (accepted with a warning)
            or ``"accept"`` (accepted silently: an internal closure).
        graph: run under ``torch.enable_grad()`` (else ``torch.no_grad()``: a value only).
        params: the optimizer's parameters, whose ``.grad`` is watched after each
            ``backward()`` (a change there is reported in ``ClosureCall.misuse``).

    Returns:
        A :class:`ClosureCall`; its ``misuse`` says what the closure did beyond the contract
        (several ``backward()`` calls, one on another tensor than the returned loss, ``.grad``
        changed after it, gradient clipping through ``torch.nn.utils``), which the caller
        reports with :func:`warn_closure_misuse`.

    Raises:
        TypeError: the closure returned neither a scalar tensor nor an accepted pair, with
            the closure the contract asks for.
    """
    calls: list = []
    clips: list = []
    marks: list = []

    def mark() -> None:
        marks[:] = _grad_marks(params)

    with deferred_backward(calls, mark, clips), torch.set_grad_enabled(graph):
        out = closure()
        returned = out
        changed = bool(calls) and not _same_marks(_grad_marks(params), marks)
        if isinstance(out, Tensor) and out.numel() == 1:
            out = out.reshape(())  # under autograd: the view keeps the graph
    output = None
    if isinstance(out, (tuple, list)) and len(out) == 2 and pair != "refuse":
        out, output = out
        if pair == "deprecated":
            warn_deprecated(
                f"a {owner} closure returning (loss, output)",
                f"the optimizer built from the model, {owner}(model, ...), and torch.optim's "
                f"closure: {CLOSURE_EXAMPLE}",
                stacklevel=outside_stacklevel(),
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
        warn_deprecated(
            f"a {owner} closure that returns the loss without calling loss.backward()",
            f"torch.optim's closure: {CLOSURE_EXAMPLE}",
            stacklevel=outside_stacklevel(),
        )
    if out.dim():
        with torch.set_grad_enabled(graph):
            out = out.reshape(())
    if output is not None and isinstance(returned, (tuple, list)):
        returned = returned[0]
    return ClosureCall(out, output, called, _misuse(calls, returned, changed, clips))
