"""`qdtk report`: pictures and a summary of a run folder or a solution folder.

Reads what the stages wrote and draws it (matplotlib, the `report` extra):

    orders.png       the order of every group of every layer (layers x groups)
    bits.png         real bits per weight of every layer (scales included)
    error.png        per layer the proxy error tr(D H D^T)/tr(W H W^T) of the stored solution
                     and the allocation's prediction (groups solved alone), relative alike
    sensitivity.png  the model-scope weights of the layers (orders.json, when present)
    time.png         seconds per stage (summary.json of a run, when present)
    report.md        the same numbers as tables, with the images

A run folder is one `qdtk run` wrote (quant/report.json, summary.json); a solution folder is one
`qdtk quantize` wrote (report.json, and orders.json with --budget-scope model). A figure without
data (orders of the affine baselines, sensitivities without a model-scope allocation, stage
times of a solution folder) is left out, and report.md says so.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qdtk.allocate import ORDERS_FILE
from qdtk.errors import QdtkError
from qdtk.formats.io import read_json, write_bytes_atomic
from qdtk.formats.solution import REPORT

REPORT_MD = "report.md"
SUMMARY = "summary.json"
ORDER_COLORS = ("#d7301f", "#fdae61", "#abd9e9", "#2c7bb6")  # orders 1..4
MAX_LABELS = 80  # layer names on an axis; beyond, every k-th


class MissingExtra(QdtkError):
    """matplotlib, which draws the figures, is not installed."""


@dataclass
class RunData:
    """What a report shows, as the stages wrote it."""

    source: Path  # the folder named on the command line
    quant: dict[str, Any]  # report.json
    allocation: dict[str, Any] | None  # orders.json (model-scope ABMP)
    summary: dict[str, Any] | None  # summary.json of a run


def load_run(path: str | Path) -> RunData:
    """report.json, and orders.json and summary.json where present, of a run folder or a
    solution folder."""
    path = Path(path)
    quant = path / "quant" if (path / "quant" / REPORT).exists() else path
    if not (quant / REPORT).exists():
        raise QdtkError(f"{path}: neither a run folder (quant/{REPORT}) nor a solution folder "
                        f"of qdtk quantize ({REPORT})")
    summary = path / SUMMARY
    return RunData(
        source=path,
        quant=read_json(quant / REPORT),
        allocation=read_json(quant / ORDERS_FILE) if (quant / ORDERS_FILE).exists() else None,
        summary=read_json(summary) if quant != path and summary.exists() else None,
    )


def relative_predicted_error(layer: Mapping[str, Any]) -> float | None:
    """A layer report's predicted error relative to tr(W H W^T), as its proxy error is (None
    where nothing was predicted)."""
    pred, energy = layer.get("predicted_error"), layer.get("weight_energy")
    return pred / energy if pred is not None and energy else None


def orders_counts(layer: Mapping[str, Any]) -> str:
    """Groups at orders 1/2/3/4 of a layer report ("3/10/3/0"), or its method (gptq, rtn)."""
    hist = layer.get("orders_histogram")
    return "/".join(str(hist.get(str(o), 0)) for o in (1, 2, 3, 4)) if hist else layer["method"]


def layer_labels(names: Sequence[str]) -> list[str]:
    """Weight names without their common dotted prefix and the ".weight" suffix."""
    stems = [n.removesuffix(".weight") for n in names]
    if len(stems) < 2:
        return stems
    first, last = min(stems), max(stems)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    cut = first.rfind(".", 0, i) + 1  # whole dotted parts only
    return [s[cut:] for s in stems]


# ---------------------------------------------------------------------------------------------
# The numbers


@dataclass
class LayerRow:
    label: str
    shape: list[int]
    orders: list[int] | None  # per group; None for the affine baselines
    counts: str  # orders_counts
    bits_per_weight: float
    predicted: float | None  # relative_predicted_error
    proxy_error: float | None
    sensitivity: float | None  # model-scope weight (orders.json)


def layer_rows(data: RunData) -> list[LayerRow]:
    """One row per quantized layer, in the order the stage solved them."""
    layers = data.quant["layers"]
    planned = (data.allocation or {}).get("layers", {})
    return [
        LayerRow(label, r["shape"], r.get("orders"), orders_counts(r), r["bits_per_weight"],
                 relative_predicted_error(r), r.get("proxy_error"),
                 planned.get(name, {}).get("sensitivity"))
        for (name, r), label in zip(layers.items(), layer_labels(list(layers)), strict=True)
    ]


def number(x: float | int | None) -> str:
    """A table cell: integers whole, floats to 6 significant digits, None as "-"."""
    if x is None:
        return "-"
    return str(x) if isinstance(x, int) else f"{x:.6g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else number(c) for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


def summary_rows(data: RunData) -> list[tuple[str, Any]]:
    s = data.quant["summary"]
    hist = ", ".join(f"{k}: {v}" for k, v in s.get("orders_histogram", {}).items())
    rows: list[tuple[str, Any]] = [
        ("layers", s["layers"]),
        ("weights", s["weights"]),
        ("bits per weight (scales included)", s["bits_per_weight"]),
        ("median proxy error", s["median_proxy_error"]),
        ("mean proxy error", s["mean_proxy_error"]),
        ("groups per order", hist or "-"),
    ]
    if data.allocation is not None:
        a = data.allocation
        rows += [("model-scope budget, bits per weight", a["bits"]),
                 ("model-scope allocation, bits per weight", a["bits_per_weight"]),
                 ("weighted predicted error", a["weighted_predicted_error"])]
    return rows


# ---------------------------------------------------------------------------------------------
# The figures


def _figure_class():
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError:
        raise MissingExtra("the figures need matplotlib, which is not installed: pip install "
                           "'qdtk[report]'") from None
    return Figure


def _layer_axes(Figure, rows: Sequence[LayerRow], xlabel: str, title: str, width: float = 8.0,
                xscale: str = "linear"):
    """A figure with one axes whose rows are the layers (the first at the top), labelled."""
    fig = Figure(figsize=(width, min(max(1.5 + 0.16 * len(rows), 3.0), 40.0)),
                 layout="constrained")
    ax = fig.add_subplot()
    ticks = np.arange(0, len(rows), math.ceil(len(rows) / MAX_LABELS))
    ax.set_yticks(ticks, [rows[i].label for i in ticks], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xscale(xscale)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return fig, ax


def orders_figure(Figure, rows: Sequence[LayerRow]):
    """Heat map of the orders, layers x groups (blank where a layer has fewer groups)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.ticker import MaxNLocator

    G = max(len(r.orders) for r in rows if r.orders)
    A = np.full((len(rows), G), np.nan)  # [layers, groups]
    for i, r in enumerate(rows):
        if r.orders:
            A[i, : len(r.orders)] = r.orders
    fig, ax = _layer_axes(Figure, rows, "group (128 input columns)", "Planes per group",
                          width=min(max(3.0 + 0.1 * G, 6.0), 16.0))
    cmap = ListedColormap(ORDER_COLORS).with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(A), aspect="auto", interpolation="nearest", cmap=cmap,
                   norm=BoundaryNorm(np.arange(0.5, 5.5), cmap.N))
    fig.colorbar(im, ax=ax, ticks=[1, 2, 3, 4], label="order (sign planes)",
                 shrink=min(1.0, 4.0 / fig.get_figheight()))  # at most 4 inches long
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def bits_figure(Figure, rows: Sequence[LayerRow], model_bits: float):
    fig, ax = _layer_axes(Figure, rows, "bits per weight (sign planes and float16 scales)",
                          "Bits per layer")
    ax.barh(np.arange(len(rows)), [r.bits_per_weight for r in rows], color=ORDER_COLORS[3])
    ax.axvline(model_bits, color="black", linestyle="--", label=f"model {model_bits:.4f}")
    fig.legend(loc="outside lower center", ncols=2)
    return fig


