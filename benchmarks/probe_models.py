"""Every optimizer's defaults and every curvature entry point on models the zoo does not hold.

A user brings a depthwise-separable CNN, a grouped Conv1d, a Conv3d, a transposed convolution,
an LSTM or a GRU, tied input/output embeddings, ``weight_norm``, frozen parameters or a
Transformer encoder. For each, this script runs 15 steps of every second optimizer with its
defaults (is the loss finite and lower?), and, with the model in eval mode, a Hessian, GGN,
KFAC and EK-FAC product, ``eigsh(k=2)``, influence scores (EK-FAC, GGN, Hessian) and the
Laplace predictive (last layer, all-layer KFAC, all-layer diagonal). It prints one line per
check: ``ok``, or the error, and the warnings raised. Not timed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_models.py [model ...]
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import second
from second import optim
from second.laplace import Laplace

N = 48  # examples
STEPS = 15


class DWSep(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.bn(F.gelu(self.pw(self.dw(F.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


class Pooled(nn.Module):
    """A convolution of any kind, ReLU, mean over positions, a linear head."""

    def __init__(self, conv: nn.Module, channels: int, dims: tuple[int, ...]):
        super().__init__()
        self.c, self.dims, self.fc = conv, dims, nn.Linear(channels, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).mean(self.dims))


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.e, self.r, self.fc = (
            nn.Embedding(20, 8),
            cell(8, 16, batch_first=True),
            nn.Linear(16, 10),
        )

    def forward(self, x):
        return self.fc(self.r(self.e(x))[0][:, -1])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.h = nn.Embedding(10, 8), nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(torch.tanh(self.h(self.e(x).mean(1))), self.e.weight)


class MLP(nn.Module):
    def __init__(self, weight_norm: bool = False, frozen: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 10)
        if weight_norm:
            self.a = nn.utils.parametrizations.weight_norm(self.a)
        if frozen:
            self.a.weight.requires_grad_(False)

    def forward(self, x):
        return self.b(F.silu(self.a(x)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True, norm_first=True
        )
        self.t = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.t(self.e(x)).mean(1))


class ResBlock(nn.Module):
    """A ResNet basic block (conv-BN-ReLU-conv-BN plus the identity) between a stem and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PatchViT(nn.Module):
    """Patches by a strided convolution, a class token and positions (parameters), encoder."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 5, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.t = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 10)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)  # [n, 4, 16]
        z = torch.cat([self.cls.expand(len(x), -1, -1), p], 1) + self.pos
        return self.fc(self.norm(self.t(z)[:, 0]))


class MobileBlock(nn.Module):
    """An inverted residual: expand 1x1, depthwise 3x3 over 96 channels, project; Hardswish."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 96, 1)
        self.dw = nn.Conv2d(96, 96, 3, padding=1, groups=96)
        self.project = nn.Conv2d(96, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        x = x + self.project(F.hardswish(self.dw(F.hardswish(self.expand(x)))))
        return self.fc(x.mean((2, 3)))


class BilinearDrop(nn.Module):
    """``nn.Bilinear`` (no Kronecker rule) and dropout (a random forward in training)."""

    def __init__(self):
        super().__init__()
        self.a, self.bl = nn.Linear(6, 8), nn.Bilinear(8, 8, 8)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(8, 10)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.fc(self.drop(torch.tanh(self.bl(h, h))))


class MaxNormEmbedding(nn.Module):
    """``nn.Embedding(max_norm=...)`` renormalizes its rows in place during the forward."""

    def __init__(self):
        super().__init__()
        self.e, self.fc = nn.Embedding(20, 8, max_norm=1.0), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.e(x).mean(1))


def tokens(shape):
    return lambda: torch.randint(0, 20, shape)


MODELS = {
    "dwsep-cnn": (DWSep, lambda: torch.randn(N, 1, 8, 8)),
    "conv1d-groups": (
        lambda: Pooled(nn.Conv1d(4, 8, 3, groups=2), 8, (2,)),
        lambda: torch.randn(N, 4, 12),
    ),
    "conv3d": (
        lambda: Pooled(nn.Conv3d(1, 4, 3), 4, (2, 3, 4)),
        lambda: torch.randn(N, 1, 5, 5, 5),
    ),
    "conv-transpose": (
        lambda: Pooled(nn.ConvTranspose2d(1, 4, 3, stride=2), 4, (2, 3)),
        lambda: torch.randn(N, 1, 5, 5),
    ),
    "lstm": (lambda: Recurrent(nn.LSTM), tokens((N, 7))),
    "gru": (lambda: Recurrent(nn.GRU), tokens((N, 7))),
    "tied-embeddings": (Tied, lambda: torch.randint(0, 10, (N, 5))),
    "weight-norm": (lambda: MLP(weight_norm=True), lambda: torch.randn(N, 6)),
    "frozen": (lambda: MLP(frozen=True), lambda: torch.randn(N, 6)),
    "transformer-encoder": (Encoder, tokens((N, 6))),
    "resnet-block": (ResBlock, lambda: torch.randn(N, 1, 8, 8)),
    "patch-vit": (PatchViT, lambda: torch.randn(N, 1, 8, 8)),
    "mobile-block": (MobileBlock, lambda: torch.randn(N, 1, 8, 8)),
    "bilinear-dropout": (BilinearDrop, lambda: torch.randn(N, 6)),
    "maxnorm-embedding": (MaxNormEmbedding, tokens((N, 5))),
}


