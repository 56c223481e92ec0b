"""Every launch script parses (`bash -n`) and fails fast by design (`set -euo pipefail`)."""

import glob
import os
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch")))


def test_all_three_scripts_are_there():
    assert [os.path.basename(s) for s in SCRIPTS] == ["local_multi_gpu.sh", "slurm_gpu.sbatch", "tpu_vm.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_parses(script):
    out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(script) as f:
        assert "set -euo pipefail" in f.read()
