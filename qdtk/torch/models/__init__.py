"""Loading a model to run: qdtk's native LLaDA and Dream, or transformers' classes (with the
folder's own code where it has some), and the choice between them (--model-code).

The native forwards (qdtk.torch.models.llada, qdtk.torch.models.dream) read the checkpoint's own
tensors under their own names and need no model code from the folder, so they run on any
transformers release, or none. `auto` runs the folder's own code when it is trusted
(--trust-remote-code), loads and runs a short forward on the installed transformers; otherwise
the native forward, and says which. torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from qdtk.errors import QdtkError

log = logging.getLogger(__name__)

MODEL_CODE = ("auto", "native", "remote")
# config.json model_type (lower case) -> (module, class, config parser) of the native forward
NATIVE = {
    "llada": ("qdtk.torch.models.llada", "LLaDA", "llada_config"),
    "dream": ("qdtk.torch.models.dream", "Dream", "dream_config"),
}
# Classes of the folders' own code whose logits are shifted (position i predicts token i + 1).
SHIFTED_REMOTE_CLASSES = {"DreamModel"}
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


# ----------------------------------------------------------------------------- paths, configs


def split_model_path(path: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None): a path to a .gguf file loads through its folder."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise QdtkError(f"{path}: GGUF file not found")
        return path.parent, path.name
    if not path.is_dir():
        raise QdtkError(f"{path}: model folder not found")
    return path, None


def read_config(folder: str | Path) -> dict:
    """config.json of a checkpoint folder ({} when there is none); a packed folder's with the
    model's own model_type and auto_map (qdtk.formats.packed.model_config)."""
    from qdtk.formats.io import read_json
    from qdtk.formats.packed import model_config

    path = Path(folder) / "config.json"
    return model_config(read_json(path)) if path.exists() else {}


def native_type(config: dict) -> str | None:
    """The native architecture for a config ("llada", "dream"), or None."""
    kind = str(config.get("model_type", "")).lower()
    return kind if kind in NATIVE else None


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, DTYPE_NAMES[name])
    except KeyError:
        raise QdtkError(f"unknown dtype {name!r} (float32, bfloat16 or float16)") from None


def logits_shift(model) -> int:
    """How far ahead a model's logits look: 1 for Dream (native or its own code), else 0."""
    shift = getattr(model, "logits_shift", None)
    if isinstance(shift, int):
        return shift
    return 1 if type(model).__name__ in SHIFTED_REMOTE_CLASSES else 0


def attention_mask_for(model, keep):
    """The attention mask in the form `model` takes, for keep [B, L] bool (True: a real token):
    None when nothing is padded; Dream's own code an additive float [B, 1, 1, L] mask (its
    attention rejects integer masks); every other model the usual [B, L] 0/1 integers."""
    import torch

    if bool(keep.all()):
        return None
    if type(model).__name__ in SHIFTED_REMOTE_CLASSES and not is_native(model):
        dtype = next(model.parameters()).dtype
        bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        return bias.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]
    return keep.long()


# dLLMs with their own code: their logits are masked-token predictions.
MASKED_LM_CLASSES = {"LLaDAModelLM", "DreamModel"}


def model_kind(model) -> str:
    """'mlm' (masked-LM head or a dLLM), 'causal' or 'encoder' (no head), from the model class."""
    if isinstance(getattr(model, "kind", None), str):  # qdtk's native forwards say it
        return model.kind
    cls = type(model).__name__
    if cls.endswith("ForMaskedLM") or cls in MASKED_LM_CLASSES or canvas_length(model):
        return "mlm"
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "causal"
    return "encoder"


def flat_config(model) -> dict:
    """The model's config as a dict, with a multimodal model's text settings (vocab_size,
    max_position_embeddings, hidden_size: DiffusionGemma's text_config) at the top level."""
    config = model.config.to_dict()
    text = config.get("text_config")
    return {**text, **config} if isinstance(text, dict) else config


