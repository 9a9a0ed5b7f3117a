"""qdtk.math.refine: every step lowers tr(D H D^T); the row refit is the exact least squares."""

from __future__ import annotations

import numpy as np
import pytest

from qdtk.formats.bits import group_slices
from qdtk.formats.solution import BinaryCodedLayer
from qdtk.math.hessian import prepare_hessian
from qdtk.math.refine import (
    MODES,
    balance_scales,
    refine_group_rows,
    refine_layer,
    refine_prepared,
    refine_signs,
    refit_col_scales,
    refit_row_scales,
    residual_gradient,
    state_from_layer,
)


def output_error(W, What, H):
    """The objective, tr(D H D^T) with D = W - What, written out."""
    D = np.asarray(W, np.float64) - What
    return float(np.sum((D @ H) * D))


def correlated_H(rng, m: int, T: int = 400) -> np.ndarray:
    """H = 2/T X^T X with X = Z A: strongly correlated input columns."""
    Z = rng.standard_normal((T, m))
    A = rng.standard_normal((m, m)) / np.sqrt(m) + np.eye(m)
    X = Z @ A
    return 2 / T * X.T @ X


def random_layer(rng, n: int, m: int, orders) -> BinaryCodedLayer:
    """A random binary-coded layer; inactive planes are False / 0 as the format requires."""
    orders = np.asarray(orders, np.int64)
    K = int(orders.max())
    slices = group_slices(m)
    signs = rng.random((K, n, m)) < 0.5
    row = np.abs(rng.standard_normal((K, len(slices), n))) * 0.5
    col = np.abs(rng.standard_normal((K, m)))
    for g, cols in enumerate(slices):
        signs[orders[g] :, :, cols] = False
        row[orders[g] :, g] = 0
        col[orders[g] :, cols] = 0
    return BinaryCodedLayer(orders, signs, row.astype(np.float16), col.astype(np.float16))


@pytest.fixture(params=[(24, 200, [2, 1]), (16, 300, [3, 2, 1]), (10, 128, [2])])
def problem(request, rng):
    n, m, orders = request.param
    W = rng.standard_normal((n, m))
    H = correlated_H(rng, m)
    return W, H, random_layer(rng, n, m, orders)


@pytest.mark.parametrize("step", [refit_row_scales, refit_col_scales, refine_signs])
def test_each_step_never_increases_the_error(problem, step):
    W, H, layer = problem
    state = state_from_layer(layer)
    f = output_error(W, state.dequantize(), H)
    for _ in range(3):
        state = step(W, H, state)
        f_new = output_error(W, state.dequantize(), H)
        assert f_new <= f * (1 + 1e-12)
        f = f_new
    assert f < output_error(W, layer.dequantize(), H)  # a random start is always improvable


def test_column_refit_in_chunks_never_increases_and_joint_is_best(problem):
    W, H, layer = problem
    state = state_from_layer(layer)
    f0 = output_error(W, state.dequantize(), H)
    joint = output_error(W, refit_col_scales(W, H, state).dequantize(), H)
    chunked = output_error(W, refit_col_scales(W, H, state, max_unknowns=1).dequantize(), H)
    assert joint <= chunked * (1 + 1e-9) and chunked <= f0


def test_row_refit_equals_brute_force_lstsq(rng):
    n, m, orders = 6, 200, np.array([2, 3])
    W, H = rng.standard_normal((n, m)), correlated_H(rng, m)
    state = state_from_layer(random_layer(rng, n, m, orders))
    C = np.linalg.cholesky(H)  # H = C C^T: (w - Phi a)^T H (w - Phi a) = |C^T (w - Phi a)|^2
    got = refit_row_scales(W, H, state).a
    # built a few rows at a time (a memory bound): the same solution
    two_rows = 2 * 8 * (3 * 2) ** 2  # K = 3 planes, G = 2 groups
    np.testing.assert_allclose(refit_row_scales(W, H, state, two_rows).a, got, rtol=1e-10)
    for i in range(n):
        Phi = np.zeros((m, 0))
        cols_of = []
        for g, cols in enumerate(group_slices(m)):
            for k in range(orders[g]):
                col = np.zeros(m)
                col[cols] = state.b[k, cols] * state.S[k, i, cols]
                Phi = np.column_stack([Phi, col])
                cols_of.append((k, g))
        a_ref = np.linalg.lstsq(C.T @ Phi, C.T @ W[i], rcond=None)[0]
        np.testing.assert_allclose([got[k, g, i] for k, g in cols_of], a_ref, rtol=1e-6)


