"""The single-process scripts in examples/ run as documented (the DDP/FSDP2 ones need torchrun)."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("script", ["drop_in_adam.py", "vwpr_ritual.py", "group_dro.py",
                                    "per_group_gilding.py", "train_amp.py"])
def test_example_runs(script, tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                            text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
