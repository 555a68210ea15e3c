"""What Laplace refuses and how it reads its arguments (laplace/_checks.py): options, losses
that are not a likelihood, a last layer that is not the output, regression targets ``[n]``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from laplace_cases import EXACT, ITERATIVE, _cls_data, _dense_lml, _mlp
from second.laplace import Laplace


def test_invalid_arguments_are_refused():
    model = _mlp()
    X, y = _cls_data()
    data = (X, y)
    with pytest.raises(ValueError, match="CrossEntropyLoss"):
        Laplace(model, nn.L1Loss(), data, subset="all")
    with pytest.raises(ValueError, match="structure"):
        Laplace(model, nn.CrossEntropyLoss(), data, structure="kron", subset="all")
    with pytest.raises(ValueError, match="Hessian"):
        Laplace(
            model, nn.CrossEntropyLoss(), data, structure="kfac", curvature="hessian", subset="all"
        )
    with pytest.raises(ValueError, match="prior_precision"):
        Laplace(model, nn.CrossEntropyLoss(), data, prior_precision=0.0, subset="all")
    with pytest.raises(ValueError, match="groups"):
        Laplace(model, nn.CrossEntropyLoss(), data, prior_precision=torch.ones(3), subset="all")
    with pytest.raises(ValueError, match="sigma_noise"):
        Laplace(model, nn.CrossEntropyLoss(), data, sigma_noise=2.0, subset="all")
    with pytest.raises(ValueError, match="hand-picked"):
        Laplace(model, nn.CrossEntropyLoss(), data, subset=[model[0].weight], structure="kfac")
    with pytest.raises(RuntimeError, match="not fitted"):
        Laplace(model, nn.CrossEntropyLoss(), subset="all").log_marginal_likelihood()
    la = Laplace(model, nn.CrossEntropyLoss(), data, curvature="hessian", subset="all")
    with pytest.raises(ValueError, match="not positive definite"):
        la.log_marginal_likelihood(1e-8)
    with pytest.raises(ValueError, match="pred"):
        la.predict(X, pred="laplace")


def test_last_layer_refuses_a_model_whose_output_is_not_the_last_linears():
    """A tied output embedding: the last nn.Linear is a hidden layer; a silent last-layer
    Laplace would use its 8 outputs as the model's 10 (classes)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.h = nn.Embedding(10, 8), nn.Linear(8, 8)

        def forward(self, x):
            return nn.functional.linear(torch.tanh(self.h(self.e(x).mean(1))), self.e.weight)

    torch.manual_seed(0)
    model = Tied().double()
    X, y = torch.randint(0, 10, (12, 5)), torch.randint(0, 10, (12,))
    with pytest.raises(ValueError, match="not the output of its last nn.Linear"):
        Laplace(model, nn.CrossEntropyLoss(), (X, y))
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), subset="all", structure="kfac")
    assert la.predict(X[:3]).shape == (3, 10)


STRUCTURES_ON_DATA = ["full", "diag", "lowrank", "kfac"]


@pytest.mark.parametrize("structure", STRUCTURES_ON_DATA)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_one_output_regression_takes_targets_n_as_n_by_1(subset, structure):
    # targets [n] of outputs [n, 1] (1-D regression as usually written) are the outputs' targets
    # in every structure, as for [n, 1] targets; the curvature operators once broadcast them
    # to [n, n] (a curvature n times too large). Exact: a linear model against the closed form.
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(20, 2, dtype=torch.float64, generator=g), torch.randn(20, generator=g)
    Xa = torch.cat([X, torch.ones(20, 1, dtype=torch.float64)], 1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    H = Xa.T @ Xa
    loglik = -0.5 * float(((Xa @ theta - y) ** 2).sum()) - 20 * math.log(math.sqrt(2 * math.pi))
    la = Laplace(model, nn.MSELoss(), (X, y), subset=subset, structure=structure, rank=3)
    column = Laplace(model, nn.MSELoss(), (X, y[:, None]), subset=subset, structure=structure)
    assert torch.allclose(
        la.log_marginal_likelihood(), column.log_marginal_likelihood(), rtol=EXACT
    )
    if structure in ("full", "lowrank", "kfac"):  # exact for one linear layer
        ref = _dense_lml(H, theta, torch.ones(3, dtype=torch.float64), loglik)
        assert torch.allclose(la.log_marginal_likelihood(), ref, rtol=ITERATIVE)
    with pytest.raises(ValueError, match="shaped like the outputs"):
        Laplace(nn.Linear(2, 2).double(), nn.MSELoss(), (X, y), subset=subset)


def test_losses_that_are_not_a_likelihood_and_models_in_training_mode_are_refused():
    from second import NonDeterministicDataError, NonFiniteError

    X, y = _cls_data()
    model = _mlp()
    for loss_fn in (
        nn.CrossEntropyLoss(weight=torch.ones(3)),
        nn.CrossEntropyLoss(label_smoothing=0.1),
    ):
        with pytest.raises(ValueError, match="categorical"):
            Laplace(model, loss_fn, (X, y))
    for layer in (nn.Dropout(0.2), nn.BatchNorm1d(4)):
        noisy = nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 3)).double()
        for subset in ("last_layer", "all"):
            for structure in ("full", "diag"):
                with pytest.raises(NonDeterministicDataError, match="eval"):
                    Laplace(
                        noisy, nn.CrossEntropyLoss(), (X, y), subset=subset, structure=structure
                    )
        noisy.eval()
        Laplace(noisy, nn.CrossEntropyLoss(), (X, y))  # fine in eval mode
    X[3, 1] = float("nan")  # not "tied embeddings", not a NaN marginal likelihood
    for subset in ("last_layer", "all"):
        for structure in ("full", "diag"):
            with pytest.raises(NonFiniteError, match="not finite"):
                Laplace(model, nn.CrossEntropyLoss(), (X, y), subset=subset, structure=structure)
