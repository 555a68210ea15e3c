"""The KFAC optimizer's factors, preconditioning, step sizes and safeguards.

:class:`KFACUpdate` holds the helpers of :meth:`second.optim.KFAC.step`: the running factors
and their eigendecompositions, the damped preconditioner, the fixed and adaptive step sizes,
the exact quadratic model's curvature terms, and the transaction (snapshot, restore, skip)
with the Levenberg-Marquardt damping adaptation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import distributed as dist
from ..func.forward import module_jvp
from ..func.vectors import columns_to_parameters, parameters_to_vector, vector_to_parameters
from ..kfac import DiagonalBlock, EigenBlock, FactorStats, KroneckerBlock, eigen_blocks
from ._kfac_capture import KFACAttributes
from ._kfac_checks import OVERRATE, check_positive, clamp_damping, refusal
from ._kfac_quadratic import chain_jvp, ggn_gram, step_coefficients
from ._views import LossView, loss_point

SAFE_KL_CLIP = 1e-3
"""KL clipping constant of the step that replaces a refused quadratic-model step (no ``kl_clip``)."""

_MISSING = object()


def scaled_change(pred: float, linear: float, s: float) -> float:
    """The quadratic model's change for the step times ``s`` (linear part ``s``, rest ``s**2``)."""
    return s * s * (pred - linear) + s * linear


