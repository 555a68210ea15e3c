r"""The Laplace approximation of a trained network's posterior, on the library's curvature."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .._errors import NonFiniteError
from ..data import Task, as_task, iterate_batches, refuse_stochastic
from ..func import parameters_to_vector
from ..operators import FisherOperator, GGNOperator, HessianOperator
from ._checks import (
    CURVATURES,
    FISHERS,
    STRUCTURES,
    _check_last_output,
    _check_prior_mean,
    _check_prior_precision,
    _Checked,
    _column_targets,
    _last_layer,
    _likelihood,
    _positive,
)
from ._marglik import MarginalLikelihood, PriorOptimizationResult
from ._predictive import LINKS, Predictive
from ._predictive import _per_example_jacobians as _per_example_jacobians  # old import path
from ._saving import Saving
from ._structures import DiagStructure, FullStructure, KronStructure, LowRankStructure

__all__ = ["Laplace", "PriorOptimizationResult"]


class Laplace(MarginalLikelihood, Predictive, Saving):
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
        loss_fn: ``nn.CrossEntropyLoss()`` (its ``ignore_index`` targets are no data; class
            ``weight`` and ``label_smoothing`` are refused: not a log-likelihood) or
            ``nn.MSELoss()`` (targets shaped like the outputs, or ``[n]`` for one output).
        data: the training data: one ``(X, y)`` batch or an iterable of batches (a
            ``DataLoader``), read in one streaming pass plus what the curvature needs; or
            ``None`` to build an unfitted object for :meth:`load_state_dict`.
        subset: ``"last_layer"`` (default: the last ``nn.Linear``, on features computed
            once), ``"all"`` or a sequence of the model's parameters.
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
        link: the classification predictive's default link (:meth:`predict`):
            ``"probit_centered"`` (default), ``"probit"``, ``"bridge"`` or ``"mc"``.
        task: how to run the model on a batch (:class:`second.Task`).
        check_deterministic: refuse a model in training mode with dropout or batch norm
            (:class:`~second.NonDeterministicDataError`, every subset and structure), and data
            that changes between passes (default ``True``).

    Attributes:
        params: the parameters of the posterior; mean: :math:`\theta_*` (flat);
        groups: the prior groups' names; num_data, num_outputs: ``N`` and ``C``;
        loss: the summed loss at :math:`\theta_*` (cross-entropy, or half the squared error).

    Raises:
        ValueError: an unsupported loss, structure, curvature, fisher or subset, a
            non-positive prior precision, temperature or noise, a KFAC structure with the
            Hessian or with a hand-picked parameter subset, regression targets of another
            shape than the outputs, every target ignored.
        NonFiniteError: a non-finite output of the model on the data.

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
        subset: str | Sequence[Tensor] = "last_layer",
        structure: str = "full",
        curvature: str = "ggn",
        fisher: str = "type2",
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        sigma_noise: float = 1.0,
        rank: int = 20,
        mc_samples: int = 1,
        link: str = "probit_centered",
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
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        self.link = link
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
        params: list[Tensor]
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
        owner: dict[int, str] = {}
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

    prior_precision = _Checked(
        _check_prior_precision,
        r""":math:`\delta`: a scalar tensor or one value per group (float64).""",
    )
    prior_mean = _Checked(_check_prior_mean, r""":math:`\mu_0` (a scalar or a flat tensor).""")

    # -- fitting -----------------------------------------------------------------------------
    def _forward_pass(self, data) -> list:
        """One streaming pass: the loss at the mode, N, C, and the last layer's features."""
        device = self.params[0].device
        features: list = []
        loss, n, C, batches = 0.0, 0, 0, 0
        self._reshape_targets = False
        hook = None
        if self.check_deterministic:
            refuse_stochastic(self.model, "the posterior would be fitted to random features")
        if self._last is not None:
            captured: list[tuple[Tensor, Tensor]] = []
            hook = self._last.register_forward_hook(
                lambda m, i, o: captured.append((i[0].detach(), o.detach()))
            )
        try:
            with torch.no_grad():
                for batch in iterate_batches(data, self.task, device):
                    f = self.task.output(self.model, batch)
                    y = self.task.targets(batch)
                    if f.dim() != 2:
                        raise ValueError(
                            f"the model must give outputs [n, C], got shape {tuple(f.shape)}"
                        )
                    if not bool(torch.isfinite(f).all()):
                        raise NonFiniteError(
                            f"the model's output on batch {batches} is not finite (NaN/Inf in "
                            "the inputs or the parameters)"
                        )
                    y = self._likelihood_targets(f, y)
                    loss += float(self._summed_loss(f, y))
                    n += self._counted(y)
                    C = f.shape[1]
                    batches += 1
                    if hook is not None:
                        phi, out = captured.pop()
                        _check_last_output(cast(nn.Module, self._last), out, f)
                        features.append((phi, y))
                        captured.clear()
        finally:
            if hook is not None:
                hook.remove()
        if batches == 0:
            raise ValueError("the data is empty")
        if n == 0:
            raise ValueError(f"every target is ignored (ignore_index={self._ignore_index})")
        self.loss, self.num_data, self.num_outputs = loss, n, int(C)
        return features

    @property
    def _ignore_index(self) -> int:
        return int(getattr(self.loss_fn, "ignore_index", -100))

    def _likelihood_targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Regression targets in the outputs' shape (``[n]`` for outputs ``[n, 1]``)."""
        if self.likelihood == "classification" or y.shape == f.shape:
            return y
        if y.shape != (f.shape[0],) or f.shape[1] != 1:
            raise ValueError(
                f"regression targets must be shaped like the outputs {tuple(f.shape)} (or "
                f"[n] for one output), got {tuple(y.shape)}"
            )
        self._reshape_targets = True
        return y.reshape(f.shape)

    def _counted(self, y: Tensor) -> int:
        """The examples whose targets count (classification: not ``ignore_index``)."""
        if self.likelihood == "classification":
            return int((y != self._ignore_index).sum())
        return int(y.shape[0])

    def _summed_loss(self, f: Tensor, y: Tensor) -> Tensor:
        if self.likelihood == "classification":
            return nn.functional.cross_entropy(
                f, y, reduction="sum", ignore_index=self._ignore_index
            )
        return 0.5 * ((f - y.reshape(f.shape)) ** 2).sum()

    def _sum_loss_fn(self) -> nn.Module:
        if self.likelihood == "classification":
            return nn.CrossEntropyLoss(reduction="sum", ignore_index=self._ignore_index)
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
            if self._reshape_targets:
                self._fit_task.__class__ = _column_targets(cast(type, type(self.task)))
            self._fit_task.loss_fn = self._sum_loss_fn()
            module, fdata = self.model, data
        params = self.params
        s = self._curvature_scale
        gi = self._group_index
        name = self.structure_name
        if name == "full":
            H = self._last_layer_ggn(*fdata) if self._last is not None else None
            if H is None:
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

    def _last_layer_ggn(self, phi: Tensor, y: Tensor, chunk: int = 4096) -> Tensor | None:
        r"""The last ``nn.Linear``'s GGN in closed form, or ``None`` where it does not apply.

        With features :math:`\tilde\phi_i = (\phi_i, 1)` and the loss's output Hessian
        :math:`\Lambda_i` (:math:`\mathrm{diag}(p_i) - p_i p_i^\top` for the summed
        cross-entropy, :math:`2I` for the summed squared error), the block of output rows
        :math:`(c, c')` of :math:`\sum_i \Lambda_i \otimes \tilde\phi_i\tilde\phi_i^\top`
        is :math:`\sum_i \Lambda_{i,cc'} \tilde\phi_i \tilde\phi_i^\top`: ``C`` matrix
        products instead of ``P`` curvature products.
        """
        ggn = self.curvature == "ggn" or (self.curvature == "fisher" and self.fisher == "type2")
        last = self._last
        if not ggn or phi.dim() != 2 or not isinstance(last, nn.Linear):
            return None
        N, d = phi.shape
        C = last.out_features
        H = phi.new_zeros(C * (d + 1), C * (d + 1))
        with torch.no_grad():
            for s in range(0, N, chunk):
                x = phi[s : s + chunk]
                f = last(x)
                if self.likelihood == "classification":
                    p = torch.softmax(f, -1)
                    Lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
                    kept = (y[s : s + chunk] != self._ignore_index).to(Lam.dtype)
                    Lam = Lam * kept[:, None, None]  # an ignored target is no datum
                else:
                    Lam = 2.0 * torch.eye(C, dtype=f.dtype, device=f.device).expand(len(x), C, C)
                X1 = torch.cat([x, x.new_ones(len(x), 1)], dim=1)  # [m, d + 1]
                for c in range(C):
                    T = (Lam[:, c, :, None] * X1[:, None, :]).reshape(len(x), -1)
                    H[c * (d + 1) : (c + 1) * (d + 1)] += X1.T @ T
        # rows (c, a) with the bias as a = d, to the parameters' order: weight, then bias
        grid = torch.arange(C * (d + 1), device=H.device).reshape(C, d + 1)
        parts = {id(last.weight): grid[:, :d].reshape(-1)}
        if last.bias is not None:
            parts[id(last.bias)] = grid[:, d]
        order = torch.cat([parts[id(p)] for p in self.params])
        return H[order][:, order]

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
            task=self._fit_task,
            check_deterministic=self.check_deterministic,
        )
        if [id(p) for p in op.params] != [id(p) for p in self.params]:
            raise ValueError("the KFAC operator's parameters differ from the subset's")
        blocks = [b.with_eigenvalues(scale * b.eigenvalues) for b in op.eigen()]
        diagonals = [type(d)(scale * d.diagonal) for d in op.diagonals]
        return self._kron_structure(blocks, diagonals, op.layout)

    def _kron_structure(self, blocks, diagonals, layout) -> KronStructure:
        """The blocks with their prior groups (a layer's weight and bias share one)."""
        gp = self._group_of_param
        for iw, ib in layout.layer_index:
            if ib is not None and gp[ib] != gp[iw]:  # pragma: no cover - one owner per layer
                raise ValueError("a layer's weight and bias are in different prior groups")
        block_groups = [gp[iw] for iw, _ in layout.layer_index]
        diag_groups = [gp[i] for i in layout.fallback_index]
        return KronStructure(
            blocks, diagonals, layout, self._group_index, block_groups, diag_groups
        )

    def _fitted(self):
        if self._structure is None:
            raise RuntimeError("the Laplace approximation is not fitted: call fit(data) first")
        return self._structure
