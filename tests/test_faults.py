"""Faults and bad input (issue #18): every stage fails cleanly, early, and names the cause.

Each case asserts the message a user sees and that nothing under a final name is partial; the
resumable ones then rerun and compare bit for bit with an uninterrupted run. kill -9 runs the
real CLI in a subprocess that SIGKILLs itself at a chosen write; no-space and permission
faults patch the write path (and, where this process may mount one, hit a real tiny tmpfs).
The model is tiny_llama: 2 blocks of 7 Linears.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

import qdtk.formats.checkpoint as checkpoint_mod  # noqa: E402
from qdtk.cli.main import cli  # noqa: E402
from qdtk.formats.checkpoint import Checkpoint, read_header, read_safetensors, write_safetensors  # noqa: E402
from qdtk.formats.io import hash_file, write_json_atomic  # noqa: E402

STATS = ["-n", "4", "-L", "24"]
QUANT = ["--abmp", "none", "--bits", "2", "--budget-scope", "layer", "--iters", "2",
         "--refine", "none"]
EVAL = ["--eval-n", "2", "--eval-length", "16"]
UNPACK = ["--unpack", "float32"]  # the run writes OUT/dense too: its kill and resume covered
SHARD = ["--max-shard-size", "40KB"]  # several packed shards
K = "model.layers.1.self_attn.k_proj.weight"


def qdtk(*args, code: int = 0) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r.output


def error_line(output: str) -> str:
    """The one `Error: ...` line (progress bars share stderr with it)."""
    lines = [x for x in output.splitlines() if x.startswith("Error: ")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture(scope="module")
def ref(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run, plus a multi-shard pack of its solutions."""
    out = tmp_path_factory.mktemp("ref")
    qdtk("run", tiny_llama, "--out", out / "run", *STATS, *QUANT, *EVAL, *UNPACK)
    qdtk("pack", out / "run" / "quant", "--model", tiny_llama, "--out", out / "packed", *SHARD)
    return {"model": tiny_llama, "stats": out / "run" / "stats", "quant": out / "run" / "quant",
            "packed": out / "packed", "packed1": out / "run" / "packed",
            "dense": out / "run" / "dense", "run": out / "run"}


def files(folder: Path) -> dict[str, bytes]:
    """Every file under a final name (temporaries excluded), as bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not partial_name(p)}


def partial_name(p: Path) -> bool:
    return ".tmp-" in p.name or p.name.endswith(".partial")


def tensors(folder: Path) -> dict[str, bytes]:
    ckpt = Checkpoint(folder)
    return {name: ckpt.read(name).tobytes() for name in ckpt.names()}


def assert_nothing_partial(folder: Path) -> None:
    """Every file under a final name is whole: safetensors as long as their headers say, JSON
    parseable, and each hash a manifest records is its file's."""
    if not folder.exists():
        return
    for p in folder.rglob("*"):
        if p.is_file() and not partial_name(p):
            if p.suffix == ".safetensors":
                read_header(p)
            elif p.suffix == ".json":
                json.loads(p.read_text())
    for manifest in ("manifest.json", "report.json"):
        if (folder / manifest).is_file():
            for block in json.loads((folder / manifest).read_text())["blocks"]:
                if (folder / block["file"]).exists():
                    assert hash_file(folder / block["file"]) == block["sha256"], block["file"]
    if (folder / "config.json").is_file():
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
        for name, sha in qc.get("sha256", {}).items():
            assert hash_file(folder / name) == sha, name


# ----------------------------------------------------------------------------- kill -9

def write_opener(nth: int, fault, at_open: bool = False):
    """An `open` for qdtk.formats.checkpoint under which the nth file it writes calls `fault()`: at
    its opening, or (as a full disk or a kill does) at its second write, its header written."""
    import builtins

    count = [0]

    class Faulty:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            self.writes += 1
            if self.writes == 2:
                self.f.flush()
                fault()
            return self.f.write(b)

    def opener(path, mode="r", *a, **k):
        hit = False
        if mode == "wb":
            count[0] += 1
            hit = count[0] == nth
        if hit and at_open:
            fault(path)
        f = builtins.open(path, mode, *a, **k)  # noqa: SIM115 (the caller's with closes it)
        return Faulty(f) if hit else f

    return opener


