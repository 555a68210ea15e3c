"""Influence at scale: streamed EK-FAC factors, Kronecker-form scores, the safetensors cache.

Every result is checked against a dense float64 reference on small models: the EK-FAC
corrections against :func:`second.kfac.eigen_corrections` (dense per-example gradients),
the scores against per-example gradients from a plain autograd loop and the dense
EK-FAC matrix, blocked against unblocked, resumed against uninterrupted. Data passes
are counted with a counting loader.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from influence_cases import REG, data, example_grads_loop, mlp, rel
from second import Influence, Task
from second.influence import _cache
from second.influence._factors import StreamedEKFAC
from second.kfac import EKFACOperator, KFACOperator, eigen_corrections

EXACT_RTOL = 1e-10  # float64: the same sums in another order
SKETCH_RTOL = 1e-10  # a sketch of full rank is the exact matrix
FLOAT32_RTOL = 1e-5  # float32 products of a float64 model
APPROX_RTOL = 1e-8  # K-FAC / EK-FAC integration vs their own dense matrix
DAMPING = 0.1


class Seq(nn.Module):
    """Embedding, a Linear over positions (T > 1), a module called twice, a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)  # outside the supported layers: a diagonal block
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x)))
        h = torch.tanh(self.mix(h))  # the same module again
        return self.head(self.norm(h).mean(1))


class Attn(nn.Module):
    """Embedding, self-attention (Q/K/V blocks on rows of one weight), a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


class Conv(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.groups = groups
        self.conv = nn.Conv2d(groups, 2 * groups, 3, groups=groups)  # a block per group
        self.fc = nn.Linear(2 * groups * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def make(kind: str, n: int, seed: int = 1):
    """A float64 model and ``n`` examples of its kind."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
        X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    elif kind in ("seq", "attn"):
        model = Seq() if kind == "seq" else Attn()
        X = torch.randint(0, 7, (n, 5), generator=g)
    else:
        model = Conv(2 if kind == "gconv" else 1)
        X = torch.randn(n, model.groups, 6, 6, generator=g, dtype=torch.float64)
    return model.double().eval(), X, y


def dense_reference(model, loss_fn, train, test, curvature="ekfac", measure=None):
    cls = EKFACOperator if curvature == "ekfac" else KFACOperator
    K = cls(model, loss_fn, train).to_dense()
    A = K + DAMPING * torch.eye(K.shape[0], dtype=K.dtype)
    Gtr = example_grads_loop(model, loss_fn, *train)
    Gte = example_grads_loop(model, measure or loss_fn, *test)
    return Gte @ torch.linalg.solve(A, Gtr.T) / train[0].shape[0]


def batches(X, y, size):
    return [(X[s : s + size], y[s : s + size]) for s in range(0, X.shape[0], size)]


class Counting:
    """A fixed list of batches that counts how often it is iterated (data passes)."""

    def __init__(self, data):
        self.data, self.passes = list(data), 0

    def __iter__(self):
        self.passes += 1
        return iter(self.data)

    def __len__(self):
        return len(self.data)


KW = dict(damping=DAMPING, progressbar=False)


# ------------------------------------------------------------------------ factors
@pytest.mark.parametrize("kind", ["mlp", "seq", "conv", "gconv", "attn"])
def test_streamed_corrections_equal_dense_per_example_ones(kind):
    model, X, y = make(kind, 12)
    E = EKFACOperator(model, nn.CrossEntropyLoss(), (X, y))
    kfac = [b.eigen() for b in E.blocks]
    dense = dense_corrections(E.rules, kfac, E._passes())
    for memory in (1, 2**30):  # one example per block, everything in one block
        streamed = eigen_corrections(E.rules, kfac, E._passes(), memory=memory)
        for s, d in zip(streamed, dense):
            assert rel(s, d) < EXACT_RTOL


