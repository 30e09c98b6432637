"""CUDA sources compile (nvcc, no GPU needed) for every target architecture; the Python launch geometry and the
numpy model of the mma.sp registers match the sources."""

from __future__ import annotations

import re

import pytest

from edgekit.kernels.cuda import build

needs_nvcc = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not installed")


@needs_nvcc
@pytest.mark.parametrize("host", [True, False], ids=["with-launcher", "kernels-only-as-nvrtc"])
def test_cuda_source_compiles_for_sm90(tmp_path, host):
    out = build.compile_object(tmp_path / "matmul_lowbit.o", arch="sm_90", host=host)
    assert out.stat().st_size > 0


def test_python_geometry_mirrors_the_cuda_source():
    src = build.SOURCE.read_text()
    assert int(re.search(r"constexpr int kWarps = (\d+);", src).group(1)) == build.WARPS
    assert int(re.search(r"constexpr int kRowsPerWarp = (\d+);", src).group(1)) == build.ROWS_PER_WARP
    assert [build.tile_m(m) for m in (1, 2, 3, 4, 5, 8, 9, 128)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert build.grid(1, 4096) == (256, 1) and build.grid(16, 11008) == (688, 2) and build.grid(3, 1) == (1, 1)
    assert f'extern "C" int {build.LAUNCHER}(' in src


@needs_nvcc
def test_lowbit_mma_path_is_in_sm80_builds_only(tmp_path):
    """The tensor-core kernel (mma.sync m16n8k16 f16 -> f32) is compiled into sm_80+ device code; the sm_75 PTX has
    the same entry points with empty bodies (the launcher falls back to the CUDA-core kernel there)."""
    ptx = build.compile_device("matmul_lowbit", tmp_path / "l80.ptx", ["sm_80"], kind="ptx").read_text()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx and "sub.rn.f16x2" in ptx
    assert ptx.count(".entry _ZN7edgekit3mma17matmul_lowbit_mma") == 4 * len(build.LOWBIT_MMA_CONFIGS)
    old = build.compile_device("matmul_lowbit", tmp_path / "l75.ptx", ["sm_75"], kind="ptx").read_text()
    assert "mma.sync" not in old and old.count(".entry _ZN7edgekit3mma17matmul_lowbit_mma") == 12


def test_lowbit_path_selector_mirrors_the_source():
    src = build.SOURCE.read_text()
    switch = build.SOURCE.with_name("kernel_path.cuh").read_text()  # the path switch both tensor-core libraries share
    assert "constexpr int kPathAuto = 0, kPathOld = 1, kPathMma = 2;" in switch
    assert (build.LOWBIT_PATH_AUTO, build.LOWBIT_PATH_OLD, build.LOWBIT_PATH_MMA) == (0, 1, 2)
    assert f"constexpr int kMmaMinM = {build.LOWBIT_MMA_MIN_M};" in src
    for name in ("edgekit_matmul_lowbit_set_path(int mode)", "edgekit_matmul_lowbit_last_path(void)"):
        assert f'extern "C" int {name}' in src
    assert 'PathSwitch g_switch("EDGEKIT_LOWBIT_PATH");' in src and "std::getenv(env_)" in switch
    assert "const int cfg = M <= 16 ? 0 : (M <= 32 ? 1 : 2);" in src


def test_launch_arguments_are_validated():
    with pytest.raises(ValueError, match="bits=5"):
        build._check(1, 8, 64, 5, 32)
    with pytest.raises(ValueError, match="group_size=16"):
        build._check(1, 8, 64, 4, 16)


# ---- every CUDA source, every target architecture (device code: PTX and SASS), and the mma.sp register model ----

import numpy as np  # noqa: E402

from edgekit.kernels import sparse24  # noqa: E402
from edgekit.kernels.cuda import mma_layout  # noqa: E402

# sm_72: Jetson AGX Xavier (CUDA-core fallback paths); sm_75: oldest that CUDA 13 still targets, same paths;
# sm_80: first with mma.sp; sm_87: Jetson Orin; sm_89: Ada; sm_90: Hopper.
TARGET_ARCHS = ("sm_72", "sm_75", "sm_80", "sm_87", "sm_89", "sm_90")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(build.SOURCES))
def test_every_source_compiles_to_ptx_and_cubin_for_every_target(tmp_path, source):
    supported = build.supported_archs()
    archs = [a for a in TARGET_ARCHS if a in supported]
    assert {"sm_87", "sm_89", "sm_90"} <= set(archs), f"nvcc cannot target {sorted(set(TARGET_ARCHS) - supported)}"
    # one nvcc call: for each arch, SASS (ptxas ran) and PTX embedded in the fatbin
    out = build.compile_device(source, tmp_path / f"{source}.fatbin", archs, kind="fatbin")
    assert out.stat().st_size > 0
    if "sm_72" not in supported:  # CUDA 13 dropped Volta/Xavier; the PTX for sm_75 is the closest check here
        ptx = build.compile_device(source, tmp_path / f"{source}.ptx", ["sm_75"], kind="ptx").read_text()
        assert ".target sm_75" in ptx and "mma.sp" not in ptx  # the pre-Ampere path has no sparse mma


