"""Exact curvature diagonals from per-example products: one backward pass per output dimension."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .. import distributed as dist
from .._losses import reduction_of
from ..data import Task, as_task, iterate_batches, map_batch
from ..func import parameters_to_vector

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
) -> Tensor:
    r"""The exact diagonal of the generalized Gauss-Newton matrix (= Fisher "type2").

    :math:`\mathrm{diag}(G) = \sum_i \sum_k (J_i^\top s_{ik})^{\odot 2}` with
    :math:`\sum_k s_{ik} s_{ik}^\top = \nabla^2_f \ell_i` the exact factorization of example
    ``i``'s output Hessian (``C`` columns for ``C`` outputs). Each column costs one
    vector-Jacobian product per example, batched with :func:`torch.func.vmap` over examples and
    columns: ``C`` backward passes' worth of work over the data, as BackPACK's and laplace-torch's
    exact diagonals, instead of the ``P`` products a dense matrix would take. Examples are
    processed ``chunk_size`` at a time (default: as many as keep ``C x chunk x P`` floats under
    ``2^26``), so memory is flat in the number of examples.

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
    for batch in batches:
        with torch.no_grad():
            f = task.output(model, batch)
        # the output Hessian's square root, for the batch's share of the loss
        S = output_hessian_sqrt(loss_fn, f, red)  # [K, n, *f.shape[1:]]
        if red == "mean":  # per-example factors; the mean is over all the data's examples
            S = S / n_total**0.5
        K, n = S.shape[0], S.shape[1]
        chunk = chunk_size or max(1, MEMORY_BUDGET // max(1, K * P))
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n), device=device)
            examples = task.take(batch, idx)
            cols = S[:, idx].movedim(1, 0)  # [m, K, *f.shape[1:]]

            def per_example(example, s):
                _, pull = vjp(lambda th: output_of(th, example), theta0)
                return vmap(pull)(s)[0]  # dict of [K, *shape]

            grads = vmap(per_example)(examples, cols)
            total += parameters_to_vector([(grads[k] ** 2).sum(dim=(0, 1)) for k in keys])
    return dist.all_reduce_sum(total, distributed)
