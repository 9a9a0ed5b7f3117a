"""ABMP: scores, the swap allocator, honest costs, the knapsack against brute force, model scope."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdtk.errors import QdtkError
from qdtk.formats.bits import bcq_bits, group_bits, group_slices
from qdtk.math import abmp
from qdtk.math.hessian import prepare_hessian


def residual_solver(W_g: np.ndarray, order: int, d_g: np.ndarray) -> np.ndarray:
    """A plain stand-in for DAQ: greedy residual binarisation with float16 scales."""
    R = W_g.astype(np.float64)
    What = np.zeros_like(R)
    for _ in range(order):
        a = np.abs(R).mean(axis=1)  # [n]
        b = (np.abs(R) / np.maximum(a[:, None], 1e-12)).mean(axis=0)  # [w]
        a, b = a.astype(np.float16).astype(np.float64), b.astype(np.float16).astype(np.float64)
        P = np.outer(a, b) * np.where(R >= 0, 1.0, -1.0)
        What += P
        R -= P
    return What.astype(np.float32)


def layer(rng, n: int, m: int, T: int = 400):
    """A random layer with a correlated H, prepared as the stage prepares it."""
    X = rng.standard_normal((T, m)) @ rng.standard_normal((m, m)) * 0.3 + rng.standard_normal(m)
    W = (rng.standard_normal((n, m)) * np.exp(rng.standard_normal(m))).astype(np.float32)
    return W, prepare_hessian(2 / T * X.T @ X), X


def brute_force(v: np.ndarray, c: np.ndarray, budget: int) -> float:
    """Least summed value over all option tuples within budget."""
    I, C = v.shape
    combos = np.array(list(itertools.product(range(C), repeat=I)))  # [C^I, I]
    rows = np.arange(I)
    cost = c[rows, combos].sum(axis=1)
    val = v[rows, combos].sum(axis=1)
    return float(val[cost <= budget].min())


# --- scores and swap ----------------------------------------------------------------------------


def test_group_scores_sum_salience_per_group(rng):
    n, m = 5, 300  # a ragged last group of 44 columns
    W = rng.standard_normal((n, m))
    d = rng.uniform(0.5, 2.0, m)
    S = abmp.group_scores(W, d)
    expected = [
        sum(W[i, j] ** 2 / d[j] ** 2 for i in range(n) for j in range(a, b))
        for a, b in [(0, 128), (128, 256), (256, 300)]
    ]
    np.testing.assert_allclose(S, expected, rtol=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300),
    st.floats(0, 1),
)
def test_swap_mean_order_is_two_and_moves_the_extremes(S, rho):
    S = np.array(S)
    G = len(S)
    orders = abmp.swap_orders(S, rho)
    assert orders.sum() == 2 * G
    k = min(int(np.floor(rho * G)), G // 2)
    assert (orders == 1).sum() == k and (orders == 3).sum() == k
    if k:  # every order-1 score <= every order-2 score <= every order-3 score
        lo, mid, hi = S[orders == 1], S[orders == 2], S[orders == 3]
        assert lo.max() <= min(mid.min(initial=np.inf), hi.min())
        assert hi.min() >= max(mid.max(initial=-np.inf), lo.max())


def test_swap_small_layers_and_ties():
    assert np.all(abmp.swap_orders(np.arange(19.0), 0.05) == 2)  # floor(0.95) = 0 moves
    assert np.all(abmp.swap_orders(np.arange(40.0), 0) == 2)
    # equal scores: the lowest indices count as lowest
    np.testing.assert_array_equal(abmp.swap_orders(np.zeros(6), 0.34), [1, 1, 2, 2, 3, 3])
    with pytest.raises(QdtkError, match="rho"):
        abmp.swap_orders(np.zeros(4), 1.5)


# --- costs and values ---------------------------------------------------------------------------


def test_group_costs_count_scales_or_planes_only():
    n, m = 96, 300
    real = abmp.group_costs(n, m, (1, 2, 3, 4))
    planes = abmp.group_costs(n, m, (1, 2, 3, 4), count="planes")
    widths = [128, 128, 44]
    for g, w in enumerate(widths):
        for c, o in enumerate((1, 2, 3, 4)):
            assert real[g, c] == o * n * w + 16 * o * (n + w)
            assert planes[g, c] == o * n * w
    assert real[:, 1].sum() == bcq_bits(n, m, [2, 2, 2])
    with pytest.raises(QdtkError, match="--count"):
        abmp.group_costs(n, m, count="nominal")


def test_group_errors_are_the_groups_output_errors(rng):
    n, m = 8, 300
    W, prep, _ = layer(rng, n, m)
    orders = (1, 2, 3)
    E = abmp.group_errors(W, prep.H, prep.d, orders, residual_solver)
    assert E.shape == (3, 3)
    for g, cols in enumerate(group_slices(m)):
        for c, o in enumerate(orders):
            D = np.zeros((n, m))  # the change confined to group g, against the full H
            D[:, cols] = W[:, cols] - residual_solver(W[:, cols], o, prep.d[cols])
            assert E[g, c] == pytest.approx(np.trace(D @ prep.H @ D.T), rel=1e-9)
    assert np.all(np.diff(E, axis=1) < 0)  # more planes, less error (greedy residual)
    chosen = np.array([1, 3, 2])
    np.testing.assert_array_equal(
        abmp.chosen_errors(W, prep.H, prep.d, chosen, residual_solver), E[[0, 1, 2], chosen - 1]
    )
    # assembling an allocation solves the same groups
    What = abmp.dequantize_orders(W, prep.d, chosen, residual_solver)
    np.testing.assert_array_equal(What[:, 128:256], residual_solver(W[:, 128:256], 3, None))


# --- the knapsack -------------------------------------------------------------------------------


@st.composite
def instances(draw, max_items=8, max_choices=3):
    I = draw(st.integers(1, max_items))
    C = draw(st.integers(1, max_choices))
    seed = draw(st.integers(0, 2**32 - 1))
    r = np.random.default_rng(seed)
    c = r.integers(1, draw(st.sampled_from([4, 50, 10**6])), (I, C))
    v = np.round(r.exponential(1.0, (I, C)), draw(st.sampled_from([1, 12])))  # ties and not
    lo, hi = int(c.min(axis=1).sum()), int(c.max(axis=1).sum())
    budget = draw(st.integers(lo, hi + 3))
    return v, c, budget


@settings(max_examples=150, deadline=None)
@given(instances())
def test_knapsack_dp_equals_brute_force(inst):
    v, c, budget = inst
    ks = abmp.knapsack(v, c, budget)
    assert ks.method == "dp" and ks.gap == 0
    assert ks.cost <= budget
    rows = np.arange(len(v))
    assert ks.cost == c[rows, ks.choice].sum() and ks.value == pytest.approx(
        v[rows, ks.choice].sum()
    )
    assert ks.value == pytest.approx(brute_force(v, c, budget), rel=1e-12, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(instances())
def test_knapsack_lagrange_within_its_certified_gap(inst):
    v, c, budget = inst
    ks = abmp.knapsack(v, c, budget, dp_bytes=0)  # force the Lagrangian path
    assert ks.method == "lagrange"
    assert ks.cost <= budget
    opt = brute_force(v, c, budget)
    assert opt - 1e-9 <= ks.value <= opt + ks.gap + 1e-9
    # the gap never exceeds one group's whole value range
    assert ks.gap <= (v.max(axis=1) - v.min(axis=1)).max() + 1e-9


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(1.0, 3.2), st.sampled_from([0, abmp.DP_MAX_BYTES]))
def test_knapsack_never_over_budget_on_layer_costs(seed, bits, dp_bytes):
    """Many groups of several layers (different n, ragged widths): both methods stay in budget."""
    r = np.random.default_rng(seed)
    shapes = [(int(r.integers(8, 200)), int(r.integers(1, 700))) for _ in range(4)]
    costs = np.concatenate([abmp.group_costs(n, m) for n, m in shapes])
    values = np.sort(r.exponential(1.0, costs.shape), axis=1)[:, ::-1]  # falling with order
    budget = abmp.budget_bits(bits, sum(n * m for n, m in shapes))
    if budget < costs[:, 0].sum():
        with pytest.raises(QdtkError):
            abmp.knapsack(values, costs, budget, dp_bytes=dp_bytes)
        return
    ks = abmp.knapsack(values, costs, budget, dp_bytes=dp_bytes)
    assert ks.cost <= budget


def test_knapsack_beats_swap_at_swaps_budget(rng):
    for _ in range(20):
        n, m = int(rng.integers(16, 300)), int(rng.integers(128 * 10, 128 * 40))
        G = len(group_slices(m))
        # errors fall with order at group-dependent rates, as real layers do
        E = rng.exponential(1.0, (G, 1)) * rng.uniform(0.2, 0.6, (G, 1)) ** np.arange(3)
        swap = abmp.swap_orders(E[:, 1], rng.uniform(0.05, 0.5))
        costs = abmp.group_costs(n, m)
        ks = abmp.knapsack(E, costs, bcq_bits(n, m, swap))
        assert ks.value <= E[np.arange(G), swap - 1].sum() + 1e-12


def test_knapsack_is_deterministic_with_ties():
    v = np.ones((6, 3))  # every allocation is optimal
    c = np.tile([1, 2, 3], (6, 1))
    for dp_bytes in (abmp.DP_MAX_BYTES, 0):
        picks = {tuple(abmp.knapsack(v, c, 12, dp_bytes=dp_bytes).choice) for _ in range(3)}
        assert len(picks) == 1


def test_knapsack_bad_input():
    with pytest.raises(QdtkError, match="below the minimum 6 bits"):
        abmp.knapsack(np.ones((3, 2)), np.full((3, 2), 2), 5)
    with pytest.raises(QdtkError, match="NaN"):
        abmp.knapsack(np.array([[np.nan, 1.0]]), np.array([[1, 2]]), 5)
    with pytest.raises(QdtkError, match="integers"):
        abmp.knapsack(np.ones((1, 2)), np.array([[1.0, 2.5]]), 5)


# --- allocation over layers ---------------------------------------------------------------------


def test_allocate_layer_hits_a_real_budget_exactly_below_it():
    n, m = 512, 128 * 24
    G = 24
    rng = np.random.default_rng(1)
    E = rng.exponential(1.0, (G, 1)) * 0.3 ** np.arange(3)
    cand = abmp.LayerCandidates("layers.0.mlp.weight", n, m, E)
    orders = abmp.allocate_layer(cand, 2.0)
    bpw = bcq_bits(n, m, orders) / (n * m)
    assert bpw <= 2.0
    assert bpw > 2.0 - group_bits(n, 128, 1) / (n * m)  # no whole plane left unspent
    assert np.mean(orders) < 2  # 2.00 real bits cannot afford uniform order 2 (2.16 here)
    planes = abmp.allocate_layer(cand, 2.0, count="planes")
    assert planes.mean() == 2.0  # nominal count: exactly the plane budget


def test_budget_below_all_order_one_names_the_minimum():
    n, m = 64, 300
    minimum = bcq_bits(n, m, [1, 1, 1]) / (n * m)  # 1.0 + scales
    cand = abmp.LayerCandidates("blocks.3.q_proj.weight", n, m, np.ones((3, 3)))
    with pytest.raises(QdtkError, match=rf"blocks\.3\.q_proj\.weight.*{minimum:.4f} bits per"):
        abmp.allocate_layer(cand, 1.0)
    assert abmp.allocate_layer(cand, minimum).tolist() == [1, 1, 1]
    with pytest.raises(QdtkError, match=r"1\.0000 bits per weight.*sign planes only"):
        abmp.allocate_layer(cand, 0.99, count="planes")


def test_budget_bits_has_no_float_noise():
    assert abmp.budget_bits(2.3, 100) == 230
    assert abmp.budget_bits(2.0, 7) == 14


def output_change_of(Ws, Xs, scales):
    """Toy model: two layers feed one output; layer l's output is scaled by scales[l] downstream."""

    def output_change(name, What):
        l = int(name)
        D = (Ws[l] - What) @ Xs[l].T  # [n, T]
        return float(2 / Xs[l].shape[0] * np.sum((scales[l] * D) ** 2))

    return output_change


