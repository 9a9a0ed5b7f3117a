"""`qdtk inspect`: what a checkpoint holds and what quantizing it would give."""

from __future__ import annotations

import json
from collections import Counter

import click

from qdtk.cli.options import exclude_option, include_option


def describe(folder: str, include=(), exclude=()) -> dict:
    """A summary of a checkpoint: tensors, parameters, dtypes, Linears and sizes."""
    from qdtk.bits import bcq_bits, group_widths
    from qdtk.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    linears = ckpt.linear_names(include, exclude)
    linear_set = set(linears)
    params = sum(i.numel for i in ckpt.tensors.values())
    kept_bytes = sum(i.nbytes for n, i in ckpt.tensors.items() if n not in linear_set)
    q_bits = 0
    rows = []
    for name in linears:
        n, m = ckpt.info(name).shape
        bits = bcq_bits(n, m, [2] * len(group_widths(m)))
        q_bits += bits
        rows.append({"name": name, "shape": [n, m], "dtype": ckpt.info(name).dtype,
                     "bits_per_weight_at_order_2": bits / (n * m)})
    q_weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    return {
        "folder": str(ckpt.folder),
        "files": [f.name for f in ckpt.files],
        "tensors": len(ckpt.tensors),
        "parameters": params,
        "dtypes": dict(Counter(i.dtype for i in ckpt.tensors.values())),
        "linears": rows,
        "quantized_parameters": q_weights,
        "size_bytes": ckpt.nbytes(),
        "size_at_2bit_bytes": kept_bytes + q_bits // 8,
        "bits_per_weight_at_order_2": q_bits / q_weights if q_weights else None,
    }


def _mb(x: int) -> str:
    return f"{x / 2**20:,.1f} MiB"


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@include_option
@exclude_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of text.")
def inspect(model_dir: str, include, exclude, as_json: bool) -> None:
    """Show the tensors of MODEL_DIR, the Linears qdtk would quantize, and the size at 2 bits.

    The 2-bit size counts the scales honestly (order 2 per 128-column group, float16 row and
    column scales per plane) and keeps every other tensor as it is.
    """
    d = describe(model_dir, include, exclude)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"{d['folder']}: {d['tensors']} tensors in {len(d['files'])} file(s), "
               f"{d['parameters']:,} parameters, dtypes {d['dtypes']}")
    click.echo(f"Linears to quantize: {len(d['linears'])} ({d['quantized_parameters']:,} weights)")
    for r in d["linears"]:
        click.echo(f"  {r['name']:<60} {r['shape'][0]:>6} x {r['shape'][1]:<6} {r['dtype']}")
    if d["bits_per_weight_at_order_2"] is not None:
        click.echo(f"Size now {_mb(d['size_bytes'])}; at order 2 "
                   f"({d['bits_per_weight_at_order_2']:.3f} bits/weight with scales): "
                   f"{_mb(d['size_at_2bit_bytes'])}")
