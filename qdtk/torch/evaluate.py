"""Layer errors and model-level metrics: how far a quantized model is from the original.

Layer level (NumPy): the relative output error of What on inputs with second moment H,
    ||X W^T - X What^T||^2 / ||X W^T||^2 = tr(D H D^T) / tr(W H W^T),  D = W - What,
the solver's proxy error with the calibration H and the held-out layer error with a held-out H.

Model level (torch, imported inside the functions): the metric that fits the model kind:
- "mlm" (a masked-LM head, dLLMs included): masked-token cross-entropy at mask ratios
  0.15 / 0.5 / 0.85, on masks drawn from a seeded generator once and given to both models;
- "causal": perplexity of next-token prediction;
- "encoder" (no head, e.g. MiniLM): nothing beyond the two cosines below, which every kind gets:
  cosine of the final hidden states (per token) and of the attention-mask-weighted mean-pooled
  sentence embeddings (per window).
The models run one after the other on the same token windows, so only one is in memory at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qdtk.errors import QdtkError
from qdtk.math.forms import proxy_error

log = logging.getLogger(__name__)

MASK_RATIOS = (0.15, 0.5, 0.85)


# ---------------------------------------------------------------- layer level (no torch)


def layer_errors(model_dir: str | Path, quant_dir: str | Path, stats_dir: str | Path
                 ) -> dict[str, float]:
    """Relative output error of every quantized layer on the inputs a stats folder describes.

    With a stats folder captured on held-out text this is the held-out layer error.
    """
    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.io import read_json
    from qdtk.formats.solution import REPORT, read_solution_block, recorded_hash
    from qdtk.formats.stats import Stats

    ckpt, stats = Checkpoint(model_dir), Stats(stats_dir)
    report = read_json(Path(quant_dir) / REPORT)
    errors: dict[str, float] = {}
    for block in report.get("blocks", []):
        path = Path(quant_dir) / block["file"]
        for name, layer in read_solution_block(path, recorded_hash(quant_dir, block)).items():
            W = ckpt.read(name, np.float32)
            H, _ = stats.hessian(name, W.shape[1])
            errors[name] = proxy_error(W, layer.weight(), H)
    return errors


# ---------------------------------------------------------------- text and tokens


def read_text(src: str | Path | None) -> str:
    """The text of SRC: "builtin:NAME" that built-in source's held-out part (never seen by
    calibration), a .txt, .jsonl or a folder of them (see qdtk.formats.calib), or the built-in pydoc
    held-out text when SRC is None."""
    from qdtk.formats.calib import builtin_text, evaluation_text

    return builtin_text("heldout") if src is None else evaluation_text(src)


def default_sources() -> tuple[str, ...]:
    """The evaluation sources when none is named: every built-in source's held-out part."""
    from qdtk.formats.calib import EVAL_SOURCES, PREFIX

    return tuple(PREFIX + s for s in EVAL_SOURCES)


@dataclass
class Windows:
    ids: np.ndarray  # [N, L] int64 token ids
    special: np.ndarray  # [N, L] bool, special tokens added around the text (never masked)


def _special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] ... [SEP], BOS ...)."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for p in range(len(full) - len(bare) + 1):
        if full[p : p + len(bare)] == bare:
            return list(full[:p]), list(full[p + len(bare) :])
    return [], []


def token_windows(text: str, tokenizer, vocab_size: int, n: int, L: int) -> Windows:
    """n windows of L tokens, evenly spaced over the text, each wrapped in the special tokens.

    Without a tokenizer (test checkpoints) the text's bytes modulo the vocabulary are the ids.
    """
    if tokenizer is None:
        stream, before, after = np.frombuffer(text.encode(), np.uint8) % vocab_size, [], []
    else:
        stream = np.array(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
        before, after = _special_wrapping(tokenizer)
    width = L - len(before) - len(after)
    if width < 1 or len(stream) < width:
        raise QdtkError(f"the text has {len(stream)} tokens: too few for windows of {L} tokens")
    starts = np.linspace(0, len(stream) - width, n).astype(np.int64)
    body = np.stack([stream[s : s + width] for s in starts])  # [N, width]
    ids = np.concatenate(
        [np.tile(before, (n, 1)), body, np.tile(after, (n, 1))], axis=1
    ).astype(np.int64)
    special = np.zeros_like(ids, bool)
    special[:, : len(before)] = True
    special[:, L - len(after) :] = True
    return Windows(ids, special)


def mask_positions(special: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """[N, L] bool: round(ratio * non-special tokens) masked positions per window (at least 1),
    drawn from a generator seeded by (seed, window, ratio): the same for every model."""
    out = np.zeros_like(special)
    for i, sp in enumerate(special):
        free = np.flatnonzero(~sp)
        k = max(1, round(ratio * len(free)))
        rng = np.random.default_rng([seed, i, round(ratio * 1000)])
        out[i, rng.choice(free, size=k, replace=False)] = True
    return out


# ---------------------------------------------------------------- models


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module in eval mode
    tokenizer: Any  # or None when the folder has none
    kind: str
    config: dict
    source: str = "the model"  # the folder, named when the model's own code fails


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a checkpoint folder or .gguf file, or None when it has none."""
    from qdtk.torch import models

    try:
        return models.load_tokenizer(path, trust_remote_code)
    except QdtkError:
        log.info("%s: no tokenizer; using byte ids", path)
        return None


def load_for_eval(path: str | Path, dtype: str = "float32", device: str = "cpu",
                  trust_remote_code: bool = False, model_code: str = "auto") -> LoadedModel:
    """A checkpoint folder or .gguf file, loaded with its head (qdtk.torch.models.load_model)."""
    from qdtk.torch import models

    model = models.load_model(path, dtype, device, trust_remote_code, model_code)
    return LoadedModel(model, load_tokenizer(path, trust_remote_code), models.model_kind(model),
                       models.flat_config(model), str(path))


def _forward(model, ids, hidden: bool, source: str = "the model"):
    """(logits or None, final hidden states) of one batch. The windows have no padding, so no
    attention mask is passed: each model then uses its own full (or causal) attention. A
    block-diffusion model reads the window's start as its prompt; both cover the canvas only."""
    from qdtk.torch.models import forward_inputs, own_code_errors

    with own_code_errors(model, source):
        out = model(**forward_inputs(model, ids), output_hidden_states=hidden)
    logits = getattr(out, "logits", None)
    states = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else None
    if states is None:
        states = getattr(out, "last_hidden_state", None)
    return logits, states


def model_outputs(lm: LoadedModel, windows: Windows, masks: dict[float, np.ndarray],
                  mask_id: int | np.ndarray | None, batch: int = 8, device: str = "cpu"
                  ) -> dict[str, Any]:
    """Everything the comparison needs from one model, as NumPy arrays.

    hidden [N, L, d] and embedding [N, d] (mean over the attention mask) on the plain windows;
    per mask ratio the masked tokens' negative log-likelihoods (mlm); per token next-token NLLs
    (causal). mask_id may be an [N, L] array of noise tokens (block diffusion: a masked canvas
    token is a uniformly drawn one; the outputs then cover the canvas only).
    """
    import torch
    import torch.nn.functional as F

    from qdtk.torch.models import logits_shift, prompt_length

    ids_all = torch.from_numpy(windows.ids)
    fill_all = torch.as_tensor(mask_id) if isinstance(mask_id, np.ndarray) else None
    start = prompt_length(lm.model, ids_all.shape[1]) or 0  # first position the outputs cover
    shifted = logits_shift(lm.model) == 1
    hidden, nll_causal = [], []
    nll_masked: dict[float, list] = {r: [] for r in masks}
    with torch.inference_mode():
        for s in range(0, len(ids_all), batch):
            ids = ids_all[s : s + batch].to(device)
            logits, states = _forward(lm.model, ids, hidden=True, source=lm.source)
            hidden.append(states.float().cpu().numpy())
            if lm.kind == "causal":
                nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                      reduction="none")
                nll_causal.append(nll.cpu().numpy())
            for r, mask in masks.items():
                m = torch.from_numpy(mask[s : s + batch]).to(device)
                noised = ids.masked_fill(m, mask_id) if fill_all is None else \
                    torch.where(m, fill_all[s : s + batch].to(device), ids)
                logits, _ = _forward(lm.model, noised, hidden=False, source=lm.source)
                if shifted:  # as Dream's own sampler does: token i from the logits at i - 1
                    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
                m, target = m[:, start:], ids[:, start:]
                nll = F.cross_entropy(logits[m].float(), target[m], reduction="none")
                nll_masked[r].append(nll.cpu().numpy())
    H = np.concatenate(hidden)  # [N, L, d]
    out: dict[str, Any] = {"hidden": H, "embedding": mean_pool(H, np.ones(H.shape[:2]))}
    if nll_causal:
        out["nll"] = np.concatenate(nll_causal)
    out["masked_nll"] = {r: np.concatenate(v) for r, v in nll_masked.items()}
    return out


def mean_pool(H: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """[N, d] sentence embeddings: the attention-mask-weighted mean of H [N, L, d] over L."""
    w = np.asarray(attention, np.float64)  # [N, L]
    return np.einsum("nl,nld->nd", w, H) / np.maximum(w.sum(1, keepdims=True), 1e-12)


def mean_cosine(A: np.ndarray, B: np.ndarray) -> float:
    """Mean over rows of cos(A_i, B_i) (last axis), in float64; zero vectors count as 0."""
    A = np.asarray(A, np.float64).reshape(-1, A.shape[-1])
    B = np.asarray(B, np.float64).reshape(-1, B.shape[-1])
    den = np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1)
    cos = np.divide(np.einsum("ij,ij->i", A, B), den, out=np.zeros(len(A)), where=den > 0)
    return float(np.clip(cos, -1, 1).mean())


def compare_outputs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float]]:
    """metric -> {"a", "b", "ratio"} for losses, metric -> {"value"} for cosines."""
    metrics: dict[str, dict[str, float]] = {}
    for r in a["masked_nll"]:
        ce_a, ce_b = float(a["masked_nll"][r].mean()), float(b["masked_nll"][r].mean())
        metrics[f"masked_ce@{r:g}"] = {"a": ce_a, "b": ce_b, "ratio": ce_b / ce_a}
    if "nll" in a:
        ppl_a, ppl_b = float(np.exp(a["nll"].mean())), float(np.exp(b["nll"].mean()))
        metrics["perplexity"] = {"a": ppl_a, "b": ppl_b, "ratio": ppl_b / ppl_a}
    metrics["hidden_cosine"] = {"value": mean_cosine(a["hidden"], b["hidden"])}
    metrics["embedding_cosine"] = {"value": mean_cosine(a["embedding"], b["embedding"])}
    return metrics


def compare(model_a: str | Path, model_b: str | Path, text: str | None = None, n: int = 32,
            L: int = 128, seed: int = 0, device: str = "cpu", dtype: str = "float32",
            batch: int = 8, trust_remote_code: bool = False, model_code: str = "auto"
            ) -> dict[str, Any]:
    """Compare model B (e.g. quantized) with model A (the original) on windows of `text`
    (default: the built-in pydoc held-out text); compare_texts on one text."""
    text = read_text(None) if text is None else text
    result = compare_texts(model_a, model_b, {"text": text}, n, L, seed, device, dtype, batch,
                           trust_remote_code, model_code)
    result["metrics"] = result.pop("sources")["text"]
    return result


def compare_texts(model_a: str | Path, model_b: str | Path, texts: dict[str, str], n: int = 32,
                  L: int = 128, seed: int = 0, device: str = "cpu", dtype: str = "float32",
                  batch: int = 8, trust_remote_code: bool = False, model_code: str = "auto"
                  ) -> dict[str, Any]:
    """Compare model B with model A on windows of every text (label -> text), each model
    loaded once: result["sources"][label] holds that text's metrics.

    The token windows and the masks are made once per text, from model A's tokenizer (else
    B's) and the seed, and given to both models.
    """
    if n < 1 or L < 2:
        raise QdtkError(f"need at least one window of at least 2 tokens (got n={n}, L={L})")
    if not texts:
        raise QdtkError("nothing to evaluate on: no text source")
    from qdtk.math.mcs import resolve_mask_token_id
    from qdtk.torch.models import prompt_length

    outputs: list[dict[str, Any]] = []
    kinds: list[str] = []
    shared: dict[str, dict] = {}
    for path in (model_a, model_b):
        lm = load_for_eval(path, dtype, device, trust_remote_code, model_code)
        if not shared:
            tokenizer = lm.tokenizer
            if tokenizer is None:
                tokenizer = load_tokenizer(model_b, trust_remote_code)
            longest = lm.config.get("max_position_embeddings")
            if longest is not None and longest < L:
                raise QdtkError(f"{path}: windows of {L} tokens exceed the model's {longest}")
            mask_id = None
            prompt = prompt_length(lm.model, L)  # block diffusion: the canvas is noised
            if lm.kind == "mlm" and prompt is None:
                mask_id = resolve_mask_token_id(
                    lm.config, getattr(tokenizer, "mask_token_id", None), where=str(path))
            for label, text in texts.items():
                windows = token_windows(text, tokenizer, lm.config["vocab_size"], n, L)
                kept = windows.special.copy()
                kept[:, :prompt or 0] = True  # never masked: the prompt
                masks = {r: mask_positions(kept, r, seed) for r in MASK_RATIOS}
                fill = mask_id if prompt is None else np.random.default_rng([seed, L]).integers(
                    0, lm.config["vocab_size"], windows.ids.shape)
                shared[label] = {"windows": windows, "mask_id": fill,
                                 "masks": masks if lm.kind == "mlm" else {}}
        elif lm.kind != kinds[0]:
            raise QdtkError(f"{path}: a {lm.kind} model, but {model_a} is a {kinds[0]} model")
        kinds.append(lm.kind)
        log.info("evaluating %s (%s) on %d x %d windows of %d tokens", path, lm.kind,
                 len(texts), n, L)
        outputs.append({label: model_outputs(lm, s["windows"], s["masks"], s["mask_id"],
                                             batch, device) for label, s in shared.items()})
        del lm
    return {
        "model_a": str(model_a), "model_b": str(model_b), "kind": kinds[0],
        "windows": n, "length": L, "seed": seed,
        "sources": {label: compare_outputs(outputs[0][label], outputs[1][label])
                    for label in texts},
    }


def output_change_fn(path: str | Path, text: str | None = None, n: int = 8, L: int = 128,
                     trust_remote_code: bool = False, device: str = "cpu", skip_head: bool = True,
                     model_code: str = "auto", at_rest: str | None = None):
    """output_change(name, What) -> float for model-scope bit allocation
    (qdtk.math.abmp.sensitivity).

    The model is loaded once; each call replaces the weight `name` alone by What [n, m], runs
    n windows of `text` (default: the built-in calibration text, L capped by the model's
    positions) and returns the sum of squared changes of the final hidden states per token,
    then restores the weight. Only the blocks from the weight's own onward run (the earlier
    ones replay their recorded outputs): about half the forwards of a whole-model pass.
    `skip_head`: a Linear output head (vocabulary-sized, 20% of SmolLM2's flops) returns one
    column instead; the final hidden states do not use it. `device` "cuda" without a usable GPU
    runs on the CPU.

    Every forward computes in float32, but the blocks' weights rest in the dtype the checkpoint
    stores them in (`at_rest`, default `stored_dtype`): a bfloat16 block is widened to float32
    for its call only (exact), so that a bfloat16 model takes half the memory of its float32
    copy plus one block. Models with several block stacks (sharing their weights) or fused
    experts (a weight under test is an expert's rows of a parameter) are held in float32.
    """
    import torch

    from qdtk.formats.calib import calibration_text
    from qdtk.torch.capture import find_blocks, find_stacks
    from qdtk.torch.experts import is_fused_experts

    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    at_rest = stored_dtype(path) if at_rest is None else at_rest
    lm = load_for_eval(path, at_rest, device, trust_remote_code, model_code)
    narrow = at_rest != "float32"
    if narrow and (len(find_stacks(lm.model)) > 1 or any(
            is_fused_experts(m) for m in lm.model.modules())):
        del lm  # loaded again as before: a shared or fused weight cannot be widened alone
        lm, narrow = load_for_eval(path, "float32", device, trust_remote_code, model_code), False
    stack, blocks = find_blocks(lm.model)
    if narrow:  # all but the blocks' parameters in float32 for good
        in_blocks = {id(p) for blk in blocks for p in blk.parameters()}
        for t in (*lm.model.parameters(), *lm.model.buffers()):
            if t.is_floating_point() and id(t) not in in_blocks:
                t.data = t.data.float()
    L = min(L, lm.config.get("max_position_embeddings") or L)
    try:
        windows = token_windows(calibration_text(None) if text is None else text, lm.tokenizer,
                                lm.config["vocab_size"], n, L)
    except QdtkError as e:  # a short calibration file: its windows fit capture's -L, not L
        if text is None:
            raise
        log.warning("sensitivities on the built-in calibration text: %s", e)
        windows = token_windows(calibration_text(None), lm.tokenizer, lm.config["vocab_size"],
                                n, L)
    ids = torch.from_numpy(windows.ids).to(device)
    params = dict(lm.model.named_parameters(remove_duplicate=False))  # tied: under every name

    head = lm.model.get_output_embeddings() if skip_head else None
    skipped = [head] if isinstance(head, torch.nn.Linear) else []
    replay: list = [None] * len(blocks)  # each block's output in the unchanged model

    def hidden(start: int = 0):
        """Final hidden states; blocks before `start` return their recorded outputs instead of
        running (their weights are the original ones), so a weight in block b costs the
        forward of blocks b.. only, with the same numbers as the whole forward."""
        for h in skipped:
            h.forward = lambda x: x[..., :1]  # an instance attribute shadows the method
        for i in range(start):
            blocks[i].forward = lambda *a, _out=replay[i], **k: _out
        for blk in blocks[start:] if narrow else ():
            blk.forward = in_float32(blk)
        try:
            with torch.inference_mode():
                return _forward(lm.model, ids, hidden=True, source=lm.source)[1].double()
        finally:
            for m in skipped + list(blocks if narrow else blocks[:start]):
                del m.forward

    def record(i: int):
        def hook(module, args, out):
            replay[i] = out
        return hook

    handles = [blk.register_forward_hook(record(i)) for i, blk in enumerate(blocks)]
    try:
        try:
            base = hidden()
        except Exception:  # a model's own code that needs the full logits: keep its head
            if not skipped:
                raise
            log.debug("%s: the forward needs its output head; running it", path)
            skipped.clear()
            base = hidden()
    finally:
        for h in handles:
            h.remove()

    def first_block(key: str) -> int:
        """The block holding model parameter `key`; 0 (run everything) outside the stack."""
        rest = key[len(stack) + 1:].split(".", 1)[0] if key.startswith(stack + ".") else ""
        return int(rest) if rest.isdigit() else 0

    def param_of(name: str):
        """(model parameter name, the tensor holding weight `name`: the parameter, or for a
        per-expert checkpoint weight its slice of the fused expert parameter)."""
        from qdtk.formats.experts import expert_slot

        slot = expert_slot(name)
        target = name if slot is None or name in params else slot.param
        # checkpoint names may lack or carry the model's prefix ("bert.", "model.")
        hits = [(k, p) for k, p in params.items() if k == target] or [
            (k, p) for k, p in params.items()
            if k.endswith("." + target) or target.endswith("." + k)]
        if len(hits) != 1:
            raise QdtkError(f"{path}: {len(hits)} model parameters match the weight {name!r}")
        key, p = hits[0]
        if target != name:  # [E, rows, cols] fused experts: expert e's rows
            p = p.data[slot.expert, slot.rows(p.shape[1])]
        return key, p

    def output_change(name: str, What: np.ndarray) -> float:
        key, p = param_of(name)
        new = torch.from_numpy(np.asarray(What, np.float32)).to(p.device)  # float32 at rest too
        # A parameter gets What as its tensor and its own back after: written into, the
        # weights of a model loaded from a memory-mapped checkpoint (transformers maps the
        # file) would each become a private copy, the size of every Linear by the pass's end.
        # An expert's rows of a fused parameter can only be written into.
        swap = isinstance(p, torch.nn.Parameter)
        old = p.data if swap else p.clone()
        if swap:
            p.data = new
        else:
            p.copy_(new)
        try:
            return float(((hidden(first_block(key)) - base) ** 2).sum() / ids.numel())
        finally:
            if swap:
                p.data = old
            else:
                p.copy_(old)

    return output_change


def stored_dtype(path: str | Path) -> str:
    """The dtype a checkpoint folder stores its Linear weights in: "bfloat16" or "float16" when
    all of them are, else (mixed, float32, a GGUF file) "float32"."""
    from qdtk.formats.checkpoint import Checkpoint

    if not Path(path).is_dir():
        return "float32"
    ckpt = Checkpoint(path)
    codes = {ckpt.info(w).dtype for w in ckpt.linear_names()}
    return {frozenset({"BF16"}): "bfloat16", frozenset({"F16"}): "float16"}.get(
        frozenset(codes), "float32")


def in_float32(module):
    """A forward for `module` that runs its own with its narrower floating parameters widened
    to float32 for the call (a parameter already float32, as a weight under test, is left)."""
    import torch

    def forward(*args, **kwargs):
        low = [(p, p.data) for p in module.parameters()
               if p.is_floating_point() and p.dtype != torch.float32]
        for p, kept in low:
            p.data = kept.float()
        try:
            return type(module).forward(module, *args, **kwargs)
        finally:
            for p, kept in low:
                p.data = kept
    return forward