@pytest.mark.parametrize("scales", [(1.0, 10.0), (10.0, 1.0)])
def test_model_scope_gives_the_sensitive_layer_more_bits(scales):
    """Two layers with their own W and H; one feeds the output 10x amplified downstream."""
    n, m = 32, 128 * 4
    rng = np.random.default_rng(5)
    Ws, preps, Xs = zip(*[layer(rng, n, m, T=2 * m) for _ in range(2)], strict=True)
    change = output_change_of(Ws, Xs, scales)
    cands, weights = [], []
    for l in range(2):
        E = abmp.group_errors(Ws[l], preps[l].H, preps[l].d, abmp.ORDERS, residual_solver)
        cands.append(abmp.LayerCandidates(str(l), n, m, E))
        What = abmp.dequantize_orders(Ws[l], preps[l].d, np.full(4, 2), residual_solver)
        # H is damped, so the measured change per unit of error is just below scale^2
        w = abmp.sensitivity(str(l), Ws[l], preps[l].H, What, change)
        assert 0.9 * scales[l] ** 2 < w <= scales[l] ** 2
        weights.append(w)
    weighted = abmp.allocate_model(cands, 2.0, weights=weights)
    bits = [bcq_bits(n, m, o) for o in weighted]
    sensitive = int(np.argmax(scales))
    assert bits[sensitive] > bits[1 - sensitive]
    assert sum(bits) <= abmp.budget_bits(2.0, 2 * n * m)

    # it predicts a smaller model output change than the unweighted allocation
    def predicted(alloc):
        return sum(
            w * c.E[np.arange(4), o - 1].sum()
            for w, c, o in zip(weights, cands, alloc, strict=True)
        )

    assert predicted(weighted) <= predicted(abmp.allocate_model(cands, 2.0))


