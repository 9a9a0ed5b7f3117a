"""`BCQExperts`: a mixture-of-experts layer whose expert matrices stay packed.

transformers 5 runs experts as fused 3-D parameters (qdtk.torch.experts: gate_up_proj
[E, 2I, d], down_proj [E, d, I], called as experts(hidden [T, d], top_k_index [T, k],
top_k_weights [T, k])). A packed folder stores every expert matrix as its own module,
`<experts>.<e>.{gate,up,down}_proj` (docs/FORMAT.md section 5; gate and up are the two halves of
gate_up_proj's rows), so this module holds one BCQLinear per matrix under exactly those names
and computes the fused module's forward from them: its state_dict is the file's tensors, and no
dense expert weight ever exists. The arithmetic is BCQLinear's; torch only routes the tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from qdtk.formats.experts import PROJ
from qdtk.torch.nn.linear import BCQLinear


class BCQExperts(nn.Module):
    """The fused experts' forward from packed per-expert matrices (children e.gate_proj,
    e.up_proj, e.down_proj)."""

    def __init__(self, experts: list[dict[str, BCQLinear]], act_fn: nn.Module):
        super().__init__()
        for e, mats in enumerate(experts):
            self.add_module(str(e), nn.ModuleDict({p: mats[p] for p in PROJ}))
        self.num_experts = len(experts)
        self.act_fn = act_fn

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"

    @torch.no_grad()  # inference only: the packed Linears inside have no backward
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # [T, d]
        for e in top_k_index.unique().tolist():  # ascending, as transformers' loop
            if not 0 <= e < self.num_experts:  # an index past the experts routes nowhere
                continue
            token, slot = torch.where(top_k_index == e)  # [T_e] each
            x = hidden_states[token]  # [T_e, d]
            m = self.get_submodule(str(e))
            y = m.down_proj(self.act_fn(m.gate_proj(x)) * m.up_proj(x))  # [T_e, d]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out
