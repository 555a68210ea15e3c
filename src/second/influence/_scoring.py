r"""Pairwise scores from per-example gradients in Kronecker form, never as dense rows.

For a layer whose weight matrix (bias as a last column) is ``[d_G, d_A]``, example
:math:`j`'s gradient is :math:`\sum_t g_{jt} a_{jt}^\top` (input rows :math:`a`, output
gradients :math:`g`, positions :math:`t`), so its score against a preconditioned query
gradient :math:`V_q` (same matrix form) is

.. math:: \langle V_q, \nabla_W \ell_j \rangle = \sum_t g_{jt}^\top V_q\, a_{jt},

computed for a block of queries and training examples by one matrix product
``[q d_G, d_A] x [d_A, n]`` when every example has one position (the per-example gradient
is never formed), by rank-``r`` factors :math:`V_q \approx U_q W_q^\top` when the query
gradients are sketched (``(g^\top U)(W^\top a)``, :math:`O(n (d_G + d_A) q r)`), and
otherwise from the per-example matrices of a few examples at a time. Parameters outside
the Kronecker-factored layers use their per-example gradients (``vmap``), which are
small. Each module's contribution is kept apart (per-module scores).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..data import Task, map_batch
from ..kfac.capture import Capture

__all__ = [
    "KroneckerScorer",
    "kronecker_gradients",
    "example_matrices",
    "available_memory",
    "default_memory",
]


def available_memory() -> int | None:
    """Bytes of memory available to this process (``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory() -> int:
    """The default working memory of a score block, in bytes.

    A sixty-fourth of the available memory, between 8 MiB and 16 MiB: the products stay
    large enough to run at full speed, and the blocks small beside the model.
    """
    avail = available_memory()
    budget = 16 * 2**20 if avail is None else avail // 64
    return int(min(max(budget, 8 * 2**20), 16 * 2**20))


def example_losses(task: Task, out: Tensor, batch) -> Tensor:
    """Per-example losses ``[n]`` of a batch from its output: the loss of a batch of one each."""

    def one(o, ex):
        return task.loss(o.unsqueeze(0), map_batch(ex, lambda t: t.unsqueeze(0))).reshape(())

    try:
        return vmap(one)(out, batch)
    except (RuntimeError, NotImplementedError):  # a loss vmap cannot trace: one at a time
        n = out.shape[0]
        return torch.stack([one(out[i], task.take(batch, i)) for i in range(n)])


def kronecker_gradients(
    rules, model: nn.Module, task: Task, batch, measure: bool = False
) -> tuple[list[list[tuple[Tensor, Tensor]]], int]:
    """Per-example gradients of a batch in Kronecker form: per layer, ``(a, g)`` per call.

    ``a [n, T, d_A]`` are the input rows (an embedding's: indices), ``g [n, T, d_G]`` the
    gradients of each example's own loss (``measure``: the task's measurement) at the
    layer's output, padding masked. The loss is taken per example from one batched
    forward; a task that defines its own :meth:`~second.Task.measurement` is run on
    batches of one.

    Returns:
        ``(calls, n)``: per layer the list of its calls, and the number of examples.
    """
    own_measure = measure and type(task).measurement is not Task.measurement
    if not own_measure:
        with Capture(rules) as cap, torch.enable_grad():
            out = task.output(model, batch)
            losses = example_losses(task, out, batch)
        return _calls(rules, cap, losses.sum()), int(losses.shape[0])
    n = task.batch_size(batch)
    per: list[list[list[tuple[Tensor, Tensor]]]] = []
    for i in range(n):
        with Capture(rules) as cap, torch.enable_grad():
            m = task.measurement(model, task.take(batch, slice(i, i + 1))).reshape(())
        per.append(_calls(rules, cap, m))
    calls = [
        [
            (torch.cat([p[j][c][0] for p in per]), torch.cat([p[j][c][1] for p in per]))
            for c in range(len(per[0][j]))
        ]
        for j in range(len(rules))
    ]
    return calls, n


def _calls(rules, cap: Capture, total: Tensor) -> list[list[tuple[Tensor, Tensor]]]:
    js = [j for j in range(len(rules)) if j in cap.outputs]
    outs = [o for j in js for o in cap.outputs[j]]
    grads = torch.autograd.grad(total, outs, allow_unused=True) if outs else []
    calls: list[list[tuple[Tensor, Tensor]]] = [[] for _ in rules]
    pos = 0
    for j in js:
        layer = rules[j]
        for inp in cap.inputs[j]:
            g = grads[pos]
            pos += 1
            if g is None:
                g = torch.zeros_like(cap.outputs[j][0])
            grows = layer.grad_rows(g.detach().unsqueeze(0), inp, "expand")[0]  # [n, T, d_G]
            mask = layer.mask(inp)
            if mask is not None:
                grows = grows * mask.unsqueeze(-1).to(grows.dtype)
            calls[j].append((layer.input_rows(inp, "expand"), grows))
    return calls


def example_matrices(layer, calls: list[tuple[Tensor, Tensor]], start: int, stop: int) -> Tensor:
    """Per-example gradients ``[m, d_G, d_A]`` of one layer for examples ``start:stop``."""
    M = None
    for a, g in calls:  # a module called twice: its gradients add up
        m = layer.per_example_mats(a[start:stop], g[start:stop].unsqueeze(0))[0]
        M = m if M is None else M + m
    if M is None:  # a layer the examples do not reach: a zero gradient
        w = layer.weight
        return w.new_zeros(stop - start, layer.d_G, layer.d_A)
    return M


class KroneckerScorer:
    r"""Scores of training chunks against fixed preconditioned query gradients, per module.

    Args:
        rules: the Kronecker-factored layers.
        mats: per layer, the preconditioned and scaled query gradients ``[q, d_G, d_A]``.
        fallback: ``(name, V [q, numel], ModelFunction)`` for the other parameters, or
            ``None`` when there are none.
        model: the network.
        task: how to run it and take the per-example loss.
        dtype: the dtype of the products and of the scores.
        rank: sketch every layer's query matrices to this rank (``None``: exact).
        memory: bytes one intermediate block may take (sets the query block and the
            examples per per-example-matrix block).
    """

    def __init__(
        self,
        rules,
        mats: list[Tensor],
        fallback,
        model: nn.Module,
        task: Task,
        dtype: torch.dtype,
        rank: int | None,
        memory: int,
    ):
        self.rules, self.model, self.task = rules, model, task
        self.dtype, self.memory = dtype, int(memory)
        self.q = mats[0].shape[0] if mats else fallback[1][0].shape[0]
        self.mats: list[Tensor] = []
        self.sketch: list[tuple[Tensor, Tensor] | None] = []
        for layer, M in zip(rules, mats):
            sk = None
            if rank is not None and not layer.diag_A and rank < min(layer.d_G, layer.d_A):
                work = torch.float64 if M.dtype == torch.float64 else torch.float32
                U, S, Wh = torch.linalg.svd(M.to(work), full_matrices=False)
                U = (U[..., :rank] * S[:, None, :rank]).to(dtype)  # [q, d_G, r]
                W = Wh[:, :rank, :].transpose(1, 2).to(dtype)  # [q, d_A, r]
                sk = (U, W)
                M = M[:0]  # the sketch replaces the matrices
            M = M.to(dtype)
            if sk is None and layer.d_A < layer.d_G:  # the smaller side is contracted last
                M = M.transpose(1, 2).contiguous()
            self.mats.append(M)
            self.sketch.append(sk)
        self.fallback_names, self.fallback_V, self.fallback_fn = (
            ([], [], None) if fallback is None else fallback
        )
        self.fallback_V = [v.to(dtype) for v in self.fallback_V]

    @property
    def modules(self) -> list[str]:
        """The keys of a score block: every layer's module name, then every fallback parameter."""
        return [layer.name for layer in self.rules] + list(self.fallback_names)

    def __call__(self, batch) -> dict[str, Tensor]:
        """Scores ``[q, n]`` of a batch's examples, per module (keys: :attr:`modules`)."""
        calls, n = kronecker_gradients(self.rules, self.model, self.task, batch)
        blocks: dict[str, Tensor] = {}
        for j, layer in enumerate(self.rules):
            S = torch.zeros(self.q, n, dtype=self.dtype, device=layer.weight.device)
            for a, g in calls[j]:
                if a.is_floating_point():
                    a = a.to(self.dtype)
                S += self._layer_scores(j, layer, a, g.to(self.dtype))
            blocks[layer.name] = S
        if self.fallback_fn is not None:
            G = self.fallback_fn.gradients(batch).to(self.dtype)  # [n, P_fallback]
            off = 0
            for name, Vf in zip(self.fallback_names, self.fallback_V):
                k = Vf.shape[1]
                blocks[name] = Vf @ G[:, off : off + k].T
                off += k
        return blocks

    def _layer_scores(self, j: int, layer, a: Tensor, g: Tensor) -> Tensor:
        n, T = g.shape[0], g.shape[1]
        item = torch.finfo(self.dtype).bits // 8
        sk = self.sketch[j]
        if sk is not None:
            U, W = sk
            r = U.shape[-1]
            step = max(1, self.memory // max(1, 2 * T * self.q * r * item))
            parts = []
            for s in range(0, n, step):
                gs, as_ = g[s : s + step], a[s : s + step]
                GU = torch.einsum("ntg,qgr->ntqr", gs, U)
                AW = torch.einsum("nta,qar->ntqr", as_, W)
                parts.append((GU * AW).sum((1, 3)).T)
            return torch.cat(parts, 1)
        M = self.mats[j]
        q, dG, dA = M.shape[0], layer.d_G, layer.d_A
        if T == 1 and not layer.diag_A:
            a0, g0 = a[:, 0, :], g[:, 0, :]
            # M is [q, d_G, d_A], or [q, d_A, d_G] when d_A < d_G (see __init__): the
            # product contracts the larger side, the intermediate keeps the smaller
            left, right = (a0, g0) if dG <= dA else (g0, a0)
            width, k = M.shape[1], M.shape[2]
            qb = max(1, self.memory // max(1, width * n * item))
            parts = []
            for s in range(0, q, qb):  # [qb width, k] x [k, n], then along width
                P = (M[s : s + qb].reshape(-1, k) @ left.T).reshape(-1, width, n)
                parts.append(P.mul_(right.T.unsqueeze(0)).sum(1))
            return torch.cat(parts, 0)
        step = max(1, self.memory // max(1, 2 * dG * dA * item))
        flat = M.reshape(q, -1)
        parts = []
        for s in range(0, n, step):
            per = layer.per_example_mats(a[s : s + step], g[s : s + step].unsqueeze(0))[0]
            if dA < dG:  # M is stored transposed
                per = per.transpose(1, 2)
            parts.append(flat @ per.reshape(per.shape[0], -1).T)
        return torch.cat(parts, 1)
