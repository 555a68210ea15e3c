"""second.data.determinism: fingerprints and the same-pass check refuse changing data."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from second import GGNOperator, HessianOperator, NonDeterministicDataError
from second.data.determinism import SamePassCheck, batch_fingerprint


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
