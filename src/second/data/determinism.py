"""Determinism: the same batches and the same model on every pass, and private samples.

An operator reads its data on every product, so every pass must see the same matrix:
:func:`batch_fingerprint` digests a batch's content, :class:`SamePassCheck` compares every
pass with the first (the same batches on every pass) and raises
:class:`~second.NonDeterministicDataError` at a difference, and :func:`refuse_stochastic`
refuses a model whose forward passes differ (its :func:`stochastic_modules`: dropout, batch
norm in training mode). :func:`sample_generator` gives an operator's random samples a
private generator, reset before every pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from .._errors import NonDeterministicDataError
from .task import tensor_leaves

__all__ = [
    "batch_fingerprint",
    "SamePassCheck",
    "stochastic_modules",
    "batch_coupled_modules",
    "refuse_stochastic",
    "sample_generator",
]


def batch_fingerprint(batch, ordered: bool = False) -> tuple:
    """A content fingerprint of a batch: its tensors' shapes and dtypes, and weighted sums.

    Per example (a row along the first dimension that the batch's tensors of that length
    share) and tensor, the plain sum and a sum weighted by a pseudo-random weight in
    ``[1, 2)`` per position within the example, in float64, compared exactly: a flip, a
    transposition or any other permutation of the values within an example changes it, so
    does a change of one element at any scale (values of 1e-8 as well as 1e8: nothing is
    rounded), and the same data holding NaN or Inf gets the same fingerprint on every pass
    (they enter as fixed stand-ins). Computed where the tensors are (one pass over each, a
    few numbers per example moved to the host): about 1 ms for a 256x3x32x32 float32 batch
    on one CPU core.

    Without ``ordered`` the examples' rows are sorted: a batch whose examples were permuted
    as a whole gets the same fingerprint (a curvature operator does not depend on the
    order), but one whose inputs and targets were paired differently does not. With
    ``ordered`` the rows stay in order, so a permutation of the examples is told apart too.

    Args:
        batch: a batch (any nesting of tuples, lists and dicts of tensors).
        ordered: also tell permutations of the examples apart.

    Returns:
        A tuple of the tensors' ``(shape, dtype)`` pairs and the sums (hashable, comparable).

    Example:
        >>> X = torch.tensor([[1.0], [2.0]])
        >>> batch_fingerprint((X, X)) == batch_fingerprint((X.flip(0), X.flip(0)))
        True
        >>> batch_fingerprint((X, X)) == batch_fingerprint((X, X.flip(0)))
        False
        >>> batch_fingerprint((X, X), ordered=True) == batch_fingerprint((X.flip(0), X.flip(0)), ordered=True)
        False
    """
    ts = [t.detach() for t in tensor_leaves(batch)]
    head = tuple((tuple(t.shape), str(t.dtype)) for t in ts)
    n = ts[0].shape[0] if ts and ts[0].dim() > 0 else 0
    rows = [t for t in ts if n > 0 and t.dim() > 0 and t.shape[0] == n]
    other = [t for t in ts if not any(t is r for r in rows)]
    sums = tuple(tuple(_weighted_sums(t.reshape(1, -1)).reshape(-1).tolist()) for t in other)
    if not rows:
        return (head, sums)
    per = torch.cat([_weighted_sums(t.reshape(n, -1)).to(rows[0].device) for t in rows], 1)
    if not ordered:  # rows sorted by a key of all their sums (ties: equal rows, in any order)
        key = per @ torch.linspace(1.0, 2.0, per.shape[1], dtype=torch.float64, device=per.device)
        per = per[torch.argsort(key, stable=True)]
    return (head, sums, tuple(per.reshape(-1).tolist()))


#: NaN and +-Inf enter a fingerprint as these (finite, so the weighted sums stay comparable)
_FINGERPRINT_STAND_INS = (1.2345e100, 5.4321e100)


def _weighted_sums(x: Tensor) -> Tensor:
    """``[rows, 2]``: each row's float64 sum and its sum weighted by position (see above)."""
    xf = x.to(torch.float64)
    if xf.is_complex():
        xf = torch.view_as_real(xf).reshape(xf.shape[0], -1)
    m = xf.shape[1]
    j = torch.arange(m, dtype=torch.int64, device=xf.device)
    w = 1.0 + ((j * 2654435761) % 1000003).to(torch.float64) / 1000003.0
    W = torch.stack([torch.ones_like(w), w], 1)
    sums = xf @ W  # one pass: the plain and the weighted sum
    if not bool(torch.isfinite(sums).all()):  # NaN or Inf in the data: their stand-ins
        nan, inf = _FINGERPRINT_STAND_INS
        sums = torch.nan_to_num(xf, nan=nan, posinf=inf, neginf=-inf) @ W
    return sums