def canvas_length(model) -> int | None:
    """The canvas of a block-diffusion encoder-decoder, else None. Found by structure: a config
    `canvas_length` and a forward that takes the clean prompt as input_ids and the noised
    canvas as decoder_input_ids (DiffusionGemma; the decoder reads the encoder's cache)."""
    import inspect

    C = getattr(getattr(model, "config", None), "canvas_length", None)
    try:
        takes = "decoder_input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return int(C) if isinstance(C, int) and C > 0 and takes else None


def prompt_length(model, L: int) -> int | None:
    """Tokens of an L-token window that a block-diffusion model reads as its clean prompt (the
    rest, min(canvas, L / 2) tokens, is its canvas); None for every other model."""
    C = canvas_length(model)
    return None if C is None else L - min(C, L // 2)


def forward_inputs(model, ids, keep=None) -> dict:
    """The forward's keyword arguments for windows ids [B, L] (keep [B, L] bool: real tokens;
    None: no padding): input_ids and attention_mask, or for a block-diffusion model the prompt
    as input_ids and the canvas as decoder_input_ids (the decoder's mask covers both)."""
    import torch

    P = prompt_length(model, ids.shape[1])
    att = None if keep is None else attention_mask_for(model, keep)
    if P is None:
        return {"input_ids": ids, "attention_mask": att}
    out = {"input_ids": ids[:, :P], "decoder_input_ids": ids[:, P:]}
    if att is not None:
        out |= {"attention_mask": att[:, :P], "decoder_attention_mask": att.to(torch.bool)}
    return out


def is_native(model) -> bool:
    from qdtk.torch.models.layers import DenoisingTransformer

    return isinstance(model, DenoisingTransformer)


# ----------------------------------------------------------------------------- native


def to_torch(arr: np.ndarray):
    """A copy of a checkpoint array as a torch tensor; bfloat16 (ml_dtypes) bit for bit."""
    import ml_dtypes
    import torch

    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.array(arr.view(np.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr))


def build_native(config: dict, where: str):
    """The native module for config.json (parameters on the meta device: no memory yet)."""
    import torch

    kind = native_type(config)
    if kind is None:
        raise QdtkError(f"{where}: qdtk has no native forward for model_type "
                        f"{config.get('model_type')!r} (it has: LLaDA, Dream); use "
                        f"--model-code auto")
    module_name, cls_name, parse_name = NATIVE[kind]
    module = importlib.import_module(module_name)
    try:
        parsed = getattr(module, parse_name)(config, where)
    except KeyError as e:
        raise QdtkError(f"{where}/config.json: no field {e.args[0]!r}, which "
                        f"{cls_name} needs") from None
    with torch.device("meta"):
        return getattr(module, cls_name)(parsed)


def load_native(folder: str | Path, dtype: str = "float32", device: str = "cpu"):
    """qdtk's native forward with every parameter read from the checkpoint (none left
    uninitialised), converted to `dtype`, in eval mode without gradients. A packed folder
    (`qdtk pack`) keeps its quantized Linears packed: qdtk.torch.nn.BCQLinear modules whose buffers
    are the file's tensors as stored."""
    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.packed import is_packed

    folder = Path(folder)
    model = build_native(read_config(folder), str(folder))
    if is_packed(folder):
        from qdtk.torch.nn.hf import quantized_modules, replace_modules

        replace_modules(model, quantized_modules(folder))
    ckpt = Checkpoint(folder)
    params = set(dict(model.named_parameters()))
    wanted = model.state_dict(keep_vars=True)  # parameters and the packed modules' buffers
    tied = {k: v for k, v in model.tied().items() if k not in ckpt}
    missing = [n for n in wanted if n not in ckpt and n not in tied]
    extra = [n for n in ckpt.names() if n not in wanted]
    if missing or extra:
        what = (f"has no tensor {missing[0]!r} ({len(missing)} missing)" if missing else
                f"has tensors the architecture does not have, e.g. {extra[0]!r} "
                f"({len(extra)})")
        raise QdtkError(f"{folder}: the checkpoint {what} for qdtk's native "
                        f"{type(model).__name__}; is config.json the checkpoint's own?")
    want = torch_dtype(dtype)
    state = {}
    for name, t in wanted.items():
        if name in tied:
            continue
        info = ckpt.info(name)
        if tuple(info.shape) != tuple(t.shape):
            raise QdtkError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, the "
                            f"config gives {list(t.shape)}")
        value = to_torch(ckpt.read(name))
        state[name] = value.to(want) if name in params else value  # packed buffers as stored
    model.load_state_dict(state, strict=False, assign=True)
    for dst, src in tied.items():  # share the stored tensor, as the published code ties it
        owner, _, leaf = dst.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(src))
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    assert not left, f"left unloaded: {left[:3]}"
    model.eval().requires_grad_(False)
    return model.to(device)


