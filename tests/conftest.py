import os
import sys

import pytest
import torch

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
