"""Without the optional extras: the text result first, then one line naming the extra.

Each case runs in a fresh interpreter whose importer refuses matplotlib, scikit-learn and tqdm,
as on a machine where only ``pip install second`` was run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from second._optional import EXTRAS, MissingExtraError, require

BLOCKER = """
import importlib.abc, importlib.machinery, sys
BLOCKED = {blocked!r}
class _Absent(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)
    def exec_module(self, module):
        pass
class _Blocker(importlib.abc.MetaPathFinder):
    # a spec whose loading fails: `import` raises as for an absent package, while
    # importlib.util.find_spec (which torch's own probes call) does not raise
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, _Absent())
for _m in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
    del sys.modules[_m]
sys.meta_path.insert(0, _Blocker())
"""


def _run(code: str, blocked=("matplotlib", "sklearn", "tqdm")):
    """Run ``code`` with ``blocked`` unimportable; stdout and stderr interleaved as printed."""
    script = BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-u", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def test_import_second_needs_no_extra():
    r = _run(
        """
        import second, second.optim, second.solvers, second.operators, second.cli, second.compare
        bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(bad)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_compare_prints_the_table_then_names_the_plot_extra(tmp_path):
    r = _run(
        f"""
        from second.cli import main
        sys.exit(main(["compare", "--seeds", "1", "--methods", "cg,auto", "--progress",
                       "--out-dir", {str(tmp_path)!r}]))
        """
    )
    assert r.returncode == 0, r.stdout
    lines = r.stdout.splitlines()
    assert "Traceback" not in r.stdout
    table = lines.index(next(x for x in lines if x.startswith("| hessian | auto | converged |")))
    plot_hint = lines.index(
        "second: no plot: the residual plot (compare.png) needs matplotlib, which is not "
        "installed: pip install 'second[plot]'"
    )
    assert table < plot_hint  # the text result first, then the one-line hint
    # --progress asked for a bar: without tqdm the work runs, and one line (once) says so
    bar_hint = (
        "second: a progress bar needs tqdm, which is not installed: pip install 'second[progress]'"
    )
    assert lines.count(bar_hint) == 1
    assert sum("pip install" in x for x in lines) == 2
    assert (tmp_path / "compare.md").exists() and not (tmp_path / "compare.png").exists()
    assert json.loads((tmp_path / "compare.json").read_text())["summary"]


def test_digits_without_scikit_learn_is_one_line_naming_the_data_extra(tmp_path):
    r = _run(
        f"""
        from second.cli import main
        sys.exit(main(["compare", "--problem", "digits", "--no-plot",
                       "--out-dir", {str(tmp_path)!r}]))
        """
    )
    assert r.returncode == 1
    assert r.stdout.strip().splitlines() == [
        "second: the 'digits' problem needs scikit-learn, which is not installed: "
        "pip install 'second[data]'"
    ]


def test_require_names_the_extra_and_passes_other_import_errors_through(tmp_path, monkeypatch):
    with pytest.raises(
        MissingExtraError,
        match=r"^x needs second_nope, which is not installed: pip install 'second\[plot\]'$",
    ):
        require("second_nope", extra="plot", purpose="x")
    with pytest.raises(ImportError):  # `except ImportError` keeps working
        require("sklearn_nope.datasets", extra="data")
    assert {extra for _, extra in EXTRAS.values()} == {"plot", "data", "progress"}
    # a package that is installed but fails inside (a broken install) is not a missing extra
    (tmp_path / "second_broken_pkg").mkdir()
    (tmp_path / "second_broken_pkg" / "__init__.py").write_text("import second_missing_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("second_broken_pkg", extra="plot")
    assert not isinstance(info.value, MissingExtraError)
    assert info.value.name == "second_missing_dep"


def test_plot_history_without_matplotlib_names_the_plot_extra():
    r = _run(
        """
        import torch
        from second.optim import minimize, plot_history
        res = minimize(lambda x: (x ** 4).sum(), torch.ones(2, dtype=torch.float64))
        try:
            plot_history({"newton-cg": res})
        except ImportError as err:
            print(type(err).__name__, err)
        """
    )
    assert r.returncode == 0, r.stdout
    assert r.stdout.splitlines()[-1] == (
        "MissingExtraError plot_history needs matplotlib, which is not installed: "
        "pip install 'second[plot]'"
    )
