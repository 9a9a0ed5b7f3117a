"""The layer driver, above the math: the sweep over one Linear with compensation, feedback and
refinement (`layer`), and the layer solvers the quantize options name (`solvers`)."""

from __future__ import annotations

import functools
from pathlib import Path

from qdtk.formats.io import new_hash

# The sources whose code decides a layer's solution and the model-scope allocation (the
# pre-pass's forwards included), relative to the package.
SOLVER_SOURCES = ("math", "solve", "torch", "options.py", "formats/solution.py",
                  "formats/bits.py", "allocate.py", "quantize.py")


@functools.cache
def solver_code() -> str:
    """A hash of SOLVER_SOURCES' Python files. Part of every solution's and allocation's
    fingerprint: a run folder written by other code (an upgrade, an edit) is solved again
    instead of resumed with results the code in use would not give."""
    root = Path(__file__).resolve().parents[1]
    h = new_hash()
    for src in SOLVER_SOURCES:
        path = root / src
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]
