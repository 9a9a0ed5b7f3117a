"""transformers' quantizer for qdtk-bcq/1 folders: `from_pretrained(PACKED)` after `import qdtk`.

`register_transformers()` (called once, lazily, by `import qdtk` when transformers is
importable) registers the config class and quantizer under quant_method "qdtk". Before the
weights load, the quantizer validates every quantized module's tensors exactly as
`qdtk unpack` does (qdtk.formats.packed.check_packed_layer, from the shard headers: clear
errors naming the file and tensor, before anything is loaded) and swaps each quantized
nn.Linear for a `BCQLinear` of the right buffer shapes, each experts module that runs fused 3-D
parameters for a `BCQExperts` of per-expert BCQLinears, and each module tied to a swapped one
(DiffusionGemma's encoder layers) for a `Shared` alias of it (`replace_modules`); transformers
then fills the buffers by name from the shards, in their stored dtypes.
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


def replace_modules(model, modules: dict[str, tuple]) -> None:
    """Swap each quantized module of `model` for a packed one with empty buffers (on the old
    module's device, e.g. meta inside from_pretrained): an nn.Linear for a BCQLinear; the
    expert matrices of a fused experts module (3-D parameters, qdtk.torch.experts) for one
    BCQExperts; then every module tied to a replaced one for an alias of it (share_tied)."""
    from qdtk.torch.experts import is_fused_experts

    fused = {name: mod for name, mod in model.named_modules() if is_fused_experts(mod)}
    grouped: dict[str, dict[tuple[int, str], tuple]] = {}
    replaced = {}
    for name, spec in modules.items():
        prefix, e, proj = _expert_of(name)
        if prefix in fused:
            grouped.setdefault(prefix, {})[(e, proj)] = spec
            continue
        replaced[name] = _packed_linear(model, name, spec)
    for prefix, specs in grouped.items():
        replaced[prefix] = _packed_experts(prefix, fused[prefix], specs)
    for name, new in replaced.items():
        _set_submodule(model, name, new)
    share_tied(model, replaced)


def _expert_of(module: str) -> tuple[str | None, int, str]:
    """(experts prefix, expert, projection) of a per-expert module name, or (None, -1, "")."""
    from qdtk.formats.experts import expert_slot

    slot = expert_slot(module + ".weight")
    if slot is None:
        return None, -1, ""
    return slot.param.rpartition(".")[0], slot.expert, slot.proj


def _set_submodule(model, name: str, new) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _packed_linear(model, name: str, spec: tuple):
    """The BCQLinear that replaces nn.Linear `name` (empty buffers)."""
    from torch import nn

    from qdtk.torch.nn.linear import BCQLinear

    (n, m), orders, rotation = spec
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise QdtkError(f"{type(model).__name__} has no module {name!r}, which the "
                        "checkpoint quantizes") from None
    if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (n, m):
        raise QdtkError(f"{name}: the model's module is {old!r}, the checkpoint's a "
                        f"{n} x {m} Linear")
    bias = old.bias is not None
    return BCQLinear(m, n, orders, bias, dtype=old.bias.dtype if bias else old.weight.dtype,
                     device=old.weight.device, rotation=rotation)


def _packed_experts(prefix: str, old, specs: dict[tuple[int, str], tuple]):
    """The BCQExperts that replaces fused experts module `prefix` (gate_up_proj [E, 2I, d],
    down_proj [E, d, I]): every one of its 3E matrices must be packed, with those shapes."""
    from qdtk.formats.experts import PROJ
    from qdtk.torch.nn.experts import BCQExperts
    from qdtk.torch.nn.linear import BCQLinear

    E, two_i, d = old.gate_up_proj.shape
    if any(getattr(old, k, False) for k in ("has_bias", "is_transposed")) or \
            getattr(old, "is_concatenated", True) is False:
        raise QdtkError(f"{prefix}: packed experts run gate_up_proj [E, 2I, d] without biases; "
                        f"this model's {type(old).__name__} is laid out otherwise (`qdtk "
                        "unpack` the folder and run the dense one)")
    want = {"gate_proj": (two_i // 2, d), "up_proj": (two_i // 2, d), "down_proj": (d, two_i // 2)}
    if len(specs) != 3 * E:
        raise QdtkError(f"{prefix}: the checkpoint packs {len(specs)} of its {3 * E} expert "
                        "matrices; running fused experts packed needs all of them (`qdtk "
                        "unpack` the folder and run the dense one)")
    experts = []
    for e in range(E):
        mats = {}
        for p in PROJ:
            (n, m), orders, rotation = specs[(e, p)]
            if (n, m) != want[p]:
                raise QdtkError(f"{prefix}.{e}.{p}: the model's expert matrix is "
                                f"{want[p][0]} x {want[p][1]}, the checkpoint's {n} x {m}")
            mats[p] = BCQLinear(m, n, orders, False, device=old.gate_up_proj.device,
                                rotation=rotation)
        experts.append(mats)
    return BCQExperts(experts, old.act_fn)


def share_tied(model, replaced: dict) -> None:
    """transformers ties parameters, target -> source (`all_tied_weights_keys`); a packed module
    has buffers instead. Each module whose parameters are all tied to those of one replaced
    module becomes a Shared alias of it, and the ties that name a parameter no longer there are
    dropped (every PreTrainedModel in the model keeps its own mapping, with its own names)."""
    from qdtk.torch.nn.shared import Shared

    tied = getattr(model, "all_tied_weights_keys", None) or {}
    owners: dict[str, set[str]] = {}
    for target, source in tied.items():
        src = source.rpartition(".")[0]
        if src in replaced:
            owners.setdefault(target.rpartition(".")[0], set()).add(src)
    for name, sources in owners.items():
        mod = model.get_submodule(name)
        params = {f"{name}.{p}" for p, _ in mod.named_parameters()}
        if len(sources) != 1 or not params <= set(tied):
            raise QdtkError(f"{name}: tied to the packed module {sorted(sources)[0]!r} in part "
                            "only; qdtk cannot run it packed (`qdtk unpack` the folder)")
        (src,) = sources
        _set_submodule(model, name, Shared(src, replaced[src]))
    for sub in model.modules():
        keys = getattr(sub, "all_tied_weights_keys", None)
        if keys:
            sub.all_tied_weights_keys = {t: s for t, s in keys.items()
                                         if _has_tensor(sub, t) and _has_tensor(sub, s)}


def _has_tensor(module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    try:
        sub = module.get_submodule(owner) if owner else module
    except AttributeError:
        return False
    return leaf in sub._parameters or leaf in sub._buffers


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
            replace_modules(model, quantized_modules(folder))
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
