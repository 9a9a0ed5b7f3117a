"""`qdtk capture`: masked calibration statistics (H per Linear input), block by block."""

from __future__ import annotations

import click


@click.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("--calib", default="builtin", show_default=True, metavar="SRC",
              help="Calibration text: a .txt file, a .jsonl file with a \"text\" field, a folder "
              "of them, or 'builtin' (the first part of Python's pydoc topics).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Statistics folder to write (a killed run resumes there).")
@click.option("-n", "--nsamples", "n", default=128, show_default=True, type=click.IntRange(1),
              help="Number of calibration windows N.")
@click.option("-L", "--seqlen", "L", default=2048, show_default=True, type=click.IntRange(1),
              help="Tokens per window L.")
@click.option("--gamma", default=0.25, show_default=True, type=float,
              help="Visible prefix ratio: the first floor(gamma*L) tokens are never masked.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the window choice and of the mask draws (sequence i uses seed+i).")
@click.option("--mask/--no-mask", default=True, show_default=True,
              help="Masked calibration (MCS), or plain unmasked calibration.")
@click.option("--mask-token-id", type=int, default=None,
              help="Mask token id (default: config, tokenizer, or the LLaDA/Dream default).")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear",
              show_default=True, help="Mask probability at timestep t: t, or 1 - cos(pi t / 2).")
@click.option("--timesteps", type=click.Choice(["grid", "random"]), default="grid",
              show_default=True,
              help="t_i = (i+1)/N, or drawn at random as in LLaDA's training ((1-eps) u + eps).")
@click.option("--per-sequence", default=1, show_default=True, type=click.IntRange(1),
              help="Timesteps (masked copies) per window.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True, help="Dtype the model runs in.")
@click.option("--device", default="cpu", show_default=True,
              help="Device the blocks run on (cpu, cuda, cuda:1); one block at a time.")
@click.option("--batch-size", "chunk_size", default=8, show_default=True,
              type=click.IntRange(1), help="Sequences per forward call (bounds memory).")
@click.option("--offload", is_flag=True,
              help="Keep the hidden states between blocks on disk (OUT/.hidden), not in memory.")
@click.option("--accumulate", type=click.Choice(["float64", "float32"]), default="float64",
              show_default=True, help="Precision of sum x x^T: float64 throughout, or float32 "
              "within a batch and float64 across batches (about twice as fast).")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the model's own code from its folder (needed for LLaDA and Dream).")
def capture(model, calib, out, n, L, gamma, seed, mask, mask_token_id, schedule, timesteps,
            per_sequence, dtype, device, chunk_size, offload, accumulate,
            trust_remote_code) -> None:
    """Record H = (2/T) sum x x^T for every Linear input of MODEL on masked calibration text.

    MODEL is a checkpoint folder (or a .gguf file). The model runs block by block: only one
    block is on the device at a time. Writes one statistics file per block into OUT.
    """
    from qdtk.capture import CaptureOptions
    from qdtk.capture import capture as run_capture
    from qdtk.mcs import MaskOptions

    opts = CaptureOptions(
        n=n, L=L,
        mask=MaskOptions(gamma=gamma, schedule=schedule, timesteps=timesteps,
                         per_sequence=per_sequence, seed=seed, mask=mask),
        mask_token_id=mask_token_id, dtype=dtype, device=device, chunk_size=chunk_size,
        offload=offload, accumulate=accumulate, trust_remote_code=trust_remote_code,
    )
    run_capture(model, calib, out, opts, echo=lambda s: click.echo(s, err=True))
    click.echo(f"statistics written to {out}")
