"""The old path of :mod:`kintsugi_optim._kernels.fused_cpu`, kept importable: it is the same
module object, so code (and tests) that patch ``kintsugi_optim._fused._cpu_kernel`` patch the
kernel every step calls."""

import sys

from kintsugi_optim._kernels import fused_cpu

sys.modules[__name__] = fused_cpu
