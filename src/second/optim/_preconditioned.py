r"""The shell of the preconditioned first-order optimizers (SOAP, Shampoo, Sophia, AdaHessian).

:class:`PreconditionedOptimizer` is the ``torch.optim.Optimizer`` shell. A subclass proposes,
for every parameter with a gradient, an update and its new state (fresh tensors, never
written in place); the shell commits them only when every proposed tensor is finite on every
rank. Otherwise the step is *refused*: parameters and state stay as they were, ``n_refused``
in :attr:`PreconditionedOptimizer.counters` grows and a ``RuntimeWarning`` is given once per
optimizer. Hyperparameters are checked by the subclass's ``_check_group`` for the
constructor's defaults and every parameter group added later.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import distributed as dist
from .._errors import outside_stacklevel
from ..func.checks import finite_flags
from ._base import PARAM_SHAPES, check_state_dict_params, refuse_duplicates
from ._options import check_nonneg, check_positive, hyperparameters

__all__ = [
    "PreconditionedOptimizer",
    "all_reduce_mean",
    "check_betas",
    "decoupled_update",
    "hyperparameters",
    "reject_module",
]


def reject_module(owner: str, params) -> None:
    """Raise ``TypeError`` when a model is passed where its parameters belong."""
    if isinstance(params, nn.Module):
        raise TypeError(f"{owner} takes parameters: pass model.parameters(), not the model")


def check_betas(betas) -> None:
    """Raise ``ValueError`` unless ``betas`` is a pair of numbers in ``[0, 1)`` (torch.optim's rule)."""
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2
    ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
    if not (ok and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` over the ranks in place (nothing outside a process group)."""
    ts = [t for t in tensors if t.numel()]
    if ts and dist.active():
        dist.all_reduce_sum(ts)
        w = dist.world_size()
        for t in ts:
            t.div_(w)


def decoupled_update(direction: Tensor, param: Tensor, lr: float, weight_decay: float) -> Tensor:
    r"""The update :math:`-\eta\,d - \eta\lambda_{wd}\,\theta` (AdamW's decoupled weight decay).

    Example:
        >>> decoupled_update(torch.ones(2), torch.full((2,), 10.0), lr=0.1, weight_decay=0.5)
        tensor([-0.6000, -0.6000])
    """
    update = -lr * direction
    return update - (lr * weight_decay) * param if weight_decay else update


class PreconditionedOptimizer(Optimizer):
    """``torch.optim.Optimizer`` shell that commits a step only when all of it is finite.

    Subclasses propose updates and new states and check their hyperparameters
    (``_check_group``); this class checks the proposal, commits or refuses it, keeps the counters (:attr:`counters`: ``n_refused``) and
    round-trips ``state_dict`` with the parameter shapes and the random generator.
    """

    _owner = "PreconditionedOptimizer"
    _renamed: dict[str, str] = {}  # deprecated hyperparameter -> its glossary name

    def __init__(self, params: Iterable, defaults: dict, seed: int | None = None):
        reject_module(type(self).__name__, params)
        super().__init__(params, self._checked(dict(defaults)))
        self._warned = False
        self._seed = seed
        self._generator: torch.Generator | None = None
        self._gen_state: Tensor | None = None

    # -- hyperparameters -----------------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        """Raise ``ValueError`` for a hyperparameter out of range.

        Checks the hyperparameters every subclass has (``lr > 0``, ``betas``, ``eps >= 0``,
        ``weight_decay >= 0``); a subclass adds its own after calling this.
        """
        check_positive("lr", group["lr"])
        check_betas(group["betas"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])

    def _checked(self, group: dict) -> dict:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        self._check_group(group)
        return group

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (its hyperparameters validated like the constructor's).

        Raises:
            ValueError: a parameter listed twice, or a hyperparameter out of range; the
                group is then not added (``param_groups`` is unchanged).
        """
        refuse_duplicates(type(self).__name__, param_group)
        super().add_param_group(param_group)
        try:
            self._check_added(self.param_groups[-1])
        except BaseException:
            self.param_groups.pop()  # a refused group is not kept
            raise

    def _check_added(self, group: dict) -> None:
        """Check a group just added (with the defaults filled in); raise to refuse it."""
        self._checked(group)

    # -- state ---------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def counters(self) -> dict:
        """Optimizer-wide counters (saved by ``state_dict``): ``n_refused`` steps."""
        st = self.state[self._params()[0]]
        st.setdefault("n_refused", 0)
        return st

    @property
    def _state(self) -> dict:  # the name the benchmarks read refused-step counters from
        return self.counters

    def generator(self, device: torch.device) -> torch.Generator:
        """The optimizer's random generator (seeded with ``seed`` plus the rank)."""
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            seed = self._seed if self._seed is not None else 0
            self._generator.manual_seed(seed + dist.rank())
            if self._gen_state is not None:
                self._generator.set_state(self._gen_state)
        return self._generator

    def state_dict(self) -> dict:
        """The state of ``torch.optim.Optimizer``, the parameter shapes and the generator."""
        sd = super().state_dict()
        sd[PARAM_SHAPES] = [list(p.shape) for p in self._params()]
        if self._generator is not None:
            sd["generator_state"] = self._generator.get_state()
        elif self._gen_state is not None:
            sd["generator_state"] = self._gen_state.clone()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`.

        Raises:
            ValueError: if it was saved for another number or shapes of parameters.
        """
        check_state_dict_params(type(self).__name__, self._params(), state_dict)
        state_dict = dict(state_dict)
        groups = state_dict["param_groups"] = [dict(g) for g in state_dict["param_groups"]]
        for group in groups:
            for old, new in self._renamed.items():  # a state saved before a renaming
                if old in group and new not in group:
                    group[new] = group.pop(old)
        gen = state_dict.pop("generator_state", None)
        state_dict.pop(PARAM_SHAPES, None)
        super().load_state_dict(state_dict)
        self._generator = None
        self._gen_state = gen.clone() if isinstance(gen, Tensor) else None

    # -- the step ------------------------------------------------------------------------
    def _refuse(self, why: str) -> None:
        self.counters["n_refused"] += 1
        if not self._warned:
            warnings.warn(
                f"{type(self).__name__}: {why}; the step was refused (parameters and state "
                "unchanged; counted in optimizer.counters['n_refused'])",
                RuntimeWarning,
                stacklevel=outside_stacklevel(),
            )
            self._warned = True

    @staticmethod
    def _finite(tensors: Iterable[Tensor | None], device: torch.device) -> bool:
        """Whether every tensor is finite, on every rank (one collective)."""
        ts = [t for t in tensors if t is not None and t.numel()]
        ok = bool(finite_flags(ts).all()) if ts else True
        return dist.all_ranks(ok, device)

    @torch.no_grad()
    def _commit(
        self, params: Sequence[Tensor], updates: Sequence[Tensor], states: Sequence[dict]
    ) -> None:
        for p, u, new in zip(params, updates, states):
            p.add_(u)
            self.state[p].update(new)

    def _with_grads(self) -> list[tuple[dict, list[Tensor]]]:
        out = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                out.append((group, ps))
        return out

    def _check_sparse(self, params: Sequence[Tensor]) -> None:
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
