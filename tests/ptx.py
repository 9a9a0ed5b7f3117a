"""PTX of CUDA kernels built in a subprocess without the simulator (no GPU needed): the
simulator runs kernels as Python, so only this shows that they type-check for a real device."""

import json
import os
import subprocess
import sys

import pytest

CHECK = """
import json, sys
from numba.cuda.cudadrv import nvvm
try:
    nvvm.NVVM()
except Exception as e:
    print(e)
    sys.exit(3)
{body}
print(json.dumps(uses))
"""


def ptx_facts(body: str) -> dict:
    """Run `body` (it must set `uses`, a JSON-ready summary of the PTX it compiled) with
    NUMBA_ENABLE_CUDASIM=0; skips the test when NVVM (the CUDA toolkit's compiler library) is
    missing."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    r = subprocess.run([sys.executable, "-c", CHECK.format(body=body)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"needs NVVM (the CUDA toolkit's compiler library): {r.stdout.strip()}")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
