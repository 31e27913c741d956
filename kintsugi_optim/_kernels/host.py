"""Where a step runs, and how the CPU is kept fed: the host-side heuristics every foreach path
shares (the Sculptor's, the gilding kernel's, ``Gilded``'s).

Callers reach these through the module (``host._cpu_eager(...)``), so that a test may patch one
name here and every path sees it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kintsugi_optim._compat import _group_tensors_by_device_and_dtype
from kintsugi_optim.pathways import _is_dtensor


def _cpu_eager(tensors: list[Tensor]) -> bool:
    """Whether a foreach step over ``tensors`` runs on the CPU, eagerly, on plain tensors.

    There a _foreach_ op is a loop of per-tensor ops, so one op per tensor costs no launch more,
    and a reduction's result already lies in host memory, so reading it costs nothing: the step
    reads a few sums to skip the passes that only matter for non-finite or overflowing values.
    On an accelerator a read would stall the stream, under torch.compile it would break the
    graph, and a sharded DTensor's reduction is a collective: there every pass runs, one launch
    per op.
    """
    return (
        tensors[0].device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not _is_dtensor(tensors[0])
    )


def _fast_scalars(tensors: list[Tensor]) -> bool:
    """Whether a foreach step over ``tensors`` may pass its scalars as 0-d tensors.

    A CPU _foreach_ op is a loop of per-tensor ops, and each of those takes a 0-d tensor operand
    ~3× faster than a Python number. Only for float32/float64: in half precision a 0-d tensor
    of the tensors' dtype would round the scalar, and there torch's exact order of operations
    is kept too, so that β = 0 gives torch's bits.
    """
    return tensors[0].dtype in (torch.float32, torch.float64) and _cpu_eager(tensors)


def _cpu_scalars(values: list[float], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Per-tensor scalars for a CPU _foreach_ op, as 0-d tensors: each per-tensor op of the
    loop takes a 0-d tensor operand ~3× faster than a Python number."""
    return torch.tensor(values, dtype=dtype).unbind()


def _grouped(tensorlists):
    """torch's grouping of tensor lists by device and dtype: (lists, indices) per group."""
    return _group_tensors_by_device_and_dtype(tensorlists).values()


# On the CPU a _foreach_ op is a loop over its tensors, so a step made of ~15 of them streams
# every buffer through memory ~15 times, and frees its temporaries (tens of MB) all at once,
# which glibc hands back to the OS to fault in again next step. Stepped a run of tensors at a
# time, every pass after a run's first finds its buffers in cache and the temporaries stay
# small. The bytes are those of the parameters in a run; its working set is ~6× that, in L2/L3.
# 1 MiB measured best on a 2-core AMD EPYC (Zen 5: 1 MiB L2 a core, 32 MiB L3): 256 KiB
# costs more in per-run overhead, 4 MiB and more in cache misses (benchmarks/README.md).
_CPU_RUN_BYTES = 1 << 20


def _runs(params: list[Tensor]) -> list[slice]:
    """Consecutive runs of ``params`` for one pass of the foreach step each (see above)."""
    if not _cpu_eager(params):
        return [slice(0, len(params))]  # one launch per op is what foreach is for
    runs, start, size = [], 0, 0
    for k, p in enumerate(params):
        size += p.numel() * p.element_size()
        if size >= _CPU_RUN_BYTES or k == len(params) - 1:
            runs.append(slice(start, k + 1))
            start, size = k + 1, 0
    return runs
