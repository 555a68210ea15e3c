"""second.data.batches: data passes over batches, datasets and iterables, checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from conftest import PRODUCT_TOL
from dense_reference import assert_close
from second import FisherOperator, GGNOperator, HessianOperator, JacobianOperator
from second.data.batches import iterate_batches
from second.data.task import Task


def test_iterate_batches_checks_and_skips_empty_batches():
    X, y = torch.randn(5, 2), torch.randn(5)
    out = list(iterate_batches([(X[:0], y[:0]), (X, y)]))
    assert len(out) == 1
    with pytest.raises(ValueError, match="empty"):
        list(iterate_batches([(X[:0], y[:0])]))
    with pytest.raises(ValueError, match="5 examples but targets have 4"):
        list(iterate_batches((X, y[:4])))
    with pytest.raises(TypeError, match="'labels' entry"):
        list(iterate_batches([{"x": X}]))
    with pytest.raises(TypeError, match="data must be"):
        list(iterate_batches(3))


def test_a_dataset_is_read_in_order_in_batches_of_the_tasks_size():
    X, y = torch.arange(10.0).reshape(5, 2), torch.arange(5.0)

    class Small(Task):
        dataset_batch_size = 2

    sizes = [b[0].shape[0] for b in iterate_batches(TensorDataset(X, y), Small())]
    assert sizes == [2, 2, 1]
    firsts = torch.cat([b[1] for b in iterate_batches(TensorDataset(X, y), Small())])
    torch.testing.assert_close(firsts, y)

    class Squares(Dataset):  # any map-style Dataset of dicts
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"x": torch.tensor([float(i)]), "labels": torch.tensor(float(i * i))}

    (batch,) = iterate_batches(Squares())
    torch.testing.assert_close(batch["labels"], torch.tensor([0.0, 1.0, 4.0]))


@pytest.mark.parametrize("kind", ["generator", "zip", "iter(loader)"])
def test_one_shot_iterators_are_refused_at_construction(kind):
    """Regression: a generator worked for one product; the second said "the data is empty"."""
    X, y = torch.randn(12, 2), torch.randn(12, 1)
    model = nn.Linear(2, 1)
    make = {
        "generator": lambda: ((X[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)),
        "zip": lambda: zip(X.split(4), y.split(4)),
        "iter(loader)": lambda: iter(DataLoader(TensorDataset(X, y), batch_size=4)),
    }[kind]
    for cls in (HessianOperator, GGNOperator, FisherOperator):
        with pytest.raises(TypeError, match="one-shot iterator"):
            cls(model, nn.MSELoss(), make())
    with pytest.raises(TypeError, match="one-shot iterator"):
        JacobianOperator(model, make())
    # what can be read again keeps working
    reread = [
        list(zip(X.split(4), y.split(4))),
        tuple(zip(X.split(4), y.split(4))),
        DataLoader(TensorDataset(X, y), batch_size=4),
        TensorDataset(X, y),
        (X, y),
    ]
    ref = HessianOperator(model, nn.MSELoss(), (X, y)).to_dense()
    for data in reread:
        assert_close(
            HessianOperator(model, nn.MSELoss(), data).to_dense(), ref, PRODUCT_TOL[torch.float32]
        )


@pytest.mark.parametrize("cls", [HessianOperator, JacobianOperator])
def test_the_progress_total_counts_batches_of_a_dataset(cls, monkeypatch):
    """Regression: a map-style Dataset's bar counted examples (1/1000) but read 4 batches."""
    import second._progress as progress_module

    totals = []

    def fake(it, total=None, **kw):
        totals.append(total)
        return it

    monkeypatch.setattr(progress_module, "progress", fake)
    X, y = torch.randn(1000, 2), torch.randn(1000, 1)
    model = nn.Linear(2, 1)
    args = (model, nn.MSELoss()) if cls is HessianOperator else (model,)
    op = cls(*args, TensorDataset(X, y), progressbar=True)
    op @ torch.ones(op.shape[1])
    assert totals and set(totals) == {4}
    totals.clear()
    cls(*args, [(X[:10], y[:10])] * 3, progressbar=True) @ torch.ones(op.shape[1])
    assert set(totals) == {3}
