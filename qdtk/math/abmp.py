"""ABMP (METHOD.md §5): how many binary planes each 128-column group of a layer gets.

Two allocators:
- `swap_orders`, the published one: per layer the k = min(floor(rho*G), floor(G/2)) lowest-scoring
  groups get order 1 and the k highest order 3, the rest 2 (average exactly 2).
- the knapsack (qdtk): every group g picks an order o from an allowed set, at an honest cost in
  bits (`group_costs`, from qdtk.formats.bits) and a predicted value e_g(o) = tr(D_g H_gg D_g^T),
  the output error of the group solved alone at order o (`group_errors`). The summed value is
  minimised under a bit budget, for one layer (`allocate_layer`) or one budget over many layers
  whose values are weighted by each layer's effect on the model output (`allocate_model`,
  weights from `sensitivity`).

Everything here is NumPy/Numba; the solver and the model forward are injected as callables, so
this module never imports torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from qdtk.backend import to_host
from qdtk.errors import QdtkError
from qdtk.formats.bits import (
    bcq_bits,
    group_bits,
    group_plane_bits,
    group_slices,
    group_widths,
)
from qdtk.math.hessian import salience

log = logging.getLogger(__name__)

ORDERS = (1, 2, 3)
COUNTS = ("real", "planes")
METHODS = ("none", "swap", "knapsack")
# Memory cap of the exact DP (a byte per item and budget cell, two float64 rows); beyond it the
# Lagrangian runs.
DP_MAX_BYTES = 1 << 28

# solve(W_g [n, w], order, d_g [w] = diag(U) of its columns) -> What_g [n, w] float32: the group
# solved alone (the salience weights of DAQ come from W_g and d_g).
GroupSolver = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


def _host(x, dtype) -> np.ndarray:
    """x (NumPy or CuPy) as a NumPy array of `dtype`: the allocation runs on the host."""
    return to_host(x).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Scores and the published swap


def group_scores(W: np.ndarray, d: np.ndarray) -> np.ndarray:
    """[G] S_g = sum of the salience s_ij = W_ij^2 / d_j^2 over the group's columns, all rows."""
    s = salience(_host(W, np.float64), _host(d, np.float64))  # [n, m]
    colsum = s.sum(axis=0)  # [m]
    return np.array([colsum[cols].sum() for cols in group_slices(W.shape[1])])