class KFACUpdate(KFACAttributes):
    """The step's helpers of :class:`second.optim.KFAC` (factors, preconditioning, safeguards)."""

    def _dist(self) -> bool:
        return dist.active(self.distributed)

    def _new_factors(
        self, stats: FactorStats, group: dict
    ) -> list[tuple[dict, str, Tensor]] | None:
        """The running factors with ``stats`` folded in, as ``(state, key, tensor)`` to commit.

        Nothing is written: the caller commits after checking the result (``None``: the
        statistics hold no example).
        """
        if self._dist():
            stats.all_reduce()  # forms the products of pending rows first
        if stats.n == 0:
            return None
        w = 1.0 / stats.n if self.reduction == "mean" else 1.0
        lstates = [layer.state_in(self.state) for layer in self.layers]
        dstates = [self.state[p] for p in self.fallback_params]
        A_run, G_run = [], []
        for layer, st in zip(self.layers, lstates):
            A, G = st.get("A"), st.get("G")
            if A is None or G is None:
                shape = (layer.d_A,) if layer.diag_A else (layer.d_A, layer.d_A)
                A, G = layer.weight.new_zeros(shape), layer.weight.new_zeros(layer.d_G, layer.d_G)
            A_run.append(A)
            G_run.append(G)
        d_run = [
            st.get("diag", torch.zeros_like(p)) for st, p in zip(dstates, self.fallback_params)
        ]
        A_new, G_new, d_new = stats.ema(A_run, G_run, d_run, group["factor_decay"], w)
        return (
            [(st, "A", t) for st, t in zip(lstates, A_new)]
            + [(st, "G", t) for st, t in zip(lstates, G_new)]
            + [(st, "diag", t) for st, t in zip(dstates, d_new)]
        )

    def _update_inverses(self, group: dict) -> None:
        """Eigendecompose the bias-corrected factors.

        Under torch.distributed layer ``j`` is decomposed on rank ``j % world_size`` and
        shared (:func:`second.kfac.eigen_blocks`): the factors are identical on all ranks
        after the all-reduce, so the result is the same and the work is split.
        """
        corr = 1.0 / (1.0 - group["factor_decay"] ** group["factor_steps"])
        states = [layer.state_in(self.state) for layer in self.layers]
        blocks = eigen_blocks([(st["A"], st["G"]) for st in states], corr, split=self._dist())
        for st, e in zip(states, blocks):
            st["lA"], st["QA"], st["lG"], st["QG"] = e.lA, e.QA, e.lG, e.QG
        self._inv_version += 1

    def _layer_inverse(self, j: int, layer, lam: float) -> KroneckerBlock:
        r"""The pi-damped inverse of layer ``j``'s block, cached until damping or spectra change."""
        key = (lam, self._inv_version)
        hit = self._inv_cache.get(j)
        if hit is not None and hit[0] == key:
            return hit[1]
        st = layer.state_in(self.state)
        inv = EigenBlock(st["lA"], st["QA"], st["lG"], st["QG"]).inverse(lam)
        self._inv_cache[j] = (key, inv)
        return inv

    def _precondition(
        self, grads: list[Tensor], lam: float, etas: list[float], group: dict
    ) -> Tensor:
        """``F_breve^{-1} g``, flat in parameter order, with factored damping ``sqrt(lam + eta)``.

        ``eta``: a layer's weight decay is its weight's group's.
        """
        out = grads[0].new_empty(self._numel)
        index, offsets = self._index, self._offsets
        for j, layer in enumerate(self.layers):
            iw = index[id(layer.weight)]
            ib = index[id(layer.bias)] if layer.has_bias else None
            M = layer.matrix_of(grads[iw], None if ib is None else grads[ib])
            inv = self._layer_inverse(j, layer, lam + etas[iw])
            vw, vb = layer.params_of(inv.matmul(M))
            o = offsets[iw] + layer.w_offset
            out[o : o + vw.numel()].view(vw.shape).copy_(vw)
            if ib is not None and vb is not None:
                o = offsets[ib] + layer.b_offset
                out[o : o + vb.numel()].copy_(vb)
        corr = 1.0 / (1.0 - group["factor_decay"] ** max(group["factor_steps"], 1))
        for p in self.fallback_params:
            i = index[id(p)]
            d = self.state[p].get("diag")
            d = torch.zeros_like(p) if d is None else d * corr
            o = offsets[i]
            out[o : o + p.numel()].view(p.shape).copy_(
                DiagonalBlock(d).solve(grads[i], lam + etas[i])
            )
        return out

    def _per_param(self, key: str) -> list[float]:
        """A group setting (``lr``, ``weight_decay``, ``momentum``) per parameter, in model order."""
        groups = self.param_groups
        if len(groups) == 1:
            return [groups[0][key]] * len(self._params)
        where = {id(p): g for g in groups for p in g["params"]}
        return [where[id(p)][key] for p in self._params]

    def _flat_values(self, values: list[float], like: Tensor) -> Tensor:
        """A flat vector holding ``values[i]`` on parameter ``i``'s entries."""
        return torch.cat([like.new_full((n,), float(v)) for v, n in zip(values, self._numels)])

    def _decay_terms(self, V: Tensor, etas: list[float]) -> Tensor:
        r"""The weight decay's curvature :math:`[v_a^\top \mathrm{diag}(\eta) v_b]`."""
        if len(set(etas)) == 1:
            return etas[0] * (V @ V.T)
        return (V * self._flat_values(etas, V)) @ V.T

    def _adaptive_scale(self) -> float:
        """The adaptive mode's lr: one multiplier of the quadratic model's step, in every group."""
        lrs = set(self._per_param("lr"))
        if len(lrs) != 1:
            raise ValueError(
                "in KFAC's adaptive mode lr multiplies the quadratic model's step and must be "
                f"the same in every parameter group, got {sorted(lrs)} (a scheduler scales all "
                "groups alike; per-group learning rates need the fixed mode, KFAC(..., lr=...))"
            )
        s = lrs.pop()
        check_positive("lr", s, strict=True)
        return float(s)

    def _adaptive_step(
        self,
        Delta: Tensor,
        prev: Tensor | None,
        gflat: Tensor,
        loss: Tensor | None,
        lam: float,
        etas: list[float],
        group: dict,
        info: dict,
    ) -> Tensor:
        r"""The quadratic model's update :math:`\alpha\Delta + \mu\delta_0`, or its safe replacement.

        The coefficients minimize the exact quadratic model (:func:`step_coefficients`); a
        step the model proposes with a non-finite or non-positive learning rate, a momentum
        outside ``[0, 0.95]``, a predicted change that is not negative, or a predicted
        decrease of more than ``OVERRATE`` times a non-negative loss is refused (counted,
        warned once) and replaced by the step along ``Delta`` alone, else by the KL-clipped
        natural-gradient step with the damping raised. ``lr`` scales the result. Records
        ``alpha``, ``mu``, ``predicted_change``, ``lr_scale`` (and ``refused``) in ``info``.
        """
        V = torch.stack([Delta, prev]) if prev is not None else Delta.unsqueeze(0)  # [k, n]
        # one product for the gradient terms and the norms: [g.v_a, v_a.v_b]
        Gram = (V @ torch.cat([gflat.unsqueeze(0), V]).T).tolist()
        gV = [row[0] for row in Gram]  # gradient . (Delta, delta0)
        nrm = [row[1:] for row in Gram]
        b1 = gV[0]
        # the weight decay's curvature joins F: [v_a (F + diag(eta)) v_b]
        Fq = (self._quadratic_terms(V) + self._decay_terms(V, etas)).tolist()
        alpha, mu, pred = step_coefficients(Fq, nrm, gV, lam, 0.0, group["momentum"])
        # a loss bounded below by 0 cannot fall by more than its value in one step (with a
        # margin for the model's noise: OVERRATE)
        floor = -float(loss) * OVERRATE if loss is not None and self._nonnegative else -math.inf
        reason = refusal(alpha, mu, pred, floor)
        if reason is not None:
            group["n_refused_steps"] += 1
            info["refused"] = reason
            overrated = pred < floor
            if overrated:  # the model overrates its step: trust it less from now on
                group["damping"] = self._raised_damping(group)
            # first the model's step along Delta alone (no momentum) ...
            alpha, mu, pred = step_coefficients(Fq, nrm, gV, lam, 0.0, 0.0)
            if refusal(alpha, mu, pred, floor) is None:
                replacement = "the quadratic model's step without momentum"
            else:
                # ... else the KL-clipped natural-gradient step, and more damping
                c = group["kl_clip"] if group["kl_clip"] is not None else SAFE_KL_CLIP
                descent = math.isfinite(b1) and b1 < 0.0
                alpha, mu = (min(1.0, math.sqrt(c / -b1)) if descent else 0.0), 0.0
                curv = Fq[0][0]
                pred = alpha * b1 + (0.5 * alpha * alpha * curv if math.isfinite(curv) else 0.0)
                group["damping"] = self._raised_damping(group)
                replacement = "a KL-clipped natural-gradient step (and the damping raised)"
            hint = ""
            if overrated and not self._own_loss(loss):
                # the usual cause when it repeats: the gradient is of another loss than the
                # curvature (a sum where loss_fn is a mean: the batch size apart)
                hint = (
                    "; the closure's loss was not computed by KFAC's loss_fn: if its reduction "
                    "differs (a sum where loss_fn takes the mean, or the reverse), the gradient "
                    "and the curvature disagree by the batch size and every step is refused, "
                    "so compute it with loss_fn"
                )
            self._warn_once(
                "refused",
                f"KFAC step {group['step']}: the quadratic model proposed {reason}; the step "
                f"was refused and replaced by {replacement} (counted in "
                f"param_groups[0]['n_refused_steps'], warned once){hint}",
            )
        # lr: a multiplier of the model's step (a scheduler's factor), the same in every group
        s = self._adaptive_scale()
        linear = alpha * gV[0] + (mu * gV[1] if prev is not None else 0.0)
        if s != 1.0:
            pred, linear = scaled_change(pred, linear, s), s * linear
            alpha, mu = s * alpha, s * mu
        delta = (
            torch.add(alpha * Delta, prev, alpha=mu) if mu and prev is not None else alpha * Delta
        )
        info.update(alpha=alpha, mu=mu, predicted_change=pred, linear_change=linear, lr_scale=s)
        return delta

    def _fixed_step(
        self, Delta: Tensor, prev: Tensor | None, g: Tensor, b1: float, group: dict
    ) -> tuple[Tensor, float, float]:
        r"""The fixed-lr update :math:`\nu\,\mathrm{lr}\,\Delta + \mu\delta_0`, per group lr and momentum.

        Returns ``(delta, lr * nu, momentum)`` (the first group's values when they differ).
        """
        lrs = self._per_param("lr")
        moms = [m or 0.0 for m in self._per_param("momentum")]
        uniform = len(set(lrs)) == 1
        # KL clipping: nu^2 lr^2 |Delta . g| <= c, the lr per parameter
        if uniform:
            lr_g = lrs[0] * lrs[0] * abs(b1)
        else:
            lr_vec = self._flat_values(lrs, Delta)
            lr_g = abs(float((lr_vec * lr_vec * Delta) @ g))
        nu = 1.0
        if group["kl_clip"] is not None and lr_g != 0.0:
            nu = min(1.0, math.sqrt(group["kl_clip"] / lr_g))
        delta = (lrs[0] * nu) * Delta if uniform else (nu * lr_vec) * Delta
        if prev is not None and any(moms):
            if len(set(moms)) == 1:
                delta.add_(prev, alpha=moms[0])
            else:
                delta.addcmul_(self._flat_values(moms, prev), prev)
        return delta, lrs[0] * nu, moms[0]

    def _unflat(self, v: Tensor) -> list[Tensor]:
        """Views of a flat vector shaped like the parameters."""
        return list(vector_to_parameters(v, self._params))

    def _previous_update(self, params: list[Tensor]) -> Tensor | None:
        """The previous update ``delta_0`` flat (``None`` before the first one)."""
        views = self._prev_views
        if views is not None and all(
            self.state[p].get("delta") is v for p, v in zip(params, views)
        ):
            return self._prev_flat
        prev = [self.state[p].get("delta") for p in params]
        if any(d is None for d in prev):
            return None
        return parameters_to_vector(prev)

    def _quadratic_terms(self, V: Tensor) -> Tensor:
        r"""The matrix :math:`[v_a^\top F v_b]` of the exact mini-batch GGN for the rows of ``V [k, n]``.

        Forward-mode JVPs: from the captured forward for a plain MLP, else by ``torch.func``;
        a model with an operation that has no forward-mode rule (an LSTM on CPU,
        ``weight_norm``) gets them by reverse-over-reverse AD from then on.
        """
        tangents = columns_to_parameters(V.T, self._params)  # views of V's column blocks
        if self._fwd is not None and self._chain is not None:
            out, Jv = chain_jvp(
                self._chain, self.layers, self._index, self._fwd, tangents, self._fwd_masks
            )
        else:
            if self._batch is None:
                raise RuntimeError("KFAC's quadratic model needs a captured training forward")
            params = [p.detach() for p in self._params]
            args = (self.inner, self._names, params, self._batch, tangents)
            try:
                out, Jv = module_jvp(
                    *args, vectorize=not self._conv, reverse=self._reverse_jvp, rng=self._rng
                )
            except NotImplementedError:  # an operation without a forward-mode rule (an LSTM,
                if self._reverse_jvp:  # weight_norm): reverse-over-reverse from now on
                    raise
                self._reverse_jvp = True
                out, Jv = module_jvp(*args, reverse=True, rng=self._rng)
        view = self._loss_view if self._loss_view is not None else LossView(1, None)
        if view.dim != 1:  # the loss has the output's classes along `dim` (_take_loss)
            out, Jv = out.movedim(view.dim, 1), Jv.movedim(view.dim + 1, 2)
        if view.values is not None or view.scale != 1.0:  # a scaled or shifted output
            out, Jv = loss_point(out, view), Jv * view.scale
        return ggn_gram(self.loss_fn, self.reduction, out, Jv, self._dist(), view.target)

    def _own_loss(self, loss: Tensor | None) -> bool:
        """Whether ``loss_fn`` computed the step's loss (on the output, or a view of it)."""
        if self._loss_view is not None:  # a cross-entropy loss_fn call on the output or a view
            return True
        return self._loss_batch is not None and loss is not None and self._loss_batch[2]() is loss

    def _raised_damping(self, group: dict) -> float:
        omega = group["damping_adaptation_decay"] ** group["damping_adaptation_interval"]
        return clamp_damping(group["damping"] / omega, group)

    def _skip(self, what: str, group: dict, loss: Tensor | None) -> Tensor | None:
        """Refuse a step with a non-finite ``what``: nothing committed, damping raised."""
        group["damping"] = self._raised_damping(group)
        group["n_skipped_steps"] += 1
        group["step"] += 1
        self._warn_once(
            "skipped",
            f"KFAC step {group['step'] - 1}: non-finite {what}; the non-finite update was not "
            "applied (parameters, statistics and factors unchanged) and the damping is increased "
            "(counted in param_groups[0]['n_skipped_steps'], warned once)",
        )
        self.last_info = {
            "skipped": True,
            "reason": f"non-finite {what}",
            "damping": group["damping"],
        }
        return loss

    def _snapshot(self, group: dict) -> tuple:
        """References to everything a step replaces (the step writes new tensors, never in place)."""
        keys = ("A", "G", "lA", "QA", "lG", "QG")
        saved = [
            (st, k, st.get(k, _MISSING))
            for st in (lay.state_in(self.state) for lay in self.layers)
            for k in keys
        ]
        saved += [
            (self.state[p], "diag", self.state[p].get("diag", _MISSING))
            for p in self.fallback_params
        ]
        return saved, group["factor_steps"], group["damping"]

    def _restore(self, snapshot: tuple, group: dict) -> None:
        saved, group["factor_steps"], _ = snapshot
        for st, k, v in saved:
            if v is _MISSING:
                st.pop(k, None)
            else:
                st[k] = v
        self._inv_cache.clear()
        self._inv_version += 1

    def _trial_loss(self, closure, loss: Tensor) -> Tensor:
        """The closure's loss after the step on the step's batch, for Levenberg-Marquardt.

        When the closure ran one training forward and returned ``loss_fn(output, ...)``
        itself (``loss``, the very tensor), that loss is re-evaluated by a forward pass
        without gradients on the captured batch (no backward); else the closure is called
        again (a closure that adds a regularizer, or returns a copy, keeps its own loss).
        """
        self._in_step = True
        try:
            if (
                self._loss_batch is not None
                and self._step_forwards == 1
                and self._batch is not None
            ):
                rest, lkw, ref = self._loss_batch
                if ref() is loss:
                    args, kwargs = self._batch
                    # on copies of the buffers: a BatchNorm in training mode must not count
                    # this evaluation in its running statistics
                    # (a forward with dropout draws afresh here, as a closure call would: with
                    # the training forward's masks instead, the dropout transformer of
                    # bench_zoo.py trained worse, BENCHMARKS.md)
                    bufs = {k: b.clone() for k, b in self.inner.named_buffers()}
                    with torch.no_grad():
                        out = torch.func.functional_call(self.inner, bufs, args, kwargs)
                        return self.loss_fn(out, *rest, **lkw)
            with torch.enable_grad():
                return closure()
        finally:
            self._in_step = False

    def _adapt_damping(self, closure, loss, info, group) -> bool:
        """Levenberg-Marquardt; ``False`` when the loss after the step is not finite."""
        new_loss = self._trial_loss(closure, loss)
        vals = torch.tensor([float(loss), float(new_loss)], dtype=torch.float64)
        if self._dist():
            vals = vals.to(self._params[0].device)
            dist.all_reduce_sum(vals)
            vals = vals.cpu() / dist.world_size()
        change = float(vals[1] - vals[0])
        if not math.isfinite(change):
            return False
        pred = info["predicted_change"]
        rho = change / pred if pred < 0 else -math.inf
        omega = group["damping_adaptation_decay"] ** group["damping_adaptation_interval"]
        lam = group["damping"]
        if rho < 0.25:
            lam = lam / omega
        elif rho > 0.75:
            lam = lam * omega
        group["damping"] = clamp_damping(lam, group)
        info["rho"] = rho
        return True
