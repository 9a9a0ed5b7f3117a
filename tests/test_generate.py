"""`qdtk generate` (qdtk/torch/generate.py): LLaDA's schedule, low-confidence remasking, Dream's
shift,
on models whose logits are built to prefer known tokens, and end to end on tiny checkpoints."""

import json

import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402

from qdtk.cli.main import cli  # noqa: E402
from qdtk.errors import QdtkError  # noqa: E402
from qdtk.torch.generate import GenerateOptions, diffuse, transfer_counts  # noqa: E402

MASK, V = 9, 64


def preferring(targets, confidence, shift=0):
    """logits_fn whose logits at position i + shift put `confidence[i]` on targets[i] (and are
    flat elsewhere): the sampler should write targets[i] at i, most confident first."""
    T = len(targets)

    def logits_fn(x):
        logits = torch.zeros(x.shape[0], T, V)
        for i, (t, c) in enumerate(zip(targets, confidence, strict=True)):
            if 0 <= i + shift < T:
                logits[:, i + shift, t] = c
        return logits

    return logits_fn


def test_transfer_counts_spread_a_block_evenly():
    assert transfer_counts(32, 4) == [8, 8, 8, 8]
    assert transfer_counts(10, 4) == [3, 3, 2, 2]
    assert transfer_counts(3, 5) == [1, 1, 1, 0, 0]
    for m in range(0, 40):
        for s in range(1, 9):
            c = transfer_counts(m, s)
            assert sum(c) == m and max(c) - min(c) <= 1


def test_schedule_blocks_and_confidence_order():
    P, opts = 3, GenerateOptions(gen_length=12, block_length=4, steps=6)  # 2 steps per block
    targets = [1, 2, 3] + [20 + i for i in range(12)]
    confidence = [0.0] * 3 + [1.0 + i % 4 for i in range(12)]  # the last of each block first
    trace = []
    out = diffuse(preferring(targets, confidence), torch.tensor([[1, 2, 3]]), MASK, opts,
                  trace=trace)
    assert out[0].tolist() == targets
    assert len(trace) == 6
    for step, (b, written) in enumerate(trace):
        lo = P + b * opts.block_length
        assert b == step // 2 and written.shape == (1, 2)  # exactly the planned count
        assert all(lo <= p < lo + opts.block_length for p in written[0].tolist())
        # the two most confident remaining positions of the block
        expected = [lo + 3, lo + 2] if step % 2 == 0 else [lo + 1, lo]
        assert written[0].tolist() == expected


def test_nothing_lands_after_the_current_block():
    opts = GenerateOptions(gen_length=8, block_length=4, steps=4)
    seen = []

    def logits_fn(x):
        seen.append(x.clone())
        logits = torch.zeros(1, x.shape[1], V)
        logits[0, :, 5] = torch.arange(x.shape[1]).float()  # later positions look more sure
        return logits

    diffuse(logits_fn, torch.tensor([[1, 2]]), MASK, opts)
    for x in seen[:2]:  # while block 0 is filled, block 1 stays all masks
        assert (x[0, 6:] == MASK).all()
    assert (seen[2][0, 2:6] != MASK).all()  # block 0 full after its last step


def test_dream_shift_reads_position_i_from_the_logits_at_i_minus_1():
    targets = [1, 2] + [30 + i for i in range(4)]
    confidence = [0.0, 0.0, 4.0, 3.0, 2.0, 1.0]
    fn = preferring(targets, confidence, shift=-1)  # logits at i - 1 predict token i
    opts = GenerateOptions(gen_length=4, block_length=4, steps=4)
    shifted = diffuse(fn, torch.tensor([[1, 2]]), MASK, opts, shift=1)
    plain = diffuse(fn, torch.tensor([[1, 2]]), MASK, opts, shift=0)
    assert shifted[0].tolist() == targets
    assert plain[0].tolist() != targets


def test_temperature_zero_is_deterministic_and_sampling_is_seeded(tiny_llada):
    from qdtk.torch.models import load_model

    model = load_model(tiny_llada)

    def fn(x):
        with torch.inference_mode():
            return model(input_ids=x).logits

    prompt = torch.tensor([[5, 6, 7]])
    greedy = GenerateOptions(gen_length=8, block_length=4, steps=4)
    assert torch.equal(diffuse(fn, prompt, 103, greedy), diffuse(fn, prompt, 103, greedy))
    hot = [GenerateOptions(8, 4, 8, temperature=2.0, seed=s) for s in (1, 1, 2)]
    a, b, c = (diffuse(fn, prompt, 103, o) for o in hot)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not (a == 103).any()


def test_options_are_checked():
    with pytest.raises(QdtkError, match="not a multiple of --block-length"):
        GenerateOptions(gen_length=10, block_length=4).check_blocks()
    with pytest.raises(QdtkError, match="not a multiple of the 4 blocks"):
        diffuse(None, torch.zeros(1, 2, dtype=torch.long), 0,
                GenerateOptions(gen_length=16, block_length=4, steps=6))
    with pytest.raises(QdtkError, match="must be positive"):
        GenerateOptions(gen_length=0)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_cli_generate(arch, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{arch}")
    args = ["generate", str(folder), "--prompt", "masked models", "--gen-length", "8",
            "--block-length", "4", "--steps", "4", "--json"]
    first, again = (CliRunner().invoke(cli, args) for _ in range(2))
    assert first.exit_code == 0, first.output
    a, b = (json.loads(r.output[r.output.index("{"):]) for r in (first, again))
    assert a["forward"] == {"llada": "LLaDA", "dream": "Dream"}[arch]
    assert len(a["tokens"]) == 8 and a["options"]["mask_token_id"] not in a["tokens"]
    assert (a["tokens"], a["completion"]) == (b["tokens"], b["completion"])
    chat = CliRunner().invoke(cli, args[:2] + ["--prompt", "hi", "--chat"] + args[4:])
    assert chat.exit_code == 0, chat.output
    assert json.loads(chat.output[chat.output.index("{"):])["prompt_tokens"] > 2
    bert = request.getfixturevalue("tiny_llama")
    r = CliRunner().invoke(cli, ["generate", str(bert), "--prompt", "x"])
    assert r.exit_code == 1 and "masked diffusion models" in r.output
