"""second.func.per_example_jacobians against a dense jacrev of the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dense_reference import GRUNet, ref_output_jacobians
from second.func import per_example_jacobians

EXACT = 1e-12  # float64, the same derivatives taken two ways


@pytest.mark.parametrize("batch_size", [None, 3])
def test_matches_theref_output_jacobians(batch_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(7, 4, dtype=torch.float64)
    params = [model[2].weight, model[0].bias]  # a subset, out of order
    J = per_example_jacobians(model, params, X, batch_size=batch_size)
    ref = ref_output_jacobians(model, params, X)
    assert J.shape == (7, 3, 5 * 3 + 5)
    assert torch.allclose(J, ref, rtol=0, atol=EXACT)
    assert not J.requires_grad


def test_refuses_foreign_parameters_and_bad_outputs():
    model = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="parameters of the module"):
        per_example_jacobians(model, [nn.Parameter(torch.zeros(2))], torch.zeros(3, 2))
    flat = nn.Sequential(nn.Linear(2, 2), nn.Flatten(0)).double()
    with pytest.raises(ValueError, match=r"outputs \[n, C\]"):
        per_example_jacobians(flat, [flat[0].weight], torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="no examples"):
        per_example_jacobians(model, [model.weight], torch.zeros(0, 2, dtype=torch.float64))


def test_a_model_that_vmap_cannot_batch_falls_back_to_a_loop_with_a_warning():
    torch.manual_seed(0)
    model = GRUNet(classes=2).double()
    X = torch.randn(5, 6, 3, dtype=torch.float64)
    params = list(model.parameters())
    with pytest.warns(UserWarning, match="falling back to a loop over examples"):
        J = per_example_jacobians(model, params, X)
    torch.testing.assert_close(J, ref_output_jacobians(model, params, X), rtol=0, atol=EXACT)


def test_map_examples_stacks_pytrees_and_lets_the_models_own_errors_through():
    from second.func import map_examples

    out = map_examples(lambda d: {"s": d["a"].sum(), "t": d["a"] * 2}, {"a": torch.ones(3, 2)})
    assert out["s"].tolist() == [2.0, 2.0, 2.0] and out["t"].shape == (3, 2)

    def broken(x):
        raise RuntimeError("the model's own bug")

    with pytest.warns(UserWarning, match="vmap over examples failed"):
        with pytest.raises(RuntimeError, match="own bug"):
            map_examples(broken, torch.ones(2, 1))
