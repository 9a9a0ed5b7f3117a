"""`qdtk pack` and `qdtk unpack`: the deployable bit-packed checkpoint and the way back."""

from __future__ import annotations

import click

shard_option = click.option(
    "--max-shard-size",
    default="2GB",
    show_default=True,
    help="Largest safetensors shard (e.g. 500MB, 2GB); the writer keeps one shard in memory.",
)


@click.command()
@click.argument("quant_dir", type=click.Path(file_okay=False))
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="The original model folder (every tensor that is not quantized is copied "
              "from it). Default: the model path recorded in QUANT_DIR/report.json.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the packed checkpoint.")
@shard_option
def pack(quant_dir: str, model_dir: str | None, out_dir: str, max_shard_size: str) -> None:
    """Write the packed checkpoint (format qdtk-bcq/1, docs/FORMAT.md) of QUANT_DIR.

    Sign planes go to disk as bits, scales as float16, every other tensor is copied as it is,
    and config.json gets a quantization_config. A finished pack with the same inputs is a no-op.
    """
    from qdtk.formats.packed import read_quantization_config
    from qdtk.pack import pack_checkpoint, parse_size

    out = pack_checkpoint(quant_dir, out_dir, model_dir, parse_size(max_shard_size))
    qc = read_quantization_config(out)
    click.echo(f"{out}: {len(qc['modules'])} modules packed, "
               f"{qc['bits_per_weight']:.3f} bits/weight (scales included)")


@click.command()
@click.argument("packed_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the dense checkpoint.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              default="float16", show_default=True,
              help="dtype of every floating tensor written (float32 reproduces the solver's "
              "What bit for bit).")
@shard_option
def unpack(packed_dir: str, out_dir: str, dtype: str, max_shard_size: str) -> None:
    """Write a dense checkpoint of PACKED_DIR that the model's own code loads.

    The quantized weights are dequantized exactly as the solver evaluated them; config.json
    loses its quantization_config.
    """
    from qdtk.pack import parse_size, unpack_checkpoint

    out = unpack_checkpoint(packed_dir, out_dir, dtype, parse_size(max_shard_size))
    click.echo(f"{out}: dense {dtype} checkpoint written")
