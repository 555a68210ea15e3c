"""Exact curvature diagonals from per-example products: one backward pass per output dimension."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .. import distributed as dist
from .._losses import reduction_of
from ..data import Task, as_task, batch_coupled_modules, iterate_batches, map_batch
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
      gradients (unfolded inputs times output gradients) otherwise. A parameter must be
      used by its layer alone: one registered in two modules (a weight shared by two layers,
      an embedding tied to the output head) is refused, and every backward pass checks that
      the layers' gradients, summed over the examples, are the parameters' own gradients
      (a parameter also used outside its layer, say by ``F.linear``, fails the check).
    * ``method="vmap"``: any model; one vector-Jacobian product per example and column,
      batched with :func:`torch.func.vmap`. Examples are processed ``chunk_size`` at a time
      (default: as many as keep ``C x chunk x P`` floats under ``2^26``).
    * ``method="auto"`` (default): ``"layers"`` where it applies (checked per batch), else
      ``"vmap"``.

    Memory is flat in the number of examples either way.

    Both need the loss to be a sum of per-example terms of per-example outputs: a model that
    normalizes with the statistics of the batch (batch norm in training mode, or without
    running statistics) couples the examples, has no per-example decomposition, and is
    refused (call ``model.eval()``; :func:`~second.spectral.diagonal` estimates the diagonal
    of such a model's :class:`~second.GGNOperator`).

    Over several batches the diagonal is that of the loss torch computes on all the data at
    once, as the curvature operators' (:class:`~second.GGNOperator`): for a mean loss batch
    ``b`` counts :math:`W_b / W`, :math:`W_b` what torch's mean divides its loss by (the
    examples; for ``CrossEntropyLoss`` with class indices the class weights of the targets
    that are not ``ignore_index``) and :math:`W = \sum_b W_b`. A batch whose every target is
    ignored weighs 0 and is skipped. The weights come from the targets alone, before the
    single pass over the data.

    Data parallel, as the curvature operators: under an initialized ``torch.distributed``
    process group each rank passes its own shard of the data, and the diagonal (and, for a
    mean loss, the total weight :math:`W`) is summed over ranks, so every rank gets the
    diagonal of the whole dataset.

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

    Raises:
        ValueError: an unknown ``method``; ``method="layers"`` on a model it does not cover
            (see above); a batch-coupled model; a mean loss without weight (every target of
            the data is ``ignore_index``, or has class weight 0).
        NotImplementedError: a loss other than the three above (its output Hessian has no
            factorization here).

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
    refuse_unsupported(model, loss_fn)
    layers, why = (None, "") if method == "vmap" else _layer_plan(model, params)
    if method == "layers" and layers is None:
        raise ValueError(f"method='layers' {why}; use method='vmap'")
    red = reduction_of(loss_fn, reduction)
    task = as_task(task, loss_fn)
    device = params[0].device
    P = sum(p.numel() for p in params)
    fixed = {n: t.detach() for n, t in model.named_parameters()}
    fixed.update({n: b for n, b in model.named_buffers()})
    total = torch.zeros(P, dtype=params[0].dtype, device=device)
    batches = list(iterate_batches(data, task, device))
    # each batch's targets and share of the loss: its weight W_b in torch's mean (the examples,
    # or the class weights of the valid targets) over the total W = sum_b W_b of all ranks
    targets = [_targets(task, loss_fn, b) for b in batches]
    weights = [_batch_weight(task, loss_fn, red, b, y) for b, y in zip(batches, targets)]
    summed = torch.tensor([math.fsum(weights)], dtype=torch.float64, device=device)
    w_total = float(dist.all_reduce_sum(summed, distributed)[0])
    if red == "mean" and w_total == 0.0:
        raise ValueError(
            "ggn_diagonal: the mean loss has no weight: every target of the data is the loss' "
            "ignore_index (or has class weight 0), so torch's mean loss is 0/0 (NaN) and has "
            "no curvature"
        )

    def batch_output(theta, batch):
        full = dict(fixed)
        full.update(theta)

        def run(*args, **kwargs):
            return functional_call(model, full, args, kwargs)

        return task.output(run, batch)

    def output_of(theta, example):
        return batch_output(theta, map_batch(example, lambda t: t.unsqueeze(0)))[0]

    theta0 = {k: p.detach() for k, p in zip(keys, params)}

    def by_vmap(batch, y: Tensor | None, divisor: float) -> Tensor:
        """The batch's share by per-example vector-Jacobian products (any model)."""
        part = torch.zeros(P, dtype=params[0].dtype, device=device)
        with torch.no_grad():
            f = task.output(model, batch)
        # the output Hessian's square root, for the batch's share of the loss
        S = _scaled_sqrt(output_hessian_sqrt, loss_fn, f, red, divisor, y)  # [K, n, *f.shape[1:]]
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

    check = True  # whether the layer path still has to check for uses outside the layers
    for batch, y, w_b in zip(batches, targets, weights):
        if red == "mean" and w_b == 0.0:
            continue  # every target ignored: no share of the loss
        # the batch's diagonal (of its own loss, times n_b) is divided by n_b W / W_b: the
        # batch counts W_b / W of the mean (N for every batch of an unweighted loss, n_b for
        # the only batch)
        n_b = task.batch_size(batch)
        divisor = float(n_b) if w_b == w_total else w_total * n_b / w_b
        part: Tensor | None = None
        if layers is not None:
            sqrt = partial(
                _scaled_sqrt, output_hessian_sqrt, loss_fn, red=red, divisor=divisor, y=y
            )
            theta = {k: p.detach().requires_grad_() for k, p in zip(keys, params)}
            forward = lambda b, theta=theta: batch_output(theta, b)  # noqa: E731
            got = _by_layers(
                forward, task, batch, layers, params, theta, keys, sqrt, chunk_size, check
            )
            if isinstance(got, str):
                if method == "layers":
                    raise ValueError(f"method='layers': {got}; use method='vmap'")
                if got is _OUTSIDE:  # the model's structure: not for this batch only
                    layers = None
            else:
                part = got
                check = False  # a use outside the layers is the model's: checked once
        total += by_vmap(batch, y, divisor) if part is None else part
    return dist.all_reduce_sum(total, distributed)


