"""`qdtk quantize`: every selected Linear by DAQ (or a baseline), one solution file per block,
resumable."""

from __future__ import annotations

import click

from qdtk.cli.options import (
    cluster_options,
    cluster_options_from,
    model_code_option,
    quantize_options,
    quantize_options_from,
)


def echo_report(report: dict, out_dir: str) -> None:
    """Per layer: orders histogram (or method), real bits per weight, the allocation's predicted
    error (groups solved alone, relative to tr(W H W^T)) and the proxy error of the stored
    solution; then the whole model."""
    from qdtk.report import orders_counts, relative_predicted_error

    click.echo(f"{'layer':<52} {'orders 1/2/3/4':>14} {'bits/w':>7} {'predicted':>10} "
               f"{'proxy err':>10}")
    for name, r in report["layers"].items():
        orders, pred = orders_counts(r), relative_predicted_error(r)
        click.echo(f"{name[-52:]:<52} {orders:>14} {r['bits_per_weight']:>7.4f} "
                   f"{'-' if pred is None else f'{pred:.4g}':>10} {r['proxy_error']:>10.4g}")
    s = report["summary"]
    hist = ", ".join(f"{k}: {v}" for k, v in s.get("orders_histogram", {}).items())
    click.echo(f"{s['layers']} layers, {s['weights']:,} weights: {s['bits_per_weight']:.4f} bits/"
               f"weight with scales, proxy error median {s['median_proxy_error']:.4g} mean "
               f"{s['mean_proxy_error']:.4g}{f'; groups per order {hist}' if hist else ''}; "
               f"wrote {out_dir}")


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--stats", "stats_dir", required=True, type=click.Path(file_okay=False),
              help="Statistics folder written by `qdtk capture` (H per Linear input).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder for the solution files and report.json; rerunning resumes.")
@quantize_options()
@click.option("--trust-remote-code", is_flag=True,
              help="Let --budget-scope model run the model's own code from its folder to "
              "measure each layer's effect on the output.")
@model_code_option
@cluster_options
def quantize(model_dir, stats_dir, out_dir, include, exclude, trust_remote_code, model_code,
             **kw) -> None:
    """Quantize the Linear weights of MODEL_DIR with DAQ (or --method gptq/rtn), using the
    statistics in --stats.

    Writes one solution file per transformer block and report.json: per layer the orders
    histogram, honest bits per weight with the float16 scales, predicted and proxy output error
    tr(D H D^T)/tr(W H W^T), time; the whole model's bits per weight in the summary.

    The method step by step (MCS, DAQ, the sweep, ABMP, refinement, bit accounting) and qdtk's
    defaults beside the published choices, with the options that select each: docs/METHOD.md
    in the qdtk repository.
    """
    from qdtk.quantize import quantize_model

    options = quantize_options_from(kw, **cluster_options_from(kw),
                                    trust_remote_code=trust_remote_code, model_code=model_code)
    report = quantize_model(model_dir, stats_dir, out_dir, options,
                            include=include, exclude=exclude)
    echo_report(report, out_dir)
