"""The names of expert tensors in a checkpoint: per-expert 2-D weights
`<experts>.<e>.{gate,up,down}_proj.weight` (Qwen3-MoE) and fused 3-D tensors
`<experts>.gate_up_proj` [E, 2I, d] / `<experts>.down_proj` [E, d, I] (DiffusionGemma), and how
one maps onto the other. Strings and shapes only: qdtk.formats.checkpoint reads a fused tensor as
its per-expert matrices through these, qdtk.torch.experts hooks the experts that run them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROJ = ("gate_proj", "up_proj", "down_proj")
_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|"
                            r"down_proj)\.weight$")


@dataclass(frozen=True)
class ExpertSlot:
    """Where a per-expert checkpoint weight lives in the fused parameters."""

    param: str  # e.g. "model.layers.0.mlp.experts.gate_up_proj"
    expert: int
    proj: str  # gate_proj (the first half of gate_up's rows), up_proj (the second), down_proj

    def rows(self, fused_rows: int) -> slice:
        """The rows of param[expert] that hold this weight."""
        half = fused_rows // 2
        return {"gate_proj": slice(0, half), "up_proj": slice(half, fused_rows)}.get(
            self.proj, slice(None))


def expert_slot(name: str) -> ExpertSlot | None:
    """The fused parameter slice of checkpoint weight `name`, or None if not an expert's."""
    m = _EXPERT_WEIGHT.match(name)
    if m is None:
        return None
    fused = "down_proj" if m["proj"] == "down_proj" else "gate_up_proj"
    return ExpertSlot(f"{m['prefix']}.{fused}", int(m["e"]), m["proj"])


def expert_weight(prefix: str, e: int, proj: str) -> str:
    return f"{prefix}.{e}.{proj}.weight"


_FUSED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<fused>gate_up_proj|down_proj)$")


def fused_parts(name: str, shape: tuple[int, ...]) -> list[tuple[str, int, int]] | None:
    """A fused 3-D expert tensor's 2-D matrices in storage order: (per-expert weight name,
    first row, rows) of the tensor viewed as [E * rows, cols]; None if `name` is not one.
    gate_up_proj [E, 2I, d]: expert e's gate_proj is rows 2Ie .. 2Ie+I-1, its up_proj the next
    I; down_proj [E, d, I]: expert e's down_proj is rows de .. de+d-1."""
    m = _FUSED.match(name)
    if m is None or len(shape) != 3 or (m["fused"] == "gate_up_proj" and shape[1] % 2):
        return None
    E, R = shape[0], shape[1]
    if m["fused"] == "down_proj":
        return [(expert_weight(m["prefix"], e, "down_proj"), e * R, R) for e in range(E)]
    half = R // 2
    return [(expert_weight(m["prefix"], e, p), e * R + k * half, half)
            for e in range(E) for k, p in enumerate(("gate_proj", "up_proj"))]
