"""The tensor-core path of attention_int8.cu (attention_int8_d64_mma) without a GPU: its index math (cp.async double
buffer of K / V / scale tiles, per-lane Q and K loads with the shared dimension permutation, s8 m16n8k32 fragments,
dequantization, masking and online softmax on the accumulator layout, P packed from the S accumulators into f16
m16n8k16 A fragments, V through ldmatrix.x4.trans, epilogue) transliterated to Python and run through the numpy
models of the instructions (mma_layout.emulate_dense_s8, emulate_dense, ldmatrix_x4_trans) gives
attention.reference_quantized; a broken fragment index does not; the mirrored expressions appear verbatim in the
source."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgekit.kernels import attention
from edgekit.kernels.cuda import build, mma_layout

SRC = build.SOURCES["attention_int8"]
WARPS, BN, D = 4, 64, 64
ROWS = 16 * WARPS  # kRows
KKS, KVS = D, D + 8  # kKS (bytes per K row), kVS (halves per V row)
LANE = np.arange(32)
G, T = LANE >> 2, LANE & 3
NB = np.arange(8)
I4 = np.arange(4)
BUGS = ("q_regs", "k_words", "k_addr", "p_regs", "v_rows", "epilogue")


def _f16x2(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """cvt.rn.f16x2.f32 d, hi, lo: the f16x2 register {lo, hi} (low half first)."""
    return np.stack([lo.astype(np.float16), hi.astype(np.float16)], axis=-1).view(np.uint32)[..., 0]


def _shfl_xor(x: np.ndarray, m: int) -> np.ndarray:
    """__shfl_xor_sync over the lane axis (axis 1 of [warp, lane, ...])."""
    return x[:, LANE ^ m]


def run_kernel(qz: dict, *, q_block: int, k_block: int, sm_scale: float, bug: str | None = None) -> np.ndarray:
    """attention_int8_d64_mma transliterated: O float32 [B, H, S, 64] (fp16 values). ``bug`` breaks one index."""
    B, H, S, _ = qz["q8"].shape
    Skv = qz["k8"].shape[2]
    BH = B * H
    Q = np.ascontiguousarray(qz["q8"]).reshape(BH, S * D).view(np.uint8)
    K = np.ascontiguousarray(qz["k8"]).reshape(BH, Skv * D).view(np.uint8)
    V = np.ascontiguousarray(qz["v16"]).reshape(BH, Skv * D).view(np.uint16)
    qs, ks = qz["q_scale"].reshape(BH, -1), qz["k_scale"].reshape(BH, -1)
    kb = qz["k_bias"].reshape(BH, Skv)
    O = np.full(BH * S * D, np.nan, np.float16)
    c = np.float32(sm_scale * 1.4426950408889634)
    nq_rows = -(-S // ROWS)
    tiles = -(-Skv // BN)
    for bh in range(BH):
        for bx in range(nq_rows):
            k_s = np.zeros((2, BN * KKS), np.uint8)
            v_s = np.zeros((2, BN * KVS), np.uint16)
            ks_s = np.zeros((2, BN), np.float32)
            kb_s = np.zeros((2, BN), np.float32)

            def issue(tile, buf, bh=bh, k_s=k_s, v_s=v_s, ks_s=ks_s, kb_s=kb_s):
                j0 = tile * BN
                i = np.arange(BN * 4)
                j, part = i >> 2, i & 3
                ok = j0 + j < Skv
                src = np.where(ok, j0 + j, 0) * D + 16 * part
                k_s[buf][(j * KKS + 16 * part)[:, None] + np.arange(16)] = (
                    K[bh][src[:, None] + np.arange(16)] * ok[:, None]
                )
                i = np.arange(BN * 8)
                j, part = i >> 3, i & 7
                ok = j0 + j < Skv
                src = np.where(ok, j0 + j, 0) * D + 8 * part
                v_s[buf][(j * KVS + 8 * part)[:, None] + np.arange(8)] = (
                    V[bh][src[:, None] + np.arange(8)] * ok[:, None]
                )
                j = j0 + np.arange(BN)
                ok = j < Skv
                ks_s[buf] = np.where(ok, ks[bh][np.where(ok, j // k_block, 0)], 0)
                kb_s[buf] = np.where(ok, kb[bh][np.where(ok, j, 0)], 0)

            issue(0, 0)
            q0 = bx * ROWS + 16 * np.arange(WARPS)[:, None]  # [warp, 1]
            w, qsc = [], []
            for h in range(2):
                row = q0 + G + 8 * h  # [warp, lane]
                ok = row < S
                off = np.where(ok, row, 0) * D + 16 * T
                byt = Q[bh][off[..., None] + np.arange(16)] * ok[..., None]
                w.append(np.ascontiguousarray(byt).view(np.uint32))  # [warp, lane, 4]: .x .y .z .w
                qsc.append(np.where(ok, qs[bh][np.where(ok, row, 0) // q_block] * c, 0).astype(np.float32))
            qsc = np.stack(qsc, -1)  # [warp, lane, 2]
            if bug == "q_regs":  # registers 1 and 2 exchanged
                qa = [np.stack([w[0][..., 2 * s], w[0][..., 2 * s + 1], w[1][..., 2 * s], w[1][..., 2 * s + 1]], -1)
                      for s in range(2)]  # fmt: skip
            else:  # qa[0] = {w0.x, w1.x, w0.y, w1.y}, qa[1] = {w0.z, w1.z, w0.w, w1.w}
                qa = [np.stack([w[0][..., 2 * s], w[1][..., 2 * s], w[0][..., 2 * s + 1], w[1][..., 2 * s + 1]], -1)
                      for s in range(2)]  # fmt: skip

            o = np.zeros((WARPS, 32, 8, 4), np.float32)
            m_run = np.full((WARPS, 32, 2), -1e30, np.float32)
            l_run = np.zeros((WARPS, 32, 2), np.float32)
            for it in range(tiles):
                buf = it & 1
                if it + 1 < tiles:
                    issue(it + 1, buf ^ 1)
                # S = Q.K^T
                krow = 8 * NB[:, None] + (T if bug == "k_addr" else G)
                kaddr = krow * KKS + 16 * T  # [nb, lane]
                kw = np.ascontiguousarray(k_s[buf][kaddr[..., None] + np.arange(16)]).view(np.uint32)  # [nb, lane, 4]
                b0 = kw[..., [1, 0]] if bug == "k_words" else kw[..., 0:2]
                sacc = mma_layout.emulate_dense_s8(qa[0][:, None], b0[None])  # [warp, nb, lane, 4]
                sacc = mma_layout.emulate_dense_s8(qa[1][:, None], kw[None, ..., 2:4], sacc)
                # dequantize, mask, online softmax
                j0 = it * BN
                key = 8 * NB[:, None] + 2 * T  # [nb, lane]
                kscale = ks_s[buf][key[..., None] + (I4 & 1)]  # [nb, lane, 4]
                kbias = kb_s[buf][key[..., None] + (I4 & 1)]
                v = sacc.astype(np.float32) * qsc[:, None][..., I4 >> 1] * kscale + kbias * c
                v = np.where(j0 + key[..., None] + (I4 & 1) >= Skv, np.float32(-np.inf), v).astype(np.float32)
                mt = np.stack([v[..., 2 * h : 2 * h + 2].max(axis=(1, 3)) for h in range(2)], -1)  # [warp, lane, 2]
                mt = np.maximum(mt, _shfl_xor(mt, 1))
                mt = np.maximum(mt, _shfl_xor(mt, 2))
                m_new = np.maximum(m_run, mt)
                corr = np.exp2(m_run - m_new).astype(np.float32)
                m_run = m_new
                l_run = l_run * corr
                o = o * corr[:, :, None][..., I4 >> 1]
                p = np.exp2(v - m_run[:, None][..., I4 >> 1]).astype(np.float32)  # [warp, nb, lane, 4]
                l_run = l_run + np.stack([p[..., 2 * h : 2 * h + 2].sum(axis=(1, 3)) for h in range(2)], -1)
                # O += P.V
                for kk in range(4):
                    a, b = p[:, 2 * kk], p[:, 2 * kk + 1]  # key blocks 2kk, 2kk + 1: [warp, lane, 4]
                    pa = [_f16x2(a[..., 0], a[..., 1]), _f16x2(a[..., 2], a[..., 3]),
                          _f16x2(b[..., 0], b[..., 1]), _f16x2(b[..., 2], b[..., 3])]  # fmt: skip
                    if bug == "p_regs":
                        pa[1], pa[2] = pa[2], pa[1]
                    pa = np.stack(pa, -1)  # [warp, lane, 4]
                    half = (LANE >> 4) if bug == "v_rows" else ((LANE >> 3) & 1)
                    vrow = 16 * kk + (LANE & 7) + 8 * half
                    for dp in range(4):
                        col = 8 * ((LANE >> 3) & 1) if bug == "v_rows" else 8 * (LANE >> 4)
                        addr = 2 * (vrow * KVS + 16 * dp + col)
                        vb = mma_layout.ldmatrix_x4_trans(v_s[buf].view(np.uint8), addr)  # [lane, 4]
                        for n, regs in ((2 * dp, [0, 1]), (2 * dp + 1, [2, 3])):
                            bv = np.broadcast_to(vb[:, regs], (WARPS, 32, 2))
                            o[:, :, n] = mma_layout.emulate_dense(pa, bv, o[:, :, n]).astype(np.float32)
            # epilogue
            l_run = l_run + _shfl_xor(l_run, 1)
            l_run = l_run + _shfl_xor(l_run, 2)
            for h in range(2):
                row = q0 + G + 8 * h
                inv = (np.float32(1) / l_run[..., h]).astype(np.float32)
                for dn in range(8):
                    lo, hi = o[:, :, dn, 2 * h] * inv, o[:, :, dn, 2 * h + 1] * inv
                    if bug == "epilogue":
                        lo, hi = hi, lo
                    base = (bh * S + row) * D + 8 * dn + 2 * T
                    ok = row < S
                    O[base[ok]] = lo[ok].astype(np.float16)
                    O[base[ok] + 1] = hi[ok].astype(np.float16)
    return O.astype(np.float32).reshape(B, H, S, D)


def _case(B, H, S, Skv, q_block, k_block, *, outliers=False, smooth_q=True, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, S, D)).astype(np.float32)
    k = rng.standard_normal((B, H, Skv, D)).astype(np.float32)
    v = rng.standard_normal((B, H, Skv, D)).astype(np.float32)
    if outliers:
        k += (rng.standard_normal(D) * 3 + np.where(np.arange(D) < 4, 40.0, 0.0)).astype(np.float32)
    qz = attention.quantize(q, k, v, q_block=q_block, k_block=k_block, smooth_q=smooth_q)
    return q, k, v, qz


def _within(o, ref) -> bool:
    return bool(np.isfinite(o).all() and (np.abs(o - ref) <= 4e-3 + 1e-2 * np.abs(ref)).all())


def test_s8_dense_model_is_the_ptx_layout():
    """Every (row, k) of A and (k, col) of B held exactly once; emulate_dense_s8 = the exact integer product."""
    a, b = mma_layout.dense_s8_a_coords(), mma_layout.dense_s8_b_coords()
    assert sorted(map(tuple, a.reshape(-1, 2).tolist())) == [(r, k) for r in range(16) for k in range(32)]
    assert sorted(map(tuple, b.reshape(-1, 2).tolist())) == [(k, n) for k in range(32) for n in range(8)]
    lane = 6  # g = 1, t = 2: A regs rows 1, 9, 1, 9, cols 8..11, 8..11, 24..27, 24..27; B k 8..11, 24..27 of col 1
    assert a[lane, :, 0, 0].tolist() == [1, 9, 1, 9] and a[lane, :, :, 1].tolist() == [
        [8, 9, 10, 11], [8, 9, 10, 11], [24, 25, 26, 27], [24, 25, 26, 27]]  # fmt: skip
    assert b[lane, :, :, 0].tolist() == [[8, 9, 10, 11], [24, 25, 26, 27]] and (b[lane, :, :, 1] == 1).all()
    rng = np.random.default_rng(1)
    am = rng.integers(-128, 128, (16, 32)).astype(np.int8)
    bm = rng.integers(-128, 128, (32, 8)).astype(np.int8)
    A = np.ascontiguousarray(am[a[..., 0], a[..., 1]]).view(np.uint32).reshape(32, 4)
    B = np.ascontiguousarray(bm[b[..., 0], b[..., 1]]).view(np.uint32).reshape(32, 2)
    full = am.astype(np.int64) @ bm.astype(np.int64)
    dc = mma_layout.d_coords()
    np.testing.assert_array_equal(mma_layout.emulate_dense_s8(A, B), full[dc[..., 0], dc[..., 1]])
    np.testing.assert_array_equal(mma_layout.emulate_dense_s8(A, B, np.ones((32, 4))), full[dc[..., 0], dc[..., 1]] + 1)


def test_ldmatrix_trans_model_is_the_transpose_of_ldmatrix():
    rng = np.random.default_rng(2)
    smem = rng.integers(0, 256, 4096, dtype=np.uint8)
    addrs = rng.choice(np.arange(0, 4096, 16), 32, replace=False)
    plain, trans = mma_layout.ldmatrix_x4(smem, addrs), mma_layout.ldmatrix_x4_trans(smem, addrs)
    for i in range(4):
        m = np.stack([smem[addrs[8 * i + r] : addrs[8 * i + r] + 16].view(np.uint16) for r in range(8)])
        u = m.astype(np.uint32)
        np.testing.assert_array_equal(plain[:, i], u[G, 2 * T] | (u[G, 2 * T + 1] << 16))
        np.testing.assert_array_equal(trans[:, i], u[2 * T, G] | (u[2 * T + 1, G] << 16))


CASES = [  # B, H, S, Skv, q_block, k_block, outliers, smooth_q
    (1, 2, 70, 100, 1, 64, False, True),  # S and Skv off the tiles, Skv != S, two K/V tiles (both buffers)
    (1, 1, 130, 40, 32, 16, True, True),  # three query blocks, one partial K/V tile, k_block != tile, outlier K
    (2, 1, 16, 150, 1, 32, False, False),  # three K/V tiles (buffer reuse), no Q smoothing (k_bias = 0)
]


@pytest.mark.parametrize("case", CASES, ids=[f"S{c[2]}-Skv{c[3]}-qb{c[4]}-kb{c[5]}" for c in CASES])
def test_kernel_index_math_computes_the_op(case):
    B, H, S, Skv, qb, kb, outliers, smooth_q = case
    q, k, v, qz = _case(B, H, S, Skv, qb, kb, outliers=outliers, smooth_q=smooth_q, seed=S + Skv)
    o = run_kernel(qz, q_block=qb, k_block=kb, sm_scale=1 / 8)
    ref = attention.reference_quantized(qz, q_block=qb, k_block=kb, sm_scale=1 / 8)
    assert _within(o, ref), float(np.nanmax(np.abs(o - ref)))
    assert attention.cosine_per_row(o, attention.reference_exact(q, k, v)).min() >= 0.999


@pytest.mark.parametrize("bug", BUGS)
def test_a_broken_fragment_index_is_caught(bug):
    _, _, _, qz = _case(1, 1, 40, 70, 1, 64, seed=7)
    ref = attention.reference_quantized(qz, q_block=1, k_block=64, sm_scale=1 / 8)
    assert _within(run_kernel(qz, q_block=1, k_block=64, sm_scale=1 / 8), ref)
    assert not _within(run_kernel(qz, q_block=1, k_block=64, sm_scale=1 / 8, bug=bug), ref)


def test_shared_memory_loads_are_bank_conflict_free():
    for nb in range(8):  # K: one 16-byte load per lane, phases of 8 lanes
        addr = (8 * nb + G) * KKS + 16 * T
        assert max(mma_layout.bank_conflict_ways(addr[8 * ph : 8 * ph + 8]) for ph in range(4)) == 1
    for kk in range(4):  # V: ldmatrix.x4.trans, one 8-row matrix per phase
        for dp in range(4):
            addr = 2 * ((16 * kk + (LANE & 7) + 8 * ((LANE >> 3) & 1)) * KVS + 16 * dp + 8 * (LANE >> 4))
            assert max(mma_layout.bank_conflict_ways(addr[8 * ph : 8 * ph + 8]) for ph in range(4)) == 1


def test_source_has_the_emulated_expressions():
    src = SRC.read_text()
    for const in ("kWarps = 4;", "kRows = 16 * kWarps;", "kBN = 64;", "kKS = kD;", "kVS = kD + 8;"):
        assert f"constexpr int {const}" in src, const
    for expr in (
        "cp_async16(&k_s[buf][j * kKS + 16 * part], kbase + static_cast<i64>(ok ? j0 + j : 0) * kD + 16 * part, ok);",
        "cp_async16(&v_s[buf][j * kVS + 8 * part], vbase + static_cast<i64>(ok ? j0 + j : 0) * kD + 8 * part, ok);",
        "cp_async4(&ks_s[buf][tid], ksbase + (ok ? j / k_block : 0), ok);",
        "const int q0 = blockIdx.x * kRows + 16 * warp;",
        "Q8 + (static_cast<i64>(bh) * S + row) * kD + 16 * t",
        "qa[0][0] = w[0].x; qa[0][1] = w[1].x; qa[0][2] = w[0].y; qa[0][3] = w[1].y;",
        "qa[1][0] = w[0].z; qa[1][1] = w[1].z; qa[1][2] = w[0].w; qa[1][3] = w[1].w;",
        "&k_s[buf][(8 * nb + g) * kKS + 16 * t]",
        "mma_s8(sacc[nb], qa[0], kw.x, kw.y);",
        "mma_s8(sacc[nb], qa[1], kw.z, kw.w);",
        "const int key = 8 * nb + 2 * t;",
        "static_cast<float>(sacc[nb][i]) * qsc[i >> 1] * kscale + kbias * c;",
        "if (j0 + key + (i & 1) >= Skv) v = __int_as_float(0xff800000);",
        "f16x2(s[2 * kk][0], s[2 * kk][1]), f16x2(s[2 * kk][2], s[2 * kk][3]),",
        "f16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]), f16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])",
        "const int vrow = 16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1);",
        "&v_s[buf][vrow * kVS + 16 * dp + 8 * (lane >> 4)]",
        "mma_f16(o[2 * dp], pa, vb[0], vb[1]);",
        "mma_f16(o[2 * dp + 1], pa, vb[2], vb[3]);",
        "O + (static_cast<i64>(bh) * S + row) * kD + 2 * t",
        "dst[4 * dn] = f16x2(o[dn][2 * h] * inv, o[dn][2 * h + 1] * inv);",
        "issue(it + 1, buf ^ 1);",
    ):
        assert expr in src, expr
    assert re.search(r"mma\.sync\.aligned\.m16n8k32\.row\.col\.s32\.s8\.s8\.s32", src)
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in src


def test_path_selector_mirrors_the_source():
    src = SRC.read_text()
    switch = SRC.with_name("kernel_path.cuh").read_text()  # the path switch both tensor-core libraries share
    assert "constexpr int kPathAuto = 0, kPathOld = 1, kPathMma = 2;" in switch
    assert (build.ATTN_PATH_AUTO, build.ATTN_PATH_OLD, build.ATTN_PATH_MMA) == (0, 1, 2)
    assert build.ATTN_MMA_ROWS == ROWS
    assert 'PathSwitch g_switch("EDGEKIT_ATTN_PATH");' in src and "std::getenv(env_)" in switch
    for name in ("edgekit_attention_int8_set_path(int mode)", "edgekit_attention_int8_last_path(void)"):
        assert f'extern "C" int {name}' in src
    # the host API the TensorRT plugin core links against is unchanged
    assert (
        'extern "C" int edgekit_attention_int8_d64(const void* Q8, const float* q_scale, const void* K8, '
        "const float* k_scale,\n                                          const float* k_bias, const void* V, void* O, "
        "int BH, int S, int Skv,\n                                          int q_block, int k_block, float sm_scale, "
        "void* stream)"
    ) in src


@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not installed")
def test_mma_path_is_in_sm80_builds_only(tmp_path):
    ptx = build.compile_device("attention_int8", tmp_path / "a80.ptx", ["sm_80"], kind="ptx").read_text()
    for ins in (
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
        "cp.async.cg.shared.global",
        "cp.async.wait_group",
    ):
        assert ins in ptx, ins  # fmt: skip
    old = build.compile_device("attention_int8", tmp_path / "a75.ptx", ["sm_75"], kind="ptx").read_text()
    assert "mma.sync" not in old and "ldmatrix" not in old and "cp.async" not in old
    assert old.count(".entry _ZN12edgekit_attn22attention_int8_d64_mma") == 1  # empty body, never launched
