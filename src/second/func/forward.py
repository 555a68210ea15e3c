r"""Jacobian-vector products of a module's output with respect to its parameters.

Two engines: forward-mode AD vmapped over the vectors (:func:`module_jvp`), and
reverse-over-reverse AD (:func:`reverse_jvp`), which needs only double backward and so covers
operations without a forward-mode rule (the CPU kernel of a float32 LSTM). Both run inside
:func:`second.func.differentiable_attention`.

A forward that draws random numbers (dropout) is a different function at every call; a
product that re-runs a training forward must draw what that forward drew. :class:`RandomState`
records the generators before the forward and replays them (:meth:`RandomState.replay`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from .._errors import quiet_batching_notes
from .attention import differentiable_attention

__all__ = ["RandomState", "module_jvp", "reverse_jvp"]


class RandomState:
    """The random number generators' state now, to replay a forward's random draws later.

    Records the CPU generator and, for a CUDA ``device``, that device's. A forward re-run
    inside :meth:`replay` draws the same dropout masks (and any other random numbers, in the
    same order) as the forward that followed the recording; the generators are restored
    afterwards, so the caller's random stream is as if the re-run had not happened.

    Args:
        device: the device whose generator the forward uses besides the CPU's.

    Example:
        >>> drop = torch.nn.Dropout(0.5)
        >>> rng = RandomState(torch.device("cpu"))
        >>> a = drop(torch.ones(8))
        >>> with rng.replay():
        ...     b = drop(torch.ones(8))
        >>> torch.equal(a, b)
        True
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from the recorded state; the generators are restored on exit."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def module_jvp(
    model: nn.Module,
    names: list[str],
    params: list[Tensor],
    batch: tuple,
    tangents: list[Tensor],
    vectorize: bool = True,
    reverse: bool = False,
    rng: RandomState | None = None,
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
        rng: the generators' state before the captured forward: each forward here draws the
            random numbers it drew (its dropout masks, the same for every vector), so ``J``
            is the Jacobian of the function that forward computed. ``None``: fresh draws.

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
    replay = rng.replay if rng is not None else nullcontext
    with differentiable_attention():  # the fused attention kernels have no forward-mode rule
        if reverse:
            with replay():
                return reverse_jvp(f, primals, tangent)
        if vectorize:
            try:
                # randomness="same": one draw for all vectors, the one an unbatched call makes
                with quiet_batching_notes(), replay():
                    both = vmap(
                        lambda t: jvp(f, (primals,), (t,)),
                        out_dims=(None, 0),  # type: ignore[arg-type]  # None: not mapped
                        randomness="same",
                    )
                    return both(tangent)  # type: ignore[misc, return-value]
            except Exception:  # a module without a batching rule: one JVP per vector
                pass
        res = []
        for i in range(k):
            with replay():
                res.append(jvp(f, (primals,), ({n: t[i] for n, t in tangent.items()},)))
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
