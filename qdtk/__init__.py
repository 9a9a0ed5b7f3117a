"""qdtk: quantize diffusion LLMs to about 2 bits per weight (Quant-dLLM and beyond)."""

import os

# Before NumPy and SciPy load OpenBLAS: its idle threads then sleep almost at once instead of
# spinning for about 0.1 s after each call, which on a small machine starves the Numba kernels
# that run between the BLAS calls of a layer (4096x4096 on 2 cores: 4.7 s -> 2.9 s). Without
# effect if OpenBLAS is already loaded; a user's own setting wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# The same for OpenMP (torch's and Numba's own libgomp, read when each loads): a packed Linear
# alternates Numba tiles and torch GEMMs, and threads of one pool spinning after its region
# starve the other's (4096x4096 at T = 256 on 2 shared cores: 328 -> 102 ms, dense 87 ms).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qdtk.errors import QdtkError  # noqa: E402
from qdtk.torch.nn.registry import register_when_imported  # noqa: E402

__version__ = "0.1.0"
__all__ = ["QdtkError", "__version__", "load"]

# After `import qdtk`, AutoModel*.from_pretrained(PACKED) loads packed Linears: the quantizer
# registers as soon as transformers is imported (now, or later), without importing it here.
register_when_imported()


def __getattr__(name: str):
    if name == "load":  # torch and transformers load on first use only
        from qdtk.torch.models import load_packed

        return load_packed
    raise AttributeError(f"module 'qdtk' has no attribute {name!r}")
