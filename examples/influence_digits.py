"""Which training images helped, and which hurt, a prediction on scikit-learn digits.

Trains an L2-regularized softmax regression (float64, Newton's method, to a gradient
norm below 1e-10), picks the test image with the highest loss, and shows the 5 most
helpful and the 5 most harmful training images for it as a PNG grid.

    python examples/influence_digits.py [--out influence_digits.png] [--lam 1e-3]

Helpful (score > 0): removing the image and retraining would raise the test loss.
Harmful (score < 0): removing it would lower the test loss.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

import second  # noqa: E402


def train_newton(model: nn.Module, X, y, lam: float, tol: float = 1e-10) -> None:
    """Minimize mean cross-entropy + lam/2 ||theta||^2 by damped Newton steps."""
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()

    def objective():
        return loss_fn(model(X), y) + 0.5 * lam * sum((p * p).sum() for p in params)

    for _ in range(50):
        loss = objective()
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        if float(g.norm()) < tol:
            return
        H = second.exact_hessian(objective(), params)
        step = torch.linalg.solve(H, g)
        t, f0 = 1.0, float(loss.detach())
        theta0 = second.parameters_to_vector([p.detach().clone() for p in params])
        while True:  # backtracking keeps the early steps from overshooting
            with torch.no_grad():
                for p, s in zip(
                    params, second.vector_to_parameters(theta0 - t * step, params), strict=True
                ):
                    p.copy_(s)
            if float(objective().detach()) <= f0 - 1e-4 * t * float(g @ step) or t < 1e-8:
                break
            t *= 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="influence_digits.png")
    parser.add_argument("--lam", type=float, default=1e-3, help="L2 regularization")
    args = parser.parse_args()

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0)

    torch.manual_seed(0)
    model = nn.Linear(64, 10).double()
    train_newton(model, Xtr, ytr, args.lam)

    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(Xte), yte, reduction="none")
    i = int(losses.argmax())
    pred = int(model(Xte[i : i + 1]).argmax())

    inf = second.Influence(model, nn.CrossEntropyLoss(), (Xtr, ytr), regularization=args.lam)
    top = inf.top_k((Xte[i : i + 1], yte[i : i + 1]), k=5)

    fig, axes = plt.subplots(3, 5, figsize=(9, 6.2))
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 2].imshow(Xte[i].reshape(8, 8), cmap="gray_r")
    axes[0, 2].set_title(
        f"test #{i}: label {int(yte[i])}, predicted {pred}\nloss {float(losses[i]):.2f}", fontsize=9
    )
    rows = [
        (1, "helpful", top.helpful_indices[0], top.helpful_scores[0]),
        (2, "harmful", top.harmful_indices[0], top.harmful_scores[0]),
    ]
    for r, kind, idx, vals in rows:
        for c, (j, s) in enumerate(zip(idx.tolist(), vals.tolist(), strict=True)):
            axes[r, c].imshow(Xtr[j].reshape(8, 8), cmap="gray_r")
            axes[r, c].set_title(
                f"{kind}: train #{j}\nlabel {int(ytr[j])}, score {s:+.1e}", fontsize=8
            )
    fig.suptitle(
        "Influence on the highest-loss test digit (score > 0: removing it would "
        "raise the test loss)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"test point {i} (label {int(yte[i])}, predicted {pred}); wrote {args.out}")
    print(
        "most helpful:",
        top.helpful_indices[0].tolist(),
        "labels",
        ytr[top.helpful_indices[0]].tolist(),
    )
    print(
        "most harmful:",
        top.harmful_indices[0].tolist(),
        "labels",
        ytr[top.harmful_indices[0]].tolist(),
    )


if __name__ == "__main__":
    main()
