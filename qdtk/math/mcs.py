"""Masked Calibration Simulation (METHOD.md §1): which tokens the model sees during calibration.

Pure NumPy. A token stream is cut into N windows of L tokens (right-padded when the text is
short); sequence j gets a timestep t_j, keeps its first floor(gamma * len_j) real tokens
visible, and replaces every later real token by the mask token with probability p(t_j), drawn
from a generator seeded with seed + j. Padding is never masked and never counts.

With `per_sequence = k > 1` every window is used k times: sequence j = c * N + i is copy c of
window i, so the N * k timesteps of the grid are spread over each window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from qdtk.errors import QdtkError

# Mask token ids of dLLMs whose configs and tokenizers do not name one (METHOD.md §1).
KNOWN_MASK_IDS = {"llada": 126336, "dream": 151666}


@dataclass(frozen=True)
class MaskOptions:
    """The MCS knobs of METHOD.md §1 (defaults: the published choice)."""

    gamma: float = 0.25  # visible prefix ratio
    schedule: str = "linear"  # "linear": p = t; "cosine": p = 1 - cos(pi t / 2)
    timesteps: str = "grid"  # "grid": t_j = (j+1)/S; "random": LLaDA's (1-eps) u + eps
    per_sequence: int = 1  # timesteps (masked copies) per window
    eps: float = 1e-3  # floor of the random timesteps
    seed: int = 0
    mask: bool | None = True  # False: plain calibration; None: decided by the model's use

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise QdtkError(f"--gamma must lie in [0, 1], got {self.gamma}")
        if self.schedule not in ("linear", "cosine"):
            raise QdtkError(f"unknown schedule {self.schedule!r} (linear or cosine)")
        if self.timesteps not in ("grid", "random"):
            raise QdtkError(f"unknown timestep mode {self.timesteps!r} (grid or random)")
        if self.per_sequence < 1:
            raise QdtkError(f"--per-sequence must be >= 1, got {self.per_sequence}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class MaskedBatch:
    """S = N * per_sequence calibration sequences, ready for the model."""

    ids: np.ndarray  # [S, L] int64, mask token where masked, pad id on padding
    attention: np.ndarray  # [S, L] bool, True on real tokens
    masked: np.ndarray  # [S, L] bool, True where the mask token replaced a real token
    t: np.ndarray  # [S] timesteps
    windows: np.ndarray  # [S] index of the window each sequence comes from

    @property
    def tokens(self) -> int:
        """Tokens that count (padding does not)."""
        return int(self.attention.sum())


def choose_windows(n_tokens: int, N: int, L: int, seed: int) -> np.ndarray:
    """Start offsets [N] of N windows of L tokens in a stream of n_tokens (seeded).

    Disjoint windows when the stream holds N of them, else overlapping random starts; a stream
    shorter than L gives N windows at 0 (each then padded).
    """
    if n_tokens <= 0:
        raise QdtkError("the calibration text produced no tokens")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    if n_tokens <= L:
        return np.zeros(N, dtype=np.int64)
    K = n_tokens // L
    if K >= N:
        return rng.choice(K, size=N, replace=False).astype(np.int64) * L
    return rng.integers(0, n_tokens - L + 1, size=N).astype(np.int64)


def validation_windows(n_tokens: int, N: int, V: int, L: int, seed: int) -> np.ndarray | None:
    """Start offsets [V] of V windows disjoint from the N of `choose_windows` (and from each
    other), from the slots of L tokens those leave free (seeded apart from them); None when the
    stream holds fewer than N + V disjoint windows, so no window can be kept out of H."""
    K = n_tokens // L
    if V < 1 or n_tokens <= L or K < N + V:
        return None
    free = np.setdiff1d(np.arange(K), choose_windows(n_tokens, N, L, seed) // L)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    return np.sort(rng.choice(free, size=V, replace=False)).astype(np.int64) * L


def cut_windows(stream: np.ndarray, N: int, L: int, seed: int, pad_id: int,
                starts: np.ndarray | None = None):
    """ids [N, L] and attention [N, L] of N seeded windows of `stream` (or of the windows at
    `starts` [N]), right-padded."""
    stream = np.asarray(stream, dtype=np.int64)
    if starts is None:
        starts = choose_windows(len(stream), N, L, seed)
    ids = np.full((N, L), pad_id, dtype=np.int64)
    attention = np.zeros((N, L), dtype=bool)
    for i, s in enumerate(starts):
        w = stream[s : s + L]
        ids[i, : len(w)] = w
        attention[i, : len(w)] = True
    return ids, attention


def timestep_grid(S: int) -> np.ndarray:
    """t_j = (j+1)/S: a stratified grid over (0, 1], never 0."""
    return (np.arange(S, dtype=np.float64) + 1.0) / S


def mask_probability(t: np.ndarray | float, schedule: str = "linear") -> np.ndarray:
    """Probability that a non-prefix token is masked at timestep t (visible = 1 - p)."""
    t = np.asarray(t, dtype=np.float64)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 1.0 - np.cos(0.5 * np.pi * t)
    raise QdtkError(f"unknown schedule {schedule!r} (linear or cosine)")


def mask_batch(
    ids: np.ndarray, attention: np.ndarray, mask_id: int | None, opts: MaskOptions,
    prompt: int | None = None, noise_vocab: int | None = None,
) -> MaskedBatch:
    """Apply MCS to N windows: S = N * per_sequence masked sequences (METHOD.md §1).

    Block diffusion (DiffusionGemma): `prompt` tokens of each window are the clean prompt
    (the visible prefix instead of gamma's), only the canvas after them is masked; with
    `noise_vocab` a masked token becomes a uniformly drawn token id below it (such models are
    trained and sampled with uniform noise and have no mask token) instead of `mask_id`.
    """
    N, L = ids.shape
    S = N * opts.per_sequence
    window = np.arange(S) % N
    ids_S, att_S = ids[window].copy(), attention[window].copy()  # [S, L]
    grid = timestep_grid(S)
    t = np.empty(S)
    masked = np.zeros((S, L), dtype=bool)
    for j in range(S):
        rng = np.random.default_rng(opts.seed + j)
        t[j] = (1 - opts.eps) * rng.random() + opts.eps if opts.timesteps == "random" else grid[j]
        if not opts.mask:
            continue
        n_real = int(att_S[j].sum())
        u = rng.random(L)  # [L]
        draw = u < mask_probability(t[j], opts.schedule)
        draw[: int(np.floor(opts.gamma * n_real)) if prompt is None else prompt] = False
        masked[j] = draw & att_S[j]  # the visible prefix stays
        if noise_vocab is not None:
            ids_S[j, masked[j]] = rng.integers(0, noise_vocab, int(masked[j].sum()))
    if opts.mask and noise_vocab is None:
        if mask_id is None:
            raise QdtkError("masked calibration needs a mask token id")
        ids_S[masked] = mask_id
    return MaskedBatch(ids_S, att_S, masked, t, window)


def resolve_mask_token_id(
    config: dict,
    tokenizer_mask_id: int | None = None,
    override: int | None = None,
    where: str = "the model",
) -> int:
    """METHOD.md §1: --mask-token-id; else config mask_token_id; else the tokenizer's; else known
    defaults by model_type; else an error asking for --mask-token-id."""
    vocab = config.get("vocab_size")
    for source, value in (
        ("--mask-token-id", override),
        ("config.json mask_token_id", config.get("mask_token_id")),
        ("the tokenizer's mask token", tokenizer_mask_id),
        (f"the known default of model_type {config.get('model_type')!r}",
         KNOWN_MASK_IDS.get(str(config.get("model_type", "")).lower())),
    ):
        if value is None:
            continue
        if not isinstance(value, (int, np.integer)) or value < 0 or (vocab and value >= vocab):
            raise QdtkError(f"{where}: mask token id {value!r} from {source} is not a token id "
                            f"of a vocabulary of {vocab}")
        return int(value)
    raise QdtkError(
        f"{where}: no mask token id (config.json has no mask_token_id, the tokenizer has no mask "
        f"token, and model_type {config.get('model_type')!r} has no known default); pass "
        f"--mask-token-id ID, or --no-mask for plain unmasked calibration"
    )
