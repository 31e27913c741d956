"""The fused Sculptor step: ``KintsugiOptimizer(fused=True)``, and on the CPU the default step.

One param group's whole step (docs/maths.md §2.3) — θ moved by the base rule scaled by ϕ, the fracture
signal, ϕ gilded — in as few passes over memory as the maths allows:

* **CPU**: a C++ kernel (``csrc/fused_sculpt.cpp``, ``at::vec`` + ``at::parallel_for``), built
  on first use with ``torch.utils.cpp_extension.load`` and cached in the torch extensions
  directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). The one-off
  build takes about 15 s on two cores (47 s on a busy machine) and needs a C++ compiler and
  ninja; nothing is fetched. A build that fails raises a RuntimeError naming the cause for
  ``fused=True``; the default step warns once and takes the foreach path instead.
* **CUDA**: Triton kernels (:mod:`kintsugi_optim._fused_cuda`), imported only when a CUDA
  tensor is stepped, so CPU-only installs need no triton.

Every configuration runs fused: all bases and options, the three pathways, both fractures,
ascents, positivities and normalisations, float32/float64/bfloat16/float16 parameters.
(Complex parameters step as their real view through the functional API; the optimizer, like
torch's fused optimizers, refuses them with ``fused=True``.) Like torch's fused Adam it honours ``GradScaler``:
gradients are divided by ``grad_scale`` (and stored back unscaled) and, when ``found_inf`` is
set, nothing changes — θ, ϕ, moments, step counts — without a host sync.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from kintsugi_optim._compat import _debug_has_internal_overlap
from kintsugi_optim._kernels import StepLists
from kintsugi_optim.options import SculptOptions

__all__ = ["cpu_kernel_available", "fused_sculpt", "kernel_keywords", "unsupported"]

_CSRC = Path(__file__).parent.parent / "csrc"

# Compiler flags of torch's own kernels for each CPU capability it dispatches to
# (cmake/Codegen.cmake), with the CPU_CAPABILITY macros that select at::vec's vector width.
# The capability is part of the extension's name, so a cache shared by machines of different
# capabilities keeps one build per capability: unlike -march=native, a cached build never
# runs on a CPU that lacks its instructions.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}

_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# How long a step waits for another process's build of the kernel (one build takes 15-50 s on
# two cores) before it gives up with a clear message instead of hanging.
_BUILD_WAIT_S = 600.0


@contextlib.contextmanager
def _build_lock(directory: Path, timeout: float):
    """Hold an exclusive ``flock`` on ``directory/kintsugi.flock`` while building.

    Unlike the lock *file* of ``torch.utils.cpp_extension`` (created, then deleted when its build
    ends), an flock is released by the OS when its process dies: a build killed half-way leaves
    nothing that makes later processes wait. Without fcntl (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "kintsugi.flock", "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process has been building the fused kernel in {directory} for "
                        f"over {timeout:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    # "DEFAULT": at::vec's portable implementation (also NEON on arm64)
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def extension_name(name: str) -> str:
    """``<name>_<capability>_<checkout>``: the name, and so the build directory, of this
    package copy's build of extension ``name``.

    torch's build arguments hold the absolute path of ``csrc``, so two copies of the package
    (two clones, two virtual environments) sharing one extensions cache would each rebuild the
    kernel over the other's on every first use; a digest of that path keeps one build per copy.
    """
    checkout = hashlib.sha256(str(_CSRC.resolve()).encode()).hexdigest()[:8]
    return f"{name}_{_capability().lower()}_{checkout}"


def _build(name: str, source: Path, *, timeout: float | None = None) -> None:
    """Build (or load from the torch extensions cache) the C++ source ``source``, which includes
    csrc/sculpt_math.h, as the extension ``extension_name(name)``, with the flags torch's own
    kernels get for this CPU.

    Raises whatever the build raises (``RuntimeError``, ``OSError``,
    ``subprocess.CalledProcessError`` from a compiler that is there but fails), or
    ``TimeoutError`` after ``timeout`` seconds (default ``_BUILD_WAIT_S``) waiting for another
    process's build.
    """
    from torch.utils import cpp_extension

    capability = _capability()
    full_name = extension_name(name)
    directory = Path(cpp_extension._get_build_directory(full_name, verbose=False))
    with _build_lock(directory, _BUILD_WAIT_S if timeout is None else timeout):
        # Every build of this extension from this package holds the flock, so a lock file
        # torch left here now belongs to a build that was killed: torch would wait on it
        # for ever.
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=full_name,
            sources=[str(source)],
            extra_include_paths=[str(_CSRC)],
            extra_cflags=[
                "-O3", "-fopenmp", *_ISA_FLAGS.get(capability, []),
                f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
            ],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
        )


_kernel_error: Exception | None = None
_kernel = None  # the op, once found: looking it up in torch.ops costs more than a small step
_warned = False


