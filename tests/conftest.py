import os
import sys

import pytest
import torch
import torch.distributed as dist

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def requires_torch(version: str, why: str):
    """Skip on a torch older than ``version``: CI also runs the suite on the oldest torch that
    pyproject.toml accepts, where these features are not claimed (docs/maths.md §4)."""
    return pytest.mark.skipif(torch.__version__ < version, reason=f"needs torch>={version}: {why}")


@pytest.fixture(scope="module")
def pool():
    """A pool of 2 gloo ranks on 127.0.0.1 (tests/rank_pool.py), one per test module."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from rank_pool import RankPool

    ranks = RankPool()
    yield ranks
    ranks.close()
