"""`qdtk.load(PACKED)`: a packed checkpoint as a runnable model, its Linears kept packed."""

from __future__ import annotations

from pathlib import Path

from qdtk.errors import QdtkError


def model_class(config):
    """The transformers class that builds the checkpoint's skeleton (the one place that picks
    it; LLaDA / Dream may route to qdtk's own models here)."""
    from qdtk.models import _auto_class

    return _auto_class(config, None)


def load(path: str | Path, device: str = "cpu", dtype: str | None = None):
    """The model of a packed folder with every quantized Linear a `BCQLinear`, in eval mode
    without gradients, on `device`. `dtype` (float32, bfloat16, float16) is that of the tensors
    kept in full precision; default: as stored."""
    import transformers

    from qdtk.models import DTYPE_KWARG, load_native, native_type, read_config, torch_dtype
    from qdtk.nn.hf import quantized_modules, register_transformers

    path = Path(path)
    if native_type(read_config(path)):  # LLaDA, Dream: qdtk's own forward, packed Linears
        return load_native(path, dtype or "float32", device)
    if not register_transformers():
        raise QdtkError("qdtk.load needs transformers >= 4.50 (its quantizer registry)")
    quantized_modules(path)  # validate everything before building anything
    config = transformers.AutoConfig.from_pretrained(path)
    kept = torch_dtype(dtype) if dtype else "auto"
    try:
        model = model_class(config).from_pretrained(path, config=config,
                                                    **{DTYPE_KWARG(): kept})
    except (OSError, ValueError, KeyError) as e:
        raise QdtkError(f"{path}: cannot load the packed model: {e}") from None
    model.eval().requires_grad_(False)
    return model.to(device)
