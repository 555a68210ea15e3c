"""What determines an influence result, as data a digest can be taken of.

An influence score depends on the loss function, the code of the forward pass, the
:class:`~second.Task` (how a batch is run, its loss and the measurement), every parameter
(trainable or frozen) and every buffer, besides the data and the settings.
:func:`setup_description` describes the first three without tensors' values, in a form
that is the same in every process (memory addresses stripped); :func:`state_tensors`
lists the last. The cache key and the in-process staleness check digest both.

What a description cannot see: module-level globals and helper functions called from a
``forward``, a loss function or a task's methods. Pass ``Influence(..., version=...)``
when those change.
"""

from __future__ import annotations

import functools
import re
import types

from torch import Tensor, nn

__all__ = ["setup_description", "state_tensors", "describe", "describe_task"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SIMPLE = (bool, int, float, str, bytes, type(None))
_MAX_DEPTH = 4


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.lru_cache(maxsize=4096)
def _code(code: types.CodeType) -> tuple:
    """Bytecode, names and constants of a code object (nested code objects included)."""
    consts = tuple(_code(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return (
        code.co_qualname if hasattr(code, "co_qualname") else code.co_name,
        code.co_code,
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        consts,
    )


def _code_of(fn) -> tuple | None:
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    return _code(code) if isinstance(code, types.CodeType) else None


def _simple_attributes(obj) -> dict:
    """The attributes of ``obj`` holding plain values (numbers, strings, tuples of them)."""
    out = {}
    for k, v in sorted(vars(obj).items()):
        if isinstance(v, _SIMPLE) or (
            isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v)
        ):
            out[k] = v
    return out


def _module_tree(model: nn.Module) -> list:
    """Every submodule: name, class, ``extra_repr``, plain attributes, forward code, hooks."""
    rows = []
    for name, m in model.named_modules(remove_duplicate=False):
        hooks = [_code_of(h) for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values()]
        rows.append(
            [
                name,
                _qualname(type(m)),
                _ADDRESS.sub("", m.extra_repr()),
                _simple_attributes(m),
                _code_of(type(m).forward),
                hooks,
            ]
        )
    return rows


def describe(obj, depth: int = 0):
    """A process-independent description of a callable or configuration object.

    Plain values and tensors stand for themselves; an ``nn.Module`` by its module tree and
    its own parameters and buffers; a function by its code, defaults and closure; a
    ``functools.partial`` by its parts; any other object by its class, its ``repr``
    without memory addresses, and its plain attributes.
    """
    if isinstance(obj, (*_SIMPLE, Tensor)):
        return obj
    if depth >= _MAX_DEPTH:
        return _qualname(type(obj))
    d = depth + 1
    if isinstance(obj, (tuple, list)):
        return [describe(x, d) for x in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, d) for k, v in obj.items()}
    if isinstance(obj, nn.Module):
        tensors = [[k, t] for k, t in obj.named_parameters()]
        tensors += [[k, t] for k, t in obj.named_buffers()]
        return ["module", _module_tree(obj), tensors]
    if isinstance(obj, functools.partial):
        return ["partial", describe(obj.func, d), describe(obj.args, d), describe(obj.keywords, d)]
    if isinstance(obj, types.MethodType):
        return ["method", describe(obj.__func__, d), describe(obj.__self__, d)]
    if isinstance(obj, types.FunctionType):
        cells = [c.cell_contents for c in (obj.__closure__ or ()) if _has_contents(c)]
        return [
            "function",
            obj.__module__,
            obj.__qualname__,
            _code_of(obj),
            describe(obj.__defaults__, d),
            describe(obj.__kwdefaults__, d),
            describe(cells, d),
        ]
    attrs = _simple_attributes(obj) if hasattr(obj, "__dict__") else {}
    return ["object", _qualname(type(obj)), _ADDRESS.sub("", repr(obj)), attrs]


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def describe_task(task) -> list:
    """A task's class, its settings (its loss too) and the code of what a subclass defines.

    Every function, static or class method and property defined by the classes between
    ``type(task)`` and :class:`~second.Task` is described by its code, defaults and
    closure (as ``forward`` is), so a changed ``output``, ``loss`` or ``measurement`` of a
    subclass of the same name changes the description.
    """
    from ..data import Task

    if task is None:
        return []
    methods = []
    for cls in type(task).__mro__:
        if cls is Task or cls is object:
            break
        for name, attr in sorted(vars(cls).items()):
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if isinstance(attr, property):
                attr = [attr.fget, attr.fset]
            if isinstance(attr, types.FunctionType) or isinstance(attr, list):
                methods.append([_qualname(cls), name, describe(attr)])
    attrs = {k: describe(v) for k, v in sorted(vars(task).items())}
    return [_qualname(type(task)), attrs, methods]


def setup_description(model: nn.Module, loss_fn, version, task=None) -> list:
    """The loss, the module tree (forward code, modes, hooks), the task and ``version``."""
    modes = [m.training for m in model.modules()]
    return [describe(loss_fn), _module_tree(model), modes, describe(version), describe_task(task)]


def state_tensors(model: nn.Module) -> list:
    """Every parameter (with its ``requires_grad``) and every buffer, by name."""
    rows: list = [[k, p.requires_grad, p] for k, p in model.named_parameters()]
    rows += [[k, b] for k, b in model.named_buffers()]
    return rows
