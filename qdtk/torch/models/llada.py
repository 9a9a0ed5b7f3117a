"""LLaDA (GSAI-ML's LLaDA-8B Base/Instruct, LLaDA-1.5): config.json model_type "llada".

Checkpoint names: model.transformer.{wte, blocks.{i}.{attn_norm, q_proj, k_proj, v_proj,
attn_out, ff_norm, ff_proj, up_proj, ff_out}, ln_f, ff_out (the head, absent with
weight_tying)}. A block: h = x + attn_out(attention(q, k, v)) on attn_norm(x), then
h + ff_out(silu(ff_proj(m)) * up_proj(m)) on m = ff_norm(h). Position i's logits predict token i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qdtk.errors import QdtkError
from qdtk.torch.models.layers import (
    DenoisingTransformer,
    NativeConfig,
    RMSNorm,
    self_attention,
    swiglu,
)

# Settings of the published architecture family that this forward does not implement, and the
# value it requires (LLaDA-8B has all of them).
REQUIRED = {"layer_norm_type": "rms", "block_type": "llama", "activation_type": "silu",
            "rope": True, "alibi": False, "block_group_size": 1, "attention_layer_norm": False,
            "clip_qkv": None}


def llada_config(raw: dict, where: str) -> NativeConfig:
    for key, value in REQUIRED.items():
        got = raw.get(key, value)
        if got != value and str(got).lower() != str(value).lower():
            raise QdtkError(f"{where}: LLaDA with {key}={got!r} is not supported by qdtk's "
                            f"native forward (it needs {value!r}); try --model-code remote")
    d, heads = raw["d_model"], raw["n_heads"]
    kv = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else heads)
    include_bias = bool(raw.get("include_bias", False))
    norm_bias = raw.get("bias_for_layer_norm")
    return NativeConfig(
        raw,
        hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d,
        num_hidden_layers=raw["n_layers"],
        embedding_rows=raw.get("embedding_size") or raw["vocab_size"],
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        eps=float(raw.get("rms_norm_eps", 1e-5)),
        include_bias=include_bias,
        qkv_bias=include_bias or bool(raw.get("include_qkv_bias", False)),
        norm_bias=include_bias if norm_bias is None else bool(norm_bias),
        max_position_embeddings=raw.get("max_sequence_length"),
    )


class LLaDABlock(nn.Module):
    def __init__(self, c: NativeConfig):
        super().__init__()
        d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.attn_norm = RMSNorm(d, c.eps, c.norm_bias)
        self.q_proj = nn.Linear(d, d, bias=c.qkv_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=c.qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=c.include_bias)
        self.ff_norm = RMSNorm(d, c.eps, c.norm_bias)
        self.ff_proj = nn.Linear(d, c.intermediate_size, bias=c.include_bias)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=c.include_bias)
        self.ff_out = nn.Linear(c.intermediate_size, d, bias=c.include_bias)

    def forward(self, x: torch.Tensor, rope, mask=None) -> torch.Tensor:
        n = self.attn_norm(x)
        a = self_attention(self.q_proj(n), self.k_proj(n), self.v_proj(n), rope, mask,
                           self.heads, self.kv_heads, full_precision=True)  # rope_full_precision
        h = x + self.attn_out(a)
        m = self.ff_norm(h)
        return h + self.ff_out(swiglu(self.ff_proj(m), self.up_proj(m)))


class LLaDA(DenoisingTransformer):
    def __init__(self, config: NativeConfig):
        super().__init__(config)
        c = config
        t = nn.ModuleDict({
            "wte": nn.Embedding(c.embedding_rows, c.hidden_size),
            "blocks": nn.ModuleList(LLaDABlock(c) for _ in range(c.num_hidden_layers)),
            "ln_f": RMSNorm(c.hidden_size, c.eps, c.norm_bias),
        })
        if not c.get("weight_tying", False):
            t["ff_out"] = nn.Linear(c.hidden_size, c.embedding_rows, bias=c.include_bias)
        self.model = nn.Module()
        self.model.transformer = t

    def embedding(self) -> nn.Embedding:
        return self.model.transformer["wte"]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding()(input_ids)
        return x * math.sqrt(self.config.hidden_size) if self.config.get("input_emb_norm") else x

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer["blocks"]

    def final_norm(self) -> nn.Module:
        return self.model.transformer["ln_f"]

    def get_output_embeddings(self) -> nn.Module:
        t = self.model.transformer
        return t["ff_out"] if "ff_out" in t else t["wte"]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        logits = t["ff_out"](h) if "ff_out" in t else F.linear(h, t["wte"].weight)
        if self.config.get("scale_logits"):
            logits = logits / math.sqrt(self.config.hidden_size)
        return logits
