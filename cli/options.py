"""Options shared by several commands (one definition each)."""

from __future__ import annotations

import click

include_option = click.option(
    "--include",
    multiple=True,
    metavar="PATTERN",
    help="Quantize only these weights (glob like '*.q_proj.weight', or 're:REGEX'); repeatable. "
    "Default: every 2-D weight inside the numbered transformer blocks, norms excluded.",
)
exclude_option = click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Leave these weights in full precision (glob or 're:REGEX'); repeatable.",
)
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the solver runs: 'cuda' needs a GPU that CuPy sees; 'auto' uses one if present.",
)


def _compose(decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def capture_options(n: int | None = 128, L: int | None = 2048, device: bool = True):
    """The MCS and model-running options of `qdtk capture` (also offered by `qdtk run`)."""
    opts = [
        click.option("-n", "--nsamples", "n", default=n, show_default=n is not None,
                     type=click.IntRange(1), help="Number of calibration windows N."),
        click.option("-L", "--seqlen", "L", default=L, show_default=L is not None,
                     type=click.IntRange(1), help="Tokens per window L."),
        click.option("--gamma", default=0.25, show_default=True, type=float,
                     help="Visible prefix ratio: the first floor(gamma*L) tokens are never "
                     "masked."),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="Seed of the window choice and of the mask draws (sequence i uses "
                     "seed+i)."),
        click.option("--mask/--no-mask", default=True, show_default=True,
                     help="Masked calibration (MCS), or plain unmasked calibration."),
        click.option("--mask-token-id", type=int, default=None,
                     help="Mask token id (default: config, tokenizer, or the LLaDA/Dream "
                     "default)."),
        click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear",
                     show_default=True,
                     help="Mask probability at timestep t: t, or 1 - cos(pi t / 2)."),
        click.option("--timesteps", type=click.Choice(["grid", "random"]), default="grid",
                     show_default=True, help="t_i = (i+1)/N, or drawn at random as in LLaDA's "
                     "training ((1-eps) u + eps)."),
        click.option("--per-sequence", default=1, show_default=True, type=click.IntRange(1),
                     help="Timesteps (masked copies) per window."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     default="float32", show_default=True, help="Dtype the model runs in."),
        click.option("--batch-size", "chunk_size", default=8, show_default=True,
                     type=click.IntRange(1), help="Sequences per forward call (bounds memory)."),
        click.option("--offload", is_flag=True,
                     help="Keep the hidden states between blocks on disk, not in memory."),
        click.option("--accumulate", type=click.Choice(["float64", "float32"]),
                     default="float64", show_default=True,
                     help="Precision of sum x x^T: float64 throughout, or float32 within a batch "
                     "and float64 across batches (about twice as fast)."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Run the model's own code from its folder (needed for LLaDA and "
                     "Dream)."),
    ]
    if device:
        opts.append(click.option(
            "--device", default="cpu", show_default=True,
            help="Device the blocks run on (cpu, cuda, cuda:1); one block at a time."))
    return _compose(opts)


def capture_options_from(kw: dict):
    """CaptureOptions from the parsed `capture_options` (consumes their keys from kw)."""
    from qdtk.capture import CaptureOptions
    from qdtk.mcs import MaskOptions

    mask = MaskOptions(
        gamma=kw.pop("gamma"), schedule=kw.pop("schedule"), timesteps=kw.pop("timesteps"),
        per_sequence=kw.pop("per_sequence"), seed=kw.pop("seed"), mask=kw.pop("mask"),
    )
    return CaptureOptions(
        n=kw.pop("n"), L=kw.pop("L"), mask=mask, mask_token_id=kw.pop("mask_token_id"),
        dtype=kw.pop("dtype"), device=kw.pop("device", "cpu"), chunk_size=kw.pop("chunk_size"),
        offload=kw.pop("offload"), accumulate=kw.pop("accumulate"),
        trust_remote_code=kw.pop("trust_remote_code"),
    )
