"""Capture throughput vs a plain forward, and peak memory vs N and L.

    .venv/bin/python bench/bench_capture.py [--threads 2] [--skip-smollm] [--skip-memory]
    .venv/bin/python bench/bench_capture.py --diffusion-gemma

Rows (tokens per second over the same masked sequences and batches):
  forward      the base model's ordinary forward (embedding + block stack), no hooks
  blockwise    qdtk's block-by-block run without hooks (the capture machinery alone)
  capture f64  block by block with hooks, sum x x^T in float64 (METHOD.md §1, the default)
  capture f32  the same with float32 sums within a batch, float64 across batches
The H arithmetic (T m^2 per input, m up to the FFN width) is a fixed cost on top of the forward
(T m n per Linear); the "H flops / fwd flops" column says how large it must be. Timings on a
shared machine are noisy: rerun on a quiet one.

Peak memory: one subprocess per (N, L), the rise of the peak resident set over the loaded model.
--diffusion-gemma: the same for a tiny random DiffusionGemma (8 layers alternating sliding and
full attention, hidden 64; the decoder reads the encoder's cache), whose capture streams the
encoder's cache one layer at a time: with --offload the rise should not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import best, minilm, smollm_gguf  # noqa: E402

MINILM, SMOLLM = minilm(), smollm_gguf()


def _batch(path, N, L):
    from qdtk.formats.calib import calibration_text
    from qdtk.math.mcs import MaskOptions, cut_windows, mask_batch
    from qdtk.torch.capture import load_tokenizer

    tok = load_tokenizer(path)
    stream = np.asarray(tok(calibration_text(None), add_special_tokens=False)["input_ids"])
    ids, att = cut_windows(stream, N, L, seed=0, pad_id=tok.pad_token_id or 0)
    mask_id = tok.mask_token_id if tok.mask_token_id is not None else 0
    return mask_batch(ids, att, mask_id, MaskOptions())


def _flops(session) -> tuple[float, float]:
    """(forward Linear MACs, H MACs) per token over the stack, from block 0's groups."""
    from torch import nn

    blk = session.blocks[0]
    fwd = sum(m.in_features * m.out_features for m in blk.modules() if isinstance(m, nn.Linear))
    stats = session.run_block(0, record=True, advance=False)
    h = sum(s.H.shape[0] ** 2 for s in stats)
    return fwd, h


def throughput(path, N, L, chunk, repeat=2) -> list[dict]:
    import torch

    from qdtk.torch.capture import BlockSession
    from qdtk.torch.models import load_model

    model = load_model(path)
    b = _batch(path, N, L)
    ids, att = torch.as_tensor(b.ids), torch.as_tensor(b.attention).long()
    T = b.tokens

    def forward():
        with torch.inference_mode():
            for i in range(0, N, chunk):
                model.base_model(input_ids=ids[i : i + chunk], attention_mask=att[i : i + chunk])

    def blockwise(record, accumulate="float64"):
        s = BlockSession(model, b.ids, b.attention, chunk_size=chunk, accumulate=accumulate)
        for blk in range(len(s)):
            s.run_block(blk, record=record)

    label = Path(path).parent.name if Path(path).name == "model" else Path(path).stem[:18]
    fwd_macs, h_macs = _flops(BlockSession(model, b.ids[:chunk], b.attention[:chunk]))
    t_fwd = best(forward, repeat, warmup=True)
    rows = []
    for name, fn in (("forward", forward), ("blockwise", lambda: blockwise(False)),
                     ("capture f64", lambda: blockwise(True)),
                     ("capture f32", lambda: blockwise(True, "float32"))):
        t = t_fwd if name == "forward" else best(fn, repeat, warmup=True)
        rows.append({"model": label, "N": N, "L": L, "rows": name,
                     "tok/s": T / t, "overhead": t / t_fwd - 1, "H/fwd flops": h_macs / fwd_macs})
    return rows


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _diffusion_gemma():
    """A tiny random DiffusionGemmaForBlockDiffusion (built here, nothing read) and its
    sequence length limit."""
    import torch
    import transformers

    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                global_head_dim=16, num_global_key_value_heads=1, num_experts=4,
                top_k_experts=2, max_position_embeddings=1024, sliding_window=64,
                layer_types=["sliding_attention", "full_attention"] * 4)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                  patch_size=4, position_embedding_size=16)
    config = transformers.DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=8, boi_token_id=120,
        eoi_token_id=121, image_token_id=122)
    return transformers.DiffusionGemmaForBlockDiffusion(config).eval()


