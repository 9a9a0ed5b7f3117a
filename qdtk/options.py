"""The options of the quantize stage as one typed, frozen, validated object.

`QuantizeOptions` is built once at the edge (the CLI, or `QuantizeOptions.of` in a library
call) and checked there: a bad value or combination is a QdtkError naming the option before any
solve. Inside, the stage reads its fields and hands the math the numbers it needs as explicit
arguments. Its defaults are the published method (uniform or swap orders, no refinement), so an
options mapping written before ABMP and refinement keeps its meaning; the CLI's defaults are the
measured best instead (qdtk.cli.options).

`fingerprinted()` is what the result depends on, recorded in report.json and hashed into every
solution file's fingerprint: the fields of the chosen method, never the RUN_ONLY fields (how
and where the stage runs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from qdtk.errors import QdtkError
from qdtk.formats.checkpoint import match_name
from qdtk.math.abmp import COUNTS, ORDERS, budget_per_weight, check_orders
from qdtk.math.abmp import METHODS as ABMP_METHODS
from qdtk.math.daq import BACKENDS
from qdtk.math.refine import MODES
from qdtk.math.rotation import Rotation, check_rotation, layer_rotation

METHODS = ("daq", "gptq", "rtn")
SCOPES = ("layer", "model")
FEEDBACK = ("diagonal", "block")
MODEL_CODES = ("auto", "native", "remote")
# How the model-scope pre-pass runs the model (its own code, or qdtk's native forward); where
# the layers are solved (qdtk.cluster: a Ray cluster, and the CPUs per task). Not fingerprinted.
RUN_ONLY = ("trust_remote_code", "model_code", "cluster", "num_cpus")
# What the affine baselines' result depends on (the DAQ fields do not reach them).
BASELINE_FIELDS = ("method", "bits", "percdamp")
# --rotate applies to every method; fingerprinted only when it rotates.
ROTATION_FIELDS = ("rotate", "rotate_seed")
# Fingerprinted only when on (off, the results are those of qdtk before it).
OPTIONAL_FIELDS = ("early_stop", "rotate_exclude", "group_refine")
# Fingerprinted only when set (None: what qdtk did before them).
UNSET_FIELDS = ("candidate_iters",)


@dataclass(frozen=True)
class QuantizeOptions:
    """For DAQ, `bits` is the uniform order with abmp none/swap and the budget in bits per
    weight (`count`) with knapsack, None meaning what uniform order 2 costs; for gptq/rtn it is
    the grid's bits."""

    method: str = "daq"  # daq, gptq or rtn
    bits: float | None = 2
    abmp: str = "none"  # none, swap, knapsack
    rho: float = 0.05  # swap: the fraction of groups moved down and up
    count: str = "real"  # knapsack: bits with the float16 scales, or sign planes only
    budget_scope: str = "layer"  # knapsack: one budget per layer, or one over the model
    orders: tuple[int, ...] = ORDERS  # knapsack: the allowed orders
    iters: int = 15  # DAQ block solver iterations
    candidate_iters: int | None = None  # knapsack: those of its candidate solves (None: iters)
    tau: float = 2.0  # salience z-score threshold
    lam: float = 3.0  # error weight of the salient weights
    percdamp: float = 0.01  # damping of H, a fraction of its mean diagonal
    compensate: bool = True  # GPTQ-style error feedback between groups
    feedback: str = "diagonal"  # diagonal (published) or block (exact)
    refit: bool = True  # DAQ's closed-form scale refit
    refine: str = "none"  # qdtk.math.refine.MODES
    group_refine: int = 0  # rounds of each group's refinement in the sweep (block feedback)
    refine_rounds: int | None = None  # None: the mode's own
    early_stop: bool = False  # refinement rounds stopped on the validation statistic's error
    backend: str = "cpu"  # qdtk.math.daq.BACKENDS
    shrink: float = 0.0  # H shrunk toward its diagonal by this much for the fit
    rotate: str = "none"  # none, or hadamard: solved as W Q against Q^T H Q (qdtk.math.rotation)
    rotate_seed: int = 0  # the seed of Q's random signs
    rotate_exclude: tuple[str, ...] = ()  # Linears left unrotated (globs, or re:REGEX)
    trust_remote_code: bool = False
    model_code: str = "auto"
    cluster: str | None = None  # ray or ray://ADDRESS (qdtk.cluster)
    num_cpus: int = 1  # CPUs (and threads) of each --cluster task

    @classmethod
    def of(cls, options: QuantizeOptions | Mapping[str, Any]) -> QuantizeOptions:
        """`options` as QuantizeOptions: a mapping's keys are its fields (missing ones take the
        defaults above); an unknown key is an error."""
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise QdtkError(f"quantize options must be QuantizeOptions or a mapping, got "
                            f"{type(options).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise QdtkError(f"unknown quantize option(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(sorted(known))}")
        return cls(**options)

    def __post_init__(self) -> None:
        for f, value in _normalised(self).items():
            object.__setattr__(self, f, value)
        _check(self)

    @property
    def knapsack(self) -> bool:
        return self.method == "daq" and self.abmp == "knapsack"

    @property
    def model_scope(self) -> bool:
        """Whether the orders of all layers come from one model-wide knapsack (qdtk.allocate)."""
        return self.knapsack and self.budget_scope == "model"

    def fingerprinted(self) -> dict[str, Any]:
        """{field: value} of everything the solutions depend on (JSON-ready)."""
        values = {k: v for k, v in asdict(self).items() if k not in RUN_ONLY}
        rotation = {} if self.rotate == "none" else {k: values[k] for k in ROTATION_FIELDS}
        if self.rotate_exclude:
            rotation["rotate_exclude"] = list(self.rotate_exclude)
        for k in ROTATION_FIELDS:  # unrotated runs keep the fingerprints they had before
            del values[k]
        for k in OPTIONAL_FIELDS:  # rotate_exclude: with the rotation's fields
            if not values[k] or k == "rotate_exclude":
                del values[k]
        for k in UNSET_FIELDS:
            if values[k] is None:
                del values[k]
        if self.method != "daq":
            return {**{k: values[k] for k in BASELINE_FIELDS}, **rotation}
        return {**values, "orders": list(self.orders), **rotation}

    def rotation(self, name: str, m: int) -> Rotation | None:
        """The input rotation of the m-wide Linear `name` (None: solved as given)."""
        if any(match_name(name, p) for p in self.rotate_exclude):
            return None
        return layer_rotation(self.rotate, self.rotate_seed, m)

    def refine_mode(self) -> dict | None:
        """qdtk.math.refine.refine_layer's keyword arguments for `refine` (None: no refinement),
        with `refine_rounds` replacing the mode's own number of rounds."""
        mode = MODES[self.refine]
        if mode is None or self.refine_rounds is None:
            return mode
        return {**mode, "rounds": self.refine_rounds}

    def group_settings(self, candidates: bool = False) -> dict[str, Any]:
        """The settings of qdtk.math.group.solve_group (and DaqGroupSolver): of the sweep's
        solves, or with `candidates` of the knapsack's (each group alone at every order)."""
        iters = self.iters if not candidates or self.candidate_iters is None else \
            self.candidate_iters
        return dict(iters=iters, tau=self.tau, lam=self.lam, refit=self.refit,
                    backend=self.backend)

    def budget(self, shapes: Sequence[Sequence[int]]) -> float:
        """The knapsack budget in bits per weight of layers of these (n, m) shapes."""
        return budget_per_weight(self.bits, self.count, shapes)


def _number(name: str, value: Any, integer: bool = False) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        what = "a whole number" if integer else "a finite number"
        raise QdtkError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")
    return value


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise QdtkError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                        f"got {value!r}")