def _cpu_kernel():
    """``torch.ops.kintsugi.fused_sculpt_``, building the C++ extension on first use.

    A build that fails is not retried in this process: every later call raises the same
    RuntimeError at once.
    """
    global _kernel_error, _kernel
    if _kernel is not None:
        return _kernel
    if _kernel_error is not None:
        raise RuntimeError(str(_kernel_error)) from _kernel_error
    if not hasattr(torch.ops.kintsugi, "fused_sculpt_"):
        try:
            _build("kintsugi_fused_cpu", _CSRC / "fused_sculpt.cpp")
        except Exception as error:  # noqa: BLE001 - any failure of the toolchain or the cache
            _kernel_error = RuntimeError(
                "KintsugiOptimizer(fused=True) on CPU builds its C++ kernel on first use, which "
                "needs a working C++ compiler and ninja (pip install ninja); the build failed "
                f"with {type(error).__name__}: {error}")
            raise _kernel_error from error
    _kernel = torch.ops.kintsugi.fused_sculpt_
    return _kernel


def cpu_kernel_available(warn: bool = True) -> bool:
    """Whether the fused CPU kernel is built (building it now if need be). A failure returns
    False, with one warning per process when ``warn``: the default path falls back to the
    foreach step."""
    global _warned
    try:
        _cpu_kernel()
        return True
    except RuntimeError as error:
        if warn and not _warned:
            _warned = True
            warnings.warn(f"{error}. KintsugiOptimizer falls back to its foreach step; pass "
                          "foreach=True to choose it and silence this warning", stacklevel=4)
        return False


def _real(t: Tensor | None) -> Tensor | None:
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


# What the kernels implement: every other (rule, pathway) is refused by name. Options: all of
# each rule's, every gilding option; not differentiable, sparse or complex-from-the-optimizer.
SUPPORTED_RULES = ("sgd", "adam", "adamw")
SUPPORTED_PATHWAYS = ("element", "row", "tensor")


def unsupported(options: SculptOptions) -> str | None:
    """Why the fused kernels cannot run ``options`` (None when they can)."""
    if options.base not in SUPPORTED_RULES or options.pathway not in SUPPORTED_PATHWAYS:
        return (f"KintsugiOptimizer(fused=True) has no kernel for base={options.base!r} with "
                f"pathway={options.pathway!r} (supported: base in {SUPPORTED_RULES}, pathway in "
                f"{SUPPORTED_PATHWAYS}); use foreach=True")
    if options.differentiable:
        return "`fused` does not support `differentiable`"
    return None


_last_keywords: tuple[SculptOptions | None, dict] = (None, {})


def kernel_keywords(options: SculptOptions) -> dict:
    """The options as the kernels' schema spells them (``torch.ops.kintsugi.fused_sculpt_`` and
    ``fused_sculpt_cuda`` take the same keywords), all but ``lr``. The Sculptor builds one
    options object per group and keeps it while the group is unchanged: its keywords are
    remembered."""
    global _last_keywords
    if _last_keywords[0] is options:
        return _last_keywords[1]
    g = options.gilding
    keywords = dict(
        base=options.base, beta1=options.beta1, beta2=options.beta2, eps=options.eps,
        amsgrad=options.amsgrad, momentum=options.momentum, dampening=options.dampening,
        nesterov=options.nesterov, weight_decay=options.weight_decay, maximize=options.maximize,
        pathway=g.pathway, relative=g.fracture == "relative", beta=g.beta, gamma=g.gamma,
        l1=g.l1, phi_min=g.phi_min, phi_max=g.phi_max, norm_mean=g.phi_norm == "mean",
        multiplicative=g.ascent == "multiplicative", softplus=g.positivity == "softplus",
    )
    _last_keywords = (options, keywords)
    return keywords


