"""An Influence's scores and self-influence with ``curvature="kfac"``/``"ekfac"``.

The training and query gradients stay in Kronecker form (every layer's input rows and
output gradients, :mod:`second.influence`): the memory is that of one chunk and a block of
``max_memory`` bytes, never ``batch_size`` dense gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._errors import NonFiniteError
from ..func.per_example import ModelFunction, check_rows_finite
from ._cache import chunk_digest
from ._examples import warn_ignored, zero_rows
from ._scoring import KroneckerScorer, default_memory, example_matrices, kronecker_gradients

__all__ = ["KroneckerScoring"]


class KroneckerScoring:
    """Kronecker-form queries, scores and self-influence for :class:`~second.Influence`.

    A mixin: the host holds the model, task, operator, cache and settings, and the
    sharded chunk loop (:meth:`~second.influence._sharding.ShardedWork._each_chunk`).
    """

    def _fallback_function(self, fb) -> ModelFunction | None:
        """The model as a function of the parameters outside the Kronecker blocks (or None)."""
        if not fb:
            return None
        names = {id(p): k for k, p in self.model.named_parameters()}
        return ModelFunction(self.model, self.task, {names[id(p)]: p for p in fb})

    def _kronecker_queries(self, test_data):
        r"""Preconditioned query gradients per layer and fallback parameter.

        Per Kronecker-factored layer :math:`w\,(B_l + \mu I)^{-1}` applied to the query
        gradients in matrix form ``[q, d_G, d_A]``, never as dense rows; per other
        parameter its diagonal solve. :math:`w` is the training examples' common weight
        (1 when their weights differ: the scores weigh each training example then).
        Computed once per test set (memory, ``cache_dir``).

        Returns:
            ``(mats, fallback)``: the layers' matrices and ``(names, V parts, function)``
            for the other parameters (``None`` when there are none).
        """
        self._check_model()
        test = self._test(test_data)
        tkey = test.digest(self.batch_size)
        self._same_on_all_ranks("test data", tkey)
        warn_ignored(test, self.loss_fn)
        memo = self._ihvp_memo.get(("kronecker", tkey))
        if memo is not None:
            return memo
        op = self.operator
        inv = op.inverse(damping=self.shift)  # checks the damped blocks are invertible
        rules, lam = op.rules, self.shift
        w = 1.0 if self.weight is None else self.weight
        fb = op.fallback_parameters
        fb_fn = self._fallback_function(fb)
        like = self.fn.params[0]
        memory = self.max_memory or default_memory()
        mats = [like.new_zeros(test.n, r.d_G, r.d_A) for r in rules]
        fvs = [like.new_zeros(test.n, p.numel()) for p in fb]

        def compute(chunk, s: int, rows: int) -> dict[str, Tensor]:
            calls, _ = kronecker_gradients(rules, self.model, self.task, chunk, True)
            block = {}
            for j, r in enumerate(rules):
                out = mats[j][s : s + rows]
                step = max(1, memory // (8 * out[0].numel() * out.element_size()))
                for b in range(0, rows, step):  # the solve's temporaries stay small
                    e = min(b + step, rows)
                    M = example_matrices(r, calls[j], b, e)
                    M = zero_rows(M, self._test_zero_rows(test, s + b, s + e))
                    check_finite(M, "test example", s + b)
                    out[b : b + step] = inv.blocks[j].solve(M, lam, inv.split).mul_(w)
                block[f"L{j}"] = out
                calls[j] = []
            if fb_fn is not None:
                G = fb_fn.gradients(chunk, measure=True)
                G = zero_rows(G, self._test_zero_rows(test, s, s + rows))
                G = check_rows_finite(G, "test example", s)
                off = 0
                for i, p in enumerate(fb):
                    k = p.numel()
                    v = G[:, off : off + k].reshape(rows, *p.shape)
                    fvs[i][s : s + rows] = w * inv.diagonals[i].solve(v, lam).reshape(rows, k)
                    block[f"F{i}"] = fvs[i][s : s + rows]
                    off += k
            for t in block.values():
                check_finite(t, "inverse-HVP of test example", s)
            return block

        def body(c: int, s: int, chunk) -> None:
            name, rows = f"kquery-{self.key}-{tkey}-{c}", self.task.batch_size(chunk)
            if self.cache is not None:
                shapes = {f"L{j}": (rows, r.d_G, r.d_A) for j, r in enumerate(rules)}
                shapes.update({f"F{i}": (rows, p.numel()) for i, p in enumerate(fb)})
                block = self.cache.load_tensors(name, None, shapes)
                if block is not None:
                    for j in range(len(rules)):
                        mats[j][s : s + rows] = block[f"L{j}"].to(like)
                    for i in range(len(fb)):
                        fvs[i][s : s + rows] = block[f"F{i}"].to(like)
                    return
            block = compute(chunk, s, rows)  # written into mats and fvs in place
            if self.cache is not None:
                self.cache.save_tensors(name, block)

        self._each_chunk(test, "inverse-HVPs", body)
        mats = [self._gather(M) for M in mats]
        fvs = [self._gather(v) for v in fvs]
        names = {id(p): k for k, p in self.model.named_parameters()}
        out = (mats, ([names[id(p)] for p in fb], fvs, fb_fn) if fb else None)
        self._ihvp_memo[("kronecker", tkey)] = out
        return out

    def _kronecker_scores(self, test_data) -> dict[str, Tensor]:
        """Per-module scores from Kronecker-form training gradients, chunk by chunk (cached)."""
        mats, fallback = self._kronecker_queries(test_data)
        tkey = self._test(test_data).digest(self.batch_size)
        dtype = self.score_dtype or self.fn.dtype
        memory = self.max_memory or default_memory()
        scorer = KroneckerScorer(
            self.operator.rules,
            mats,
            fallback,
            self.model,
            self.task,
            dtype,
            self.query_rank,
            memory,
        )

        def compute(chunk, s: int) -> dict[str, Tensor]:
            block = scorer(chunk)
            if self.weight is None:  # the queries carry no weight: each example its own
                block = {m: self._weigh(t, s) for m, t in block.items()}
            return block

        return self._kronecker_pass(
            compute, scorer.q, scorer.modules, f"kscores-{tkey}", "scores", dtype
        )

    def _kronecker_pass(
        self, compute: Callable, q: int, mods, tag: str, desc: str, dtype
    ) -> dict[str, Tensor]:
        """``{module: [q, n_train]}`` filled chunk by chunk by ``compute(chunk, start)``; cached."""
        out = {m: torch.zeros(q, self.n_train, dtype=dtype, device=self.fn.device) for m in mods}

        def body(c: int, s: int, chunk) -> None:
            nb, block = self.task.batch_size(chunk), None
            name = f"{tag}-{self.key}-{c}"
            meta = {"data": chunk_digest(chunk)}
            if self.cache is not None:
                block = self.cache.load_tensors(name, meta, {m: (q, nb) for m in mods})
                if block is not None and any(t.dtype != dtype for t in block.values()):
                    block = None
            if block is None:
                block = compute(chunk, s)
                if not all(bool(torch.isfinite(t.sum())) for t in block.values()):
                    raise NonFiniteError(
                        f"{desc} of training examples {s}..{s + nb - 1} are not finite"
                    )
                if self.cache is not None:
                    self.cache.save_tensors(name, block, meta)
            for m in mods:
                out[m][:, s : s + nb] = block[m].to(out[m])

        self._each_chunk(self.train, desc, body)
        return {m: self._gather(t) for m, t in out.items()}

    def _kronecker_self_influence(self) -> Tensor:
        r""":math:`w_j \sum_l \langle M_{jl}, (B_l + \mu I)^{-1} M_{jl} \rangle` per example.

        In each block's eigenbasis the quadratic form is a weighted sum of squares of the
        rotated per-example gradient; for a layer with one position per example that is
        :math:`\sum_{g,a} (Q_G^\top g)_g^2 (Q_A^\top a)_a^2 / (s + \mu)_{ga}`, one product
        per layer and chunk.
        """
        op = self.operator
        inv = op.inverse(damping=self.shift)
        rules, lam = op.rules, self.shift
        fb_fn = self._fallback_function(op.fallback_parameters)
        memory = self.max_memory or default_memory()

        def compute(chunk, s: int) -> dict[str, Tensor]:
            calls, n = kronecker_gradients(rules, self.model, self.task, chunk)
            total = self.fn.params[0].new_zeros(n)
            for j, r in enumerate(rules):
                E, D = inv.blocks[j], inv.blocks[j].damped_eigenvalues(lam, inv.split)
                one = len(calls[j]) == 1 and not r.diag_A and calls[j][0][0].shape[1] == 1
                if one:
                    a, g = calls[j][0]
                    ar = a[:, 0] if E.QA is None else a[:, 0] @ E.QA
                    total += (((g[:, 0] @ E.QG) ** 2) @ (1.0 / D) * ar**2).sum(1)
                    continue
                step = max(1, memory // (4 * r.d_G * r.d_A * total.element_size()))
                for b in range(0, n, step):
                    M = example_matrices(r, calls[j], b, min(b + step, n))
                    total[b : b + step] += (E.rotate(M) ** 2 / D).sum((1, 2))
            if fb_fn is not None:
                G, off = fb_fn.gradients(chunk), 0
                for d in inv.diagonals:
                    k = d.diagonal.numel()
                    total += (G[:, off : off + k] ** 2 / (d.diagonal.reshape(-1) + lam)).sum(1)
                    off += k
            return {"self": self._weigh(total.unsqueeze(0), s)}

        parts = self._kronecker_pass(compute, 1, ["self"], "kself", "self-influence", self.fn.dtype)
        return parts["self"][0]


def check_finite(t: Tensor, what: str, offset: int) -> None:
    """Raise naming the non-finite rows of ``t``, checking a sum first (no temporary of its size)."""
    if not bool(torch.isfinite(t.sum())):  # a NaN/Inf, or a finite sum that overflowed
        check_rows_finite(t, what, offset)
