r"""One layer's curvature approximation (a block), with damping applied at call time.

Blocks act on a layer's matrix form ``M [..., d_G, d_A]`` (see :mod:`second.kfac.rules`),
in which :math:`A \otimes G` multiplies as :math:`M \mapsto G M A`. In the row-major
vectorization of ``M`` the block's matrix is ``kron(G, A)`` (:meth:`KroneckerBlock.to_dense`).

* :class:`KroneckerBlock`: :math:`A \otimes G` from the two factors (``A`` may be held as
  its diagonal).
* :class:`EigenBlock`: :math:`(Q_A \otimes Q_G)\,\mathrm{diag}(s)\,(Q_A \otimes Q_G)^\top`,
  an eigenbasis of the factors with eigenvalues ``s [d_G, d_A]``: KFAC's own
  (:math:`s = l_G l_A^\top`) or EK-FAC's eigen-corrections.
* :class:`DiagonalBlock`: a diagonal, for parameters outside the supported layers.

Every product and solve takes ``damping=`` (:math:`\lambda I` added, or split between
the factors with ``split="pi"``, see :mod:`second.kfac.damping`); no block stores one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import distributed as dist
from .damping import DAMPING_SPLITS, pi_factor, pi_split
from .eigen import sym_eigh

__all__ = ["KroneckerBlock", "EigenBlock", "DiagonalBlock", "eigen_blocks"]


def _check_split(split: str) -> None:
    if split not in DAMPING_SPLITS:
        raise ValueError(f"split must be one of {DAMPING_SPLITS}, got {split!r}")


class KroneckerBlock:
    r"""The block :math:`A \otimes G`: ``M -> G M A`` on matrices ``[..., d_G, d_A]``.

    Args:
        A: the input factor ``[d_A, d_A]``, or its diagonal ``[d_A]``.
        G: the gradient factor ``[d_G, d_G]``.

    Example:
        >>> A, G = torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([[3.0]])
        >>> B = KroneckerBlock(A, G)
        >>> B.matmul(torch.tensor([[1.0, 0.0]]), damping=0.5)
        tensor([[6.5000, 3.0000]])
        >>> torch.equal(B.to_dense(), torch.kron(G, A))
        True
    """

    def __init__(self, A: Tensor, G: Tensor):
        self.A, self.G = A, G

    @property
    def diag_A(self) -> bool:
        """Whether ``A`` is held as its diagonal."""
        return self.A.dim() == 1

    def matmul(self, M: Tensor, damping: float = 0.0) -> Tensor:
        r""":math:`(A \otimes G + \lambda I)\,M = G M A + \lambda M`."""
        GM = self.G @ M
        out = GM * self.A if self.diag_A else GM @ self.A
        return out + damping * M if damping else out

    def to_dense(self) -> Tensor:
        """The block as a matrix, in the row-major order of ``M``: ``kron(G, A)``."""
        A = torch.diag(self.A) if self.diag_A else self.A
        return torch.kron(self.G, A)

    def eigen(self) -> EigenBlock:
        """The same block in the factors' eigenbasis (see :meth:`EigenBlock.from_factors`)."""
        return EigenBlock.from_factors(self.A, self.G)


