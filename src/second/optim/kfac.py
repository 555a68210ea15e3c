r"""``second.optim.KFAC``: the KFAC optimizer of Martens & Grosse (2015), adaptive mode.

One iteration on a mini-batch with gradient :math:`\nabla h` (weight decay :math:`\eta`
included) and damping :math:`\lambda`:

1. Factors: running averages :math:`\bar A \leftarrow \beta \bar A + (1-\beta) A_{batch}`
   (same for :math:`G`), read with the bias correction :math:`\bar A / (1-\beta^k)` after
   :math:`k` updates, so the first step already uses an unbiased estimate. Batch
   factors as in :mod:`second.kfac` (Monte-Carlo Fisher by default).
2. Every ``inverse_update_period`` steps the factors are eigendecomposed (eigenvalues
   clamped at 0, so constant input features are harmless). The damping is applied
   at every step on the cached spectra: :math:`\Delta = -\breve F^{-1}\nabla h` with
   :math:`\breve F = \mathrm{blockdiag}\big((A + \pi\gamma I)\otimes(G + \gamma/\pi\, I)\big)`,
   :math:`\gamma = \sqrt{\lambda + \eta}` (factored Tikhonov damping, section 6.3).
3. Learning rate and momentum from the local quadratic model (section 7): with the
   previous update :math:`\delta_0`, :math:`(\alpha, \mu)` minimize
   :math:`M(\delta) = \tfrac12 \delta^\top (F + (\lambda+\eta) I)\delta + \nabla h^\top\delta` over
   :math:`\delta = \alpha\Delta + \mu\delta_0`, where :math:`F` is the **exact** GGN of the
   mini-batch loss (two Jacobian-vector products, forward mode, on the captured
   batch; for a plain ``nn.Sequential`` of linear layers, Tanh/Sigmoid/ReLU/Identity/
   GELU/SiLU/LeakyReLU activations and ``nn.Dropout`` the tangents are pushed through the
   activations captured in the training forward, which is not re-run, and through the
   masks its dropouts drew). Or fixed: :math:`\delta = \mu\delta_0 + \alpha\nu\Delta`
   with optional KL clipping :math:`\nu = \min(1, \sqrt{c / (\alpha^2 |\Delta^\top \nabla h|)})`.
4. Levenberg-Marquardt (section 6.5): every ``damping_adaptation_interval`` steps
   :math:`\rho = (h(\theta + \delta) - h(\theta)) / (M_0(\delta) - M_0(0))` with the
   undamped model :math:`M_0`; :math:`\lambda \leftarrow \omega\lambda` if :math:`\rho > 3/4`,
   :math:`\lambda/\omega` if :math:`\rho < 1/4`, :math:`\omega = \text{decay}^{\text{interval}}`.
   This needs the loss after the step on the same batch: pass a closure to
   :meth:`KFAC.step`. When the closure returns ``loss_fn(model(x), y)`` itself, that loss
   is re-evaluated by a forward pass without gradients on the captured batch (no second
   closure call, no backward). Without a closure the damping stays fixed (a one-time
   warning).

A forward that draws random numbers (dropout) is re-run by the quadratic model's products with
the draws of the step's training forward (:class:`second.func.forward.RandomState`): the
curvature is that of the network the gradient came from, with its masks (fresh masks made it
another network's, and on the digits MLPs with dropout 10-17 of 55 steps were refused). The
loss after the step (damping adaptation) is evaluated with fresh draws.

Statistics are gathered by forward hooks during the training forward pass (the Monte-Carlo
backward runs inside the forward, so a plain ``loss.backward(); opt.step()`` loop works).
Every training forward since the last step adds to them, so gradient accumulation over
micro-batches (several forward/backward calls, one step; each loss divided by their number
for a mean-reduced loss, as the big batch's gradient needs, not divided for a sum) gives the
big batch's factors for the Monte-Carlo and type-2 Fisher; the quadratic model measures its
curvature on the last micro-batch. The empirical Fisher reads the gradients of the user's
own backward pass: a loss scaled by ``c`` (divided by the number of micro-batches, or by a
gradient scaler) scales its ``G`` factors by ``c**2``, so accumulate with the type-2 or
Monte-Carlo Fisher, or unscaled losses. Under ``torch.autocast`` the statistics are summed and
the factors kept in float32. Under ``torch.distributed`` (DDP-wrapped models
included) the factor sums, quadratic-model terms and losses are all-reduced, the
eigendecompositions are split over ranks (layer ``j`` on rank ``j % world_size``, then
broadcast); gradients are expected to be averaged already (as DDP does, so use
mean-reduced losses with equal shards).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .._errors import outside_stacklevel
from .._losses import loss_kind, reduction_of
from ..func.forward import RandomState
from ..func.vectors import parameters_to_vector
from ..kfac import (
    FALLBACKS,
    FISHER_TYPES,
    Capture,
    FactorStats,
    KroneckerBlock,
    WeightSharing,
    approximations,
    check_loss,
    find_rules,
    unwrap_model,
    watch_forward,
)
from ._base import PARAM_SHAPES, check_state_dict_params
from ._kfac_capture import KFACCapture
from ._kfac_checks import (
    NONNEGATIVE_LOSSES,
    check_positive,
    first_nonfinite,
    parameter_groups,
)
from ._kfac_quadratic import mlp_chain
from ._kfac_update import KFACUpdate, scaled_change
from ._views import LossView, watch_loss

__all__ = ["KFAC"]

COUNTERS = ("n_skipped_steps", "n_refused_steps")
"""The safeguards' counters, kept in ``param_groups[0]`` (saved with the state)."""