def _peak_child(path: str, N: int, L: int, chunk: int, offload: bool) -> None:
    import gc
    import tempfile

    from qdtk.torch.capture import BlockSession
    from qdtk.torch.models import load_model

    if path == "diffusion-gemma":
        model = _diffusion_gemma()
        ids = np.random.default_rng(0).integers(5, 100, (N, L))
        b = type("B", (), {"ids": ids, "attention": np.ones_like(ids, bool)})
    else:
        model = load_model(path)
        b = _batch(path, N, L)
    gc.collect()
    base, peak, running = _rss_mib(), [0.0], [True]

    def sample():  # the peak resident set while capturing
        while running[0]:
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    with tempfile.TemporaryDirectory() as tmp:
        s = BlockSession(model, b.ids, b.attention, chunk_size=chunk,
                         offload=Path(tmp) / "h" if offload else None)
        for blk in range(len(s)):
            s.run_block(blk)
    running[0] = False
    thread.join()
    print(json.dumps({"rise_mib": peak[0] - base}))


def peak_memory(path, N, L, chunk, offload=False) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), str(N), str(L), str(chunk),
         str(int(offload))], capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["rise_mib"]


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = {"tok/s": "{:,.0f}", "overhead": "{:+.0%}", "H/fwd flops": "{:.2f}",
           "rise MiB": "{:,.0f}", "hidden MiB": "{:,.1f}"}
    cells = [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w[i]) for i, c in enumerate(cols))]
    lines.append("-+-".join("-" * x for x in w))
    lines += [" | ".join(x[i].ljust(w[i]) for i in range(len(cols))) for x in cells]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, path, N, L, chunk, off = sys.argv
        _peak_child(path, int(N), int(L), int(chunk), bool(int(off)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--diffusion-gemma", action="store_true",
                    help="only the peak memory of a tiny DiffusionGemma's capture")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.diffusion_gemma:
        mem = []
        for N, off in ((16, False), (64, False), (256, False), (16, True), (64, True),
                       (256, True)):
            mem.append({"model": "tiny DiffusionGemma", "N": N, "L": 256, "batch": 8,
                        "offload": off, "hidden MiB": N * 256 * 64 * 4 / 2**20,
                        "rise MiB": peak_memory("diffusion-gemma", N, 256, 8, off)})
        print("Peak memory over the built model\n" + _table(mem))
        return
    rows = throughput(MINILM, 16, 256, 8)
    if not a.skip_smollm and SMOLLM.exists():
        try:
            rows += throughput(SMOLLM, 8, 256, 4, repeat=1)
        except Exception as e:  # the GGUF path depends on the installed gguf/transformers
            print(f"SmolLM2 skipped: {e}", file=sys.stderr)
    print("Throughput (CPU, float32)\n" + _table(rows))
    if a.skip_memory:
        return
    mem = []
    for N, L, off in ((16, 128, False), (64, 128, False), (256, 128, False), (64, 512, False),
                      (256, 128, True)):
        mem.append({"model": "all-MiniLM-L6-v2", "N": N, "L": L, "batch": 8, "offload": off,
                    "hidden MiB": N * L * 384 * 4 / 2**20,
                    "rise MiB": peak_memory(MINILM, N, L, 8, off)})
    print("\nPeak memory over the loaded model\n" + _table(mem))


if __name__ == "__main__":
    main()
