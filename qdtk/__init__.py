"""qdtk: quantize diffusion LLMs to about 2 bits per weight (Quant-dLLM and beyond)."""

from qdtk.errors import QdtkError

__version__ = "0.1.0"
__all__ = ["QdtkError", "__version__"]
