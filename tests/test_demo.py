"""The main job, `python -m kintsugi_optim demo`, run as a user runs it (in a subprocess)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_demo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kintsugi_optim", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env={**os.environ, "PYTHONHASHSEED": "0"})


def metrics_tables(stdout: str) -> str:
    """The printed tables without the wall-time section, which differs between runs."""
    return stdout.split("Wall time per run")[0]


@pytest.fixture(scope="module")
def two_quick_runs(tmp_path_factory):
    outs = [tmp_path_factory.mktemp(f"demo{i}") for i in range(2)]
    return [(run_demo("demo", "--quick", "--seeds", "1", "--out", str(out)), out) for out in outs]


ALL_TASKS = ["Adam", "Adam + reweighted CE [uses labels]", "GildedLoss (additive) [uses labels]",
             "GildedLoss (Group DRO) [uses labels]", "Focal loss", "JTT", "Kintsugi samples"]
KNOWN_GROUPS_ONLY = ["Sculptor (element)", "Sculptor (row)", "VWPR + Adam + Gilder", "SGD",
                     "VWPR + SGD + Gilder"]


def rows(table: str, method: str) -> int:
    return sum(line.split("  ")[0] == method for line in table.splitlines())


def test_quick_demo_prints_the_tables_and_writes_its_files(two_quick_runs):
    result, out = two_quick_runs[0]
    assert result.returncode == 0, result.stderr
    tables = metrics_tables(result.stdout)
    assert "Rare event" in tables and "Spurious correlation" in tables
    assert "Hidden groups" in tables
    for column in ("balanced acc.", "minority recall", "worst-group acc."):
        assert column in tables
    for method in ALL_TASKS:
        assert rows(tables, method) == 3, method
    for method in KNOWN_GROUPS_ONLY:  # no groups to weigh on the hidden task: not run there
        assert rows(tables, method) == 2, method
    cells = re.findall(r"\d\.\d{3} ± \d\.\d{3}", tables)
    assert len(cells) == (2 * 12 + 7) * 3  # two tasks with twelve methods, one with seven
    payload = json.loads((out / "results.json").read_text())
    assert {"runs", "summary", "command", "torch", "date"} <= set(payload)
    assert len(payload["runs"]) == 2 * 12 + 7
    assert "| method |" in (out / "results.md").read_text()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 17  # sculptor, vwpr: 2 tasks × 2; group_dro 3 × 2; samples 3 × 1
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in pngs)
    assert "—" in result.stdout.split("Wall time per run")[1]  # methods not run on hidden


def test_the_same_command_prints_the_same_table(two_quick_runs):
    (first, _), (second, _) = two_quick_runs
    assert metrics_tables(first.stdout) == metrics_tables(second.stdout)


@pytest.mark.parametrize("args,problem", [
    (["--tasks", "rare,mnist"], "unknown task mnist"),
    (["--steps", "0"], "--steps"),
    (["--seeds", "-2"], "--seeds"),
    (["--steps", "many"], "--steps"),
    (["--out", "/dev/null/out"], "--out '/dev/null/out' is not writable"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, problem):
    result = run_demo("demo", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_a_usage_error():
    result = run_demo("demo", "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.strip() == ("kintsugi-demo: error: --device cuda: no CUDA device is "
                                     "available (use --device cpu)")


def test_help_lists_the_options():
    result = run_demo("demo", "--help")
    assert result.returncode == 0
    for option in ("--tasks", "--seeds", "--steps", "--out", "--device", "--quick"):
        assert option in result.stdout


def test_train_one_builds_every_pass_with_the_given_model():
    # benchmarks/image_check.py runs the demo's rows on a CNN through model_fn: a two-pass
    # method's firing run and its main run must both train that model, from the same init
    from kintsugi_optim.demo import methods, study
    from kintsugi_optim.demo.tasks import make_task

    built, initial = [], []

    def model_fn(features, classes):
        built.append(torch.nn.Linear(features, classes))
        initial.append(built[-1].weight.detach().clone())
        return built[-1]

    task = make_task("rare", 0, n_train=512, n_test=256)
    method = next(m for m in methods.METHODS if m.name == "Kintsugi samples")
    metrics, _ = study.train_one(task, method, seed=3, steps=8, device=torch.device("cpu"),
                                 batch_size=64, model_fn=model_fn)
    assert len(built) == 2 and built[0] is not built[1]
    assert torch.equal(initial[0], initial[1])
    assert not torch.equal(built[1].weight, initial[1])  # the main run trained it
    assert 0.0 <= metrics["minority_recall"] <= 1.0
