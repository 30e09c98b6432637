"""AttentionInt8: quantized numpy reference against exact attention, what smoothing buys, exactness of smoothing."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.kernels import attention as at

COS_MIN = 0.999  # per output vector, quantized reference vs exact fp64 attention


def _qkv(seed, B=2, H=2, S=128, Skv=None, D=64):
    rng = np.random.default_rng(seed)
    Skv = S if Skv is None else Skv
    return (
        rng.standard_normal((B, H, S, D)).astype(np.float32),
        rng.standard_normal((B, H, Skv, D)).astype(np.float32),
        rng.standard_normal((B, H, Skv, D)).astype(np.float32),
    )


def _outlier_k(k, seed=1):
    """Keys with a large per-channel offset shared by all tokens (the pattern seen in LLM keys)."""
    D = k.shape[-1]
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal(D) * 3 + np.where(np.arange(D) < 4, 40.0, 0.0)
    return (k + offset).astype(np.float32)


@pytest.mark.parametrize("S,Skv", [(128, 128), (512, 512), (100, 77)])
@pytest.mark.parametrize("q_block,k_block", [(1, 64), (32, 64), (1, 16)])
def test_quantized_reference_is_close_to_exact(S, Skv, q_block, k_block):
    q, k, v = _qkv(S + q_block, B=1, S=S, Skv=Skv)
    out = at.attention_int8(q, k, v, q_block=q_block, k_block=k_block)
    cos = at.cosine_per_row(out, at.reference_exact(q, k, v))
    assert cos.min() >= COS_MIN, cos.min()


def test_smoothing_k_is_what_keeps_outlier_keys_accurate():
    q, k, v = _qkv(5, S=256)
    k = _outlier_k(k)
    exact = at.reference_exact(q, k, v)
    smooth = at.cosine_per_row(at.attention_int8(q, k, v), exact)
    raw = at.cosine_per_row(at.attention_int8(q, k, v, smooth_k=False, smooth_q=False), exact)
    assert smooth.min() >= COS_MIN, smooth.min()
    assert raw.min() < 0.995  # measured ~0.98: without smoothing the offset eats the int8 range
    assert (1 - smooth.mean()) * 20 < 1 - raw.mean()


def test_smoothing_is_exact_before_quantization():
    q, k, v = _qkv(7, S=64)
    k = _outlier_k(k)
    qz = at.quantize(q, k, v)
    # scores with unquantized smoothed inputs + bias equal the raw scores minus a per-query constant
    q, k = q.astype(np.float64), k.astype(np.float64)
    ks = k - k.mean(axis=2, keepdims=True)
    qs = q - q.mean(axis=2, keepdims=True)
    smoothed = np.einsum("bhid,bhjd->bhij", qs, ks) + qz["k_bias"][:, :, None, :].astype(np.float64)
    raw = np.einsum("bhid,bhjd->bhij", q, k)
    diff = raw - smoothed  # constant along j (per query): softmax does not see it
    np.testing.assert_allclose(diff, np.broadcast_to(diff[..., :1], diff.shape), rtol=0, atol=1e-5 * np.abs(raw).max())


def test_quantized_scores_and_formats():
    q, k, v = _qkv(9, B=1, H=3, S=70, Skv=45, D=64)
    qz = at.quantize(q, k, v, q_block=32, k_block=16)
    assert qz["q8"].dtype == np.int8 and qz["q8"].shape == (1, 3, 70, 64)
    assert qz["q_scale"].shape == (1, 3, 3) and qz["k_scale"].shape == (1, 3, 3)
    assert qz["k_bias"].shape == (1, 3, 45) and qz["v16"].dtype == np.float16
    assert np.abs(qz["q8"]).max() <= 127 and np.abs(qz["k8"]).max() == 127
    s = at.scores(qz, q_block=32, k_block=16)
    ks = k - k.mean(axis=2, keepdims=True)
    exact = np.einsum("bhid,bhjd->bhij", q - q.mean(axis=2, keepdims=True), ks) + qz["k_bias"][:, :, None, :]
    assert np.abs(s - exact).max() < 0.02 * np.abs(exact).max()


def test_online_softmax_rounding_is_within_tolerance():
    """The CUDA kernel rounds p = exp(s - running max) per tile of 64 keys; emulate it and compare."""
    q, k, v = _qkv(11, B=1, H=1, S=32, Skv=200)
    qz = at.quantize(q, k, v)
    ref = at.reference_quantized(qz, q_block=1, k_block=64)
    s = (at.scores(qz, q_block=1, k_block=64) / 8.0).astype(np.float32)[0, 0]
    m, l, acc = np.full(32, -1e30, np.float32), np.zeros(32, np.float32), np.zeros((32, 64), np.float32)
    for j0 in range(0, 200, 64):
        t = s[:, j0 : j0 + 64]
        m_new = np.maximum(m, t.max(axis=1))
        corr = np.exp(m - m_new)
        p = np.exp(t - m_new[:, None])
        l = l * corr + p.sum(axis=1)
        acc = acc * corr[:, None] + p.astype(np.float16).astype(np.float32) @ qz["v16"][0, 0, j0 : j0 + 64].astype(
            np.float32
        )
        m = m_new
    online = acc / l[:, None]
    np.testing.assert_allclose(online, ref[0, 0], atol=2e-3)


def test_bad_inputs_raise():
    q, k, v = _qkv(0, S=8)
    with pytest.raises(ValueError, match="same shape"):
        at.attention_int8(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        at.attention_int8(q[0], k, v)
    with pytest.raises(ValueError, match="share batch"):
        at.attention_int8(q[:, :1], k, v)
    with pytest.raises(ValueError, match="q_block and k_block"):
        at.attention_int8(q, k, v, q_block=0)