def test_row_refit_with_identity_H_is_the_closed_form(rng):
    # H = I, one plane: a = sum_j w_j b_j B_j / sum_j b_j^2 per row and group.
    n, m = 5, 256
    W = rng.standard_normal((n, m))
    state = state_from_layer(random_layer(rng, n, m, [1, 1]))
    a = refit_row_scales(W, np.eye(m), state).a
    for g, cols in enumerate(group_slices(m)):
        V = state.S[0][:, cols] * state.b[0, cols]  # [n, w]
        np.testing.assert_allclose(a[0, g], np.sum(W[:, cols] * V, 1) / np.sum(V**2, 1))


def test_balance_keeps_What(problem):
    _, _, layer = problem
    state = state_from_layer(layer)
    np.testing.assert_allclose(balance_scales(state).dequantize(), state.dequantize(), rtol=1e-12)


def test_refine_layer_improves_and_is_valid(problem):
    W, H, layer = problem
    out = refine_layer(W, H, layer, rounds=2, columns=True)
    out.validate("layer")
    assert out.row_scale.dtype == np.float16 and out.col_scale.dtype == np.float16
    assert out.signs.shape == layer.signs.shape and out.signs.dtype == bool
    for g, cols in enumerate(group_slices(W.shape[1])):  # the format's padding stays empty
        o = layer.orders[g]
        assert not out.signs[o:, :, cols].any() and not out.row_scale[o:, g].any()
        assert not out.col_scale[o:, cols].any()
    assert output_error(W, out.dequantize(), H) < output_error(W, layer.dequantize(), H)


def test_refine_layer_is_deterministic(problem):
    W, H, layer = problem
    one, two = (refine_layer(W, H, layer, rounds=2, columns=True) for _ in range(2))
    for f in ("signs", "row_scale", "col_scale"):
        np.testing.assert_array_equal(getattr(one, f), getattr(two, f))


def test_refine_layer_keeps_a_layer_it_cannot_improve(rng):
    # W exactly representable: the input is optimal and must come back unchanged.
    layer = random_layer(rng, 8, 128, [2])
    W = layer.dequantize().astype(np.float64)
    out = refine_layer(W, correlated_H(rng, 128), layer, rounds=1)
    np.testing.assert_array_equal(out.dequantize(), layer.dequantize())


def test_early_stop_keeps_the_best_rounds_on_validation(problem, monkeypatch, rng):
    W, H, layer = problem
    from qdtk.math import refine

    rounds = []
    real = refine.refit_row_scales
    monkeypatch.setattr(refine, "refit_row_scales",
                        lambda *a, **k: rounds.append(1) or real(*a, **k))
    # a validation H no refit can lower (zero): one round, then the input layer itself
    assert refine_layer(W, H, layer, rounds=5, validation=np.zeros_like(H)) is layer
    assert len(rounds) == 1
    # any validation H: the result never does worse on it than the input layer
    Hv = correlated_H(rng, W.shape[1])
    out = refine_layer(W, H, layer, rounds=5, validation=Hv)
    assert output_error(W, out.dequantize(), Hv) <= output_error(W, layer.dequantize(), Hv)
    # the training H as validation: rounds run while they lower it, the error still falls
    out = refine_layer(W, H, layer, rounds=3, validation=H)
    assert output_error(W, out.dequantize(), H) < output_error(W, layer.dequantize(), H)


