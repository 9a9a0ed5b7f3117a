"""Routing-weight weighting of each expert's H (--expert-weighting): which quantizes the experts
better, measured as the output error of the MoE layers on held-out text.

    .venv/bin/python bench/bench_expert_weighting.py [--threads 2] [-n 16] [-L 64]

For tiny random Qwen3-MoE and DiffusionGemma models (hidden 128, 8 experts, top 2, 2 layers,
a character tokenizer), as initialised ("init") and with a peaked router ("peaked": router
weights x20, DiffusionGemma's per-expert scales drawn from U(0.5, 2)), capture statistics on
the built-in calibration text with each weighting, quantize every expert matrix alone (DAQ,
uniform order 2, block feedback, refine full) and replace all experts of one MoE layer at a
time. Error = sum ||y - y_q||^2 / sum ||y||^2 of that layer's experts output (routing weights
applied) on its full-precision inputs over the windows of each built-in held-out source.
Random models route almost uniformly and their inputs are not a trained model's: weak
evidence, printed as it comes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent))

WEIGHTINGS = ("tokens", "weight", "weight2")
SOLVE = {"method": "daq", "bits": 2, "feedback": "block", "refine": "full"}


def build(kind: str, variant: str, folder: Path) -> Path:
    import torch
    import transformers

    from tests.conftest import diffusion_gemma_config, save_char_tokenizer

    torch.manual_seed(0)
    if kind == "qwen3moe":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_experts=8, num_experts_per_tok=2, max_position_embeddings=128))
        routers = [m.gate.weight for m in model.model.layers.modules()
                   if hasattr(m, "gate") and hasattr(m, "experts")]
        scales = []
    else:
        cfg = diffusion_gemma_config(
            canvas_length=16, hidden_size=128, moe_intermediate_size=128, intermediate_size=256,
            num_experts=8, head_dim=32, global_head_dim=32, max_position_embeddings=128)
        model = transformers.DiffusionGemmaForBlockDiffusion(cfg)
        routers = [m.router.proj.weight for m in model.model.decoder.layers]
        scales = [m.router.per_expert_scale for m in model.model.decoder.layers]
    if variant == "peaked":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for w in routers:
                w.mul_(20)
            for s in scales:
                s.copy_(0.5 + 1.5 * torch.rand(s.shape, generator=g))
    model.eval().save_pretrained(folder, safe_serialization=True)
    save_char_tokenizer(folder)
    return folder


def held_out_inputs(model, tokenizer, L: int, n: int):
    """Per experts module: [(hidden, index, weights, output)] on the windows of every built-in
    held-out source (full-precision model)."""
    import torch

    from qdtk.torch.evaluate import default_sources, read_text, token_windows
    from qdtk.torch.experts import is_fused_experts
    from qdtk.torch.models import flat_config, forward_inputs

    got: dict = {}
    handles = [mod.register_forward_hook(
        lambda m, a, o, name=name: got.setdefault(name, []).append((*a[:3], o)))
        for name, mod in model.named_modules() if is_fused_experts(mod)]
    vocab = flat_config(model)["vocab_size"]
    with torch.inference_mode():
        for src in default_sources():
            w = token_windows(read_text(src), tokenizer, vocab, n, L)
            model(**forward_inputs(model, torch.from_numpy(w.ids)))
    for h in handles:
        h.remove()
    return got


def moe_error(model, name: str, inputs, weights: dict[str, np.ndarray]) -> float:
    """The relative output error of experts module `name` with its matrices replaced."""
    import torch

    from qdtk.formats.experts import expert_weight

    mod = model.get_submodule(name)
    old = mod.gate_up_proj.data.clone(), mod.down_proj.data.clone()
    prefix = name.replace("model.encoder.language_model.layers", "model.decoder.layers")
    with torch.no_grad():
        for e in range(mod.gate_up_proj.shape[0]):
            g, u, d = (torch.from_numpy(weights[expert_weight(prefix, e, p)])
                       for p in ("gate_proj", "up_proj", "down_proj"))
            mod.gate_up_proj.data[e] = torch.cat([g, u])
            mod.down_proj.data[e] = d
        num = den = 0.0
        for hidden, index, w, y in inputs:
            yq = mod(hidden, index, w)
            num += float(((y - yq).double() ** 2).sum())
            den += float((y.double() ** 2).sum())
    mod.gate_up_proj.data.copy_(old[0])
    mod.down_proj.data.copy_(old[1])
    return num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=16, help="calibration windows")
    ap.add_argument("-L", type=int, default=64, help="tokens per window")
    ap.add_argument("--eval-n", type=int, default=8, help="held-out windows per source")
    a = ap.parse_args()
    import logging

    import torch

    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.stats import Stats
    from qdtk.math.mcs import MaskOptions
    from qdtk.quantize import make_solver
    from qdtk.torch.capture import CaptureOptions, capture
    from qdtk.torch.models import load_model, load_tokenizer

    torch.set_num_threads(a.threads)
    logging.disable(logging.WARNING)
    solver = make_solver(SOLVE)
    print(f"{'model':<16} {'router':<7} {'layer':<44} " + " ".join(f"{w:>9}" for w in WEIGHTINGS))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("qwen3moe", "diffusiongemma"):
            for variant in ("init", "peaked"):
                folder = build(kind, variant, Path(tmp) / f"{kind}-{variant}")
                model = load_model(folder)
                inputs = held_out_inputs(model, load_tokenizer(folder), a.L, a.eval_n)
                ckpt = Checkpoint(folder)
                experts = [n for n in ckpt.linear_names() if ".experts." in n]
                errors = {}
                for weighting in WEIGHTINGS:
                    stats = capture(folder, None, Path(tmp) / f"s-{kind}-{variant}-{weighting}",
                                    CaptureOptions(n=a.n, L=a.L, mask=MaskOptions(mask=None),
                                                   expert_weighting=weighting),
                                    progress=False)
                    st = Stats(stats)
                    solved = {}
                    for w in experts:
                        W = ckpt.read(w, np.float32)
                        H, _ = st.hessian(w, dim=W.shape[1])
                        solved[w] = solver(W, H, {**SOLVE, "name": w})[0].dequantize()
                    errors[weighting] = {name: moe_error(model, name, inp, solved)
                                         for name, inp in inputs.items()}
                for name in inputs:
                    print(f"{kind:<16} {variant:<7} {name:<44} "
                          + " ".join(f"{errors[w][name]:>9.5f}" for w in WEIGHTINGS))
                means = {w: np.mean(list(errors[w].values())) for w in WEIGHTINGS}
                print(f"{kind:<16} {variant:<7} {'mean':<44} "
                      + " ".join(f"{means[w]:>9.5f}" for w in WEIGHTINGS))


if __name__ == "__main__":
    main()
