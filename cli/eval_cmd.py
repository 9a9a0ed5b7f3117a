"""`qdtk eval`: compare a quantized model with the original on held-out text."""

from __future__ import annotations

import json

import click

from qdtk.cli.options import model_code_option

LABELS = {
    "perplexity": "perplexity",
    "hidden_cosine": "cosine of final hidden states",
    "embedding_cosine": "cosine of mean-pooled embeddings",
}


def _label(key: str) -> str:
    return LABELS.get(key, key.replace("masked_ce@", "masked-token CE, mask ratio "))


def format_sources_table(sources: dict[str, dict]) -> str:
    """Several texts side by side, one column each: "A -> B" for losses, the cosine itself
    for the similarities."""
    width = max(18, *(len(s) for s in sources))
    lines = [f"{'metric':<34} " + " ".join(f"{s:>{width}}" for s in sources)]
    for key in next(iter(sources.values())):
        cells = []
        for metrics in sources.values():
            m = metrics[key]
            cells.append(f"{m['value']:.4f}" if "value" in m else f"{m['a']:.4g} -> {m['b']:.4g}")
        lines.append(f"{_label(key):<34} " + " ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


@click.command("eval")
@click.argument("model_a", type=click.Path())
@click.argument("model_b", type=click.Path())
@click.option("--text", "text_srcs", type=click.Path(), multiple=True, metavar="SRC",
              help="Text to evaluate on, repeatable (each reported side by side): a .txt file, "
              "a .jsonl file with a \"text\" field, a folder of them, or builtin:NAME (the "
              "held-out part of builtin:pydoc, builtin:docstrings or builtin:manpages, never "
              "used for calibration). Default: all three built-in held-out texts.")
@click.option("--n", "n", type=click.IntRange(min=1), default=32, show_default=True,
              help="Number of token windows, evenly spaced over the text.")
@click.option("-L", "--length", "L", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens per window, special tokens included.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the masks (masked-LM models); both models get the same masks.")
@click.option("--device", default="cpu", show_default=True,
              help="Torch device to run the models on (cpu, cuda, cuda:1, ...).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True, help="Dtype the models run in.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows per forward pass.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the model's own code from its folder.")
@model_code_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def eval_(model_a, model_b, text_srcs, n, L, seed, device, dtype, batch, trust_remote_code,
          model_code, as_json) -> None:
    """Compare MODEL_B (e.g. quantized) with MODEL_A (the original) on held-out text.

    Each model is a checkpoint folder or a .gguf file. The metric follows the model: masked-token
    cross-entropy at mask ratios 0.15/0.5/0.85 (masked-LM heads, dLLMs), perplexity (causal
    LMs), and for every model the cosine similarity of the final hidden states and of the
    mean-pooled sentence embeddings (the metric of encoders without a head).
    """
    from qdtk.torch.evaluate import compare_texts, default_sources, read_text

    texts = {src: read_text(src) for src in text_srcs or default_sources()}
    result = compare_texts(model_a, model_b, texts, n=n, L=L, seed=seed, device=device,
                           dtype=dtype, batch=batch, trust_remote_code=trust_remote_code,
                           model_code=model_code)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"A = {result['model_a']}\nB = {result['model_b']}\n"
               f"{result['kind']} model, {n} windows of {L} tokens per text")
    click.echo(format_sources_table(result["sources"]))
