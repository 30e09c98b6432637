"""MatMulLowBit: packing format, numpy reference, RTN quantizer, sizes, and ONNX Runtime execution."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.kernels import lowbit
from edgekit.kernels.lowbit import (
    dequantize,
    pack,
    packed_row_bytes,
    padded_k,
    quantize_rtn,
    reference_matmul,
    storage_bytes,
    unpack,
)

BITS = (2, 3, 4, 8)


def _random_weights(rng, N, K, bits, group, with_zp):
    """Random codes (logical [N, K], zero padding to Kp), scales and zero points, plus the float weights they mean."""
    Kp = padded_k(K, group)
    q = np.zeros((N, Kp), dtype=np.uint8)
    q[:, :K] = rng.integers(0, 1 << bits, size=(N, K))
    groups = Kp // group
    scales = rng.uniform(0.01, 0.1, size=(N, groups)).astype(np.float32)
    zp = rng.integers(0, 1 << bits, size=(N, groups)).astype(np.uint8) if with_zp else None
    zp_full = np.full((N, groups), 1 << (bits - 1)) if zp is None else zp
    gidx = np.arange(K) // group
    W = (q[:, :K].astype(np.float64) - zp_full[:, gidx]) * scales[:, gidx]
    return pack(q, bits), scales, zp, W


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("K", [1, 3, 7, 8, 13, 33, 100, 129])
def test_pack_unpack_roundtrip(bits, K):
    rng = np.random.default_rng(K * 10 + bits)
    q = rng.integers(0, 1 << bits, size=(5, K)).astype(np.uint8)
    packed = pack(q, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, packed_row_bytes(K, bits))
    np.testing.assert_array_equal(unpack(packed, bits, K), q)


@pytest.mark.parametrize("bits", BITS)
def test_packing_is_a_little_endian_bitstream(bits):
    rng = np.random.default_rng(bits)
    K = 40
    q = rng.integers(0, 1 << bits, size=(1, K)).astype(np.uint8)
    stream = np.unpackbits(pack(q, bits)[0], bitorder="little")
    decoded = [sum(int(stream[j * bits + i]) << i for i in range(bits)) for j in range(K)]
    assert decoded == q[0].tolist()
    assert not stream[K * bits :].any()  # unused trailing bits are zero


def test_packed_row_bytes_and_known_bytes():
    assert [packed_row_bytes(13, b) for b in BITS] == [4, 6, 7, 13]
    assert packed_row_bytes(16, 3) == 6 and packed_row_bytes(17, 3) == 9
    # 4-bit: value 2i in the low nibble of byte i (MatMulNBits order); 3-bit: 8 values in 3 bytes
    np.testing.assert_array_equal(pack(np.array([[1, 2, 3]], np.uint8), 4), [[0x21, 0x03]])
    np.testing.assert_array_equal(pack(np.arange(8, dtype=np.uint8)[None], 3), [[0x88, 0xC6, 0xFA]])


def test_pack_rejects_out_of_range_codes_and_bad_shapes():
    with pytest.raises(ValueError, match="codes must lie"):
        pack(np.array([[4]], np.uint8), 2)
    with pytest.raises(ValueError, match="2-D"):
        pack(np.zeros(4, np.uint8), 4)
    with pytest.raises(ValueError, match="expected uint8"):
        unpack(np.zeros((1, 3), np.uint8), 4, 8)
    with pytest.raises(ValueError, match="bits=5"):
        packed_row_bytes(8, 5)
    with pytest.raises(ValueError, match="group_size=16"):
        lowbit.check_attributes(16, 4, 4, 16)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("with_zp", [True, False])
def test_reference_matmul_matches_float_matmul(bits, group, with_zp):
    rng = np.random.default_rng(bits * 1000 + group + with_zp)
    N, K = 24, 200  # K not a multiple of the group: the last group is padded
    packed, scales, zp, W = _random_weights(rng, N, K, bits, group, with_zp)
    np.testing.assert_allclose(dequantize(packed, scales, zp, bits, group, K), W, rtol=1e-6, atol=1e-7)
    A = rng.standard_normal((2, 3, K)).astype(np.float32)
    Y = reference_matmul(A, packed, scales, zp, bits=bits, group_size=group, K=K, N=N)
    assert Y.shape == (2, 3, N) and Y.dtype == np.float32
    np.testing.assert_allclose(Y, A.astype(np.float64) @ W.T, rtol=1e-5, atol=1e-5)


def test_padding_codes_are_dont_care():
    rng = np.random.default_rng(7)
    N, K, bits, group = 4, 70, 4, 32
    packed, scales, zp, _ = _random_weights(rng, N, K, bits, group, True)
    q = unpack(packed, bits, padded_k(K, group))
    q[:, K:] = rng.integers(0, 16, size=(N, padded_k(K, group) - K))
    A = rng.standard_normal((3, K)).astype(np.float32)
    kw = dict(bits=bits, group_size=group, K=K, N=N)
    np.testing.assert_array_equal(
        reference_matmul(A, packed, scales, zp, **kw), reference_matmul(A, pack(q, bits), scales, zp, **kw)
    )


def test_reference_matmul_validates_inputs():
    rng = np.random.default_rng(0)
    packed, scales, zp, _ = _random_weights(rng, 4, 64, 4, 32, True)
    A = np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="last dimension"):
        reference_matmul(np.zeros((1, 63), np.float32), packed, scales, zp, bits=4, group_size=32, K=64, N=4)
    with pytest.raises(ValueError, match="scales must be"):
        reference_matmul(A, packed, scales[:, :1], zp, bits=4, group_size=32, K=64, N=4)
    with pytest.raises(ValueError, match="zero_points must be"):
        reference_matmul(A, packed, scales, zp.astype(np.int32), bits=4, group_size=32, K=64, N=4)
    with pytest.raises(ValueError, match="attribute N=5"):
        reference_matmul(A, packed, scales, zp, bits=4, group_size=32, K=64, N=5)


@pytest.mark.parametrize("with_zp", [True, False])
def test_reference_matmul_adds_the_bias(with_zp):
    rng = np.random.default_rng(3 + with_zp)
    N, K = 10, 70
    packed, scales, zp, W = _random_weights(rng, N, K, 4, 32, with_zp)
    A = rng.standard_normal((2, 3, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    kw = dict(bits=4, group_size=32, K=K, N=N)
    Y = reference_matmul(A, packed, scales, zp, **kw, bias=bias)
    assert Y.shape == (2, 3, N) and Y.dtype == np.float32
    np.testing.assert_array_equal(Y, reference_matmul(A, packed, scales, zp, **kw) + bias)
    np.testing.assert_allclose(Y, A.astype(np.float64) @ W.T + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(reference_matmul(A, packed, scales, zp, **kw, bias=None),
                                  reference_matmul(A, packed, scales, zp, **kw))
    for bad in (np.ones(N + 1, np.float32), np.ones((1, N), np.float32), np.ones(N, np.int32)):
        with pytest.raises(ValueError, match=r"bias must be float32 \[N\] = \[10\]"):
            reference_matmul(A, packed, scales, zp, **kw, bias=bad)


def _sqnr_db(W, Wq):
    return 10 * np.log10(np.sum(W.astype(np.float64) ** 2) / np.sum((W - Wq).astype(np.float64) ** 2))


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_rtn_sqnr_grows_with_bits(symmetric):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((64, 500)).astype(np.float32)
    sqnr = {}
    for bits in BITS:
        packed, scales, zp = quantize_rtn(W, bits, 64, symmetric=symmetric)
        assert (zp is None) == symmetric
        sqnr[bits] = _sqnr_db(W, dequantize(packed, scales, zp, bits, 64, 500))
    assert sqnr[2] < sqnr[3] < sqnr[4] < sqnr[8]
    assert sqnr[4] > 18.0 and sqnr[8] > 40.0


def test_quantize_rtn_keeps_zero_groups_exact():
    W = np.zeros((2, 64), np.float32)
    W[1, :32] = np.linspace(-1, 1, 32)
    for symmetric in (True, False):
        packed, scales, zp = quantize_rtn(W, 4, 32, symmetric=symmetric)
        Wq = dequantize(packed, scales, zp, 4, 32, 64)
        assert np.all(Wq[0] == 0) and np.all(Wq[1, 32:] == 0) and np.all(np.isfinite(scales))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("K,N,group", [(64, 8, 32), (100, 3, 64), (1000, 17, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_storage_bytes_is_exact(bits, K, N, group, symmetric):
    W = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    packed, scales, zp = quantize_rtn(W, bits, group, symmetric=symmetric)
    actual = packed.nbytes + scales.nbytes + (0 if zp is None else zp.nbytes)
    assert storage_bytes(K, N, bits, group, zero_points=not symmetric) == actual


# ---------------------------------------------------------------------------------------------- ONNX Runtime


def _model(node, A_shape, N, initializers):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [node],
        "lowbit",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(A_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*A_shape[:-1], N])],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(node.domain, 1)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model


def test_make_node_attributes_and_validation():
    node = lowbit.make_node(["A", "B", "S"], ["Y"], K=64, N=8, bits=3, group_size=32, name="fc")
    assert (node.domain, node.op_type, node.name) == ("ai.edgekit", "MatMulLowBit", "fc")
    assert {a.name: a.i for a in node.attribute} == {"K": 64, "N": 8, "bits": 3, "group_size": 32}
    with pytest.raises(ValueError, match="inputs"):
        lowbit.make_node(["A", "B"], ["Y"], K=64, N=8, bits=3, group_size=32)
    with pytest.raises(ValueError, match="bits=5"):
        lowbit.make_node(["A", "B", "S"], ["Y"], K=64, N=8, bits=5, group_size=32)
    # the optional bias (5th input); zero_points may be "" (absent) only before a bias
    for ins in (["A", "B", "S", "Z", "bias"], ["A", "B", "S", "", "bias"]):
        node = lowbit.make_node(ins, ["Y"], K=64, N=8, bits=4, group_size=32)
        assert list(node.input) == ins
    for ins in (["A", "B", "S", ""], ["A", "B", "S", "Z", ""], ["A", "", "S"],
                ["A", "B", "S", "Z", "b", "x", "g", "e", "?"],
                ["A", "B", "S", "", "", "", "", "beta"]):  # (ln_bias without ln_scale)
        with pytest.raises(ValueError, match="inputs"):
            lowbit.make_node(ins, ["Y"], K=64, N=8, bits=4, group_size=32)
    # the residual + LayerNorm epilogue's inputs, epsilon, activation and split attributes
    node = lowbit.make_node(["A", "B", "S", "", "b", "skip", "g", "beta"], ["Y"], K=64, N=8, bits=4, group_size=32,
                            activation="Gelu", epsilon=1e-12)
    attrs = {a.name: a for a in node.attribute}
    assert attrs["activation"].s == b"Gelu" and abs(attrs["epsilon"].f - 1e-12) < 1e-18
    node = lowbit.make_node(["A", "B", "S"], ["Q", "K", "V"], K=64, N=8, bits=4, group_size=32, split=[2, 2, 4])
    assert list({a.name: a for a in node.attribute}["split"].ints) == [2, 2, 4] and list(node.output) == ["Q", "K", "V"]
    for kwargs, outs, ins in (({"split": [2, 2, 3]}, ["Q", "K", "V"], ["A", "B", "S"]),
                              ({"split": [8]}, ["Y"], ["A", "B", "S"]),
                              ({"split": [4, 4]}, ["Y"], ["A", "B", "S"]),
                              ({"split": [4, 4]}, ["Y", "Z"], ["A", "B", "S", "", "", "skip"]),
                              ({"activation": "Relu"}, ["Y"], ["A", "B", "S"])):
        with pytest.raises(ValueError):
            lowbit.make_node(ins, outs, K=64, N=8, bits=4, group_size=32, **kwargs)


@pytest.mark.parametrize("bits,with_zp", [(2, True), (3, False), (4, True), (4, False), (8, True)])
def test_python_op_runs_in_onnxruntime(bits, with_zp):
    pytest.importorskip("onnxruntime_extensions")
    import onnxruntime as ort

    from edgekit.kernels.ort_python import CONTRIB_DOMAIN, register_python_op, to_contrib_domain

    rng = np.random.default_rng(bits)
    N, K, group = 12, 100, 32
    packed, scales, zp, _ = _random_weights(rng, N, K, bits, group, with_zp)
    inits = {"B": packed, "S": scales} | ({"Z": zp} if with_zp else {})
    node = lowbit.make_node(["A", *inits], ["Y"], K=K, N=N, bits=bits, group_size=group)
    if bits == 4:  # the native library's int8-math switch: the reference fallback computes in fp32 and drops it
        import onnx

        node.attribute.append(onnx.helper.make_attribute("accuracy_level", 4))
    model = _model(node, ("batch", 3, K), N, inits)
    contrib = to_contrib_domain(model)
    assert "accuracy_level" not in {a.name for a in contrib.graph.node[0].attribute}
    assert model.graph.node[0].domain == "ai.edgekit"  # the input model is left alone
    assert contrib.graph.node[0].domain == CONTRIB_DOMAIN and len(contrib.graph.node[0].input) == 4
    assert {o.domain for o in contrib.opset_import} == {"", CONTRIB_DOMAIN}
    so = ort.SessionOptions()
    so.register_custom_ops_library(register_python_op())
    assert register_python_op() == register_python_op()  # idempotent
    sess = ort.InferenceSession(contrib.SerializeToString(), so, providers=["CPUExecutionProvider"])
    A = rng.standard_normal((2, 3, K)).astype(np.float32)
    (Y,) = sess.run(None, {"A": A})
    expected = reference_matmul(A, packed, scales, zp, bits=bits, group_size=group, K=K, N=N)
    np.testing.assert_allclose(Y, expected, rtol=1e-6, atol=1e-6)


def _packed_zero_points_4bit(zp: np.ndarray) -> np.ndarray:
    """MatMulNBits' 4-bit zero points: two per byte, low nibble first, each row padded to whole bytes."""
    N, groups = zp.shape
    padded = np.zeros((N, groups + groups % 2), np.uint8)
    padded[:, :groups] = zp
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("with_zp", [True, False])
def test_4bit_layout_is_matmulnbits_layout(group, with_zp):
    """Our 4-bit B_packed, reshaped, is com.microsoft.MatMulNBits' B byte for byte (ORT's output = our reference)."""
    import onnxruntime as ort
    from onnx import helper

    rng = np.random.default_rng(group + with_zp)
    N, K = 20, 3 * group + 32  # a padded last block
    packed, scales, zp, _ = _random_weights(rng, N, K, 4, group, with_zp)
    blocks = padded_k(K, group) // group
    inits = {"B": packed.reshape(N, blocks, group // 2), "S": scales.reshape(-1)}
    if with_zp:
        inits["Z"] = _packed_zero_points_4bit(zp)
    node = helper.make_node(
        "MatMulNBits", ["A", *inits], ["Y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=group
    )
    model = _model(node, (3, K), N, inits)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    A = rng.standard_normal((3, K)).astype(np.float32)
    (Y,) = sess.run(None, {"A": A})
    expected = reference_matmul(A, packed, scales, zp, bits=4, group_size=group, K=K, N=N)
    np.testing.assert_allclose(Y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# ---------------------------------------------------------------------------------------------- properties

_shapes = st.tuples(st.sampled_from(BITS), st.sampled_from(lowbit.SUPPORTED_GROUP_SIZES),
                    st.integers(1, 300), st.integers(1, 9), st.integers(0, 2**31 - 1))


@settings(max_examples=80, deadline=None)
@given(_shapes)
def test_property_pack_unpack_round_trip(case):
    bits, _, K, N, seed = case
    q = np.random.default_rng(seed).integers(0, 1 << bits, size=(N, K)).astype(np.uint8)
    packed = pack(q, bits)
    assert packed.shape == (N, packed_row_bytes(K, bits)) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack(packed, bits, K), q)


@settings(max_examples=80, deadline=None)
@given(_shapes, st.booleans(), st.integers(1, 4))
def test_property_reference_equals_dequantize_then_matmul(case, with_zp, M):
    """For any width, group, K (padded or not), N, M and zero points: the op's reference is A @ dequant(B).T
    computed independently in float64 (rtol 1e-5 of the output scale, float32 accumulation)."""
    bits, group, K, N, seed = case
    rng = np.random.default_rng(seed)
    packed, scales, zp, W = _random_weights(rng, N, K, bits, group, with_zp)
    A = rng.standard_normal((M, K)).astype(np.float32)
    Y = reference_matmul(A, packed, scales, zp, bits=bits, group_size=group, K=K, N=N)
    expected = A.astype(np.float64) @ W.T
    scale = np.abs(A).astype(np.float64) @ np.abs(W).T  # the sum's magnitude bounds float32 rounding
    assert np.all(np.abs(Y - expected) <= 1e-5 * scale + 1e-7)


@pytest.mark.parametrize("bits,with_zp", [(3, False), (4, True)])
def test_python_op_with_bias_equals_the_reference(bits, with_zp):
    """The fallback's Python op has 4 inputs: ``to_contrib_domain`` moves the bias into a following Add."""
    pytest.importorskip("onnxruntime_extensions")
    import onnxruntime as ort

    from edgekit.kernels.ort_python import CONTRIB_DOMAIN, register_python_op, to_contrib_domain

    rng = np.random.default_rng(20 + bits)
    N, K, group = 12, 100, 32
    packed, scales, zp, _ = _random_weights(rng, N, K, bits, group, with_zp)
    bias = rng.standard_normal(N).astype(np.float32)
    inits = {"B": packed, "S": scales} | ({"Z": zp} if with_zp else {}) | {"bias": bias}
    ins = ["A", "B", "S", "Z" if with_zp else "", "bias"]
    node = lowbit.make_node(ins, ["Y"], K=K, N=N, bits=bits, group_size=group, name="fc")
    model = _model(node, ("batch", 3, K), N, inits)
    contrib = to_contrib_domain(model)
    assert list(model.graph.node[0].input) == ins  # the input model is left alone
    mm, add = contrib.graph.node
    assert mm.domain == CONTRIB_DOMAIN and len(mm.input) == 4 and all(mm.input)
    assert add.op_type == "Add" and list(add.input) == [mm.output[0], "bias"] and list(add.output) == ["Y"]
    so = ort.SessionOptions()
    so.register_custom_ops_library(register_python_op())
    sess = ort.InferenceSession(contrib.SerializeToString(), so, providers=["CPUExecutionProvider"])
    A = rng.standard_normal((2, 3, K)).astype(np.float32)
    (Y,) = sess.run(None, {"A": A})
    expected = reference_matmul(A, packed, scales, zp, bits=bits, group_size=group, K=K, N=N, bias=bias)
    np.testing.assert_allclose(Y, expected, rtol=1e-6, atol=1e-6)