def _normalised(o: QuantizeOptions) -> dict[str, Any]:
    """Equal meanings in one form (so they fingerprint alike): orders a sorted tuple, bits an
    int where it counts planes or grid bits and a float where it is a budget; numbers as the
    types their fields say."""
    out: dict[str, Any] = {}
    if isinstance(o.orders, (str, bytes)) or not isinstance(o.orders, Sequence):
        raise QdtkError(f"--orders must be a list of orders such as 1,2,3, got {o.orders!r}")
    out["orders"] = check_orders([_number("orders", x, integer=True) for x in o.orders])
    if o.bits is not None:
        bits = _number("bits", o.bits)
        knapsack = o.method == "daq" and o.abmp == "knapsack"
        out["bits"] = float(bits) if knapsack or bits != int(bits) else int(bits)
    for name in ("rho", "tau", "lam", "percdamp", "shrink"):
        out[name] = float(_number(name, getattr(o, name)))
    for name in ("iters", "num_cpus", "group_refine"):
        out[name] = _number(name, getattr(o, name), integer=True)
    if o.refine_rounds is not None:
        out["refine_rounds"] = _number("refine_rounds", o.refine_rounds, integer=True)
    if o.candidate_iters is not None and _number(
            "candidate_iters", o.candidate_iters, integer=True) < 0:  # (before it is dropped)
        raise QdtkError(f"--candidate-iters must be at least 0, got {o.candidate_iters}")
    if not (o.method == "daq" and o.abmp == "knapsack") or o.candidate_iters == o.iters:
        out["candidate_iters"] = None  # no candidates, or solved as the sweep's: one setting
    for name in ("compensate", "refit", "trust_remote_code", "early_stop"):
        if not isinstance(getattr(o, name), bool):
            raise QdtkError(f"{name} must be true or false, got {getattr(o, name)!r}")
    if isinstance(o.rotate_exclude, (str, bytes)) or not all(
            isinstance(p, str) for p in o.rotate_exclude):
        raise QdtkError(f"--rotate-exclude must be a list of patterns, got {o.rotate_exclude!r}")
    out["rotate_exclude"] = tuple(o.rotate_exclude) if o.rotate != "none" else ()
    if o.method != "daq" or o.refine == "none":
        out["early_stop"] = False  # it stops refinement rounds: without them it changes nothing
    if o.method != "daq" or o.feedback != "block" or not o.compensate:
        out["group_refine"] = 0  # it refines on the metric of block feedback: none without it
    return out