# ----------------------------------------------------------------------------- transformers


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own warnings and "Loading weights" bars silenced while qdtk loads a model
    or tokenizer (its messages stay visible with -v)."""
    from transformers.utils import logging as hf_logging

    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _auto_class(config: Any, gguf: str | None):
    """The class that loads the checkpoint's own tensor names: its architecture when
    transformers has it, else the remote code's auto_map (LLaDA, Dream), else AutoModel."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    auto_map = getattr(config, "auto_map", None) or {}
    for name in ("AutoModelForMaskedLM", "AutoModelForCausalLM", "AutoModel"):
        if name in auto_map:
            return getattr(transformers, name)
    return transformers.AutoModelForCausalLM if gguf else transformers.AutoModel


def own_code_failure(folder: str | Path, e: BaseException, when: str, native: bool) -> str:
    """One line for a failure of a model's code: the folder, the error, the way out."""
    import transformers

    first = (str(e).strip().splitlines() or [""])[0]
    wrote = read_config(folder).get("transformers_version")
    way = "rerun with --model-code native (qdtk's own forward), or install" if native else \
        "install"
    need = f"transformers {wrote}, which its code was written for" if wrote else \
        "the transformers version its code was written for"
    return (f"{folder}: the model's own code failed while {when} on transformers "
            f"{transformers.__version__} ({type(e).__name__}: {first}); {way} {need}")