def test_sensitivity_rejects_a_bad_measurement(rng):
    W = rng.standard_normal((4, 8))
    with pytest.raises(QdtkError, match="lin: the measured output change"):
        abmp.sensitivity("lin", W, np.eye(8), W * 0.5, lambda name, What: float("nan"))
    assert abmp.sensitivity("lin", W, np.eye(8), W, lambda name, What: 0.0) == 0.0


def test_layer_and_model_reports():
    n, m = 64, 128 * 3 + 32
    orders = np.array([1, 3, 2, 2])
    rep = abmp.layer_report(n, m, orders, 7.5)
    assert rep["orders_histogram"] == {"1": 1, "2": 2, "3": 1}
    assert rep["bits_per_weight"] == bcq_bits(n, m, orders) / (n * m)
    assert rep["plane_bits_per_weight"] == (128 * (1 + 3 + 2) + 32 * 2) / m
    assert rep["predicted_error"] == 7.5
    assert "predicted_error" not in abmp.layer_report(n, m, orders)
    total = abmp.model_bits_per_weight([(n, m, orders), (32, 128, np.array([2]))])
    assert total == (bcq_bits(n, m, orders) + bcq_bits(32, 128, [2])) / (n * m + 32 * 128)


def test_choose_orders_per_method(rng):
    n, m = 64, 128 * 5
    W, prep, _ = layer(rng, n, m)
    args = ("blocks.0.fc.weight", W, prep.H, prep.d)
    o, rep = abmp.choose_orders(*args, method="none", uniform=3)
    assert o.tolist() == [3] * 5 and rep["abmp"] == "none" and "predicted_error" not in rep
    o, rep = abmp.choose_orders(*args, method="swap", rho=0.2, solve=residual_solver)
    np.testing.assert_array_equal(o, abmp.swap_orders(abmp.group_scores(W, prep.d), 0.2))
    E = abmp.group_errors(W, prep.H, prep.d, (1, 2, 3), residual_solver)
    assert rep["predicted_error"] == pytest.approx(E[np.arange(5), o - 1].sum(), rel=1e-12)
    o, rep = abmp.choose_orders(
        *args, method="knapsack", bits=2.0, orders=(3, 1, 2), solve=residual_solver
    )
    cand = abmp.LayerCandidates("x", n, m, E)
    np.testing.assert_array_equal(o, abmp.allocate_layer(cand, 2.0))
    assert rep["bits_per_weight"] <= 2.0
    assert rep["predicted_error"] == pytest.approx(E[np.arange(5), o - 1].sum(), rel=1e-12)
    with pytest.raises(QdtkError, match="blocks.0.fc.weight: --abmp knapsack needs --bits"):
        abmp.choose_orders(*args, method="knapsack", solve=residual_solver)
    with pytest.raises(QdtkError, match="blocks.0.fc.weight: --bits 0.5 is below"):
        abmp.choose_orders(*args, method="knapsack", bits=0.5, solve=residual_solver)
    with pytest.raises(QdtkError, match="--abmp must be one of none, swap, knapsack"):
        abmp.choose_orders(*args, method="greedy")