def unsupported_reason(model: nn.Module, loss_fn: Callable) -> str | None:
    """Why :func:`ggn_diagonal` cannot give this model's and loss' diagonal, else ``None``."""
    found = _unsupported(model, loss_fn)
    return None if found is None else found[1]


def _unsupported(model: nn.Module, loss_fn: Callable) -> tuple[type[Exception], str] | None:
    """The error type and reason :func:`refuse_unsupported` raises, else ``None``."""
    from .._losses import linear_loss_note, loss_kind

    note = linear_loss_note(loss_fn)
    if note is not None:
        return NotImplementedError, note
    if loss_kind(loss_fn) is None:
        return NotImplementedError, (
            "the exact GGN diagonal factorizes the output Hessian of MSELoss, "
            f"CrossEntropyLoss and BCEWithLogitsLoss; {type(loss_fn).__name__} is not one of them"
        )
    coupled = batch_coupled_modules(model)
    if coupled:
        return ValueError, (
            f"the model normalizes with the statistics of the batch ({', '.join(coupled[:3])}: "
            "batch norm in training mode, or without running statistics), which couples the "
            "examples of a batch: the GGN diagonal has no per-example decomposition"
        )
    return None


def refuse_unsupported(model: nn.Module, loss_fn: Callable) -> None:
    """Raise where :func:`ggn_diagonal` cannot give the exact diagonal.

    Raises:
        NotImplementedError: a loss without a factorized output Hessian (not ``MSELoss``,
            ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``).
        ValueError: a model that couples the examples of a batch
            (:func:`batch_coupled_modules`).
    """
    found = _unsupported(model, loss_fn)
    if found is None:
        return
    kind, why = found
    if kind is ValueError:
        hint = "call model.eval() first (batch norm with running statistics)"
    else:
        hint = "the GGNOperator takes any loss"
    raise kind(
        f"ggn_diagonal: {why}. Instead: {hint}; estimate the diagonal of a GGNOperator with "
        "diagonal(G, method='hutchinson'), or take diagonal(G, method='exact') from its unit-"
        "vector products on a small model"
    )


