"""Cheap checks before an expensive run: finiteness with the first bad index, free disk space.

Each failure is one QdtkError naming the file and tensor (and for non-finite values the first
bad index), raised before the stage has solved or written anything.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from qdtk.errors import QdtkError
from qdtk.formats.checkpoint import FLOAT_CODES, Checkpoint
from qdtk.math.hessian import all_finite

SPACE_MARGIN = 1.05  # estimated output sizes get 5% headroom (headers, rounding)


def first_nonfinite(A: np.ndarray) -> tuple[tuple[int, ...], float, int] | None:
    """(index, value, count) of A's first NaN or Inf in C order, None when A is finite.
    A finite A costs one sum (no A-sized temporary); only a bad one is scanned."""
    if all_finite(A):
        return None
    bad = ~np.isfinite(A)
    flat = int(np.argmax(bad))
    index = tuple(int(i) for i in np.unravel_index(flat, A.shape))
    return index, float(A.reshape(-1)[flat]), int(np.count_nonzero(bad))


def check_finite(A: np.ndarray, where: str) -> None:
    """A QdtkError `where: value at index [i, j] (first of k non-finite values)` if A has any."""
    found = first_nonfinite(A)
    if found is not None:
        index, value, count = found
        name = "NaN" if np.isnan(value) else ("Inf" if value > 0 else "-Inf")
        raise QdtkError(f"{where} has {name} at index {list(index)} (the first of {count} "
                        f"non-finite value{'s' if count > 1 else ''})")


def check_tensors_finite(ckpt: Checkpoint, names: Iterable[str] | None = None,
                         progress: bool = False) -> None:
    """Every floating tensor of `ckpt` among `names` (default: all) is finite; one read each."""
    from tqdm.auto import tqdm

    names = ckpt.names() if names is None else list(names)
    for name in tqdm(names, desc="check weights", unit="tensor", disable=not progress):
        info = ckpt.info(name)
        if info.dtype in FLOAT_CODES:
            check_finite(ckpt.read(name), f"{info.file}: tensor {name!r}")


def check_model_finite(model: str | Path) -> None:
    """Every floating tensor of a checkpoint folder is finite (a GGUF file is not checked)."""
    if Path(model).is_dir():
        check_tensors_finite(Checkpoint(model), progress=True)


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the filesystem that holds `folder` (or would hold it: its first existing
    parent)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(folder: str | Path, need: int, what: str) -> None:
    """A QdtkError when `folder`'s filesystem has less free space than `need` bytes (+5%)."""
    free = free_bytes(folder)
    if need * SPACE_MARGIN > free:
        raise QdtkError(
            f"{folder}: {what} needs about {size_text(need)}, but its filesystem has "
            f"{size_text(free)} free; free space there or choose another output folder"
        )


def size_text(n: int) -> str:
    """Bytes in words: '812 bytes', '93.4 KiB', '1.2 GiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"
