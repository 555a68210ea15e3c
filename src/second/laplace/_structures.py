r"""Posterior precisions :math:`\Lambda = c\,H + \mathrm{diag}(\delta)`, the prior applied at call time.

Each structure holds the curvature :math:`H` of the summed negative log-likelihood (at
:math:`\sigma = 1`, temperature 1) in a form fitted once, and answers every question about
:math:`\Lambda` for any curvature scale :math:`c = 1/(\sigma^2 T)` and prior precision
:math:`\delta` (one value per group of parameters, expanded by ``group_index``), so optimising
the prior never refits the curvature. All results are differentiable in ``c`` and ``delta``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kfac.rules import LayerRule

__all__: list[str] = []


class _Structure:
    """The interface: ``logdet``, ``inv_diag``, ``solve``, ``sample``, ``curvature``, state."""

    kind = ""
    can_whiten = True  # whether whiten() has a cheap square root

    def __init__(self, group_index: Tensor):
        self.group_index = group_index
        self.num_params = int(group_index.numel())

    def prior(self, delta: Tensor) -> Tensor:
        """The per-parameter prior precision ``[P]``."""
        if _scalar(delta):
            return delta.reshape(()).expand(self.num_params)
        return delta.reshape(-1)[self.group_index]

    def logdet(self, c: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def inv_diag(self, c: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def solve(self, c: Tensor, delta: Tensor, V: Tensor) -> Tensor:
        """``Lambda^{-1} V`` for ``V [P, k]``."""
        raise NotImplementedError

    def whiten(self, c: Tensor, delta: Tensor, V: Tensor) -> Tensor:
        """``W`` with ``W^T W = V^T Lambda^{-1} V`` (``V [P, k]``): ``R V`` for ``Lambda^{-1} = R^T R``."""
        raise NotImplementedError

    def sample(self, c: Tensor, delta: Tensor, Z: Tensor, generator=None) -> Tensor:
        """Columns with covariance ``Lambda^{-1}`` from standard normal ``Z [P, k]``."""
        raise NotImplementedError

    def curvature(self) -> Tensor:
        """The dense curvature ``H`` as this structure represents it."""
        return self.matmat_curvature(
            torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        )

    def matmat_curvature(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.group_index.device


def _scalar(delta: Tensor) -> bool:
    return delta.numel() == 1


class FullStructure(_Structure):
    """A dense curvature ``H [P, P]``, eigendecomposed once for a scalar prior."""

    kind = "full"

    def __init__(self, H: Tensor, group_index: Tensor):
        super().__init__(group_index)
        self.H = 0.5 * (H + H.T)
        self.evals, self.evecs = torch.linalg.eigh(self.H)

    @property
    def dtype(self) -> torch.dtype:
        return self.H.dtype

    def _cholesky(self, c: Tensor, delta: Tensor) -> Tensor:
        Lam = c * self.H + torch.diag(self.prior(delta).to(self.H.dtype))
        L, info = torch.linalg.cholesky_ex(Lam)
        if int(info) != 0:
            raise ValueError(
                "the posterior precision c H + prior is not positive definite (an indefinite "
                "Hessian?): use curvature='ggn' or a larger prior precision"
            )
        return L

    def _spectrum(self, c: Tensor, delta: Tensor) -> Tensor:
        s = c * self.evals + delta.reshape(())
        if bool((s.detach() <= 0).any()):
            raise ValueError(
                "the posterior precision c H + prior is not positive definite (an indefinite "
                "Hessian?): use curvature='ggn' or a larger prior precision"
            )
        return s

    def logdet(self, c, delta):
        if _scalar(delta):
            return torch.log(self._spectrum(c, delta)).sum()
        return 2.0 * torch.log(torch.diagonal(self._cholesky(c, delta))).sum()

    def inv_diag(self, c, delta):
        if _scalar(delta):
            return (self.evecs**2) @ (1.0 / self._spectrum(c, delta))
        return torch.diagonal(torch.cholesky_inverse(self._cholesky(c, delta)))

    def solve(self, c, delta, V):
        if _scalar(delta):
            Q = self.evecs
            return Q @ ((Q.T @ V) / self._spectrum(c, delta).unsqueeze(1))
        return torch.cholesky_solve(V, self._cholesky(c, delta))

    def whiten(self, c, delta, V):
        if _scalar(delta):
            return (self.evecs.T @ V) / self._spectrum(c, delta).sqrt().unsqueeze(1)
        return torch.linalg.solve_triangular(self._cholesky(c, delta), V, upper=False)

    def sample(self, c, delta, Z, generator=None):
        if _scalar(delta):
            return self.evecs @ (Z / self._spectrum(c, delta).sqrt().unsqueeze(1))
        L = self._cholesky(c, delta)
        return torch.linalg.solve_triangular(L.T, Z, upper=True)

    def matmat_curvature(self, V):
        return self.H @ V

    def state(self) -> dict:
        return {"H": self.H}


class DiagStructure(_Structure):
    """A diagonal curvature ``h [P]``."""

    kind = "diag"

    def __init__(self, h: Tensor, group_index: Tensor):
        super().__init__(group_index)
        self.h = h

    @property
    def dtype(self) -> torch.dtype:
        return self.h.dtype

    def _precision(self, c, delta):
        s = c * self.h + self.prior(delta)
        if bool((s.detach() <= 0).any()):
            raise ValueError("the diagonal posterior precision has non-positive entries")
        return s

    def logdet(self, c, delta):
        return torch.log(self._precision(c, delta)).sum()

    def inv_diag(self, c, delta):
        return 1.0 / self._precision(c, delta)

    def solve(self, c, delta, V):
        return V / self._precision(c, delta).unsqueeze(1)

    def sample(self, c, delta, Z, generator=None):
        return Z / self._precision(c, delta).sqrt().unsqueeze(1)

    def whiten(self, c, delta, V):
        return self.sample(c, delta, V)

    def matmat_curvature(self, V):
        return self.h.unsqueeze(1) * V

    def state(self) -> dict:
        return {"h": self.h}


class LowRankStructure(_Structure):
    r"""``H ~ U diag(l) U^T`` (top eigenpairs); solves by Woodbury with ``B = U sqrt(c l)``.

    :math:`\Lambda = D + B B^\top`, :math:`M = I + B^\top D^{-1} B`,
    :math:`\log\det\Lambda = \sum\log D + \log\det M`,
    :math:`\Lambda^{-1} = D^{-1} - D^{-1} B M^{-1} B^\top D^{-1}`.
    """

    kind = "lowrank"

    def __init__(self, U: Tensor, evals: Tensor, group_index: Tensor):
        super().__init__(group_index)
        self.U, self.evals = U, evals.clamp_min(0.0)

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    def _parts(self, c, delta):
        D = self.prior(delta).to(self.U.dtype)
        B = self.U * (c * self.evals).sqrt()
        DiB = B / D.unsqueeze(1)
        M = torch.eye(B.shape[1], dtype=B.dtype, device=B.device) + B.T @ DiB
        return D, B, DiB, torch.linalg.cholesky(M)

    def logdet(self, c, delta):
        D, _, _, LM = self._parts(c, delta)
        return torch.log(D).sum() + 2.0 * torch.log(torch.diagonal(LM)).sum()

    def inv_diag(self, c, delta):
        D, _, DiB, LM = self._parts(c, delta)
        W = torch.linalg.solve_triangular(LM, DiB.T, upper=False)  # L^{-1} B^T D^{-1}
        return 1.0 / D - (W**2).sum(0)

    def solve(self, c, delta, V):
        D, _, DiB, LM = self._parts(c, delta)
        DiV = V / D.unsqueeze(1)
        return DiV - DiB @ torch.cholesky_solve(DiB.T @ V, LM)

    can_whiten = False  # no cheap square root: the predictive uses V^T (Lambda^{-1} V)

    def sample(self, c, delta, Z, generator=None):
        # perturb and solve: Lambda^{-1}(D^{1/2} z1 + B z2) has covariance Lambda^{-1}
        D, B, _, _ = self._parts(c, delta)
        k = B.shape[1]
        Z1, Z2 = Z, torch.randn(k, Z.shape[1], dtype=Z.dtype, device=Z.device, generator=generator)
        return self.solve(c, delta, D.sqrt().unsqueeze(1) * Z1 + B @ Z2)

    def matmat_curvature(self, V):
        return self.U @ (self.evals.unsqueeze(1) * (self.U.T @ V))

    def state(self) -> dict:
        return {"U": self.U, "evals": self.evals}


class KronStructure(_Structure):
    r"""KFAC/EK-FAC blocks in their eigenbasis: :math:`\Lambda_l = Q_l (c\,s_l + \delta_l) Q_l^\top`.

    ``blocks`` are :class:`second.kfac.EigenBlock` (eigenvalues ``s [d_G, d_A]``), ``diagonals``
    the fallback parameters' :class:`second.kfac.DiagonalBlock`, ``layout`` the
    :class:`second.kfac.BlockLayout` that maps the flat parameter vector to the blocks.
    ``block_groups``/``diag_groups``: the prior group of each block and fallback parameter.
    """

    kind = "kron"

    def __init__(self, blocks, diagonals, layout, group_index, block_groups, diag_groups):
        super().__init__(group_index)
        self.blocks, self.diagonals, self.layout = list(blocks), list(diagonals), layout
        self.block_groups, self.diag_groups = list(block_groups), list(diag_groups)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].QG.dtype if self.blocks else self.diagonals[0].diagonal.dtype

    def _d(self, delta: Tensor, g: int) -> Tensor:
        return delta.reshape(-1)[0 if _scalar(delta) else g]

    def _spectra(self, c, delta):
        out = [
            c * b.eigenvalues + self._d(delta, g) for b, g in zip(self.blocks, self.block_groups)
        ]
        diag = [
            c * d.diagonal + self._d(delta, g) for d, g in zip(self.diagonals, self.diag_groups)
        ]
        for s in [*out, *diag]:
            if bool((s.detach() <= 0).any()):
                raise ValueError("the Kronecker-factored posterior precision is singular")
        return out, diag

    def logdet(self, c, delta):
        out, diag = self._spectra(c, delta)
        return sum(torch.log(s).sum() for s in [*out, *diag])

    def _map(self, V, block_fn, diag_fn):
        return self.layout.apply(V, block_fn, diag_fn)

    def solve(self, c, delta, V):
        out, diag = self._spectra(c, delta)
        blocks = self.blocks
        return self._map(
            V,
            lambda j, M: blocks[j].unrotate(blocks[j].rotate(M) / out[j]),
            lambda i, v: v / diag[i].reshape(1, *v.shape[1:]),
        )

    def sample(self, c, delta, Z, generator=None):
        out, diag = self._spectra(c, delta)
        blocks = self.blocks
        return self._map(
            Z,
            lambda j, M: blocks[j].unrotate(M / out[j].sqrt()),
            lambda i, v: v / diag[i].sqrt().reshape(1, *v.shape[1:]),
        )

    def whiten(self, c, delta, V):
        # R = D^{-1/2} Q^T block by block, laid out in the blocks' parameter slots
        out, diag = self._spectra(c, delta)
        blocks = self.blocks
        return self._map(
            V,
            lambda j, M: blocks[j].rotate(M) / out[j].sqrt(),
            lambda i, v: v / diag[i].sqrt().reshape(1, *v.shape[1:]),
        )

    def inv_diag(self, c, delta):
        out, diag = self._spectra(c, delta)
        zero = torch.zeros(self.num_params, 1, dtype=self.dtype, device=self.device)

        def block_diag(j, M):
            b = self.blocks[j]
            QG2 = b.QG**2
            inv = 1.0 / out[j]
            d = QG2 @ inv if b.QA is None else QG2 @ inv @ (b.QA**2).T
            return d.unsqueeze(0)

        return self._map(
            zero, block_diag, lambda i, v: (1.0 / diag[i]).reshape(1, *v.shape[1:])
        ).squeeze(1)

    def _factored(self, j: int, a: Tensor) -> bool:
        """Layer ``j``'s per-example Jacobians are rank one (dense rows, one position)."""
        layer = self.layout.layers[j]
        default = type(layer).per_example_mats is LayerRule.per_example_mats
        return default and a.shape[1] == 1 and self.blocks[j].QA is not None

    def jacobian_width(self) -> int:
        """Floats per example and output that :meth:`jacobian_covariance` holds at once."""
        layers = self.layout.layers
        fallback = sum(self.layout.params[i].numel() for i in self.layout.fallback_index)
        return max([layer.d_G + layer.d_A for layer in layers] + [1]) + fallback

    def jacobian_covariance(self, c, delta, rows, fallback_jacobian, shape, budget) -> Tensor:
        r""":math:`J \Lambda^{-1} J^\top` ``[n, C, C]`` from the Jacobians' factors.

        ``rows[j]``: the calls of layer ``j`` as ``(a [n, T, d_A], g [C, n, T, d_G])``, the
        layer's input rows and the gradients of each output at its output; output ``k``'s
        Jacobian for the layer's matrix is :math:`\sum_{t} g_{kt} a_t^\top` (summed over
        calls). With one position and one call it is rank one, so its rotation is
        :math:`u_k w^\top` with :math:`u_k = Q_G^\top g_k`, :math:`w = Q_A^\top a`, and
        :math:`\sum_{ij} u_{ki} u_{li} w_j^2 / (c s_{ij} + \delta)`: no per-example
        Jacobian is formed. Otherwise the per-example matrices are formed layer by layer,
        ``budget`` floats at a time. ``fallback_jacobian``: ``[n, C, p]`` columns of the
        fallback parameters (or ``None``); ``shape``: ``(n, C)``.
        """
        out, diag = self._spectra(c, delta)
        n, C = shape
        cov = torch.zeros(n, C, C, dtype=self.dtype, device=self.device)
        for j, calls in enumerate(rows):
            if not calls:
                continue
            b, inv, layer = self.blocks[j], 1.0 / out[j], self.layout.layers[j]
            a = torch.cat([r[0] for r in calls], dim=1)
            a = a.to(self.dtype) if a.is_floating_point() else a  # an embedding's indices
            g = torch.cat([r[1] for r in calls], dim=2).to(self.dtype)
            if self._factored(j, a):
                u = g[:, :, 0] @ b.QG  # [C, n, d_G]
                w = a[:, 0] @ b.QA  # [n, d_A]
                z = (w * w) @ inv.T  # [n, d_G]
                cov += torch.einsum("kni,lni->nkl", u * z, u)
                continue
            step = max(1, budget // (C * layer.d_G * layer.d_A))
            for s in range(0, n, step):
                R = b.rotate(layer.per_example_mats(a[s : s + step], g[:, s : s + step]))
                cov[s : s + step] += torch.einsum("knga,lnga->nkl", R * inv, R)
        if fallback_jacobian is not None:
            J = fallback_jacobian.to(self.dtype)
            d = torch.cat([1.0 / s.reshape(-1) for s in diag])
            cov += torch.einsum("nkp,nlp->nkl", J * d, J)
        return cov

    def matmat_curvature(self, V):
        return self._map(
            V,
            lambda j, M: self.blocks[j].matmul(M),
            lambda i, v: self.diagonals[i].matmul(v),
        )

    def state(self) -> dict:
        return {
            "blocks": [
                {"lA": b.lA, "QA": b.QA, "lG": b.lG, "QG": b.QG, "eigenvalues": b.eigenvalues}
                for b in self.blocks
            ],
            "diagonals": [d.diagonal for d in self.diagonals],
        }