def swap_orders(S: np.ndarray, rho: float) -> np.ndarray:
    """[G] orders: the k lowest scores get 1, the k highest 3, the rest 2.

    k = min(floor(rho*G), floor(G/2)), so the two sets never overlap and the mean order is
    exactly 2. Ties are broken by a stable ascending sort of S: among equal scores the lower
    group index counts as lower (it is the first to get order 1, the last to get order 3).
    """
    if not 0 <= rho <= 1:
        raise QdtkError(f"--rho must lie in [0, 1], got {rho}")
    G = len(S)
    k = min(math.floor(rho * G), G // 2)
    rank = np.argsort(np.asarray(S), kind="stable")  # [G] ascending
    orders = np.full(G, 2, np.int64)
    orders[rank[:k]] = 1
    orders[rank[G - k :]] = 3
    return orders


# ---------------------------------------------------------------------------------------------
# Candidates: cost and value of every (group, order)


def group_costs(n: int, m: int, orders: Sequence[int] = ORDERS, count: str = "real") -> np.ndarray:
    """[G, C] int64 bits of each group at each allowed order.

    count "real": planes plus float16 scales (what is stored); "planes": o*n*w only (the
    nominal bits of the papers, for comparison).
    """
    if count not in COUNTS:
        raise QdtkError(f"--count must be one of {', '.join(COUNTS)}, got {count!r}")
    bits = group_bits if count == "real" else group_plane_bits
    return bits(n, group_widths(m)[:, None], np.asarray(orders)[None, :])


def output_error(D: np.ndarray, H: np.ndarray) -> float:
    """tr(D H D^T) for D [n, w] and H [w, w]: the output error of a weight change D."""
    D = np.asarray(D, np.float64)
    return float(np.einsum("ij,ij->", D @ H, D))


def group_errors(
    W: np.ndarray,
    H: np.ndarray,
    d: np.ndarray,
    orders: Sequence[int],
    solve: GroupSolver,
) -> np.ndarray:
    """[G, C] e_g(o) = tr(D_g H_gg D_g^T), D_g = W_g - solve(W_g, o, d_g), each group alone.

    H is the layer's prepared (damped) H, d = diag(U); no compensation between groups. W and d
    are passed on in float32, as the layer driver passes them, so that a memoising solver
    (`qdtk.math.group.DaqGroupSolver`) serves the driver's uncompensated solves from its cache.
    A solver with a `prefetch(W, order, d)` method is first asked for each order's whole layer
    (on a GPU: every group in one set of launches).
    """
    G = len(group_slices(W.shape[1]))
    prefetch = getattr(solve, "prefetch", None)
    if prefetch is not None:
        for o in orders:
            prefetch(_host(W, np.float32), int(o), _host(d, np.float32))
    return np.stack([chosen_errors(W, H, d, np.full(G, o), solve) for o in orders], axis=1)


def chosen_errors(
    W: np.ndarray, H: np.ndarray, d: np.ndarray, orders: np.ndarray, solve: GroupSolver
) -> np.ndarray:
    """[G] e_g(o_g): the predicted error of each group alone at its order o_g."""
    W, H, d = _host(W, np.float32), _host(H, np.float64), _host(d, np.float32)
    out = []
    for g, cols in enumerate(group_slices(W.shape[1])):
        Wg = np.ascontiguousarray(W[:, cols])  # [n, w]
        out.append(output_error(Wg - solve(Wg, int(orders[g]), d[cols]), H[cols, cols]))
    return np.array(out)


def dequantize_orders(
    W: np.ndarray, d: np.ndarray, orders: np.ndarray, solve: GroupSolver
) -> np.ndarray:
    """[n, m] What with every group solved alone at its order (no compensation)."""
    W, d = _host(W, np.float32), _host(d, np.float32)
    What = np.empty_like(W)
    for g, cols in enumerate(group_slices(W.shape[1])):
        What[:, cols] = solve(np.ascontiguousarray(W[:, cols]), int(orders[g]), d[cols])
    return What


# ---------------------------------------------------------------------------------------------
# The multiple-choice knapsack


@dataclass
class Knapsack:
    choice: np.ndarray  # [items] index of the chosen option of each item
    value: float  # sum of the chosen values
    cost: int  # sum of the chosen costs, <= budget
    gap: float  # certified: value - optimum <= gap (0 for the exact DP)
    method: str  # "dp" (exact) or "lagrange"


@njit(cache=True)
def _mckp_dp(v, c, cap):  # pragma: no cover - compiled
    """Exact DP: f[x] = least value of the items so far with cost <= x. v [I, C], c [I, C] >= 0."""
    I, C = v.shape
    f = np.zeros(cap + 1)
    g = np.empty(cap + 1)
    pick = np.empty((I, cap + 1), np.uint8)
    for i in range(I):
        for x in range(cap + 1):
            best = np.inf
            bj = 0
            for j in range(C):
                if c[i, j] <= x:
                    val = f[x - c[i, j]] + v[i, j]
                    if val < best:  # strict: the first (cheapest-listed) option wins ties
                        best = val
                        bj = j
            g[x] = best
            pick[i, x] = bj
        f, g = g, f
    choice = np.empty(I, np.int64)
    x = cap
    for i in range(I - 1, -1, -1):
        j = pick[i, x]
        choice[i] = j
        x -= c[i, j]
    return choice


def _lower_hull(c: np.ndarray, v: np.ndarray) -> list[int]:
    """Option indices on the lower convex hull of (cost, value), from the cheapest, value falling.

    Starts at the cheapest option (least value among equally cheap), keeps only options that
    lower the value, and drops any point on or above the chord of its neighbours.
    """
    idx = sorted(range(len(c)), key=lambda j: (c[j], v[j], j))
    hull: list[int] = []
    for j in idx:
        if hull and (c[j] == c[hull[-1]] or v[j] >= v[hull[-1]]):
            continue
        while len(hull) >= 2:
            p, q = hull[-2], hull[-1]
            # q is not below the chord p -> j: drop it (cross-multiplied slopes, costs increase)
            if (v[q] - v[p]) * (c[j] - c[p]) >= (v[j] - v[p]) * (c[q] - c[p]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _mckp_lagrange(v: np.ndarray, c: np.ndarray, cap: int) -> tuple[np.ndarray, float]:
    """Greedy on the hull segments by slope (the LP relaxation), then a greedy repair.

    Returns (choice, LP lower bound). The LP optimum takes the segments in order of steepest
    value decrease per bit, the first one that does not fit fractionally; stopping before it
    is at most that segment's value drop above the LP, hence above the optimum.
    """
    I = v.shape[0]
    hulls = [_lower_hull(c[i], v[i]) for i in range(I)]
    seg = [
        ((v[i, h[k + 1]] - v[i, h[k]]) / (c[i, h[k + 1]] - c[i, h[k]]), i, k)
        for i, h in enumerate(hulls)
        for k in range(len(h) - 1)
    ]
    seg.sort()  # slope ascending (steepest descent first); ties by item, then hull position
    choice = np.array([h[0] for h in hulls], np.int64)
    left = cap - int(c[np.arange(I), choice].sum())
    lp = float(v[np.arange(I), choice].sum())
    blocked = np.zeros(I, bool)
    lp_done = False
    for slope, i, k in seg:
        if blocked[i]:
            continue
        dc = int(c[i, hulls[i][k + 1]] - c[i, hulls[i][k]])
        if dc <= left:
            left -= dc
            choice[i] = hulls[i][k + 1]
            if not lp_done:
                lp += slope * dc
        else:
            if not lp_done:
                lp += slope * left  # the fractional segment of the LP optimum
                lp_done = True
            blocked[i] = True  # later segments of item i need this one first
    # Repair: spend what is left on the single move (any option) that lowers the value most.
    rows = np.arange(I)
    while True:
        dcost = c - c[rows, choice][:, None]  # [I, C]
        dval = v - v[rows, choice][:, None]
        gain = np.where((dcost <= left) & (dval < 0), -dval, 0.0)
        best = int(np.argmax(gain))  # first maximum: deterministic
        if gain.flat[best] <= 0:
            break
        i, j = divmod(best, v.shape[1])
        left -= int(dcost[i, j])
        choice[i] = j
    return choice, lp


def knapsack(
    values: np.ndarray, costs: np.ndarray, budget: int, *, dp_bytes: int = DP_MAX_BYTES
) -> Knapsack:
    """Pick one option per item minimising the summed value with summed cost <= budget.

    values [I, C] float (finite), costs [I, C] integers (bits). Costs are shifted by each item's
    cheapest option and divided by their GCD; when the resulting exact grid (I x cells) fits in
    `dp_bytes` an exact DP in Numba solves it (gap 0). Otherwise a Lagrangian sweep over the
    lower convex hulls plus a greedy repair runs; it is never over budget and its value exceeds
    the optimum by at most the certified `gap` = value - LP bound, which is at most the value
    drop of one hull segment. Both are deterministic.
    """
    v = np.asarray(values, np.float64)
    c = np.asarray(costs)
    if v.shape != c.shape or v.ndim != 2 or v.shape[1] == 0:
        raise QdtkError(f"knapsack: values {v.shape} and costs {c.shape} must be equal [I, C]")
    if not np.all(np.isfinite(v)):
        raise QdtkError("knapsack: the candidate values contain NaN or Inf")
    if not np.issubdtype(c.dtype, np.integer):
        raise QdtkError("knapsack: costs must be integers (bits)")
    c = c.astype(np.int64)
    I = v.shape[0]
    cmin = c.min(axis=1)  # [I]
    need = int(cmin.sum())
    if budget < need:
        raise QdtkError(f"knapsack: budget {budget} bits is below the minimum {need} bits")
    c0 = c - cmin[:, None]  # [I, C] >= 0, every item has a free option
    unit = int(np.gcd.reduce(c0.ravel())) if I else 0
    cap = (budget - need) // unit if unit else 0
    cap = min(cap, int(c0.max(axis=1).sum()) // unit if unit else 0)  # more never helps
    if (I + 16) * (cap + 1) <= dp_bytes:
        choice = _mckp_dp(v, c0 // max(unit, 1), cap) if I else np.zeros(0, np.int64)
        gap, method = 0.0, "dp"
    else:
        choice, lp = _mckp_lagrange(v, c0, budget - need)
        method = "lagrange"
        gap = max(float(v[np.arange(I), choice].sum()) - lp, 0.0)
    rows = np.arange(I)
    total = int(c[rows, choice].sum())
    assert total <= budget
    return Knapsack(choice, float(v[rows, choice].sum()), total, gap, method)


# ---------------------------------------------------------------------------------------------
# Allocation over layers


@dataclass
class LayerCandidates:
    name: str
    n: int
    m: int
    E: np.ndarray  # [G, C] predicted output error of each group at each allowed order
    orders: tuple[int, ...] = ORDERS


def budget_bits(bits: float, weights: int) -> int:
    """floor(bits * weights) without float noise (2.3 * 100 is 229.99999999999997)."""
    return math.floor(round(bits * weights, 6))


def budget_per_weight(bits: float | None, count: str, shapes: Sequence[Sequence[int]]) -> float:
    """The knapsack budget in bits per weight of layers of these (n, m) shapes: `bits`, or when
    that is None the cost of uniform order 2 (the published method's budget), as `count`
    counts."""
    if bits is not None:
        return float(bits)
    cost = sum(int(group_costs(n, m, (2,), count).sum()) for n, m in shapes)
    return cost / sum(n * m for n, m in shapes)


def check_orders(orders: Sequence[int]) -> tuple[int, ...]:
    """The allowed orders, sorted and unique, each 1..4 (`--orders 1,2,3`)."""
    out = tuple(sorted({int(o) for o in orders}))
    if not out or out[0] < 1 or out[-1] > 4:
        raise QdtkError(f"--orders must be a non-empty subset of 1,2,3,4, got {list(orders)}")
    return out


def check_budget(
    scope: str, shapes: Sequence[tuple[int, int]], bits: float, count: str, order: int = 1
) -> int:
    """The budget in bits of layers of these (n, m) shapes; an error if every group at the
    lowest allowed `order` already exceeds it. Cheap: call it before any solve."""
    n_weights = sum(n * m for n, m in shapes)
    need = int(sum(group_costs(n, m, (order,), count).sum() for n, m in shapes))
    budget = budget_bits(bits, n_weights)
    if budget < need:
        what = "scales included" if count == "real" else "sign planes only"
        raise QdtkError(
            f"{scope}: --bits {bits} is below the minimum of {need / n_weights:.4f} bits per "
            f"weight (every group at order {order}, {what})"
        )
    return budget


def allocate_layer(cand: LayerCandidates, bits: float, count: str = "real") -> np.ndarray:
    """[G] knapsack orders of one layer on its own budget of `bits` per weight."""
    return allocate_model([cand], bits, count)[0]


def allocate_model(
    cands: Sequence[LayerCandidates],
    bits: float,
    count: str = "real",
    weights: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """Orders per layer from one knapsack over all their groups, budget `bits` per weight.

    Each layer's values are multiplied by its weight (`sensitivity`: model output change per
    unit of the layer's output error) so that values of different layers are comparable;
    weights None means 1 for all (right for a single layer).
    """
    if not cands:
        return []
    w = np.ones(len(cands)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(cands),) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise QdtkError("allocate_model: one finite, non-negative weight per layer is needed")
    values, costs = [], []
    for cand, wl in zip(cands, w, strict=True):
        cost = group_costs(cand.n, cand.m, cand.orders, count)
        if cand.E.shape != cost.shape:
            raise QdtkError(
                f"{cand.name}: candidate errors have shape {list(cand.E.shape)}, "
                f"expected {list(cost.shape)} (groups x orders)"
            )
        values.append(wl * cand.E)
        costs.append(cost)
    scope = cands[0].name if len(cands) == 1 else f"the model ({len(cands)} layers)"
    shapes = [(cand.n, cand.m) for cand in cands]
    budget = check_budget(scope, shapes, bits, count, min(min(c.orders) for c in cands))
    ks = knapsack(np.concatenate(values), np.concatenate(costs), budget)
    if ks.gap > 0:
        log.info("knapsack (%s): value within %.3g of the optimum", ks.method, ks.gap)
    out, start = [], 0
    for cand in cands:
        G = cand.E.shape[0]
        out.append(np.asarray(cand.orders, np.int64)[ks.choice[start : start + G]])
        start += G
    return out


def choose_orders(
    name: str,
    W: np.ndarray,
    H: np.ndarray,
    d: np.ndarray,
    *,
    method: str,
    rho: float = 0.05,
    bits: float | None = None,
    count: str = "real",
    orders: Sequence[int] = ORDERS,
    uniform: int = 2,
    solve: GroupSolver | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """[G] orders of one layer (layer scope) and its ABMP report.

    method "none": every group at `uniform`; "swap": `swap_orders` of the group scores with
    `rho`; "knapsack": `allocate_layer` at `bits` per weight (`count`) over `orders`, with
    values from `group_errors` (needs `solve`). The report (`layer_report`) has the predicted
    error whenever `solve` is given (for none and swap it costs one solve per group, which an
    uncompensated sweep with the same memoising solver reuses).
    """
    n, m = W.shape
    G = len(group_slices(m))
    E = None
    if method == "none":
        chosen = np.full(G, uniform, np.int64)
    elif method == "swap":
        chosen = swap_orders(group_scores(W, d), rho)
    elif method == "knapsack":
        if bits is None or solve is None:
            raise QdtkError(f"{name}: --abmp knapsack needs --bits and a DAQ solver")
        order_set = check_orders(orders)
        check_budget(name, [(n, m)], bits, count, order_set[0])
        E = group_errors(W, H, d, order_set, solve)
        chosen = allocate_layer(LayerCandidates(name, n, m, E, order_set), bits, count)
    else:
        raise QdtkError(f"--abmp must be one of {', '.join(METHODS)}, got {method!r}")
    if E is not None:
        predicted = float(E[np.arange(G), np.searchsorted(order_set, chosen)].sum())
    elif solve is not None:
        predicted = float(chosen_errors(W, H, d, chosen, solve).sum())
    else:
        predicted = None
    return chosen, {"abmp": method, **layer_report(n, m, chosen, predicted)}


# ---------------------------------------------------------------------------------------------
# Model-scope weights


def sensitivity(
    name: str,
    W: np.ndarray,
    H: np.ndarray,
    What: np.ndarray,
    output_change: Callable[[str, np.ndarray], float],
) -> float:
    """Model output change per unit of layer output error, the layer `name` alone quantized.

    output_change(name, What) runs the model with only this layer's weight replaced by What
    and measures the change of its output (e.g. mean squared change of the final hidden states,
    or the rise of the masked-token loss) on calibration data. The layer output error is
    tr((W - What) H (W - What)^T) with the same H the group values use, so sensitivity * E
    predicts a model output change. A layer quantized without any error gets weight 0.
    """
    err = output_error(_host(W, np.float64) - _host(What, np.float64), _host(H, np.float64))
    return sensitivity_weight(name, err, float(output_change(name, What)))


def sensitivity_weight(name: str, err: float, change: float) -> float:
    """change / err: the measured model output change over the layer's output error err =
    tr(D H D^T) (`sensitivity`); 0 for a layer quantized without error."""
    if not math.isfinite(change) or change < 0:
        raise QdtkError(f"{name}: the measured output change is {change}, not a finite value >= 0")
    return change / err if err > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Reporting


def orders_histogram(orders: np.ndarray) -> dict[str, int]:
    """{"1": groups at order 1, ...} for the orders present."""
    vals, counts = np.unique(np.asarray(orders), return_counts=True)
    return {str(int(o)): int(k) for o, k in zip(vals, counts, strict=True)}


def layer_report(
    n: int, m: int, orders: np.ndarray, predicted_error: float | None = None
) -> dict[str, Any]:
    """Per-layer ABMP summary: histogram, real and nominal bits per weight, predicted error."""
    orders = np.asarray(orders, np.int64)
    report: dict[str, Any] = {
        "orders_histogram": orders_histogram(orders),
        "bits_per_weight": bcq_bits(n, m, orders) / (n * m),
        "plane_bits_per_weight": float(group_plane_bits(n, group_widths(m), orders).sum())
        / (n * m),
    }
    if predicted_error is not None:
        report["predicted_error"] = predicted_error
    return report


def model_bits_per_weight(layers: Sequence[tuple[int, int, np.ndarray]]) -> float:
    """Real bits per weight over layers given as (n, m, orders)."""
    bits = sum(bcq_bits(n, m, orders) for n, m, orders in layers)
    return bits / sum(n * m for n, m, _ in layers)
