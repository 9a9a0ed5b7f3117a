"""The CLI shell: version, help, errors as messages, and `qdtk inspect` on a real checkpoint."""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from qdtk import __version__
from qdtk.cli.main import cli


def test_version_and_help():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "inspect" in r.output


def test_inspect_counts_a_tiny_bert(tiny_bert):
    r = CliRunner().invoke(cli, ["inspect", str(tiny_bert), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    import torch
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(tiny_bert)
    sd = model.state_dict()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and ".layer." in n]
    assert len(d["linears"]) == len(linears) == 12  # 2 layers x (q, k, v, o, up, down)
    assert {r["name"] for r in d["linears"]} == {f"{n}.weight" for n in linears}
    # count what the file holds (tied weights are stored once), read by the safetensors package
    from safetensors.numpy import load_file

    stored = load_file(tiny_bert / "model.safetensors")
    assert d["tensors"] == len(stored)
    assert d["parameters"] == sum(a.size for a in stored.values())
    assert set(stored) <= set(sd)
    assert d["size_at_2bit_bytes"] < d["size_bytes"]
    assert 2.0 < d["bits_per_weight_at_order_2"] < 3.0


def test_inspect_text_output_and_patterns(tiny_bert):
    r = CliRunner().invoke(cli, ["inspect", str(tiny_bert), "--exclude", "*.intermediate.*"])
    assert r.exit_code == 0, r.output
    assert "Linears to quantize: 10" in r.output


def test_missing_model_is_a_message_not_a_traceback(tmp_path):
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope")])
    assert r.exit_code != 0
    assert "nope" in r.output and "Traceback" not in r.output


def test_cli_as_a_subprocess(tiny_bert, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "qdtk.cli.main", "inspect", str(tiny_bert)],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "Linears to quantize: 12" in ok.stdout
    (tmp_path / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{broken json!!!}")
    bad = subprocess.run([sys.executable, "-m", "qdtk.cli.main", "inspect", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    assert "Error:" in bad.stderr and "bad JSON header" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_unexpected_error_is_one_line_and_v_shows_the_traceback(tiny_bert, monkeypatch):
    import qdtk.cli.inspect_cmd as inspect_cmd

    def broken(*args, **kwargs):
        raise RuntimeError("the disk said no\nsecond line")

    monkeypatch.setattr(inspect_cmd, "describe", broken)
    r = CliRunner().invoke(cli, ["inspect", str(tiny_bert)])
    assert r.exit_code == 1
    assert r.output.strip() == ("Error: RuntimeError: the disk said no "
                                "(rerun with -v for the traceback)")
    r = CliRunner().invoke(cli, ["-v", "inspect", str(tiny_bert)])
    assert isinstance(r.exception, RuntimeError)  # propagated: click prints the traceback