def load_transformers(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """A model through transformers (the folder's own code when it has and trusts some)."""
    import transformers

    folder, gguf, extra = _hub_args(path)
    try:
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(
                folder, trust_remote_code=trust_remote_code, **extra
            )
            cls = _auto_class(config, gguf)
            model = cls.from_pretrained(
                folder, config=config, trust_remote_code=trust_remote_code,
                **{DTYPE_KWARG(): torch_dtype(dtype)}, **extra,
            )
    except QdtkError:
        raise
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise QdtkError(f"{path}: the model needs its own code: pass --trust-remote-code "
                            f"to run it{_or_native(folder)}") from None
        raise QdtkError(f"{path}: cannot load the model: {e}") from None
    except Exception as e:  # the model's own code, written for another transformers
        raise QdtkError(own_code_failure(folder, e, "loading",
                                         native_type(read_config(folder)) is not None)) from None
    model.eval().requires_grad_(False)
    return model


def _hub_args(path: str | Path) -> tuple[Path, str | None, dict]:
    """(folder, gguf file or None, the from_pretrained keywords that name the file)."""
    folder, gguf = split_model_path(path)
    return folder, gguf, ({"gguf_file": gguf} if gguf else {})


def DTYPE_KWARG() -> str:  # noqa: N802 - a constant of the installed transformers
    """from_pretrained's dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _or_native(folder: Path) -> str:
    return ", or --model-code native" if native_type(read_config(folder)) else ""


def probe(model, folder: str | Path) -> None:
    """A 4-token forward: the folder's own code may load and still fail when run."""
    import torch

    with torch.inference_mode(), own_code_errors(model, folder, "running"):
        model(input_ids=torch.arange(4, device=model.device)[None] % 2)


@contextmanager
def own_code_errors(model, folder: str | Path, when: str = "running") -> Iterator[None]:
    """Failures of a model's own code (not qdtk's native forward) as one-line QdtkErrors."""
    try:
        yield
    except QdtkError:
        raise
    except Exception as e:
        if is_native(model) or type(model).__module__.startswith("transformers."):
            raise
        raise QdtkError(own_code_failure(folder, e, when,
                                         native_type(read_config(folder)) is not None)) from e


# ----------------------------------------------------------------------------- the choice


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, model_code: str = "auto"):
    """The model at `path` (a folder or .gguf file) in eval mode without gradients, on `device`.

    model_code: "native" (qdtk's LLaDA/Dream forward), "remote" (transformers, with the folder's
    own code when trusted), or "auto": for LLaDA/Dream the folder's own code when it is trusted
    and loads and runs here, else native; every other model through transformers.
    """
    if model_code not in MODEL_CODE:
        raise QdtkError(f"unknown --model-code {model_code!r} (auto, native or remote)")
    folder, gguf = split_model_path(path)
    native = None if gguf else native_type(read_config(folder))
    from qdtk.formats.packed import is_packed

    if not gguf and native is None and is_packed(folder):  # run at 2 bits (qdtk.torch.nn)
        return load_packed(folder, device, None if dtype == "float32" else dtype)
    if model_code == "native" or (model_code == "auto" and native and not trust_remote_code):
        model = load_native(folder, dtype, device)
        log.info("%s: running qdtk's native %s forward", path, type(model).__name__)
        return model
    if model_code == "remote" or native is None:
        model = load_transformers(path, dtype, trust_remote_code).to(device)
        if native is not None:
            probe(model, folder)
            log.info("%s: running the folder's own code (%s)", path, type(model).__name__)
        return model
    try:  # auto, a native architecture, trusted code: its own when it works here
        model = load_transformers(path, dtype, trust_remote_code).to(device)
        probe(model, folder)
    except QdtkError as e:
        model = load_native(folder, dtype, device)
        log.warning("%s; running qdtk's native %s forward instead", e, type(model).__name__)
        return model
    log.info("%s: running the folder's own code (%s)", path, type(model).__name__)
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a folder or .gguf file. A tokenizer class from the folder's own code
    that cannot be used (untrusted, or broken here) falls back to transformers' fast tokenizer
    on the same files (tokenizer.json, or Qwen2's vocab.json + merges.txt: Dream's)."""
    import transformers

    folder, gguf, extra = _hub_args(path)
    try:
        with quiet_transformers():
            tok = transformers.AutoTokenizer.from_pretrained(
                folder, trust_remote_code=trust_remote_code, **extra
            )
    except Exception as e:
        with quiet_transformers():
            tok = None if gguf else _fallback_tokenizer(folder)
        if tok is None:
            first = (str(e).strip().splitlines() or [""])[0]
            raise QdtkError(f"{path}: cannot load the tokenizer: {first}") from None
        log.info("%s: the folder's tokenizer class is unavailable (%s); using %s on its files",
                 path, type(e).__name__, type(tok).__name__)
    tok.model_max_length = 1 << 62  # the calibration stream is long; windows are cut later
    return tok


def _fallback_tokenizer(folder: Path):
    """transformers' own tokenizer class on the folder's files, special tokens and chat template
    from its tokenizer_config.json; None when the files fit neither."""
    import transformers

    try:
        if (folder / "tokenizer.json").exists():
            return transformers.PreTrainedTokenizerFast.from_pretrained(folder)
        if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            return transformers.AutoTokenizer.from_pretrained(folder, tokenizer_type="qwen2")
    except Exception as e:  # noqa: BLE001 - the caller reports the original failure
        log.debug("%s: fallback tokenizer failed: %s", folder, e)
    return None


# ----------------------------------------------------------------------------- packed


def model_class(config):
    """The transformers class that builds the checkpoint's skeleton (the one place that picks
    it; LLaDA / Dream may route to qdtk's own models here)."""
    return _auto_class(config, None)


def load_packed(path: str | Path, device: str = "cpu", dtype: str | None = None):
    """The model of a packed folder with every quantized Linear a `BCQLinear`, in eval mode
    without gradients, on `device`. `dtype` (float32, bfloat16, float16) is that of the tensors
    kept in full precision; default: as stored."""
    import transformers

    from qdtk.torch.nn.hf import quantized_modules, register_transformers

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
