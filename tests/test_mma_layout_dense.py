"""The tensor-core path of matmul_lowbit.cu (matmul_lowbit_mma) without a GPU: its index math (the cp.async ring of
shared-memory tiles, zero points through registers, per-lane loads, fp32 -> f16x2 activation pairs, fp16 code pairs,
fragment registers, in-block and grid split-K, epilogue) transliterated to Python and run through
the numpy model of mma.sync m16n8k16 (mma_layout.emulate_dense) gives the op's reference on fp16-rounded
activations; and the expressions mirrored here appear verbatim in the source."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgekit.kernels import lowbit
from edgekit.kernels.cuda import build, mma_layout

SRC = build.SOURCE
BK, UNITS, AS = 128, 4, 132  # kBK, kUnits, kAS (floats per token row of the fp32 A tile)
CONFIGS = [(4, 1, 2, 2, 4), (4, 1, 2, 4, 3), (4, 2, 1, 4, 3)]  # (WN, WM, WK, MT, S), EDGEKIT_LOWBIT_MMA_CONFIGS


def _ws(bits: int) -> int:
    return 16 * bits + (32 if bits in (3, 8) else 16)


def _cp(bits: int) -> int:
    """WT<BITS>::kCp: bytes per cp.async of a packed row."""
    return 16 if bits in (4, 8) else (8 if bits == 2 else 4)


def _f16x2(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """cvt.rn.f16x2.f32 d, hi, lo: the f16x2 register {lo, hi} (low half first)."""
    return np.stack([lo.astype(np.float16), hi.astype(np.float16)], axis=-1).view(np.uint32)[..., 0]


def test_dense_model_is_the_ptx_layout():
    """Every (row, k) of A and (k, token) of B held exactly once; emulate_dense = the matrix product."""
    a, b = mma_layout.dense_a_coords(), mma_layout.dense_b_coords()
    assert sorted(map(tuple, a.reshape(-1, 2).tolist())) == [(r, k) for r in range(16) for k in range(16)]
    assert sorted(map(tuple, b.reshape(-1, 2).tolist())) == [(k, n) for k in range(16) for n in range(8)]
    lane = 5  # g = 1, t = 1: a0,a1 row 1 cols 2,3; a2,a3 row 9; a4,a5 row 1 cols 10,11; b0,b1 k 2,3; b2,b3 k 10,11
    assert a[lane, :, :, 0].tolist() == [[1, 1], [9, 9], [1, 1], [9, 9]]
    assert a[lane, :, :, 1].tolist() == [[2, 3], [2, 3], [10, 11], [10, 11]]
    assert b[lane, :, :, 0].tolist() == [[2, 3], [10, 11]] and (b[lane, :, :, 1] == 1).all()
    rng = np.random.default_rng(0)
    am = rng.standard_normal((16, 16)).astype(np.float16)
    bm = rng.standard_normal((16, 8)).astype(np.float16)
    A = np.ascontiguousarray(am[a[..., 0], a[..., 1]]).view(np.uint32).reshape(32, 4)
    B = np.ascontiguousarray(bm[b[..., 0], b[..., 1]]).view(np.uint32).reshape(32, 2)
    full = am.astype(np.float64) @ bm.astype(np.float64)
    dc = mma_layout.d_coords()
    np.testing.assert_allclose(mma_layout.emulate_dense(A, B), full[dc[..., 0], dc[..., 1]], rtol=1e-12)


def _lane_codes(w_s: np.ndarray, off: int, t: np.ndarray, bits: int) -> np.ndarray:
    """lane_codes<BITS>: the 8 codes 8t .. 8t + 7 of the unit at byte `off`, code j in bits j * BITS."""

    def word(o):
        return np.array([int.from_bytes(w_s[x : x + 4].tobytes(), "little") for x in o], dtype=np.uint64)

    if bits == 2:
        return np.array([int.from_bytes(w_s[off + 2 * x : off + 2 * x + 2].tobytes(), "little") for x in t], np.uint64)
    if bits == 4:
        return word(off + 4 * t)
    if bits == 8:
        return np.array([int.from_bytes(w_s[off + 8 * x : off + 8 * x + 8].tobytes(), "little") for x in t], np.uint64)
    bit = 24 * t
    wi, sh = bit >> 5, bit & 31
    lo = word(off + 4 * wi)
    hi = np.where(sh > 8, word(off + 4 * np.minimum(wi + 1, 2)), 0).astype(np.uint64)
    return (((hi << np.uint64(32)) | lo) >> sh.astype(np.uint64)) & np.uint64(0xFFFFFFFF)  # __funnelshift_r


def _code_pair(codes: np.ndarray, j: int, zp2: np.ndarray, bits: int) -> np.ndarray:
    """code_pair<BITS>: sub.f16x2(0x64006400 | lo | hi << 16, zp2), evaluated in fp16 per half."""
    mask = np.uint64((1 << bits) - 1)
    lo = (codes >> np.uint64(j * bits)) & mask
    hi = (codes >> np.uint64((j + 1) * bits)) & mask
    h = (np.uint64(0x64006400) | lo | (hi << np.uint64(16))).astype(np.uint32)
    x = h.view(np.uint16).reshape(-1, 2).view(np.float16).astype(np.float64)
    z = zp2.astype(np.uint32).view(np.uint16).reshape(-1, 2).view(np.float16).astype(np.float64)
    return (x - z).astype(np.float16).view(np.uint32).reshape(-1)


def _emulate(bits, cfg, A, packed, scales, zp, M, N, K, group, split):
    """Y [M, N] (float64) from every block of matmul_lowbit_mma<bits, cfg> on a grid split `split` ways along K.
    Shared memory is one byte array of S slots, written only by the transliterated issue() / store_zp() at the
    iterations where the kernel runs them; a slot that the pipeline order would overwrite before its use breaks
    the result."""
    WN, WM, WK, MT, S = cfg
    threads, BN, BM = 32 * WN * WM * WK, 32 * WN, 8 * MT * WM
    ws, cp = _ws(bits), _cp(bits)
    row_stage = BK * bits // 8  # kRowBytes
    a_tile, w_tile, m_tile = BM * AS * 4, BN * ws, BN * UNITS * 8
    stage_bytes = a_tile + w_tile + m_tile
    acp, wcp, mpt = BM * BK // 4 // threads, BN * row_stage // cp // threads, -(-BN * UNITS // threads)
    assert acp * threads * 4 == BM * BK and wcp * threads * cp == BN * row_stage
    groups = -(-K // group)
    Kp = groups * group
    units, upg, row_bytes = Kp // 32, group // 32, Kp * bits // 8
    stages = -(-Kp // BK)
    flat = packed.reshape(-1)
    A_bytes = A.reshape(-1).view(np.uint8)
    sc_bytes = scales.reshape(-1).view(np.uint8)
    Y = np.zeros((M, N))
    written = np.zeros((M, N), dtype=np.int64)
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4

    def block(n0, m0, kt_begin, kt_end):  # one thread block: the ring, the main loop, the epilogue
        smem = np.full(S * stage_bytes, 0xA5, np.uint8)  # garbage: every byte used must be written

        def a_off(kt):
            return (kt % S) * stage_bytes

        def w_off(kt):
            return (kt % S) * stage_bytes + a_tile

        def m_off(kt):
            return (kt % S) * stage_bytes + a_tile + w_tile

        def cp_async(dst, src_arr, src, nbytes, ok):
            smem[dst : dst + nbytes] = src_arr[src : src + nbytes] if ok else 0

        def issue(kt):
            k0 = kt * BK
            for tid in range(threads):
                for j in range(acp):
                    idx = tid + j * threads
                    m, k = idx // (BK // 4), k0 + 4 * (idx % (BK // 4))
                    d = a_off(kt) + 4 * (m * AS + (k - k0))
                    for e in range(4):  # the a_vec4 = 0 form: 4-byte copies (the same bytes as 16)
                        ok = m0 + m < M and k + e < K
                        cp_async(d + 4 * e, A_bytes, 4 * ((m0 + m) * K + k + e), 4, ok)
                for j in range(wcp):
                    idx = tid + j * threads
                    r, c = idx // (row_stage // cp), idx % (row_stage // cp)
                    n, unit = n0 + r, (k0 >> 5) + c * cp // (4 * bits)
                    ok = n < N and unit < units
                    src = n * row_bytes + k0 * bits // 8 + c * cp
                    cp_async(w_off(kt) + r * ws + c * cp, flat, src, cp, ok)
                for j in range(mpt):
                    idx = tid + j * threads
                    n, unit = n0 + idx // UNITS, (k0 >> 5) + idx % UNITS
                    ok = n < N and unit < units
                    gi = n * groups + unit // upg if ok else 0
                    if idx < BN * UNITS:
                        cp_async(m_off(kt) + 8 * idx, sc_bytes, 4 * gi, 4, ok)

        z_r = np.zeros((threads, mpt), np.uint32)

        def load_zp(kt):
            for tid in range(threads):
                for j in range(mpt):
                    idx = tid + j * threads
                    n, unit = n0 + idx // UNITS, kt * UNITS + idx % UNITS
                    z = 1 << (bits - 1)
                    if zp is not None and idx < BN * UNITS and n < N and unit < units:
                        z = int(zp.reshape(-1)[n * groups + unit // upg])
                    z_r[tid, j] = 0x64006400 | z | (z << 16)

        def store_zp(kt):
            for tid in range(threads):
                for j in range(mpt):
                    idx = tid + j * threads
                    if idx < BN * UNITS:
                        o = m_off(kt) + 8 * idx + 4
                        smem[o : o + 4] = np.array([z_r[tid, j]], np.uint32).view(np.uint8)

        acc = np.zeros((WN * WM * WK, 32, 2, MT, 4))
        for s in range(S - 1):
            if kt_begin + s < kt_end:
                issue(kt_begin + s)
        load_zp(kt_begin)
        store_zp(kt_begin)
        load_zp(kt_begin + 1)
        for kt in range(kt_begin, kt_end):
            # cp_async_wait<S - 2>() + __syncthreads(): the copies issued S - 1 iterations ahead have landed
            # (here: at once, so the order of the slot writes below is what is checked).
            snap = smem.copy()  # what this stage's math reads, after the barrier
            if kt + S - 1 < kt_end:
                issue(kt + S - 1)
            if kt + 1 < kt_end:
                store_zp(kt + 1)
                load_zp(kt + 2)
            # The writes just made must not touch the slot of stage kt (the math below reads it now).
            lo, hi = (kt % S) * stage_bytes, (kt % S + 1) * stage_bytes
            assert (smem[lo:hi] == snap[lo:hi]).all(), "a write of this iteration hits the slot in use"
            a_s = snap[a_off(kt) : a_off(kt) + a_tile].view(np.float32)
            w_s = snap[w_off(kt) : w_off(kt) + w_tile + 16]
            m_s = snap[m_off(kt) : m_off(kt) + m_tile].view(np.uint32).reshape(BN * UNITS, 2)
            for warp in range(WN * WM * WK):
                wn, wm, wk = warp % WN, (warp // WN) % WM, warp // (WN * WM)
                for uu in range(UNITS // WK):
                    u = uu * WK + wk
                    b = []
                    for j in range(MT):
                        ap = (wm * 8 * MT + 8 * j + g) * AS + u * 32 + 8 * t
                        v = a_s[ap[:, None] + np.arange(8)]  # lo = v[:, 0:4], hi = v[:, 4:8]
                        b.append(np.stack([_f16x2(v[:, 0], v[:, 1]), _f16x2(v[:, 2], v[:, 3]),
                                           _f16x2(v[:, 4], v[:, 5]), _f16x2(v[:, 6], v[:, 7])], axis=1))  # fmt: skip
                    for i in range(2):
                        r0 = wn * 32 + 16 * i + g
                        q0 = np.array([_lane_codes(w_s, r * ws + u * 4 * bits, tt[None], bits)[0]
                                       for r, tt in zip(r0, t)])  # fmt: skip
                        q1 = np.array([_lane_codes(w_s, (r + 8) * ws + u * 4 * bits, tt[None], bits)[0]
                                       for r, tt in zip(r0, t)])  # fmt: skip
                        e0, e1 = m_s[r0 * UNITS + u], m_s[(r0 + 8) * UNITS + u]
                        a = [np.stack([_code_pair(q0, 4 * s, e0[:, 1], bits),
                                       _code_pair(q1, 4 * s, e1[:, 1], bits),
                                       _code_pair(q0, 4 * s + 2, e0[:, 1], bits),
                                       _code_pair(q1, 4 * s + 2, e1[:, 1], bits)], axis=1)
                             for s in range(2)]  # fmt: skip
                        s0 = e0[:, 0].view(np.float32).astype(np.float64)
                        s1 = e1[:, 0].view(np.float32).astype(np.float64)
                        for j in range(MT):
                            d = mma_layout.emulate_dense(a[0], b[j][:, 0:2])
                            d = mma_layout.emulate_dense(a[1], b[j][:, 2:4], d)
                            acc[warp, :, i, j] += d * np.stack([s0, s0, s1, s1], axis=1)
        red = acc.reshape(WK, WN * WM, 32, 2, MT, 4).sum(axis=0)  # warps wk > 0 into wk = 0
        for warp in range(WN * WM):
            wn, wm = warp % WN, (warp // WN) % WM
            for i in range(2):
                for j in range(MT):
                    for e in range(4):
                        n = n0 + wn * 32 + 16 * i + g + 8 * (e >> 1)
                        m = m0 + wm * 8 * MT + 8 * j + 2 * t + (e & 1)
                        ok = (n < N) & (m < M)
                        np.add.at(Y, (m[ok], n[ok]), red[warp, ok, i, j, e])
                        np.add.at(written, (m[ok], n[ok]), 1)

    for bx in range(-(-N // BN)):
        for by in range(-(-M // BM)):
            for bz in range(split):
                n0, m0 = bx * BN, by * BM
                per = -(-stages // split)
                kt_begin, kt_end = bz * per, min(stages, bz * per + per)
                if kt_begin >= kt_end:
                    continue
                block(n0, m0, kt_begin, kt_end)
    assert (written == split).all(), "every output written once per K part"
    return Y


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["c0", "c1", "c2"])
def test_kernel_index_math_computes_the_op(bits, cfg):
    """Two blocks each way with N, M and K tails (K = 1096: 9 stages, so the ring of S slots wraps; a padded last
    group and a partial last stage), zero points for group 32 and the symmetric default for group 128; grid
    split-K in two (5 and 4 stages per part) for the first config."""
    rng = np.random.default_rng(bits * 10 + CONFIGS.index(cfg))
    WN, WM, WK, MT, S = cfg
    BN, BM = 32 * WN, 8 * MT * WM
    N, M, K = BN + BN // 2 + 3, BM + 5, 8 * BK + 72
    for group, with_zp, split in ((32, True, 2 if cfg == CONFIGS[0] else 1), (128, False, 1)):
        Kp = lowbit.padded_k(K, group)
        q = np.zeros((N, Kp), np.uint8)
        q[:, :K] = rng.integers(0, 1 << bits, size=(N, K))
        q[:, K:] = rng.integers(0, 1 << bits, size=(N, Kp - K))  # padding codes are don't-care
        scales = rng.uniform(0.5, 1.5, size=(N, Kp // group)).astype(np.float32)
        zp = rng.integers(0, 1 << bits, size=(N, Kp // group), dtype=np.uint8) if with_zp else None
        packed = lowbit.pack(q, bits)
        A = rng.standard_normal((M, K)).astype(np.float32)
        A16 = A.astype(np.float16).astype(np.float32)
        gidx = np.arange(K) // group
        zpk = (1 << (bits - 1)) if zp is None else zp[:, gidx].astype(np.float64)
        W64 = (q[:, :K].astype(np.float64) - zpk) * scales[:, gidx].astype(
            np.float64
        )  # the op's weights, without fp32 rounding
        np.testing.assert_allclose(lowbit.dequantize(packed, scales, zp, bits, group, K), W64, rtol=1e-6)
        want = A16.astype(np.float64) @ W64.T
        got = _emulate(bits, cfg, A, packed, scales, zp, M, N, K, group, split)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_fragment_loads_are_bank_conflict_free():
    """The two 16-byte fp32 loads of each B fragment (one phase = 8 lanes) and the 2/4/8-bit weight loads of a warp."""
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4
    for u in range(UNITS):
        for half in (0, 4):
            addr = 4 * (g * AS + u * 32 + 8 * t + half)
            assert max(mma_layout.bank_conflict_ways(addr[8 * p : 8 * p + 8]) for p in range(4)) == 1
    for bits, width in ((2, 2), (4, 4), (8, 8)):  # LDS.16 / .32: one phase of 32 lanes; LDS.64: two of 16
        lanes_per_phase = 16 if width == 8 else 32
        for u in range(UNITS):
            addr = g * _ws(bits) + u * 4 * bits + width * t
            for p in range(32 // lanes_per_phase):
                banks: dict[int, set[int]] = {}
                for a in addr[p * lanes_per_phase : (p + 1) * lanes_per_phase]:
                    for byte in range(a - a % 4, a + width, 4):
                        banks.setdefault(byte // 4 % 32, set()).add(byte // 4)
                assert max(len(v) for v in banks.values()) == 1, (bits, u, p)


def test_source_has_the_emulated_expressions():
    src = SRC.read_text()
    for expr in (
        "constexpr int kBK = 128;",
        "constexpr int kAS = kBK + 4;",
        "static constexpr int kWS = kRowBytes + ((BITS == 3 || BITS == 8) ? 32 : 16);",
        "static constexpr int kCp = (BITS == 4 || BITS == 8) ? 16 : (BITS == 2 ? 8 : 4);",
        "static constexpr int kStage = kATile + kWTile + kMTile;",
        "static constexpr int kATile = BM * kAS * 4;",
        "auto a_slot = [&](int kt) { return reinterpret_cast<float*>(smem + (kt % S) * C::kStage); };",
        "auto w_slot = [&](int kt) { return smem + (kt % S) * C::kStage + C::kATile; };",
        "float* d = a_s + m * kAS + (k - k0);",
        "const int k = k0 + 4 * (idx % (kBK / 4));",
        "const bool ok = m0 + m < M && k + e < K;",
        "const int r = idx / (W::kRowBytes / W::kCp);",
        "const int c = idx % (W::kRowBytes / W::kCp);",
        "const int unit = (k0 >> 5) + c * W::kCp / (4 * BITS);  // a unit is 4 * BITS bytes",
        "static_cast<u64>(k0) * BITS / 8 + c * W::kCp;",
        "cp_async<W::kCp>(w_s + r * W::kWS + c * W::kCp, ok ? src : B, ok);",
        "const u64 gi = ok ? static_cast<u64>(n) * groups + unit / units_per_group : 0;",
        "if (idx < C::BN * kUnits) cp_async<4>(&m_s[idx].x, scales + gi, ok);",
        "const int unit = kt * kUnits + idx % kUnits;",
        "z = __ldg(zp + static_cast<u64>(n) * groups + unit / units_per_group);",
        "z_r[j] = 0x64006400u | z | (z << 16);",
        "if (idx < C::BN * kUnits) m_s[idx].y = z_r[j];",
        "if (kt_begin + s < kt_end) issue(kt_begin + s);",
        "cp_async_wait<S - 2>();",
        "if (kt + S - 1 < kt_end) issue(kt + S - 1);",
        "store_zp(kt + 1);",
        "load_zp(kt + 2);",
        "const int u = uu * WK + wk;",
        "const float* ap = a_s + (wm * 8 * MT + 8 * j + g) * kAS + u * 32 + 8 * t;",
        "b[j] = make_uint4(f16x2(lo.x, lo.y), f16x2(lo.z, lo.w), f16x2(hi.x, hi.y), f16x2(hi.z, hi.w));",
        'asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));',
        "const int r0 = wn * 32 + 16 * i + g;",
        "const u64 q0 = lane_codes<BITS>(w_s + r0 * W::kWS + u * 4 * BITS, t);",
        "const u64 q1 = lane_codes<BITS>(w_s + (r0 + 8) * W::kWS + u * 4 * BITS, t);",
        "a[s][0] = code_pair<BITS>(q0, 4 * s, e0.y);",
        "a[s][1] = code_pair<BITS>(q1, 4 * s, e1.y);",
        "a[s][2] = code_pair<BITS>(q0, 4 * s + 2, e0.y);",
        "a[s][3] = code_pair<BITS>(q1, 4 * s + 2, e1.y);",
        "mma16816(d, a[0], b[j].x, b[j].y);",
        "mma16816(d, a[1], b[j].z, b[j].w);",
        "return sub_f16x2(0x64006400u | lo | (hi << 16), zp2);",
        "const unsigned int hi = sh > 8 ? w[wi + 1] : 0u;",
        "const int n = n0 + wn * 32 + 16 * i + g + 8 * (e >> 1);",
        "const int m = m0 + wm * 8 * MT + 8 * j + 2 * t + (e & 1);",
        "const int kt_begin = blockIdx.z * per_split;",
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
    ):
        assert expr in src, expr
    body = src.split("EDGEKIT_LOWBIT_MMA_CONFIGS(X)")[1][:120]
    configs = re.findall(r"X\((\d), (\d), (\d), (\d), (\d), (\d)\)", body)
    assert [tuple(int(v) for v in c[1:]) for c in configs] == CONFIGS
    assert [(32 * wn, 8 * mt * wm) for wn, wm, _, mt, _ in CONFIGS] == list(build.LOWBIT_MMA_CONFIGS)
