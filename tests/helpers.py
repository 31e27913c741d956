"""Helpers shared by the test modules (a support module, as conftest.py and optim_db.py are).

* seeded parameters and gradients (:func:`make_params`, :func:`grads_for`, :func:`grad_stream`),
  a run of steps (:func:`run_steps`), a small model with data (:func:`model_and_data`,
  :func:`train`);
* the comparisons the parity tests make (:func:`assert_same_run`, :func:`assert_same_state_dict`,
  :func:`assert_bitwise`);
* skip marks (:data:`requires_cuda`, :func:`requires_torch`);
* every reach into kintsugi_optim's internals that a test needs (the β = 0 shortcut, the fused
  kernel and its dispatch, the CPU foreach path's runs and host reads, the functional step),
  kept here so that a refactor of the library's internals is met in one place.

Nothing here imports a test module or tests/optim_db.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from kintsugi_optim import KintsugiOptimizer

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def requires_torch(version: str, why: str):
    """Skip on a torch older than ``version``: CI also runs the suite on the oldest torch that
    pyproject.toml accepts, where these features are not claimed (docs/maths.md §4)."""
    return pytest.mark.skipif(torch.__version__ < version, reason=f"needs torch>={version}: {why}")


# -- parameters, gradients, runs --------------------------------------------------------------

# A weight, a bias, a 0-d scalar, a conv-like weight and a row of one element.
SHAPES = [(6, 5), (6,), (), (3, 2, 2), (1, 7)]
_DRAWN_AS_IS = (torch.float64, torch.complex64, torch.complex128)


def randn(shape, *, generator: torch.Generator, dtype=torch.float32, device="cpu",
          draw=None) -> torch.Tensor:
    """``torch.randn`` in ``dtype`` for float32/float64/complex; other dtypes (bf16, fp16) get
    float32 draws rounded, so a half tensor holds the float32 run's numbers, rounded. ``draw``:
    the dtype drawn in instead (float64: every dtype holds one float64 stream's numbers)."""
    if draw is None:
        draw = dtype if dtype in _DRAWN_AS_IS else torch.float32
    return torch.randn(shape, generator=generator, dtype=draw).to(device=device, dtype=dtype)


def make_params(shapes: Sequence[tuple[int, ...]] = SHAPES, *, dtype=torch.float32, seed=0,
                device="cpu", draw=None) -> list[torch.Tensor]:
    """Leaf tensors (``requires_grad``) of ``shapes`` drawn from one generator seeded ``seed``
    (in ``draw``, as :func:`randn` takes it); ``dtype`` may be a list, one per shape."""
    g = torch.Generator().manual_seed(seed)
    dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * len(shapes)
    return [randn(s, generator=g, dtype=d, device=device, draw=draw).requires_grad_()
            for s, d in zip(shapes, dtypes, strict=True)]


def clone_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def grads_for(params: Sequence[torch.Tensor], step: int, *, seed=100, scale=1.0) -> list[torch.Tensor]:
    """Gradients for ``step``: from a generator seeded ``seed + step``, one per parameter in its
    dtype and on its device, times ``scale``; the same for any run over equal shapes."""
    g = torch.Generator().manual_seed(seed + step)
    return [scale * randn(p.shape, generator=g, dtype=p.dtype, device=p.device) for p in params]


GradsFn = Callable[[Sequence[torch.Tensor], int], Sequence[torch.Tensor]]


def grad_stream(*, seed=1, draw=torch.float64) -> GradsFn:
    """A :data:`GradsFn` drawing from one generator seeded ``seed``, call after call (``step``
    is not read): each call continues the stream, in ``draw`` rounded to each parameter's dtype,
    so runs over float32, float64 and bf16 parameters see one sequence of numbers."""
    g = torch.Generator().manual_seed(seed)
    return lambda params, step: [randn(p.shape, generator=g, dtype=p.dtype, device=p.device,
                                       draw=draw) for p in params]


def set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Each parameter's ``.grad``: a copy of its gradient in its dtype."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(p.dtype).clone()


def run_steps(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], steps: int, *,
              grads: GradsFn = grads_for, start=0) -> torch.optim.Optimizer:
    """``steps`` steps of ``opt``, each after setting ``grads(params, step)`` as the gradients."""
    for step in range(start, start + steps):
        set_grads(params, grads(params, step))
        opt.step()
    return opt


