"""The CUDA path's Triton kernels, tested without a GPU (used by tests/test_fused.py):

* run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, numpy underneath), which
  checks their logic against the reference;
* compiled for a given GPU architecture down to a cubin, which checks that they compile.

Written against Triton 3.9, whose interpreter it corrects in places (noted where it does).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import os
import types

import numpy as np
import pytest

from helpers import CUDA_FUSED_STEP, CUDA_KERNELS_MODULE, replace_cpu_kernel

_MISSING = object()


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


TRITON = _triton_version()
requires_triton = pytest.mark.skipif(
    TRITON is None or not TRITON.startswith("3.9."),
    reason=f"needs triton 3.9 (pip install 'triton==3.9.*'), found {TRITON}")


@functools.cache
def _interpreted_module():
    """A private copy of ``kintsugi_optim._fused_cuda``, its kernels decorated under
    ``TRITON_INTERPRET=1``; the module itself (imported for CUDA tensors) keeps compiled ones."""
    import triton.language as tl

    assert os.environ.get("TRITON_INTERPRET") == "1"
    origin = importlib.util.find_spec(CUDA_KERNELS_MODULE).origin
    spec = importlib.util.spec_from_file_location("_fused_cuda_interpreted", origin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    # The interpreter has no libdevice: log1p and expm1 to full precision from plain ops
    # (Goldberg's correction of the rounded 1 + x, and its inverse).
    def log1p(x):
        u = 1.0 + x
        exact = u == 1.0
        return tl.where(exact, x, tl.log(u) * x / tl.where(exact, 1.0, u - 1.0))

    def expm1(x):
        u = tl.exp(x)
        exact = u == 1.0
        ratio = (u - 1.0) * x / tl.where(exact | (u == 0.0), 1.0, tl.log(u))
        return tl.where(exact, x, tl.where(u == 0.0, -1.0, ratio))

    module.libdevice = types.SimpleNamespace(log1p=log1p, expm1=expm1)
    return module


def use_interpreted_cuda_kernels(monkeypatch):
    """For the duration of one test, CPU tensors' fused steps go to ``fused_sculpt_cuda`` with
    interpreted kernels, in place of the C++ kernel."""
    step = _interpreted_cuda_step(monkeypatch)
    replace_cpu_kernel(monkeypatch, lambda: step)


def _interpreted_cuda_step(monkeypatch):
    """``fused_sculpt_cuda`` with interpreted kernels, for the duration of one test."""
    # Imported before TRITON_INTERPRET is set, so that triton.language's own jit functions
    # (tl.sum, its combine functions, ...) are compiled ones, as the rest of the process expects;
    # they are interpreted below for the duration of the test only.
    import triton.language as tl
    import triton.language.standard
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder
    from triton.runtime.jit import JITFunction, _normalize_ty

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when kernels are decorated and launched
    for module in (tl, triton.language.standard):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                monkeypatch.setattr(module, name, InterpretedFunction(value.fn))

    binary_op = InterpreterBuilder.binary_op

    def typed_binary_op(self, lhs, rhs, op):
        # Triton 3.9's interpreter labels a comparison's result with its operands' dtype, so a
        # scalar mask broadcast against a block (`(offs < n) & live`) becomes float data.
        out = binary_op(self, lhs, rhs, op)
        if out.data.dtype == np.bool_:
            out.dtype = tl.int1
        return out

    monkeypatch.setattr(InterpreterBuilder, "binary_op", typed_binary_op)

    # Compiled, a float argument annotated tl.float64 is passed as a double, any other as a
    # float; the interpreter ignores annotations and treats every float as a float32 constant.
    # Annotated ones are marked on the way in and made float64 scalars.
    grid_call, implicit_cvt = interpreter.GridExecutor.__call__, interpreter._implicit_cvt

    class Double(float):
        pass

    def annotated_call(self, *args, **kwargs):
        hints = inspect.get_annotations(self.fn)

        def mark(name, value):
            double = name in hints and _normalize_ty(hints[name]) == "fp64"
            return Double(value) if double and isinstance(value, float) else value

        names = inspect.signature(self.fn).parameters
        args = [mark(name, value) for name, value in zip(names, args)]
        return grid_call(self, *args, **{name: mark(name, value) for name, value in kwargs.items()})

    def double_cvt(arg):
        if isinstance(arg, Double):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], np.float64), tl.float64),
                             tl.float64)
        return implicit_cvt(arg)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", annotated_call)
    monkeypatch.setattr(interpreter, "_implicit_cvt", double_cvt)
    # The interpreter patches triton.language for each jit function it runs, but restores
    # only a kernel's own patches, not those of the functions it calls: what it patches is
    # noted here, and put back after each step, so compiled Triton works again afterwards.
    set_attr, patched = interpreter._LangPatchScope.set_attr, {}

    def noting_set_attr(self, obj, name, value):
        patched.setdefault((id(obj), name), (obj, name, vars(obj).get(name, _MISSING)))
        set_attr(self, obj, name, value)

    monkeypatch.setattr(interpreter._LangPatchScope, "set_attr", noting_set_attr)
    step = getattr(_interpreted_module(), CUDA_FUSED_STEP)

    def interpreted_step(*args, **kwargs):
        try:
            with np.errstate(all="ignore"):  # IEEE arithmetic on NaN/inf, silent as on a GPU
                return step(*args, **kwargs)
        finally:
            for obj, name, original in patched.values():
                if original is _MISSING:  # not in obj's own namespace: remove what was set
                    if name in vars(obj):
                        delattr(obj, name)
                else:
                    setattr(obj, name, original)
            patched.clear()

    return interpreted_step


def compile_only(monkeypatch, arch: int = 90):
    """Send CPU tensors' fused steps to the CUDA path, whose kernels then compile (Triton → PTX
    → cubin, with the ptxas that triton ships) for an sm_``arch`` GPU instead of launching: every
    host step of ``fused_sculpt_cuda`` runs, and each launch only compiles. Returns the list the
    compiled kernels are appended to, as (name, CompiledKernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    fused_cuda = importlib.import_module(CUDA_KERNELS_MODULE)
    replace_cpu_kernel(monkeypatch, lambda: getattr(fused_cuda, CUDA_FUSED_STEP))

    class NoDevice:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    monkeypatch.setattr(driver, "_active", NoDevice())
    compiled = []
    for name, kernel in vars(fused_cuda).items():
        if isinstance(kernel, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):

            def run(*args, grid, warmup, kernel=kernel, name=name, **kwargs):
                binary = type(kernel).run(kernel, *args, grid=grid, warmup=True, **kwargs)
                compiled.append((name, binary))

            monkeypatch.setattr(kernel, "run", run)
    return compiled
