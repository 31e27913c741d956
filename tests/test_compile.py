"""torch.compile(opt.step) on the foreach path: one graph, no graph breaks, no recompiles over
five steps with a tensor lr and a scheduler, and the same numbers as eager (docs/maths.md §4).

On the CPU the graphs are checked with the "eager"/"aot_eager" backends (dynamo's tracing and
AOTAutograd's functionalisation, which is what a graph break or a recompile comes from) to keep
the suite quick; inductor and CUDA graphs run in the CUDA tests.
"""

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch.optim import lr_scheduler

from helpers import requires_cuda, requires_torch
from kintsugi_optim import KintsugiOptimizer
from optim_db import cases

# dynamo imports torch.utils.mkldnn, which uses torch.jit.script_method: torch's warning, not ours
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
    # 2.6 refuses capturable CPU steps while tracing, 2.12 recompiles: one graph is claimed from
    # the torch version CI tests it on
    requires_torch("2.13", "torch.compile(opt.step) as one graph"),
]

STEPS = 5


def _configs():
    """Each rule and gilding of the registry at least once, as options without lr, β and the
    implementation flags (the tests choose those)."""
    chosen = cases(impls=("foreach",), cover="each",
                   gildings=("element", "row", "softplus", "multiplicative", "tensor"))
    return [pytest.param({k: v for k, v in param.values[0].kwargs.items()
                          if k not in ("lr", "beta", "foreach", "fused")}, id=param.id) for param in chosen]


CONFIGS = _configs()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def model_and_grads(device="cpu", steps=STEPS):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(device)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g).to(device) for p in model.parameters()]
             for _ in range(steps)]
    return model, grads


def run(config, backend=None, device="cpu", steps=STEPS):
    """Train with per-step grads under a StepLR; returns params and ϕ. Compiled: a tensor lr
    (capturable, so the scheduler changes a tensor, not a constant baked into the graph). The
    eager reference takes a float lr: on a CPU torch allows capturable only under compile."""
    model, grads = model_and_grads(device, steps)
    if backend is None:
        opt = KintsugiOptimizer(model.parameters(), lr=0.01, foreach=True, beta=0.1, **config)
    else:
        opt = KintsugiOptimizer(model.parameters(), lr=torch.tensor(0.01, device=device),
                                foreach=True, capturable=True, beta=0.1, **config)
    scheduler = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    step = opt.step if backend is None else torch.compile(opt.step, backend=backend)
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        step()
        scheduler.step()
    params = [p.detach().clone() for p in model.parameters()]
    return params, [opt.state[p]["phi"].clone() for p in model.parameters()]


def assert_same(run_a, run_b, rtol=1e-5, atol=1e-6):
    # capturable (tensor) and float bias corrections round differently in the last bits
    for a, b in zip(run_a[0] + run_a[1], run_b[0] + run_b[1]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("config", CONFIGS)
def test_compiled_step_is_one_graph_without_breaks_or_recompiles(config):
    counter = CompileCounter()
    compiled = run(config, counter)
    # torch.optim.SGD with momentum compiles twice as well: its first step creates the
    # momentum buffers inside the step (buf = grad), which changes the traced state.
    expected_frames = 2 if config.get("momentum") else 1
    assert counter.frame_count == expected_frames, "recompiled"
    dynamo.reset()
    assert_same(compiled, run(config))


def test_sgd_momentum_compiles_like_torch_sgd():
    """The one extra frame with SGD momentum is torch's own behaviour."""
    model, grads = model_and_grads()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.01), momentum=0.9, foreach=True)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        step()
    assert counter.frame_count == 2


@pytest.mark.parametrize("config", CONFIGS[:3])
def test_explain_reports_no_graph_break(config):
    model, grads = model_and_grads()
    opt = KintsugiOptimizer(model.parameters(), lr=torch.tensor(0.01), foreach=True,
                            capturable=True, **config)
    for p, g in zip(model.parameters(), grads[0]):
        p.grad = g
    explanation = dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_aot_eager_matches_eager():
    """AOTAutograd functionalises the in-place updates of θ, ϕ and the state."""
    compiled = run(CONFIGS[1].values[0], "aot_eager")
    dynamo.reset()
    assert_same(compiled, run(CONFIGS[1].values[0]))


@requires_cuda
@pytest.mark.parametrize("config", CONFIGS[:2])
def test_cuda_inductor_matches_eager(config):
    counter = CompileCounterWithBackend("inductor")
    compiled = run(config, counter, "cuda")
    assert counter.frame_count == 1
    dynamo.reset()
    assert_same(compiled, run(config, device="cuda"))


@requires_cuda
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", CONFIGS)
def test_cuda_capturable_step_in_a_cuda_graph_equals_eager(config, foreach):
    """capturable=True: the whole Sculptor step (θ and ϕ) is captured once and replayed with new
    gradients copied into the captured ones; it matches an eager optimizer step for step."""
    steps = 6
    model, grads = model_and_grads("cuda", steps)
    eager_model, _ = model_and_grads("cuda", steps)
    options = dict(config, foreach=foreach, capturable=True, beta=0.1)
    opt = KintsugiOptimizer(model.parameters(), lr=torch.tensor(0.01, device="cuda"), **options)
    eager = KintsugiOptimizer(eager_model.parameters(), lr=0.01, **options)
    static_grads = [torch.zeros_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), static_grads):
        p.grad = g

    def eager_step(step_grads):
        for p, g in zip(eager_model.parameters(), step_grads):
            p.grad = g.clone()
        eager.step()

    # Warm up on a side stream (creates the state outside the capture), as torch documents.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for g, new in zip(static_grads, grads[0]):
            g.copy_(new)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    eager_step(grads[0])
    if config.get("momentum"):  # SGD creates its buffers in the first step: warm up twice
        for g, new in zip(static_grads, grads[1]):
            g.copy_(new)
        opt.step()
        eager_step(grads[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    first_replay = 2 if config.get("momentum") else 1
    for step_grads in grads[first_replay:]:
        for g, new in zip(static_grads, step_grads):
            g.copy_(new)
        graph.replay()
        eager_step(step_grads)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["phi"], eager.state[q]["phi"], rtol=1e-5,
                                   atol=1e-6)