def test_degenerate_inputs_stay_finite(rng):
    n, m = 8, 256
    W = rng.standard_normal((n, m))
    W[3] = 0  # zero row
    H = correlated_H(rng, m)
    dead = np.arange(m) % 7 == 0  # dead columns: no calibration token excites them
    H[dead, :] = 0
    H[:, dead] = 0
    W[:, dead] = 0
    layer = random_layer(rng, n, m, [2, 2])
    layer.row_scale[:, 1, 5] = 0  # a row whose scales are zero in one group
    layer.col_scale[1, :128] = 0  # a plane with zero column scales
    out = refine_layer(W, H, layer, rounds=2, columns=True)
    out.validate("layer")
    assert np.all(np.isfinite(out.dequantize()))
    assert np.all(np.isfinite(out.row_scale)) and np.all(np.isfinite(out.col_scale))


def test_sign_pass_matches_elementwise_brute_force(rng):
    # Reference: visit the elements column by column; each takes the pattern with the lowest
    # full objective tr(D H D^T), the others fixed.
    n, m, orders = 3, 130, np.array([2, 1])
    W, H = rng.standard_normal((n, m)), correlated_H(rng, m)
    state = state_from_layer(random_layer(rng, n, m, orders))
    S = state.S.copy()
    for g, cols in enumerate(group_slices(m)):
        o = orders[g]
        for j in range(cols.start, cols.stop):
            for i in range(n):
                errs = []
                for p in range(2**o):
                    S[:o, i, j] = [1.0 if (p >> k) & 1 else -1.0 for k in range(o)]
                    What = type(state)(state.orders, S, state.a, state.b).dequantize()
                    errs.append(output_error(W, What, H))
                p = int(np.argmin(errs))
                S[:o, i, j] = [1.0 if (p >> k) & 1 else -1.0 for k in range(o)]
    np.testing.assert_array_equal(refine_signs(W, H, state).S, S)


@pytest.mark.parametrize("mode", [m for m in MODES if MODES[m] is not None])
def test_every_mode_lowers_the_error(rng, mode):
    n, m = 12, 256
    W, H = rng.standard_normal((n, m)), correlated_H(rng, m)
    layer = random_layer(rng, n, m, [2, 2])
    out = refine_layer(W, H, layer, **MODES[mode])
    out.validate("layer")
    assert output_error(W, out.dequantize(), H) < output_error(W, layer.dequantize(), H)


@pytest.mark.parametrize("step", [refit_row_scales, refit_col_scales, refine_signs])
def test_float32_steps_keep_float32_and_track_float64(problem, step):
    """The float32 working precision stays float32 through every step (the signs are int8 in
    both) and lands where float64 does (the same signs, scales to float32 rounding)."""
    W, H, layer = problem
    s64 = step(W, H, state_from_layer(layer))
    s32 = step(W.astype(np.float32), H.astype(np.float32), state_from_layer(layer, np.float32))
    assert s32.a.dtype == s32.b.dtype == np.float32 and s32.S.dtype == s64.S.dtype == np.int8
    e64 = output_error(W, s64.dequantize(), H)
    e32 = output_error(W, s32.dequantize().astype(np.float64), H)
    assert e32 == pytest.approx(e64, rel=1e-3)


def test_refine_layer_in_float32_matches_float64(problem):
    W, H, layer = problem
    e = {dt: output_error(W, refine_layer(W, H, layer, rounds=2, dtype=dt).dequantize(), H)
         for dt in (np.float32, np.float64)}
    assert e[np.float32] == pytest.approx(e[np.float64], rel=1e-3)
    assert e[np.float32] < output_error(W, layer.dequantize(), H)


def test_sign_passes_keep_the_residual_gradient(problem):
    """Given R = D H, refine_signs keeps it equal to D H of the state it returns (row updates
    inside the pass), so chained passes need no product."""
    W, H, layer = problem
    state = state_from_layer(layer)
    R = residual_gradient(W, H, state)
    for _ in range(3):
        state = refine_signs(W, H, state, R)
    want = residual_gradient(W, H, state)
    np.testing.assert_allclose(R, want, rtol=0, atol=1e-9 * np.abs(want).max())
    assert output_error(W, state.dequantize(), H) < output_error(W, layer.dequantize(), H)