def run_side_by_side(make_a: Callable, make_b: Callable, params: Sequence[torch.Tensor], steps: int,
                     *, grads: GradsFn = grads_for):
    """Two optimizers, each over its own copy of ``params``, stepped on the same gradients;
    returns ``(params_a, opt_a, params_b, opt_b)`` for :func:`assert_same_run`."""
    params_a, params_b = clone_params(params), clone_params(params)
    opt_a, opt_b = make_a(params_a), make_b(params_b)
    for step in range(steps):
        for p, q, g in zip(params_a, params_b, grads(params_a, step)):
            p.grad, q.grad = g.to(p.dtype).clone(), g.to(q.dtype).clone()
        opt_a.step()
        opt_b.step()
    return params_a, opt_a, params_b, opt_b


def assert_same_run(params_a, opt_a, params_b, opt_b, *, rtol=0.0, atol=0.0, equal_nan=False,
                    state=True) -> None:
    """θ of the two runs, and (``state``) every state tensor both optimizers hold for each
    parameter, agree: bitwise by default, else within ``rtol``/``atol``. With ``state=True``
    both must hold the same state keys; ``state="shared"`` compares the keys both hold (a
    Sculptor against torch's optimizer, which has no ϕ)."""
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=rtol, atol=atol,
                                   equal_nan=equal_nan, msg=lambda m: f"param {i}: {m}")
        if not state:
            continue
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        keys = state_a.keys() & state_b.keys()
        if state is True:
            assert state_a.keys() == state_b.keys(), i
        for key in sorted(keys):
            value_a, value_b = torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key])
            torch.testing.assert_close(value_b.to(value_a.device), value_a, rtol=rtol, atol=atol,
                                       equal_nan=equal_nan,
                                       msg=lambda m: f"param {i}: state {key!r}: {m}")


def assert_bitwise(xs, ys) -> None:
    """Two sequences of tensors, pair by pair, bitwise equal (dtype and shape included)."""
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=lambda m: f"tensor {i}: {m}")


def assert_same_state_dict(a: dict, b: dict) -> None:
    """Two ``state_dict()``s hold the same groups and bitwise the same state."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k, state in a["state"].items():
        assert state.keys() == b["state"][k].keys()
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][k][name])), name


def snapshot(params: Sequence[torch.Tensor], opt: torch.optim.Optimizer):
    """Copies of θ and of the optimizer's ``state_dict()``, for :func:`assert_same_snapshot`."""
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_same_snapshot(a, b) -> None:
    """Two :func:`snapshot`s hold bitwise the same θ, groups and state."""
    for p, q in zip(a[0], b[0], strict=True):
        assert torch.equal(p, q)
    assert_same_state_dict(a[1], b[1])


def assert_phi_finite_and_positive(phis) -> None:
    for phi in phis:
        assert torch.isfinite(phi).all() and (phi > 0).all(), phi


def make_model(*, sizes=(5, 4, 3), dtype=torch.float32, seed=0, device="cpu") -> nn.Module:
    """A Linear–Tanh–Linear classifier of ``sizes``, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(),
                         nn.Linear(sizes[1], sizes[2])).to(device=device, dtype=dtype)


def make_batch(*, sizes=(5, 4, 3), batch=16, dtype=torch.float32, seed=1, device="cpu"):
    """Inputs [batch, sizes[0]] and class labels [batch] for :func:`make_model`'s classifier."""
    g = torch.Generator().manual_seed(seed)
    x = randn((batch, sizes[0]), generator=g, dtype=dtype, device=device)
    y = torch.randint(0, sizes[-1], (batch,), generator=g).to(device)
    return x, y


def model_and_data(*, dtype=torch.float32, seed=0, sizes=(5, 4, 3), batch=16, data_seed=1,
                   device="cpu"):
    """:func:`make_model` and a :func:`make_batch` for it: ``(model, x, y)``."""
    model = make_model(sizes=sizes, dtype=dtype, seed=seed, device=device)
    return (model, *make_batch(sizes=sizes, batch=batch, dtype=dtype, seed=data_seed,
                               device=device))