def dense_corrections(layers, eigen, passes):
    """The reference: every per-example, per-column weight gradient, summed per call, rotated."""
    sums = [torch.zeros(layer.d_G, layer.d_A, dtype=torch.float64) for layer in layers]
    for out, S, cap in passes:
        per = {}
        for j, inp, g in cap.backprop(out, S, retain_graph=False)[0]:
            layer = layers[j]
            grows = layer.grad_rows(g, inp, "expand")
            mask = layer.mask(inp)
            if mask is not None:
                grows = grows * mask.reshape(1, *mask.shape, 1).to(grows.dtype)
            m = layer.per_example_mats(layer.input_rows(inp, "expand"), grows)
            per[j] = m + per[j] if j in per else m
        for j, m in per.items():
            mats = m.reshape(-1, layers[j].d_G, layers[j].d_A)
            sums[j] += (eigen[j].rotate(mats) ** 2).sum(0)
    return sums


@pytest.mark.parametrize("kind", ["mlp", "seq", "conv"])
def test_streamed_factors_over_batches_equal_all_at_once(kind):
    model, X, y = make(kind, 12)
    loss_fn = nn.CrossEntropyLoss()
    once = EKFACOperator(model, loss_fn, (X, y)).to_dense()
    streamed = StreamedEKFAC(model, loss_fn, batches(X, y, 5)).to_dense()
    assert rel(streamed, once) < EXACT_RTOL


# ------------------------------------------------------------------------ scores
@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("kind", ["mlp", "seq", "conv", "gconv", "attn"])
def test_kronecker_scores_match_the_dense_reference(kind, curvature):
    model, X, y = make(kind, 12)
    test = make(kind, 4, seed=2)[1:]
    loss_fn = nn.CrossEntropyLoss()
    ref = dense_reference(model, loss_fn, (X, y), test, curvature)
    inf = Influence(model, loss_fn, (X, y), curvature=curvature, batch_size=5, **KW)
    assert rel(inf.scores(test), ref) < EXACT_RTOL
    parts = inf.scores(test, per_module=True)
    blocks = [rule.name for rule in inf.operator.rules]  # a module, attention's q, k, v, a group
    names = {name for name, _ in model.named_parameters()}
    assert list(parts)[: len(blocks)] == blocks and set(list(parts)[len(blocks) :]) <= names
    assert rel(sum(parts.values()), ref) < EXACT_RTOL


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("kind", ["mlp", "seq", "conv", "gconv", "attn"])
def test_kronecker_self_influence_matches_the_dense_reference(kind, curvature):
    model, X, y = make(kind, 12)
    loss_fn = nn.CrossEntropyLoss()
    cls = EKFACOperator if curvature == "ekfac" else KFACOperator
    K = cls(model, loss_fn, (X, y)).to_dense()
    A = K + DAMPING * torch.eye(K.shape[0], dtype=K.dtype)
    G = example_grads_loop(model, loss_fn, X, y)
    ref = (G * torch.linalg.solve(A, G.T).T).sum(1) / X.shape[0]
    for memory in (None, 1):  # default blocks, one example per block
        inf = Influence(
            model, loss_fn, (X, y), curvature=curvature, batch_size=5, max_memory=memory, **KW
        )
        assert rel(inf.self_influence(), ref) < EXACT_RTOL


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kronecker_curvatures_use_their_own_inverse(curvature):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(20), data(2, seed=2)
    cls = KFACOperator if curvature == "kfac" else EKFACOperator
    K = cls(model, loss_fn, train).to_dense()
    A = K + REG * torch.eye(K.shape[0], dtype=K.dtype)
    Gtr = example_grads_loop(model, loss_fn, *train)
    Gte = example_grads_loop(model, loss_fn, *test)
    ref = Gte @ torch.linalg.solve(A, Gtr.T) / 20
    inf = Influence(model, loss_fn, train, curvature=curvature, damping=REG, progressbar=False)
    assert rel(inf.scores(test), ref) < APPROX_RTOL


