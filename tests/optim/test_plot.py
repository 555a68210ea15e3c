"""second.optim.plot_history (optim/_plot.py)."""

from __future__ import annotations

import pytest
import torch

from newton_cases import DT, contract, rosen
from second._errors import SecondDeprecationWarning
from second.optim import (
    NewtonCG,
    minimize,
    plot_history,
)


def test_plot_history():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    res = minimize(rosen, torch.tensor([-1.2, 1.0], dtype=DT))
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    opt = NewtonCG([x], maxiter=50)
    opt.step(contract(opt, lambda: rosen(x)))
    fig = plot_history({"minimize": res, "optimizer": opt}, x="nfev")
    ax_loss, ax_grad = fig.axes
    assert len(ax_loss.lines) == 2 and len(ax_grad.lines) == 2
    assert list(ax_loss.lines[0].get_xdata()) == [h["nfev"] for h in res.history]
    with pytest.raises(ValueError):
        plot_history(res, x="seconds")
    new = plot_history(res, x="matvecs")
    match = r'plot_history\(x="nhvp"\) is deprecated and stops working in 0\.3: use x="matvecs"'
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        old = plot_history(res, x="nhvp")
    assert rec[0].filename == __file__  # the warning points at the caller's line
    for a, b in zip(old.axes, new.axes, strict=True):
        assert a.get_xlabel() == b.get_xlabel() == "matvecs"
        assert [list(line.get_xydata().ravel()) for line in a.lines] == [
            list(line.get_xydata().ravel()) for line in b.lines
        ]
    import matplotlib.pyplot as plt

    for f in (fig, old, new):
        plt.close(f)
