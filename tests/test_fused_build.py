"""Building the fused CPU kernel never hangs and never fails with a bare toolchain error.

The kernel is built on first use (kintsugi_optim/_kernels/fused_cpu.py). A compiler that is there but fails,
and a lock file left behind by a build that was killed, must end in a clear RuntimeError for
``fused=True`` and in a warning and the foreach step for the default path. Each build runs in a
fresh interpreter with its own extensions directory and a "compiler" that only fails, so no test
compiles anything. ``python -m kintsugi_optim build`` builds it ahead of time (or finds it
cached) and says where; with a broken toolchain it exits with 1 and the cause.
"""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import kintsugi_optim._kernels.fused_cpu as fused
from kintsugi_optim import KintsugiOptimizer

REPO = Path(__file__).resolve().parents[1]


def run_build(tmp_path, script, *, stale_lock=False):
    """Run ``script`` in a fresh interpreter whose C++ compiler fails and whose torch extensions
    directory is empty (but for a killed build's lock file when ``stale_lock``)."""
    compiler = tmp_path / "c++"
    compiler.write_text("#!/bin/sh\necho 'this compiler is broken' >&2\nexit 1\n")
    compiler.chmod(0o755)
    env = dict(os.environ, CXX=str(compiler), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=str(REPO))
    prelude = textwrap.dedent("""
        import torch
        from torch.utils import cpp_extension
        import kintsugi_optim
        import kintsugi_optim._kernels.fused_cpu as fused
        directory = cpp_extension._get_build_directory(
            fused.extension_name("kintsugi_fused_cpu"), verbose=False)
    """)
    if stale_lock:
        prelude += "open(directory + '/lock', 'w').close()  # a build killed half-way\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_broken_compiler_gives_a_clear_error(tmp_path):
    result = run_build(tmp_path, """
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        opt = kintsugi_optim.KintsugiOptimizer([p], fused=True)
        for attempt in range(2):  # the second fails at once, without building again
            try:
                opt.step()
            except RuntimeError as error:
                print("RuntimeError:", error)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert "needs a working C++ compiler" in lines[0]
    assert "CalledProcessError" in lines[0]  # the cause is named, not raised bare
    assert lines[1] == lines[0]


def test_lock_left_by_a_killed_build_does_not_hang(tmp_path):
    # torch.utils.cpp_extension waits for ever on its lock file; killed builds leave it behind.
    result = run_build(tmp_path, """
        try:
            fused._cpu_kernel()
        except RuntimeError as error:
            print("RuntimeError:", error)
    """, stale_lock=True)
    assert result.returncode == 0, result.stderr
    assert "needs a working C++ compiler" in result.stdout


def test_waiting_for_a_live_build_times_out(tmp_path):
    import fcntl

    directory = tmp_path / "build"
    directory.mkdir()
    with open(directory / "kintsugi.flock", "a") as handle:  # another process, building
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="another process has been building"):
            with fused._build_lock(directory, timeout=0.2):
                pass
    with fused._build_lock(directory, timeout=0.2):  # released: acquired at once
        pass


def test_default_path_falls_back_with_one_warning(monkeypatch):
    def broken():
        raise RuntimeError("KintsugiOptimizer(fused=True) on CPU ... the build failed")

    monkeypatch.setattr(fused, "_cpu_kernel", broken)
    monkeypatch.setattr(fused, "_warned", False)
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, generator=g, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    default = KintsugiOptimizer([p], lr=0.1)
    chosen = KintsugiOptimizer([q], lr=0.1, foreach=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            grad = torch.randn(4, 3, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
            default.step()
            chosen.step()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "falls back to its foreach step" in messages[0], messages
    assert torch.equal(p, q)
    assert torch.equal(default.state[p]["phi"], chosen.state[q]["phi"])


def test_build_command_reports_a_broken_toolchain(tmp_path):
    result = run_build(tmp_path, """
        import sys
        from kintsugi_optim.__main__ import main
        sys.exit(main(["build"]))
    """)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    # (torch's CUDA wheels on a machine without CUDA print a line of their own first)
    assert result.stderr.splitlines()[-1].startswith("kintsugi build: error:")
    assert "Traceback" not in result.stderr
    assert "needs a working C++ compiler" in result.stderr
    assert "CalledProcessError" in result.stderr  # the cause is named


def test_build_command_finds_the_cached_kernel():
    fused._cpu_kernel()  # built once per machine, as the fused tests do
    library = next(Path(p) for p in torch.ops.loaded_libraries if "kintsugi_fused_cpu" in p)
    built = library.stat().st_mtime
    result = subprocess.run([sys.executable, "-m", "kintsugi_optim", "build"],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fused CPU kernel found in the cache in ")
    assert result.stdout.strip().endswith(str(library))
    assert library.stat().st_mtime == built  # loaded, not built again


def test_each_copy_of_the_package_builds_its_own_kernel(monkeypatch, tmp_path):
    # torch's build arguments hold csrc's absolute path: two checkouts sharing one extensions
    # cache under one name would rebuild the kernel over each other on every first use
    here = fused.extension_name("kintsugi_fused_cpu")
    assert here.startswith("kintsugi_fused_cpu_")
    assert fused.extension_name("kintsugi_fused_cpu") == here  # stable within a copy
    monkeypatch.setattr(fused, "_CSRC", tmp_path / "csrc")
    assert fused.extension_name("kintsugi_fused_cpu") != here