def test_refine_prepared_returns_its_error_and_trusts_a_given_start(problem):
    W, H, layer = problem
    P = prepare_hessian(H, 0.01)
    out, err, D_out = refine_prepared(W, P, layer, rounds=2)
    D = np.asarray(W, np.float64) - out.dequantize()
    assert err == pytest.approx(float(np.sum((D @ P.H) * D)), rel=1e-9)
    np.testing.assert_array_equal(D_out, D)  # the D it measured, in P.R's precision
    assert refine_prepared(W, P, layer, rounds=2, start_error=np.inf)[0].signs.tobytes() == \
        out.signs.tobytes()
    # a start it cannot beat: the input comes back, with that error
    kept, e, D_kept = refine_prepared(W, P, layer, rounds=2, start_error=0.0)
    assert kept is layer and e == 0.0 and D_kept is None


def group_problem(rng, n=30, w=128, o=3):
    Wg = rng.standard_normal((n, w))
    A = correlated_H(rng, w)
    signs = rng.random((o, n, w)) < 0.5
    a = (np.abs(rng.standard_normal((o, n))) * 0.5).astype(np.float16)
    b = np.abs(rng.standard_normal((o, w))).astype(np.float16)
    return Wg, A, signs, a, b


def row_errors(Wg, A, signs, a, b):
    What = np.einsum("kn,kw,knw->nw", a.astype(np.float64), b.astype(np.float64),
                     np.where(signs, 1.0, -1.0))
    D = Wg - What
    return np.einsum("nw,nw->n", D @ A, D)  # [n]


@pytest.mark.parametrize("rounds", [1, 3])
def test_group_rows_never_raise_a_row_and_are_independent(rng, rounds):
    """refine_group_rows: every row's D A D^T falls or the row keeps its input (after the
    float16 rounding too); a row's result does not depend on the other rows."""
    Wg, A, signs, a, b = group_problem(rng)
    a[:, 3] = 0  # a dead row: stays finite
    s1, a1 = refine_group_rows(Wg, A, signs, a, b, rounds)
    assert s1.dtype == bool and a1.dtype == np.float16 and np.all(np.isfinite(a1))
    before, after = row_errors(Wg, A, signs, a, b), row_errors(Wg, A, s1, a1, b)
    kept = np.all(s1 == signs, axis=(0, 2)) & np.all(a1 == a, axis=0)
    assert np.all((after < before) | kept) and after.sum() < 0.8 * before.sum()
    rows = [0, 5, 17]
    s2, a2 = refine_group_rows(Wg[rows], A, signs[:, rows], a[:, rows], b, rounds)
    np.testing.assert_array_equal(s2, s1[:, rows])
    np.testing.assert_array_equal(a2, a1[:, rows])


def test_group_rows_refit_is_the_least_squares(rng):
    """With A = I and one plane the signs sign(W) are already the best for any positive scale,
    so the refit alone moves: each row's scale becomes its least squares
    sum_j b_j |W_ij| / sum_j b_j^2, to float16."""
    n, w = 8, 128
    Wg = rng.standard_normal((n, w))
    b = (np.abs(rng.standard_normal((1, w))) + 0.1).astype(np.float16)
    bb = b[0].astype(np.float64)
    ls = np.abs(Wg) @ bb / (bb @ bb)  # [n]
    a = (0.3 * ls[None]).astype(np.float16)  # a poor start
    signs, a1 = refine_group_rows(Wg, np.eye(w), (Wg >= 0)[None], a, b, 1)
    np.testing.assert_array_equal(signs[0], Wg >= 0)
    np.testing.assert_allclose(a1[0].astype(np.float64), ls, rtol=1e-3)
