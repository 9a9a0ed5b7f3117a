"""transformers' quantizer for qdtk-bcq/1 folders: `from_pretrained(PACKED)` after `import qdtk`.

`register_transformers()` (called once, lazily, by `import qdtk` when transformers is
importable) registers the config class and quantizer under quant_method "qdtk". Before the
weights load, the quantizer validates every quantized module's tensors exactly as
`qdtk unpack` does (qdtk.pack.read_packed_layer: clear errors naming the file and tensor, before
anything is loaded) and swaps each quantized nn.Linear for a `BCQLinear` of the right buffer
shapes; transformers then fills the buffers by name from the shards, in their stored dtypes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qdtk.errors import QdtkError

log = logging.getLogger(__name__)

QUANT_METHOD = "qdtk"


def quantized_modules(folder: str | Path) -> dict[str, tuple]:
    """{module: (shape, orders, rotation)} of a packed folder, every tensor validated against
    FORMAT.md (the same checks and messages as `qdtk unpack`)."""
    from qdtk.checkpoint import Checkpoint
    from qdtk.pack import read_packed_layer, read_quantization_config

    qc = read_quantization_config(folder)
    ckpt = Checkpoint(folder)
    found = {}
    for module, info in qc["modules"].items():
        if info["kind"] != "bcq":
            raise QdtkError(f"{folder}: module {module!r} is {info['kind']!r}-coded; packed "
                            "inference supports 'bcq' modules (run `qdtk unpack` for others)")
        layer = read_packed_layer(ckpt, module, info)
        found[module] = (layer.shape, layer.orders, layer.rotation)
    return found


def replace_linears(model, modules: dict[str, tuple]) -> None:
    """Swap each named nn.Linear of `model` for a BCQLinear with empty buffers (on the Linear's
    device, e.g. meta inside from_pretrained)."""
    from torch import nn

    from qdtk.nn.linear import BCQLinear

    for name, ((n, m), orders, rotation) in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise QdtkError(f"{type(model).__name__} has no module {name!r}, which the "
                            "checkpoint quantizes") from None
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (n, m):
            raise QdtkError(f"{name}: the model's module is {old!r}, the checkpoint's a "
                            f"{n} x {m} Linear")
        parent, _, attr = name.rpartition(".")
        bias = old.bias is not None
        new = BCQLinear(m, n, orders, bias, dtype=old.bias.dtype if bias else old.weight.dtype,
                        device=old.weight.device, rotation=rotation)
        setattr(model.get_submodule(parent) if parent else model, attr, new)


def register_transformers() -> bool:
    """Register quant_method "qdtk" with transformers (idempotent). False when transformers
    cannot be imported or has no quantizer registry (older than 4.50)."""
    try:
        from transformers.quantizers import HfQuantizer
        from transformers.quantizers.auto import (
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return False
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return True

    @register_quantization_config(QUANT_METHOD)
    class QdtkConfig(QuantizationConfigMixin):
        """config.json's quantization_config, kept whole (docs/FORMAT.md section 5)."""

        def __init__(self, **kwargs):
            for key, value in kwargs.items():
                setattr(self, key, value)
            self.quant_method = QUANT_METHOD

    @register_quantizer(QUANT_METHOD)
    class QdtkQuantizer(HfQuantizer):
        """Loads qdtk-bcq/1 checkpoints into BCQLinear modules (pre-quantized only)."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            # transformers 5 names the shards; 4.x only the folder, through the config
            folder = (Path(checkpoint_files[0]).parent if checkpoint_files
                      else Path(getattr(model.config, "_name_or_path", "")))
            if not (folder / "config.json").is_file():
                raise QdtkError(f"{folder}: a qdtk checkpoint loads from a local folder only")
            replace_linears(model, quantized_modules(folder))

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self):
            return False

    return True