class EigenBlock:
    r""":math:`(Q_A \otimes Q_G)\,\mathrm{diag}(s)\,(Q_A \otimes Q_G)^\top` in the factors' eigenbasis.

    With ``A = Q_A diag(l_A) Q_A^T`` and ``G = Q_G diag(l_G) Q_G^T`` and ``s = l_G l_A^T``
    (the default) this is :math:`A \otimes G` itself; EK-FAC passes corrected ``s``.

    Args:
        lA: ``A``'s eigenvalues (its diagonal when ``QA`` is ``None``).
        QA: ``A``'s eigenvectors (``None``: ``A`` is diagonal).
        lG: ``G``'s eigenvalues.
        QG: ``G``'s eigenvectors.
        eigenvalues: ``s [d_G, d_A]``; default ``l_G l_A^T`` (a Kronecker block, for which
            pi-damping is defined).

    Example:
        >>> A, G = torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([[3.0]])
        >>> E = EigenBlock.from_factors(A, G)
        >>> M = torch.tensor([[1.0, 0.0]])
        >>> torch.allclose(E.matmul(M), KroneckerBlock(A, G).matmul(M))
        True
        >>> torch.allclose(E.solve(E.matmul(M, damping=0.1), damping=0.1), M, atol=1e-6)
        True
    """

    def __init__(
        self,
        lA: Tensor,
        QA: Tensor | None,
        lG: Tensor,
        QG: Tensor,
        eigenvalues: Tensor | None = None,
    ):
        self.lA, self.QA, self.lG, self.QG = lA, QA, lG, QG
        self.kronecker = eigenvalues is None
        self.eigenvalues = lG.unsqueeze(1) * lA.unsqueeze(0) if eigenvalues is None else eigenvalues

    @classmethod
    def from_factors(cls, A: Tensor, G: Tensor) -> EigenBlock:
        """Eigendecompose the factors (:func:`~second.kfac.sym_eigh`; a 1-D ``A`` is diagonal)."""
        lG, QG = sym_eigh(G)
        if A.dim() == 1:
            return cls(A.clamp_min(0.0), None, lG, QG)
        lA, QA = sym_eigh(A)
        return cls(lA, QA, lG, QG)

    def with_eigenvalues(self, eigenvalues: Tensor) -> EigenBlock:
        """The same eigenbasis with other eigenvalues ``[d_G, d_A]`` (EK-FAC)."""
        return EigenBlock(self.lA, self.QA, self.lG, self.QG, eigenvalues)

    def rotate(self, M: Tensor) -> Tensor:
        """``Q_G^T M Q_A``: a matrix ``[..., d_G, d_A]`` into the eigenbasis."""
        out = self.QG.T @ M
        return out if self.QA is None else out @ self.QA

    def unrotate(self, M: Tensor) -> Tensor:
        """``Q_G M Q_A^T``: back from the eigenbasis."""
        out = self.QG @ M
        return out if self.QA is None else out @ self.QA.T

    def pi(self) -> float:
        """The pi-damping ratio of the factors (:func:`~second.kfac.pi_factor`)."""
        return pi_factor(self.lA, self.lG)

    def to_dense(self) -> Tensor:
        """The block as a matrix in the row-major order of ``M`` (``kron(G, A)`` for KFAC)."""
        QA = torch.eye(self.lA.shape[0], dtype=self.QG.dtype, device=self.QG.device)
        Q = torch.kron(self.QG, QA if self.QA is None else self.QA)
        return (Q * self.eigenvalues.reshape(-1)) @ Q.T

    def matmul(self, M: Tensor, damping: float = 0.0) -> Tensor:
        r""":math:`(B + \lambda I)\,M`."""
        out = self.unrotate(self.rotate(M) * self.eigenvalues)
        return out + damping * M if damping else out

    def damped_eigenvalues(self, damping: float | Tensor = 0.0, split: str = "exact") -> Tensor:
        r"""The eigenvalues ``[d_G, d_A]`` of the damped block.

        ``"exact"``: :math:`s + \lambda` (``damping`` a number or a 0-d tensor); ``"pi"``:
        :math:`(l_G + \sqrt\lambda/\pi)(l_A + \pi\sqrt\lambda)^\top`.

        Raises:
            ValueError: ``split="pi"`` on a block whose eigenvalues are not ``l_G l_A^T``
                (EK-FAC), or an unknown ``split``.
        """
        _check_split(split)
        if split == "exact":
            return self.eigenvalues + damping
        if not self.kronecker:
            raise ValueError(
                "EK-FAC has no per-factor damping: use the exact damping (pi_damping=False)"
            )
        dA, dG = pi_split(float(damping), self.pi())  # the pi split: a number
        return (self.lG + dG).unsqueeze(1) * (self.lA + dA).unsqueeze(0)

    def solve(self, M: Tensor, damping: float = 0.0, split: str = "exact") -> Tensor:
        r"""``(B + damping)^{-1} M``, damped exactly or pi-split (:meth:`damped_eigenvalues`)."""
        return self.unrotate(self.rotate(M) / self.damped_eigenvalues(damping, split))

    def inverse(self, damping: float) -> KroneckerBlock:
        r"""The pi-damped inverse as a Kronecker block of the damped factors' inverses.

        :math:`\big((A + \pi\sqrt\lambda I) \otimes (G + \tfrac{\sqrt\lambda}{\pi} I)\big)^{-1}
        = (A + \pi\sqrt\lambda I)^{-1} \otimes (G + \tfrac{\sqrt\lambda}{\pi} I)^{-1}`: two
        small matrix products per solve instead of four rotations (the optimizer's form).

        Raises:
            ValueError: on an EK-FAC block (no per-factor damping).
        """
        if not self.kronecker:
            raise ValueError("EK-FAC has no per-factor damping: its inverse is not Kronecker")
        dA, dG = pi_split(float(damping), self.pi())  # the pi split: a number
        Ginv = (self.QG / (self.lG + dG)) @ self.QG.T
        if self.QA is None:
            Ainv = 1.0 / (self.lA + dA)
        else:
            Ainv = (self.QA / (self.lA + dA)) @ self.QA.T
        return KroneckerBlock(Ainv, Ginv)