def _check(o: QuantizeOptions) -> None:
    """Reject inconsistent options before any solve, with a message naming the option."""
    _choice("method", o.method, METHODS)
    check_rotation(o.rotate, o.rotate_seed)
    _choice("model_code", o.model_code, MODEL_CODES)
    if o.num_cpus < 1:
        raise QdtkError(f"--num-cpus must be at least 1, got {o.num_cpus}")
    if o.cluster is not None and not isinstance(o.cluster, str):
        raise QdtkError(f"--cluster must be ray or ray://HOST:PORT, got {o.cluster!r}")
    if not o.percdamp > 0:
        raise QdtkError(f"--percdamp must be positive, got {o.percdamp}")
    method_abmp = o.abmp if o.method == "daq" else "none"
    _choice("abmp", method_abmp, ABMP_METHODS)
    if o.knapsack:
        if o.bits is not None and not o.bits > 0:
            raise QdtkError(f"--bits {o.bits}: the knapsack budget must be positive bits per "
                            f"weight")
    else:
        top = 4 if o.method == "daq" else 8
        what = f"--abmp {method_abmp}" if o.method == "daq" else f"--method {o.method}"
        if o.bits is None or not isinstance(o.bits, int):
            raise QdtkError(
                f"--bits {o.bits}: with {what} it is an integer 1..{top} "
                f"({'planes per group' if o.method == 'daq' else 'grid bits'}); a real budget "
                f"such as 2.1 bits per weight needs --method daq --abmp knapsack"
            )
        if not 1 <= o.bits <= top:
            raise QdtkError(
                f"--bits {o.bits}: with {what} it is an integer 1..{top} (planes per group)"
                if o.method == "daq" else
                f"--bits {o.bits}: baselines store uint8 codes: bits must be 1..8"
            )
    if o.method != "daq":
        return
    if not 0 <= o.rho <= 1:
        raise QdtkError(f"--rho must lie in [0, 1], got {o.rho}")
    _choice("count", o.count, COUNTS)
    _choice("budget_scope", o.budget_scope, SCOPES)
    if o.budget_scope == "model" and method_abmp != "knapsack":
        raise QdtkError("--budget-scope model needs --abmp knapsack (one budget for all layers)")
    _choice("feedback", o.feedback, FEEDBACK)
    _choice("refine", o.refine, tuple(MODES))
    _choice("backend", o.backend, tuple(BACKENDS))
    if o.iters < 0:
        raise QdtkError(f"--iters must be at least 0, got {o.iters}")
    if o.group_refine < 0:
        raise QdtkError(f"--group-refine must be at least 0, got {o.group_refine}")
    if o.refine_rounds is not None and o.refine_rounds < 1:
        raise QdtkError(f"--refine-rounds must be a whole number >= 1, got {o.refine_rounds!r}")
    if not 0 <= o.shrink < 1:
        raise QdtkError(f"--shrink {o.shrink}: the shrinkage toward the diagonal must lie in "
                        f"[0, 1)")
