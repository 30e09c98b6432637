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