class DiagonalBlock:
    """A diagonal block ``diag(d)`` for a parameter outside the supported layers.

    Example:
        >>> D = DiagonalBlock(torch.tensor([1.0, 3.0]))
        >>> D.matmul(torch.ones(2), damping=1.0), D.solve(torch.ones(2), damping=1.0)
        (tensor([2., 4.]), tensor([0.5000, 0.2500]))
    """

    def __init__(self, diagonal: Tensor):
        self.diagonal = diagonal

    def matmul(self, v: Tensor, damping: float = 0.0) -> Tensor:
        r""":math:`(\mathrm{diag}(d) + \lambda I)\,v`."""
        return (self.diagonal + damping) * v

    def solve(self, v: Tensor, damping: float = 0.0) -> Tensor:
        r""":math:`(\mathrm{diag}(d) + \lambda I)^{-1} v`."""
        return v / (self.diagonal + damping)


def eigen_blocks(
    factors: Sequence[tuple[Tensor, Tensor]], scale: float = 1.0, *, split: bool = False
) -> list[EigenBlock]:
    """:meth:`EigenBlock.from_factors` of ``(scale A, scale G)`` for every layer.

    With ``split`` (the factors are the same on every rank of a process group) layer ``j``
    is decomposed on rank ``j % world_size`` and shared with the others (zeros elsewhere,
    one sum over the ranks): the work is divided, the result is the same on every rank.

    Example:
        >>> blocks = eigen_blocks([(torch.eye(2), 2 * torch.eye(1))], scale=0.5)
        >>> blocks[0].eigenvalues
        tensor([[0.5000, 0.5000]])
    """
    split = split and dist.world_size() > 1
    rank, world = (dist.rank(), dist.world_size()) if split else (0, 1)
    parts: list[tuple[Tensor, Tensor | None, Tensor, Tensor]] = []
    for j, (A, G) in enumerate(factors):
        if j % world == rank:
            e = EigenBlock.from_factors(A * scale, G * scale)
            parts.append((e.lA, e.QA, e.lG, e.QG))
        elif A.dim() == 1:  # another rank's layer: zeros, filled by the sum below
            parts.append((torch.zeros_like(A), None, torch.zeros_like(G[0]), torch.zeros_like(G)))
        else:
            zA, zG = torch.zeros_like(A), torch.zeros_like(G)
            parts.append((zA[0].clone(), zA, zG[0].clone(), zG))
    if split:
        dist.all_reduce_sum([t for p in parts for t in p if t is not None])
    return [EigenBlock(*p) for p in parts]
