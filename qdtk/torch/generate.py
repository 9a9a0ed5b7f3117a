"""`qdtk generate`: masked-diffusion sampling (LLaDA's sampler, low-confidence remasking).

A block-diffusion model (DiffusionGemma) samples with its own generation code instead
(transformers' DiffusionGemmaGenerationMixin: canvases of its canvas length, uniform-noise
renoising, an entropy bound), seeded by --seed, with --steps spread over its canvases.

The answer starts as gen_length mask tokens after the prompt, cut into blocks of block_length
that are filled left to right, each in steps/blocks steps. At every step the whole sequence is
run; every masked position of the current block gets a candidate token (the argmax, or a
Gumbel-max sample at temperature > 0) whose confidence is the softmax probability the model
gives it; the most confident candidates are written, as many as the step's share of the block's
masks, the rest stay masked. Positions after the current block never receive tokens. Dream's
logits are shifted (position i's predict token i + 1), so its candidates for position i come
from the logits at i - 1, as Dream's own sampler reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from qdtk.errors import QdtkError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateOptions:
    gen_length: int = 128
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.gen_length, self.block_length, self.steps) < 1:
            raise QdtkError("--gen-length, --block-length and --steps must be positive")
        if self.temperature < 0:
            raise QdtkError(f"--temperature {self.temperature} is negative")

    def check_blocks(self) -> None:
        """The block schedule of qdtk's sampler (`diffuse`); a block-diffusion model's own
        sampler has none, so it is checked only where it applies."""
        if self.gen_length % self.block_length:
            raise QdtkError(f"--gen-length {self.gen_length} is not a multiple of "
                            f"--block-length {self.block_length}")
        if self.steps % self.blocks:
            raise QdtkError(f"--steps {self.steps} is not a multiple of the {self.blocks} "
                            f"blocks (gen_length / block_length)")

    @property
    def blocks(self) -> int:
        return self.gen_length // self.block_length


def transfer_counts(masked: int, steps: int) -> list[int]:
    """How many of a block's `masked` positions each of its `steps` steps writes: as evenly as
    possible, the remainder to the first steps (LLaDA's schedule)."""
    base, extra = divmod(masked, steps)
    return [base + (i < extra) for i in range(steps)]


def candidates(logits, temperature: float, generator):
    """(token [B, T], confidence [B, T] float64) from logits [B, T, V]: the argmax, or at
    temperature > 0 a sample argmax(logits / temperature + Gumbel noise); the confidence is the
    softmax probability of the chosen token under the plain logits."""
    import torch

    z = logits.double()
    if temperature > 0:
        u = torch.rand(z.shape, generator=generator, dtype=torch.float64, device=z.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0)))
        token = (z / temperature + gumbel).argmax(-1)
    else:
        token = z.argmax(-1)
    return token, z.softmax(-1).gather(-1, token[..., None])[..., 0]


def diffuse(logits_fn: Callable, prompt, mask_id: int, opts: GenerateOptions, shift: int = 0,
            trace: list | None = None, progress: bool = False):
    """Prompt ids [B, P] -> [B, P + gen_length] ids, sampled as the module docstring says.

    logits_fn(ids [B, T]) -> logits [B, T, V]. shift: 1 when position i's logits predict token
    i + 1 (Dream). trace, if given, receives per step (block, positions written [B, k]).
    """
    import torch
    from tqdm import tqdm

    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, opts.gen_length), mask_id, dtype=prompt.dtype,
                                      device=prompt.device)], dim=1)
    generator = torch.Generator(device=prompt.device).manual_seed(opts.seed)
    opts.check_blocks()
    per_block = opts.steps // opts.blocks
    bar = tqdm(total=opts.steps, desc="steps", unit="step", leave=False, disable=not progress)
    for b in range(opts.blocks):
        lo, hi = P + b * opts.block_length, P + (b + 1) * opts.block_length
        in_block = torch.zeros_like(x, dtype=torch.bool)
        in_block[:, lo:hi] = True
        # one schedule for the batch: every row starts the block with block_length masks
        for k in transfer_counts(opts.block_length, per_block):
            bar.update(1)
            if k == 0:
                continue
            logits = logits_fn(x)
            if shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            token, confidence = candidates(logits, opts.temperature, generator)
            masked = (x == mask_id) & in_block
            confidence = confidence.masked_fill(~masked, float("-inf"))
            order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
            written = order[:, :k]  # [B, k]: the most confident masked positions
            x.scatter_(1, written, token.gather(1, written))
            if trace is not None:
                trace.append((b, written.cpu()))
    bar.close()
    return x


