r"""The Laplace log marginal likelihood and the optimisation of the prior (and the noise)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import ConvergenceWarning
from ..func.vectors import parameters_to_vector
from ._state import LaplaceState

__all__ = ["PriorOptimizationResult", "MarginalLikelihood"]


@dataclass
class PriorOptimizationResult:
    """What :meth:`Laplace.optimize_prior_precision` found.

    Attributes:
        prior_precision: the optimised prior precision (scalar or one per group).
        sigma_noise: the observation noise (regression; ``1.0`` for classification).
        log_marginal_likelihood: the log marginal likelihood there.
        iterations: updates (``"mackay"``) or optimizer iterations (``"gradient"``).
        converged: whether the stopping rule was met.
        message: how it stopped.
    """

    prior_precision: Tensor
    sigma_noise: float
    log_marginal_likelihood: float
    iterations: int
    converged: bool
    message: str


class MarginalLikelihood(LaplaceState):
    """The marginal-likelihood part of :class:`~second.laplace.Laplace` (a mixin).

    It reads the fitted structure (``_fitted()``), ``loss``, ``num_data``, ``num_outputs``,
    ``likelihood``, ``temperature``, ``sigma_noise``, ``mean``, the prior and the groups.
    """

    def _c(self, sigma_noise) -> Tensor:
        sigma = torch.as_tensor(sigma_noise, dtype=torch.float64)
        return 1.0 / (sigma**2 * self.temperature)

    def _delta(self, prior_precision) -> Tensor:
        d = self.prior_precision if prior_precision is None else prior_precision
        return torch.as_tensor(d, dtype=torch.float64)

    def log_likelihood(self, sigma_noise: float | Tensor | None = None) -> Tensor:
        r"""The log-likelihood :math:`\log p(D \mid \theta_*)` at the mode.

        :math:`-\mathrm{loss}/T` for classification;
        :math:`-\mathrm{loss}/(\sigma^2 T) - NC \log(\sigma\sqrt{2\pi})` for regression.

        Args:
            sigma_noise: :math:`\sigma` (default: :attr:`sigma_noise`).

        Returns:
            A scalar float64 tensor.
        """
        sigma = torch.as_tensor(
            self.sigma_noise if sigma_noise is None else sigma_noise, dtype=torch.float64
        )
        ll = -self._c(sigma) * self.loss
        if self.likelihood == "regression":
            ll = ll - self.num_data * self.num_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
        return ll

    def _centered(self) -> Tensor:
        return self.mean.to(torch.float64) - self.prior_mean

    def scatter(self, prior_precision: float | Tensor | None = None) -> Tensor:
        r""":math:`(\theta_* - \mu_0)^\top \mathrm{diag}(\delta) (\theta_* - \mu_0)`."""
        d = self._fitted().prior(self._delta(prior_precision))
        return (d * self._centered() ** 2).sum()

    def log_det_posterior_precision(
        self,
        prior_precision: float | Tensor | None = None,
        sigma_noise: float | Tensor | None = None,
    ) -> Tensor:
        r""":math:`\log\det\Lambda` (float64, differentiable in its arguments)."""
        st = self._fitted()
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        return st.logdet(self._c(sigma).to(st.dtype), self._delta(prior_precision).to(st.dtype))

    def log_marginal_likelihood(
        self,
        prior_precision: float | Tensor | None = None,
        sigma_noise: float | Tensor | None = None,
    ) -> Tensor:
        r"""The Laplace log marginal likelihood (see the class's math).

        Args:
            prior_precision: :math:`\delta` (default: :attr:`prior_precision`); a tensor with
                ``requires_grad`` gives a differentiable result.
            sigma_noise: :math:`\sigma` (default: :attr:`sigma_noise`).

        Returns:
            A scalar tensor.

        Raises:
            RuntimeError: not fitted.
            ValueError: a posterior precision that is not positive definite.

        Example:
            >>> from second.laplace import Laplace
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Linear(2, 1).double()
            >>> X = torch.randn(10, 2, dtype=torch.float64)
            >>> la = Laplace(model, torch.nn.MSELoss(), (X, X.sum(1, keepdim=True)))
            >>> bool(la.log_marginal_likelihood(2.0) != la.log_marginal_likelihood(1.0))
            True
        """
        st = self._fitted()
        delta = self._delta(prior_precision)
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        prior = st.prior(delta).to(torch.float64)
        log_det_ratio = (
            self.log_det_posterior_precision(delta, sigma).to(torch.float64)
            - torch.log(prior).sum()
        )
        return self.log_likelihood(sigma) - 0.5 * (log_det_ratio + self.scatter(delta))

    # -- optimising the prior ----------------------------------------------------------------
    def optimize_prior_precision(
        self,
        method: str = "mackay",
        *,
        per_group: bool = False,
        fit_sigma_noise: bool | None = None,
        tol: float = 1e-8,
        maxiter: int = 200,
    ) -> PriorOptimizationResult:
        r"""Maximise the log marginal likelihood over the prior precision (and the noise).

        * ``"mackay"``: the fixed-point update at which the LML's derivatives vanish,
          :math:`\delta_g \leftarrow \gamma_g / \|\theta_{*,g} - \mu_{0,g}\|^2` with the
          effective number of parameters :math:`\gamma_g = P_g - \delta_g
          \mathrm{tr}_g(\Lambda^{-1})`, and for regression
          :math:`\sigma^2 \leftarrow 2\,\mathrm{loss} / (T (NC - \gamma))`. It stops when
          no value changes by more than ``tol`` relative.
        * ``"gradient"``: L-BFGS with a strong-Wolfe line search on the logarithms;
          stops when the gradient norm relative to :math:`\max(1, |\mathrm{LML}|)` is below
          ``tol``, or when no logarithm changes by more than ``tol`` while that norm is below
          :math:`\sqrt{\mathrm{tol}}` (the line search at the LML's rounding level).

        A run that stops at ``maxiter`` warns (:class:`~second.ConvergenceWarning`).

        The result is stored in :attr:`prior_precision` (and :attr:`sigma_noise`).

        Args:
            method: ``"mackay"`` (default) or ``"gradient"``.
            per_group: one prior precision per group (:attr:`groups`) instead of a scalar.
            fit_sigma_noise: also fit :math:`\sigma` (default: for regression).
            tol: the stopping tolerance (default ``1e-8``).
            maxiter: the iteration limit (default 200).

        Returns:
            A :class:`PriorOptimizationResult`.

        Raises:
            ValueError: an unknown method, ``fit_sigma_noise`` for classification, or
                parameters equal to the prior mean (the optimum is an infinite precision).
        """
        st = self._fitted()
        if method not in ("mackay", "gradient"):
            raise ValueError(f"method must be 'mackay' or 'gradient', got {method!r}")
        if fit_sigma_noise is None:
            fit_sigma_noise = self.likelihood == "regression"
        if fit_sigma_noise and self.likelihood != "regression":
            raise ValueError("fit_sigma_noise is for regression")
        G = len(self.groups) if per_group else 1
        gi = self._group_index if per_group else torch.zeros_like(self._group_index)
        sq = torch.zeros(G, dtype=torch.float64, device=gi.device)
        sq.index_add_(0, gi, self._centered().to(gi.device) ** 2)
        if bool((sq == 0).any()):
            raise ValueError(
                "the parameters of a group equal the prior mean: the marginal likelihood grows "
                "without bound in its prior precision"
            )
        cur = self.prior_precision.to(gi.device)
        if per_group:
            delta = cur.expand(G).clone() if cur.dim() == 0 else cur.clone()
        else:
            delta = cur.mean().reshape(1)
        sigma = torch.tensor(self.sigma_noise, dtype=torch.float64)
        if method == "mackay":
            counts = torch.bincount(gi, minlength=G).to(torch.float64)
            sigma = sigma.to(gi.device)
            converged, it, message = False, 0, f"reached maxiter={maxiter}"
            for iteration in range(1, maxiter + 1):
                it = iteration
                d_arg = delta if per_group else delta.reshape(())
                Sd = st.inv_diag(self._c(sigma).to(st.dtype), d_arg.to(st.dtype)).to(torch.float64)
                tr = torch.zeros(G, dtype=torch.float64, device=gi.device).index_add_(0, gi, Sd)
                gamma = counts - delta * tr
                new = gamma / sq
                change = float(((new - delta).abs() / delta).max())
                if fit_sigma_noise:
                    dof = self.num_data * self.num_outputs - float(gamma.sum())
                    if dof <= 0:
                        raise ValueError("more effective parameters than outputs: sigma undefined")
                    # the loss is half the squared error: SSE = 2 loss
                    new_sigma = torch.tensor(math.sqrt(2 * self.loss / (self.temperature * dof)))
                    change = max(change, float((new_sigma - sigma).abs() / sigma))
                    sigma = new_sigma
                delta = new
                if change <= tol:
                    converged, message = True, f"relative change {change:.2e} <= tol"
                    break
        else:
            log_d = delta.log().clone().requires_grad_(True)
            log_s = sigma.log().clone().requires_grad_(fit_sigma_noise)
            variables = [log_d, log_s] if fit_sigma_noise else [log_d]
            opt = torch.optim.LBFGS(
                variables,
                lr=1.0,
                max_iter=1,  # one iteration a step: the change of the variables is checked
                max_eval=25,
                tolerance_grad=0.0,
                tolerance_change=0.0,
                history_size=20,
                line_search_fn="strong_wolfe",
            )

            def closure():
                opt.zero_grad()
                d = log_d.exp() if per_group else log_d.exp().reshape(())
                loss = -self.log_marginal_likelihood(d, log_s.exp())
                loss.backward()
                return loss

            def grad_norm() -> float:
                f = float(closure().detach())
                grads = []
                for v in variables:
                    assert v.grad is not None  # closure() has just differentiated every variable
                    grads.append(v.grad)
                return float(parameters_to_vector(grads).norm()) / max(1.0, abs(f))

            converged, it, gnorm = False, 0, grad_norm()
            message = f"reached maxiter={maxiter}"
            for iteration in range(1, maxiter + 1):
                it = iteration
                before = parameters_to_vector([v.detach() for v in variables])
                opt.step(closure)
                change = float(
                    (parameters_to_vector([v.detach() for v in variables]) - before).abs().max()
                )
                gnorm = grad_norm()
                # the relative change of the values (a change of the logarithms), as MacKay's
                # stops; or a gradient already below tol. A step that no longer moves (the line
                # search at the rounding level of the LML) counts only with a small gradient
                if gnorm <= tol or (change <= tol and gnorm <= math.sqrt(tol)):
                    converged = True
                    break
            message = f"relative gradient norm {gnorm:.2e}" + ("" if converged else f", {message}")
            delta, sigma = log_d.detach().exp(), log_s.detach().exp()
        self.prior_precision = delta if per_group else delta.reshape(())
        if fit_sigma_noise:
            self.sigma_noise = float(sigma)
        lml = float(self.log_marginal_likelihood())
        if not converged:
            warnings.warn(
                f"optimize_prior_precision({method!r}) did not converge ({message}); the last "
                "values are stored in prior_precision"
                + (" and sigma_noise" if fit_sigma_noise else "")
                + " (raise maxiter, or check result.converged)",
                ConvergenceWarning,
                stacklevel=2,
            )
        return PriorOptimizationResult(
            self.prior_precision.clone(), self.sigma_noise, lml, it, converged, message
        )
