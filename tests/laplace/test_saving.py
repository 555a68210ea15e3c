"""Laplace.state_dict and load_state_dict (laplace/_saving.py): a round trip in every structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laplace_cases import _cls_data, _mlp
from second.laplace import Laplace


def test_state_dict_round_trip(tmp_path):
    model = _mlp()
    X, y = _cls_data()
    for structure in ("full", "diag", "lowrank", "kfac", "ekfac"):
        la = Laplace(
            model, nn.CrossEntropyLoss(), (X, y), structure=structure, rank=4, subset="all"
        )
        la.optimize_prior_precision(per_group=True)
        path = tmp_path / f"{structure}.pt"
        torch.save(la.state_dict(), path)
        new = Laplace(model, nn.CrossEntropyLoss(), structure=structure, subset="all")
        new.load_state_dict(torch.load(path))
        assert torch.equal(new.prior_precision, la.prior_precision)
        assert torch.allclose(new.log_marginal_likelihood(), la.log_marginal_likelihood())
        Xt = X[:4]
        assert torch.allclose(new.predict(Xt), la.predict(Xt))
    with pytest.raises(ValueError, match="structure"):
        Laplace(model, nn.CrossEntropyLoss(), structure="diag", subset="all").load_state_dict(
            la.state_dict()
        )
