"""`qdtk generate`: sample a completion from a masked diffusion model (LLaDA, Dream,
DiffusionGemma)."""

from __future__ import annotations

import json

import click

from qdtk.cli.options import model_code_option


@click.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("--prompt", default=None, help="The prompt text.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Read the prompt from this file instead.")
@click.option("--chat", is_flag=True,
              help="Wrap the prompt as a user turn with the tokenizer's chat template "
              "(Instruct models).")
@click.option("--gen-length", default=128, show_default=True, type=click.IntRange(1),
              help="Tokens to generate (a multiple of --block-length).")
@click.option("--block-length", default=32, show_default=True, type=click.IntRange(1),
              help="Tokens per block; blocks are filled left to right.")
@click.option("--steps", default=128, show_default=True, type=click.IntRange(1),
              help="Denoising steps in all, spread evenly over the blocks (a multiple of their "
              "number); each step runs the whole sequence once.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0: the most likely token (deterministic); > 0: Gumbel-max sampling.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the sampling noise (temperature > 0).")
@click.option("--mask-token-id", type=int, default=None,
              help="Mask token id (default: config, tokenizer, or the LLaDA/Dream default).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True,
              help="Dtype the model runs in (bfloat16 on a GPU: the published shards' own).")
@click.option("--device", default="cpu", show_default=True,
              help="Torch device (cpu, cuda, cuda:1).")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the model's own code from its folder.")
@model_code_option
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON document (tokens, completion, options, time).")
def generate(model, prompt, prompt_file, chat, gen_length, block_length, steps, temperature,
             seed, mask_token_id, dtype, device, trust_remote_code, model_code, as_json) -> None:
    """Generate text from MODEL (a LLaDA or Dream checkpoint folder, original or unpacked) by
    masked diffusion: the answer starts as --gen-length mask tokens; block by block, each step
    writes the model's most confident predictions for the still-masked positions.

    A block-diffusion model (DiffusionGemma, original or unpacked) samples with its own
    generation code instead: canvases of its canvas length, --steps spread over them, --seed
    seeding its noise; --block-length, --temperature and --mask-token-id do not apply."""
    from pathlib import Path

    from qdtk.errors import QdtkError
    from qdtk.torch.generate import GenerateOptions
    from qdtk.torch.generate import generate as run_generate

    if (prompt is None) == (prompt_file is None):
        raise QdtkError("give exactly one of --prompt TEXT and --prompt-file FILE")
    text = prompt if prompt is not None else Path(prompt_file).read_text()
    opts = GenerateOptions(gen_length, block_length, steps, temperature, seed)
    result = run_generate(model, text, opts, chat=chat, mask_token_id=mask_token_id,
                          dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                          model_code=model_code)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(result["completion"])