def fused_sculpt(
    lists: StepLists,
    options: SculptOptions,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """The fused Sculptor step over one param group, in place (see
    :func:`kintsugi_optim.functional.sculpt`; ``None`` momentum buffers are created and stored
    back into ``lists.momentum_buffers``).

    ``grad_scale`` and ``found_inf`` are GradScaler's one-element float tensors on the
    parameters' device. ``capturable`` needs nothing extra: neither kernel syncs with the host.

    Raises:
        RuntimeError: a (rule, pathway) without a kernel, ``differentiable=True``; parameters
            on a device other than CPU or CUDA, or of a dtype other than float32/64, bfloat16,
            float16 (or their complex forms); CUDA without triton; the tensor pathway with one
            group spread over several devices.
    """
    params, grads, phis, rhos = lists.params, lists.grads, lists.phis, lists.rhos
    exp_avgs, exp_avg_sqs = lists.exp_avgs, lists.exp_avg_sqs
    max_exp_avg_sqs, momentum_buffers = lists.max_exp_avg_sqs, lists.momentum_buffers
    state_steps, lr, pathway = lists.state_steps, options.lr, options.pathway
    base, momentum = options.base, options.momentum
    if not params:
        return
    reason = unsupported(options)
    if reason is not None:
        raise RuntimeError(reason)
    devices = {p.device for p in params}
    for device in devices:
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(
                f"KintsugiOptimizer(fused=True) runs on CPU and CUDA tensors, got a parameter on "
                f"{device}; use foreach=True there"
            )
    for p in params:
        if p.dtype not in _FUSED_DTYPES and not p.is_complex():
            raise RuntimeError(
                f"KintsugiOptimizer(fused=True) supports float32, float64, bfloat16 and float16 "
                f"parameters, got {p.dtype}"
            )
    if pathway == "tensor" and len(devices) > 1:
        raise RuntimeError(
            "KintsugiOptimizer(fused=True, pathway='tensor') normalises ϕ over the param group, "
            f"which spans {sorted(map(str, devices))}: put each device's parameters in a group"
        )

    if found_inf is not None and found_inf.device.type == "cpu" and found_inf.item():
        return  # GradScaler skips this step (reading a CPU flag is no device sync)

    # SGD's momentum buffers are born on the first step, holding that step's gradient. They are
    # zeros until then: should GradScaler skip that first step on CUDA (the kernel cannot tell
    # the host), the next step's buf = momentum·0 + (1 − dampening)·g is then still g with the
    # default dampening=0.
    fresh_momentum: list[bool] = []
    buffers: list[Tensor] = []
    if base == "sgd" and momentum != 0:
        fresh_momentum = [b is None for b in momentum_buffers]
        for i, buf in enumerate(momentum_buffers):
            if buf is None:
                momentum_buffers[i] = torch.zeros_like(params[i], memory_format=torch.preserve_format)
        buffers = list(momentum_buffers)
    # A gradient whose elements share memory (``expand``ed, stride 0) steps as a dense copy:
    # the kernels write the unscaled gradient back, which such a tensor cannot take. (Under
    # GradScaler its .grad then keeps the scale, as after any step that is not unscale_'s.)
    grads = [g.contiguous() if _has_internal_overlap(g) else g for g in grads]
    # A parameter listed more than once steps once per listing, as torch's fused Adam does:
    # rounds that each hold a parameter at most once, so no two threads write the same θ.
    # (Under pathway="tensor" the repeats of a round are then gilded as a scope of their own.)
    rounds = _rounds(params)
    repeats = _repeats(params) if len(rounds) > 1 else {}
    state = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, buffers]
    if any(p.is_complex() for p in params):  # every real component is a pathway
        state = [[_real(t) for t in tensors] for tensors in state]
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, buffers = state

    keywords = kernel_keywords(options)
    kernel_lists = (params, grads, phis, rhos or [], exp_avgs, exp_avg_sqs, max_exp_avg_sqs, buffers,
             fresh_momentum, state_steps)
    for device in devices:
        for round_index, members in enumerate(rounds):
            if len(devices) == 1 and len(rounds) == 1:
                device_lists = kernel_lists
            else:
                keep = [i for i in members if params[i].device == device]
                if not keep:
                    continue
                device_lists = tuple([t[i] for i in keep] if t else t for t in kernel_lists)
                if base != "sgd":
                    _count_repeats_(state_steps, keep, repeats, round_index, found_inf)
            # A repeated gradient is unscaled in place by the first round only.
            scale = grad_scale if round_index == 0 else None
            if device.type == "cpu":
                _cpu_kernel()(
                    *device_lists, scale, found_inf,
                    lr=lr.item() if isinstance(lr, Tensor) else lr, **keywords,
                )
            else:
                try:
                    from kintsugi_optim._fused_cuda import fused_sculpt_cuda
                except ImportError as error:
                    raise RuntimeError(
                        "KintsugiOptimizer(fused=True) on CUDA runs Triton kernels: pip install "
                        "triton"
                    ) from error
                fused_sculpt_cuda(*device_lists, scale, found_inf, lr=lr, **keywords)


def _has_internal_overlap(t: Tensor) -> bool:
    # torch's MemOverlap::Yes (1): some elements share memory; 2 ("too hard") is dense enough
    # for the kernels' copies.
    return 0 in t.stride() and t.numel() > 1 and _debug_has_internal_overlap(t) == 1


def _rounds(params: list[Tensor]) -> list[list[int]]:
    """Indices of ``params`` in rounds: the k-th listing of each tensor in round k."""
    if len(set(map(id, params))) == len(params):
        return [list(range(len(params)))]
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        k = seen[id(p)] = seen.get(id(p), -1) + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    return rounds


def _repeats(params: list[Tensor]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for p in params:
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {i: counts[id(p)] for i, p in enumerate(params) if counts[id(p)] > 1}


def _count_repeats_(
    state_steps: list[Tensor], keep: list[int], repeats: dict[int, int], round_index: int,
    found_inf: Tensor | None,
) -> None:
    """torch's fused and foreach Adam add 1 to a parameter's step once per listing, then step
    every listing with the final count t + c. The kernels add 1 and step with it, so a step
    listed c times is set to t + c − 1 before each round."""
    for i in keep:
        c = repeats.get(i)
        if c is not None:
            delta = c - 1 if round_index == 0 else -1
            if found_inf is None:
                state_steps[i].add_(delta)
            else:  # a skipped step leaves the count alone, decided on the device
                step = state_steps[i]
                step.add_((found_inf.to(step.device) == 0).to(step.dtype) * delta)
