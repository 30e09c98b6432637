"""MatMulSparse24: packing format, 2:4 checks, numpy reference (float and int8 variants), bad inputs.

Property tests use hypothesis over shapes and random 2:4 weights (including groups with 0 or 1 non-zeros)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.compress.sparsity import nm_mask
from edgekit.kernels import sparse24
from edgekit.kernels.sparse24 import (
    index_row_bytes,
    is_2of4,
    pack,
    quantize_int8_rows,
    reference_matmul,
    row_sums,
    unpack,
)

shapes = st.tuples(st.integers(1, 9), st.integers(1, 24).map(lambda g: 4 * g), st.integers(0, 2**32 - 1))


def _weights(N, K, seed, full=False, dtype=np.float32):
    return sparse24.random_2of4(np.random.default_rng(seed), N, K, dtype, full=full)


@settings(max_examples=60, deadline=None)
@given(shapes, st.booleans(), st.sampled_from([np.float32, np.float16, np.int8]))
def test_pack_unpack_round_trip_is_exact(shape, full, dtype):
    N, K, seed = shape
    w = _weights(N, K, seed, full)
    if dtype == np.int8:
        w = quantize_int8_rows(w)[0]
    else:
        w = w.astype(dtype)
    values, indices = pack(w)
    assert values.shape == (N, K // 2) and values.dtype == w.dtype
    assert indices.shape == (N, index_row_bytes(K)) and indices.dtype == np.uint8
    np.testing.assert_array_equal(unpack(values, indices, K), w)


@settings(max_examples=60, deadline=None)
@given(shapes, st.booleans())
def test_indices_are_ordered_pairs_and_pattern_is_exactly_2of4(shape, full):
    N, K, seed = shape
    w = _weights(N, K, seed, full)
    assert is_2of4(w)
    _, indices = pack(w)
    nib = sparse24.unpack_nibbles(indices, K)
    assert np.isin(nib, sparse24.VALID_NIBBLES).all()  # i0 < i1 always
    # the stored positions select every non-zero, so the support of unpack is within them: 2 per group
    kept = np.zeros((N, K // 4, 4), bool)
    np.put_along_axis(kept, np.stack([nib & 3, nib >> 2], axis=2).astype(np.intp), True, axis=2)
    assert (kept.sum(axis=2) == 2).all()
    assert not (w.reshape(N, K // 4, 4)[~kept]).any()
    if K // 4 % 2:  # padding nibble of the last byte is zero
        assert not (indices[:, -1] >> 4).any()


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 5))
def test_reference_equals_dense_matmul_of_unpacked_weights(shape, M):
    N, K, seed = shape
    rng = np.random.default_rng(seed)
    w = _weights(N, K, seed, True)
    A = rng.standard_normal((M, K)).astype(np.float32)
    values, indices = pack(w)
    Y = reference_matmul(A, values, indices, K=K, N=N)
    np.testing.assert_allclose(Y, A @ unpack(values, indices, K).T, rtol=1e-5, atol=1e-5)  # float32 round-off
    np.testing.assert_allclose(Y, A.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 5), st.integers(0, 255))
def test_int8_contract_is_exact_integer_arithmetic(shape, M, zp):
    N, K, seed = shape
    rng = np.random.default_rng(seed)
    q, w_scale = quantize_int8_rows(_weights(N, K, seed, True))
    values, indices = pack(q)
    A = rng.integers(0, 256, size=(M, K)).astype(np.uint8)
    a_scale = np.float32(0.02)
    Y = reference_matmul(A, values, indices, w_scale, K=K, N=N, a_scale=a_scale, a_zero_point=zp)
    acc = (A.astype(np.int64) - zp) @ q.astype(np.int64).T
    np.testing.assert_allclose(Y, acc * float(a_scale) * w_scale.astype(np.float64), rtol=1e-6, atol=1e-6)
    # the zero-point form the kernels use: sum(A * q) - zp * rowsum(q)
    acc2 = A.astype(np.int64) @ q.astype(np.int64).T - zp * row_sums(values).astype(np.int64)
    np.testing.assert_array_equal(acc, acc2)
    # float activations with int8 weights: A @ (q * w_scale).T
    Af = rng.standard_normal((M, K)).astype(np.float32)
    Yf = reference_matmul(Af, values, indices, w_scale, K=K, N=N)
    np.testing.assert_allclose(Yf, Af @ (q * w_scale[:, None]).T, rtol=1e-5, atol=1e-5)


def test_int8_quantized_matmul_approximates_float():
    rng = np.random.default_rng(3)
    N, K, M = 16, 256, 8
    w = _weights(N, K, 3, True)
    A = rng.standard_normal((M, K)).astype(np.float32)
    values, iq = pack(w)
    vq, s = quantize_int8_rows(values)  # quantize the compressed values: same indices, same scales as dense
    q_dense, s_dense = quantize_int8_rows(w)
    np.testing.assert_array_equal(s, s_dense)
    np.testing.assert_array_equal(unpack(vq, iq, K), q_dense)
    Au, a_scale, a_zp = sparse24.quantize_activations_u8(A)
    Y = reference_matmul(Au, vq, iq, s, K=K, N=N, a_scale=a_scale, a_zero_point=a_zp)
    ref = A @ w.T
    assert np.abs(Y - ref).max() < 0.03 * np.abs(ref).max()


def test_known_bytes_and_mma_word_layout():
    # row: groups (0,1) (1,3) (2,3) (0,2) (1,2) (0,3) (0,1) (2,3): nibbles 0x4 0xD 0xE 0x8 0x9 0xC 0x4 0xE
    pairs = [(0, 1), (1, 3), (2, 3), (0, 2), (1, 2), (0, 3), (0, 1), (2, 3)]
    w = np.zeros((1, 32), np.float32)
    for g, (i0, i1) in enumerate(pairs):
        w[0, 4 * g + i0], w[0, 4 * g + i1] = 1 + g, -1 - g
    values, indices = pack(w)
    np.testing.assert_array_equal(indices, [[0xD4, 0x8E, 0xC9, 0xE4]])
    assert indices.view("<u4")[0, 0] == 0xE4C98ED4  # group j in bits 4j..4j+3 of the row's word
    np.testing.assert_array_equal(values[0, :4], [1, -1, 2, -2])


def test_groups_with_fewer_nonzeros_store_lowest_free_positions():
    w = np.array([[0, 0, 0, 0, 0, 0, 5, 0, 0, 7, 0, 0]], np.float32)
    values, indices = pack(w)
    np.testing.assert_array_equal(sparse24.unpack_nibbles(indices, 12), [[0x4, 0x8, 0x4]])  # (0,1) (0,2) (0,1)
    np.testing.assert_array_equal(values, [[0, 0, 0, 5, 0, 7]])


def test_nm_mask_output_is_2of4_and_packs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    pruned = w * nm_mask(np.abs(w), 2, 4)
    assert is_2of4(pruned) and not is_2of4(w)
    np.testing.assert_array_equal(unpack(*pack(pruned), 64), pruned)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack(np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match="row 1, group 0 .columns 0..3. has 3 non-zeros"):
        pack(np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.float32))
    with pytest.raises(ValueError, match="2-D"):
        pack(np.zeros(8, np.float32))
    values, indices = pack(_weights(2, 8, 0, True))
    with pytest.raises(ValueError, match=r"values must be \[N, 4\]"):
        unpack(values[:, :3], indices, 8)
    with pytest.raises(ValueError, match=r"indices must be uint8 \[N, 1\]"):
        unpack(values, indices.astype(np.int32), 8)
    bad = indices.copy()
    bad[0, 0] = 0x1  # (1, 0): not increasing
    with pytest.raises(ValueError, match="must be increasing"):
        unpack(values, bad, 8)
    A = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match="last dimension must be K=8"):
        reference_matmul(np.zeros((1, 4), np.float32), values, indices, K=8, N=2)
    with pytest.raises(ValueError, match="attribute N=3"):
        reference_matmul(A, values, indices, K=8, N=3)
    with pytest.raises(ValueError, match="need int8 values"):
        reference_matmul(A.astype(np.uint8), values, indices, K=8, N=2, a_scale=1.0)
    q, s = quantize_int8_rows(unpack(values, indices, 8))
    vq, iq = pack(q)
    with pytest.raises(ValueError, match="need a_scale"):
        reference_matmul(A.astype(np.uint8), vq, iq, s, K=8, N=2)
    with pytest.raises(ValueError, match="need w_scale"):
        reference_matmul(A, vq, iq, K=8, N=2)
    with pytest.raises(ValueError, match="only an input of the int8 variant"):
        reference_matmul(A, values, indices, s, K=8, N=2)
    with pytest.raises(ValueError, match="K and N must be positive"):
        sparse24.check_attributes(0, 4)
    assert not is_2of4(np.ones((1, 6)))