def error_figure(Figure, rows: Sequence[LayerRow]):
    fig, ax = _layer_axes(Figure, rows, "tr(D H D^T) / tr(W H W^T)", "Proxy error per layer",
                          xscale="log")
    y = np.arange(len(rows))
    nan = float("nan")
    ax.plot([nan if r.proxy_error is None else r.proxy_error for r in rows], y, "o",
            color=ORDER_COLORS[3], label="measured: the stored solution")
    if any(r.predicted is not None for r in rows):
        ax.plot([nan if r.predicted is None else r.predicted for r in rows], y, "x",
                color=ORDER_COLORS[0], label="predicted: groups solved alone")
    fig.legend(loc="outside lower center", ncols=2)
    return fig


def sensitivity_figure(Figure, rows: Sequence[LayerRow]):
    fig, ax = _layer_axes(Figure, rows, "model output change per unit of layer output error",
                          "Model-scope sensitivity weights", xscale="log")
    ax.barh(np.arange(len(rows)), [r.sensitivity or 0.0 for r in rows], color=ORDER_COLORS[2])
    return fig


def time_figure(Figure, seconds: Mapping[str, float]):
    fig = Figure(figsize=(6.0, 1.0 + 0.4 * len(seconds)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(seconds))
    bars = ax.barh(y, list(seconds.values()), color=ORDER_COLORS[3])
    ax.bar_label(bars, [f"{v:.1f} s" for v in seconds.values()], padding=3)
    ax.margins(x=0.15)  # room for the labels
    ax.set_yticks(y, list(seconds))
    ax.set_ylim(len(seconds) - 0.5, -0.5)
    ax.set_xlabel("seconds")
    ax.set_title("Time per stage")
    return fig


def save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# The report


def write_report(path: str | Path, out: str | Path) -> Path:
    """Figures and report.md of the run or solution folder `path` in `out`; returns the path
    of report.md. MissingExtra when matplotlib is not installed."""
    Figure = _figure_class()
    data = load_run(path)
    out = Path(out)
    rows = layer_rows(data)
    if not rows:
        raise QdtkError(f"{path}: the report names no quantized layer")
    s = data.quant["summary"]
    seconds = (data.summary or {}).get("seconds")
    figures = {
        "orders": orders_figure(Figure, rows) if any(r.orders for r in rows) else None,
        "bits": bits_figure(Figure, rows, s["bits_per_weight"]),
        "error": error_figure(Figure, rows),
        "sensitivity": (sensitivity_figure(Figure, rows)
                        if any(r.sensitivity is not None for r in rows) else None),
        "time": time_figure(Figure, seconds) if seconds else None,
    }
    for name, fig in figures.items():
        if fig is not None:
            save_png(fig, out / f"{name}.png")
    md = out / REPORT_MD
    write_bytes_atomic(md, markdown(data, rows, {k for k, f in figures.items() if f}).encode())
    return md


ABSENT = {  # why a figure is left out
    "orders": "no binary-coded layers: no orders to show",
    "sensitivity": "no model-scope allocation (orders.json): no sensitivities",
    "time": "a solution folder: stage times are in the summary.json of a run",
}


def _image(name: str, drawn: set[str]) -> str:
    return f"![{name}]({name}.png)" if name in drawn else f"({ABSENT[name]})"


def markdown(data: RunData, rows: Sequence[LayerRow], drawn: set[str]) -> str:
    """report.md: the numbers of report.json (and orders.json, summary.json) with the images."""
    q = data.quant
    options = ", ".join(f"{k}={v}" for k, v in q.get("options", {}).items())
    seconds = (data.summary or {}).get("seconds") or {}
    parts = [
        "# qdtk report",
        f"Folder `{data.source}`, model `{q['model']['path']}`.\n\nOptions: `{options}`.",
        "## Summary",
        table(("quantity", "value"), summary_rows(data)),
        "## Orders of the groups",
        _image("orders", drawn),
        "## Layers",
        "Bits per weight are real (sign planes and float16 scales). Proxy error: "
        "tr(D H D^T) / tr(W H W^T) of the stored solution, D = W - What, H the layer's "
        "calibration statistic. Predicted: the allocation's error of the groups solved alone "
        "at their orders (no error feedback, no refinement), relative alike. Sensitivity: the "
        "model-scope weight of the layer (model output change per unit of its output error).",
        table(("layer", "shape", "groups at 1/2/3/4", "bits/weight", "predicted", "proxy error",
               "sensitivity"),
              [(r.label, "x".join(map(str, r.shape)), r.counts, r.bits_per_weight, r.predicted,
                r.proxy_error, r.sensitivity) for r in rows]),
        _image("bits", drawn),
        _image("error", drawn),
        _image("sensitivity", drawn),
        "## Time per stage",
        table(("stage", "seconds"), list(seconds.items())) if seconds else "",
        _image("time", drawn),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"
