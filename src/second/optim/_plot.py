"""Plot loss and gradient norm against evaluations for the Newton-type optimizers."""

from __future__ import annotations

from .._deprecation import warn_deprecated
from .._optional import require

__all__ = ["plot_history", "history_of"]

X_AXES = ("cost", "nfev", "ngev", "matvecs", "n_iter")


def history_of(run) -> list[dict]:
    """The per-iteration records of an optimizer, an :class:`OptimizeResult` or a list."""
    if isinstance(run, list):
        return run
    hist = getattr(run, "history", None)
    if isinstance(hist, list):
        return hist
    raise TypeError(
        f"cannot find a history in {type(run).__name__}: pass a Newton-type optimizer, an "
        "OptimizeResult or a list of records"
    )


def plot_history(runs, x: str = "cost", *, axes=None, logy: bool = True):
    """Plot training loss and gradient norm against an evaluation count.

    Args:
        runs: one run or a ``{label: run}`` dict; a run is a Newton-type optimizer, an
            :class:`~second.optim.OptimizeResult` or a list of history records.
        x: ``"cost"`` (gradient evaluations + 2 x curvature products, default), ``"nfev"``,
            ``"ngev"``, ``"matvecs"`` or ``"n_iter"`` (``"nhvp"``: the deprecated spelling of
            ``"matvecs"``, removed in 0.3).
        axes: two matplotlib axes to draw into (default: a new figure).
        logy: logarithmic y axes (default ``True``).

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: an unknown ``x``.
        ImportError: matplotlib is not installed (``pip install second[plot]``).

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> from second.optim import minimize
        >>> res = minimize(lambda x: (x ** 4).sum(), torch.ones(3, dtype=torch.float64))
        >>> fig = plot_history({"newton-cg": res})
        >>> len(fig.axes)
        2
    """
    if x == "nhvp":
        warn_deprecated('plot_history(x="nhvp")', 'x="matvecs"')
        x = "matvecs"
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    plt = require("matplotlib.pyplot", extra="plot", purpose="plot_history")

    if not isinstance(runs, dict):
        runs = {None: runs}
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    else:
        fig = axes[0].figure
    for label, run in runs.items():
        hist = [r for r in history_of(run) if r.get("loss") is not None]

        def products(r):  # a record saved before the renaming has "nhvp"
            return r["matvecs"] if "matvecs" in r else r["nhvp"]

        if x == "cost":
            xs = [r["ngev"] + 2 * products(r) for r in hist]
        elif x == "matvecs":
            xs = [products(r) for r in hist]
        else:
            xs = [r[x] for r in hist]
        axes[0].plot(xs, [r["loss"] for r in hist], label=label)
        axes[1].plot(xs, [r["grad_norm"] for r in hist], label=label)
    xlabel = "gradient evaluations + 2 x curvature products" if x == "cost" else x
    for ax, ylabel in zip(axes, ("loss", "gradient norm")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
    if any(label is not None for label in runs):
        axes[0].legend()
    fig.tight_layout()
    return fig
