"""second.data: Task, batches of every layout, data passes; the operators read them alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from conftest import PRODUCT_TOL
from dense_reference import assert_close, make_data, make_model
from second import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    JacobianOperator,
    NonDeterministicDataError,
    Task,
)
from second.data import SamePassCheck, as_task, batch_fingerprint, iterate_batches, map_batch

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
    assert float(s1) == float(s2) and float(s1) != float(observed)
    with pytest.raises(ValueError, match="no loss_fn"):
        Task().loss(out, (X, y))


def test_as_task_fills_in_the_loss_without_changing_the_users_task():
    task = Task(target_key="y")
    bound = as_task(task, nn.MSELoss())
    assert task.loss_fn is None and isinstance(bound.loss_fn, nn.MSELoss)
    assert bound.target_key == "y"
    with pytest.raises(TypeError, match="second.Task"):
        as_task(object(), None)


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


def test_fingerprints_and_the_same_pass_check_cover_dict_batches():
    X = torch.randn(4, 2)
    a = {"x": X, "labels": torch.arange(4)}
    b = {"x": X.flip(0), "labels": torch.arange(4).flip(0)}
    assert batch_fingerprint(a) == batch_fingerprint(b)
    assert batch_fingerprint(a, ordered=True) != batch_fingerprint(b, ordered=True)
    check = SamePassCheck(ordered=True)
    list(check(iter([a])))
    with pytest.raises(NonDeterministicDataError, match="batch 0"):
        list(check(iter([b])))


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


class _FlipEveryOther(Dataset):
    """A random-horizontal-flip augmentation: every example keeps its shape, sum and norm."""

    def __init__(self, X, y):
        self.X, self.y, self.calls = X, y, 0

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        self.calls += 1
        x = self.X[i]
        return (x.flip(-1) if self.calls % 3 == 0 else x), self.y[i]


def test_a_flip_augmentation_is_refused():
    """Regression: a flip within an example kept the old (sum, sum of squares) fingerprint."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    op = GGNOperator(model, nn.CrossEntropyLoss(), DataLoader(_FlipEveryOther(X, y), batch_size=8))
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    with pytest.raises(NonDeterministicDataError, match="batch 0"):
        op @ v


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_a_shuffled_loader_is_refused_at_every_data_scale(scale):
    """Regression: data below 5e-7 rounded to the same fingerprint (absolute rounding)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 3, generator=g, dtype=torch.float64) * scale
    y = torch.zeros(32, 1, dtype=torch.float64)
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True, drop_last=True)
    op = HessianOperator(nn.Linear(3, 1).double(), nn.MSELoss(), loader)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    with pytest.raises(NonDeterministicDataError):
        op @ v


def test_data_holding_nan_is_the_same_on_every_pass():
    """Regression: NaN in the fingerprint compared unequal to itself (a false alarm)."""
    g = torch.Generator().manual_seed(0)
    X, y = (
        torch.randn(16, 3, generator=g, dtype=torch.float64),
        torch.randn(16, 2, generator=g, dtype=torch.float64),
    )
    y[3, 1] = float("nan")  # a missing target, ignored by the masked loss

    def masked_mse(out, t):
        m = ~torch.isnan(t)
        return ((out - torch.nan_to_num(t)) ** 2 * m).sum() / m.sum()

    masked_mse.reduction = "mean"  # type: ignore[attr-defined]
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    op = GGNOperator(nn.Linear(3, 2).double(), masked_mse, loader)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, op @ v, rtol=0.0, atol=0.0)  # the same arithmetic


def test_the_fingerprint_sees_every_element_and_the_pairing_of_examples():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 3, 4, generator=g), torch.arange(8)
    fp = batch_fingerprint((X, y))
    # within an example: a flip, a transposition, a tiny change
    assert batch_fingerprint((X.flip(-1), y)) != fp
    assert batch_fingerprint((X.transpose(1, 2).reshape(8, 3, 4), y)) != fp
    assert batch_fingerprint((X * 1e-9, y)) != batch_fingerprint((X * 1.000001e-9, y))
    # the examples paired with other targets
    assert batch_fingerprint((X, y.flip(0))) != fp
    # the examples permuted as a whole: the same curvature, the same unordered fingerprint
    perm = torch.randperm(8, generator=g)
    assert batch_fingerprint((X[perm], y[perm])) == fp
    assert batch_fingerprint((X[perm], y[perm]), ordered=True) != batch_fingerprint(
        (X, y), ordered=True
    )
    nan = torch.tensor([[float("nan"), 1.0]])
    assert batch_fingerprint((nan, nan)) == batch_fingerprint((nan.clone(), nan.clone()))


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
