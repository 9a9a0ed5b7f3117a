"""Tiny random LLaDA and Dream checkpoints as published: config.json with the published fields,
bfloat16 safetensors shards under the published tensor names, a tokenizer with a mask token, and
an auto_map naming the model's own code files, which are missing or raise (as the published code
does on a transformers release it was not written for)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import ml_dtypes
import numpy as np

from qdtk.formats.checkpoint import write_safetensors

LLADA_CODE = {"AutoConfig": "configuration_llada.LLaDAConfig",
              "AutoModel": "modeling_llada.LLaDAModelLM",
              "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
DREAM_CODE = {"AutoConfig": "configuration_dream.DreamConfig",
              "AutoModel": "modeling_dream.DreamModel"}


def llada_config(d=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=128, tie=False, bias=False):
    return {
        "architectures": ["LLaDAModelLM"], "auto_map": LLADA_CODE, "model_type": "llada",
        "activation_type": "silu", "alibi": False, "attention_layer_norm": False,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": d, "embedding_size": vocab, "include_bias": False, "include_qkv_bias": bias,
        "input_emb_norm": False, "layer_norm_type": "rms", "max_sequence_length": 64,
        "mlp_hidden_size": ffn, "mlp_ratio": 4, "n_heads": heads, "n_kv_heads": kv_heads,
        "n_layers": layers, "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "vocab_size": vocab,
        "weight_tying": tie, "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
        "use_cache": False,
    }


def dream_config(d=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=320, tie=False):
    return {
        "architectures": ["DreamModel"], "auto_map": DREAM_CODE, "model_type": "Dream",
        "hidden_act": "silu", "hidden_size": d, "intermediate_size": ffn,
        "max_position_embeddings": 64, "num_attention_heads": heads,
        "num_hidden_layers": layers, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6,
        "rope_scaling": None, "rope_theta": 1000000.0, "tie_word_embeddings": tie,
        "vocab_size": vocab, "torch_dtype": "bfloat16", "transformers_version": "4.46.2",
        "use_cache": False, "sliding_window": None, "use_sliding_window": False,
    }


def llada_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, f, hd = c["d_model"], c["mlp_hidden_size"], c["d_model"] // c["n_heads"]
    kv = c["n_kv_heads"] * hd
    p = "model.transformer."
    shapes = {p + "wte.weight": (c["embedding_size"], d), p + "ln_f.weight": (d,)}
    if not c["weight_tying"]:
        shapes[p + "ff_out.weight"] = (c["embedding_size"], d)
    for i in range(c["n_layers"]):
        b = f"{p}blocks.{i}."
        shapes.update({b + "attn_norm.weight": (d,), b + "q_proj.weight": (d, d),
                       b + "k_proj.weight": (kv, d), b + "v_proj.weight": (kv, d),
                       b + "attn_out.weight": (d, d), b + "ff_norm.weight": (d,),
                       b + "ff_proj.weight": (f, d), b + "up_proj.weight": (f, d),
                       b + "ff_out.weight": (d, f)})
        if c["include_qkv_bias"]:
            shapes.update({b + "q_proj.bias": (d,), b + "k_proj.bias": (kv,),
                           b + "v_proj.bias": (kv,)})
    return shapes


def dream_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, f = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        shapes.update({b + "input_layernorm.weight": (d,),
                       b + "self_attn.q_proj.weight": (d, d), b + "self_attn.q_proj.bias": (d,),
                       b + "self_attn.k_proj.weight": (kv, d), b + "self_attn.k_proj.bias": (kv,),
                       b + "self_attn.v_proj.weight": (kv, d), b + "self_attn.v_proj.bias": (kv,),
                       b + "self_attn.o_proj.weight": (d, d),
                       b + "post_attention_layernorm.weight": (d,),
                       b + "mlp.gate_proj.weight": (f, d), b + "mlp.up_proj.weight": (f, d),
                       b + "mlp.down_proj.weight": (d, f)})
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """bfloat16 weights: norms near 1, matrices ~ N(0, 1/fan_in), biases small."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if "norm" in name or "ln_f" in name:
            a = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            a = 0.1 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = a.astype(ml_dtypes.bfloat16)
    return out


def write_shards(folder: Path, tensors: dict[str, np.ndarray], shards: int = 2) -> None:
    """`shards` safetensors files and the index that names each tensor's file."""
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        write_safetensors(folder / file, part, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_llada_tokenizer(folder: Path) -> dict[str, int]:
    """Characters (LLaDA ships a PreTrainedTokenizerFast), <|mdm_mask|> and <|eot_id|>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|eot_id|>",
        mask_token="<|mdm_mask|>",
        chat_template="{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                      "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(folder)
    return {"mask_token_id": fast.mask_token_id, "eos_token_id": fast.eos_token_id,
            "pad_token_id": fast.pad_token_id}


def write_dream_tokenizer(folder: Path) -> dict[str, int]:
    """Qwen2's byte-level BPE files (vocab.json, merges.txt) with Dream's tokenizer class named
    by auto_map, as Dream ships it, and <|endoftext|>, <|mask|> as added tokens."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([string.printable, "masked diffusion language models " * 4],
                            vocab_size=300, min_frequency=1, show_progress=False)
    bpe.save_model(str(folder))
    n = len(json.loads((folder / "vocab.json").read_text()))
    added = {str(n + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                          "normalized": False, "single_word": False}
             for i, t in enumerate(["<|endoftext|>", "<|mask|>"])}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": added, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "mask_token": "<|mask|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                         "<|im_start|>assistant\n{% endif %}",
    }))
    return {"mask_token_id": n + 1, "eos_token_id": n, "pad_token_id": n}


RAISING_CODE = '''\
raise RuntimeError("this code was written for another transformers release")
'''


def write_dllm(folder: Path, arch: str, code: str = "missing", seed: int = 0, shards: int = 2,
               **config_kw) -> Path:
    """A tiny random `arch` ("llada" or "dream") checkpoint folder. code: "missing" (auto_map
    names files that are not there) or "raises" (they are there and raise when imported)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if arch == "llada":
        config, shapes, tok = llada_config(**config_kw), llada_shapes, write_llada_tokenizer
    else:
        config, shapes, tok = dream_config(**config_kw), dream_shapes, write_dream_tokenizer
    config.update(tok(folder))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    write_shards(folder, random_tensors(shapes(config), seed), shards)
    if code == "raises":
        for file in {v.split(".")[0] for v in config["auto_map"].values()}:
            (folder / f"{file}.py").write_text(RAISING_CODE)
    return folder
