"""Mixture-of-experts layers as transformers 5 runs them: each expert's matrices are slices of
fused 3-D parameters (gate_up_proj [E, 2I, d], down_proj [E, d, I]) applied to the tokens the
router sends to the expert. Checkpoints store them either per expert, 2-D, under
`<experts>.<e>.{gate,up,down}_proj.weight` (Qwen3-MoE), or as the fused 3-D tensors themselves,
`<experts>.gate_up_proj` and `<experts>.down_proj` without a `.weight` suffix (DiffusionGemma).
Either way each expert matrix is one layer named as the per-expert layout names it (for a fused
tensor, a view of its rows: qdtk.formats.checkpoint) with its own H: gate and up read the expert's
routed tokens x, down reads act(x Wg^T) * (x Wu^T) of those tokens.

Found by structure (a module holding 3-D gate_up_proj and down_proj parameters and an act_fn,
called as experts(hidden [T, d], top_k_index [T, k], top_k_weights [T, k])), not by class, so
every model built that way is covered. torch is imported by the callers.
"""

from __future__ import annotations

from typing import Any

from qdtk.formats.experts import PROJ, expert_weight

# An expert that fewer tokens than this reach gets the stated fallback statistics.
MIN_EXPERT_TOKENS = 16
def is_fused_experts(module: Any) -> bool:
    """Whether `module` holds its experts as fused 3-D gate_up_proj / down_proj parameters."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (getattr(gu, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3
            and gu.shape[0] == down.shape[0] and hasattr(module, "act_fn"))


def expert_names(prefix: str, module: Any) -> list[str]:
    """The checkpoint weights of every expert of a fused module under `prefix`."""
    return [expert_weight(prefix, e, p) for e in range(module.gate_up_proj.shape[0]) for p in PROJ]


# How each routed token counts in its expert's H (--expert-weighting):
# "tokens": once; "weight": by its routing weight w; "weight2": by w^2, the weight of its
# squared error in the MoE output (the expert's output is scaled by w).
EXPERT_WEIGHTINGS = ("tokens", "weight", "weight2")


def token_weights(w, weighting: str):
    """Per routed token, its factor in H (w [T_e] routing weights; None: every factor 1)."""
    if weighting not in EXPERT_WEIGHTINGS:
        raise ValueError(f"unknown expert weighting {weighting!r}")
    return None if weighting == "tokens" or w is None else (w if weighting == "weight" else w * w)


def routed(module, hidden, top_k_index, keep=None, top_k_weights=None):
    """Per expert e that receives tokens: (e, X_e [T_e, d], A_e [T_e, I], w_e [T_e] or None),
    the routed tokens (padding excluded by keep [T] bool), the down projection's input
    act(X Wg^T) * X Wu^T and their routing weights (from top_k_weights [T, k])."""
    import torch

    hit = torch.zeros(top_k_index.shape[0], module.gate_up_proj.shape[0] + 1, dtype=torch.bool,
                      device=hidden.device)
    hit.scatter_(1, top_k_index.long().clamp(max=hit.shape[1] - 1), True)
    if keep is not None:
        hit &= keep[:, None]
    for e in range(module.gate_up_proj.shape[0]):
        rows = hit[:, e].nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        X = hidden[rows]
        gate, up = torch.nn.functional.linear(X, module.gate_up_proj[e]).chunk(2, dim=-1)
        w = None if top_k_weights is None else \
            (top_k_weights[rows] * (top_k_index[rows] == e)).sum(-1).to(torch.float64)
        yield e, X, module.act_fn(gate) * up, w
