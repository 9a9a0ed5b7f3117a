"""MCS masking (qdtk/math/mcs.py) and calibration sources (qdtk/formats/calib.py): pure NumPy, no
torch."""

import json

import numpy as np
import pytest

from qdtk.errors import QdtkError
from qdtk.formats.calib import (
    SOURCES,
    builtin_documents,
    builtin_text,
    calibration_documents,
    calibration_text,
    evaluation_text,
    mix_documents,
    troff_to_text,
)
from qdtk.math.mcs import (
    MaskOptions,
    choose_windows,
    cut_windows,
    mask_batch,
    mask_probability,
    resolve_mask_token_id,
    timestep_grid,
    validation_windows,
)

MASK = 999


def _batch(N=16, L=256, opts=None, pad_from=None):
    opts = opts or MaskOptions()
    ids = np.arange(N * L, dtype=np.int64).reshape(N, L) % 500
    attention = np.ones((N, L), dtype=bool)
    if pad_from is not None:
        attention[:, pad_from:] = False
        ids[:, pad_from:] = 0
    return ids, attention, mask_batch(ids, attention, MASK, opts)


def test_timestep_grid_is_stratified_and_never_zero():
    t = timestep_grid(8)
    np.testing.assert_allclose(t, np.arange(1, 9) / 8)
    assert t.min() > 0 and t.max() == 1.0


def test_prefix_never_masked_and_fraction_within_binomial_bound():
    N, L, gamma = 16, 512, 0.25
    ids, att, b = _batch(N, L, MaskOptions(gamma=gamma, seed=3))
    P = int(np.floor(gamma * L))
    assert not b.masked[:, :P].any()
    assert np.array_equal(b.ids == MASK, b.masked)
    assert np.array_equal(b.ids[~b.masked], ids[~b.masked])  # unmasked tokens untouched
    n = L - P
    for i in range(N):
        t = (i + 1) / N
        k = b.masked[i, P:].sum()
        assert abs(k - n * t) <= 5 * np.sqrt(n * t * (1 - t)) + 1, (i, k, n * t)
    assert b.masked[-1, P:].all()  # t = 1 masks every non-prefix token


def test_masks_reproducible_with_seed_and_differ_with_another():
    a = _batch(opts=MaskOptions(seed=7))[2]
    b = _batch(opts=MaskOptions(seed=7))[2]
    c = _batch(opts=MaskOptions(seed=8))[2]
    assert np.array_equal(a.masked, b.masked)
    assert not np.array_equal(a.masked[:-1], c.masked[:-1])


def test_sequence_mask_uses_generator_seed_plus_index():
    L, gamma, seed = 64, 0.25, 5
    _, _, b = _batch(4, L, MaskOptions(gamma=gamma, seed=seed))
    for j in range(4):
        u = np.random.default_rng(seed + j).random(L)
        expect = u < (j + 1) / 4
        expect[: int(gamma * L)] = False
        assert np.array_equal(b.masked[j], expect)


