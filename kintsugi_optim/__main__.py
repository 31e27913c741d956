"""``python -m kintsugi_optim demo`` (also the ``kintsugi-demo`` command): the main job.
``python -m kintsugi_optim build``: build the fused CPU kernel now rather than on first use.

Bad input (unknown task, non-positive steps or seeds, an unwritable ``--out``, ``--device cuda``
without a GPU) and a failed write (a full disk) end with one line on stderr naming the problem
and exit code 2; Ctrl-C ends with exit code 130. Files are written under a temporary name and
renamed, so none is ever left truncated under its final name.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


class UsageError(Exception):
    """A problem with the command line: reported in one line, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage; one line is enough here
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from kintsugi_optim.demo import TASKS

    parser = _OneLineParser(prog="python -m kintsugi_optim", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    demo = commands.add_parser(
        "demo", help="train small models with and without Kintsugi and compare them",
        description="A reproducible study of Kintsugi optimization on three tasks made in-process: "
                    "a rare event, a spurious correlation and hidden groups. Prints a results table "
                    "and writes results.md, results.json and sigil plots to --out.")
    demo.add_argument("--tasks", default=",".join(TASKS),
                      help=f"comma-separated tasks among {', '.join(TASKS)} (default: all)")
    demo.add_argument("--seeds", type=_positive_int, default=3, help="seeds per method (default 3)")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help="training steps per run (default 400; 60 with --quick)")
    demo.add_argument("--out", default="kintsugi-demo", help="output folder (default ./kintsugi-demo)")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="where to train (default: cuda when available, else cpu)")
    demo.add_argument("--quick", action="store_true",
                      help="a few seconds: fewer steps and samples, for smoke tests")
    commands.add_parser(
        "build", help="build the fused CPU kernel now (it is otherwise built on first use)",
        description="Build KintsugiOptimizer's fused C++ kernel for this CPU into the torch "
                    "extensions cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), "
                    "or find it there, and say where and how long it took. Exits with 1 and the "
                    "cause when the toolchain fails (the optimizer would then fall back to its "
                    "foreach step with a warning).")
    return parser


def build(args) -> int:
    """Build (or load from the cache) the fused CPU kernel; print its path and the time taken.
    Returns 0, or 1 with the cause on stderr when the build fails."""
    from kintsugi_optim._kernels import fused_cpu as fused

    start, started = time.perf_counter(), time.time()
    try:
        fused._cpu_kernel()
    except RuntimeError as error:
        print(f"kintsugi build: error: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    libraries = [Path(p) for p in torch.ops.loaded_libraries if "kintsugi_fused_cpu" in p]
    library = libraries[0] if libraries else None
    # An existing build is only loaded (ninja finds nothing to do), and its file is older
    # than this command.
    cached = library is not None and library.stat().st_mtime < started
    print(f"fused CPU kernel {'found in the cache' if cached else 'built'} in {seconds:.1f} s: "
          f"{library if library else '(loaded)'}")
    return 0


def _check(args) -> tuple[list[str], torch.device, Path]:
    from kintsugi_optim.demo import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"unknown task {', '.join(unknown) or repr(args.tasks)}: "
                         f"choose among {', '.join(TASKS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".kintsugi-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--out {str(out)!r} is not writable: {error.strerror or error}") from None
    return tasks, device, out


def _progress_bar(stream=sys.stderr):
    """A one-line progress bar redrawn in place; in a log (not a terminal), a line per quarter."""
    start, interactive, shown = time.perf_counter(), stream.isatty(), set()

    def show(done: int, total: int, label: str) -> None:
        width, elapsed = 28, time.perf_counter() - start
        filled = int(width * done / max(total, 1))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:5.1f}s  {label}"
        if interactive:
            stream.write("\r" + line[:110].ljust(110) + ("\n" if done == total else ""))
        elif (quarter := 4 * done // max(total, 1)) not in shown:
            shown.add(quarter)
            stream.write(line + "\n")
        stream.flush()

    return show


def demo(args) -> int:
    from kintsugi_optim import demo as study

    tasks, device, out = _check(args)
    steps = args.steps or (60 if args.quick else 400)
    sizes = dict(n_train=1000, n_test=4000) if args.quick else {}
    command = "python -m kintsugi_optim " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = study.run_study(tasks, args.seeds, steps, device, progress=_progress_bar(), **sizes)
    text, markdown = study.report(results, tasks, seeds=args.seeds, steps=steps, device=device,
                                  command=command.strip())
    print(text)
    meta = {"command": command.strip(), "seeds": args.seeds, "steps": steps,
            "device": device.type, **study.environment()}
    written = _write_atomically(out, lambda folder: study.write_outputs(
        results, tasks, folder, markdown, meta))
    print(f"\nWrote {', '.join(p.name for p in written)} to {out}/")
    return 0


def _write_atomically(out: Path, write) -> list[Path]:
    """``write(folder)`` into a hidden folder inside ``out``, then each file renamed into
    ``out``: a full disk or a Ctrl-C leaves every file under its final name whole (the old one
    or the new one), never truncated. The hidden folder is removed whatever happens."""
    staging = Path(tempfile.mkdtemp(prefix=".kintsugi-demo-", dir=out))
    try:
        written = []
        for path in write(staging):
            target = out / path.name
            os.replace(path, target)  # atomic on one file system
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["demo"] and sys.argv and Path(sys.argv[0]).name == "kintsugi-demo":
        argv = ["demo", *argv]  # the console script is the demo itself
    try:
        args = build_parser().parse_args(argv)
        return build(args) if args.command == "build" else demo(args)
    except UsageError as error:
        print(f"kintsugi-demo: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a folder removed under us: one line, not a trace
        where = f": {error.filename}" if error.filename else ""
        print(f"kintsugi-demo: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkintsugi-demo: interrupted; no file was left half-written", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it


if __name__ == "__main__":
    sys.exit(main())
