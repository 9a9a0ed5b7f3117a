"""`qdtk report`: the figures are real PNGs and report.md carries report.json's numbers."""

import sys

import numpy as np
import pytest
from click.testing import CliRunner

from qdtk.cli.main import cli
from qdtk.formats.io import read_json
from qdtk.quantize import quantize_model
from qdtk.report import REPORT_MD, write_report
from tests.test_quantize import OPTIONS, fake_output_change, model_and_stats  # noqa: F401

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def md_table(md: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with `first_column`, as dicts."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")),
                             strict=True)))
    return rows


def cell(x):
    """A table cell as a number (None for "-")."""
    return None if x == "-" else float(x)


def approx(x):
    return None if x is None else pytest.approx(x, rel=1e-5)  # cells have 6 digits


def assert_png(path):
    """A PNG by its signature, decoded by matplotlib and by PIL alike."""
    import matplotlib.image
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 100
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (pixels.shape[1], pixels.shape[0])
        im.verify()


@pytest.fixture
def model_scope_quant(model_and_stats, tmp_path, monkeypatch):  # noqa: F811
    """A solution folder of `qdtk quantize --budget-scope model` (report.json, orders.json)."""
    import qdtk.torch.evaluate

    model, stats = model_and_stats
    monkeypatch.setattr(qdtk.torch.evaluate, "output_change_fn",
                        fake_output_change(model, {"down_proj": 1e3}, []))
    out = tmp_path / "q"
    quantize_model(model, stats, out, {**OPTIONS, "abmp": "knapsack", "bits": None,
                                       "budget_scope": "model"}, progress=False)
    return out


def test_report_of_a_solution_folder_has_report_jsons_numbers(model_scope_quant, tmp_path):
    out = tmp_path / "report"
    r = CliRunner().invoke(cli, ["report", str(model_scope_quant), "--out", str(out)])
    assert r.exit_code == 0, r.output
    for name in ("orders", "bits", "error", "sensitivity"):
        assert_png(out / f"{name}.png")
    assert not (out / "time.png").exists()  # a solution folder has no stage times
    report = read_json(model_scope_quant / "report.json")
    alloc = read_json(model_scope_quant / "orders.json")
    md = (out / REPORT_MD).read_text()
    for name in ("orders", "bits", "error", "sensitivity"):
        assert f"]({name}.png)" in md

    rows = md_table(md, "layer")
    assert len(rows) == len(report["layers"]) == 9
    for row, (name, layer) in zip(rows, report["layers"].items(), strict=True):
        assert name.removesuffix(".weight").endswith(row["layer"])
        assert row["shape"] == "x".join(map(str, layer["shape"]))
        counts = np.bincount(layer["orders"], minlength=5)[1:5]
        assert row["groups at 1/2/3/4"] == "/".join(map(str, counts))
        assert cell(row["bits/weight"]) == approx(layer["bits_per_weight"])
        assert cell(row["proxy error"]) == approx(layer["proxy_error"])
        assert cell(row["predicted"]) == approx(layer["predicted_error"] / layer["weight_energy"])
        assert cell(row["sensitivity"]) == approx(alloc["layers"][name]["sensitivity"])

    summary = {row["quantity"]: row["value"] for row in md_table(md, "quantity")}
    s = report["summary"]
    assert int(summary["layers"]) == s["layers"] and int(summary["weights"]) == s["weights"]
    assert cell(summary["bits per weight (scales included)"]) == approx(s["bits_per_weight"])
    assert cell(summary["median proxy error"]) == approx(s["median_proxy_error"])
    assert cell(summary["mean proxy error"]) == approx(s["mean_proxy_error"])
    assert cell(summary["model-scope budget, bits per weight"]) == approx(alloc["bits"])
    assert summary["groups per order"] == ", ".join(
        f"{o}: {k}" for o, k in s["orders_histogram"].items())


def test_baselines_have_no_orders_to_draw(model_and_stats, tmp_path):  # noqa: F811
    model, stats = model_and_stats
    quant = tmp_path / "q"
    report = quantize_model(model, stats, quant, {"method": "rtn", "bits": 2}, progress=False)
    md = write_report(quant, tmp_path / "report").read_text()
    assert not (tmp_path / "report" / "orders.png").exists()
    assert not (tmp_path / "report" / "sensitivity.png").exists()
    assert_png(tmp_path / "report" / "bits.png")
    assert "no binary-coded layers" in md
    rows = md_table(md, "layer")
    assert [row["groups at 1/2/3/4"] for row in rows] == ["rtn"] * len(report["layers"])
    assert [cell(row["bits/weight"]) for row in rows] == [
        approx(r["bits_per_weight"]) for r in report["layers"].values()]


def block_matplotlib(monkeypatch):
    """Make `import matplotlib` fail as it does where the extra is not installed."""
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)


def test_report_without_matplotlib_names_the_extra(model_scope_quant, tmp_path, monkeypatch):
    block_matplotlib(monkeypatch)
    r = CliRunner().invoke(cli, ["report", str(model_scope_quant), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "pip install 'qdtk[report]'" in r.output
    assert not (tmp_path / "r").exists()


def test_report_of_a_folder_without_a_report_is_an_error(tmp_path):
    r = CliRunner().invoke(cli, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "neither a run folder" in r.output


def test_run_writes_the_report_and_skips_it_without_matplotlib(tiny_bert, tmp_path,
                                                               monkeypatch):
    pytest.importorskip("torch")
    from qdtk.math.mcs import MaskOptions
    from qdtk.pipeline import EvalOptions, RunOptions, run
    from qdtk.torch.capture import CaptureOptions

    opts = RunOptions(
        capture=CaptureOptions(n=4, L=24, chunk_size=2, mask=MaskOptions(mask=True)),
        quantize={**OPTIONS, "iters": 3}, eval=EvalOptions(n=2, L=16),
    )
    out = tmp_path / "run"
    lines = []
    summary = run(tiny_bert, None, out, opts, echo=lines.append)
    assert f"report: {out / 'report' / REPORT_MD}" in lines
    for name in ("orders", "bits", "error", "time"):
        assert_png(out / "report" / f"{name}.png")
    assert not (out / "report" / "sensitivity.png").exists()  # layer scope: no weights
    md = (out / "report" / REPORT_MD).read_text()
    times = {row["stage"]: cell(row["seconds"]) for row in md_table(md, "stage")}
    assert times == {k: approx(v) for k, v in summary["seconds"].items()}
    assert set(times) == {"capture", "quantize", "pack", "eval"}
    rows = md_table(md, "layer")
    report = read_json(out / "quant" / "report.json")
    assert [cell(row["proxy error"]) for row in rows] == [
        approx(r["proxy_error"]) for r in report["layers"].values()]

    block_matplotlib(monkeypatch)  # the finished run again: every stage resumes, no report
    lines.clear()
    assert run(tiny_bert, None, out, opts, echo=lines.append)["bits_per_weight"] == \
        summary["bits_per_weight"]
    assert any(line.startswith("report skipped:") and "qdtk[report]" in line for line in lines)