@pytest.mark.parametrize("kind", ["mlp", "seq", "conv"])
def test_blocked_scores_equal_unblocked(kind):
    model, X, y = make(kind, 12)
    test = make(kind, 5, seed=2)[1:]
    loss_fn = nn.CrossEntropyLoss()
    whole = Influence(model, loss_fn, (X, y), curvature="ekfac", batch_size=64, **KW)
    S = whole.scores(test)
    # one query and one example per block, training chunks of 5 over batches of 4
    tiny = Influence(
        model, loss_fn, batches(X, y, 4), curvature="ekfac", batch_size=5, max_memory=1, **KW
    )
    assert rel(tiny.scores(test), S) < EXACT_RTOL


def test_the_query_measurement_is_not_the_training_loss():
    def margin(out, y):  # the logit of the true class minus the largest other one
        true = out.gather(1, y[:, None])[:, 0]
        other = out.scatter(1, y[:, None], float("-inf")).amax(1)
        return (true - other).sum()

    class Margin(Task):
        def measurement(self, model, batch):
            return margin(self.output(model, batch), batch[1])

    model, X, y = make("seq", 12)
    test = make("seq", 4, seed=2)[1:]
    loss_fn = nn.CrossEntropyLoss()
    ref = dense_reference(model, loss_fn, (X, y), test, measure=margin)
    inf = Influence(model, loss_fn, (X, y), curvature="ekfac", task=Margin(), **KW)
    assert rel(inf.scores(test), ref) < EXACT_RTOL
    loss_scores = Influence(model, loss_fn, (X, y), curvature="ekfac", **KW).scores(test)
    assert rel(loss_scores, ref) > 0.1  # a different quantity


def test_query_sketch_and_score_dtype():
    model, X, y = make("mlp", 12)
    test = make("mlp", 4, seed=2)[1:]
    loss_fn = nn.CrossEntropyLoss()
    exact = Influence(model, loss_fn, (X, y), curvature="ekfac", **KW)
    S = exact.scores(test)
    full = Influence(model, loss_fn, (X, y), curvature="ekfac", query_rank=4, **KW).scores(test)
    assert rel(full, S) < SKETCH_RTOL  # min(d_out, d_in) <= 4 for every layer: exact
    one = Influence(model, loss_fn, (X, y), curvature="ekfac", query_rank=1, **KW)
    # the rank-1 reference: every layer's preconditioned query matrix truncated by SVD
    mats, _ = one._kronecker_queries(test)
    Gtr = example_grads_loop(model, loss_fn, X, y)
    ref, off = torch.zeros_like(S), 0
    for M in mats:
        U, s, Vh = torch.linalg.svd(M)
        M1 = (U[..., :1] * s[:, None, :1]) @ Vh[:, :1]
        k = M1[0].numel()
        W, b = M1[..., :-1].reshape(M1.shape[0], -1), M1[..., -1]  # weight then bias
        G = Gtr[:, off : off + k]
        ref += W @ G[:, : W.shape[1]].T + b @ G[:, W.shape[1] :].T
        off += k
    assert rel(one.scores(test), ref) < EXACT_RTOL
    assert rel(one.scores(test), S) > 1e-6  # rank 1 of 3 or 5 is an approximation
    low = Influence(model, loss_fn, (X, y), curvature="ekfac", score_dtype=torch.float32, **KW)
    S32 = low.scores(test)
    assert S32.dtype == torch.float32 and rel(S32.double(), S) < FLOAT32_RTOL


def test_bad_scale_options_are_refused():
    model, X, y = make("mlp", 6)
    loss_fn = nn.CrossEntropyLoss()
    for kw in ({"query_rank": 0}, {"max_memory": 0}, {"score_dtype": torch.int64}):
        with pytest.raises(ValueError):
            Influence(model, loss_fn, (X, y), curvature="ekfac", **kw, **KW)
    with pytest.raises(ValueError, match="per_module"):
        Influence(model, loss_fn, (X, y), curvature="ggn", **KW).scores((X, y), per_module=True)


