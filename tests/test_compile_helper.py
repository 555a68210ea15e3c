"""``import second`` leaves the compiler unloaded; ``eager_under_compile`` runs eagerly under it."""

import subprocess
import sys

import torch

from second._compile import eager_under_compile


def test_import_second_does_not_load_the_compiler():
    # torch.compiler.disable at import time loaded torch._dynamo: about a second of every import
    code = "import sys, second, second.optim, second.kfac; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_direct_call_without_the_compiler_loaded_is_the_function_itself():
    calls = []

    def f(x, k=1):
        calls.append(x)
        return x + k

    g = eager_under_compile(f)
    assert g(1, k=2) == 3 and calls == [1]
    assert g.__name__ == "f" and g.__wrapped__ is f  # functools.wraps


def test_under_torch_compile_the_function_runs_eagerly():
    seen = []

    def inner(x):
        seen.append(torch.compiler.is_compiling())
        return x * 2

    eager = eager_under_compile(inner)

    def outer(x, fn):
        return fn(x + 1) - 1

    x = torch.ones(3)
    compiled = torch.compile(outer, backend="eager", fullgraph=False)
    assert torch.equal(compiled(x, eager), torch.full((3,), 3.0))
    assert seen == [False]  # run eagerly, outside the traced graph
    seen.clear()
    torch._dynamo.reset()
    assert torch.equal(torch.compile(outer, backend="eager")(x, inner), torch.full((3,), 3.0))
    assert seen and all(seen)  # the plain function is traced (it reads True while tracing)
