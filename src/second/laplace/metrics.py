r"""Calibration metrics for predicted class probabilities: NLL, ECE, Brier score.

``probs [n, C]`` are predicted probabilities (rows sum to one), ``targets [n]`` the class
indices. Every metric is a mean over the examples.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nll", "ece", "brier", "reliability"]


def _check(probs: Tensor, targets: Tensor) -> None:
    if probs.dim() != 2 or targets.dim() != 1 or probs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected probs [n, C] and targets [n], got {tuple(probs.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("no examples")


def nll(probs: Tensor, targets: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Mean negative log-likelihood :math:`-\frac1n\sum_i \log p_{i, y_i}`.

    Args:
        probs: predicted probabilities ``[n, C]``.
        targets: class indices ``[n]``.
        eps: probabilities are clamped below at ``eps`` (default ``1e-12``).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: shapes that do not match, or no examples.

    Example:
        >>> nll(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1]))
        tensor(0.4904)
    """
    _check(probs, targets)
    p = probs.gather(1, targets.reshape(-1, 1)).squeeze(1)
    return -torch.log(p.clamp_min(eps)).mean()


def brier(probs: Tensor, targets: Tensor) -> Tensor:
    r"""Brier score :math:`\frac1n \sum_i \sum_c (p_{ic} - [y_i = c])^2`, a scalar tensor.

    0 is perfect, 2 the worst. ``probs [n, C]`` and ``targets [n]`` as for :func:`nll`
    (a ``ValueError`` for shapes that do not match, or no examples).

    Example:
        >>> brier(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 1]))
        tensor(0.2500)
    """
    _check(probs, targets)
    onehot = torch.nn.functional.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(1).mean()


def reliability(probs: Tensor, targets: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    r"""The reliability diagram: confidence and accuracy in equal-width confidence bins.

    Bin :math:`b` holds the examples whose confidence :math:`\max_c p_{ic}` lies in
    :math:`((b-1)/B, b/B]` (the first bin includes 0).

    Args:
        probs: predicted probabilities ``[n, C]``.
        targets: class indices ``[n]``.
        n_bins: the number of bins :math:`B` (default 15).

    Returns:
        ``(confidence, accuracy, counts)``, each ``[n_bins]``: the mean confidence and the
        accuracy of each bin (0 where a bin is empty) and the number of examples in it.

    Raises:
        ValueError: shapes that do not match, no examples, or ``n_bins < 1``.

    Example:
        >>> conf, acc, counts = reliability(torch.tensor([[0.9, 0.1], [0.6, 0.4]]),
        ...                                 torch.tensor([0, 1]), n_bins=2)
        >>> conf, acc, counts
        (tensor([0.0000, 0.7500]), tensor([0.0000, 0.5000]), tensor([0., 2.]))
    """
    _check(probs, targets)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.max(1)
    correct = (pred == targets).to(probs.dtype)
    b = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    counts = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, b, torch.ones_like(conf))
    csum = torch.zeros_like(counts).index_add_(0, b, conf)
    asum = torch.zeros_like(counts).index_add_(0, b, correct)
    safe = counts.clamp_min(1)
    return csum / safe, asum / safe, counts


def ece(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    r"""Expected calibration error :math:`\sum_b \frac{n_b}{n} |\mathrm{acc}_b - \mathrm{conf}_b|`.

    Over the equal-width confidence bins of :func:`reliability` (Naeini et al. 2015; 15 bins
    as in Guo et al. 2017 and laplace-torch).

    Args:
        probs: predicted probabilities ``[n, C]``.
        targets: class indices ``[n]``.
        n_bins: the number of bins (default 15).

    Returns:
        A scalar tensor in ``[0, 1]``.

    Raises:
        ValueError: shapes that do not match, no examples, or ``n_bins < 1``.

    Example:
        >>> ece(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1]), n_bins=2)
        tensor(0.2500)
    """
    conf, acc, counts = reliability(probs, targets, n_bins)
    return (counts / counts.sum() * (acc - conf).abs()).sum()