def _targets(task, loss_fn, batch) -> Tensor | None:
    """The batch's targets where the loss' curvature depends on them (cross-entropy, BCE)."""
    from .._losses import needs_targets

    return task.targets(batch) if needs_targets(loss_fn) else None


def _batch_weight(task, loss_fn, red: str, batch, y: Tensor | None) -> float:
    """:math:`W_b`, what torch's mean divides the batch's loss by (1 for a sum).

    As the curvature operators (:func:`second.operators.curvature.mean_weight`): the
    examples ``n_b``, or for cross-entropy with class indices the summed class weights of
    the valid targets (0 when every target is ignored).
    """
    from ..operators.curvature import mean_weight

    if red == "sum":
        return 1.0
    return mean_weight(loss_fn, y, task.batch_size(batch))


def _scaled_sqrt(
    output_hessian_sqrt, loss_fn, f: Tensor, red: str, divisor: float, y: Tensor | None = None
) -> Tensor:
    r"""The output Hessian's square root ``[K, n, *f.shape[1:]]`` for the batch's share.

    ``output_hessian_sqrt`` factors ``n_b`` times the Hessian of the batch's own loss (the
    targets weigh a loss that depends on them: ignored targets, class weights). For a mean
    loss the factors are scaled by ``1 / sqrt(divisor)``, ``divisor`` :math:`= n_b W / W_b`
    so that the batch counts :math:`W_b / W` of the loss on all the data (over all ranks);
    it is the number of examples ``N`` for an unweighted loss.
    """
    S = output_hessian_sqrt(loss_fn, f.detach(), red, y)
    return S / divisor**0.5 if red == "mean" else S


def _layer_plan(
    model: nn.Module, params: list[Tensor]
) -> tuple[list[tuple[nn.Module, bool, bool]] | None, str]:
    """``(layer, weight wanted, bias wanted)`` covering ``params``, or ``None`` and why not.

    ``None`` if some parameter is not in a plain ``nn.Linear`` or ``nn.Conv2d``, or is
    registered in more than one module (a weight shared by two layers, an embedding tied to
    an output head): its layer's gradient is then only part of the parameter's.
    """
    wanted = {id(p) for p in params}
    owners: dict[int, set[tuple[int, str]]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for name, p in m.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) in wanted:
                owners.setdefault(id(p), set()).add((id(m), name))
    shared = [i for i, p in enumerate(params) if len(owners.get(id(p), ())) > 1]
    if shared:
        return None, (
            f"cannot take parameters {shared}: each is registered in more than one module (a "
            "shared or tied weight), so no single layer's gradient is the parameter's"
        )
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
    if covered != wanted:
        return None, (
            "needs every parameter in an nn.Linear or nn.Conv2d (groups=1, numeric padding, "
            "zero padding mode)"
        )
    return plan, ""


def layer_check_rtol(dtype: torch.dtype) -> float:
    """How far (relative to ``||g|| ||a||``) the layers' summed gradients may be from autograd's.

    ``sqrt(eps)`` of the dtype: far above the rounding of the sums, far below a use of the
    parameter outside its layer.
    """
    return math.sqrt(torch.finfo(dtype).eps)