# ------------------------------------------------------------------------ passes, cache
def test_data_passes_are_counted():
    model, X, y = make("mlp", 12)
    test = make("mlp", 3, seed=2)[1:]
    loss_fn = nn.CrossEntropyLoss()
    for curvature, fit_passes in (("kfac", 1), ("ekfac", 2)):
        data = Counting(batches(X, y, 4))
        inf = Influence(model, loss_fn, data, curvature=curvature, **KW)
        assert data.passes == 1  # counting the examples
        inf.operator  # noqa: B018
        assert data.passes == 1 + fit_passes  # factors (and corrections) streamed
        inf.scores(test)
        assert data.passes == 2 + fit_passes  # one pass of scores
        inf.scores(test)
        assert data.passes == 3 + fit_passes  # kept queries: one more pass, no refit


def test_a_cached_fit_and_scores_take_no_pass_and_give_the_same_scores(tmp_path):
    model, X, y = make("seq", 12)
    test = make("seq", 3, seed=2)[1:]
    loss_fn = nn.CrossEntropyLoss()
    S = Influence(model, loss_fn, (X, y), curvature="ekfac", **KW).scores(test)
    first = Influence(model, loss_fn, batches(X, y, 4), curvature="ekfac", cache_dir=tmp_path, **KW)
    torch.testing.assert_close(first.scores(test), S, rtol=EXACT_RTOL, atol=0)
    assert {p.suffix for p in tmp_path.iterdir()} == {".safetensors"}
    data = Counting(batches(X, y, 4))
    again = Influence(model, loss_fn, data, curvature="ekfac", cache_dir=tmp_path, **KW)
    again.factors_key  # noqa: B018 - one pass counts the examples, one digests them
    before = data.passes
    assert before == 2
    again.operator  # noqa: B018
    assert data.passes == before  # the factors and corrections come from the cache
    torch.testing.assert_close(again.scores(test), first.scores(test), rtol=0, atol=0)
    assert data.passes == before + 1  # the score blocks are checked against their chunks
    # another damping reuses the factors (they do not depend on it)
    other = Influence(
        model, loss_fn, data, curvature="ekfac", cache_dir=tmp_path, damping=1.0, progressbar=False
    )
    other.factors_key  # noqa: B018
    before = data.passes
    other.operator  # noqa: B018
    assert data.passes == before


@pytest.mark.parametrize("stop", range(6))
def test_an_interrupted_fit_or_scoring_resumes_to_the_same_scores(tmp_path, monkeypatch, stop):
    """Crash at the ``stop``-th file: factors, corrections, the query, 3 score chunks."""
    model, X, y = make("mlp", 12)
    test = make("mlp", 3, seed=2)[1:]
    loss_fn = nn.CrossEntropyLoss()
    data = batches(X, y, 4)
    S = Influence(model, loss_fn, data, curvature="ekfac", batch_size=4, **KW).scores(test)
    real = _cache.DiskCache._write
    written = []

    def crash(self, path, name, write):
        if len(written) == stop:
            raise KeyboardInterrupt("simulated crash")
        written.append(name)
        real(self, path, name, write)

    monkeypatch.setattr(_cache.DiskCache, "_write", crash)
    with pytest.raises(KeyboardInterrupt):
        Influence(
            model, loss_fn, data, curvature="ekfac", batch_size=4, cache_dir=tmp_path, **KW
        ).scores(test)
    monkeypatch.setattr(_cache.DiskCache, "_write", real)
    assert len(list(tmp_path.glob("*.safetensors"))) == stop
    assert not list(tmp_path.glob(".*.tmp"))
    counting = Counting(data)
    resumed = Influence(
        model, loss_fn, counting, curvature="ekfac", batch_size=4, cache_dir=tmp_path, **KW
    )
    torch.testing.assert_close(resumed.scores(test), S, rtol=EXACT_RTOL, atol=0)
    # passes: count + digest, then the fit stages not yet stored, then the scores
    assert counting.passes == 2 + max(0, 2 - stop) + 1


