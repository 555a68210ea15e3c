"""Exact curvature diagonals from per-example products: one backward pass per output dimension."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .. import distributed as dist
from .._losses import reduction_of
from ..data import Task, as_task, iterate_batches, map_batch
from ..func import map_examples, parameters_to_vector

__all__ = ["ggn_diagonal"]

MEMORY_BUDGET = 2**26  # floats of per-example gradients held at once (256 MB in float32)


def ggn_diagonal(
    model: nn.Module,
    loss_fn: Callable,
    data,
    params: Sequence[Tensor] | None = None,
    *,
    reduction: str | None = None,
    task: Task | None = None,
    chunk_size: int | None = None,
    distributed: bool | None = None,
    method: str = "auto",
) -> Tensor:
    r"""The exact diagonal of the generalized Gauss-Newton matrix (= Fisher "type2").

    :math:`\mathrm{diag}(G) = \sum_i \sum_k (J_i^\top s_{ik})^{\odot 2}` with
    :math:`\sum_k s_{ik} s_{ik}^\top = \nabla^2_f \ell_i` the exact factorization of example
    ``i``'s output Hessian (``C`` columns for ``C`` outputs): ``C`` backward passes' worth of
    work over the data, as BackPACK's and laplace-torch's exact diagonals, instead of the ``P``
    products a dense matrix would take. Two ways:

    * ``method="layers"``: when every parameter belongs to an ``nn.Linear`` or ``nn.Conv2d``
      (``groups=1``, numeric padding) that runs once per forward pass, the ``C`` columns are
      back-propagated through the batch to the layers' outputs (``C`` ordinary backward passes)
      and each layer's diagonal is formed from its inputs: :math:`(g^{\odot 2})^\top
      a^{\odot 2}` for a linear layer on one vector per example, the squared per-example
      gradients (unfolded inputs times output gradients) otherwise.
    * ``method="vmap"``: any model; one vector-Jacobian product per example and column,
      batched with :func:`torch.func.vmap`. Examples are processed ``chunk_size`` at a time
      (default: as many as keep ``C x chunk x P`` floats under ``2^26``).
    * ``method="auto"`` (default): ``"layers"`` where it applies (checked per batch), else
      ``"vmap"``.

    Memory is flat in the number of examples either way.

    Data parallel, as the curvature operators: under an initialized ``torch.distributed``
    process group each rank passes its own shard of the data, and the diagonal (and, for a
    mean loss, the example count) is summed over ranks, so every rank gets the diagonal of the
    whole dataset.

    Args:
        model: the network.
        loss_fn: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        data: one batch, an iterable of batches, or a map-style dataset.
        params: the parameters (default: all trainable ones), in the order of the result.
        reduction: the loss reduction (default: the loss's own).
        task: how to run the model on a batch (default: ``(X, y)`` pairs).
        chunk_size: examples per vectorized product.
        distributed: sum over the process group (default: when one is initialized).
        method: ``"auto"``, ``"layers"`` or ``"vmap"`` (see above).

    Returns:
        The flat diagonal (length ``P``), in the parameters' dtype.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> d = ggn_diagonal(model, nn.MSELoss(), (X, y))
        >>> from second import GGNOperator
        >>> torch.allclose(d, torch.diagonal(GGNOperator(model, nn.MSELoss(), (X, y)).to_dense()))
        True
    """
    from ..kfac import output_hessian_sqrt  # the loss Hessian's factorization has one owner

    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise ValueError("ggn_diagonal needs at least one parameter")
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"parameters {missing} are not parameters of the model")
    keys = [names[id(p)] for p in params]
    if method not in ("auto", "layers", "vmap"):
        raise ValueError(f"method must be 'auto', 'layers' or 'vmap', got {method!r}")
    layers = None if method == "vmap" else _layer_plan(model, params)
    if method == "layers" and layers is None:
        raise ValueError(
            "method='layers' needs every parameter in an nn.Linear or nn.Conv2d (groups=1, "
            "numeric padding, zero padding mode); use method='vmap'"
        )
    red = reduction_of(loss_fn, reduction)
    task = as_task(task, loss_fn)
    device = params[0].device
    P = sum(p.numel() for p in params)
    fixed = {n: t.detach() for n, t in model.named_parameters()}
    fixed.update({n: b for n, b in model.named_buffers()})
    total = torch.zeros(P, dtype=params[0].dtype, device=device)
    batches = list(iterate_batches(data, task, device))
    count = torch.tensor(
        [float(sum(task.batch_size(b) for b in batches))], dtype=torch.float64, device=device
    )
    n_total = float(dist.all_reduce_sum(count, distributed)[0])

    def output_of(theta, example):
        batch = map_batch(example, lambda t: t.unsqueeze(0))
        full = dict(fixed)
        full.update(theta)

        def run(*args, **kwargs):
            return functional_call(model, full, args, kwargs)

        return task.output(run, batch)[0]

    theta0 = {k: p.detach() for k, p in zip(keys, params)}

    def by_vmap(batch) -> Tensor:
        """The batch's share by per-example vector-Jacobian products (any model)."""
        part = torch.zeros(P, dtype=params[0].dtype, device=device)
        with torch.no_grad():
            f = task.output(model, batch)
        # the output Hessian's square root, for the batch's share of the loss
        y = _targets(task, loss_fn, batch)
        S = _scaled_sqrt(output_hessian_sqrt, loss_fn, f, red, n_total, y)  # [K, n, *f.shape[1:]]
        K, n = S.shape[0], S.shape[1]
        chunk = chunk_size or max(1, MEMORY_BUDGET // max(1, K * P))
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n), device=device)
            examples = task.take(batch, idx)
            cols = S[:, idx].movedim(1, 0)  # [m, K, *f.shape[1:]]

            def per_example(example, s):
                _, pull = vjp(lambda th: output_of(th, example), theta0)
                return vmap(pull)(s)[0]  # dict of [K, *shape]

            grads = map_examples(per_example, examples, cols)
            part += parameters_to_vector([(grads[k] ** 2).sum(dim=(0, 1)) for k in keys])
        return part

    for batch in batches:
        part = None
        if layers is not None:
            y = _targets(task, loss_fn, batch)
            sqrt = lambda f, y=y: _scaled_sqrt(output_hessian_sqrt, loss_fn, f, red, n_total, y)  # noqa: E731
            part = _by_layers(model, task, batch, layers, params, sqrt, chunk_size)
            if part is None and method == "layers":
                raise ValueError(
                    "method='layers': a Linear/Conv2d layer ran more than once, or on inputs "
                    "without the batch in the first dimension; use method='vmap'"
                )
        total += by_vmap(batch) if part is None else part
    return dist.all_reduce_sum(total, distributed)


def _targets(task, loss_fn, batch) -> Tensor | None:
    """The batch's targets where the loss' curvature depends on them (cross-entropy, BCE)."""
    from .._losses import needs_targets

    return task.targets(batch) if needs_targets(loss_fn) else None


def _scaled_sqrt(
    output_hessian_sqrt, loss_fn, f: Tensor, red: str, n_total: float, y: Tensor | None = None
) -> Tensor:
    """The output Hessian's square root ``[K, n, *f.shape[1:]]`` for the batch's share.

    For a mean loss the per-example factors are scaled by ``1 / sqrt(N)``, ``N`` the examples
    of all the data (over all ranks); the targets weigh a loss that depends on them
    (ignored targets, class weights).
    """
    S = output_hessian_sqrt(loss_fn, f.detach(), red, y)
    return S / n_total**0.5 if red == "mean" else S


def _layer_plan(
    model: nn.Module, params: list[Tensor]
) -> list[tuple[nn.Module, bool, bool]] | None:
    """``(layer, weight wanted, bias wanted)`` covering ``params``.

    ``None`` if some parameter is not in a plain ``nn.Linear`` or ``nn.Conv2d``.
    """
    wanted = {id(p) for p in params}
    plan, covered = [], set()
    for m in model.modules():
        if type(m) not in (nn.Linear, nn.Conv2d):
            continue
        if type(m) is nn.Conv2d and (
            m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros"
        ):
            continue
        w = id(m.weight) in wanted
        b = m.bias is not None and id(m.bias) in wanted
        if w or b:
            plan.append((m, w, b))
            covered |= {id(m.weight)} if w else set()
            covered |= {id(m.bias)} if b else set()
    return plan if covered == wanted else None


def _by_layers(model, task, batch, plan, params, sqrt, chunk_size) -> Tensor | None:
    """One batch's diagonal from the layers' inputs and back-propagated output factors.

    ``None`` when a layer ran other than once or its input's first dimension is not the batch.
    """
    n_b = task.batch_size(batch)
    records: dict[nn.Module, list] = {m: [] for m, _, _ in plan}

    def keep(module, inputs, output):
        records[module].append((inputs[0].detach(), output))

    handles = [m.register_forward_hook(keep) for m, _, _ in plan]
    try:
        with torch.enable_grad():
            f = task.output(model, batch)
    finally:
        for h in handles:
            h.remove()
    runs = [records[m] for m, _, _ in plan]
    if any(len(r) != 1 or r[0][0].shape[0] != n_b or not r[0][1].requires_grad for r in runs):
        return None
    if any(type(m) is nn.Conv2d and r[0][0].dim() != 4 for (m, _, _), r in zip(plan, runs)):
        return None
    S = sqrt(f)
    K = S.shape[0]
    diag = {id(p): torch.zeros_like(p) for p in params}
    outs = [r[0][1] for r in runs]
    for k in range(K):
        gs = torch.autograd.grad(f, outs, grad_outputs=S[k], retain_graph=k < K - 1)
        for (m, w, b), r, g in zip(plan, runs, gs):
            a = r[0][0]
            if type(m) is nn.Conv2d:
                assert not isinstance(m.padding, str)  # the plan admits numeric padding only
                cols = nn.functional.unfold(
                    a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
                )  # [n, in * kh * kw, L]
                g = g.reshape(g.shape[0], g.shape[1], -1).mT  # [n, L, out]
            else:
                cols = a.reshape(a.shape[0], -1, a.shape[-1]).mT  # [n, in, T]
                g = g.reshape(g.shape[0], -1, g.shape[-1])  # [n, T, out]
            if b:
                diag[id(m.bias)] += (g.sum(1) ** 2).sum(0)
            if w:
                diag[id(m.weight)] += _squared_gradients(cols, g, chunk_size).reshape(
                    m.weight.shape
                )
    return parameters_to_vector([diag[id(p)] for p in params])


def _squared_gradients(cols: Tensor, g: Tensor, chunk_size: int | None) -> Tensor:
    """``sum_n (g_n^T cols_n^T)^2``: per-example weight gradients ``[out, in]``, squared, summed.

    One position per example (a linear layer on vectors) needs no per-example gradient:
    ``(g^2)^T (a^2)``.
    """
    if g.shape[1] == 1:
        return (g[:, 0] ** 2).T @ (cols[:, :, 0] ** 2).to(g.dtype)
    n, out, inp = g.shape[0], g.shape[2], cols.shape[1]
    chunk = chunk_size or max(1, MEMORY_BUDGET // max(1, out * inp))
    total = g.new_zeros(out, inp)
    for s in range(0, n, chunk):
        G = g[s : s + chunk].mT @ cols[s : s + chunk].mT  # [c, out, in]
        total += (G**2).sum(0)
    return total
