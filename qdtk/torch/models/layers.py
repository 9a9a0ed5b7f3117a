"""The pieces both native dLLMs are made of: RMSNorm, rotary embeddings, bidirectional attention
with grouped KV heads, the SwiGLU MLP, and the shared forward (embed -> blocks -> norm -> head).

Every block takes (x [B, L, d], rope, mask) and returns x: the rotary tables and the key-padding
mask are built once per forward by the model and handed to each block, which is what
qdtk.torch.capture's block-by-block session records and replays.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), normalised in float32 and cast back first (as LLaDA
    and Qwen2 both do), plus an optional bias."""

    def __init__(self, d: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        y = self.weight * y
        return y if self.bias is None else y + self.bias


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, 1, L, head_dim] in float32 for integer positions [B, L]: frequencies
    theta^(-2i/head_dim), each used for both halves of the head (the rotate-half layout)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32,
                                       device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, L, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, L, head_dim]
    return angles.cos(), angles.sin()


def rotate(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], full_precision: bool
           ) -> torch.Tensor:
    """t * cos + rotate_half(t) * sin for t [B, h, L, hd]; in float32 when full_precision
    (LLaDA's rope_full_precision), else in t's dtype (Qwen2's, hence Dream's)."""
    cos, sin = rope
    x = t.float() if full_precision else t
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(t.dtype)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope, mask,
                   heads: int, kv_heads: int, full_precision: bool) -> torch.Tensor:
    """Bidirectional multi-head attention of q [B, L, heads*hd], k, v [B, L, kv_heads*hd]:
    every position sees every unmasked key; each KV head serves heads/kv_heads query heads.
    mask: None or [B, 1, 1, L] bool, True for the keys that may be attended. Returns
    [B, L, heads*hd] (before the output projection)."""
    B, L, _ = q.shape
    hd = q.shape[-1] // heads

    def split(t, h):
        return t.view(B, L, h, hd).transpose(1, 2)  # [B, h, L, hd]

    q = rotate(split(q, heads), rope, full_precision)
    k = rotate(split(k, kv_heads), rope, full_precision)
    v = split(v, kv_heads)
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
    return out.transpose(1, 2).reshape(B, L, heads * hd)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the gated MLP's hidden activations."""
    return F.silu(gate) * up


class NativeConfig(dict):
    """config.json as a dict with attribute access, plus the transformers-style names the rest of
    qdtk reads (hidden_size, max_position_embeddings, ...) for architectures that spell them
    otherwise (LLaDA's d_model, max_sequence_length)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return dict(self)


@dataclass
class NativeOutput:
    logits: torch.Tensor  # [B, L, vocab]; Dream's are shifted (position i predicts i + 1)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # block inputs, then the final norm's


class DenoisingTransformer(nn.Module, ABC):
    """embed -> blocks (bidirectional) -> final norm -> head. Subclasses build the modules under
    the checkpoint's own names and say where they are (embedding, blocks, norm, head)."""

    kind = "mlm"  # qdtk.torch.models.model_kind: a mask predictor
    logits_shift = 0  # position i's logits predict token i + logits_shift
    count_positions = False  # positions counted over unpadded tokens (Dream's sampler) or 0..L-1

    def __init__(self, config: NativeConfig):
        super().__init__()
        self.config = config

    # where the parts are (modules named as in the checkpoint)
    @abstractmethod
    def embedding(self) -> nn.Embedding:
        """The token embedding."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding()(input_ids)

    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The block stack."""

    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm after the last block."""

    @abstractmethod
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] of the final hidden states h [B, L, d]."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding()

    @abstractmethod
    def get_output_embeddings(self) -> nn.Module:
        """The output head's module (transformers' name for it)."""

    def tied(self) -> dict[str, str]:
        """Parameters the checkpoint may omit -> the stored tensor they share."""
        return {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, use_cache: bool = False,
                **unused: Any) -> NativeOutput:
        """input_ids [B, L]; attention_mask [B, L] (1: a real token) or None. Padded keys are
        never attended (LLaDA's own code ignores the mask; with nothing padded both agree)."""
        c = self.config
        x = self.embed(input_ids)  # [B, L, d]
        B, L = input_ids.shape
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            mask = keep[:, None, None, :]  # [B, 1, 1, L]
        if self.count_positions and mask is not None:
            positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.arange(L, device=input_ids.device)[None]
        rope = rotary_tables(positions, c.hidden_size // c.num_attention_heads, c.rope_theta)
        states = []
        for block in self.blocks():
            states.append(x)
            x = block(x, rope=rope, mask=mask)
        x = self.final_norm()(x)
        states.append(x)
        return NativeOutput(self.head(x), tuple(states) if output_hidden_states else None)
