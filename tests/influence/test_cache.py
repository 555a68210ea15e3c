"""The on-disk cache of an Influence (influence/_cache.py): an interrupted call resumes, a
corrupt file is recomputed."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from influence_cases import REG, SCORE_RTOL, data, mlp, rel
from second import Influence


def test_interrupted_scores_resume_from_cache(tmp_path, monkeypatch):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(20), data(3, seed=2)
    kw = dict(curvature="ggn", damping=REG, batch_size=4, progressbar=False)
    expected = Influence(model, loss_fn, train, **kw).scores(test)

    inf = Influence(model, loss_fn, train, cache_dir=tmp_path, **kw)
    inf.inverse_hvps(test)
    real = inf.fn.gradients
    calls = []

    def flaky(X, y):
        calls.append(X.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash in the third training chunk")
        return real(X, y)

    monkeypatch.setattr(inf.fn, "gradients", flaky)
    with pytest.raises(KeyboardInterrupt):
        inf.scores(test)
    files = sorted(p.name for p in Path(tmp_path).glob("scores-*.pt"))
    assert len(files) == 2  # two finished chunks, nothing half-written
    assert not list(Path(tmp_path).glob("*.tmp"))

    fresh = Influence(model, loss_fn, train, cache_dir=tmp_path, **kw)
    counted = []
    real2 = fresh.fn.gradients
    monkeypatch.setattr(fresh.fn, "gradients", lambda X, y: counted.append(1) or real2(X, y))
    S = fresh.scores(test)
    assert len(counted) == 3  # the 3 unfinished chunks only; test vectors came from disk
    assert rel(S, expected) < SCORE_RTOL["dense"]
    assert len(list(Path(tmp_path).glob("scores-*.pt"))) == 5


def test_corrupt_cache_file_is_recomputed(tmp_path):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(10), data(2, seed=2)
    kw = dict(curvature="ggn", damping=REG, batch_size=5, progressbar=False)
    S = Influence(model, loss_fn, train, cache_dir=tmp_path, **kw).scores(test)
    for p in Path(tmp_path).glob("scores-*.pt"):
        p.write_bytes(b"not a tensor file")
    (Path(tmp_path) / ".leftover.tmp").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="ignoring cache file"):
        again = Influence(model, loss_fn, train, cache_dir=tmp_path, **kw).scores(test)
    assert rel(again, S) < SCORE_RTOL["dense"]