@needs_nvcc
@pytest.mark.parametrize("source", ["matmul_sparse24", "attention_int8"])
def test_new_sources_compile_with_launchers(tmp_path, source):
    assert build.compile_object(tmp_path / f"{source}.o", arch="sm_90", source=source).stat().st_size > 0


@needs_nvcc
def test_sparse_ptx_uses_ordered_metadata_mma_sp_on_sm80(tmp_path):
    ptx = build.compile_device("matmul_sparse24", tmp_path / "s.ptx", ["sm_80"], kind="ptx").read_text()
    assert "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32" in ptx
    assert "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.u8.s32" in ptx
    # the tiled path (matmul_sparse24_tiled.cuh) is in the sm_80 build, and only there
    assert "cp.async.cg.shared.global" in ptx and "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in ptx
    assert "matmul_sparse24_tiled" in ptx
    old = build.compile_device("matmul_sparse24", tmp_path / "s75.ptx", ["sm_75"], kind="ptx").read_text()
    assert "cp.async" not in old and "ldmatrix" not in old


def test_sparse24_tiled_header_is_listed_and_selectable():
    assert TILED_SRC in build.HEADERS["matmul_sparse24"] and TILED_SRC.is_file()
    src = build.SOURCES["matmul_sparse24"].read_text()
    assert '#include "matmul_sparse24_tiled.cuh"' in src
    for name in ("edgekit_matmul_sparse24_set_path(int mode)", "edgekit_matmul_sparse24_last_path(void)"):
        assert f'extern "C" int {name}' in src
    assert "constexpr int kPathAuto = 0, kPathReference = 1, kPathTiled = 2, kPathTiledConfig0 = 10;" in src
    assert (build.SPARSE24_PATH_AUTO, build.SPARSE24_PATH_REFERENCE, build.SPARSE24_PATH_TILED) == (0, 1, 2)
    assert build.SPARSE24_PATH_TILED_CONFIG0 == 10
    bn_bm = re.search(r"constexpr int kTiledBN\[\] = \{([^}]*)\};.*?kTiledBM\[\] = \{([^}]*)\};", src, re.S)
    bns, bms = ([int(v) for v in grp.split(",")] for grp in bn_bm.groups())
    assert list(zip(bns, bms)) == list(build.SPARSE24_TILED_CONFIGS)


def test_device_command_validates():
    if build.find_nvcc() is None:
        pytest.skip("nvcc not installed")
    with pytest.raises(ValueError, match="exactly one arch"):
        build.device_command("attention_int8", "x.ptx", ["sm_80", "sm_90"], kind="ptx")
    with pytest.raises(FileNotFoundError, match="no CUDA source"):
        build.source_path("nope")


