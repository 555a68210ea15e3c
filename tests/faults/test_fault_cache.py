"""Influence cache faults: crashes at every save point, damaged and forged files, stale
temporary files, and everything the cache key must cover (docs/reliability.md).

Every case ends in the documented outcome: the scores equal an uncached computation
(a damaged file is ignored with a warning and recomputed), never a silently wrong answer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from second import Influence
from second.influence import _cache

REG = 0.1
EXACT = dict(rtol=0, atol=0)  # a resumed or recomputed block is the same computation
KW = dict(curvature="ggn", damping=REG, batch_size=4, progressbar=False)


def mlp(act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 3)).double()


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


TRAIN, TEST = data(12), data(6, seed=2)


def fresh_scores(model, loss_fn=None, **kw):
    """The uncached answer."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    return Influence(model, loss_fn, TRAIN, **{**KW, **kw}).scores(TEST)


def cached(model, cache_dir, loss_fn=None, **kw):
    return Influence(
        model, loss_fn or nn.CrossEntropyLoss(), TRAIN, cache_dir=cache_dir, **{**KW, **kw}
    )


def blocks(root, prefix):
    return sorted(Path(root).glob(f"{prefix}-*.pt"))


# ---------------------------------------------------------------------------- crashes
def test_a_crash_at_every_save_point_resumes_to_the_same_scores(tmp_path, monkeypatch):
    model = mlp()
    expected = fresh_scores(model, method="dense")
    real_save = _cache.DiskCache.save
    n_saves = 1 + 2 + 3  # the dense curvature, 2 test chunks, 3 training chunks
    for k in range(n_saves):
        root = tmp_path / f"crash{k}"
        count = []

        def save(self, name, obj, k=k, count=count):
            if len(count) == k:
                raise KeyboardInterrupt(f"simulated crash at save point {k}")
            count.append(name)
            real_save(self, name, obj)

        monkeypatch.setattr(_cache.DiskCache, "save", save)
        with pytest.raises(KeyboardInterrupt):
            cached(model, root, method="dense").scores(TEST)
        monkeypatch.setattr(_cache.DiskCache, "save", real_save)
        assert len(list(root.glob("*.pt"))) == k  # the finished files, nothing half-written
        assert not list(root.glob("*.tmp"))
        torch.testing.assert_close(
            cached(model, root, method="dense").scores(TEST), expected, **EXACT
        )
        assert len(list(root.glob("*.pt"))) == n_saves


