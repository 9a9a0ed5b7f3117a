"""`qdtk inspect`: what a checkpoint holds and what quantizing it would give.

A packed folder (config.json with a qdtk quantization_config, docs/FORMAT.md) is described by
what it stores: bits per weight per layer and overall, and its size against the original.
"""

from __future__ import annotations

import json
from collections import Counter

import click

from qdtk.cli.options import exclude_option, include_option


def describe_packed(folder: str) -> dict:
    """A packed checkpoint: per quantized module its orders and bits per weight, and sizes."""
    from qdtk.formats.bits import affine_bits, bcq_bits
    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.packed import PackedAffine, PackedBCQ, read_quantization_config

    qc = read_quantization_config(folder)
    ckpt = Checkpoint(folder)
    rows, q_bits, q_weights, q_bytes = [], 0, 0, 0
    for module, info in qc["modules"].items():
        n, m = info["shape"]
        fields = PackedBCQ.FIELDS if info["kind"] == "bcq" else PackedAffine.FIELDS
        stored = sum(ckpt.info(f"{module}.{f}").nbytes for f in fields)
        row = {"name": module, "kind": info["kind"], "shape": [n, m], "stored_bytes": stored}
        if info["kind"] == "bcq":
            orders = ckpt.read(f"{module}.orders")
            bits = bcq_bits(n, m, orders)
            row["orders"] = dict(sorted(Counter(int(o) for o in orders).items()))
        else:
            bits = affine_bits(n, m, info["bits"])
            row["bits"] = info["bits"]
        row["bits_per_weight"] = bits / (n * m)
        rows.append(row)
        q_bits, q_weights, q_bytes = q_bits + bits, q_weights + n * m, q_bytes + stored
    size = sum(f.stat().st_size for f in ckpt.files)
    original = qc.get("original_size_bytes")
    return {
        "folder": str(ckpt.folder),
        "packed": True,
        "format": qc["format"],
        "method": qc.get("method"),
        "files": [f.name for f in ckpt.files],
        "tensors": len(ckpt.tensors),
        "modules": rows,
        "quantized_parameters": q_weights,
        "bits_per_weight": q_bits / q_weights if q_weights else None,
        "stored_bits_per_weight": 8 * q_bytes / q_weights if q_weights else None,
        "other_bytes": ckpt.nbytes() - q_bytes,
        "file_bytes": size,
        "original_bytes": original,
        "compression": original / size if original else None,
        # MoE: the modules that are expert matrices, and the fused 3-D tensors they rebuild
        "expert_modules": sum(".experts." in r["name"] for r in rows),
        "fused": {name: entry["shape"] for name, entry in qc.get("fused", {}).items()},
    }


def describe(folder: str, include=(), exclude=()) -> dict:
    """A summary of a checkpoint: tensors, parameters, dtypes, Linears and sizes."""
    from qdtk.formats.bits import bcq_bits, group_widths
    from qdtk.formats.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    linears = ckpt.linear_names(include, exclude)
    linear_set = set(linears)
    params = sum(i.numel for i in ckpt.tensors.values())
    replaced = linear_set | ckpt.covered(linear_set)  # fused experts: by their matrices
    kept_bytes = sum(i.nbytes for n, i in ckpt.tensors.items() if n not in replaced)
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
        # MoE: experts per layer, the expert weights among the Linears, routers kept as they are
        "experts": ckpt.experts(),
        "expert_linears": sum(".experts." in n for n in linears),
        "routers": sorted(ckpt.routers()),
    }


def verify_folder(folder: str) -> str:
    """Check every file of a packed, statistics, solution or model folder; a QdtkError names
    the first bad one. Returns what was checked, in words."""
    from pathlib import Path

    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.packed import is_packed, read_quantization_config, verify_packed
    from qdtk.formats.solution import REPORT, verify_solutions
    from qdtk.formats.stats import MANIFEST, Stats
    from qdtk.formats.validate import check_tensors_finite

    if is_packed(folder):
        ckpt = Checkpoint(folder)
        verify_packed(folder, read_quantization_config(folder), ckpt)
        return f"{len(ckpt.files)} packed shard(s): content hashes and every module's tensors"
    if (Path(folder) / MANIFEST).is_file():
        n = Stats(folder, require_complete=False).verify()
        return f"{n} statistics file(s): content hashes, shapes, finiteness"
    if (Path(folder) / REPORT).is_file():
        return f"{verify_solutions(folder)} solution file(s): content hashes and layers"
    ckpt = Checkpoint(folder)  # an ordinary model: headers, and every float tensor finite
    check_tensors_finite(ckpt)
    return f"{len(ckpt.files)} model file(s): headers, every floating tensor finite"