def test_daq_group_solver_memoises_and_serves_the_uncompensated_sweep(rng, monkeypatch):
    import qdtk.math.group as group
    from qdtk.math.hessian import prepare_hessian as prep32
    from qdtk.solve.layer import sweep

    n, m = 16, 200
    W, _, X = layer(rng, n, m)
    P = prep32(2 / len(X) * X.T @ X, dtype=np.float32)  # as the layer driver prepares H
    calls = []
    real = group.solve_group

    def counting(Wg, order, dg, **kw):
        calls.append(order)
        return real(Wg, order, dg, **kw)

    monkeypatch.setattr(group, "solve_group", counting)
    solver = group.DaqGroupSolver(iters=3, backend="reference")
    E = abmp.group_errors(W, P.H, P.d, (1, 2), solver)
    assert len(calls) == 4  # 2 groups x 2 orders
    np.testing.assert_array_equal(E, abmp.group_errors(W, P.H, P.d, (1, 2), solver))
    assert len(calls) == 4  # the second pass came from the cache
    # the value is the stored (float16-scaled) solution's error
    cols = slice(128, 200)
    signs, a, b, Q = solver.solution(np.ascontiguousarray(W[:, cols]), 2, P.d[cols])
    assert a.dtype == np.float16 and b.dtype == np.float16 and signs.shape == (2, n, 72)
    D = W[:, cols] - Q
    assert E[1, 1] == pytest.approx(np.trace(D @ P.H[cols, cols] @ D.T), rel=1e-5)
    assert E[1, 1] < E[1, 0]
    # the driver's uncompensated sweep at an allocation solves nothing new
    orders = np.array([2, 1])
    layer_, _ = sweep(W.copy(), P.R, orders, solver.solution, compensate=False)
    assert len(calls) == 4
    np.testing.assert_array_equal(
        layer_.dequantize(), abmp.dequantize_orders(W, P.d, orders, solver)
    )
    solver.clear()
    abmp.group_errors(W, P.H, P.d, (1,), solver)
    assert len(calls) == 6


def test_check_orders_and_early_budget_check():
    assert abmp.check_orders([3, 1, 2, 2]) == (1, 2, 3)
    with pytest.raises(QdtkError, match="--orders"):
        abmp.check_orders([0, 2])
    with pytest.raises(QdtkError, match="--orders"):
        abmp.check_orders([])
    shapes = [(64, 300), (128, 128)]
    n_weights = 64 * 300 + 128 * 128
    minimum = (bcq_bits(64, 300, [2, 2, 2]) + bcq_bits(128, 128, [2])) / n_weights
    with pytest.raises(QdtkError, match=rf"the model: --bits 2\.1 .*{minimum:.4f}.*order 2"):
        abmp.check_budget("the model", shapes, 2.1, "real", order=2)
    assert abmp.check_budget("the model", shapes, 2.5, "real") == int(2.5 * n_weights)