def test_sparse24_geometry_mirrors_the_cuda_source():
    src = build.SOURCES["matmul_sparse24"].read_text()
    assert int(re.search(r"constexpr int kWarpsN = (\d+);", src).group(1)) * 16 == build.SPARSE24_BN
    assert [build.sparse24_tile_m(m) for m in (1, 8, 9, 16, 17, 32, 33, 512)] == [8, 8, 16, 16, 32, 32, 64, 64]
    assert build.sparse24_grid(1, 4096) == (128, 1) and build.sparse24_grid(512, 8192) == (256, 8)
    for name in ("edgekit_matmul_sparse24_f16", "edgekit_matmul_sparse24_s8", "edgekit_mma_sp_probe"):
        assert f'extern "C" int {name}(' in src
    assert 'extern "C" int edgekit_attention_int8_d64(' in build.SOURCES["attention_int8"].read_text()


def _tile(kind, seed):
    """A random 16-row 2:4 tile for one instruction: (values, nibbles, x, dense W)."""
    rng = np.random.default_rng(seed)
    K = mma_layout.MMA_K[kind]
    w = sparse24.random_2of4(rng, 16, K, full=bool(seed % 2))
    if kind == "s8":
        w = np.clip(np.rint(w * 40), -127, 127).astype(np.int8)
        x = rng.integers(0, 256, size=(K, 8)).astype(np.uint8)
    else:
        w = w.astype(np.float16)
        x = rng.standard_normal((K, 8)).astype(np.float16)
    values, indices = sparse24.pack(w)
    return values, sparse24.unpack_nibbles(indices, K), x, w


