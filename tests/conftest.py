import os
import sys

import pytest
import torch.distributed as dist

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

from helpers import requires_cuda, requires_torch  # noqa: E402,F401  (older imports from here)


@pytest.fixture(autouse=True)
def implementation_setup(request, monkeypatch):
    """A test parametrized over tests/optim_db.py's cases (or its implementations, as ``impl``)
    gets its implementation's setup (the interpreted Triton kernels, for instance) for its own
    duration."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    impl = getattr(params.get("case"), "impl", params.get("impl"))
    setup = getattr(impl, "setup", None)
    if setup is not None:
        setup(monkeypatch)


@pytest.fixture(scope="module")
def pool():
    """A pool of 2 gloo ranks on 127.0.0.1 (tests/rank_pool.py), one per test module."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from rank_pool import RankPool

    ranks = RankPool()
    yield ranks
    ranks.close()
