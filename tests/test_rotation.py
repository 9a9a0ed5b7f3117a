"""The input rotation: Q orthogonal, the fast transforms equal the dense products, the rotated
problem keeps the product and the proxy error."""

import numpy as np
import pytest

from qdtk.math.rotation import (
    Rotation,
    block_size,
    fwht,
    fwht_xp,
    hadamard_matrix,
    random_signs,
    rotate_problem,
    sylvester,
)


@pytest.mark.parametrize("m", [1, 7, 12, 64, 384, 576, 1536])
def test_q_is_orthogonal_block_hadamard(m):
    Q = hadamard_matrix(m, seed=3)
    np.testing.assert_allclose(Q @ Q.T, np.eye(m), atol=1e-12)
    b = block_size(m)
    assert m % b == 0 and (m // b) % 2 == 1  # the largest power of two dividing m
    assert np.all(np.abs(np.abs(Q[Q != 0]) - 1 / np.sqrt(b)) < 1e-12)  # flat within blocks
    assert np.count_nonzero(Q) == m * b


def test_sylvester_and_signs():
    S = sylvester(8)
    np.testing.assert_array_equal(S @ S.T, 8 * np.eye(8))
    np.testing.assert_array_equal(S[1], [1, -1, 1, -1, 1, -1, 1, -1])
    s = random_signs(4096, 0)
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 0.06
    assert not np.array_equal(s, random_signs(4096, 1))
    np.testing.assert_array_equal(s, random_signs(4096, 0))
    # splitmix64 by hand for j = 0, seed 0 (docs/FORMAT.md): z = GOLDEN, mixed
    z = 0x9E3779B97F4A7C15
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    assert s[0] == (1.0 if z >> 63 else -1.0)


@pytest.mark.parametrize("m", [2, 4, 12, 40, 256, 1536, 12288])  # blocks under 8 and over
def test_numba_transform_gives_the_butterflies_bits(m):
    x = np.random.default_rng(1).standard_normal((3, m)).astype(np.float32)
    b = block_size(m)
    fast, plain = fwht(x.copy(), b), fwht_xp(x.copy(), b)
    np.testing.assert_array_equal(fast.view(np.uint32), plain.view(np.uint32))


@pytest.mark.parametrize("m", [12, 256, 1536])
def test_fast_transforms_equal_dense(m):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, m))
    b = block_size(m)
    dense = x @ np.kron(np.eye(m // b), sylvester(b))
    np.testing.assert_allclose(fwht(x.copy(), b), dense, atol=1e-10)  # Numba
    np.testing.assert_allclose(fwht_xp(x.copy(), b), dense, atol=1e-10)  # NumPy slicing
    np.testing.assert_allclose(fwht_xp(np.asfortranarray(x), b), dense, atol=1e-10)
    rot = Rotation(m, 11)
    Q = rot.matrix()
    np.testing.assert_allclose(rot.apply(x), x @ Q, atol=1e-10)
    np.testing.assert_allclose(rot.apply_t(x), x @ Q.T, atol=1e-10)
    x32 = x.astype(np.float32)
    y = rot.apply(x32)
    assert y.dtype == np.float32
    np.testing.assert_allclose(rot.apply_t(y), x32, atol=1e-5)
    np.testing.assert_allclose(rot.apply(x[0]), x[0] @ Q, atol=1e-10)  # 1-D


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    rot = Rotation(384, 5)
    x = np.random.default_rng(1).standard_normal((3, 2, 384)).astype(np.float32)
    y = rot.apply(torch.from_numpy(x))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), rot.apply(x), atol=1e-5)


def test_rotated_problem_keeps_product_and_error():
    rng = np.random.default_rng(2)
    n, m = 6, 384
    W = rng.standard_normal((n, m)).astype(np.float32)
    X = rng.standard_normal((2 * m, m)) * np.linspace(0.1, 3, m)
    H = (X.T @ X / len(X)).astype(np.float32)
    H[5, :] = H[:, 5] = 0  # a dead column: zeroed before rotating
    rot = Rotation(m, 0)
    Wr, Hr = rotate_problem(W, H, rot)
    assert Wr.dtype == Hr.dtype == np.float32
    Q = rot.matrix()
    W0 = W.copy()
    W0[:, 5] = 0
    np.testing.assert_allclose(Wr, W0 @ Q, atol=1e-4)
    np.testing.assert_allclose(Hr, Q.T @ H @ Q, atol=1e-4)
    What_r = Wr + 0.1 * rng.standard_normal((n, m)).astype(np.float32)  # any quantized form
    D_r, D = Wr - What_r, W - rot.apply_t(What_r)
    err_r = np.einsum("ij,jk,ik->", D_r, Hr.astype(np.float64), D_r)
    err = np.einsum("ij,jk,ik->", D, H.astype(np.float64), D)
    assert err == pytest.approx(err_r, rel=1e-4)
    assert rotate_problem(W, H, None) == (W, H)


def test_from_dict_checks():
    rot = Rotation(1536, 9)
    assert rot.to_dict() == {"kind": "hadamard", "seed": 9, "block": 512}
    assert Rotation.from_dict(rot.to_dict(), 1536) == rot
    for bad in ({"kind": "hadamard", "seed": 9, "block": 256}, {"kind": "other"}, None,
                {"kind": "hadamard", "seed": -1, "block": 512}):
        with pytest.raises(ValueError):
            Rotation.from_dict(bad, 1536)


@pytest.mark.parametrize("m", [12, 64, 96])
def test_unrotation_is_formats_float32_order_bit_for_bit(m):
    """docs/FORMAT.md 4a: What = s * fwht_b(c * What_r), c = float32(1/sqrt(b)), the passes
    h = 1, 2, .. in order, in float32; written out entry by entry."""
    rng = np.random.default_rng(4)
    Wr = rng.standard_normal((3, m)).astype(np.float32)
    rot = Rotation(m, 8)
    b, c = rot.block, np.float32(1 / np.sqrt(rot.block))
    want = Wr * c
    for row in want:
        h = 1
        while h < b:
            for t in range(m):
                if t % (2 * h) < h:
                    u, v = row[t], row[t + h]
                    row[t], row[t + h] = u + v, u - v
            h *= 2
    want *= random_signs(m, 8)
    assert rot.apply_t(Wr).tobytes() == want.tobytes()