@pytest.mark.parametrize("kind", mma_layout.KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_mma_register_model_computes_the_dense_product(kind, seed):
    values, nibbles, x, w = _tile(kind, seed)
    A, B, E = mma_layout.lane_registers(kind, values, nibbles, x)
    D = mma_layout.emulate(kind, A, B, E)
    full = w.astype(np.float64) @ x.astype(np.float64)
    dc = mma_layout.d_coords()
    np.testing.assert_allclose(D, full[dc[..., 0], dc[..., 1]], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind", mma_layout.KINDS)
def test_kernel_metadata_from_op_indices_matches_the_register_model(kind):
    """The kernel's __byte_perm of the op's index words gives the metadata register the model expects, for every
    instruction of a longer row."""
    rng = np.random.default_rng(5)
    K = mma_layout.MMA_K[kind]
    chunks = 3
    _, indices = sparse24.pack(sparse24.random_2of4(rng, 16, K * chunks))
    words = indices.view("<u4")
    nib = sparse24.unpack_nibbles(indices, K * chunks)
    values = np.zeros((16, K // 2), np.float16 if kind == "f16" else np.int8)
    x = np.zeros((K, 8), np.float16 if kind == "f16" else np.uint8)
    used = mma_layout.e_coords(kind)[:, 0, 0] >= 0  # lanes that contribute metadata (selector 0)
    for c in range(chunks):
        _, _, E_model = mma_layout.lane_registers(kind, values, nib[:, c * K // 4 : (c + 1) * K // 4], x)
        np.testing.assert_array_equal(mma_layout.kernel_metadata(kind, words, c)[used], E_model[used])


def test_byte_perm_matches_cuda_semantics():
    assert mma_layout.byte_perm(0x33221100, 0x77665544, 0x5410) == 0x55441100
    assert mma_layout.byte_perm(0x33221100, 0x77665544, 0x7632) == 0x77663322


@pytest.mark.parametrize("kind", mma_layout.KINDS)
def test_metadata_probe_procedure_recovers_the_layout(kind):
    """infer_metadata_map against the model itself gives back the model's map (the GPU script runs it on a device)."""
    got = mma_layout.infer_metadata_map(kind, lambda A, B, E: mma_layout.emulate(kind, A, B, E))
    np.testing.assert_array_equal(got, mma_layout.e_coords(kind))


# The s8 m16n8k64 metadata map measured on an H100 (runtimes/cuda/check_gpu.py, infer_metadata_map): lane L's
# nibble j controls (row H100_S8_E_ROW[L], group H100_S8_E_GROUP0[L] + j).
H100_S8_E_ROW = [0, 8, 0, 8, 1, 9, 1, 9, 2, 10, 2, 10, 3, 11, 3, 11,
                 4, 12, 4, 12, 5, 13, 5, 13, 6, 14, 6, 14, 7, 15, 7, 15]  # fmt: skip
H100_S8_E_GROUP0 = [0, 0, 8, 8] * 8


def test_s8_metadata_model_is_the_h100_measurement():
    measured = np.array([[(H100_S8_E_ROW[lane], H100_S8_E_GROUP0[lane] + j) for j in range(8)] for lane in range(32)])
    np.testing.assert_array_equal(mma_layout.e_coords("s8"), measured)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4  # the formula: lane 4g + t = row g + 8 (t % 2), groups 8 (t // 2) .. + 7
    np.testing.assert_array_equal(measured[:, :, 0], np.repeat((g + 8 * (t % 2))[:, None], 8, axis=1))
    np.testing.assert_array_equal(measured[:, :, 1], (8 * (t // 2))[:, None] + np.arange(8))


@pytest.mark.parametrize("kind", mma_layout.KINDS)
def test_operand_probes_recover_the_model(kind):
    """infer_b_map / infer_a_map against the model itself give back the model (check_gpu.py runs them on a GPU)."""
    run = lambda A, B, E: mma_layout.emulate(kind, A, B, E)  # noqa: E731
    np.testing.assert_array_equal(mma_layout.infer_b_map(kind, run), mma_layout.model_b_map(kind))
    a_map, consistent = mma_layout.infer_a_map(kind, run)
    np.testing.assert_array_equal(a_map, mma_layout.model_a_map(kind))
    assert consistent.all()


def _old_s8_emap():
    """The s8 metadata layout first assumed (like f16: lane 4g + t = groups 4t .. 4t + 3 of rows g, g + 8): wrong."""
    return np.array([[(lane // 4 + 8 * (j >> 2), 4 * (lane % 4) + (j & 3)) for j in range(8)] for lane in range(32)])


def test_probes_tell_which_operand_layout_is_wrong():
    """A device that differs from the model in exactly one operand is flagged by that operand's probe only."""

    def swap_a(A, B, E):  # A registers 1 and 2 exchanged
        A = np.array(A)
        A[..., [1, 2]] = A[..., [2, 1]]
        return mma_layout.emulate("s8", A, B, E)

    def old_e(A, B, E):
        return mma_layout.emulate("s8", A, B, E, emap=_old_s8_emap())

    def shift_b(A, B, E):  # B: lane l reads lane l ^ 4's registers (tokens swapped in pairs)
        return mma_layout.emulate("s8", A, np.asarray(B)[..., np.arange(32) ^ 4, :], E)

    def same(got, want):
        return bool((got == want).all())

    b_model, a_model = mma_layout.model_b_map("s8"), mma_layout.model_a_map("s8")
    assert same(mma_layout.infer_b_map("s8", swap_a), b_model)
    assert not same(mma_layout.infer_a_map("s8", swap_a)[0], a_model)
    assert same(mma_layout.infer_b_map("s8", old_e), b_model)
    assert same(mma_layout.infer_a_map("s8", old_e)[0], a_model)
    np.testing.assert_array_equal(mma_layout.infer_metadata_map("s8", old_e), _old_s8_emap())
    assert not same(mma_layout.infer_b_map("s8", shift_b), b_model)
    assert not mma_layout.infer_a_map("s8", shift_b)[1].all()  # tokens inconsistent


@pytest.mark.parametrize("kind", mma_layout.KINDS)
def test_kernel_fragment_addressing_computes_the_product(kind):
    """The byte offsets matmul_sparse24.cu reads its fragments from (one 16-row warp tile, 8 tokens, every K
    stage and every warp along K), fed to the register model, give W @ X."""
    rng = np.random.default_rng(7)
    mma_k = mma_layout.MMA_K[kind]
    kwarps = 4
    K = mma_k * kwarps * 2  # two stages
    w = sparse24.random_2of4(rng, 16, K)
    if kind == "s8":
        w = np.clip(np.rint(w * 40), -127, 127).astype(np.int8)
        x = rng.integers(0, 256, size=(8, K)).astype(np.uint8)  # [token, K]
    else:
        w, x = w.astype(np.float16), rng.standard_normal((8, K)).astype(np.float16)
    values, indices = sparse24.pack(w)
    vbytes, xbytes = values.view(np.uint8).reshape(16, -1), x.view(np.uint8).reshape(8, -1)
    words = indices.view("<u4")  # [16, K / 32]
    acc = np.zeros((32, 4))
    stage_k = mma_k * kwarps
    for s in range(K // stage_k):
        vs = vbytes[:, s * 128 : (s + 1) * 128]  # kVBytes = 128 per stage, both kinds
        xs = xbytes[:, s * 256 : (s + 1) * 256]  # kXBytes = 256
        sw = words[:, s * stage_k // 32 : (s + 1) * stage_k // 32]  # the stage's metadata words
        for wk in range(kwarps):
            A = np.zeros((32, 4), np.uint32)
            B = np.zeros((32, 4), np.uint32)
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for r in range(4):
                    off = 32 * wk + 4 * t + 16 * (r >> 1)
                    A[lane, r] = vs[g + 8 * (r & 1), off : off + 4].view("<u4")[0]
                    off = 64 * wk + 16 * r + 4 * t
                    B[lane, r] = xs[g, off : off + 4].view("<u4")[0]
            acc += mma_layout.emulate(kind, A, B, mma_layout.kernel_metadata(kind, sw, wk))
    full = w.astype(np.float64) @ x.astype(np.float64).T
    dc = mma_layout.d_coords()
    np.testing.assert_allclose(acc, full[dc[..., 0], dc[..., 1]], rtol=1e-9, atol=1e-6)


def test_s8_kernel_reads_whole_metadata_words():
    src = build.SOURCES["matmul_sparse24"].read_text()
    assert "(wn * 16 + g + 8 * (t & 1)) * T::kMBytes + 4 * (2 * wk + (t >> 1))" in src


# ---- the tiled sm_80+ path (matmul_sparse24_tiled.cuh): its byte offsets through the register model ----

TILED_SRC = build.SOURCES["matmul_sparse24"].with_name("matmul_sparse24_tiled.cuh")
TILED_XS, TILED_VS, TILED_STAGES = 144, 80, 3  # kXS, kVS, kStages


def _tiled_cfg(kind, wn_, wm_, mt):
    stage_k = 128 if kind == "s8" else 64
    mb = stage_k // 8
    bn, bm = 32 * wn_, 8 * mt * wm_
    xtile, vtile = bm * TILED_XS, bn * TILED_VS
    return dict(stage_k=stage_k, mb=mb, bn=bn, bm=bm, xtile=xtile, vtile=vtile, stage=xtile + vtile + bn * mb)


def _phase_conflicts(addr) -> int:
    """Worst bank-conflict ways over the 4 phases (8 lanes each) of one ldmatrix.x4."""
    return max(mma_layout.bank_conflict_ways(addr[8 * i : 8 * i + 8]) for i in range(4))


def _tiled_emulate(kind, cfg_wn, cfg_wm, mt, xb, vb, ib, M, N, K, bx, by):
    """Block (bx, by) of matmul_sparse24_tiled<kind, WN, WM, MT> on the byte rows xb [M, K*e], vb [N, K/2*e],
    ib [N, K/8], mirroring the kernel: load_stage's cp.async copies into the smem ring, the ldmatrix lane
    addresses, the metadata offsets and the epilogue. Returns {(m, n): accumulator}."""
    c = _tiled_cfg(kind, cfg_wn, cfg_wm, mt)
    kthreads, mb = 32 * cfg_wn * cfg_wm, c["mb"]
    m0, n0 = bx * c["bm"], by * c["bn"]
    smem = np.zeros(TILED_STAGES * c["stage"], np.uint8)
    ktiles = K // c["stage_k"]

    def load_stage(kt, slot):
        st = slot * c["stage"]
        for tid in range(kthreads):
            for cc in range(tid, c["bm"] * 8, kthreads):
                r, part = cc // 8, cc % 8
                m = min(m0 + r, M - 1)
                src = kt * 128 + 16 * part
                smem[st + r * TILED_XS + 16 * part :][:16] = xb[m, src : src + 16]
            for cc in range(tid, c["bn"] * 4, kthreads):
                r, part = cc // 4, cc % 4
                n = min(n0 + r, N - 1)
                src = kt * 64 + 16 * part
                smem[st + c["xtile"] + r * TILED_VS + 16 * part :][:16] = vb[n, src : src + 16]
            if tid < c["bn"]:
                n = min(n0 + tid, N - 1)
                smem[st + c["xtile"] + c["vtile"] + tid * mb :][:mb] = ib[n, kt * mb : (kt + 1) * mb]

    acc = {}
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4
    worst_conflict = 1
    for s in range(TILED_STAGES - 1):
        if s < ktiles:
            load_stage(s, s)
    for kt in range(ktiles):
        nk = kt + TILED_STAGES - 1
        if nk < ktiles:  # issued before the math, into the slot the previous stage freed
            load_stage(nk, nk % TILED_STAGES)
        slot = kt % TILED_STAGES
        xs = slot * c["stage"]
        vs, ms = xs + c["xtile"], xs + c["xtile"] + c["vtile"]
        for warp in range(cfg_wn * cfg_wm):
            wn, wm = warp % cfg_wn, warp // cfg_wn
            for j in range(2):
                a, e = [], []
                for af in range(2):
                    addr = vs + (wn * 32 + 16 * af + (lanes & 15)) * TILED_VS + 32 * j + 16 * (lanes >> 4)
                    worst_conflict = max(worst_conflict, _phase_conflicts(addr))
                    a.append(mma_layout.ldmatrix_x4(smem, addr))
                    row = wn * 32 + 16 * af
                    word = lambda off: int(smem[off : off + 4].view("<u4")[0])  # noqa: E731
                    ev = np.zeros(32, np.uint32)
                    for lane in range(32):
                        if kind == "s8":
                            gl, tl = g[lane], t[lane]
                            ev[lane] = word(ms + (row + gl + 8 * (tl & 1)) * mb + 4 * (2 * j + (tl >> 1)))
                        else:
                            lo = word(ms + (row + g[lane]) * mb + 4 * j)
                            hi = word(ms + (row + g[lane] + 8) * mb + 4 * j)
                            ev[lane] = mma_layout.byte_perm(lo, hi, 0x7632 if t[lane] & 1 else 0x5410)
                    e.append(ev)
                for nf in range(mt):
                    addr = xs + (wm * 8 * mt + 8 * nf + (lanes & 7)) * TILED_XS + 64 * j + 16 * (lanes >> 3)
                    worst_conflict = max(worst_conflict, _phase_conflicts(addr))
                    b = mma_layout.ldmatrix_x4(smem, addr)
                    for af in range(2):
                        d = mma_layout.emulate(kind, a[af], b, e[af])
                        for lane in range(32):
                            for i in range(4):
                                n = n0 + wn * 32 + 16 * af + g[lane] + 8 * (i >> 1)
                                m = m0 + wm * 8 * mt + 8 * nf + 2 * t[lane] + (i & 1)
                                acc[(m, n)] = acc.get((m, n), 0.0) + d[lane, i]
    return {k: v for k, v in acc.items() if k[0] < M and k[1] < N}, worst_conflict


@pytest.mark.parametrize("kind", mma_layout.KINDS)
@pytest.mark.parametrize("cfg", [(2, 2, 2), (4, 2, 4)], ids=["64x32", "128x64"])
def test_tiled_kernel_fragment_addressing_computes_the_product(kind, cfg):
    """The tiled kernel's offsets (4 k-stages through the 3-slot ring, every warp, N and M tails with clamped rows)
    fed to the ldmatrix and mma.sp models give W @ X for every output the block writes; ldmatrix is conflict-free."""
    wn_, wm_, mt = cfg
    c = _tiled_cfg(kind, *cfg)
    rng = np.random.default_rng(11)
    K = 4 * c["stage_k"]
    N, M = c["bn"] + c["bn"] // 2 + 3, c["bm"] + 5  # second block row/column are partial
    w = sparse24.random_2of4(rng, N, K)
    if kind == "s8":
        w = np.clip(np.rint(w * 40), -127, 127).astype(np.int8)
        x = rng.integers(0, 256, size=(M, K)).astype(np.uint8)
    else:
        w, x = w.astype(np.float16), rng.standard_normal((M, K)).astype(np.float16)
    values, indices = sparse24.pack(w)
    xb, vb = x.view(np.uint8).reshape(M, -1), values.view(np.uint8).reshape(N, -1)
    full = w.astype(np.float64) @ x.astype(np.float64).T  # [N, M]
    seen = set()
    for bx, by in [(0, 0), (1, 1)]:
        acc, conflicts = _tiled_emulate(kind, wn_, wm_, mt, xb, vb, indices, M, N, K, bx, by)
        assert conflicts == 1
        for (m, n), v in acc.items():
            np.testing.assert_allclose(v, full[n, m], rtol=1e-9, atol=1e-6)
        seen |= set(acc)
    assert (M - 1, N - 1) in seen and (0, 0) in seen
    assert len(seen) == c["bm"] * c["bn"] + (M - c["bm"]) * (N - c["bn"])


def test_tiled_source_uses_the_emulated_offsets():
    """The expressions _tiled_emulate mirrors, verbatim in the .cuh (so the two cannot drift apart silently)."""
    src = TILED_SRC.read_text()
    for expr in (
        "constexpr int kStages = 3;",
        "constexpr int kXS = kXBytes + 16;",
        "constexpr int kVS = kVBytes + 16;",
        "constexpr int kXBytes = 128;",
        "constexpr int kVBytes = 64;",
        "static constexpr int kStageK = INT8 ? 128 : 64;",
        "const i64 m = min(m0 + r, M - 1);",
        "cp_async16(st + r * kXS + 16 * part, X + m * x_row + static_cast<i64>(kt) * kXBytes + 16 * part);",
        "cp_async16(st + C::kXTile + r * kVS + 16 * part, V + n * v_row + static_cast<i64>(kt) * kVBytes + 16 * part);",
        "const u8* src = I + n * i_row + static_cast<i64>(kt) * kMB;",
        "const u32 dst = st + C::kXTile + C::kVTile + tid * kMB;",
        "ldmatrix_x4(a[af], vs + (wn * 32 + 16 * af + (lane & 15)) * kVS + 32 * j + 16 * (lane >> 4));",
        "e[af] = *reinterpret_cast<const u32*>(ms + (row + g + 8 * (t & 1)) * kMB + 4 * (2 * j + (t >> 1)));",
        "const u32 lo = *reinterpret_cast<const u32*>(ms + (row + g) * kMB + 4 * j);",
        "const u32 hi = *reinterpret_cast<const u32*>(ms + (row + g + 8) * kMB + 4 * j);",
        "e[af] = __byte_perm(lo, hi, (t & 1) ? 0x7632 : 0x5410);",
        "ldmatrix_x4(b, xs + (wm * 8 * MT + 8 * nf + (lane & 7)) * kXS + 64 * j + 16 * (lane >> 3));",
        "const int n = n0 + wn * 32 + 16 * af + g + 8 * h;",
        "const int m = m0 + wm * 8 * MT + 8 * nf + 2 * t + q;",
        "const AccT v = acc[af][nf][2 * h + q];",
        "const int m0 = blockIdx.x * C::BM;",
        "const int n0 = blockIdx.y * C::BN;",
    ):
        assert expr in src, expr
    assert "X(0, 4, 2, 8) X(1, 4, 2, 4) X(2, 2, 2, 4) X(3, 2, 2, 2)" in src
    assert build.SPARSE24_TILED_CONFIGS == ((128, 128), (128, 64), (64, 64), (64, 32))


def test_ldmatrix_model_matches_the_fragment_formulas():
    """ldmatrix_x4 at the kernel's lane addresses gives the mma_layout A / B registers of a stored tile."""
    rng = np.random.default_rng(3)
    tile = rng.integers(0, 256, size=(16, 80), dtype=np.uint8)  # 16 rows, stride 80 (kVS)
    regs = mma_layout.ldmatrix_x4(tile.reshape(-1), [(lane & 15) * 80 + 16 * (lane >> 4) for lane in range(32)])
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(4):  # A[r]: row g + 8 (r & 1), compressed bytes 4t + 16 (r >> 1)
            off = 4 * t + 16 * (r >> 1)
            assert regs[lane, r] == tile[g + 8 * (r & 1), off : off + 4].view("<u4")[0]
