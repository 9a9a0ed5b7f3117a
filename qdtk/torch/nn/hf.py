"""transformers' quantizer for qdtk-bcq/1 folders: `from_pretrained(PACKED)` after `import qdtk`.

`register_transformers()` (called once, lazily, by `import qdtk` when transformers is
importable) registers the config class and quantizer under quant_method "qdtk". Before the
weights load, the quantizer validates every quantized module's tensors exactly as
`qdtk unpack` does (qdtk.formats.packed.check_packed_layer, from the shard headers: clear
errors naming the file and tensor, before anything is loaded) and swaps each quantized
nn.Linear for a `BCQLinear` of the right buffer shapes; transformers then fills the buffers by
name from the shards, in their stored dtypes.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from qdtk.errors import QdtkError

log = logging.getLogger(__name__)

QUANT_METHOD = "qdtk"


def quantized_modules(folder: str | Path) -> dict[str, tuple]:
    """{module: (shape, orders, rotation)} of a packed folder, every tensor validated against
    FORMAT.md (the same checks and messages as `qdtk unpack`)."""
    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.packed import check_packed_layer, read_quantization_config

    qc = read_quantization_config(folder)
    ckpt = Checkpoint(folder)
    found = {}
    for module, info in qc["modules"].items():
        if info["kind"] != "bcq":
            raise QdtkError(f"{folder}: module {module!r} is {info['kind']!r}-coded; packed "
                            "inference supports 'bcq' modules (run `qdtk unpack` for others)")
        shape, orders, _, rotation = check_packed_layer(ckpt, module, info)  # headers only
        found[module] = (shape, orders, rotation)
    return found


def replace_linears(model, modules: dict[str, tuple]) -> None:
    """Swap each named nn.Linear of `model` for a BCQLinear with empty buffers (on the Linear's
    device, e.g. meta inside from_pretrained)."""
    from torch import nn

    from qdtk.torch.nn.linear import BCQLinear

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


@cache
def packed_config_class():
    """The config class of model_type "qdtk" (a packed folder's config.json, qdtk.pack's gate):
    it reads the folder's config as the model's own config class, quantization_config kept, so
    AutoModel* builds the model's own class and the "qdtk" quantizer fills it. Registered with
    AutoConfig by `register_transformers`; also what the folder's qdtk_packed.py hands to
    transformers under trust_remote_code."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.packed import PACKED_MODEL_TYPE, model_config, read_quantization_config

    class PackedConfig(PretrainedConfig):
        model_type = PACKED_MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            folder = Path(str(kwargs.get("name_or_path", "")))
            if (folder / "config.json").is_file():  # format and shard headers, before
                read_quantization_config(folder)   # transformers opens a shard (4.x does
                Checkpoint(folder)                 # before the quantizer runs)
            own = model_config(config_dict)
            kind = own.get("model_type")
            if kind not in CONFIG_MAPPING:
                raise QdtkError(f"{folder}: transformers has no config class for model_type "
                                f"{kind!r}; load this packed folder with qdtk.load (LLaDA, "
                                "Dream: qdtk's native forward)")
            return CONFIG_MAPPING[kind].from_dict(own, **kwargs)

    return PackedConfig


def restore_stored_scales(model, folder: str | Path) -> None:
    """transformers 4.x casts every floating tensor a quantizer loads to the model's dtype
    (bfloat16 would round the float16 scales): read those of each BCQLinear again as stored."""
    import torch

    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.torch.nn.linear import BCQLinear

    ckpt = None
    for name, mod in model.named_modules():
        for field in ("row_scale", "col_scale") if isinstance(mod, BCQLinear) else ():
            old = getattr(mod, field)
            if old.dtype != torch.float16:
                ckpt = ckpt or Checkpoint(folder)
                new = torch.from_numpy(ckpt.read(f"{name}.{field}").copy()).to(old.device)
                setattr(mod, field, new)


def register_transformers() -> bool:
    """Register quant_method "qdtk" and the packed folders' model_type "qdtk" with transformers
    (idempotent). False when transformers cannot be imported or has no quantizer registry
    (older than 4.50)."""
    try:
        from transformers import AutoConfig
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
    AutoConfig.register(packed_config_class().model_type, packed_config_class())

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
            self._folder = folder

        def _convert_model_for_quantization(self, model):
            pass  # transformers 4.x: patches MoE modules for other methods, needs accelerate

        def _process_model_after_weight_loading(self, model, **kwargs):
            restore_stored_scales(model, self._folder)
            return model

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self):
            return False

    return True
