"""One switch for progress bars: call > set_progress > SECOND_PROGRESS > is stderr a terminal."""

from __future__ import annotations

import io

import pytest

from second._progress import progress, progress_enabled, set_progress


class _TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _automatic(monkeypatch):
    monkeypatch.delenv("SECOND_PROGRESS", raising=False)
    set_progress(None)
    yield
    set_progress(None)


def test_quiet_when_not_interactive_and_on_at_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_enabled() is False
    items = [1, 2, 3]
    assert progress(items, desc="x") is items  # no wrapper at all
    monkeypatch.setattr("sys.stderr", _TTY())
    assert progress_enabled() is True


@pytest.mark.parametrize(
    "value, expected", [("0", False), ("off", False), ("1", True), ("ON", True)]
)
def test_environment_variable(monkeypatch, value, expected):
    monkeypatch.setattr("sys.stderr", _TTY() if not expected else io.StringIO())
    monkeypatch.setenv("SECOND_PROGRESS", value)
    assert progress_enabled() is expected


def test_environment_variable_with_a_wrong_word_is_an_error(monkeypatch):
    monkeypatch.setenv("SECOND_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="SECOND_PROGRESS='sometimes'"):
        progress_enabled()
    with pytest.raises(ValueError) as info:  # regression: yes and no were not listed
        progress_enabled()
    listed = set(str(info.value).split(":", 1)[1].replace(",", " ").split())
    assert {"0", "1", "true", "false", "yes", "no", "on", "off"} <= listed


def test_precedence_call_then_switch_then_environment(monkeypatch):
    monkeypatch.setenv("SECOND_PROGRESS", "1")
    set_progress(False)
    assert progress_enabled() is False  # the switch beats the environment
    assert progress_enabled(True) is True  # the call beats the switch
    set_progress(True)
    monkeypatch.setenv("SECOND_PROGRESS", "0")
    assert progress_enabled() is True
    assert progress_enabled(False) is False
    with pytest.raises(TypeError):
        set_progress("yes")


def test_bar_has_a_total_and_yields_the_same_items(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = progress(range(7), desc="eigsh", unit="matvec", enabled=True)
    assert bar.total == 7  # from len()
    assert list(bar) == list(range(7))
    gen = (i for i in range(4))
    bar = progress(gen, total=4, desc="batches", enabled=True)
    assert bar.total == 4 and list(bar) == [0, 1, 2, 3]
    assert "eigsh:" in err.getvalue() and "/7 " in err.getvalue()  # the total is shown
