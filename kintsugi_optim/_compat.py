"""Every private torch name the package uses, in one place.

These are torch's own optimizer helpers, imported so that our optimizers make exactly the choices
torch's make (foreach/fused defaults, the scalar dtype of ``step``, dynamo and capturable
handling). They carry no stability promise: a torch release may move or rename them, and this
module is where that is absorbed. Each says why it is used and the oldest torch that has it,
checked in the released wheels (2.4.1, 2.5.1, 2.6.0, 2.7.0, 2.8.0, 2.12.0 and 2.13.0). The package's
floor is torch 2.6 (``pyproject.toml``): everything here imports on 2.6.

Not imported here, because they are public or used as torch uses them: the
``torch._foreach_*`` ops (the multi-tensor kernels torch's optimizers are built from; the
package's foreach paths call them directly) and the ``Optimizer`` methods the classes inherit.
"""

from __future__ import annotations

from torch import Tensor
from torch._utils import (  # torch >= 1.0 (2.4.1 has them)
    # Gilder: ϕ tensors exchanged across ranks in one all-reduce, as DDP's buckets are.
    _flatten_dense_tensors,
    _unflatten_dense_tensors,
)
from torch.optim.optimizer import (  # torch >= 2.4 unless noted
    # foreach/fused chosen like torch's optimizers when the user leaves them unset.
    _default_to_fused_or_foreach,
    # fused=True: the device/dtype check torch's fused Adam makes. torch >= 2.5.
    _device_dtype_check_for_fused,
    # the functional step runs eagerly under torch.compile where torch's does.
    _disable_dynamo_if_unsupported,
    # capturable=True: the devices torch allows, with its error message.
    _get_capturable_supported_devices,
    # the dtype torch gives the `step` state (float32, or float64 where supported).
    _get_scalar_dtype,
    # a 0-d `step` read as a number, except under torch.compile.
    _get_value,
    # per-tensor step sizes as a tensor list under torch.compile, as torch's foreach Adam.
    _stack_if_compiling,
    # differentiable=True: grad mode set from the group, as torch's step decorator does.
    _use_grad_for_differentiable,
    Optimizer,
)

try:  # torch >= 2.8 (absent in 2.7.0)
    # a tensor lr as the scalar torch's step would use.
    from torch.optim.optimizer import _to_scalar
except ImportError:  # pragma: no cover - torch 2.6 and 2.7

    def _to_scalar(x):
        return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


# `torch._disable_dynamo` (torch >= 2.1): load_state_dict runs eagerly, as torch's does.
from torch._compile import _disable_dynamo  # noqa: E402

# fused=True: whether an expanded gradient's elements alias each other (torch >= 1.0).
from torch import _debug_has_internal_overlap  # noqa: E402

# VWPR's ϕ buffers follow module.to() in place where the tensor kinds allow it, as nn.Module's
# own _apply decides for parameters (torch >= 1.0).
from torch import _has_compatible_shallow_copy_type  # noqa: E402

# One foreach call per device and dtype, grouped the way torch's optimizers group them
# (a private static method of Optimizer; torch >= 2.0).
_group_tensors_by_device_and_dtype = Optimizer._group_tensors_by_device_and_dtype


def _graph_capture_health_check(optimizer: Optimizer) -> None:
    """torch's check that a step under CUDA graph capture is capturable. Named
    ``_accelerator_graph_capture_health_check`` after 2.8 (checked in 2.12 and 2.13),
    ``_cuda_graph_capture_health_check`` up to 2.8."""
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None) or getattr(
        optimizer, "_cuda_graph_capture_health_check")
    check()


__all__ = [
    "_debug_has_internal_overlap",
    "_default_to_fused_or_foreach",
    "_device_dtype_check_for_fused",
    "_disable_dynamo",
    "_disable_dynamo_if_unsupported",
    "_flatten_dense_tensors",
    "_get_capturable_supported_devices",
    "_get_scalar_dtype",
    "_get_value",
    "_graph_capture_health_check",
    "_group_tensors_by_device_and_dtype",
    "_has_compatible_shallow_copy_type",
    "_stack_if_compiling",
    "_to_scalar",
    "_unflatten_dense_tensors",
    "_use_grad_for_differentiable",
]
