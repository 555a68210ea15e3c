"""second.data.task: Task reads batches of every layout, and the operators read them alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import PRODUCT_TOL
from dense_reference import assert_close, make_data, make_model
from second import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    JacobianOperator,
    NonDeterministicDataError,
)
from second.data.batches import iterate_batches
from second.data.task import Task, as_task, map_batch

TOL = PRODUCT_TOL[torch.float64]
OPERATORS = {
    "hessian": (HessianOperator, {}),
    "ggn": (GGNOperator, {}),
    "empirical": (FisherOperator, {}),
    "mc": (FisherOperator, {"fisher": "mc", "mc_samples": 3}),
}


class DictModel(nn.Module):
    """A model called HuggingFace style: ``model(inputs=..., mask=...)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, inputs, mask):
        return self.inner(inputs * mask)


def _problem():
    torch.manual_seed(0)
    model = make_model("mlp_tanh")
    X, y = make_data("mlp_tanh", "ce", n=8)
    return model, nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("name", list(OPERATORS))
def test_dict_batches_give_the_products_of_the_pairs(name):
    cls, kw = OPERATORS[name]
    model, loss_fn, X, y = _problem()
    pairs = [(X[:5], y[:5]), (X[5:], y[5:])]
    dicts = [{"inputs": Xb, "mask": torch.ones_like(Xb), "labels": yb} for Xb, yb in pairs]
    expected = cls(model, loss_fn, pairs, **kw).to_dense()
    got = cls(DictModel(model), loss_fn, dicts, **kw).to_dense()
    assert_close(got, expected, TOL)
    one = cls(DictModel(model), loss_fn, dicts[0], **kw)
    assert one.single_batch
    assert_close(one.to_dense(), cls(model, loss_fn, pairs[0], **kw).to_dense(), TOL)


@pytest.mark.parametrize("name", list(OPERATORS))
def test_a_map_style_dataset_gives_the_products_of_the_pairs(name):
    cls, kw = OPERATORS[name]
    model, loss_fn, X, y = _problem()
    expected = cls(model, loss_fn, (X, y), **kw).to_dense()
    got = cls(model, loss_fn, TensorDataset(X, y), **kw)
    assert_close(got.to_dense(), expected, TOL)
    assert got.num_data == 8


def test_a_task_for_any_batch_layout():
    model, loss_fn, X, y = _problem()

    class Record:  # an object, not a tuple or a dict
        def __init__(self, x, t):
            self.x, self.t = x, t

    class RecordTask(Task):
        def is_batch(self, data):
            return isinstance(data, Record)

        def check(self, batch):
            if not isinstance(batch, Record):
                raise TypeError("not a Record")

        def output(self, model, batch):
            return model(batch.x)

        def targets(self, batch):
            return batch.t

        def batch_size(self, batch):
            return batch.x.shape[0]

        def to(self, batch, device):
            return batch

    records = [Record(X[:3], y[:3]), Record(X[3:], y[3:])]
    G = GGNOperator(model, loss_fn, records, task=RecordTask())
    assert_close(G.to_dense(), GGNOperator(model, loss_fn, (X, y)).to_dense(), TOL)
    J = JacobianOperator(model, records, task=RecordTask())
    assert_close(J.to_dense(), JacobianOperator(model, X).to_dense(), TOL)
    # restrict keeps the task
    assert_close(
        G.restrict(records[0]).to_dense(),
        GGNOperator(model, loss_fn, (X[:3], y[:3])).to_dense(),
        TOL,
    )


def test_task_loss_samples_targets_for_the_mc_fisher():
    model, loss_fn, X, y = _problem()
    task = Task(loss_fn)
    out = task.output(model, (X, y))
    observed = task.loss(out, (X, y))
    torch.testing.assert_close(observed, loss_fn(out, y))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = task.loss(out, (X, y), sample=True, generator=g1)
    s2 = task.loss(out, (X, y), sample=True, generator=g2)
    assert float(s1.detach()) == float(s2.detach()) != float(observed.detach())
    with pytest.raises(ValueError, match="no loss_fn"):
        Task().loss(out, (X, y))


def test_as_task_fills_in_the_loss_without_changing_the_users_task():
    task = Task(target_key="y")
    bound = as_task(task, nn.MSELoss())
    assert task.loss_fn is None and isinstance(bound.loss_fn, nn.MSELoss)
    assert bound.target_key == "y"
    with pytest.raises(TypeError, match="second.Task"):
        as_task(object(), None)


def test_a_shuffled_dict_loader_is_refused():
    model, loss_fn, X, y = _problem()
    data = [
        {"inputs": X[i : i + 1], "mask": torch.ones(1, 4), "labels": y[i : i + 1]} for i in range(8)
    ]
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=_collate)
    op = GGNOperator(DictModel(model), loss_fn, loader)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    with pytest.raises(NonDeterministicDataError):
        for _ in range(5):  # one of the reshuffles differs
            op @ v


def _collate(items):
    return {k: torch.cat([it[k] for it in items]) for k in items[0]}


def test_map_batch_keeps_the_layout():
    out = map_batch([(torch.ones(1),), {"a": torch.zeros(1)}, "text"], lambda t: t + 1)
    assert isinstance(out, list) and isinstance(out[0], tuple) and out[2] == "text"
    torch.testing.assert_close(out[1]["a"], torch.ones(1))


def test_layout_messages_name_the_problem():
    """Regression: misleading or missing messages of Task.check for common layouts."""
    from torch.utils.data import IterableDataset

    X, y = torch.randn(5, 3), torch.randn(5)

    class Examples(IterableDataset):  # single examples, not batches
        def __iter__(self):
            return iter(zip(X, y))

    with pytest.raises(ValueError, match="wrap it in torch.utils.data.DataLoader"):
        list(iterate_batches(Examples()))
    batch = {"input": X, "labels": y, "id": [f"ex{i}" for i in range(5)]}
    with pytest.raises(TypeError, match="entry 'id' is a list, not a tensor"):
        list(iterate_batches([batch]))
    with pytest.raises(ValueError, match="batch input 1 have 4 examples but targets have 5"):
        list(iterate_batches(((X, X[:4]), y)))
    assert len(list(iterate_batches(((X, X), y)))) == 1