def _by_layers(
    forward, task, batch, plan, params, theta, keys, sqrt, chunk_size, check: bool = True
) -> Tensor | str:
    """One batch's diagonal from the layers' inputs and back-propagated output factors.

    ``forward(batch)`` runs the model with the parameters ``theta`` (a dict by ``keys``, in
    the order of ``params``). Returns why not (a string) when a layer ran other than once,
    its input's first dimension is not the batch, or the layers' gradients summed over the
    examples are not autograd's gradients of the parameters (a use outside the layer).
    """
    n_b = task.batch_size(batch)
    records: dict[nn.Module, list] = {m: [] for m, _, _ in plan}

    def keep(module, inputs, output):
        records[module].append((inputs[0].detach(), output))

    handles = [m.register_forward_hook(keep) for m, _, _ in plan]
    try:
        with torch.enable_grad():
            f = forward(batch)
    finally:
        for h in handles:
            h.remove()
    runs = [records[m] for m, _, _ in plan]
    if any(len(r) != 1 or r[0][0].shape[0] != n_b or not r[0][1].requires_grad for r in runs):
        return (
            "a Linear/Conv2d layer ran more than once, or on inputs without the batch in the "
            "first dimension"
        )
    if any(type(m) is nn.Conv2d and r[0][0].dim() != 4 for (m, _, _), r in zip(plan, runs)):
        return "a Conv2d layer ran on inputs without a batch dimension"
    S = sqrt(f)
    K = S.shape[0]
    leaves = [theta[k] for k in keys]
    outs = [r[0][1] for r in runs]
    # one backward pass of a random mix of the columns checks that each layer's gradient,
    # summed over the examples, is its parameters' own (no use outside the layer); on the
    # first batch only (``check``): it is a property of the model, not of the data
    if check and (bad := _outside_use(f, S, outs, leaves, plan, runs, params)) is not None:
        return bad
    diag = {id(p): torch.zeros_like(p) for p in params}
    for k in range(K):
        gs = torch.autograd.grad(f, outs, grad_outputs=S[k], retain_graph=k < K - 1)
        for (m, w, b), r, g in zip(plan, runs, gs):
            cols, g = _layer_columns(m, r[0][0], g)
            if b:
                diag[id(m.bias)] += (g.sum(1) ** 2).sum(0)
            if w:
                diag[id(m.weight)] += _squared_gradients(cols, g, chunk_size).reshape(
                    m.weight.shape
                )
    return parameters_to_vector([diag[id(p)] for p in params])


def _layer_columns(m: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's inputs ``[n, in, T]`` and output gradients ``[n, T, out]`` by position.

    Example ``i``'s weight gradient is ``g_i^T cols_i^T``: a linear layer's positions are its
    input's middle dimensions, a convolution's its unfolded patches.
    """
    if type(m) is nn.Conv2d:
        assert not isinstance(m.padding, str)  # the plan admits numeric padding only
        cols = nn.functional.unfold(
            a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
        )  # [n, in * kh * kw, L]
        g = g.reshape(g.shape[0], g.shape[1], -1).mT  # [n, L, out]
    else:
        cols = a.reshape(a.shape[0], -1, a.shape[-1]).mT  # [n, in, T]
        g = g.reshape(g.shape[0], -1, g.shape[-1])  # [n, T, out]
    return cols.to(g.dtype), g


def _outside_use(f, S, outs, leaves, plan, runs, params) -> str | None:
    """``_OUTSIDE`` when a planned parameter is used outside its layer, else ``None``."""
    K = S.shape[0]
    mix = torch.randn(K, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mixed = torch.tensordot(mix.to(dtype=S.dtype, device=S.device), S, dims=1)
    grads = torch.autograd.grad(
        f, outs + leaves, grad_outputs=mixed, retain_graph=True, allow_unused=True
    )
    position = {id(p): i for i, p in enumerate(params)}
    rtol = layer_check_rtol(f.dtype)
    for (m, w, b), r, g in zip(plan, runs, grads[: len(outs)]):
        cols, g = _layer_columns(m, r[0][0], g)
        scale = float(torch.linalg.vector_norm(g))
        true = grads[len(outs) :]
        if b and not _agrees(
            g.sum((0, 1)),
            true[position[id(m.bias)]],
            rtol * scale * math.sqrt(g.shape[0] * g.shape[1]),
        ):
            return _OUTSIDE
        if w and not _agrees(
            torch.einsum("npo,nip->oi", g, cols).reshape(m.weight.shape),
            true[position[id(m.weight)]],
            rtol * scale * float(torch.linalg.vector_norm(cols)),
        ):
            return _OUTSIDE
    return None


_OUTSIDE = (
    "a parameter is also used outside its layer (the layers' gradients summed over the "
    "examples differ from autograd's)"
)


def _agrees(got: Tensor, want: Tensor | None, atol: float) -> bool:
    """Whether ``got`` is ``want`` (``None``: zero) to ``atol`` in norm."""
    diff = got if want is None else got - want
    return float(torch.linalg.vector_norm(diff)) <= atol


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
