r"""The posterior and its predictives: covariance, samples, the linearised (GLM) network.

The GLM covariance :math:`J_x \Sigma J_x^\top` takes one of two routes. For the Kronecker
structures, the Jacobian of output :math:`k` with respect to a layer's weight matrix is
:math:`\sum_t g_{kt} a_t^\top` (the gradient at the layer's output times its input), so it
meets each block's eigenbasis as :math:`(Q_G^\top g_k)(Q_A^\top a)^\top`: the per-example
Jacobians are never formed (:meth:`~second.laplace._structures.KronStructure.jacobian_covariance`).
Every other structure takes dense per-example Jacobians
(:func:`second.func.per_example_jacobians`) in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..data import map_batch
from ..func import call_model, differentiable_attention
from ..func.per_example import per_example_jacobians
from ._state import LaplaceState
from ._structures import KronStructure

__all__ = ["Predictive", "LINKS", "PREDS"]

LINKS = ("probit", "probit_centered", "bridge", "mc")
PREDS = ("glm", "nn")

# floats of per-example Jacobians (or rotated layer Jacobians) held at once (32 MB in float64)
_JACOBIAN_BUDGET = 2**22

# kept for code that imported the helper from here before it moved to second.func
_per_example_jacobians = per_example_jacobians


def link_probabilities(
    f: Tensor, cov: Tensor, link: str, n_samples: int = 100, generator=None
) -> Tensor:
    r"""Class probabilities of logits :math:`N(f, \Sigma_f)` (``f [n, C]``, ``cov [n, C, C]``).

    ``"probit"``: :math:`\mathrm{softmax}(f / \sqrt{1 + \tfrac{\pi}{8} v})` with
    :math:`v = \mathrm{diag}\,\Sigma_f`; ``"probit_centered"``: the same with :math:`v` the
    diagonal of :math:`P \Sigma_f P`, :math:`P = I - \tfrac1C \mathbf{1}\mathbf{1}^\top`;
    ``"bridge"``: the Laplace bridge; ``"mc"``: the mean softmax of ``n_samples`` draws.
    """
    C = f.shape[1]
    if link == "probit_centered":
        P = torch.eye(C, dtype=f.dtype, device=f.device) - 1.0 / C
        cov = P @ cov @ P
    var = torch.diagonal(cov, dim1=1, dim2=2)
    if link in ("probit", "probit_centered"):
        return torch.softmax(f / torch.sqrt(1.0 + math.pi / 8.0 * var), -1)
    if link == "bridge":
        alpha = (1.0 - 2.0 / C + f.exp() / C**2 * torch.exp(-f).sum(1, keepdim=True)) / var
        return alpha / alpha.sum(1, keepdim=True)
    jitter = 1e-10 * var.mean().clamp_min(1e-30)
    L = torch.linalg.cholesky(cov + jitter * torch.eye(C, dtype=f.dtype, device=f.device))
    Z = torch.randn(n_samples, *f.shape, dtype=f.dtype, device=f.device, generator=generator)
    logits = f.unsqueeze(0) + torch.einsum("ncd,snd->snc", L, Z)
    return torch.softmax(logits, -1).mean(0)


class Predictive(LaplaceState):
    """The posterior and predictive part of :class:`~second.laplace.Laplace` (a mixin)."""

    # -- the posterior -----------------------------------------------------------------------
    def _c_delta(self):
        st = self._fitted()
        return st, self._c(self.sigma_noise).to(st.dtype), self.prior_precision.to(st.dtype)

    def posterior_covariance(self) -> Tensor:
        r"""The dense :math:`\Sigma = \Lambda^{-1}` (``P x P``), for small subsets.

        Raises:
            RuntimeError: not fitted.
            ValueError: more than 20,000 parameters (use :meth:`sample` or the predictive).
        """
        st, c, d = self._c_delta()
        if self.num_params > 20_000:
            raise ValueError(
                f"posterior_covariance() is dense ({self.num_params}^2 entries): use a smaller "
                "subset, sample() or functional_covariance()"
            )
        eye = torch.eye(self.num_params, dtype=st.dtype, device=self.mean.device)
        S = st.solve(c, d, eye)
        return 0.5 * (S + S.T)

    def posterior_variance(self) -> Tensor:
        r"""The diagonal of :math:`\Sigma` (flat, one entry per parameter)."""
        st, c, d = self._c_delta()
        return st.inv_diag(c, d)

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        r"""Parameter samples :math:`\theta_* + \Sigma^{1/2} z`, ``[n_samples, P]``.

        Args:
            n_samples: the number of samples (default 100).
            generator: the random generator (default: torch's global one).

        Returns:
            Flat parameter vectors, one per row, in the order of :attr:`params`.
        """
        st, c, d = self._c_delta()
        Z = torch.randn(
            self.num_params, n_samples, dtype=st.dtype, device=self.mean.device, generator=generator
        )
        return self.mean.unsqueeze(0) + st.sample(c, d, Z, generator).T.to(self.mean.dtype)

    # -- predictives -------------------------------------------------------------------------
    def _inputs(self, X) -> tuple[nn.Module, Any]:
        """The function of the posterior's parameters and its input (the features for LLA).

        ``X``: a tensor, a tuple of tensors (``model(*X)``) or a dict (``model(**X)``, a
        target under the task's ``target_key`` left out).
        """
        if isinstance(X, Mapping):
            X = {k: v for k, v in X.items() if k != self.task.target_key}
        if self._last is None:
            return self.model, X
        captured: list[Tensor] = []
        hook = self._last.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
        try:
            with torch.no_grad(), differentiable_attention():
                call_model(self.model, X)
        finally:
            hook.remove()
        return self._last, captured[-1]

    def functional_covariance(self, X: Any) -> tuple[Tensor, Tensor]:
        r"""The linearised (GLM) predictive of the outputs: :math:`f(x)` and :math:`J_x \Sigma J_x^\top`.

        With :math:`J_x = \partial f(x; \theta) / \partial\theta` at :math:`\theta_*`,
        :math:`f_{lin}(x) \sim N(f(x; \theta_*), J_x \Sigma J_x^\top)` per input. For
        ``"kfac"``/``"ekfac"`` each layer's Jacobian stays in its factored form (the input
        times the gradient at the layer's output, one batched backward pass over the
        outputs) and is rotated factor by factor; the other structures take dense
        per-example Jacobians (:func:`second.func.per_example_jacobians`), in chunks of
        inputs, through the structure's solve.

        Args:
            X: inputs ``[n, ...]``: a tensor, a tuple of tensors (``model(*X)``) or a dict
                (``model(**X)``; a ``labels`` entry, the task's target key, is left out).

        Returns:
            ``(mean [n, C], covariance [n, C, C])``.
        """
        st, c, d = self._c_delta()
        module, inputs = self._inputs(X)
        with torch.no_grad(), differentiable_attention():
            f = call_model(module, inputs)
        if f.dim() != 2:
            raise ValueError(f"the model must give outputs [n, C], got shape {tuple(f.shape)}")
        n, C = f.shape
        if isinstance(st, KronStructure):
            width = st.jacobian_width()
            chunk = max(1, _JACOBIAN_BUDGET // max(1, width * C))
            covs = [
                self._kron_covariance(st, c, d, module, _rows(inputs, s, s + chunk))
                for s in range(0, n, chunk)
            ]
            return f, torch.cat(covs).to(f.dtype)
        P = self.num_params
        chunk = max(1, _JACOBIAN_BUDGET // max(1, P * C))
        covs = []
        for start in range(0, n, chunk):
            J = per_example_jacobians(module, self.params, _rows(inputs, start, start + chunk))
            m = J.shape[0]
            Jt = J.reshape(m * C, P).T  # [P, m C]
            if st.can_whiten:  # J Sigma J^T = (R J^T)^T (R J^T): one rotation
                W = st.whiten(c, d, Jt.to(st.dtype)).to(f.dtype).reshape(P, m, C)
                covs.append(torch.einsum("pnc,pnd->ncd", W, W))
            else:
                S = st.solve(c, d, Jt.to(st.dtype)).to(f.dtype).reshape(P, m, C)
                covs.append(torch.einsum("pnc,pnd->ncd", Jt.reshape(P, m, C), S))
        return f, torch.cat(covs)

    def _kron_covariance(self, st: KronStructure, c, d, module, inputs: Any) -> Tensor:
        """``J Sigma J^T`` of a chunk of inputs from the layers' inputs and output gradients."""
        from ..kfac import Capture

        layers = st.layout.layers
        with torch.enable_grad(), Capture(layers) as cap, differentiable_attention():
            f = call_model(module, inputs)
            n, C = f.shape
            E = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, n, C)
            calls, _ = cap.backprop(f, E, retain_graph=False)  # [C, *output] per call
        rows: list[list[tuple[Tensor, Tensor]]] = [[] for _ in layers]
        for j, inp, g in calls:  # every position apart: the exact Jacobian, never "reduce"
            layer = layers[j]
            rows[j].append(
                (
                    layer.input_rows(inp, weight_sharing="expand"),
                    layer.grad_rows(g.detach(), inp, weight_sharing="expand"),
                )
            )
        fallback = [st.layout.params[i] for i in st.layout.fallback_index]
        J = per_example_jacobians(module, fallback, inputs) if fallback else None
        return st.jacobian_covariance(c, d, rows, J, f.shape, _JACOBIAN_BUDGET)

    def _nn_outputs(self, X: Any, n_samples: int, generator) -> Tensor:
        """Outputs of the network at parameter samples, ``[S, n, C]``."""
        module, inputs = self._inputs(X)
        names = {id(p): k for k, p in module.named_parameters()}
        theta = self.sample(n_samples, generator)
        outs = []
        with torch.no_grad():
            for t in theta:
                offsets, vals = 0, {}
                for p in self.params:
                    vals[names[id(p)]] = t[offsets : offsets + p.numel()].view_as(p)
                    offsets += p.numel()
                outs.append(call_model(module, inputs, vals))
        return torch.stack(outs)

    def predict(
        self,
        X: Any,
        pred: str = "glm",
        link: str | None = None,
        *,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ):
        r"""The posterior predictive at inputs ``X``.

        Classification (class probabilities ``[n, C]``):

        * ``pred="glm"`` (linearised network) with ``link="probit"``:
          :math:`\mathrm{softmax}\big(f / \sqrt{1 + \tfrac{\pi}{8}\mathrm{diag}(J\Sigma J^\top)}\big)`;
          ``link="probit_centered"``: the same with the logits' common mode removed from the
          covariance first, :math:`P J\Sigma J^\top P` with :math:`P = I - \tfrac1C
          \mathbf{1}\mathbf{1}^\top`. The softmax ignores a shift of all logits, so the exact
          predictive is unchanged, but the per-logit probit would read that shift's variance
          (for cross-entropy it lies in the GGN's null space and is set by the prior alone)
          as uncertainty; ``link="bridge"``: the Laplace bridge (Hobbhahn et al. 2022), the
          mean of the Dirichlet :math:`\alpha_k = \big(1 - \tfrac2C + \tfrac{e^{f_k}}{C^2}
          \sum_l e^{-f_l}\big) / v_k` with :math:`v = \mathrm{diag}(J\Sigma J^\top)`;
          ``link="mc"``: the mean softmax of ``n_samples`` draws from :math:`N(f, J\Sigma J^\top)`.
        * ``pred="nn"``: the mean softmax of the network at ``n_samples`` parameter samples.

        Regression (``(mean [n, C], covariance [n, C, C])`` of the targets, the noise
        :math:`\sigma^2 I` included): ``"glm"`` is exact for the linearised network;
        ``"nn"`` gives the sample mean and covariance of the network's outputs.

        Args:
            X: inputs ``[n, ...]``: a tensor, a tuple of tensors (``model(*X)``) or a dict
                (``model(**X)``; a ``labels`` entry, the task's target key, is left out).
            pred: ``"glm"`` (default) or ``"nn"``.
            link: ``"probit"``, ``"probit_centered"``, ``"bridge"`` or ``"mc"``
                (classification, glm); default: the object's :attr:`link`.
            n_samples: samples for the Monte-Carlo predictives (default 100).
            generator: the random generator for them.

        Returns:
            Probabilities, or ``(mean, covariance)`` for regression.

        Raises:
            ValueError: an unknown ``pred`` or ``link``.
        """
        link = self.link if link is None else link
        if pred not in PREDS:
            raise ValueError(f"pred must be one of {PREDS}, got {pred!r}")
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        self._fitted()
        if pred == "nn":
            outs = self._nn_outputs(X, n_samples, generator)
            if self.likelihood == "classification":
                return torch.softmax(outs, -1).mean(0)
            mean = outs.mean(0)
            dev = outs - mean
            cov = torch.einsum("snc,snd->ncd", dev, dev) / max(1, n_samples - 1)
            return mean, cov + self.sigma_noise**2 * torch.eye(
                mean.shape[1], dtype=mean.dtype, device=mean.device
            )
        f, cov = self.functional_covariance(X)
        if self.likelihood == "regression":
            return f, cov + self.sigma_noise**2 * torch.eye(
                f.shape[1], dtype=f.dtype, device=f.device
            )
        return link_probabilities(f, cov, link, n_samples, generator)


def _rows(inputs: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a tensor, or of every tensor of a tuple or dict of inputs."""
    return map_batch(inputs, lambda t: t[start:stop])