def test_a_crash_inside_the_write_leaves_no_file(tmp_path, monkeypatch):
    def partial_save(obj, f):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(_cache.torch, "save", partial_save)
    cache = _cache.DiskCache(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        cache.save_block("x", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


def test_stale_tmp_files_of_killed_writers_are_removed_young_ones_kept(tmp_path):
    S = cached(mlp(), tmp_path).scores(TEST)
    # what a SIGKILLed writer leaves: a partial temporary file next to the real ones
    stale, young = tmp_path / ".scores-x-0.abc123.tmp", tmp_path / ".scores-x-1.def456.tmp"
    for p in (stale, young):
        p.write_bytes(b"partial")
    old = time.time() - _cache.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    again = cached(mlp(), tmp_path)  # creating the cache cleans up
    assert not stale.exists() and young.exists()  # a live writer's file is not touched
    torch.testing.assert_close(again.scores(TEST), S, **EXACT)


# ---------------------------------------------------------------------------- damaged files
def _damage(paths, how):
    for p in paths:
        raw = p.read_bytes()
        if how == "garbage":
            p.write_bytes(b"not a tensor file")
        elif how == "truncated":
            p.write_bytes(raw[: len(raw) // 2])
        elif how == "empty":
            p.write_bytes(b"")


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
@pytest.mark.parametrize("prefix", ["ihvp", "scores", "curvature"])
def test_corrupt_or_truncated_files_are_ignored_and_recomputed(tmp_path, how, prefix):
    model = mlp()
    expected = fresh_scores(model, method="dense")
    cached(model, tmp_path, method="dense").scores(TEST)
    _damage(blocks(tmp_path, prefix), how)
    if prefix == "curvature":  # read only while some inverse-HVP is missing
        for p in blocks(tmp_path, "ihvp"):
            p.unlink()
    with pytest.warns(UserWarning, match="ignoring cache file"):
        got = cached(model, tmp_path, method="dense").scores(TEST)
    torch.testing.assert_close(got, expected, **EXACT)


def _forge(path, fn):
    obj = torch.load(path, weights_only=True)
    fn(obj)
    torch.save(obj, path)


def test_an_inverse_hvp_block_with_missing_rows_is_rejected(tmp_path):
    """The probe's case: 1 of 16 rows in the file gave 15 rows of zero scores."""
    model = mlp()
    test16 = data(16, seed=3)
    kw = dict(batch_size=16)
    expected = Influence(model, nn.CrossEntropyLoss(), TRAIN, **{**KW, **kw}).scores(test16)
    cached(model, tmp_path, **kw).inverse_hvps(test16)
    (path,) = blocks(tmp_path, "ihvp")

    def keep_one_row(obj):  # a consistent file: name and digest match its (wrong) content
        obj["tensor"] = obj["tensor"][:1].clone()
        obj["digest"] = _cache.fingerprint(obj["tensor"])

    _forge(path, keep_one_row)
    with pytest.warns(UserWarning, match=r"holds a \(1, 31\)"):
        got = cached(model, tmp_path, **kw).scores(test16)
    assert bool((got.abs().sum(1) > 0).all())
    torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize(
    ("forgery", "message"),
    [
        ("content", "does not match its digest"),  # bytes changed, digest kept
        ("renamed", "was written for"),  # a valid block copied under another name
        ("other-data", "other data"),  # a score block made for other training examples
        ("dtype", "float32"),  # right shape, wrong dtype
        ("plain-tensor", "not a block"),  # a bare tensor with the right name and shape
    ],
)
def test_forged_blocks_are_rejected(tmp_path, forgery, message):
    model = mlp()
    expected = fresh_scores(model)
    cached(model, tmp_path).scores(TEST)
    paths = blocks(tmp_path, "scores")
    target = paths[0]
    if forgery == "content":
        _forge(target, lambda o: o["tensor"].mul_(2.0))
    elif forgery == "renamed":
        target.write_bytes(paths[1].read_bytes())  # same shape: chunks of 4
    elif forgery == "other-data":
        _forge(target, lambda o: o["meta"].update(data="0" * 24))
    elif forgery == "dtype":

        def to32(o):
            o["tensor"] = o["tensor"].float()
            o["digest"] = _cache.fingerprint(o["tensor"])

        _forge(target, to32)
    else:
        torch.save(torch.load(target, weights_only=True)["tensor"], target)
    with pytest.warns(UserWarning, match=message):
        got = cached(model, tmp_path).scores(TEST)
    torch.testing.assert_close(got, expected, **EXACT)


# ---------------------------------------------------------------------------- the key
def _frozen_first_layer(scale=1.0):
    m = mlp()
    for p in m[0].parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        m[0].weight.mul_(scale)
    return m


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.lin(x))))


def _bn(var=1.0):
    torch.manual_seed(0)
    m = BNNet().double().eval()
    with torch.no_grad():
        m.bn.running_var.fill_(var)
        m.bn.running_mean.fill_(0.1)
    return m


# (what changes, first setup, second setup): model factory and loss for each
KEY_CASES = {
    "label_smoothing": (
        (mlp, nn.CrossEntropyLoss()),
        (mlp, nn.CrossEntropyLoss(label_smoothing=0.3)),
    ),
    "reduction": ((mlp, nn.CrossEntropyLoss()), (mlp, nn.CrossEntropyLoss(reduction="sum"))),
    "activation": ((mlp, nn.CrossEntropyLoss()), (lambda: mlp(nn.ReLU), nn.CrossEntropyLoss())),
    "frozen weight": (
        (_frozen_first_layer, nn.CrossEntropyLoss()),
        (lambda: _frozen_first_layer(1.5), nn.CrossEntropyLoss()),
    ),
    "buffer": ((_bn, nn.CrossEntropyLoss()), (lambda: _bn(2.0), nn.CrossEntropyLoss())),
}


@pytest.mark.parametrize("case", sorted(KEY_CASES))
def test_a_cache_filled_by_one_setup_is_not_used_for_another(tmp_path, case):
    (make_a, loss_a), (make_b, loss_b) = KEY_CASES[case]
    S_a = cached(make_a(), tmp_path, loss_a).scores(TEST)
    got = cached(make_b(), tmp_path, loss_b).scores(TEST)
    expected = fresh_scores(make_b(), loss_b)
    assert not torch.allclose(S_a, expected, rtol=1e-6, atol=0)  # the setups really differ
    torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("change", ["frozen weight", "buffer", "trainable weight", "loss"])
def test_scores_notice_a_change_within_one_process(change):
    model = _bn() if change == "buffer" else _frozen_first_layer()
    loss_fn = nn.CrossEntropyLoss()
    inf = Influence(model, loss_fn, TRAIN, **KW)
    before = inf.scores(TEST)
    with torch.no_grad():
        if change == "frozen weight":
            model[0].weight.mul_(1.5)
        elif change == "buffer":
            model.bn.running_var.mul_(2.0)
        elif change == "trainable weight":
            model[2].weight.mul_(1.5)
        else:
            loss_fn.label_smoothing = 0.3
    after = inf.scores(TEST)
    expected = fresh_scores(model, loss_fn)
    assert not torch.allclose(before, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(after, expected, **EXACT)


class GlobalSwitch(nn.Module):
    """A forward whose behaviour depends on something its module tree does not show."""

    act = staticmethod(torch.tanh)

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(GlobalSwitch.act(self.a(x)))


def test_the_version_tag_separates_what_the_key_cannot_see(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = GlobalSwitch().double()
    S_tanh = cached(model, tmp_path, version="tanh").scores(TEST)
    monkeypatch.setattr(GlobalSwitch, "act", staticmethod(torch.relu))
    expected = fresh_scores(model)
    assert not torch.allclose(S_tanh, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        cached(model, tmp_path, version="relu").scores(TEST), expected, **EXACT
    )
    # the documented limit: the same version tag keeps the old blocks
    torch.testing.assert_close(
        cached(model, tmp_path, version="tanh").scores(TEST), S_tanh, **EXACT
    )


def test_the_key_is_stable_for_equal_setups_and_free_of_addresses():
    def make_loss():
        return lambda out, y: nn.functional.cross_entropy(out, y)

    a = Influence(mlp(), make_loss(), TRAIN, cache_dir=None, **KW)
    b = Influence(mlp(), make_loss(), TRAIN, cache_dir=None, **KW)
    assert a.key == b.key  # two lambda objects at different addresses, one function
    c = Influence(
        mlp(), lambda out, y: nn.functional.cross_entropy(out, y, label_smoothing=0.1), TRAIN, **KW
    )
    assert c.key != a.key
