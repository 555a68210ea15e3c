"""What an Influence's results depend on: a custom Task's code, the training tensors, the
parameters (influence/_state.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from influence_cases import REG, SCORE_RTOL, data, mlp, reference_scores, rel
from second import Influence, Task

# Tolerance: relative error against a fresh Influence on the same inputs (same arithmetic).
FRESH_RTOL = 1e-12
DAMPING = 0.5


def _first(self, model, batch):
    return model(batch[0])[:, 0].sum()


def _third(self, model, batch):
    return model(batch[0])[:, 2].sum()


# two versions of one Task class (the same module and name): only their code differs
PickV1 = type("Pick", (Task,), {"measurement": _first})
PickV2 = type("Pick", (Task,), {"measurement": _third})


@pytest.mark.parametrize("curvature", ["ggn", "kfac"])
def test_the_cache_key_sees_a_tasks_code(curvature, tmp_path):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(15), data(2, seed=2)
    kw = dict(curvature=curvature, damping=DAMPING, progressbar=False)
    old = Influence(model, loss_fn, train, task=PickV1(), cache_dir=tmp_path, **kw).scores(test)
    cached = Influence(model, loss_fn, train, task=PickV2(), cache_dir=tmp_path, **kw).scores(test)
    fresh = Influence(model, loss_fn, train, task=PickV2(), **kw).scores(test)
    assert not torch.equal(cached, old)
    assert rel(cached, fresh) < FRESH_RTOL
    # the same code again is a cache hit: the same numbers, bit for bit
    again = Influence(model, loss_fn, train, task=PickV2(), cache_dir=tmp_path, **kw).scores(test)
    assert torch.equal(again, cached)


def test_a_changed_task_method_refreshes_an_influence():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(15), data(2, seed=2)
    Local = type("Local", (Task,), {"measurement": _first})
    inf = Influence(model, loss_fn, train, task=Local(), curvature="ggn", damping=DAMPING)
    inf.scores(test)
    Local.measurement = _third  # the class patched after the scores
    fresh = Influence(model, loss_fn, train, task=Local(), curvature="ggn", damping=DAMPING)
    assert rel(inf.scores(test), fresh.scores(test)) < FRESH_RTOL


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "kfac", "ekfac"])
def test_a_training_batch_changed_in_place_is_read_again(curvature):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(15)
    test = data(2, seed=2)
    kw = dict(curvature=curvature, damping=DAMPING, progressbar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an indefinite Hessian is warned about
        inf = Influence(model, loss_fn, (X, y), **kw)
        inf.scores(test)
        inf.self_influence()
        X.sub_(X.mean(0)).div_(X.std(0))  # standardized in place
        fresh = Influence(model, loss_fn, (X, y), **kw)
        assert rel(inf.scores(test), fresh.scores(test)) < FRESH_RTOL
        assert rel(inf.self_influence(), fresh.self_influence()) < FRESH_RTOL


def test_targets_changed_in_place_change_the_weights():
    model = mlp()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64))
    X, y = data(15)
    test = data(2, seed=2)
    inf = Influence(model, loss_fn, (X, y), curvature="ggn", damping=DAMPING)
    inf.scores(test)
    y[:5] = 1
    fresh = Influence(model, loss_fn, (X, y), curvature="ggn", damping=DAMPING)
    assert rel(inf.scores(test), fresh.scores(test)) < FRESH_RTOL
    assert torch.equal(inf.weights, fresh.weights)


def test_a_write_through_data_needs_refresh():
    """``.data`` writes do not bump the version counter: refresh() reads the batch again."""
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(15)
    test = data(2, seed=2)
    inf = Influence(model, loss_fn, (X, y), curvature="ggn", damping=DAMPING)
    inf.scores(test)
    X.data.mul_(2.0)
    inf.refresh()
    fresh = Influence(model, loss_fn, (X, y), curvature="ggn", damping=DAMPING)
    assert rel(inf.scores(test), fresh.scores(test)) < FRESH_RTOL


def test_changed_parameters_invalidate_cached_vectors():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(10), data(2, seed=2)
    inf = Influence(model, loss_fn, train, curvature="ggn", damping=REG, progressbar=False)
    before = inf.scores(test)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    after = inf.scores(test)
    ref, *_ = reference_scores(model, loss_fn, train, test, "ggn", REG)
    assert rel(after, ref) < SCORE_RTOL["dense"]
    assert rel(after, before) > 1e-3


def test_the_cache_key_separates_settings_whose_reprs_concatenate_alike(tmp_path):
    """Regression: (damping 0.1, rank 25) and (0.12, 5) shared a key and a cache."""
    X, y = data(40)
    test = (X[:3], y[:3])

    def run(damping, rank, cache):
        inf = Influence(
            mlp(), nn.CrossEntropyLoss(), (X, y), curvature="ggn", method="lowrank",
            damping=damping, rank=rank, cache_dir=cache, progressbar=False,
        )  # fmt: skip
        return inf.key, inf.scores(test)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k1, _ = run(0.1, 25, tmp_path)
        k2, cached = run(0.12, 5, tmp_path)
        _, fresh = run(0.12, 5, None)
    assert k1 != k2
    assert rel(cached, fresh) <= FRESH_RTOL


@pytest.mark.parametrize(
    "a, b",
    [
        ((0.01, 52), (0.015, 2)),
        (([1, 23],), ([12, 3],)),
        (("ab", "c"), ("a", "bc")),
        (({"a": 1, "b": 23},), ({"a": 12, "b": 3},)),
        ((1,), (1.0,)),
        ((1,), ("1",)),
        (([1, 2],), ((1, 2),)),
        (([[1], 2],), ([1, [2]],)),
        ((torch.zeros(2), torch.zeros(1)), (torch.zeros(1), torch.zeros(2))),
    ],
)
def test_fingerprint_tags_every_item_with_its_type_and_length(a, b):
    from second.influence._cache import fingerprint

    assert fingerprint(*a) != fingerprint(*b)
    assert fingerprint(*a) == fingerprint(*a)