#: whether a loss call re-does the forwards' statistics (it did on the last step): saved so a
#: resumed run gathers them where the uninterrupted one would (the same Monte-Carlo draws)
DEFER_KEY = "kfac_statistics_at_loss"


class KFAC(KFACCapture, KFACUpdate):
    r"""KFAC with the adaptive damping, learning rate and momentum of Martens & Grosse (2015).

    See :mod:`second.optim.kfac` for the algorithm. The defaults are the paper's adaptive
    mode; ``lr=`` and ``momentum=`` switch to fixed values.

    Args:
        model: the network (or its DDP wrapper); its linear, convolution, embedding and
            attention layers get Kronecker factors, its normalization layers their exact
            diagonal, other trainable parameters a diagonal estimate
            (``fallback="diagonal"``) or a damping-only (``"identity"``) block; see
            :mod:`second.kfac.rules` and :meth:`approximations`. Its forward returns one
            tensor, the output ``loss_fn`` is applied to (a tuple or dict raises
            ``TypeError``). Parameters without a gradient at a step (unused by the loss) do
            not move, as in ``torch.optim``.
        loss_fn: the training loss (``MSELoss``, ``CrossEntropyLoss``,
            ``BCEWithLogitsLoss``); used for the curvature only, its ``reduction``
            (default ``"mean"``) must match the loss you backpropagate. Call it in the
            closure: a ``CrossEntropyLoss`` called on the output or on a view, slice or copy
            of it (``logits.reshape(-1, V)``, ``logits[:, :-1].contiguous().view(-1, V)``)
            gives the curvature of the loss as written, with its classes and its ignored
            targets (``ignore_index``; also for ``fisher="empirical"``, which otherwise
            takes its statistics from your backward pass); a loss computed without it takes
            the output's dim 1 as the classes and counts every position.
        params: parameter groups over the model's trainable parameters (dicts with
            ``"params"`` and any of ``lr``, ``weight_decay``, ``momentum``; for example no
            weight decay on norms and biases); the parameters not listed form a last group
            with the defaults. Default: one group. The shared state (damping, counters,
            step) and the quadratic model's settings live in ``param_groups[0]``.
        lr: ``None`` (default): the adaptive mode, step size and momentum from the quadratic
            model; the groups' ``lr`` is then 1.0, a multiplier of the model's step (LR
            schedulers scale it; it must be the same in every group). A float: the fixed
            mode, the learning rate of the natural-gradient step (per group).
        momentum: ``None`` (default): from the quadratic model (within ``[0, 0.95]``) when
            ``lr`` is ``None``, else 0; a float: fixed.
        damping: initial Tikhonov damping :math:`\lambda` (default 3e-3, chosen on the
            zoo of ``benchmarks/bench_zoo.py``; the Levenberg-Marquardt rule adapts it, in
            the loss' units).
        adapt_damping: Levenberg-Marquardt adaptation (default ``True``; needs a closure).
        damping_adaptation_interval: steps between adaptations (default 5).
        damping_adaptation_decay: per-step factor, :math:`\omega = \text{decay}^{\text{interval}}`
            (default 0.95).
        min_damping: lower bound of :math:`\lambda` (default 1e-8).
        max_damping: upper bound of :math:`\lambda` (default 1e8).
        weight_decay: :math:`\eta`, an L2 term added to the gradient and the curvature
            (per group; a layer's block is damped with its weight's group's value).
        factor_decay: :math:`\beta` of the running averages (default 0.95).
        factor_update_period: steps between factor updates (default 1).
        inverse_update_period: steps between eigendecompositions (default 10).
        fisher: ``"mc"`` (default), ``"type2"`` or ``"empirical"``.
        mc_samples: sampled targets per example for ``"mc"`` (default 1).
        kl_clip: KL clipping constant ``c`` in fixed-``lr`` mode (default ``None``: off).
        max_update_norm: clip the update's 2-norm (default ``None``: off).
        fallback: ``"diagonal"`` (default) or ``"identity"``.
        weight_sharing: for layers applied at several positions of an example (sequences,
            attention, convolutions): ``"auto"`` (default: ``nn.Conv2d`` reduces, since an
            image model's loss pools over the pixels; every other layer expands, since a
            sequence model's loss is per position; pass ``"expand"`` for a per-pixel loss),
            ``"expand"`` or ``"reduce"`` for every layer, or ``{module name pattern or type:
            mode}`` per layer (see :mod:`second.kfac.rules`); :meth:`approximations`
            reports what each parameter got.
        distributed: all-reduce statistics (default: when a process group is initialized).

    Raises:
        ValueError: an invalid hyperparameter; a model without trainable parameters.
        NotImplementedError: an unsupported loss for ``fisher="mc"``/``"type2"``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> loss_fn = torch.nn.MSELoss()
        >>> opt = KFAC(model, loss_fn)
        >>> X, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = loss_fn(model(X), y)
        ...     loss.backward()
        ...     return loss
        >>> first = closure().item()
        >>> for _ in range(20):
        ...     _ = opt.step(closure)
        >>> loss_fn(model(X), y).item() < first
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        params: Iterable[dict] | None = None,
        lr: float | None = None,
        momentum: float | None = None,
        damping: float = 3e-3,
        adapt_damping: bool = True,
        damping_adaptation_interval: int = 5,
        damping_adaptation_decay: float = 0.95,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_update_period: int = 1,
        inverse_update_period: int = 10,
        fisher: str = "mc",
        mc_samples: int = 1,
        kl_clip: float | None = None,
        max_update_norm: float | None = None,
        fallback: str = "diagonal",
        distributed: bool | None = None,
        weight_sharing: WeightSharing = "auto",
    ):
        check_positive("damping", damping, strict=True)
        check_positive("min_damping", min_damping, strict=True)
        check_positive("max_damping", max_damping, strict=True)
        if not min_damping <= damping <= max_damping:
            raise ValueError(
                f"need min_damping <= damping <= max_damping, got {min_damping}, {damping}, {max_damping}"
            )
        if lr is not None:
            check_positive("lr", lr, strict=True)
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        check_positive("weight_decay", weight_decay)
        if not 0.0 <= factor_decay < 1.0:
            raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay}")
        if not 0.0 < damping_adaptation_decay < 1.0:
            raise ValueError(
                f"damping_adaptation_decay must be in (0, 1), got {damping_adaptation_decay}"
            )
        for name, val in (
            ("damping_adaptation_interval", damping_adaptation_interval),
            ("factor_update_period", factor_update_period),
            ("inverse_update_period", inverse_update_period),
            ("mc_samples", mc_samples),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip, strict=True)
        if max_update_norm is not None:
            check_positive("max_update_norm", max_update_norm, strict=True)
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        check_loss(loss_fn, fisher)
        inner = unwrap_model(model)
        params_list = [p for p in inner.parameters() if p.requires_grad]
        if not params_list:
            raise ValueError("the model has no parameters that require grad")
        groups = parameter_groups(params_list, params)
        defaults = dict(
            lr=1.0 if lr is None else lr,
            adaptive=lr is None,
            momentum=momentum,
            damping=float(damping),
            adapt_damping=adapt_damping,
            damping_adaptation_interval=damping_adaptation_interval,
            damping_adaptation_decay=damping_adaptation_decay,
            min_damping=min_damping,
            max_damping=max_damping,
            weight_decay=weight_decay,
            factor_decay=factor_decay,
            factor_update_period=factor_update_period,
            inverse_update_period=inverse_update_period,
            kl_clip=kl_clip,
            max_update_norm=max_update_norm,
            step=0,
            factor_steps=0,
            **dict.fromkeys(COUNTERS, 0),
        )
        self._building = True
        super().__init__(groups, defaults)
        self._building = False
        params = params_list
        self._params = params  # every optimized parameter, in the model's order
        self.model, self.inner, self.loss_fn = model, inner, loss_fn
        self.reduction = reduction_of(loss_fn)
        self._nonnegative = isinstance(loss_fn, NONNEGATIVE_LOSSES)
        self.fisher, self.mc_samples, self.fallback = fisher, int(mc_samples), fallback
        self.distributed = distributed
        self.layers, diagonal = find_rules(inner, params, weight_sharing=weight_sharing)
        # normalization layers: their exact diagonal (the empirical Fisher has its own)
        exact = fallback == "diagonal" and fisher != "empirical"
        self.diagonal_rules = diagonal if exact else []
        owned = {id(p) for layer in self.layers for p in layer.params()}
        self.fallback_params = [p for p in params if id(p) not in owned]
        self._names = [n for n, p in inner.named_parameters() if p.requires_grad]
        self._capture = Capture(self.layers, self.diagonal_rules).__enter__()
        self._capture.active = False
        # weak references: a deep copy of the model keeps hooks that point here and ignore
        # the copy (and the optimizer is not copied along with the model)
        self._watch = watch_forward(inner, self._pre_hook, self._top_hook)
        # the loss on the captured batch, for the damping adaptation's loss after the step
        self._loss_hook = watch_loss(loss_fn, self._on_loss)
        self._out_ref: weakref.ref | None = None  # the last training forward's output
        # the step's forwards (statistics, and the calls a cross-entropy loss call re-does on
        # its own view of the output and targets: see _kfac_capture._Forward)
        self._forwards: list = []
        self._defer = False  # the loss call re-did them last time: leave them to it
        self._mapping = False  # a loss call is mapping its input onto the output
        self._emp_ignored = 0.0  # empirical Fisher: examples of the statistics all ignored
        self._ce_loss = self._loss_hook is not None and loss_kind(loss_fn) == "ce"
        self._loss_watch = self._ce_loss
        self._loss_view: LossView | None = None  # the last loss call on the output (_views)
        self._n_forwards = 0  # training forwards since the last step
        self._step_forwards = 0  # those of the step in progress
        self._loss_batch: tuple | None = None  # (target args, kwargs, loss ref) of that output
        self._pending: FactorStats | None = None
        self._pending_bad = False  # the last training forward's output was not finite
        self._warned: set[str] = set()
        self._batch: tuple | None = None
        # the generators before the captured forward: the quadratic model's products re-run
        # it with its dropout masks (second.func.forward.RandomState)
        self._rng: RandomState | None = None
        self._rng_next: RandomState | None = None
        self._in_step = False
        self._warned_closure = False
        self.last_info: dict = {}
        self._index = {id(p): i for i, p in enumerate(params)}
        self._inv_cache: dict[int, tuple[tuple, KroneckerBlock]] = {}
        self._inv_version = 0
        self._numels = [p.numel() for p in params]
        self._offsets = [sum(self._numels[:i]) for i in range(len(params))]
        self._numel = sum(self._numels)
        self._prev_views: list[Tensor] | None = None  # state "delta"s: views of _prev_flat
        self._prev_flat: Tensor | None = None
        # a plain Sequential of Linear layers, elementwise activations and dropouts: the quadratic
        # model's JVPs reuse the captured forward (see _chain_jvp)
        self._chain = None if self.fallback_params else mlp_chain(inner, self.layers)
        self._masks: dict[int, list[Tensor | None]] = {}
        self._fwd_masks: dict[int, Tensor | None] = {}
        dropouts = {id(m): m for kind, m in self._chain or [] if kind == "dropout"}
        self._mask_hooks = [h for m in dropouts.values() for h in self._dropout_hooks(m)]
        self._conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in inner.modules())
        self._reverse_jvp = False  # set when a module has no forward-mode rule (LSTM)
        self._fwd: tuple | None = None

    def close(self) -> None:
        """Remove the hooks from the model (the optimizer cannot step afterwards)."""
        self._capture.close()
        self._watch.remove()
        for h in self._mask_hooks:
            h.remove()
        if self._loss_hook is not None:
            self._loss_hook.remove()
        self._forwards.clear()

    def add_param_group(self, param_group: dict) -> None:
        """Parameter groups are fixed at construction (``KFAC(model, loss_fn, params=...)``).

        Raises:
            ValueError: after construction: the layers' factors are built from the model's
                parameters, so a group must be one of those given to the constructor.
        """
        if not getattr(self, "_building", False):
            raise ValueError(
                "KFAC's parameter groups are given at construction, as groups of the model's "
                "parameters: KFAC(model, loss_fn, params=[{'params': [...], 'weight_decay': 0.0}, "
                "...]); every trainable parameter not listed goes to a last group with the defaults"
            )
        lr = param_group.get("lr")
        if lr is not None:
            check_positive("lr", lr, strict=True)
        check_positive("weight_decay", param_group.get("weight_decay", 0.0))
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(  # type: ignore[override]  # the closure's loss is returned as a tensor
        self, closure: Callable[[], Tensor] | None = None
    ) -> Tensor | None:
        r"""One KFAC update, committed only when it is finite (a transaction).

        Safeguards (counted in ``param_groups[0]``, see :attr:`counters`, each kind warned
        once): a non-finite loss, gradient, model output or curvature statistic skips the
        step (``n_skipped_steps``): parameters, factors and eigendecompositions stay as they
        were and the damping is raised. A quadratic-model step with a non-finite or
        non-positive learning rate, a non-finite momentum (the model's momentum is chosen
        within ``[0, 0.95]``), a predicted change of the loss that is not negative, or a
        predicted decrease of more than twice the loss for a loss bounded below by 0 (MSE,
        cross-entropy, BCE; the damping is then raised) is refused (``n_refused_steps``) and
        replaced by the model's minimizer along :math:`\Delta` alone (no momentum) when that
        one is acceptable, else by the KL-clipped natural-gradient step :math:`\nu\Delta`,
        :math:`\nu = \min(1, \sqrt{c / |\Delta^\top\nabla h|})` (``c = kl_clip``, or
        1e-3), with the damping raised. A step after which the
        closure's loss is not finite is taken back (``n_skipped_steps``). The damping stays
        in ``[min_damping, max_damping]``.

        Args:
            closure: re-evaluates the model on the current mini-batch and returns the loss
                (it may call ``backward``; if it does not, the optimizer does). Needed by
                the Levenberg-Marquardt damping adaptation, which every
                ``damping_adaptation_interval`` steps needs the loss after the step on the
                same batch: when the closure ran one forward whose output went straight
                into ``loss_fn`` and returned that loss (``loss = loss_fn(model(x), y)``),
                it is re-evaluated on the captured batch without gradients (no backward; ``p.grad`` keeps the
                step's gradient); otherwise the closure is called once more. Without a
                closure, run the forward and backward pass before calling ``step()``.

        Returns:
            The closure's loss (before the step), or ``None``.

        Raises:
            RuntimeError: no training forward pass was seen before the first step.
        """
        group = self.param_groups[0]
        params = self._params
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
                if all(p.grad is None for p in params) and loss.requires_grad:
                    loss.backward()
        self._step_forwards, self._n_forwards = self._n_forwards, 0
        for key in COUNTERS:  # a state saved before the counters existed
            group.setdefault(key, 0)
        adaptive = group.get("adaptive", group["lr"] is None)
        self._flush_forwards()
        pending, bad_output = self._pending, self._pending_bad
        self._pending, self._pending_bad = None, False
        ignored, self._emp_ignored = self._emp_ignored, 0.0
        if pending is None and not bad_output and group["factor_steps"] == 0:
            raise RuntimeError(
                "KFAC has no curvature statistics yet: run the model's forward pass in training "
                "mode (with gradients enabled) before step(), or pass a closure that does"
            )
        # 1. everything this step reads must be finite before anything is committed
        if loss is not None and not math.isfinite(float(loss)):
            return self._skip("loss", group, loss)
        if bad_output:
            return self._skip("model output", group, loss)
        lam = group["damping"]
        etas = self._per_param("weight_decay")
        # a parameter without a gradient (unused by the loss) does not move, as in torch.optim:
        # no weight decay, no momentum, its part of the step zeroed
        unused = [p.grad is None for p in params]
        if any(unused):
            etas = [0.0 if u else e for u, e in zip(unused, etas)]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        if len(set(etas)) == 1:
            if etas[0]:
                grads = list(torch._foreach_add(grads, params, alpha=etas[0]))
        else:
            grads = [g.add(p, alpha=e) if e else g for g, p, e in zip(grads, params, etas)]
        gflat = parameters_to_vector(grads)
        new = None
        if pending is not None:
            if self.fisher == "empirical":
                self._empirical_diagonal(pending, ignored)
            new = self._new_factors(pending, group)
        # one reduction and one synchronization for the gradient and all new statistics
        stats = [t for _, _, t in new] if new is not None else []
        bad = first_nonfinite([gflat, *stats])
        if bad is not None:
            return self._skip("gradient" if bad == 0 else "curvature statistic", group, loss)
        snapshot = self._snapshot(group)
        if new is not None:
            for st, key, t in new:
                st[key] = t
            group["factor_steps"] += 1
        if group["factor_steps"] == 0:
            raise RuntimeError("KFAC has no curvature statistics yet (the batch had no examples)")
        stale = any("lG" not in layer.state_in(self.state) for layer in self.layers)
        if stale or group["step"] % group["inverse_update_period"] == 0:
            self._update_inverses(group)

        # 2. the direction and its step size
        Delta = self._precondition(grads, lam, etas, group).neg_()
        prev = self._previous_update(params)
        if any(unused):
            Delta, prev = self._without(unused, Delta), self._without(unused, prev)
        info: dict = {}
        if adaptive:
            delta = self._adaptive_step(Delta, prev, gflat, loss, lam, etas, group, info)
        else:
            b1 = float(Delta.unsqueeze(0) @ gflat)
            delta, alpha, mom = self._fixed_step(Delta, prev, gflat, b1, group)
            info.update(alpha=alpha, mu=mom)
        if group["max_update_norm"] is not None:
            norm = float(delta.norm())
            if norm > group["max_update_norm"]:
                kappa = group["max_update_norm"] / norm
                delta = delta * kappa
                if "predicted_change" in info:  # the damping adaptation compares with it
                    info["predicted_change"] = scaled_change(
                        info["predicted_change"], info["linear_change"], kappa
                    )
                    info["linear_change"] *= kappa
        if not bool(torch.isfinite(delta).all()):
            self._restore(snapshot, group)
            return self._skip("update", group, loss)

        # 3. commit
        views = self._unflat(delta)
        adapt = (
            adaptive
            and group["adapt_damping"]
            and (group["step"] + 1) % group["damping_adaptation_interval"] == 0
        )
        backup = [p.clone() for p in params] if adapt and closure is not None else None
        torch._foreach_add_(params, views)
        group["step"] += 1
        if adapt:
            if closure is None:
                if not self._warned_closure:
                    warnings.warn(
                        "KFAC's Levenberg-Marquardt damping adaptation needs a closure "
                        "(opt.step(closure)); the damping stays fixed",
                        stacklevel=outside_stacklevel(),
                    )
                    self._warned_closure = True
            elif not self._adapt_damping(closure, loss, info, group):
                # the loss after the step is not finite: take the step back
                assert backup is not None
                torch._foreach_copy_(params, backup)
                group["step"] -= 1
                self._restore(snapshot, group)
                return self._skip("loss after the step", group, loss)
        for p, d in zip(params, views):
            self.state[p]["delta"] = d
        self._prev_views, self._prev_flat = views, delta
        info["damping"] = group["damping"]
        self.last_info = info
        return loss

    def approximations(self) -> dict[str, str]:
        """``{parameter name: approximation}`` (see :func:`second.kfac.approximations`).

        ``"kronecker"``, ``"kronecker-expand"``/``"kronecker-reduce"`` (a layer seen shared
        over positions so far), ``"diagonal-exact"``, ``"diagonal"`` or ``"identity"``.
        """
        params = self._params
        return approximations(self.inner, self.layers, self.diagonal_rules, params, self.fallback)

    @property
    def counters(self) -> dict[str, int]:
        """The safeguards' counters: ``n_skipped_steps`` (non-finite) and ``n_refused_steps``."""
        group = self.param_groups[0]
        return {k: int(group.get(k, 0)) for k in COUNTERS}

    def _without(self, unused: list[bool], v: Tensor | None) -> Tensor | None:
        """The flat vector ``v`` with the parts of the ``unused`` parameters zeroed."""
        if v is None:
            return None
        v = v.clone()
        for u, o, m in zip(unused, self._offsets, self._numels):
            if u:
                v[o : o + m] = 0.0
        return v

    # ------------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        """The state of ``torch.optim.Optimizer``, plus the parameter shapes it belongs to."""
        sd = super().state_dict()
        sd[PARAM_SHAPES] = [list(p.shape) for g in self.param_groups for p in g["params"]]
        sd[DEFER_KEY] = self._defer  # where the next forward's statistics are gathered
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the state (factors, eigendecompositions, momentum, damping, counters).

        Raises:
            ValueError: if it was saved for another number or shapes of parameters.
        """
        check_state_dict_params(
            "KFAC", [p for g in self.param_groups for p in g["params"]], state_dict
        )
        super().load_state_dict(state_dict)
        for g in self.param_groups:  # saved before lr held the adaptive mode's multiplier
            if g["lr"] is None:
                g["lr"], g["adaptive"] = 1.0, True
            g.setdefault("adaptive", False)
        self._defer = bool(state_dict.get(DEFER_KEY, False))
        self._inv_cache.clear()
        self._prev_views = self._prev_flat = None
        self._index = {id(p): i for i, p in enumerate(self._params)}
        for p, st in self.state.items():  # the stored factor dtypes may differ from p's
            for k, v in list(st.items()):
                if isinstance(v, Tensor) and isinstance(p, Tensor):
                    st[k] = v.to(device=p.device, dtype=p.dtype)