def loss_of(model, x, y) -> torch.Tensor:
    """Cross-entropy of the model on (x, y); half logits are taken in float32."""
    logits = model(x)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return nn.functional.cross_entropy(logits, y)


def train(model, opt, x, y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


# -- the library's internals, reached from here only ------------------------------------------


def gilding_machinery_at_beta_zero(monkeypatch, on: bool = True) -> None:
    """``on``: a step with β = 0 and ϕ ≡ 1 goes through the Sculptor's own paths instead of
    the shortcut to torch's functional optimizer that it normally takes."""
    import kintsugi_optim.sculptor

    monkeypatch.setattr(kintsugi_optim.sculptor, "_BETA_ZERO_SHORTCUT", not on)


def cpu_kernel():
    """The fused CPU kernel (built, or loaded from the cache)."""
    from kintsugi_optim._kernels.fused_cpu import _cpu_kernel

    return _cpu_kernel()


def replace_cpu_kernel(monkeypatch, kernel_for: Callable[[], Any]) -> None:
    """CPU tensors' fused steps call ``kernel_for()`` for their kernel."""
    from kintsugi_optim._kernels import fused_cpu

    monkeypatch.setattr(fused_cpu, "_cpu_kernel", kernel_for)


# The CUDA path's Triton kernels (tests/triton_interpreter.py runs or compiles them on the CPU).
CUDA_KERNELS_MODULE = "kintsugi_optim._fused_cuda"
CUDA_FUSED_STEP = "fused_sculpt_cuda"


def foreach_cpu_paths(monkeypatch, *, run_bytes: int | None = None, host_reads: bool = True) -> None:
    """The CPU foreach path's shortcuts: ``run_bytes`` sets the size of the cache-sized runs it
    steps tensors in; ``host_reads=False`` takes an accelerator's path (no per-tensor sums read
    back to the host)."""
    from kintsugi_optim._kernels import host

    if run_bytes is not None:
        monkeypatch.setattr(host, "_CPU_RUN_BYTES", run_bytes)
    if not host_reads:
        monkeypatch.setattr(host, "_cpu_eager", lambda tensors: False)


def sculptor_defaults() -> dict[str, Any]:
    """The Sculptor's default hyperparameters, as an optimizer built with none shows them."""
    return dict(KintsugiOptimizer([torch.zeros(1, requires_grad=True)]).defaults)


# The functional step's options for Adam over the element pathway, as sculpt() takes them.
FUNCTIONAL_OPTIONS = dict(
    base="adam", lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False, momentum=0.0,
    dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False, capturable=False,
    differentiable=False, pathway="element", fracture="relative", beta=0.1, gamma=0.0, l1=0.0,
    phi_min=1e-3, phi_max=None, phi_norm="mean", ascent="additive", positivity="clamp",
)


def functional_sculpt(p, g, *, phi_dtype=None, foreach=False, fused=None, **options):
    """One step of ``kintsugi_optim.functional.sculpt`` (Adam state) on one parameter; returns
    (p, ϕ, exp_avg, exp_avg_sq) after it."""
    from kintsugi_optim import functional

    # new_phi gives a complex p the real view's shape; others get ϕ of their own dtype
    phi = (functional.new_phi(p, "element", 1.0) if p.is_complex()
           else torch.ones_like(p, dtype=phi_dtype))
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    functional.sculpt([p], [g], [phi], None, [m], [v], [], [None], [torch.zeros(())],
                      foreach=foreach, fused=fused, **{**FUNCTIONAL_OPTIONS, **options})
    return p, phi, m, v


def fused_kernel_step(kernel, params, grads, states, grad_scale, found_inf, **options) -> None:
    """Call a fused kernel directly on Adam state dicts (``states``: one per parameter)."""
    kernel(params, grads, [s["phi"] for s in states], [], [s["exp_avg"] for s in states],
           [s["exp_avg_sq"] for s in states], [], [], [], [s["step"] for s in states],
           grad_scale, found_inf,
           **{**dict(base="adam", lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False,
                     momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                     maximize=False, pathway="element", relative=True, beta=0.2, gamma=0.0,
                     l1=0.0, phi_min=1e-3, phi_max=None, norm_mean=True, multiplicative=False,
                     softplus=False), **options})
