"""Packed inference: `BCQLinear`, `BCQExperts` (packed fused experts) and transformers' quantizer
for qdtk-bcq folders.

The torch corner of qdtk: attributes are imported on first use, so that `import
qdtk.math.bcq_matmul` (Numba only) never imports torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"BCQLinear": "qdtk.torch.nn.linear", "BCQExperts": "qdtk.torch.nn.experts",
            "register_transformers": "qdtk.torch.nn.hf"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qdtk.torch.nn' has no attribute {name!r}")
