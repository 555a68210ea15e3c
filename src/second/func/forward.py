r"""Jacobian-vector products of a module's output with respect to its parameters.

Two engines: forward-mode AD vmapped over the vectors (:func:`module_jvp`), and
reverse-over-reverse AD (:func:`reverse_jvp`), which needs only double backward and so covers
operations without a forward-mode rule (the CPU kernel of a float32 LSTM). Both run inside
:func:`second.func.differentiable_attention`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._errors import quiet_batching_notes
from .attention import differentiable_attention

__all__ = ["module_jvp", "reverse_jvp"]


def module_jvp(
    model: nn.Module,
    names: list[str],
    params: list[Tensor],
    batch: tuple,
    tangents: list[Tensor],
    vectorize: bool = True,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """A module's output and ``J v`` on a batch, by forward-mode AD vmapped over the vectors.

    ``J`` is the Jacobian of the output with respect to the named parameters; the ``k``
    vectors are given per parameter. KFAC's quadratic model takes its products from here on
    any model that is not a plain MLP chain.

    Args:
        model: the (unwrapped) model.
        names: the names of its trainable parameters.
        params: those parameters, detached.
        batch: ``(args, kwargs)`` of the captured forward.
        tangents: per parameter ``[k, *p.shape]``.
        vectorize: vmap over the ``k`` vectors (else one JVP per vector: cheaper for
            convolutions, whose batched-weight rule is slower on CPU than ``k`` JVPs; the
            zoo's digits CNN: 7.3 ms vmapped against 6.0 ms for two JVPs).
        reverse: by reverse-over-reverse AD instead (:func:`reverse_jvp`), for models with
            an operation that has no forward-mode rule.

    Raises:
        NotImplementedError: (forward mode) an operation has no forward-mode rule.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> w = lin.weight.detach()
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> out, Jv = module_jvp(lin, ["weight"], [w], ((x,), {}), [torch.ones(1, 1, 2)])
        >>> Jv            # d(w x)/dw . ones = x . ones
        tensor([[[3.]]])
    """
    from torch.func import functional_call, jvp, vmap

    args, kwargs = batch
    primals = dict(zip(names, params))
    buffers = dict(model.named_buffers())

    def f(ps):
        # copies made inside the transform: a BatchNorm in training mode updates its running
        # statistics in place, which must neither touch the model's (the training forward
        # already did) nor mutate a tensor captured from outside the transform
        return functional_call(
            model, (ps, {k: b.clone() for k, b in buffers.items()}), args, kwargs
        )

    k = tangents[0].shape[0]
    tangent = dict(zip(names, tangents))
    with differentiable_attention():  # the fused attention kernels have no forward-mode rule
        if reverse:
            return reverse_jvp(f, primals, tangent)
        if vectorize:
            try:
                with quiet_batching_notes():
                    return vmap(lambda t: jvp(f, (primals,), (t,)), out_dims=(None, 0))(tangent)  # type: ignore[arg-type, misc, return-value]
            except Exception:  # a module without a batching rule: one JVP per vector
                pass
        res = [jvp(f, (primals,), ({n: t[i] for n, t in tangent.items()},)) for i in range(k)]
    return res[0][0], torch.stack([r[1] for r in res])


def reverse_jvp(
    f: Callable[[dict[str, Tensor]], Tensor],
    primals: dict[str, Tensor],
    tangents: dict[str, Tensor],
) -> tuple[Tensor, Tensor]:
    r"""Output and ``J v`` of ``f`` for each of the ``k`` tangents, by two reverse passes.

    With :math:`g(u) = J^\top u` (a backward pass from a dummy cotangent ``u`` that keeps its
    graph), :math:`J v = \partial_u (g(u)^\top v)`: one more backward per vector. It needs
    only double backward, which covers operations that forward-mode AD does not (the CPU
    kernel of a float32 LSTM), at about twice the cost of a JVP.

    Args:
        f: ``parameters -> output``.
        primals: the parameters by name.
        tangents: per name ``[k, *p.shape]``.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> out, Jv = reverse_jvp(lambda ps: A @ ps["x"], {"x": torch.ones(2)},
        ...                       {"x": torch.tensor([[1.0, 0.0]])})
        >>> Jv
        tensor([[1., 3.]])
    """
    names = list(primals)
    k = tangents[names[0]].shape[0]
    with torch.enable_grad():
        ps = {n: p.detach().requires_grad_(True) for n, p in primals.items()}
        out = f(ps)
        u = torch.zeros_like(out, requires_grad=True)
        gs = torch.autograd.grad(
            out, [ps[n] for n in names], u, create_graph=True, allow_unused=True
        )
        used = [(g, tangents[n]) for n, g in zip(names, gs) if g is not None and g.requires_grad]
        if not used:  # the output does not depend on the parameters
            return out.detach(), out.new_zeros(k, *out.shape)
        Jv = [
            torch.autograd.grad(
                [g for g, _ in used], u, [t[i] for _, t in used], retain_graph=i < k - 1
            )[0]
            for i in range(k)
        ]
    return out.detach(), torch.stack(Jv)
