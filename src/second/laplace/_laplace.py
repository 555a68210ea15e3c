r"""The Laplace approximation of a trained network's posterior, on the library's curvature."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ..data import Task, as_task, iterate_batches
from ..func import parameters_to_vector
from ..operators import FisherOperator, GGNOperator, HessianOperator
from ._structures import DiagStructure, FullStructure, KronStructure, LowRankStructure

__all__ = ["Laplace", "PriorOptimizationResult"]

STRUCTURES = ("full", "diag", "lowrank", "kfac", "ekfac")
CURVATURES = ("ggn", "hessian", "fisher")
FISHERS = ("type2", "mc", "empirical")
LINKS = ("probit", "bridge", "mc")
PREDS = ("glm", "nn")

# floats of per-example Jacobians held at once in the predictive (32 MB in float64)
_JACOBIAN_BUDGET = 2**22


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


def _likelihood(loss_fn) -> str:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return "classification"
    if isinstance(loss_fn, nn.MSELoss):
        return "regression"
    raise ValueError(
        "Laplace supports nn.CrossEntropyLoss (classification) and nn.MSELoss (regression), "
        f"got {type(loss_fn).__name__}"
    )


def _last_layer(model: nn.Module) -> tuple[str, nn.Module]:
    found = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            found = (name, module)
    if found is None or not isinstance(found[1], nn.Linear):
        kind = None if found is None else type(found[1]).__name__
        raise ValueError(
            f"subset='last_layer' needs an nn.Linear as the last module with parameters, got {kind}"
        )
    return found


def _per_example_jacobians(module: nn.Module, params: Sequence[Tensor], X: Tensor) -> Tensor:
    """``d f(x_i) / d theta`` for every input, ``[n, C, P]`` (``torch.func``: C backward passes)."""
    names = {id(p): k for k, p in module.named_parameters()}
    keys = [names[id(p)] for p in params]

    def f(theta, x):
        return functional_call(module, dict(zip(keys, theta)), (x.unsqueeze(0),))[0]

    with torch.enable_grad():
        Js = vmap(jacrev(f), in_dims=(None, 0))(tuple(p.detach() for p in params), X)
    n, C = X.shape[0], Js[0].shape[1]
    return torch.cat([J.reshape(n, C, -1) for J in Js], dim=2).detach()


def _positive(value, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if t.dim() > 1 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(
            f"{name} must be positive and finite (a scalar or a 1-D tensor), got {value}"
        )
    return t


class Laplace:
    r"""A Laplace approximation :math:`p(\theta \mid D) \approx N(\theta_*, \Lambda^{-1})` at a trained network.

    With the curvature :math:`H` of the summed negative log-likelihood at the trained
    parameters :math:`\theta_*` (the GGN by default), the observation noise :math:`\sigma`
    (regression; 1 for classification), the temperature :math:`T` and the prior
    :math:`N(\mu_0, \mathrm{diag}(\delta)^{-1})`,

    .. math::

        \Lambda = \frac{1}{\sigma^2 T} H + \mathrm{diag}(\delta), \qquad
        \log p(D) \approx \log p(D \mid \theta_*) - \tfrac12 (\theta_* - \mu_0)^\top
        \mathrm{diag}(\delta) (\theta_* - \mu_0) - \tfrac12 \big(\log\det\Lambda - \textstyle\sum
        \log\delta\big),

    the log marginal likelihood (LML) of MacKay and of laplace-torch, whose conventions it
    follows (the likelihood term is :math:`-\tfrac{1}{\sigma^2 T}` times the summed loss, plus
    :math:`-\tfrac{NC}{2}\log(2\pi\sigma^2)` for regression). The prior precision
    :math:`\delta` is the Laplace name of a damping: it is applied at call time, so the
    curvature is fitted once and the prior can be optimised without refitting. It is a
    scalar or one value per *group* (the parameters that a module owns directly: a layer's
    weight and bias share one value; :attr:`groups` names them).

    Likelihoods: ``nn.CrossEntropyLoss`` (categorical) and ``nn.MSELoss`` (Gaussian with
    observation noise ``sigma_noise``, fitted with the prior). The loss's reduction does not
    matter: the curvature and the likelihood are always those of the summed log-likelihood.

    Structures of :math:`H` (each with its own cost):

    * ``"full"``: the dense matrix (``P`` products with the curvature operator); small
      subsets, the last layer.
    * ``"diag"``: its exact diagonal.
    * ``"lowrank"``: the top ``rank`` eigenpairs (:func:`second.eigsh`), zero elsewhere.
    * ``"kfac"``/``"ekfac"``: :class:`second.kfac.KFACOperator`/``EKFACOperator`` blocks in
      their eigenbasis (``subset="all"`` or ``"last_layer"``), with the conventions of
      :mod:`second.kfac`; the prior is added to each block's eigenvalues.

    Args:
        model: the trained network (``model(X)`` gives logits ``[n, C]`` or outputs ``[n, C]``).
        loss_fn: ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``.
        data: the training data: one ``(X, y)`` batch or an iterable of batches (a
            ``DataLoader``), read in one streaming pass plus what the curvature needs; or
            ``None`` to build an unfitted object for :meth:`load_state_dict`.
        subset: ``"all"`` (default), ``"last_layer"`` (the last ``nn.Linear``, on features
            computed once) or a sequence of the model's parameters.
        structure: one of ``"full"`` (default), ``"diag"``, ``"lowrank"``, ``"kfac"``, ``"ekfac"``.
        curvature: ``"ggn"`` (default), ``"hessian"`` (``"full"``, ``"diag"``, ``"lowrank"``)
            or ``"fisher"``.
        fisher: the Fisher estimate for ``curvature="fisher"``: ``"type2"`` (default),
            ``"mc"`` or ``"empirical"`` (``docs/glossary.md``).
        prior_precision: :math:`\delta`, a positive scalar or one value per group (default 1).
        prior_mean: :math:`\mu_0`, a scalar or a flat tensor (default 0).
        temperature: :math:`T` (default 1).
        sigma_noise: :math:`\sigma` for regression (default 1; must be 1 for classification).
        rank: eigenpairs for ``"lowrank"`` (default 20).
        mc_samples: targets per example for ``fisher="mc"`` (default 1).
        task: how to run the model on a batch (:class:`second.Task`).
        check_deterministic: refuse a model in training mode with dropout or batch norm, and
            data that changes between passes (default ``True``).

    Attributes:
        params: the parameters of the posterior; mean: :math:`\theta_*` (flat);
        groups: the prior groups' names; num_data, num_outputs: ``N`` and ``C``;
        loss: the summed loss at :math:`\theta_*` (cross-entropy, or half the squared error).

    Raises:
        ValueError: an unsupported loss, structure, curvature, fisher or subset, a
            non-positive prior precision, temperature or noise, a KFAC structure with the
            Hessian or with a hand-picked parameter subset.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
        >>> la = Laplace(model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> la.num_params, la.posterior_covariance().shape
        (8, torch.Size([8, 8]))
        >>> result = la.optimize_prior_precision()
        >>> result.converged
        True
        >>> probs = la.predict(X[:4])          # linearised, probit link
        >>> probs.shape, bool(torch.allclose(probs.sum(1), torch.ones(4, dtype=torch.float64)))
        (torch.Size([4, 2]), True)

    References:
        D. MacKay. A practical Bayesian framework for backpropagation networks. 1992.
        E. Daxberger et al. Laplace Redux: effortless Bayesian deep learning. NeurIPS 2021.
        A. Immer et al. Improving predictions of Bayesian neural nets via local
        linearization. AISTATS 2021.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data=None,
        *,
        subset: str | Sequence[Tensor] = "all",
        structure: str = "full",
        curvature: str = "ggn",
        fisher: str = "type2",
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        sigma_noise: float = 1.0,
        rank: int = 20,
        mc_samples: int = 1,
        task: Task | None = None,
        check_deterministic: bool = True,
    ):
        self.likelihood = _likelihood(loss_fn)
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if structure in ("kfac", "ekfac") and curvature == "hessian":
            raise ValueError("KFAC approximates the GGN or a Fisher, not the Hessian")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.model, self.loss_fn = model, loss_fn
        self.structure_name, self.curvature, self.fisher = structure, curvature, fisher
        self.rank, self.mc_samples = int(rank), int(mc_samples)
        self.task = as_task(task, loss_fn)
        self.check_deterministic = check_deterministic
        self.temperature = float(_positive(temperature, "temperature"))
        sigma = float(_positive(sigma_noise, "sigma_noise"))
        if self.likelihood == "classification" and sigma != 1.0:
            raise ValueError("sigma_noise is for regression; classification has none")
        self.sigma_noise = sigma
        self._select(subset)
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self._structure = None
        if data is not None:
            self.fit(data)

    # -- parameters and groups ---------------------------------------------------------------
    def _select(self, subset) -> None:
        model = self.model
        if isinstance(subset, str):
            if subset == "all":
                params = [p for p in model.parameters() if p.requires_grad]
                self._last = None
            elif subset == "last_layer":
                name, last = _last_layer(model)
                params = [p for p in last.parameters() if p.requires_grad]
                self._last = last
            else:
                raise ValueError(
                    f"subset must be 'all', 'last_layer' or a sequence of parameters, got {subset!r}"
                )
            self.subset = subset
        else:
            params = list(subset)
            ids = {id(p) for p in model.parameters()}
            if not params or any(id(p) not in ids for p in params):
                raise ValueError("subset must be a non-empty sequence of the model's parameters")
            if self.structure_name in ("kfac", "ekfac"):
                raise ValueError(
                    "structure='kfac'/'ekfac' takes subset='all' or 'last_layer', not a "
                    "hand-picked parameter subset"
                )
            self.subset = "params"
            self._last = None
        if not params:
            raise ValueError("the subset has no parameters that require grad")
        self.params = params
        owner = {}
        root = self._last if self._last is not None else model
        for mname, module in root.named_modules():
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), mname or type(module).__name__)
        names: list[str] = []
        index = []
        for p in params:
            g = owner[id(p)]
            if g not in names:
                names.append(g)
            index.append(torch.full((p.numel(),), names.index(g), dtype=torch.long))
        self.groups = names
        self._group_index = torch.cat(index).to(params[0].device)
        self._group_of_param = [names.index(owner[id(p)]) for p in params]
        self.num_params = int(self._group_index.numel())

    @property
    def prior_precision(self) -> Tensor:
        r""":math:`\delta`: a scalar tensor or one value per group (float64)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        t = _positive(value, "prior_precision")
        if t.dim() == 1 and t.numel() not in (1, len(self.groups)):
            raise ValueError(
                f"prior_precision has {t.numel()} values; the posterior has {len(self.groups)} "
                f"groups ({', '.join(self.groups)})"
            )
        self._prior_precision = t.reshape(()) if t.numel() == 1 and t.dim() == 1 else t

    @property
    def prior_mean(self) -> Tensor:
        r""":math:`\mu_0` (a scalar or a flat tensor)."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value) -> None:
        t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
        if t.dim() > 1 or (t.dim() == 1 and t.numel() != self.num_params):
            raise ValueError(f"prior_mean must be a scalar or a flat tensor of {self.num_params}")
        self._prior_mean = t

    # -- fitting -----------------------------------------------------------------------------
    def _forward_pass(self, data) -> list:
        """One streaming pass: the loss at the mode, N, C, and the last layer's features."""
        device = self.params[0].device
        features: list = []
        loss, n, C = 0.0, 0, None
        hook = None
        if self._last is not None:
            captured: list[Tensor] = []
            hook = self._last.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
        try:
            with torch.no_grad():
                for batch in iterate_batches(data, self.task, device):
                    f = self.task.output(self.model, batch)
                    y = self.task.targets(batch)
                    if f.dim() != 2:
                        raise ValueError(
                            f"the model must give outputs [n, C], got shape {tuple(f.shape)}"
                        )
                    loss += float(self._summed_loss(f, y))
                    n += f.shape[0]
                    C = f.shape[1]
                    if hook is not None:
                        features.append((captured.pop(), y))
                        captured.clear()
        finally:
            if hook is not None:
                hook.remove()
        if n == 0:
            raise ValueError("the data is empty")
        self.loss, self.num_data, self.num_outputs = loss, n, int(C)
        return features

    def _summed_loss(self, f: Tensor, y: Tensor) -> Tensor:
        if self.likelihood == "classification":
            return nn.functional.cross_entropy(f, y, reduction="sum")
        return 0.5 * ((f - y.reshape(f.shape)) ** 2).sum()

    def _sum_loss_fn(self) -> nn.Module:
        if self.likelihood == "classification":
            return nn.CrossEntropyLoss(reduction="sum")
        return nn.MSELoss(reduction="sum")

    @property
    def _curvature_scale(self) -> float:
        """The factor from the summed loss's curvature to the NLL's at sigma = 1."""
        if self.likelihood == "classification":
            return 1.0
        # MSE sum = 2 x (half squared error); its empirical Fisher has (2 r)(2 r)^T
        return 0.25 if (self.curvature == "fisher" and self.fisher == "empirical") else 0.5

    def _operator(self, module, data, params):
        loss = self._sum_loss_fn()
        kw = dict(check_deterministic=self.check_deterministic)
        if self.curvature == "ggn" or (self.curvature == "fisher" and self.fisher == "type2"):
            return GGNOperator(module, loss, data, params, task=self._fit_task, **kw)
        if self.curvature == "hessian":
            return HessianOperator(module, loss, data, params, task=self._fit_task, **kw)
        return FisherOperator(
            module,
            loss,
            data,
            params,
            fisher=self.fisher,
            mc_samples=self.mc_samples,
            task=self._fit_task,
            **kw,
        )

    def fit(self, data) -> Laplace:
        r"""Fit the curvature at the model's current parameters (the mode :math:`\theta_*`).

        Args:
            data: one ``(X, y)`` batch or an iterable of batches.

        Returns:
            ``self``.
        """
        features = self._forward_pass(data)
        if self._last is not None:
            # the features of all the data as one batch: the curvature keeps its graphs
            phi, y = torch.cat([b[0] for b in features]), torch.cat([b[1] for b in features])
            module, fdata, self._fit_task = self._last, (phi, y), Task(self._sum_loss_fn())
        else:
            # the same batches, read by the user's task, with the summed loss
            self._fit_task = copy.copy(self.task)
            self._fit_task.loss_fn = self._sum_loss_fn()
            module, fdata = self.model, data
        params = self.params
        s = self._curvature_scale
        gi = self._group_index
        name = self.structure_name
        if name == "full":
            H = self._operator(module, fdata, params).to_dense()
            self._structure = FullStructure(s * H.detach(), gi)
        elif name == "diag":
            self._structure = DiagStructure(s * self._diagonal(module, fdata, params), gi)
        elif name == "lowrank":
            from ..spectral import eigsh

            op = self._operator(module, fdata, params)
            k = min(self.rank, self.num_params)
            evals, evecs = eigsh(op, k=k, which="LA")
            self._structure = LowRankStructure(evecs.detach(), s * evals.detach(), gi)
        else:
            self._structure = self._kron(module, fdata, s)
        self.mean = parameters_to_vector([p.detach() for p in params]).clone()
        return self

    def _diagonal(self, module, data, params) -> Tensor:
        if self.curvature == "ggn" or (self.curvature == "fisher" and self.fisher == "type2"):
            from ..spectral import ggn_diagonal  # C backward passes per example

            loss = self._sum_loss_fn()
            return ggn_diagonal(module, loss, data, params, task=self._fit_task).detach()
        from ..spectral import diagonal

        return diagonal(self._operator(module, data, params), method="exact").detach()

    def _kron(self, module, data, scale: float) -> KronStructure:
        from ..kfac import EKFACOperator, KFACOperator

        cls = EKFACOperator if self.structure_name == "ekfac" else KFACOperator
        fisher = "type2" if self.curvature == "ggn" else self.fisher
        op = cls(
            module,
            self._sum_loss_fn(),
            data,
            fisher=fisher,
            mc_samples=self.mc_samples,
            check_deterministic=self.check_deterministic,
        )
        if [id(p) for p in op.params] != [id(p) for p in self.params]:
            raise ValueError("the KFAC operator's parameters differ from the subset's")
        blocks = [b.with_eigenvalues(scale * b.eigenvalues) for b in op.eigen()]
        diagonals = [type(d)(scale * d.diagonal) for d in op.diagonals]
        gp = self._group_of_param
        block_groups = []
        for iw, ib in op.layout.layer_index:
            if ib is not None and gp[ib] != gp[iw]:  # pragma: no cover - one owner per layer
                raise ValueError("a layer's weight and bias are in different prior groups")
            block_groups.append(gp[iw])
        diag_groups = [gp[i] for i in op.layout.fallback_index]
        return KronStructure(
            blocks, diagonals, op.layout, self._group_index, block_groups, diag_groups
        )

    def _fitted(self):
        if self._structure is None:
            raise RuntimeError("the Laplace approximation is not fitted: call fit(data) first")
        return self._structure

    # -- the marginal likelihood -------------------------------------------------------------
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
        self._fitted()
        d = self._structure.prior(self._delta(prior_precision))
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
          stops when the gradient norm is below ``tol``.

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
                max_iter=maxiter,
                tolerance_grad=tol,
                tolerance_change=0.0,
                line_search_fn="strong_wolfe",
            )

            def closure():
                opt.zero_grad()
                d = log_d.exp() if per_group else log_d.exp().reshape(())
                loss = -self.log_marginal_likelihood(d, log_s.exp())
                loss.backward()
                return loss

            opt.step(closure)
            closure()
            gnorm = float(torch.cat([v.grad.reshape(-1) for v in variables]).norm())
            it = int(opt.state[opt._params[0]]["n_iter"])
            converged = gnorm <= tol * max(1.0, abs(float(closure().detach())))
            message = f"gradient norm {gnorm:.2e}"
            delta, sigma = log_d.detach().exp(), log_s.detach().exp()
        self.prior_precision = delta if per_group else delta.reshape(())
        if fit_sigma_noise:
            self.sigma_noise = float(sigma)
        lml = float(self.log_marginal_likelihood())
        return PriorOptimizationResult(
            self.prior_precision.clone(), self.sigma_noise, lml, it, converged, message
        )

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
    def _inputs(self, X) -> tuple[Callable, Tensor]:
        """The function of the posterior's parameters and its input (the features for LLA)."""
        if self._last is None:
            return self.model, X
        captured: list[Tensor] = []
        hook = self._last.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
        try:
            with torch.no_grad():
                self.model(X)
        finally:
            hook.remove()
        return self._last, captured[-1]

    def functional_covariance(self, X: Tensor) -> tuple[Tensor, Tensor]:
        r"""The linearised (GLM) predictive of the outputs: :math:`f(x)` and :math:`J_x \Sigma J_x^\top`.

        With :math:`J_x = \partial f(x; \theta) / \partial\theta` at :math:`\theta_*`,
        :math:`f_{lin}(x) \sim N(f(x; \theta_*), J_x \Sigma J_x^\top)` per input. The Jacobian
        rows of each input come from one vectorized reverse pass per output (``torch.func``),
        in chunks of inputs, and meet :math:`\Sigma` through the structure's solve.

        Args:
            X: inputs ``[n, ...]``.

        Returns:
            ``(mean [n, C], covariance [n, C, C])``.
        """
        st, c, d = self._c_delta()
        module, inputs = self._inputs(X)
        with torch.no_grad():
            f = module(inputs)
        if f.dim() != 2:
            raise ValueError(f"the model must give outputs [n, C], got shape {tuple(f.shape)}")
        n, C = f.shape
        P = self.num_params
        chunk = max(1, _JACOBIAN_BUDGET // max(1, P * C))
        covs = []
        for start in range(0, n, chunk):
            J = _per_example_jacobians(module, self.params, inputs[start : start + chunk])
            m = J.shape[0]
            Jt = J.reshape(m * C, P).T  # [P, m C]
            if st.whiten is not None:  # J Sigma J^T = (R J^T)^T (R J^T): one rotation
                W = st.whiten(c, d, Jt.to(st.dtype)).to(f.dtype).reshape(P, m, C)
                covs.append(torch.einsum("pnc,pnd->ncd", W, W))
            else:
                S = st.solve(c, d, Jt.to(st.dtype)).to(f.dtype).reshape(P, m, C)
                covs.append(torch.einsum("pnc,pnd->ncd", Jt.reshape(P, m, C), S))
        return f, torch.cat(covs)

    def _nn_outputs(self, X: Tensor, n_samples: int, generator) -> Tensor:
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
                outs.append(functional_call(module, vals, (inputs,)))
        return torch.stack(outs)

    def predict(
        self,
        X: Tensor,
        pred: str = "glm",
        link: str = "probit",
        *,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ):
        r"""The posterior predictive at inputs ``X``.

        Classification (class probabilities ``[n, C]``):

        * ``pred="glm"`` (linearised network) with ``link="probit"``:
          :math:`\mathrm{softmax}\big(f / \sqrt{1 + \tfrac{\pi}{8}\mathrm{diag}(J\Sigma J^\top)}\big)`;
          ``link="bridge"``: the Laplace bridge (Hobbhahn et al. 2022), the mean of the
          Dirichlet :math:`\alpha_k = \big(1 - \tfrac2C + \tfrac{e^{f_k}}{C^2}\sum_l e^{-f_l}\big) / v_k`
          with :math:`v = \mathrm{diag}(J\Sigma J^\top)`;
          ``link="mc"``: the mean softmax of ``n_samples`` draws from :math:`N(f, J\Sigma J^\top)`.
        * ``pred="nn"``: the mean softmax of the network at ``n_samples`` parameter samples.

        Regression (``(mean [n, C], covariance [n, C, C])`` of the targets, the noise
        :math:`\sigma^2 I` included): ``"glm"`` is exact for the linearised network;
        ``"nn"`` gives the sample mean and covariance of the network's outputs.

        Args:
            X: inputs ``[n, ...]``.
            pred: ``"glm"`` (default) or ``"nn"``.
            link: ``"probit"`` (default), ``"bridge"`` or ``"mc"`` (classification, glm).
            n_samples: samples for the Monte-Carlo predictives (default 100).
            generator: the random generator for them.

        Returns:
            Probabilities, or ``(mean, covariance)`` for regression.

        Raises:
            ValueError: an unknown ``pred`` or ``link``.
        """
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
            return mean, cov + self.sigma_noise**2 * torch.eye(mean.shape[1], dtype=mean.dtype)
        f, cov = self.functional_covariance(X)
        if self.likelihood == "regression":
            return f, cov + self.sigma_noise**2 * torch.eye(f.shape[1], dtype=f.dtype)
        var = torch.diagonal(cov, dim1=1, dim2=2)
        if link == "probit":
            return torch.softmax(f / torch.sqrt(1.0 + math.pi / 8.0 * var), -1)
        if link == "bridge":
            C = f.shape[1]
            alpha = (1.0 - 2.0 / C + f.exp() / C**2 * torch.exp(-f).sum(1, keepdim=True)) / var
            return alpha / alpha.sum(1, keepdim=True)
        jitter = 1e-10 * torch.diagonal(cov, dim1=1, dim2=2).mean().clamp_min(1e-30)
        L = torch.linalg.cholesky(cov + jitter * torch.eye(f.shape[1], dtype=f.dtype))
        Z = torch.randn(n_samples, *f.shape, dtype=f.dtype, device=f.device, generator=generator)
        logits = f.unsqueeze(0) + torch.einsum("ncd,snd->snc", L, Z)
        return torch.softmax(logits, -1).mean(0)

    # -- saving ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a fitted approximation needs, to save with :func:`torch.save`.

        Returns:
            A dict of tensors and settings; the model's own parameters are not included.
        """
        st = self._fitted()
        return {
            "version": 1,
            "likelihood": self.likelihood,
            "structure": self.structure_name,
            "subset": self.subset,
            "curvature": self.curvature,
            "fisher": self.fisher,
            "mean": self.mean,
            "prior_precision": self.prior_precision,
            "prior_mean": self.prior_mean,
            "sigma_noise": self.sigma_noise,
            "temperature": self.temperature,
            "loss": self.loss,
            "num_data": self.num_data,
            "num_outputs": self.num_outputs,
            "groups": list(self.groups),
            "fitted": st.state(),
        }

    def load_state_dict(self, state: dict) -> Laplace:
        """Restore a fitted approximation saved with :meth:`state_dict`.

        The object must be built for the same model, loss, subset and structure (with
        ``data=None``); the KFAC layout is rebuilt from the model.

        Args:
            state: what :meth:`state_dict` returned.

        Returns:
            ``self``.

        Raises:
            ValueError: a state saved for another structure, subset, likelihood or size.
        """
        for key, mine in (
            ("likelihood", self.likelihood),
            ("structure", self.structure_name),
            ("subset", self.subset),
            ("groups", list(self.groups)),
        ):
            if state.get(key) != mine:
                raise ValueError(f"the state was saved with {key}={state.get(key)!r}, not {mine!r}")
        if state["mean"].numel() != self.num_params:
            raise ValueError(
                f"the state has {state['mean'].numel()} parameters, the subset {self.num_params}"
            )
        self.curvature, self.fisher = state["curvature"], state["fisher"]
        self.mean = state["mean"].clone()
        self.prior_precision = state["prior_precision"]
        self.prior_mean = state["prior_mean"]
        self.sigma_noise, self.temperature = (
            float(state["sigma_noise"]),
            float(state["temperature"]),
        )
        self.loss, self.num_data = float(state["loss"]), int(state["num_data"])
        self.num_outputs = int(state["num_outputs"])
        fitted, gi = state["fitted"], self._group_index
        name = self.structure_name
        if name == "full":
            self._structure = FullStructure(fitted["H"], gi)
        elif name == "diag":
            self._structure = DiagStructure(fitted["h"], gi)
        elif name == "lowrank":
            self._structure = LowRankStructure(fitted["U"], fitted["evals"], gi)
        else:
            self._structure = self._kron_from_state(fitted)
        return self

    def _kron_from_state(self, fitted: dict) -> KronStructure:
        from ..kfac import BlockLayout, DiagonalBlock, EigenBlock, find_layers

        module = self._last if self._last is not None else self.model
        rules = find_layers(module, self.params)
        owned = {id(p) for layer in rules for p in layer.params()}
        fallback = [p for p in self.params if id(p) not in owned]
        layout = BlockLayout(self.params, rules, fallback)
        blocks = [
            EigenBlock(b["lA"], b["QA"], b["lG"], b["QG"], b["eigenvalues"])
            for b in fitted["blocks"]
        ]
        diagonals = [DiagonalBlock(d) for d in fitted["diagonals"]]
        gp = self._group_of_param
        block_groups = [gp[iw] for iw, _ in layout.layer_index]
        diag_groups = [gp[i] for i in layout.fallback_index]
        return KronStructure(
            blocks, diagonals, layout, self._group_index, block_groups, diag_groups
        )