def completion_text(tokenizer, ids: list[int], eos_ids: set[int]) -> str:
    """The generated ids up to the first end-of-sequence token, decoded without specials."""
    end = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)


def generate(model_path, prompt: str, opts: GenerateOptions, *, chat: bool = False,
             mask_token_id: int | None = None, dtype: str = "float32", device: str = "cpu",
             trust_remote_code: bool = False, model_code: str = "auto",
             progress: bool = True) -> dict:
    """`qdtk generate`: load MODEL, sample a completion of `prompt`, return what happened."""
    import time

    import torch

    from qdtk.math.mcs import resolve_mask_token_id
    from qdtk.torch.models import (
        canvas_length,
        flat_config,
        load_model,
        load_tokenizer,
        logits_shift,
        model_kind,
        own_code_errors,
    )

    model = load_model(model_path, dtype, device, trust_remote_code, model_code)
    if model_kind(model) != "mlm":
        raise QdtkError(f"{model_path}: a {model_kind(model)} model; `qdtk generate` samples "
                        f"masked diffusion models (LLaDA, Dream, DiffusionGemma)")
    canvas = canvas_length(model)
    if not canvas:
        opts.check_blocks()
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    config = flat_config(model)
    mask_id = None if canvas else resolve_mask_token_id(
        config, getattr(tokenizer, "mask_token_id", None), mask_token_id, str(model_path))
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise QdtkError(f"{model_path}: the tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    longest = config.get("max_position_embeddings")
    if longest and len(ids) + opts.gen_length > longest:
        raise QdtkError(f"{model_path}: {len(ids)} prompt tokens + --gen-length "
                        f"{opts.gen_length} exceed the model's {longest} positions")

    def logits_fn(x):
        with torch.inference_mode(), own_code_errors(model, model_path):
            return model(input_ids=x).logits

    t = time.perf_counter()
    prompt_ids = torch.tensor([ids], device=device)
    if canvas:  # block diffusion: the model's own sampler (entropy-bound, its temperatures)
        steps = max(1, opts.steps * canvas // opts.gen_length)  # denoising steps per canvas
        torch.manual_seed(opts.seed)
        with torch.inference_mode(), own_code_errors(model, model_path):
            out = model.generate(input_ids=prompt_ids, max_new_tokens=opts.gen_length,
                                 max_denoising_steps=steps, return_dict_in_generate=False)
        out = getattr(out, "sequences", out)[:, : len(ids) + opts.gen_length]
    else:
        out = diffuse(logits_fn, prompt_ids, mask_id, opts, shift=logits_shift(model),
                      progress=progress)
    seconds = time.perf_counter() - t
    tokens = out[0, len(ids):].tolist()
    eos = {i for i in (tokenizer.eos_token_id, config.get("eos_token_id")) if isinstance(i, int)}
    return {
        "model": str(model_path), "forward": type(model).__name__, "prompt": prompt,
        "chat": chat, "prompt_tokens": len(ids), "tokens": tokens,
        "completion": completion_text(tokenizer, tokens, eos),
        "options": {**opts.__dict__, "mask_token_id": mask_id}, "seconds": seconds,
        "sampler": f"{type(model).__name__}.generate (canvas {canvas})" if canvas else
        "qdtk (low-confidence remasking)",
    }