def test_padding_never_masked_and_prefix_counts_real_tokens():
    N, L, real = 8, 64, 40
    _, att, b = _batch(N, L, MaskOptions(gamma=0.5), pad_from=real)
    assert not b.masked[:, real:].any()
    assert not b.masked[:, : real // 2].any()
    assert b.masked[-1, real // 2 : real].all()
    assert b.tokens == N * real


def test_no_mask_is_plain_calibration():
    ids, _, b = _batch(opts=MaskOptions(mask=False))
    assert not b.masked.any() and np.array_equal(b.ids, ids)


def test_gamma_zero_masks_everything_at_t_one():
    _, _, b = _batch(4, 32, MaskOptions(gamma=0.0))
    assert b.masked[-1].all()


def test_several_timesteps_per_sequence_spread_over_each_window():
    N, k = 4, 3
    ids, _, b = _batch(N, 128, MaskOptions(per_sequence=k))
    assert b.ids.shape[0] == N * k
    np.testing.assert_allclose(b.t, timestep_grid(N * k))
    for i in range(N):
        rows = np.flatnonzero(b.windows == i)
        assert len(rows) == k
        assert np.ptp(b.t[rows]) >= (k - 1) / k - 1e-12  # low, middle and high t
        for r in rows:
            keep = ~b.masked[r]
            assert np.array_equal(b.ids[r][keep], ids[i][keep])


def test_cosine_schedule_and_random_timesteps():
    np.testing.assert_allclose(mask_probability([0.0, 0.5, 1.0], "cosine"),
                               [0.0, 1 - np.cos(np.pi / 4), 1.0])
    eps = 1e-3
    _, _, b = _batch(32, 64, MaskOptions(timesteps="random", eps=eps, seed=1))
    assert np.all((b.t >= eps) & (b.t <= 1))
    assert len(np.unique(b.t)) == 32
    _, _, b2 = _batch(32, 64, MaskOptions(timesteps="random", eps=eps, seed=1))
    assert np.array_equal(b.t, b2.t)


def test_bad_options_are_errors():
    with pytest.raises(QdtkError, match="gamma"):
        MaskOptions(gamma=1.5)
    with pytest.raises(QdtkError, match="schedule"):
        MaskOptions(schedule="square")


def test_windows_disjoint_seeded_or_padded():
    starts = choose_windows(10_000, 8, 100, seed=0)
    assert len(set(starts)) == 8 and np.all(starts % 100 == 0)
    assert np.array_equal(starts, choose_windows(10_000, 8, 100, seed=0))
    assert not np.array_equal(starts, choose_windows(10_000, 8, 100, seed=1))
    over = choose_windows(250, 8, 100, seed=0)  # only 2 disjoint windows: overlapping starts
    assert np.all((over >= 0) & (over <= 150))
    stream = np.arange(30)
    ids, att = cut_windows(stream, 3, 50, seed=0, pad_id=-1)
    assert np.array_equal(ids[:, :30], np.tile(stream, (3, 1))) and np.all(ids[:, 30:] == -1)
    assert att.sum() == 90 and not att[:, 30:].any()
    with pytest.raises(QdtkError, match="no tokens"):
        cut_windows(np.array([], dtype=np.int64), 2, 8, 0, 0)


def test_validation_windows_disjoint_from_training():
    train = choose_windows(10_000, 8, 100, seed=3)
    val = validation_windows(10_000, 8, 5, 100, seed=3)
    assert len(set(val)) == 5 and np.all(val % 100 == 0) and not set(val) & set(train)
    assert np.array_equal(val, validation_windows(10_000, 8, 5, 100, seed=3))
    assert validation_windows(1_200, 8, 5, 100, seed=3) is None  # 12 slots < 8 + 5
    assert validation_windows(1_300, 8, 5, 100, seed=3) is not None
    assert validation_windows(10_000, 8, 0, 100, seed=3) is None
    stream = np.arange(10_000)
    ids, att = cut_windows(stream, len(val), 100, 0, -1, starts=val)
    assert np.array_equal(ids[:, 0], val) and att.all()


def test_mask_token_id_rule():
    cfg = {"vocab_size": 200_000, "model_type": "llada", "mask_token_id": 7}
    assert resolve_mask_token_id(cfg, 9, None) == 7
    assert resolve_mask_token_id(cfg, 9, 11) == 11
    assert resolve_mask_token_id({"model_type": "llada"}, 9) == 9
    assert resolve_mask_token_id({"model_type": "llada"}) == 126336
    assert resolve_mask_token_id({"model_type": "Dream"}) == 151666
    with pytest.raises(QdtkError, match="--mask-token-id") as e:
        resolve_mask_token_id({"model_type": "llama"}, None, None, "models/tiny")
    assert "models/tiny" in str(e.value) and "--no-mask" in str(e.value)
    with pytest.raises(QdtkError, match="vocabulary"):
        resolve_mask_token_id({"vocab_size": 10}, None, 12)


@pytest.mark.parametrize("source", list(SOURCES))
def test_builtin_sources_split_fixed_and_disjoint(source):
    calib, held = builtin_text("calib", source), builtin_text("heldout", source)
    assert 0.7 < len(calib) / (len(calib) + len(held)) < 0.9
    assert len(held) > 50_000  # enough for 32 windows of 256 tokens
    assert held and held not in calib and calib[:2000] not in held
    assert not set(builtin_documents(source, "calib")) & set(builtin_documents(source, "heldout"))
    assert calibration_text(f"builtin:{source}") == calib
    assert evaluation_text(f"builtin:{source}") == held
    assert "\\f" not in held and "\n.SH" not in held  # troff markup is gone (man pages)


def test_builtin_calibration_mix():
    """`builtin` is the calibration mix: no held-out text of any source is in it."""
    text = calibration_text(None)
    assert text == calibration_text("builtin")
    for source in SOURCES:
        for doc in builtin_documents(source, "heldout"):
            assert doc[:500] not in text
    docs = mix_documents(("pydoc", "manpages"), limit=1000)
    assert sum(map(len, docs)) == 2000  # each source cut to the limit
    assert docs[0] == builtin_documents("pydoc", "calib")[0][:1000]
    with pytest.raises(QdtkError, match="builtin:pydoc"):
        calibration_text("builtin:novels")
    with pytest.raises(QdtkError, match="one built-in source"):
        evaluation_text("builtin")


def test_troff_to_text():
    src = """.\\" a comment
.TH pipe 7 2022-12-04 "Linux man-pages 6.03"
.SH NAME
pipe \\- overview of pipes
.SH DESCRIPTION
A pipe has a
.I read end
and a
.IR "write end" .
See
.BR fifo (7)
for details.
.TS
tab;
l l.
x\ty
.TE
.PP
It\\(aqs \\fBbold\\fP and \\fIitalic\\fR\\(emdone.
"""
    assert troff_to_text(src) == (
        "NAME pipe - overview of pipes\n\nDESCRIPTION A pipe has a read end and a write end. "
        "See fifo(7) for details.\n\nIt's bold and italic - done.")


def test_calibration_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    assert calibration_documents(tmp_path / "a.txt") == ["first document"]
    assert calibration_documents(tmp_path / "b.jsonl") == ["second", "third"]
    assert calibration_documents(tmp_path) == ["first document", "second", "third"]
    assert calibration_text(tmp_path) == "first document\n\nsecond\n\nthird"


def test_bad_calibration_sources(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(QdtkError, match=r"bad.jsonl:2"):
        calibration_documents(bad)
    with pytest.raises(QdtkError, match="not found"):
        calibration_documents(tmp_path / "missing.txt")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(QdtkError, match=".txt or .jsonl"):
        calibration_documents(tmp_path / "x.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QdtkError, match="no .txt or .jsonl"):
        calibration_documents(empty)