def _mb(x: int) -> str:
    return f"{x / 2**20:,.1f} MiB"


def _show_packed(d: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"{d['folder']}: packed checkpoint ({d['format']}, method {d['method']}), "
               f"{d['tensors']} tensors in {len(d['files'])} file(s)")
    click.echo(f"Quantized modules: {len(d['modules'])} ({d['quantized_parameters']:,} weights)")
    if d["expert_modules"]:
        fused = f", stacked back into {len(d['fused'])} fused 3-D tensors by unpack" \
            if d["fused"] else ""
        click.echo(f"Mixture of experts: {d['expert_modules']} of them are expert matrices"
                   f"{fused}")
    for r in d["modules"]:
        detail = (" ".join(f"o{o}:{c}" for o, c in r["orders"].items()) if r["kind"] == "bcq"
                  else f"{r['bits']}-bit affine")
        click.echo(f"  {r['name']:<55} {r['shape'][0]:>6} x {r['shape'][1]:<6} "
                   f"{r['bits_per_weight']:.3f} bits/weight  ({detail})")
    if d["bits_per_weight"] is not None:
        click.echo(f"Overall {d['bits_per_weight']:.3f} bits/weight with scales "
                   f"({d['stored_bits_per_weight']:.3f} as stored, word padding included)")
    line = f"Files {_mb(d['file_bytes'])}"
    if d["original_bytes"]:
        line += f" vs original {_mb(d['original_bytes'])} ({d['compression']:.2f}x smaller)"
    click.echo(line)


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@include_option
@exclude_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of text.")
@click.option("--verify", is_flag=True,
              help="Check every file instead: content hashes (packed, statistics and solution "
              "folders) and formats; of a model folder, that every float tensor is finite.")
def inspect(model_dir: str, include, exclude, as_json: bool, verify: bool) -> None:
    """Show the tensors of MODEL_DIR, the Linears qdtk would quantize, and the size at 2 bits.

    For a packed checkpoint (qdtk pack): bits per weight per module and overall, and the size
    on disk against the original; --include/--exclude do not apply.

    The 2-bit size counts the scales honestly (order 2 per 128-column group, float16 row and
    column scales per plane) and keeps every other tensor as it is.

    With --verify MODEL_DIR may also be a statistics (capture) or solution (quantize) folder;
    a damaged file is an error naming it (exit code 1).
    """
    from qdtk.formats.packed import is_packed

    if verify:
        click.echo(f"{model_dir}: verified {verify_folder(model_dir)}")
        return

    if is_packed(model_dir):
        _show_packed(describe_packed(model_dir), as_json)
        return
    d = describe(model_dir, include, exclude)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"{d['folder']}: {d['tensors']} tensors in {len(d['files'])} file(s), "
               f"{d['parameters']:,} parameters, dtypes {d['dtypes']}")
    click.echo(f"Linears to quantize: {len(d['linears'])} ({d['quantized_parameters']:,} weights)")
    if d["experts"]:
        per = sorted(set(d["experts"].values()))
        click.echo(f"Mixture of experts: {len(d['experts'])} layers of {'/'.join(map(str, per))} "
                   f"experts; {d['expert_linears']} expert matrices among the Linears; "
                   f"{len(d['routers'])} routers kept in full precision")
    for r in d["linears"]:
        click.echo(f"  {r['name']:<60} {r['shape'][0]:>6} x {r['shape'][1]:<6} {r['dtype']}")
    if d["bits_per_weight_at_order_2"] is not None:
        click.echo(f"Size now {_mb(d['size_bytes'])}; at order 2 "
                   f"({d['bits_per_weight_at_order_2']:.3f} bits/weight with scales): "
                   f"{_mb(d['size_at_2bit_bytes'])}")
