"""The public API's overloads, as a user's type checker reads them (second ships py.typed).

mypy checks a user's snippet with ``assert_type``: the return type each flag combination
gets. A second snippet with wrong expectations must fail, so the check has teeth.
"""

from __future__ import annotations

import textwrap

import pytest

api = pytest.importorskip("mypy.api")

GOOD = """
    import torch
    from torch import Tensor
    from typing_extensions import assert_type

    from second import Influence, eigsh, gvp, hvp, jvp, trace, vjp
    from second.spectral import Density, EigshResult, Estimate, diagonal, spectral_density

    A = torch.eye(4)
    w = torch.ones(3, requires_grad=True)
    loss = (w**3).sum()
    assert_type(hvp(loss, [w], torch.ones(3)), Tensor)
    assert_type(hvp(loss, [w], torch.ones(3), flatten=False), tuple[Tensor, ...])
    assert_type(hvp(loss, [w], torch.ones(3), True, False), tuple[Tensor, ...])
    assert_type(gvp(loss, w * 2, [w], torch.ones(3)), Tensor)
    assert_type(gvp(loss, w * 2, [w], torch.ones(3), flatten=False), tuple[Tensor, ...])
    assert_type(jvp(w * 2, [w], torch.ones(3)), Tensor)
    assert_type(jvp(w * 2, [w], torch.ones(3), flatten=False), tuple[Tensor, ...])
    assert_type(vjp(w * 2, [w], torch.ones(3)), Tensor)
    assert_type(vjp(w * 2, [w], torch.ones(3), True, False, False), tuple[Tensor, ...])
    inf = Influence(torch.nn.Linear(4, 1), torch.nn.MSELoss(), (A, A[:, :1]), damping=1.0)
    assert_type(inf.scores((A, A[:, :1])), Tensor)
    assert_type(inf.scores((A, A[:, :1]), per_module=True), dict[str, Tensor])
    assert_type(eigsh(A, k=2), tuple[Tensor, Tensor])
    assert_type(eigsh(A, k=2, return_eigenvectors=True), tuple[Tensor, Tensor])
    assert_type(eigsh(A, k=2, return_eigenvectors=False), Tensor)
    assert_type(eigsh(A, k=2, return_result=True), EigshResult)
    assert_type(eigsh(A, k=2, return_eigenvectors=False, return_result=True), EigshResult)
    assert_type(trace(A), Tensor)
    assert_type(trace(A, return_result=True), Estimate)
    assert_type(diagonal(A), Tensor)
    assert_type(diagonal(A, return_result=True), Estimate)
    assert_type(spectral_density(A), tuple[Tensor, Tensor, Tensor, Tensor])
    assert_type(spectral_density(A, return_result=True), Density)
"""

BAD = """
    import torch
    from torch import Tensor
    from typing_extensions import assert_type

    from second import eigsh, hvp

    A = torch.eye(4)
    assert_type(eigsh(A, k=2), Tensor)
    assert_type(eigsh(A, k=2, return_eigenvectors=False), tuple[Tensor, Tensor])
    w = torch.ones(3, requires_grad=True)
    assert_type(hvp((w**3).sum(), [w], torch.ones(3)), tuple[Tensor, ...])
"""


def test_overloads_give_each_flag_combination_its_return_type(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(textwrap.dedent(GOOD))
    bad.write_text(textwrap.dedent(BAD))
    out, err, status = api.run(
        [
            "--python-version", "3.10", "--no-incremental", "--ignore-missing-imports",
            "--cache-dir", str(tmp_path / "cache"), str(good), str(bad),
        ]
    )  # fmt: skip
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert not [e for e in errors if "good.py" in e], out
    wrong = [e for e in errors if "bad.py" in e and "[assert-type]" in e]
    assert len(wrong) == 3, out  # every wrong expectation is caught
    assert status == 1, (out, err)
