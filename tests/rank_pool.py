"""A pool of spawned ranks joined in a gloo process group on 127.0.0.1, for the distributed tests.

Spawning and joining ranks costs seconds (every rank imports torch), so a test module starts one
pool and sends each test's job to it: ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank
and returns the results by rank. Every job is bounded (``timeout``): a rank that raises, or a
job that hangs (a collective some rank never joins), fails the test with the ranks' tracebacks,
and the pool is torn down, so the next job starts a fresh one instead of blocking CI.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import sys
import time
import traceback

import torch.multiprocessing as mp

WORLD_SIZE = 2
START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> str:
    return "lo0" if sys.platform == "darwin" else "lo"


def _worker(rank: int, world_size: int, port: int, jobs, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())  # loopback only
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
        )
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        try:
            results.put((rank, True, fn(*args)))
        except Exception:  # noqa: BLE001
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` spawned ranks in one gloo group; see the module docstring."""

    def __init__(self, world_size: int = WORLD_SIZE) -> None:
        self.world_size = world_size
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.world_size)]
        port = _free_port()
        self._procs = [
            ctx.Process(target=_worker, args=(rank, self.world_size, port, jobs, self._results),
                        daemon=True)
            for rank, jobs in enumerate(self._jobs)
        ]
        for proc in self._procs:
            proc.start()
        self._collect(START_TIMEOUT, "starting the process group")

    def _collect(self, timeout: float, what: str) -> list:
        deadline = time.monotonic() + timeout
        results: dict[int, object] = {}
        failures: list[str] = []
        while len(results) + len(failures) < self.world_size:
            remaining = deadline - time.monotonic()
            try:
                rank, ok, value = self._results.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                self.close(force=True)
                missing = sorted(set(range(self.world_size)) - set(results))
                raise TimeoutError(
                    f"{what}: ranks {missing} did not finish within {timeout:.0f} s"
                    + "".join(f"\n{f}" for f in failures)
                ) from None
            if ok:
                results[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
                # the other ranks may now wait forever in a collective: give them a moment
                deadline = min(deadline, time.monotonic() + 5)
        if failures:
            self.close(force=True)
            raise AssertionError(f"{what} failed:\n" + "\n".join(failures))
        return [results[rank] for rank in range(self.world_size)]

    def run(self, fn, *args, timeout: float = 60.0) -> list:
        """``fn(*args)`` on every rank (``fn`` importable: a module-level function); results
        by rank."""
        if not self._procs:
            self._start()
        for jobs in self._jobs:
            jobs.put((fn, args))
        return self._collect(timeout, getattr(fn, "__name__", str(fn)))

    def close(self, force: bool = False) -> None:
        if not self._procs:
            return
        if not force:
            for jobs in self._jobs:
                jobs.put(None)
        for proc in self._procs:
            proc.join(timeout=0 if force else 10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs = []
