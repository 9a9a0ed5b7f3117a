"""MCS capture: run the real model block by block on masked sequences and record H per input.

The only library module that runs a model (torch and transformers are imported inside the
functions). The flow, for S masked sequences in chunks of `chunk_size`:

1. Embed: a forward of the whole model per chunk, stopped by a sentinel exception at the first
   block's pre-forward hook, yields the hidden states entering block 0 and the block's extra
   arguments (attention mask, rotary position embeddings, ...) as the model itself builds them.
   Those extra arguments are rebuilt the same way whenever a chunk enters block b: the same
   forward, stopped at block b, with the blocks before it passing their input through unrun,
   so that each block gets its own (models alternating sliding-window and full attention hand
   their layers different masks).
2. For each block b: forward hooks on every nn.Linear of the block accumulate sum x x^T over
   the non-padding tokens, in float64. Linears reading the same tensor object (q/k/v,
   gate/up) form one input and are counted once, under the module path of the first reader.
   The block's outputs replace its inputs in the store (host memory, or files with offload):
   only the block being run is on the device.
3. The sums become H = (2/T) sum x x^T in the stats format of qdtk.formats.stats, one file
   per block.

Resume: StatsWriter keeps finished blocks; a rerun recomputes the hidden states entering the
first unfinished block by re-running the finished blocks' forward without hooks (cheaper than
capturing, and no hidden states need to survive a kill).

HF Conv1D (GPT-2 style, weight stored [in, out]) is not captured: quantize expects [out, in].
"""

from __future__ import annotations

import logging
import shutil
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qdtk.errors import QdtkError
from qdtk.formats.stats import VALIDATION, InputStat, StatsWriter, hessian_from_sums
from qdtk.formats.validate import check_model_finite
from qdtk.math.mcs import (
    MaskedBatch,
    MaskOptions,
    cut_windows,
    mask_batch,
    resolve_mask_token_id,
    validation_windows,
)
from qdtk.torch.experts import expert_names
from qdtk.torch.models import (
    flat_config,
    load_model,
    load_tokenizer,
    own_code_errors,
    prompt_length,
    split_model_path,
)

log = logging.getLogger(__name__)

ACCUMULATE = ("float64", "float32")
_CACHE_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past")


# ----------------------------------------------------------------------------- loading


def model_fingerprint(path: str | Path) -> tuple[str, list[str] | None]:
    """(fingerprint, checkpoint tensor names or None for a GGUF file)."""
    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.io import fingerprint

    folder, gguf = split_model_path(path)
    if gguf:
        st = (folder / gguf).stat()
        return fingerprint(gguf, st.st_size, st.st_mtime_ns), None
    ckpt = Checkpoint(folder)
    return ckpt.fingerprint(), ckpt.names()


# ----------------------------------------------------------------------------- structure


# Another untied stack of transformer blocks with at least this share of the largest one's
# parameters is a second network the forward runs (T5's encoder beside its decoder), not a
# vision tower (a few percent of a multimodal LM: DiffusionGemma-26B's is about 2%).
RIVAL_STACK_SHARE = 0.25


def find_stacks(model) -> list[tuple[str, Any]]:
    """The transformer block stacks the forward runs, (name, ModuleList) in model order: the
    nn.ModuleList of blocks of one class, not nested in another such list (so MoE expert lists
    lose), that holds the most parameters (a vision tower's holds fewer), with every other such
    list whose blocks share all their parameters with it block by block (DiffusionGemma's
    encoder and decoder run the same weights). A second large stack with weights of its own (an
    encoder-decoder such as T5) is an error: capture follows one stack."""
    from torch import nn

    lists = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1
    ]
    outer = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists if o)]
    if not outer:
        raise QdtkError(f"{type(model).__name__}: no stack of transformer blocks (nn.ModuleList)")

    def params(blocks) -> list[set[int]]:
        return [{id(p) for p in blk.parameters()} for blk in blocks]

    size = {n: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
            for n, m in outer}
    main_name, main = max(outer, key=lambda nm: (size[nm[0]], len(nm[1])))
    own = params(main)
    stacks = [(n, m) for n, m in outer if n == main_name or (
        len(m) == len(main) and all(a and a <= b for a, b in zip(params(m), own, strict=True)))]
    rivals = [n for n, m in outer if n not in dict(stacks) and
              size[n] >= RIVAL_STACK_SHARE * size[main_name] and
              all(sum(isinstance(x, nn.Linear) for x in blk.modules()) >= 2 for blk in m)]
    if rivals:
        found = ", ".join(f"{n} ({len(m)} blocks)" for n, m in outer if n in {main_name, *rivals})
        raise QdtkError(f"{type(model).__name__}: several block stacks with weights of their "
                        f"own ({found}); qdtk captures one stack, or a block-diffusion encoder "
                        "and decoder that share their weights, not an encoder-decoder such as T5")
    return stacks


def find_blocks(model) -> tuple[str, Any]:
    """(name, ModuleList) of the block stack whose outputs the model's result comes from: the
    largest stack (find_stacks), the last to run where several share its weights."""
    return find_stacks(model)[-1]


@dataclass(frozen=True)
class NameMap:
    """Model parameter names -> checkpoint tensor names: strip one prefix, add another (a head
    model loading a base checkpoint has "bert."/"model." more; the reverse has one less)."""

    strip: str = ""
    add: str = ""

    def __call__(self, name: str) -> str:
        return self.add + name[len(self.strip):] if name.startswith(self.strip) else name


def name_map(model_names: Iterable[str], ckpt_names: Iterable[str] | None) -> NameMap:
    """The prefix fix that maps every model weight name to a checkpoint tensor name."""
    model_names = list(model_names)
    if ckpt_names is None:
        return NameMap()
    ckpt = set(ckpt_names)

    def prefixes(names):
        out = {""}
        for n in names:
            parts = n.split(".")
            out |= {".".join(parts[:k]) + "." for k in (1, 2) if len(parts) > k}
        return out

    candidates = [(s, a) for s in prefixes(model_names) for a in prefixes(ckpt)]
    best = max(candidates, key=lambda sa: (
        sum(NameMap(*sa)(n) in ckpt and n.startswith(sa[0]) for n in model_names),
        -len(sa[0]) - len(sa[1]),
    ))
    fix = NameMap(*best)
    missing = [n for n in model_names if fix(n) not in ckpt]
    if missing:
        raise QdtkError(
            f"the checkpoint has no tensor for the model's Linear weight {missing[0]!r} "
            f"({len(missing)} unmatched); is the folder the model's own checkpoint?"
        )
    return fix


def block_experts(block, prefix: str, fix: NameMap, ckpt_names: Iterable[str] | None
                  ) -> dict[str, Any]:
    """Checkpoint prefix ("....experts") -> fused experts module, for the fused MoE layers of
    one block whose checkpoint stores the experts per expert or as the fused 3-D tensors
    (qdtk.torch.experts; qdtk.formats.checkpoint reads the latter per expert)."""
    from qdtk.formats.experts import expert_weight
    from qdtk.torch.experts import is_fused_experts

    names = set(ckpt_names or ())
    out = {}
    for rel, mod in block.named_modules():
        if not is_fused_experts(mod):
            continue
        ckpt_prefix = fix(f"{prefix}.{rel}.").rstrip(".")
        if ckpt_names is not None and expert_weight(ckpt_prefix, 0, "gate_proj") not in names \
                and f"{ckpt_prefix}.gate_up_proj" not in names:
            log.warning("%s: the checkpoint stores these experts neither per expert nor as "
                        "fused tensors; they stay in full precision", ckpt_prefix)
            continue
        out[ckpt_prefix] = mod
    return out


def block_linears(block, prefix: str, fix: NameMap) -> dict[str, Any]:
    """Checkpoint weight name -> nn.Linear for the Linears of one block."""
    from torch import nn

    return {
        fix(f"{prefix}.{rel}.weight"): mod
        for rel, mod in block.named_modules()
        if isinstance(mod, nn.Linear)
    }


def twin_modules(twin, block, names: dict[str, Any]) -> list[tuple[str, Any]]:
    """(checkpoint name, module of `twin`) for the modules of `block` named in `names`
    (checkpoint name -> module), where `twin` is a block of a stack that shares `block`'s
    weights: the module under the same relative path, which must hold the same parameters."""
    path = {id(m): rel for rel, m in block.named_modules()}
    out = []
    for name, mod in names.items():
        other = twin.get_submodule(path[id(mod)])
        if {id(p) for p in other.parameters()} != {id(p) for p in mod.parameters()}:
            raise QdtkError(f"{name}: the module that shares its weights in another block stack "
                            f"holds other parameters; cannot capture it")
        out.append((name, other))
    return out


# ----------------------------------------------------------------------------- accumulation


def add_xtx(S, X, accumulate: str = "float64"):
    """S + X^T X for X [T, m]; S None starts a sum. Returns the running float64 sum.

    CPU: BLAS syrk into the upper triangle of a NumPy [m, m] array, in place (half the flops of
    a matmul); CUDA: a torch [m, m] float64 tensor. "float64": products and sums in float64
    (METHOD.md §1). "float32": products summed in float32 within this call (bf16/fp16 inputs on CUDA
    use tensor cores with exact products), then added in float64.
    """
    import torch

    m = X.shape[1]
    if X.is_cuda:
        if accumulate == "float64":
            Xd = X.to(torch.float64)
            P = Xd.T @ Xd
        elif X.dtype in (torch.bfloat16, torch.float16):
            P = torch.mm(X.T, X, out_dtype=torch.float32).to(torch.float64)
        else:
            Xf = X.to(torch.float32)
            P = (Xf.T @ Xf).to(torch.float64)
        return P if S is None else S.add_(P)
    from scipy.linalg.blas import dsyrk, ssyrk

    if S is None:
        S = np.zeros((m, m), order="F")  # upper triangle used
    if accumulate == "float64":
        A = X.to(torch.float64).contiguous().numpy().T  # [m, T], Fortran order: no copy
        dsyrk(1.0, A, beta=1.0, c=S, trans=0, lower=0, overwrite_c=1)
    else:
        A = X.to(torch.float32).contiguous().numpy().T
        S += ssyrk(1.0, A, trans=0, lower=0)
    return S


def xtx_value(S) -> np.ndarray:
    """The symmetric float64 [m, m] matrix of a running sum from add_xtx."""
    if not isinstance(S, np.ndarray):
        return S.cpu().numpy()
    U = np.triu(S)
    return U + np.triu(U, 1).T


def _pairs(d) -> list[tuple[str, Any]]:
    return list(d.items()) if isinstance(d, dict) else list(d or ())


class Recorder:
    """Forward hooks on the Linears of one block: sum x x^T per distinct input tensor.

    The first Linear to read a tensor accumulates it; later readers of the same object (weakly
    referenced, so a freed tensor's reused id cannot alias) only join its members. Fused MoE
    experts (qdtk.torch.experts) are hooked as a whole: each expert's gate/up and down inputs from
    the tokens routed to it, and the layer's input over all tokens for experts that get too few.
    """

    def __init__(self, blocks, linears, accumulate: str, experts=None,
                 expert_weighting: str = "tokens"):
        """blocks: the block (or blocks sharing its weights) the hooked modules belong to;
        linears and experts: checkpoint name -> module, as a dict or (name, module) pairs (two
        modules sharing one weight, as DiffusionGemma's encoder and decoder, add to one H)."""
        self.accumulate = accumulate
        self.keep = None  # [B*L] bool on the device: the tokens that count
        self.all_kept = False
        self.sums: dict[str, Any] = {}  # key -> running sum (add_xtx)
        self.rows: dict[str, int] = {}  # key -> tokens summed (an expert: those routed to it)
        self.mass: dict[str, float] = {}  # key -> sum of the tokens' factors (qdtk.torch.experts)
        self.expert_weighting = expert_weighting
        self.members: dict[str, list[str]] = {}  # key -> checkpoint weight names
        self.experts = dict(_pairs(experts))  # checkpoint prefix "...experts" -> a fused module
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles = [blk.register_forward_pre_hook(lambda *_: self._seen.clear())
                         for blk in (blocks if isinstance(blocks, (list, tuple)) else [blocks])]
        for name, mod in _pairs(linears):
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        for prefix, mod in _pairs(experts):
            self._handles.append(mod.register_forward_hook(self._expert_hook(prefix),
                                                           with_kwargs=True))

    def _add(self, key: str, X, factor=None) -> None:
        """Add X [T, m] to key's sum, each token times factor [T] (None: 1)."""
        if factor is not None:
            X = X * factor.sqrt().to(X.dtype)[:, None]
        self.sums[key] = add_xtx(self.sums.get(key), X, self.accumulate)
        self.rows[key] = self.rows.get(key, 0) + int(X.shape[0])
        self.mass[key] = self.mass.get(key, 0.0) + (
            int(X.shape[0]) if factor is None else float(factor.sum()))

    def _tokens(self, name: str, x):
        """x as [T, m] over the counted tokens (padding removed). A 2-D input of fewer rows
        than tokens is a subset of them: an expert of a MoE that holds its experts as a list
        of modules, called on the tokens routed to it (OLMoE-style remote code, Qwen3-MoE on
        transformers 4); exact without padding, which such an input cannot tell apart."""
        X = x.reshape(-1, x.shape[-1])  # [B*L, m]
        if X.shape[0] == self.keep.numel():
            return X if self.all_kept else X[self.keep]
        if x.ndim == 2 and X.shape[0] < self.keep.numel():
            if not self.all_kept:
                raise QdtkError(f"{name}: its input holds only the tokens routed to it, among "
                                f"which padding cannot be told apart; calibrate on windows "
                                f"without padding (more text, or a smaller -L)")
            return X
        raise QdtkError(f"{name}: input of shape {list(x.shape)} is not [batch, length, "
                        f"features]; cannot tell padding apart")

    def _hook(self, name: str):
        key_of = name.removesuffix(".weight")

        def hook(module, args, output):
            x = args[0]
            hit = self._seen.get(id(x))
            if hit is not None and hit[0]() is x:
                if name not in self.members[hit[1]]:
                    self.members[hit[1]].append(name)
                return
            self._seen[id(x)] = (weakref.ref(x), key_of)
            self.members.setdefault(key_of, [name])
            self._add(key_of, self._tokens(name, x))

        return hook

    def _expert_hook(self, prefix: str):
        from qdtk.formats.experts import expert_weight
        from qdtk.torch.experts import routed, token_weights

        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights")
            self._add(prefix, self._tokens(prefix, hidden))  # every token: the fallback's
            keep = None if self.all_kept else self.keep
            for e, X, A, w in routed(module, hidden, index, keep, weights):
                factor = token_weights(w, self.expert_weighting)
                gate, down = f"{prefix}.{e}.gate_proj", f"{prefix}.{e}.down_proj"
                self.members.setdefault(gate, [expert_weight(prefix, e, p)
                                               for p in ("gate_proj", "up_proj")])
                self.members.setdefault(down, [expert_weight(prefix, e, "down_proj")])
                self._add(gate, X, factor)
                self._add(down, A, factor)

        return hook

    def statistics(self, only: set[str] | None = None) -> list[InputStat]:
        """The H of every input recorded; experts that fewer than MIN_EXPERT_TOKENS tokens
        reached take the layer's input over all tokens (gate/up) and the pooled down input
        of the layer's routed experts (down), marked as fallbacks."""
        from qdtk.formats.experts import expert_weight
        from qdtk.torch.experts import MIN_EXPERT_TOKENS

        stats, expert_keys = [], self._expert_keys()
        for key, members in self.members.items():
            if key in expert_keys and self.rows[key] < MIN_EXPERT_TOKENS:
                continue  # the fallback below
            chosen = [m for m in members if only is None or m in only]
            if chosen:
                stats.append(InputStat(key, chosen, self._H(key), self.rows[key]))
        for prefix, mod in self.experts.items():
            downs = [k for k in self.members if k.startswith(prefix + ".")
                     and k.endswith(".down_proj") and self.rows[k] >= MIN_EXPERT_TOKENS]
            pooled = sum(xtx_value(self.sums[k]) for k in downs) if downs else None
            pooled_mass = sum(self.mass[k] for k in downs)
            for e in range(mod.gate_up_proj.shape[0]):
                gate, down = f"{prefix}.{e}.gate_proj", f"{prefix}.{e}.down_proj"
                routed_rows = self.rows.get(gate, 0)
                if routed_rows >= MIN_EXPERT_TOKENS:
                    continue
                if pooled is None:
                    raise QdtkError(f"{prefix}: no expert received {MIN_EXPERT_TOKENS} "
                                    f"calibration tokens; calibrate on more text")
                for key, names, H in (
                    (gate, [expert_weight(prefix, e, p) for p in ("gate_proj", "up_proj")],
                     self._H(prefix)),
                    (down, [expert_weight(prefix, e, "down_proj")],
                     hessian_from_sums(pooled, pooled_mass)),
                ):
                    chosen = [m for m in names if only is None or m in only]
                    if chosen:
                        stats.append(InputStat(key, chosen, H, routed_rows,
                                               fallback="all tokens" if key == gate
                                               else "pooled experts"))
        return stats

    def _expert_keys(self) -> set[str]:
        return {k for k in self.members for p in self.experts if k.startswith(p + ".")}

    def _H(self, key: str) -> np.ndarray:
        return hessian_from_sums(xtx_value(self.sums[key]), self.mass[key])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ----------------------------------------------------------------------------- hidden states


class HiddenStore:
    """The hidden states of every chunk between two blocks: host memory, or one file per chunk
    under `folder` (offload). Outputs of a block overwrite its inputs chunk by chunk."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._mem: dict[int, Any] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def __setitem__(self, c: int, h) -> None:
        import torch

        h = h.detach().to("cpu")
        if self.folder is None:
            self._mem[c] = h
        else:
            torch.save(h, self.folder / f"{c:05d}.pt")

    def __getitem__(self, c: int):
        import torch

        if self.folder is None:
            return self._mem[c]
        return torch.load(self.folder / f"{c:05d}.pt", weights_only=True)

    def close(self) -> None:
        self._mem.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _Stop(BaseException):
    """Raised by the first block's pre-hook to end the embedding forward (a BaseException, so
    that no `except Exception` in a model's own code, or in qdtk's, can swallow it)."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs


def _to(obj, device):
    """Tensors inside nested tuples/lists/dicts moved to `device`."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class BlockSession:
    """S masked sequences flowing through the block stack of `model`, one block at a time.

    `position` is the block whose inputs the store holds. `run_block(b)` runs block b (which
    must be `position`) on every chunk, optionally recording H, optionally advancing.

    A block-diffusion encoder-decoder (qdtk.torch.models.canvas_length: DiffusionGemma) has two
    stacks sharing their weights (find_stacks): block b is encoder layer b on the clean prompt
    (the first tokens of each sequence), then decoder layer b on the noised canvas (the rest)
    reading the encoder's cache; one H per weight sums the inputs of both. Their arguments (masks,
    rotary embeddings) come from one full forward per chunk, recorded at the start. The cache is
    streamed, not held: the recorded cache is emptied, encoder layer b writes its layer into it
    when block b runs and decoder layer b reads it right after, so the session holds one layer's
    keys and values of one chunk at a time (under the sequential order, those of the encoder as
    the session runs it: the quantized model's).
    """

    def __init__(
        self,
        model,
        ids: np.ndarray,
        attention: np.ndarray,
        *,
        device: str = "cpu",
        chunk_size: int = 8,
        offload: Path | None = None,
        accumulate: str = "float64",
        ckpt_names: Iterable[str] | None = None,
        progress: bool = False,
        source: str | Path = "the model",
        expert_weighting: str = "tokens",
    ):
        import torch

        from qdtk.torch.experts import EXPERT_WEIGHTINGS
        from qdtk.torch.models import prompt_length

        if expert_weighting not in EXPERT_WEIGHTINGS:
            raise QdtkError(f"unknown expert weighting {expert_weighting!r} "
                            f"({', '.join(EXPERT_WEIGHTINGS)})")
        self.expert_weighting = expert_weighting

        if accumulate not in ACCUMULATE:
            raise QdtkError(f"unknown accumulation {accumulate!r} (float64 or float32)")
        self.model, self.device, self.accumulate = model, device, accumulate
        self.source = source  # the model folder, named when the model's own code fails
        self._tuple_out: bool | None = None  # whether the blocks return tuples (learnt)
        self.progress = progress
        self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))  # [S, L]
        self.attention = torch.as_tensor(np.asarray(attention, dtype=bool))  # [S, L]
        S, L = self.ids.shape
        self.chunks = [slice(i, min(i + max(chunk_size, 1), S)) for i in range(0, S, chunk_size)]
        self.tokens = int(self.attention.sum())
        stacks = find_stacks(model)
        P = prompt_length(model, L)
        if (P is None) != (len(stacks) == 1) or len(stacks) > 2:
            raise QdtkError(f"{type(model).__name__}: {len(stacks)} block stacks share their "
                            f"weights ({', '.join(n for n, _ in stacks)}); qdtk captures one "
                            f"stack, or a block-diffusion encoder and decoder")
        self.parts = [blocks for _, blocks in stacks]  # in forward order
        self.spans = [slice(0, L)] if P is None else [slice(0, P), slice(P, L)]  # their tokens
        self.stack, self.blocks = self._naming_stack(stacks, ckpt_names)
        model_weights = [
            f"{self.stack}.{b}.{rel}.weight"
            for b, blk in enumerate(self.blocks)
            for rel, mod in blk.named_modules()
            if isinstance(mod, torch.nn.Linear)
        ]
        self.fix = name_map(model_weights, ckpt_names)
        self.linears = [
            block_linears(blk, f"{self.stack}.{b}", self.fix) for b, blk in enumerate(self.blocks)
        ]
        self.experts = [block_experts(blk, f"{self.stack}.{b}", self.fix, ckpt_names)
                        for b, blk in enumerate(self.blocks)]
        self.store = HiddenStore(offload)
        self.position = 0
        self._recorded: dict[int, list[list[tuple[tuple, dict]]]] = {}  # chunk -> part -> block
        with torch.inference_mode():
            for c in range(len(self.chunks)):
                for k, h in enumerate(self._first_hidden(c)):
                    self.store[self._key(k, c)] = h

    def __len__(self) -> int:
        return len(self.blocks)

    @staticmethod
    def _naming_stack(stacks, ckpt_names) -> tuple[str, Any]:
        """The stack whose Linear weights the checkpoint names (its twins share them)."""
        from torch import nn

        if ckpt_names is None:
            return stacks[-1]
        for name, blocks in stacks:
            weights = [f"{name}.{b}.{rel}.weight" for b, blk in enumerate(blocks)
                       for rel, mod in blk.named_modules() if isinstance(mod, nn.Linear)]
            try:
                name_map(weights, ckpt_names)
            except QdtkError:
                continue
            return name, blocks
        return stacks[-1]  # name_map names what is missing

    def _key(self, k: int, c: int) -> int:
        return c * len(self.parts) + k

    def block_name(self, b: int) -> str:
        """The block's name in checkpoint naming, e.g. "model.layers.3"."""
        return self.fix(f"{self.stack}.{b}.").rstrip(".")

    def _first_hidden(self, c: int) -> list:
        """Per part, block 0's hidden states on chunk c (an encoder-decoder's forward also
        records every block's other arguments)."""
        if len(self.parts) > 1:
            self._recorded[c], hidden = self._record_forward(c)
            return hidden
        return [self._stopped_entry(c, 0)[0][0]]

    def _entry(self, c: int, b: int = 0) -> list[tuple[tuple, dict]]:
        """Per part (stack), the arguments the model hands block b on chunk c: (args, kwargs),
        the hidden states first (None for an encoder-decoder's: they are in the store)."""
        if len(self.parts) > 1:
            return [blocks[b] for blocks in self._recorded[c]]
        return [self._stopped_entry(c, b)]

    def _forward(self, c: int) -> None:
        from qdtk.torch.models import forward_inputs

        sl = self.chunks[c]
        att = self.attention[sl]
        kwargs = forward_inputs(self.model, self.ids[sl], None if bool(att.all()) else att)
        with own_code_errors(self.model, self.source):
            try:
                self.model(**kwargs, use_cache=False)
            except TypeError as e:
                if "use_cache" not in str(e):
                    raise
                self.model(**kwargs)

    # The model's own forward builds the block arguments; block b's pre-hook stops it. The
    # blocks before b return their input unchanged instead of running: their outputs do not
    # matter, only the arguments the model hands block b (its own attention mask on models that
    # alternate sliding-window and full attention).
    def _stopped_entry(self, c: int, b: int) -> tuple[tuple, dict]:
        def stop(module, args, kwargs):
            raise _Stop(args, kwargs)

        def passthrough(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            return (h,) if self._tuple_out else h

        assert b == 0 or self._tuple_out is not None, "block 0 runs before the others"
        handle = self.blocks[b].register_forward_pre_hook(stop, with_kwargs=True)
        for blk in self.blocks[:b]:
            blk.forward = passthrough  # an instance attribute shadows the method
        try:
            self._forward(c)
        except _Stop as s:
            args, kwargs = s.args, dict(s.kwargs)
        else:
            raise QdtkError(f"{type(self.model).__name__}: the forward never reached "
                            f"{self.stack}.{b}; cannot capture its blocks")
        finally:
            handle.remove()
            for blk in self.blocks[:b]:
                del blk.forward
        return _block_inputs(args, kwargs, self.stack, writes_cache=True)

    def _record_forward(self, c: int) -> tuple[list[list[tuple[tuple, dict]]], list]:
        """Every block's arguments of every part from one full forward of chunk c, without
        their hidden states (returned apart: block 0's of each part). The parts share the
        cache the first part writes; it is emptied here, and refilled one layer at a time by
        `_call` (streamed)."""
        got: list[list] = [[None] * len(blocks) for blocks in self.parts]
        first: list = [None] * len(self.parts)

        def hook(k: int, b: int):
            def pre(module, args, kwargs):
                a, kw = _block_inputs(args, kwargs, self.stack, writes_cache=False)
                if b == 0:
                    first[k] = a[0]
                got[k][b] = ((None, *a[1:]), kw)
            return pre

        handles = [blk.register_forward_pre_hook(hook(k, b), with_kwargs=True)
                   for k, blocks in enumerate(self.parts) for b, blk in enumerate(blocks)]
        try:
            self._forward(c)
        finally:
            for h in handles:
                h.remove()
        if any(x is None for part in got for x in part):
            raise QdtkError(f"{type(self.model).__name__}: the forward did not run every block "
                            f"of {self.stack}; cannot capture its blocks")
        for cache in _caches(got):
            for layer in range(len(cache.layers)):
                _empty_layer(cache, layer)
        return got, first

    def _call(self, b: int, c: int, rec: Recorder | None = None) -> list:
        """Block b of every part on chunk c's stored hidden states; their outputs. An
        encoder-decoder's cache gets layer b from the encoder's call (written afresh, so a rerun
        does not write twice), the decoder's call reads it, then it is dropped."""
        sl, outs = self.chunks[c], []
        entries = self._entry(c, b)
        caches = _caches([entries]) if len(self.parts) > 1 else []
        for cache in caches:
            _empty_layer(cache, b)
        for k, (blocks, span, (args, kwargs)) in enumerate(
                zip(self.parts, self.spans, entries, strict=True)):
            if rec is not None:
                att = self.attention[sl, span]
                rec.keep, rec.all_kept = att.reshape(-1).to(self.device), bool(att.all())
            h = self.store[self._key(k, c)].to(self.device)
            with own_code_errors(self.model, self.source):
                out = blocks[b](h, *_to(args[1:], self.device), **_to(kwargs, self.device))
            self._tuple_out = isinstance(out, (tuple, list))  # what the model's loop expects
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        for cache in caches:
            _empty_layer(cache, b)
        return outs

    def _recorder(self, b: int) -> Recorder:
        """Hooks on block b's Linears and experts in every part (twins under the same names)."""
        linears, experts = list(self.linears[b].items()), list(self.experts[b].items())
        own = self.blocks[b]
        for blocks in self.parts:
            if blocks[b] is not own:
                linears += twin_modules(blocks[b], own, self.linears[b])
                experts += twin_modules(blocks[b], own, self.experts[b])
        return Recorder([blocks[b] for blocks in self.parts], linears, self.accumulate, experts,
                        self.expert_weighting)

    def _to_device(self, b: int, device: str) -> None:
        for blocks in self.parts:
            blocks[b].to(device)

    def run_block(
        self, b: int, record: bool | Iterable[str] = True, advance: bool = True
    ) -> list[InputStat]:
        """Run block b on every chunk. record: True (every Linear), False, or the checkpoint
        weight names whose H to return. advance: the outputs become block b+1's inputs."""
        import torch
        from tqdm import tqdm

        if b != self.position:
            raise QdtkError(f"block {b} requested, but the hidden states are at block "
                            f"{self.position}")
        linears = self.linears[b]
        only = None if isinstance(record, bool) else set(record)
        known = set(linears) | {m for p, mod in self.experts[b].items()
                                for m in expert_names(p, mod)}
        if only is not None and not only <= known:
            raise QdtkError(f"{self.block_name(b)}: no Linear named {sorted(only - known)}")
        rec = self._recorder(b) if record else None
        self._to_device(b, self.device)
        try:
            with torch.inference_mode():
                bar = tqdm(total=int(self.ids.shape[0]), desc=self.block_name(b), unit="seq",
                           leave=False, disable=not self.progress)
                for c, sl in enumerate(self.chunks):
                    outs = self._call(b, c, rec)
                    if advance:
                        for k, h in enumerate(outs):
                            self.store[self._key(k, c)] = h
                    bar.update(sl.stop - sl.start)
                bar.close()
        finally:
            if rec is not None:
                rec.remove()
            if self.device != "cpu":
                self._to_device(b, "cpu")
        if advance:
            self.position = b + 1
        if rec is None:
            return []
        return rec.statistics(only)

    def weights(self, b: int) -> list[str]:
        """The checkpoint weight names of block b's Linears and expert matrices."""
        return [*self.linears[b], *(m for p, mod in self.experts[b].items()
                                    for m in expert_names(p, mod))]

    def _weight(self, b: int, name: str):
        """The tensor holding weight `name` of block b: a Linear's weight, or an expert's rows
        of its fused parameter."""
        from qdtk.formats.experts import expert_slot

        mod = self.linears[b].get(name)
        if mod is not None:
            return mod.weight
        slot = expert_slot(name)
        prefix, _, param = slot.param.rpartition(".") if slot else ("", "", "")
        experts = self.experts[b].get(prefix)
        if experts is None:
            raise QdtkError(f"{self.block_name(b)}: no Linear weight named {name!r}")
        fused = getattr(experts, param)  # [E, rows, cols]
        return fused.data[slot.expert, slot.rows(fused.shape[1])]

    def set_weights(self, b: int, weights: dict[str, np.ndarray]) -> None:
        """Replace Linear and expert weights of block b (checkpoint name -> [n, m] array); a
        weight shared by several stacks changes in all."""
        import torch

        for name, W in weights.items():
            target = self._weight(b, name)
            if tuple(W.shape) != tuple(target.shape):
                raise QdtkError(f"{name}: new weight has shape {list(W.shape)}, the model's is "
                                f"{list(target.shape)}")
            with torch.no_grad():
                target.copy_(torch.as_tensor(np.asarray(W, dtype=np.float32)))

    def hidden(self, c: int, part: int = -1):
        """The stored hidden states of chunk c (the inputs of block `position`; of the last
        part, the decoder, for an encoder-decoder), on the CPU."""
        return self.store[self._key(part % len(self.parts), c)]

    def estimate_bytes(self) -> int:
        """H storage of the whole stack (float32), from block 0's inputs on the first chunk."""
        import torch

        rec = Recorder(self.blocks[0], self.linears[0], self.accumulate)
        try:
            with torch.inference_mode():
                self._to_device(0, self.device)
                self._call(0, 0, rec)
        finally:
            rec.remove()
            if self.device != "cpu":
                self._to_device(0, "cpu")
        per_block = sum(self.linears[0][m[0]].in_features ** 2 * 4 for m in rec.members.values())
        return per_block * len(self.blocks)

    def close(self) -> None:
        self.store.close()


def _caches(entries) -> list:
    """The distinct cache objects (transformers' Cache: per-layer keys and values) among the
    keyword arguments of recorded block calls (entries: per part, per block, (args, kwargs))."""
    found = {}
    for part in entries:
        for _, kwargs in part:
            for k in _CACHE_KWARGS:
                cache = kwargs.get(k)
                if cache is not None and hasattr(cache, "layers"):
                    found[id(cache)] = cache
    return list(found.values())


def _empty_layer(cache, layer: int) -> None:
    """Drop one layer's keys and values (transformers 5's layer reset: the tensors freed, the
    layer as if never written)."""
    if layer < len(cache.layers):
        cache.layers[layer].reset()


def _block_inputs(args: tuple, kwargs: dict, stack: str, writes_cache: bool
                  ) -> tuple[tuple, dict]:
    """A block's recorded call made replayable: the hidden states first; no cache for a block
    that would write one (it runs alone, and a replay would write twice), use_cache off."""
    kwargs = dict(kwargs)
    if writes_cache:
        for k in _CACHE_KWARGS:
            if k in kwargs:
                kwargs[k] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if not args:  # hidden states passed by keyword
        if "hidden_states" not in kwargs:
            raise QdtkError(f"{stack}.0: cannot find the hidden states among its inputs")
        args = (kwargs.pop("hidden_states"),)
    return args, kwargs


def sequential_block(
    session: BlockSession,
    b: int,
    steps: list[list[str]],
    solve: Callable[[list[InputStat]], dict[str, np.ndarray]],
) -> list[InputStat]:
    """The published error-propagating order inside block b (METHOD.md §1).

    For each step (checkpoint weight names), H of those weights is captured with the block's
    current weights (earlier steps already replaced), `solve` returns their new weights, which
    are installed. Finally the block's outputs with the new weights become block b+1's inputs.
    Returns the statistics in step order.
    """
    done = []
    for step in steps:
        stats = session.run_block(b, record=step, advance=False)
        session.set_weights(b, solve(stats))
        done += stats
    session.run_block(b, record=False, advance=True)
    return done


# LLaDA's published order, then Qwen2/Llama's (Dream); leaf module names per step.
_ORDERS = (
    (("attn_out",), ("ff_out",), ("q_proj", "k_proj", "v_proj"), ("ff_proj", "up_proj")),
    (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)),
)


def sequential_steps(names: list[str]) -> list[list[str]]:
    """The published step order for a block's weight names (LLaDA or Qwen2-style); any other
    block: one step per weight, in the given (forward) order."""
    leaf = {n: n.removesuffix(".weight").rsplit(".", 1)[-1] for n in names}
    for order in _ORDERS:
        steps = [[n for n in names if leaf[n] in step] for step in order]
        if sum(len(s) for s in steps) == len(names) and all(steps):
            return steps
    return [[n] for n in names]


# ----------------------------------------------------------------------------- the stage


@dataclass
class CaptureOptions:
    n: int = 128
    L: int = 2048
    mask: MaskOptions = MaskOptions()
    mask_token_id: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    chunk_size: int = 8
    offload: bool = False
    accumulate: str = "float64"
    trust_remote_code: bool = False
    model_code: str = "auto"
    expert_weighting: str = "tokens"  # qdtk.torch.experts.EXPERT_WEIGHTINGS
    # windows of the text kept out of H, for the validation statistic (OUT/validation/; the
    # CLI's default is 8)
    validation: int = 0


def calibration_batch(
    model_path: str | Path, model, tokenizer, calib: str | Path | None, opts: CaptureOptions,
    validation: bool = False,
) -> tuple[MaskedBatch | None, dict]:
    """Tokenised, windowed and masked calibration sequences, and what identifies them.
    `validation`: the opts.validation windows disjoint from those (qdtk.math.mcs.
    validation_windows), masked with draws of their own; None when the text is too short."""
    from qdtk.formats.calib import calibration_text, text_hash

    config = flat_config(model)
    max_pos = config.get("max_position_embeddings")
    if max_pos and max_pos < opts.L:
        raise QdtkError(f"{model_path}: -L {opts.L} exceeds the model's max_position_embeddings "
                        f"{max_pos}")
    text = calibration_text(calib)
    stream = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    if opts.mask.mask is None:  # calibrate like use: masks only for mask predictors
        opts = replace(opts, mask=replace(opts.mask, mask=uses_masks(model)))
    # block diffusion (DiffusionGemma): a clean prompt, then a canvas noised with uniform
    # tokens, as its sampler renoises; every other masked model: its mask token
    prompt = prompt_length(model, opts.L)
    noise = config["vocab_size"] if prompt is not None else None
    mask_id = None
    if opts.mask.mask and noise is None:
        mask_id = resolve_mask_token_id(
            config, getattr(tokenizer, "mask_token_id", None), opts.mask_token_id, str(model_path)
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts, mask = None, opts.mask
    if validation:
        starts = validation_windows(len(stream), opts.n, opts.validation, opts.L, opts.mask.seed)
        # the mask draws continue after the training sequences' seeds
        mask = replace(opts.mask, seed=opts.mask.seed + opts.n * opts.mask.per_sequence)
    batch = None
    if not validation or starts is not None:
        ids, attention = cut_windows(stream, opts.n if starts is None else len(starts), opts.L,
                                     opts.mask.seed, pad_id, starts)
        batch = mask_batch(ids, attention, mask_id, mask, prompt, noise)
    ident = {
        "calib": {"source": str(calib or "builtin"),
                  "sha256": text_hash(text),
                  "stream_tokens": int(len(stream))},
        "mask_token_id": mask_id,
        "masked": bool(opts.mask.mask),
    }
    if prompt is not None:
        ident |= {"prompt_tokens": prompt, "canvas_tokens": opts.L - prompt,
                  "noise": "uniform" if opts.mask.mask else None}
    return batch, ident


def uses_masks(model) -> bool:
    """Whether the model sees mask tokens in use: masked-LM heads and dLLMs do; encoders
    without a head (sentence embedders like MiniLM) and causal LMs see plain text."""
    from qdtk.torch.models import model_kind

    return model_kind(model) == "mlm"


def fallback_summary(stats: list[InputStat], shown: int = 6) -> str:
    """One line naming the expert inputs that took a fallback H."""
    from qdtk.torch.experts import MIN_EXPERT_TOKENS

    named = ", ".join(f"{s.key} ({s.tokens} tokens; H from {s.fallback})" for s in stats[:shown])
    more = f" and {len(stats) - shown} more" if len(stats) > shown else ""
    return (f"{len(stats)} expert inputs were reached by fewer than {MIN_EXPERT_TOKENS} "
            f"calibration tokens and take a fallback H (manifest.json records it): "
            f"{named}{more}; calibrate on more text to give them their own")


def capture(
    model_path: str | Path,
    calib: str | Path | None,
    out: str | Path,
    opts: CaptureOptions | None = None,
    echo: Callable[[str], None] = log.info,
    progress: bool = True,
) -> Path:
    """`qdtk capture`: write the statistics folder `out` (resumes a killed run), and with
    opts.validation > 0 its validation statistic in OUT/validation: H of that many windows of
    the same text kept out of OUT's H, so quantize can check a fit on inputs it was not fitted
    to (recorded in OUT's manifest; a text too short for them gives none)."""
    opts = opts or CaptureOptions()
    out = Path(out)
    model_fp, ckpt_names = model_fingerprint(model_path)
    check_model_finite(model_path)  # a NaN weight is named before the forwards spread it
    model = load_model(model_path, opts.dtype, "cpu", opts.trust_remote_code, opts.model_code)
    tokenizer = load_tokenizer(model_path, opts.trust_remote_code)
    batch, ident = calibration_batch(model_path, model, tokenizer, calib, opts)
    writer = StatsWriter(out, str(model_path), model_fp, batch_options(opts, batch, ident))
    if writer.complete:
        echo(f"{out}: capture already complete")
    else:
        record_pass(model, batch, writer, opts, ckpt_names, model_path, echo, progress)
    if opts.validation > 0:
        vbatch, ident = calibration_batch(model_path, model, tokenizer, calib, opts,
                                          validation=True)
        if vbatch is None:
            echo(f"the calibration text holds fewer than {opts.n + opts.validation} disjoint "
                 f"windows of {opts.L} tokens: no validation statistic")
            return out
        options = {**batch_options(opts, vbatch, ident), "n": opts.validation,
                   "validation_of": writer.fingerprint}
        vwriter = StatsWriter(out / VALIDATION, str(model_path), model_fp, options)
        if not vwriter.complete:
            record_pass(model, vbatch, vwriter, opts, ckpt_names, model_path, echo, progress)
        writer.set_validation({"folder": VALIDATION, "fingerprint": vwriter.fingerprint,
                               "windows": opts.validation, "tokens": vbatch.tokens})
    return out


def batch_options(opts: CaptureOptions, batch: MaskedBatch, ident: dict) -> dict:
    """What a stats folder's H depend on (its manifest's options, and its fingerprint)."""
    return {"n": opts.n, "L": opts.L, **opts.mask.as_dict(), **ident, "dtype": opts.dtype,
            "accumulate": opts.accumulate, "expert_weighting": opts.expert_weighting,
            "sequences": int(len(batch.t)),
            "tokens": batch.tokens, "masked_tokens": int(batch.masked.sum())}


def record_pass(model, batch: MaskedBatch, writer: StatsWriter, opts: CaptureOptions,
                ckpt_names, model_path: str | Path, echo: Callable[[str], None],
                progress: bool) -> None:
    """Run `batch` through the model block by block, writing every unfinished block's H."""
    from tqdm import tqdm

    offload = writer.folder / ".hidden" if opts.offload else None
    session = BlockSession(
        model, batch.ids, batch.attention, device=opts.device, chunk_size=opts.chunk_size,
        offload=offload, accumulate=opts.accumulate, ckpt_names=ckpt_names, progress=progress,
        source=model_path, expert_weighting=opts.expert_weighting,
    )
    try:
        writer.check_space(session.estimate_bytes())
        hidden = batch.ids.size * flat_config(model).get("hidden_size", 0) * \
            session.store[0].element_size()
        echo(f"{writer.folder}: {len(batch.t)} sequences x {opts.L} tokens ({batch.tokens} "
             f"counted, {int(batch.masked.sum())} masked); {len(session)} blocks; estimated H "
             f"storage {session.estimate_bytes() / 2**20:,.1f} MiB; hidden states "
             f"{hidden / 2**20:,.1f} MiB {'on disk' if offload else 'in memory'}")
        todo = [b for b in range(len(session)) if not writer.done(session.block_name(b))]
        if len(todo) < len(session):
            echo(f"resuming: {len(session) - len(todo)} blocks already captured")
        last = max(todo, default=-1)
        fallbacks: list[InputStat] = []
        for b in tqdm(range(last + 1), desc="blocks", unit="block", disable=not progress):
            stats = session.run_block(b, record=b in todo, advance=True)
            if b in todo:
                writer.write_block(b, session.block_name(b), stats)
                fallbacks += [s for s in stats if s.fallback]
        writer.finish()
        if fallbacks:
            echo(fallback_summary(fallbacks))
    finally:
        session.close()