@pytest.mark.parametrize("how", ["garbage", "truncated", "forged"])
def test_a_damaged_factor_file_is_ignored_and_refitted(tmp_path, how):
    model, X, y = make("mlp", 12)
    test = make("mlp", 3, seed=2)[1:]
    loss_fn = nn.CrossEntropyLoss()
    S = Influence(model, loss_fn, (X, y), curvature="ekfac", cache_dir=tmp_path, **KW).scores(test)
    for p in tmp_path.glob("kscores-*"):
        p.unlink()
    for p in tmp_path.glob("kquery-*"):
        p.unlink()
    (path,) = tmp_path.glob("factors-*.safetensors")
    raw = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # the bytes of a tensor changed, the header (and its digest) kept
        path.write_bytes(raw[:-8] + bytes(8))
    with pytest.warns(UserWarning, match="ignoring cache file"):
        got = Influence(model, loss_fn, (X, y), curvature="ekfac", cache_dir=tmp_path, **KW).scores(
            test
        )
    torch.testing.assert_close(got, S, rtol=EXACT_RTOL, atol=0)


def test_a_killed_writer_leaves_no_corrupt_file(tmp_path):
    """SIGKILL a process in the middle of writing large files: every file left is whole."""
    script = textwrap.dedent(
        f"""
        import torch
        from second.influence._cache import DiskCache
        cache = DiskCache({str(tmp_path)!r})
        t = torch.arange(4_000_000, dtype=torch.float64)
        i = 0
        while True:
            cache.save_tensors(f"block-{{i}}", {{"t": t + i}}, {{"i": i}})
            print(i, flush=True)
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # one file is complete
        time.sleep(0.3)  # and another is being written
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    cache = _cache.DiskCache(tmp_path)
    files = sorted(tmp_path.glob("block-*.safetensors"))
    assert files
    for p in files:
        i = int(p.stem.split("-")[1])
        got = cache.load_tensors(f"block-{i}", {"i": i}, {"t": (4_000_000,)})
        assert got is not None and float(got["t"][0]) == i


def test_the_cache_reads_its_files_without_a_third_party_reader(tmp_path):
    """Mixed dtypes at unaligned offsets, empty and 0-d tensors round-trip bit for bit."""
    ts = {
        "u8": torch.arange(3, dtype=torch.uint8),  # the next tensor starts at byte 3
        "f64": torch.randn(3, 4, dtype=torch.float64),
        "bf16": torch.randn(5).bfloat16(),
        "empty": torch.zeros(0, 3),
        "flag": torch.tensor(True),
        "i64": torch.arange(-4, 4),
    }
    cache = _cache.DiskCache(tmp_path)
    cache.save_tensors("mixed", ts, {"k": 1})
    got = cache.load_tensors("mixed", {"k": 1}, {k: tuple(t.shape) for k, t in ts.items()})
    assert got is not None and list(got) == list(ts)
    for k, t in ts.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


@pytest.mark.parametrize("how", ["short", "long-header", "not-json", "overlap"])
def test_a_malformed_safetensors_file_is_refused(tmp_path, how):
    cache = _cache.DiskCache(tmp_path)
    cache.save_tensors("m", {"a": torch.ones(4), "b": torch.ones(2)})
    path = cache.tensors_path("m")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    if how == "short":
        path.write_bytes(raw[:5])
    elif how == "long-header":
        path.write_bytes((len(raw) * 2).to_bytes(8, "little") + raw[8:])
    elif how == "not-json":
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n :])
    else:  # the second tensor claims the first one's bytes
        forged = header.replace(b"[16,24]", b"[8,16]")
        assert forged != header
        path.write_bytes(raw[:8] + forged + raw[8 + n :])
    with pytest.raises(ValueError):
        _cache._read_safetensors(path)
    with pytest.warns(UserWarning, match="cannot be read"):
        assert cache.load_tensors("m") is None
