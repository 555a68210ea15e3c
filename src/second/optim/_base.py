"""Shared shell of the Newton-type optimizers: flat parameters, counters, stopping.

The closure contract is in :mod:`._closure`, the hyperparameter checks in :mod:`._options`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._deprecation import renamed_options, warn_deprecated
from ..func.attention import differentiable_attention
from ..func.products import grad_checked
from ..func.vectors import add_vector_to_parameters, parameters_to_vector, vector_to_parameters
from ._closure import ClosureCall, call_closure, warn_closure_misuse
from ._options import RENAMED, check_newton_options, hyperparameters

__all__ = [
    "NewtonTypeOptimizer",
    "CounterDict",
    "check_state_dict_params",
    "PARAM_SHAPES",
    "flat_hvp",
    "flat_dot",
    "refuse_duplicates",
]

COUNTERS = ("n_iter", "nfev", "ngev", "matvecs")


class CounterDict(dict):
    """A ``dict`` where the deprecated key ``"nhvp"`` reads ``"matvecs"`` (with a warning).

    The optimizers' state and history records use it, so ``state["nhvp"]`` keeps working
    for one release (removed in 0.3).

    Example:
        >>> import warnings
        >>> d = CounterDict(matvecs=3)
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     d["nhvp"], "matvecs" in str(w[0].message)
        (3, True)
    """

    def _key(self, key):
        if key == "nhvp":
            warn_deprecated("the optimizer counter 'nhvp'", "'matvecs'", stacklevel=3)
            return "matvecs"
        return key

    def __getitem__(self, key):
        return super().__getitem__(self._key(key))

    def __setitem__(self, key, value):
        super().__setitem__(self._key(key), value)

    def get(self, key, default=None):
        """``dict.get`` with the deprecated key mapped."""
        return super().get(self._key(key), default)

    def __contains__(self, key) -> bool:
        return super().__contains__("matvecs" if key == "nhvp" else key)


PARAM_SHAPES = "param_shapes"  # the key under which state_dict() records the parameter shapes


def check_state_dict_params(owner: str, params: Sequence[Tensor], state_dict: dict) -> None:
    """Raise ``ValueError`` unless ``state_dict`` was saved for parameters like ``params``.

    Checks the number of parameter tensors and, from the shapes ``state_dict()`` records
    under ``"param_shapes"``, their shapes. A state dict saved without them (an older
    version) is checked through the per-parameter tensors it holds (``delta``, ``diag``:
    the parameter's shape; ``direction``: all parameters, flat).

    Args:
        owner: the optimizer's name, for the message.
        params: the optimizer's parameters, in order.
        state_dict: what ``load_state_dict`` received.

    Raises:
        ValueError: naming the first mismatches; the state belongs to another model.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict:
        raise ValueError(f"{owner}.load_state_dict: not an optimizer state dict (no 'state')")
    groups = state_dict.get("param_groups")
    if not isinstance(groups, (list, tuple)):
        raise ValueError(
            f"{owner}.load_state_dict: not an optimizer state dict (no 'param_groups')"
        )
    ids = [i for g in groups for i in g.get("params", [])]
    here = [tuple(p.shape) for p in params]
    if len(ids) != len(params):
        raise ValueError(
            f"{owner}.load_state_dict: the state was saved for {len(ids)} parameter tensors, "
            f"this optimizer has {len(params)}: it belongs to another model"
        )
    bad = []
    shapes = state_dict.get(PARAM_SHAPES)
    if shapes is not None:
        bad = [
            f"parameter {i}: saved {tuple(a)}, here {b}"
            for i, (a, b) in enumerate(zip(shapes, here))
            if tuple(a) != b
        ]
    else:
        index = {pid: i for i, pid in enumerate(ids)}
        total = sum(p.numel() for p in params)
        for pid, st in state_dict["state"].items():
            i = index.get(pid)
            if i is None or not isinstance(st, dict):
                continue
            for key, v in st.items():
                if not isinstance(v, Tensor):
                    continue
                if key in ("delta", "diag") and tuple(v.shape) != here[i]:
                    bad.append(f"parameter {i}: saved {key} {tuple(v.shape)}, here {here[i]}")
                elif key == "direction" and v.numel() != total:
                    bad.append(f"saved direction of {v.numel()} entries, here {total} parameters")
    if bad:
        raise ValueError(
            f"{owner}.load_state_dict: the state was saved for parameters of other shapes "
            f"({'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}): it belongs to another model"
        )


def refuse_duplicates(owner: str, param_group: dict) -> None:
    """Raise ``ValueError`` when a parameter is listed twice in ``param_group``.

    torch.optim only warns (and an optimizer then steps the parameter twice, or, for a
    flat-vector method, solves for its coordinates twice). Called before
    ``Optimizer.add_param_group``; an iterable ``params`` is materialized into a list.

    Example:
        >>> w = torch.zeros(2)
        >>> refuse_duplicates("SOAP", {"params": [w, w]})
        Traceback (most recent call last):
        ...
        ValueError: SOAP: parameter 1 (shape (2,)) is listed twice in one parameter group (first as parameter 0): list each parameter once
    """
    if not isinstance(param_group, dict):
        return
    params = param_group.get("params")
    if params is None or isinstance(params, (Tensor, set, str, bytes)):
        return  # one tensor, or torch.optim's own errors
    params = param_group["params"] = list(params)
    first: dict[int, int] = {}
    for i, entry in enumerate(params):
        t = entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry  # (name, p)
        j = first.setdefault(id(t), i)
        if j != i:
            shape = tuple(t.shape) if isinstance(t, Tensor) else "?"
            raise ValueError(
                f"{owner}: parameter {i} (shape {shape}) is listed twice in one parameter "
                f"group (first as parameter {j}): list each parameter once"
            )


class _Group(dict):
    """A parameter group of an optimizer without a learning rate: reading ``"lr"`` says so."""

    owner = "this optimizer"  # the optimizer's name, set by the optimizer

    def __missing__(self, key):
        if key == "lr":
            raise KeyError(
                f"'lr': {self.owner} has no learning rate (its step "
                "length comes from its trust region, damping or line search), so a "
                "learning-rate scheduler does not apply to it"
            )
        raise KeyError(key)


class NewtonTypeOptimizer(Optimizer):
    """Base class: one parameter group treated as one flat vector, with evaluation counters.

    The parameters that do not require grad (frozen ones) are skipped, as torch.optim does:
    the flat vector holds the others. The optimizer state (``optimizer.state[first_param]``,
    saved by ``state_dict``) holds
    ``n_iter``, ``nfev`` (closure evaluations), ``ngev`` (gradient evaluations), ``matvecs``
    (curvature-vector products), the last ``loss`` and ``grad_norm``, ``stop_reason``
    (``None`` while running) and ``history``, one record per iteration.
    Subclasses add their own entries (radius, damping, ...).

    A closure that draws random numbers (dropout) draws on every call, as it would without
    the optimizer: a point's gradient and curvature products come from one call's graph
    (one network), while the trial points that accept a step or adapt the damping or radius
    are evaluated with their own draws. Replaying the first call's draws for them, which
    makes the ratio of actual to predicted reduction that of one network, trained the
    zoo's dropout models worse with HessianFree (BENCHMARKS.md, eleventh session).
    """

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(
                f"{type(self).__name__} doesn't support per-parameter options (parameter groups)"
            )
        dtypes = {p.dtype for p in self._all}
        if len(dtypes) > 1:
            raise ValueError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}")
        self._cache: dict = {}
        self._label_group()

    def add_param_group(self, param_group: dict) -> None:
        """Add the one parameter group (the constructor does); a second one is an error.

        Raises:
            ValueError: a second group (the optimizer treats one group as one flat vector),
                or a parameter listed twice.
        """
        name = type(self).__name__
        if self.param_groups:
            raise ValueError(
                f"{name} doesn't support per-parameter options (parameter groups): it treats "
                "its parameters as one flat vector; build it with all of them instead of "
                "adding a group"
            )
        refuse_duplicates(name, param_group)
        super().add_param_group(param_group)

    def _label_group(self) -> None:
        """The group as a :class:`_Group`, whose missing ``"lr"`` names the optimizer."""
        group = self.param_groups[0]
        if "lr" not in group and not isinstance(group, _Group):
            group = self.param_groups[0] = _Group(group)
        if isinstance(group, _Group):
            group.owner = type(self).__name__

    @property
    def _all(self) -> list[Tensor]:
        """Every parameter of the group, frozen ones included (the state dict's)."""
        return self.param_groups[0]["params"]

    @property
    def _params(self) -> list[Tensor]:
        """The parameters that require grad: the flat vector's.

        Raises:
            ValueError: none requires grad.
        """
        params = [p for p in self.param_groups[0]["params"] if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__}: no parameter requires grad")
        return params

    _renamed_defaults: dict = {}  # the defaults of the options with a deprecated spelling

    def _options(self, arguments: dict) -> dict:
        """The constructor's ``locals()`` as checked ``defaults``, deprecated spellings moved.

        Raises:
            TypeError: an unknown keyword.
            ValueError: a shared option out of range (:func:`check_newton_options`), or an
                option passed under both spellings.
        """
        options = hyperparameters(arguments)
        renamed_options(
            type(self).__name__,
            arguments.get("deprecated", {}),
            options,
            self._renamed_defaults,
            RENAMED,
        )
        check_newton_options(options)
        return options

    # -- state ---------------------------------------------------------------------------
    @property
    def _state(self) -> dict:
        first = self._all[0]
        st = self.state[first]
        if not isinstance(st, CounterDict):  # a fresh or a loaded state
            st = CounterDict(st)
            if "nhvp" in dict(st):  # saved before the renaming
                st["matvecs"] = dict.pop(st, "nhvp")
            self.state[first] = st
        if "n_iter" not in st:
            for key in COUNTERS:
                st[key] = 0
            st.update(n_rejected=0, loss=None, grad_norm=None, stop_reason=None, history=[])
        return st

    @property
    def stop_reason(self) -> str | None:
        """Why the optimizer stopped (``None`` while it is still making progress)."""
        return self._state["stop_reason"]

    @property
    def converged(self) -> bool:
        """Whether it stopped because a tolerance was met."""
        reason = self._state["stop_reason"]
        return reason is not None and reason.startswith("converged")

    @property
    def history(self) -> list[dict]:
        """Per-iteration records: ``n_iter, nfev, ngev, matvecs, loss, grad_norm`` and more."""
        return self._state["history"]

    def state_dict(self) -> dict:
        """The state of ``torch.optim.Optimizer``, plus the parameter shapes it belongs to."""
        sd = super().state_dict()
        sd[PARAM_SHAPES] = [list(p.shape) for p in self._all]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`.

        Raises:
            ValueError: if it was saved for another number or shapes of parameters.
        """
        check_state_dict_params(type(self).__name__, self._all, state_dict)
        for group in state_dict.get("param_groups", []):
            for old, new in RENAMED.items():  # a state saved before the renaming
                if old in group and new not in group:
                    group[new] = group.pop(old)
        super().load_state_dict(state_dict)
        self._label_group()
        self._cache = {}
        if self._all[0] in self.state:
            _ = self._state  # the counters in their CounterDict (an old "nhvp" renamed)

    def _record(self, **extra) -> None:
        st = self._state
        rec = CounterDict((k, st[k]) for k in COUNTERS)
        rec.update(loss=st["loss"], grad_norm=st["grad_norm"], **extra)
        st["history"].append(rec)

    # -- flat parameter helpers ----------------------------------------------------------
    def _numel(self) -> int:
        return sum(p.numel() for p in self._params)

    def _gather_flat(self) -> Tensor:
        return parameters_to_vector([p.detach() for p in self._params])

    @torch.no_grad()
    def _set_flat(self, x: Tensor) -> None:
        for p, xp in zip(self._params, vector_to_parameters(x, self._params)):
            p.copy_(xp)

    def _add_flat(self, d: Tensor, alpha: float = 1.0) -> None:
        add_vector_to_parameters(d, self._params, alpha=alpha)

    def _split(self, v: Tensor) -> tuple[Tensor, ...]:
        return vector_to_parameters(v, self._params)

    def _call(self, closure: Callable, *, pair: str = "refuse", graph: bool = True) -> ClosureCall:
        """One closure call under the contract (:func:`call_closure`), counted in ``nfev``.

        With ``graph`` the closure runs inside :func:`~second.func.differentiable_attention`:
        the curvature products differentiate its graph twice, which the fused attention
        kernels (and weight_norm's) do not support.
        """
        with differentiable_attention() if graph else nullcontext():
            res = call_closure(
                type(self).__name__, closure, pair=pair, graph=graph, params=self._params
            )
        self._state["nfev"] += 1
        warn_closure_misuse(self, res)
        return res

    def _value(self, closure: Callable, *, pair: str = "refuse") -> float:
        """The loss only (no graph; ``inf`` when not finite), counted in ``nfev``."""
        val = float(self._call(closure, pair=pair, graph=False).loss.detach())
        return val if math.isfinite(val) else math.inf

    @torch.no_grad()
    def _write_grad(self, flat: Tensor) -> None:
        """Leave the gradient of the current point in ``.grad`` (as torch.optim.LBFGS does)."""
        for p, gp in zip(self._params, self._split(flat)):
            p.grad = gp.detach().clone()

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._params)

    def _evaluate_at(self, x: Tensor, step: Tensor, evaluate: Callable):
        """``evaluate()`` with the parameters at ``x + step``; back at ``x`` if it raises."""
        self._set_flat(x + step)
        try:
            return evaluate()
        except BaseException:
            self._set_flat(x)  # never leave the parameters at a trial point
            raise

    # -- the step loop ---------------------------------------------------------------------
    def _begin(self, closure: Callable | None) -> dict:
        """Start a :meth:`step` call: the cache of the last one when it can be reused.

        It is reused when the same closure object is passed and the parameters were not
        changed in between; otherwise the stop reason is cleared and the cache is empty.

        Raises:
            ValueError: no closure.
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        same = (
            self._cache.get("versions") == self._versions()
            and self._cache.get("closure") is closure
        )
        cache = self._cache if same else {}
        if not cache:
            self._state["stop_reason"] = None
        return cache

    def _arrive(self, cache: dict, evaluate: Callable[[], dict], **record) -> tuple[dict, float]:
        """The cache at the current point: the accepted trial's record or ``evaluate()``.

        Records the iteration (with ``record``) and returns ``(cache, ||grad||)``.
        """
        point = cache.pop("accepted", None)
        x = self._gather_flat()
        if point is None:
            point = evaluate()
        cache = dict(point, x=x)
        gnorm = float(torch.linalg.vector_norm(cache["g"]))
        st = self._state
        st["loss"], st["grad_norm"] = cache["loss"], gnorm
        self._record(**record)
        return cache, gnorm

    def _gtol_met(self, gnorm: float) -> bool:
        """Whether ``||grad|| <= gtol``; if so the stop reason says so."""
        gtol = self.param_groups[0]["gtol"]
        if gnorm <= gtol:
            self._state["stop_reason"] = f"converged: ||grad|| = {gnorm:.3e} <= gtol = {gtol:.1e}"
        return gnorm <= gtol

    def _iterations(self) -> Iterator[int]:
        """Up to ``maxiter`` iterations, while no stop reason is set."""
        for i in range(self.param_groups[0]["maxiter"]):
            if self._state["stop_reason"] is not None:
                return
            yield i

    def _model_failed(self, predicted_reduction: float, model: str) -> bool:
        """Count the iteration; stop (and say why) when the model predicts no decrease."""
        st = self._state
        st["n_iter"] += 1
        if not predicted_reduction > 0:
            st["stop_reason"] = f"stalled: the {model} model predicts no decrease"
            return True
        return False

    def _step_stalled(self, step_norm: float) -> None:
        """Stop (and say why) after an accepted step no longer than ``tolerance_change``."""
        if step_norm <= self.param_groups[0]["tolerance_change"]:
            self._state["stop_reason"] = f"stalled: step norm {step_norm:.3e} <= tolerance_change"

    def _loss_tensor(self, point: dict) -> Tensor:
        """The loss of a point record: the closure's own tensor (detached) where it is kept."""
        loss = point.get("loss_t")
        if loss is None:  # a record without the tensor: the value, in the parameters' dtype
            p = self._params[0]
            value = point.get("loss")
            value = value if value is not None else float("nan")
            loss = torch.tensor(value, dtype=p.dtype, device=p.device)
        return loss

    def _end(self, cache: dict, closure: Callable, first_loss: Tensor | None) -> Tensor:
        """Keep the cache for the next call; the loss at the start of this one.

        That loss is the closure's tensor, detached (its dtype and device), as
        ``torch.optim.LBFGS`` returns it.
        """
        cache["versions"] = self._versions()
        cache["closure"] = closure
        self._cache = cache
        if first_loss is None:  # no iteration ran: the loss at the current point
            point = cache.get("accepted", cache)
            first_loss = self._loss_tensor(point if "loss" in point else dict(self._state))
        return first_loss

    # -- evaluation ----------------------------------------------------------------------
    def _gradient(
        self, loss: Tensor, create_graph: bool, retain_graph: bool | None = None
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """Gradient tensors (with graph when asked) and the detached flat gradient.

        Raises:
            NonFiniteError: the loss, or else the gradient, has NaN or Inf entries.
        """
        from .._errors import NonFiniteError

        grads = grad_checked(
            loss,
            self._params,
            create_graph=create_graph,
            retain_graph=True if create_graph else retain_graph,
        )
        self._state["ngev"] += 1
        flat = parameters_to_vector([g.detach() for g in grads])
        # one synchronization for the loss and the gradient; which one, only on failure
        if not bool(torch.isfinite(torch.cat([flat, loss.detach().reshape(1).to(flat)])).all()):
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteError(f"the loss is not finite ({value}) at the current point")
            raise NonFiniteError("the gradient has NaN or Inf entries (the loss is finite)")
        return grads, flat


def flat_hvp(opt: NewtonTypeOptimizer, grads: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    """``v -> H v`` on flat vectors from gradients with their graph, counted in ``matvecs``."""
    from ..func.products import hvp_from_gradient

    def prod(v: Tensor) -> Tensor:
        opt._state["matvecs"] += 1
        with torch.enable_grad():
            out = hvp_from_gradient(grads, opt._params, opt._split(v))
        return parameters_to_vector(out)

    return prod


def flat_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``sum_i <a_i, b_i>`` as a float."""
    return float(sum((x * y).sum() for x, y in zip(a, b)))