DRIVER = r'''
import os, signal, sys
n, mode = int(sys.argv[1]), sys.argv[2]
kill = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
if mode == "rename":  # killed just before the nth rename of a finished temporary
    count, real_replace = [0], os.replace
    def replace(src, dst, *a, **k):
        count[0] += 1
        if count[0] == n:
            kill()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
else:  # "write": killed inside the nth safetensors file, its header written, its data not
    import qdtk.formats.checkpoint
    from tests.test_faults import write_opener
    qdtk.formats.checkpoint.open = write_opener(n, kill)
from qdtk.cli.main import cli
cli(sys.argv[3:], prog_name="qdtk")
'''


def killed(tmp_path: Path, n: int, mode: str, *args) -> None:
    """Run `qdtk ARGS` in a subprocess that kill -9s itself at the nth rename or write."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    root = Path(__file__).resolve().parents[1]  # the driver imports tests.test_faults
    r = subprocess.run([sys.executable, str(driver), str(n), mode, *map(str, args)], cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]


# (stage, kill mode, n): the renames of capture are block 0, manifest, block 1, manifest,
# manifest (complete); of quantize block 0, report, block 1, report, report (complete).
KILLS = {
    "capture: block 1 written, not renamed": ("capture", "rename", 3),
    "quantize: inside block 1's file": ("quantize", "write", 2),
    "quantize: block 0 renamed, report not": ("quantize", "rename", 2),
    "pack: shard 1 of several named, shard 2 not": ("pack", "rename", None),
    "unpack: inside the dense shard": ("unpack", "write", 1),
    "run: in quantize's block 1": ("run", "rename", 8),
}


@pytest.mark.parametrize("case", KILLS)
def test_kill_9_then_rerun_gives_the_uninterrupted_result(ref, tmp_path, case):
    stage, mode, n = KILLS[case]
    out = tmp_path / stage
    model = ref["model"]
    args = {
        "capture": ["capture", model, "--out", out, *STATS],
        "quantize": ["quantize", model, "--stats", ref["stats"], "--out", out, *QUANT],
        "pack": ["pack", ref["quant"], "--model", model, "--out", out, *SHARD],
        "unpack": ["unpack", ref["packed1"], "--out", out, "--dtype", "float32"],
        "run": ["run", model, "--out", out, *STATS, *QUANT, *EVAL, *UNPACK],
    }[stage]
    if n is None:  # each shard is written as .partial, then all renamed: die at the second
        n = len(list(ref["packed"].glob("*.safetensors"))) + 2
    killed(tmp_path, n, mode, *args)
    for folder in [out, *(out / s for s in ("stats", "quant", "packed", "dense"))]:
        assert_nothing_partial(folder)
    assert not (out / "config.json").exists() and not (out / "summary.json").exists()

    qdtk(*args)  # the rerun resumes
    want = {"capture": ref["stats"], "quantize": ref["quant"], "pack": ref["packed"],
            "unpack": ref["dense"], "run": ref["run"]}[stage]
    if stage == "run":
        for s in ("stats", "quant"):
            assert {k: v for k, v in files(out / s).items() if k.endswith(".safetensors")} == \
                {k: v for k, v in files(want / s).items() if k.endswith(".safetensors")}, s
        for s in ("packed", "dense"):
            assert tensors(out / s) == tensors(want / s), s
    elif stage in ("capture", "quantize"):
        got = files(out)
        assert {k for k in got if k.endswith(".safetensors")} == \
            {k for k in files(want) if k.endswith(".safetensors")}
        assert all(got[k] == v for k, v in files(want).items() if k.endswith(".safetensors"))
    else:
        assert files(out) == files(want)  # every byte, config and shards alike
    assert not [p for p in out.rglob("*") if partial_name(p)]  # temporaries cleaned up


# ----------------------------------------------------------------------------- OS faults


def failing_writes(monkeypatch, nth: int, err: int, at_open: bool = False) -> None:
    """The nth safetensors file qdtk writes fails with OSError `err` (write_opener)."""
    def fault(path=None):
        raise OSError(err, os.strerror(err), *([str(path)] if path else []))

    monkeypatch.setattr(checkpoint_mod, "open", write_opener(nth, fault, at_open), raising=False)


# stage: (its command, the file that fails, the reference output)
def stage_args(ref, stage: str, out: Path) -> list:
    return {
        "capture": ["capture", ref["model"], "--out", out, *STATS],
        "quantize": ["quantize", ref["model"], "--stats", ref["stats"], "--out", out, *QUANT],
        "pack": ["pack", ref["quant"], "--model", ref["model"], "--out", out, *SHARD],
        "unpack": ["unpack", ref["packed1"], "--out", out, "--dtype", "float32"],
    }[stage]


NO_SPACE = {  # stage: (nth file, the name the message gives, the reference)
    "capture": (2, r"block_0001\.safetensors", "stats"),
    "quantize": (2, r"block_0001\.safetensors", "quant"),
    "pack": (2, r"shard-00002\.safetensors\.partial", "packed"),
    "unpack": (1, r"shard-00001\.safetensors\.partial", "dense"),
}


@pytest.mark.parametrize("stage", NO_SPACE)
def test_no_space_is_one_line_and_the_rerun_resumes(ref, tmp_path, monkeypatch, stage):
    nth, name, want = NO_SPACE[stage]
    out = tmp_path / stage
    failing_writes(monkeypatch, nth, errno.ENOSPC)
    line = error_line(qdtk(*stage_args(ref, stage, out), code=1))
    assert re.fullmatch(
        rf"Error: {re.escape(str(out))}/{name}: no space left on device; free space there "
        r"\(or write elsewhere\) and rerun \(finished outputs are kept, the rerun resumes\)",
        line), line
    assert_nothing_partial(out)
    assert not [p for p in out.rglob("*") if partial_name(p)]
    monkeypatch.undo()
    qdtk(*stage_args(ref, stage, out))
    got, expected = files(out), files(ref[want])
    if stage in ("pack", "unpack"):
        assert got == expected
    else:
        assert all(got[k] == v for k, v in expected.items() if k.endswith(".safetensors"))


FIRST_FILE = {"capture": "block_0000.safetensors", "quantize": "block_0000.safetensors",
              "pack": "shard-00001.safetensors.partial",
              "unpack": "shard-00001.safetensors.partial"}


@pytest.mark.parametrize("stage,err,what", [
    *((s, errno.EACCES, "permission denied; make it writable/readable") for s in FIRST_FILE),
    ("quantize", errno.EROFS, "read-only file system; write to another folder"),
])
def test_unwritable_output_is_one_line(ref, tmp_path, monkeypatch, stage, err, what):
    out = tmp_path / stage
    failing_writes(monkeypatch, 1, err, at_open=True)
    line = error_line(qdtk(*stage_args(ref, stage, out), code=1))
    assert line.startswith(f"Error: {out}/{FIRST_FILE[stage]}: {what}"), line
    assert not list(out.glob("*.safetensors")) and not (out / "config.json").exists()


def test_an_os_error_no_stage_named_is_one_line(ref, tmp_path, monkeypatch):
    import qdtk.pack as pack_mod

    def fails(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/data/model/model.safetensors")

    monkeypatch.setattr(pack_mod, "pack_checkpoint", fails)
    line = error_line(qdtk(*stage_args(ref, "pack", tmp_path / "p"), code=1))
    assert line == "Error: /data/model/model.safetensors: input/output error; check the disk " \
        "and rerun (finished outputs are kept, the rerun resumes)"


def test_a_file_vanishing_mid_run_is_named(ref, tmp_path, monkeypatch):
    import qdtk.quantize as quantize_mod

    stats = tmp_path / "stats"
    shutil.copytree(ref["stats"], stats)
    real = quantize_mod.make_solver

    def solver_that_removes_block_1(options):
        solve = real(options)

        def wrapped(W, H, opts, *args):
            (stats / "block_0001.safetensors").unlink(missing_ok=True)
            return solve(W, H, opts, *args)
        return wrapped

    monkeypatch.setattr(quantize_mod, "make_solver", solver_that_removes_block_1)
    out = tmp_path / "q"
    line = error_line(qdtk("quantize", ref["model"], "--stats", stats, "--out", out, *QUANT,
                           code=1))
    assert line == f"Error: {stats}/block_0001.safetensors: file not found (removed while " \
        "qdtk ran?)"
    assert_nothing_partial(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["block_0000.safetensors"]


@pytest.mark.parametrize("stage", ["capture", "quantize", "pack", "unpack"])
def test_too_little_free_space_is_found_before_writing(ref, tmp_path, monkeypatch, stage):
    import qdtk.formats.validate as validate_mod

    monkeypatch.setattr(validate_mod.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(2**30, 2**30 - 1000, 1000))
    out = tmp_path / stage
    line = error_line(qdtk(*stage_args(ref, stage, out), code=1))
    assert re.fullmatch(rf"Error: {re.escape(str(out))}: {stage} needs about [\d.]+ KiB, but its "
                        r"filesystem has 1000 bytes free; free space there or choose another "
                        r"output folder", line), line
    assert not list(out.glob("*")) if stage == "capture" else not out.exists()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_real_full_and_read_only_disk(ref, tiny_tmpfs, monkeypatch):
    import qdtk.pack as pack_mod

    out = tiny_tmpfs / "packed"
    (tiny_tmpfs / "filler").write_bytes(b"\0" * 200 * 2**10)
    line = error_line(qdtk(*stage_args(ref, "pack", out), code=1))
    assert "pack needs about" in line and "KiB free" in line  # the check before writing
    monkeypatch.setattr(pack_mod, "check_free_space", lambda *a: None)  # the kernel's ENOSPC
    line = error_line(qdtk(*stage_args(ref, "pack", out), code=1))
    assert re.match(rf"Error: {re.escape(str(out))}/\S+: no space left on device;", line), line
    assert_nothing_partial(out)
    (tiny_tmpfs / "filler").unlink()
    qdtk(*stage_args(ref, "pack", out))
    assert files(out) == files(ref["packed"])

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    line = error_line(qdtk(*stage_args(ref, "unpack", tiny_tmpfs / "dense"), code=1))
    assert line.startswith(f"Error: {tiny_tmpfs}/dense: read-only file system;"), line


# ----------------------------------------------------------------------------- NaN and Inf


def model_with(ref, tmp_path, name: str, index: tuple, value: float) -> Path:
    model = tmp_path / "model"
    shutil.copytree(ref["model"], model)
    shard = model / "model.safetensors"
    t, meta = read_safetensors(shard)
    t[name][index] = value
    write_safetensors(shard, t, meta)
    return model


@pytest.mark.parametrize("value,name", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "-Inf")])
def test_non_finite_weight_is_named_before_any_solve_or_forward(ref, tmp_path, value, name):
    model = model_with(ref, tmp_path, K, (3, 17), value)
    out = tmp_path / "q"
    # the default, model-wide budget: found before its pre-pass runs the model
    line = error_line(qdtk("quantize", model, "--stats", ref["stats"], "--out", out, code=1))
    assert line == f"Error: {model}/model.safetensors: tensor '{K}' has {name} at index " \
        "[3, 17] (the first of 1 non-finite value)"
    assert not out.exists()
    for args in (["inspect", "--verify", model], ["capture", model, "--out", tmp_path / "s"],
                 ["run", model, "--sequential", "--out", tmp_path / "r", *QUANT]):
        assert error_line(qdtk(*args, code=1)) == line, args  # before any forward
    assert not list(tmp_path.glob("[sr]/**/*.safetensors"))


def restat(ref, tmp_path: Path, file: str, edit) -> Path:
    """A copy of the reference statistics with one file rewritten edited, and the manifest's
    hash updated to match (damage the content hash cannot see: a capture that wrote NaN)."""
    stats = tmp_path / "stats"
    shutil.copytree(ref["stats"], stats)
    t, meta = read_safetensors(stats / file)
    edit(t)
    sha = write_safetensors(stats / file, t, meta)
    manifest = json.loads((stats / "manifest.json").read_text())
    for block in manifest["blocks"]:
        if block["file"] == file:
            block["sha256"] = sha
    write_json_atomic(stats / "manifest.json", manifest)
    return stats


def quantize_fails(ref, stats: Path, out: Path) -> str:
    """The error line of `qdtk quantize` with these statistics; it wrote nothing."""
    line = error_line(qdtk("quantize", ref["model"], "--stats", stats, "--out", out, *QUANT,
                           code=1))
    assert not out.exists()
    return line


@pytest.mark.parametrize("value,name", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_statistic_is_named_before_any_solve(ref, tmp_path, value, name):
    key = "model.layers.1.mlp.down_proj"
    stats = restat(ref, tmp_path, "block_0001.safetensors",
                   lambda t: t[key].__setitem__((5, 2), value))
    line = quantize_fails(ref, stats, tmp_path / "q")
    assert line == f"Error: {stats}/block_0001.safetensors: statistic '{key}' has {name} at " \
        "index [5, 2] (the first of 1 non-finite value)"
    assert line[len("Error: "):] in error_line(qdtk("inspect", "--verify", stats, code=1))


SD = "model.layers.0.mlp.down_proj"
BAD_STATISTIC = {  # of another model, or not what capture writes
    "shape": (lambda t: t.update({SD: t[SD][:100, :100]}),
              f"statistic '{SD}' has shape [100, 100], but '{SD}.weight' has 192 input columns"),
    "dtype": (lambda t: t.update({SD: t[SD].astype(np.float16)}),
              f"statistic '{SD}' is float16, expected float32"),
}


@pytest.mark.parametrize("case", BAD_STATISTIC)
def test_a_statistic_that_does_not_fit_is_refused(ref, tmp_path, case):
    edit, message = BAD_STATISTIC[case]
    stats = restat(ref, tmp_path, "block_0000.safetensors", edit)
    line = quantize_fails(ref, stats, tmp_path / "q")
    assert line == f"Error: {stats}/block_0000.safetensors: {message}"


def test_statistics_of_a_model_with_the_same_shapes_are_a_warning(ref, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ref["model"], model)
    t, meta = read_safetensors(model / "model.safetensors")
    write_safetensors(model / "model.safetensors", t, {**meta, "saved_by": "another tool"})
    output = qdtk("quantize", model, "--stats", ref["stats"], "--out", tmp_path / "q", *QUANT)
    assert f"WARNING qdtk.quantize: {ref['stats']}: captured from {ref['model']}, whose " \
        f"fingerprint differs from {model}'s: the shapes fit, but the statistics may be of " \
        "another model" in output


# ----------------------------------------------------------------------------- damaged files


def data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def flip_bit(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[(data_start(path) + len(b)) // 2] ^= 0x10
    path.write_bytes(bytes(b))


def reorder(path: Path) -> None:
    """Swap the first and the last 64 bytes of the data: every tensor still parses."""
    b = bytearray(path.read_bytes())
    s = data_start(path)
    b[s:s + 64], b[-64:] = b[-64:], b[s:s + 64]
    path.write_bytes(bytes(b))


DAMAGE = {"truncated": truncate, "bit-flipped": flip_bit, "reordered": reorder}
HASH_MESSAGE = r"content does not match the sha256 recorded in {manifest} \(changed or " \
    r"damaged after qdtk wrote it\); {fix}"
TRUNCATED = r"data shorter than the header says \(tensor '[^']+' ends at byte \d+, file has " \
    r"\d+\); the file is truncated"

# format: (folder, file, the reading command, manifest, what to do)
FORMATS = {
    "statistics": ("stats", "block_0001.safetensors", "quantize", "manifest.json",
                   r"delete it and rerun `qdtk capture` \(it recomputes that block\)"),
    "solution": ("quant", "block_0001.safetensors", "pack", "report.json",
                 r"rerun `qdtk quantize` \(it solves that block again\)"),
    "packed shard": ("packed", "model-00002-of-*.safetensors", "unpack", "config.json",
                     r"delete {folder} and rerun `qdtk pack`"),
}


def read_with(ref, command: str, folder: Path, out: Path) -> list:
    return {
        "quantize": ["quantize", ref["model"], "--stats", folder, "--out", out, *QUANT],
        "pack": ["pack", folder, "--model", ref["model"], "--out", out],
        "unpack": ["unpack", folder, "--out", out],
    }[command]


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_file_is_named_by_its_reader_and_by_verify(ref, tmp_path, fmt, damage):
    kind, file, command, manifest, fix = FORMATS[fmt]
    folder = tmp_path / kind
    shutil.copytree(ref[kind], folder)
    (path,) = folder.glob(file)
    file = path.name
    DAMAGE[damage](folder / file)
    out = tmp_path / "out"
    line = error_line(qdtk(*read_with(ref, command, folder, out), code=1))
    want = TRUNCATED if damage == "truncated" else HASH_MESSAGE.format(
        manifest=re.escape(str(folder / manifest)),
        fix=fix.format(folder=re.escape(str(folder))))
    assert re.fullmatch(rf"Error: {re.escape(str(folder / file))}: {want}", line), line
    assert not out.exists()  # found before anything was written
    assert error_line(qdtk("inspect", "--verify", folder, code=1)) == line


@pytest.mark.parametrize("kind,file", [("stats", "manifest.json"), ("quant", "report.json"),
                                       ("packed", "config.json"),
                                       ("packed", "model.safetensors.index.json")])
def test_truncated_manifest_is_named(ref, tmp_path, kind, file):
    folder = tmp_path / kind
    shutil.copytree(ref[kind], folder)
    truncate(folder / file)
    command = {"stats": "quantize", "quant": "pack", "packed": "unpack"}[kind]
    line = error_line(qdtk(*read_with(ref, command, folder, tmp_path / "out"), code=1))
    assert line.startswith(f"Error: {folder / file}: not valid JSON"), line
    assert not (tmp_path / "out").exists()


def test_truncated_model_shard_is_named(ref, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ref["model"], model)
    truncate(model / "model.safetensors")
    line = error_line(qdtk("quantize", model, "--stats", ref["stats"], "--out", tmp_path / "q",
                           *QUANT, code=1))
    assert re.fullmatch(rf"Error: {re.escape(str(model))}/model\.safetensors: {TRUNCATED}", line)


def test_verify_passes_every_intact_folder(ref):
    for kind in ("stats", "quant", "packed", "packed1", "model"):
        assert f"{ref[kind]}: verified " in qdtk("inspect", "--verify", ref[kind])


def test_a_rerun_solves_a_damaged_block_again(ref, tmp_path):
    out = tmp_path / "quant"
    shutil.copytree(ref["quant"], out)
    flip_bit(out / "block_0001.safetensors")
    qdtk("quantize", ref["model"], "--stats", ref["stats"], "--out", out, *QUANT)
    assert files(out)["block_0001.safetensors"] == files(ref["quant"])["block_0001.safetensors"]


def test_files_from_before_content_hashes_are_read_with_one_warning(ref, tmp_path):
    stats = tmp_path / "stats"
    shutil.copytree(ref["stats"], stats)
    manifest = json.loads((stats / "manifest.json").read_text())
    for block in manifest["blocks"]:
        del block["sha256"]
    write_json_atomic(stats / "manifest.json", manifest)
    out = tmp_path / "q"
    output = qdtk("quantize", ref["model"], "--stats", stats, "--out", out, *QUANT)
    warnings = [x for x in output.splitlines() if "records no content hashes" in x]
    assert warnings == [f"WARNING qdtk.formats.io: {stats}: manifest.json records no content "
                        "hashes (written by an older qdtk); its files are read without an "
                        "integrity check"]
    assert files(out)["block_0001.safetensors"] == files(ref["quant"])["block_0001.safetensors"]