OPTIMIZERS = ("KFAC", "SOAP", "Shampoo", "Sophia", "SophiaH", "AdaHessian")
NEWTON = ("NewtonCG", "GaussNewton", "HessianFree", "LiSSA")  # full-batch methods


def optimizer(name: str, model: nn.Module, loss_fn):
    if name in ("KFAC", "Sophia"):  # they take the model and the loss (own curvature passes)
        return getattr(optim, name)(model, loss_fn)
    if name in ("GaussNewton", "HessianFree"):  # the model: its outputs for the Gauss-Newton
        return getattr(optim, name)(model)
    return getattr(optim, name)([p for p in model.parameters() if p.requires_grad])


def check(label: str, fn) -> None:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
        said = sorted({str(w.message)[:90] for w in caught if "jit.script" not in str(w.message)})
        print(f"{label:44s} {result}  {'; '.join(said[:2])}", flush=True)
    except Exception as err:  # noqa: BLE001 - the probe reports every failure
        print(f"{label:44s} ERROR {type(err).__name__}: {str(err)[:160]}", flush=True)


def train(make, data, name: str) -> str:
    torch.manual_seed(0)
    model, X, y, loss_fn = make(), data(), torch.randint(0, 10, (N,)), nn.CrossEntropyLoss()
    opt = optimizer(name, model, loss_fn)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(STEPS):
        opt.step(closure)
    with torch.no_grad():
        last = float(loss_fn(model(X), y))
    ok = "ok" if math.isfinite(last) and last < first else "NOT LOWER"
    return f"{ok} {first:.3f} -> {last:.3f}"


def curvature(key: str, make, data) -> None:
    torch.manual_seed(0)
    model, X, y, loss_fn = make().eval(), data(), torch.randint(0, 10, (N,)), nn.CrossEntropyLoss()
    for op in ("HessianOperator", "GGNOperator", "KFACOperator", "EKFACOperator"):

        def product(op=op):
            A = getattr(second, op)(model, loss_fn, (X, y))
            return f"ok |Av| {float((A @ torch.randn(A.shape[1])).norm()):.3g}"

        check(f"{key} {op}", product)

    def top2():
        r = second.eigsh(second.HessianOperator(model, loss_fn, (X, y)), k=2, return_result=True)
        return f"ok {[round(v, 4) for v in r.eigenvalues.tolist()]} ({r.matvecs} products)"

    check(f"{key} eigsh k=2", top2)
    for curv in ("ekfac", "ggn", "hessian"):

        def scores(curv=curv):
            inf = second.Influence(
                model, loss_fn, (X, y), curvature=curv, damping=1e-2, progressbar=False
            )
            return f"ok {tuple(inf.scores((X[:3], y[:3])).shape)}"

        check(f"{key} Influence {curv}", scores)
    for subset, structure in (("last_layer", "full"), ("all", "kfac"), ("all", "diag")):

        def predict(subset=subset, structure=structure):
            la = Laplace(model, loss_fn, (X, y), subset=subset, structure=structure)
            return f"ok {tuple(la.predict(X[:4]).shape)}"

        check(f"{key} Laplace {subset}/{structure}", predict)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help=f"default: all of {', '.join(MODELS)}")
    ap.add_argument(
        "--optimizers",
        nargs="*",
        default=list(OPTIMIZERS),
        help=f"default: {' '.join(OPTIMIZERS)}; the full-batch Newton-type: {' '.join(NEWTON)}",
    )
    ap.add_argument("--no-curvature", action="store_true", help="only the optimizers")
    args = ap.parse_args()
    print(f"second {second.__version__}, torch {torch.__version__}")
    for key in args.models or MODELS:
        make, data = MODELS[key]
        for name in args.optimizers:
            label = f"{key} {name} (defaults, {STEPS} steps)"
            check(label, lambda make=make, data=data, name=name: train(make, data, name))
        if not args.no_curvature:
            curvature(key, make, data)


if __name__ == "__main__":
    main()