class SamePassCheck:
    """Checks that an iterable of batches yields the same batches on every pass.

    The first complete pass records each batch's :func:`batch_fingerprint`; every later
    pass is compared batch by batch and raises :class:`~second.NonDeterministicDataError`
    at the first difference (a shuffling ``DataLoader``, random augmentation) or when
    the number of batches changes. Calling the object wraps an iterator of batches.

    A list of batches yields the same tensor objects on every pass: the same objects with
    the same autograd version counters hold the same values, and hashing them again is
    skipped. A ``DataLoader`` collates new tensors, which are fingerprinted afresh.

    Args:
        what: how the data is named in the error message.
        hint: what the user can do, appended to the message.
        ordered: also detect a permutation of the examples within a batch (needed where
            results are indexed by example, as influence scores are).

    Example:
        >>> check = SamePassCheck()
        >>> data = [(torch.ones(2, 1), torch.zeros(2))]
        >>> len(list(check(iter(data)))), len(list(check(iter(data))))
        (1, 1)
    """

    def __init__(self, what: str = "the data", hint: str = "", ordered: bool = False):
        self.what, self.hint, self.ordered = what, hint, ordered
        self.fingerprints: list[tuple] | None = None
        self._tensors: dict[int, tuple] = {}  # batch i: (weakrefs, versions) last seen

    def __call__(self, batches: Iterable) -> Iterator:
        """Yield ``batches``, checking each against the first pass."""
        seen = []
        for i, batch in enumerate(batches):
            fp = self._fingerprint(i, batch)
            if self.fingerprints is not None:
                if i >= len(self.fingerprints) or fp != self.fingerprints[i]:
                    raise NonDeterministicDataError(
                        f"batch {i} of {self.what} differs from the one seen on the first pass "
                        f"(a shuffling DataLoader or random augmentation?). {self.hint}".rstrip()
                    )
            seen.append(fp)
            yield batch
        if self.fingerprints is None:
            self.fingerprints = seen
        elif len(seen) != len(self.fingerprints):
            raise NonDeterministicDataError(
                f"{self.what} yielded {len(seen)} batches, {len(self.fingerprints)} on the first "
                f"pass. {self.hint}".rstrip()
            )

    def _fingerprint(self, i: int, batch) -> tuple:
        ts = tensor_leaves(batch)
        known = self._tensors.get(i)
        if known is not None and self.fingerprints is not None and i < len(self.fingerprints):
            refs, versions = known
            if len(refs) == len(ts) and all(
                r() is t and t._version == v for r, t, v in zip(refs, ts, versions, strict=True)
            ):
                return self.fingerprints[i]
        fp = batch_fingerprint(batch, self.ordered)
        self._tensors[i] = (tuple(weakref.ref(t) for t in ts), tuple(t._version for t in ts))
        return fp


def stochastic_modules(model: nn.Module) -> list[str]:
    """Modules that make repeated forward passes differ, as ``"name (Type)"`` labels.

    Dropout and RReLU draw new noise; batch norm in training mode updates its running
    statistics, so each product would change the model's buffers.

    Example:
        >>> stochastic_modules(torch.nn.Sequential(torch.nn.Dropout(0.5)))
        ['0 (Dropout)']
    """
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        label = f"{name or type(m).__name__} ({type(m).__name__})"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(label)
        elif isinstance(m, nn.RReLU):
            found.append(label)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            found.append(label)
    return found


def batch_coupled_modules(model: nn.Module) -> list[str]:
    """Modules that normalize with the batch's statistics, as ``"name (Type)"`` labels.

    Batch norm in training mode, or without running statistics (``track_running_stats=False``
    normalizes with the batch's statistics in eval mode too), makes an example's output depend
    on the others in its batch. Instance, layer and group norm are per example.

    Example:
        >>> bn = torch.nn.BatchNorm1d(3, track_running_stats=False)
        >>> batch_coupled_modules(torch.nn.Sequential(torch.nn.Linear(2, 3), bn).eval())
        ['1 (BatchNorm1d)']
    """
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or (m.running_mean is None and m.running_var is None)
        ):
            found.append(f"{name or type(m).__name__} ({type(m).__name__})")
    return found


def refuse_stochastic(model: nn.Module, consequence: str) -> None:
    """Raise :class:`~second.NonDeterministicDataError` if ``model`` has stochastic modules.

    Args:
        model: the network.
        consequence: what would go wrong, for the message ("every product would see a
            different matrix").

    Raises:
        NonDeterministicDataError: naming up to three of the :func:`stochastic_modules`.

    Example:
        >>> refuse_stochastic(torch.nn.Linear(2, 1), "products would differ")  # fine
    """
    stochastic = stochastic_modules(model)
    if stochastic:
        raise NonDeterministicDataError(
            f"the model is in training mode with {', '.join(stochastic[:3])}: {consequence}. "
            "Call model.eval() first."
        )


def sample_generator(
    generator: torch.Generator | None, device: torch.device, per_rank: bool = False
) -> torch.Generator:
    """A private generator for an operator's random samples, never the caller's own.

    A copy of ``generator``'s current state (seed 0 when ``None``): an operator resets it
    before every pass over the data, so its samples, and the matrix, are the same on every
    product, and the caller's generator is neither advanced nor reset.

    With ``per_rank`` under an initialized process group, rank ``r > 0`` gets other samples
    than rank 0 (as Sophia's and AdaHessian's "seed plus the rank"): seed ``r`` when
    ``generator`` is ``None``, else a seed drawn from the copy plus ``r``. Rank 0 keeps the
    samples of one process. Monte-Carlo samples alike on every rank would be correlated
    across the shards, so averaging over ranks would not reduce their variance.

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> private = sample_generator(g, torch.device("cpu"))
        >>> private is g, torch.equal(private.get_state(), g.get_state())
        (False, True)
    """
    from .. import distributed as dist

    private = torch.Generator(device=device)
    if generator is None:
        private.manual_seed(0)
    else:
        private.set_state(generator.get_state())
    r = dist.rank() if per_rank and dist.active() else 0
    if r > 0:
        base = 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=private))
        private.manual_seed(base + r)
    return private
