"""`qdtk run`: all stages on tiny checkpoints, resuming, and the sequential (published) order."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from qdtk.cli.main import cli  # noqa: E402
from qdtk.formats.checkpoint import Checkpoint  # noqa: E402
from qdtk.math.mcs import MaskOptions  # noqa: E402
from qdtk.options import QuantizeOptions  # noqa: E402
from qdtk.pipeline import EvalOptions, RunOptions, run  # noqa: E402
from qdtk.solve.solvers import solve_daq  # noqa: E402
from qdtk.torch.capture import (  # noqa: E402
    BlockSession,
    CaptureOptions,
    calibration_batch,
    load_model,
    load_tokenizer,
    model_fingerprint,
)

QUANT = {"method": "daq", "bits": 2, "iters": 3, "tau": 2.0, "lam": 3.0, "percdamp": 0.01,
         "compensate": True, "refit": True, "backend": "cpu"}


def _opts(solver=solve_daq, sequential=False, mask=True, unpack=None):
    return RunOptions(
        capture=CaptureOptions(n=4, L=24, chunk_size=2, mask=MaskOptions(mask=mask)),
        quantize=QuantizeOptions(**QUANT), solver=solver, sequential=sequential,
        eval=EvalOptions(n=2, L=16), unpack=unpack,
    )


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _tensors(folder):
    """Every tensor of a checkpoint folder as bytes (headers carry run-specific paths)."""
    ckpt = Checkpoint(folder)
    return {name: ckpt.read(name).tobytes() for name in ckpt.names()}


def test_run_cli_end_to_end_and_rerun_is_a_no_op(tiny_bert, tmp_path):
    out = tmp_path / "run"
    args = ["run", str(tiny_bert), "--out", str(out), "-n", "4", "-L", "24", "--eval-n", "2",
            "--eval-length", "16"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["layers"] == 12
    assert 2.0 < s["bits_per_weight"] < 3.5
    assert s["packed_bytes"] < s["size_bytes"]
    assert s["kind"] == "mlm" and "masked_ce@0.5" in s["metrics"]
    assert list(s["sources"]) == ["builtin:pydoc", "builtin:docstrings", "builtin:manpages"]
    assert s["metrics"] == s["sources"]["builtin:pydoc"]
    assert "bits per weight" in r.output and "masked-token CE" in r.output
    assert not (out / "dense").exists()  # eval ran the packed folder: no dense copy
    before = {d: _files(out / d) for d in ("stats", "quant", "packed")}
    mtimes = {p: p.stat().st_mtime_ns for d in ("stats", "quant", "packed")
              for p in (out / d).glob("*.safetensors")}
    evaluated = (out / "eval.json").read_bytes()
    r = CliRunner().invoke(cli, args + ["--unpack", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert {d: _files(out / d) for d in before} == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten
    assert (out / "eval.json").read_bytes() == evaluated  # nor evaluated again
    # --unpack: a real checkpoint with every tensor of the original, in the dtype asked for
    dense = Checkpoint(out / "dense")
    assert set(dense.names()) == set(Checkpoint(tiny_bert).names())
    assert "BF16" in {dense.info(name).dtype for name in dense.names()}


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_llama, tmp_path):
    whole = tmp_path / "whole"
    run(tiny_llama, None, whole, _opts(mask=False))

    calls = []

    def dying(W, H, options, name="layer", orders=None):
        if len(calls) == 9:  # die inside the second block
            raise KeyboardInterrupt
        calls.append(name)
        return solve_daq(W, H, options, name, orders)

    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama, None, broken, _opts(solver=dying, mask=False))
    assert not (broken / "packed").exists()
    finished_blocks = _files(broken / "quant")
    assert len(finished_blocks) == 1
    run(tiny_llama, None, broken, _opts(mask=False))
    for stage in ("stats", "quant"):
        assert _files(broken / stage) == _files(whole / stage), stage
    assert _tensors(broken / "packed") == _tensors(whole / "packed")
    assert _files(broken / "quant")["block_0000.safetensors"] == \
        finished_blocks["block_0000.safetensors"]


def test_sequential_blocks_see_the_quantized_outputs(tiny_llama, tmp_path):
    seen = []

    def recording(W, H, options, name="layer", orders=None):
        seen.append((name, H.copy()))
        return solve_daq(W, H, options, name, orders)

    one_pass = tmp_path / "one"
    run(tiny_llama, None, one_pass, _opts(mask=False))
    seq = tmp_path / "seq"
    summary = run(tiny_llama, None, seq, _opts(solver=recording, sequential=True, mask=False,
                                               unpack="float32"))
    assert np.isfinite(summary["proxy_error"]["max"])
    assert _files(seq / "quant") != _files(one_pass / "quant")

    # the H that block 1's q_proj was solved with is what block 1 sees when block 0 carries its
    # quantized weights: recompute it on the unpacked (quantized) model with the same inputs
    H_seq = dict(seen)["model.layers.1.self_attn.q_proj.weight"]
    opts = _opts(mask=False).capture
    model = load_model(seq / "dense", "float32", "cpu")
    batch, _ = calibration_batch(tiny_llama, model, load_tokenizer(tiny_llama), None, opts)
    session = BlockSession(model, batch.ids, batch.attention, chunk_size=opts.chunk_size,
                           ckpt_names=model_fingerprint(tiny_llama)[1])
    session.run_block(0, record=False, advance=True)
    stats = session.run_block(1, record=["model.layers.1.self_attn.q_proj.weight"])
    H_quantized_inputs = stats[0].H
    np.testing.assert_allclose(H_seq, H_quantized_inputs, rtol=1e-5, atol=1e-6)

    # ... and not what the full-precision model gives (the one-pass statistic)
    from qdtk.formats.stats import Stats

    H_fp, _ = Stats(one_pass / "stats").hessian("model.layers.1.self_attn.q_proj.weight")
    assert np.abs(H_seq - H_fp).max() > 1e-3 * np.abs(H_fp).max()

    # inside block 0 the published Llama order: q/k/v, then o, then gate/up, then down
    order = [name.split(".")[-2] for name, _ in seen[:7]]
    assert order == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"]


def test_sequential_refuses_a_model_wide_budget_it_cannot_plan(tiny_bert, tmp_path):
    r = CliRunner().invoke(cli, ["run", str(tiny_bert), "--out", str(tmp_path / "o"),
                                 "--sequential", "--budget-scope", "model"])
    assert r.exit_code == 1
    assert "--budget-scope layer" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o" / "quant" / "report.json").exists()


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_run_end_to_end_on_published_dllm_checkpoints(arch, request, tmp_path):
    """LLaDA and Dream as published (bf16 shards, their own code absent): every stage runs on
    qdtk's native forward, calibration is masked with the config's mask id."""
    folder = request.getfixturevalue(f"tiny_{arch}")
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(folder), "--out", str(out), "-n", "4", "-L", "24",
                                 "--eval-n", "2", "--eval-length", "16", "--iters", "2",
                                 "--unpack", "float32"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["layers"] == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert s["kind"] == "mlm" and np.isfinite(s["metrics"]["masked_ce@0.5"]["b"])
    index = json.loads((out / "stats" / "manifest.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert index["options"]["masked"] and index["options"]["mask_token_id"] == \
        config["mask_token_id"]
    assert set(Checkpoint(out / "dense").names()) == set(Checkpoint(folder).names())
    dense = load_model(out / "dense")  # the unpacked model runs natively too
    assert type(dense).__module__ == f"qdtk.torch.models.{arch}"
    # the packed folder runs at 2 bits: packed Linears, the unpacked model's logits and tokens
    import torch

    from qdtk.torch.nn import BCQLinear

    packed = load_model(out / "packed")
    assert sum(isinstance(m, BCQLinear) for m in packed.modules()) == 14
    ids = torch.arange(12)[None] % 90
    with torch.inference_mode():
        torch.testing.assert_close(packed(input_ids=ids).logits, dense(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    gen = ["generate", "--prompt", "masked", "--gen-length", "8", "--block-length", "4",
           "--steps", "4", "--json"]
    tokens = [json.loads(o[o.index("{"):])["tokens"] for o in (
        CliRunner().invoke(cli, [gen[0], str(out / d), *gen[1:]]).output
        for d in ("packed", "dense"))]
    assert tokens[0] == tokens[1]
    from qdtk.torch.evaluate import compare

    on = {d: compare(folder, out / d, n=2, L=16)["metrics"] for d in ("packed", "dense")}
    for key, m in on["dense"].items():
        for k, v in m.items():
            assert on["packed"][key][k] == pytest.approx(v, rel=1e-4)


def test_run_checks_eval_texts_before_any_stage(tiny_bert, tmp_path):
    for bad, message in ((str(tmp_path / "missing.txt"), "text source not found"),
                         ("builtin:novels", "builtin:manpages")):
        r = CliRunner().invoke(cli, ["run", str(tiny_bert), "--out", str(tmp_path / "run"),
                                     "--eval-text", "builtin:pydoc", "--eval-text", bad])
        assert r.exit_code == 2 and message in r.output, r.output
        assert not (tmp_path / "run").exists()
