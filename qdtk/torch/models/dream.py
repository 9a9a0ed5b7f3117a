"""Dream (HKUNLP's Dream-v0 7B Base/Instruct): config.json model_type "Dream", Qwen2's layout.

Checkpoint names: model.embed_tokens, model.layers.{i}.{input_layernorm,
self_attn.{q,k,v}_proj (with bias), self_attn.o_proj (without), post_attention_layernorm,
mlp.{gate,up,down}_proj}, model.norm, lm_head. Attention has no causal mask. Dream keeps its
autoregressive parent's head: position i's logits predict token i + 1.
"""

from __future__ import annotations

import torch
from torch import nn

from qdtk.errors import QdtkError
from qdtk.torch.models.layers import (
    DenoisingTransformer,
    NativeConfig,
    RMSNorm,
    self_attention,
    swiglu,
)


def dream_config(raw: dict, where: str) -> NativeConfig:
    if raw.get("hidden_act", "silu") != "silu" or raw.get("rope_scaling"):
        raise QdtkError(f"{where}: Dream with hidden_act={raw.get('hidden_act')!r}, "
                        f"rope_scaling={raw.get('rope_scaling')!r} is not supported by qdtk's "
                        f"native forward (it needs silu, no scaling); try --model-code remote")
    heads = raw["num_attention_heads"]
    return NativeConfig(
        raw,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        eps=float(raw.get("rms_norm_eps", 1e-6)),
    )


class Attention(nn.Module):
    def __init__(self, c: NativeConfig):
        super().__init__()
        d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
        kv = c.num_key_value_heads * hd
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)


class MLP(nn.Module):
    def __init__(self, c: NativeConfig):
        super().__init__()
        d, i = c.hidden_size, c.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)


class DreamBlock(nn.Module):
    def __init__(self, c: NativeConfig):
        super().__init__()
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.input_layernorm = RMSNorm(c.hidden_size, c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, rope, mask=None) -> torch.Tensor:
        n, att, mlp = self.input_layernorm(x), self.self_attn, self.mlp
        a = self_attention(att.q_proj(n), att.k_proj(n), att.v_proj(n), rope, mask,
                           self.heads, self.kv_heads, full_precision=False)
        h = x + att.o_proj(a)
        m = self.post_attention_layernorm(h)
        return h + mlp.down_proj(swiglu(mlp.gate_proj(m), mlp.up_proj(m)))


class Dream(DenoisingTransformer):
    logits_shift = 1
    count_positions = True  # Dream's sampler numbers the unpadded tokens 0, 1, ...

    def __init__(self, config: NativeConfig):
        super().__init__(config)
        c = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(DreamBlock(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self) -> nn.Module:
        return self.model.norm

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def tied(self) -> dict[str, str]:
        if self.config.get("tie_word_embeddings", False):
            return {"lm_head.weight": "model.embed_tokens.weight"}
        return {}

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)
