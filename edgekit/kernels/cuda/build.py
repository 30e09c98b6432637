"""Compile and load the CUDA kernels of ``edgekit/kernels/cuda/``.

Sources (``SOURCES``): ``matmul_lowbit.cu`` (MatMulLowBit), ``matmul_sparse24.cu`` (MatMulSparse24, with a raw
``mma.sp`` probe), ``attention_int8.cu`` (AttentionInt8, head dim 64). Generic helpers take a source name or path:
``compile_shared(out_dir, arch=..., source=...)``, ``compile_object(output, arch=..., source=...)``,
``compile_device(source, output, archs, kind="ptx"|"cubin"|"fatbin")`` (device code only, no GPU needed: what CI
runs for every supported architecture) and ``supported_archs()`` (what this nvcc can target; CUDA 13 dropped
sm_72). ``Sparse24Library`` and ``AttentionLibrary`` call the other two launchers through ctypes.

MatMulLowBit, two ways, same source:

- ``compile_shared()`` runs ``nvcc -O3 -arch=sm_90 -shared -Xcompiler -fPIC`` and ``LowBitLibrary`` calls the
  ``extern "C"`` launcher ``edgekit_matmul_lowbit_f32`` through ctypes (device pointers and a stream as ints,
  e.g. ``tensor.data_ptr()`` and ``torch.cuda.current_stream().cuda_stream``);
- ``CupyLowBit`` compiles the kernels alone (``-DEDGEKIT_NO_HOST``) with CuPy's NVRTC ``RawModule`` and repeats
  the launcher's grid choice in Python (``tile_m``, ``grid``), for machines with CuPy but no nvcc.

Imports nothing beyond the standard library and numpy at module level; CuPy is imported by ``CupyLowBit``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("matmul_lowbit.cu")
SOURCES = {
    name: Path(__file__).with_name(f"{name}.cu") for name in ("matmul_lowbit", "matmul_sparse24", "attention_int8")
}
# Headers included by a source (not compiled on their own; listed so tools can track them).
_FP16 = Path(__file__).with_name("fp16.cuh")
_PATH = Path(__file__).with_name("kernel_path.cuh")
HEADERS = {
    "matmul_lowbit": (_PATH,),
    "matmul_sparse24": (Path(__file__).with_name("matmul_sparse24_tiled.cuh"), _FP16),
    "attention_int8": (_FP16, _PATH),
}
LAUNCHER = "edgekit_matmul_lowbit_f32"
# Mirrors the constants of matmul_lowbit.cu.
WARPS = 8
ROWS_PER_WARP = 2
THREADS = WARPS * 32
TILE_MS = (1, 2, 4, 8)
# The tensor-core path of matmul_lowbit.cu (matmul_lowbit_mma, sm_80+, mma.sync m16n8k16 f16 -> f32): the launcher's
# path modes (edgekit_matmul_lowbit_set_path; default from $EDGEKIT_LOWBIT_PATH: auto, old, mma), the M from which
# auto takes it, and (BN weight rows, BM tokens) per config (M <= 16: 0, M <= 32: 1, else 2). last_path(): 1 the
# CUDA-core kernel, 2 the tensor-core kernel. Only the ctypes library has it: CupyLowBit launches the CUDA-core kernel.
LOWBIT_PATH_AUTO, LOWBIT_PATH_OLD, LOWBIT_PATH_MMA = 0, 1, 2
LOWBIT_MMA_MIN_M = 8
LOWBIT_MMA_CONFIGS = ((128, 16), (128, 32), (128, 64))


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda; None when there is none."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def source_path(source: str | Path | None) -> Path:
    """A source by name (``"matmul_sparse24"``) or path; None is ``matmul_lowbit.cu``."""
    if source is None:
        return SOURCE
    if str(source) in SOURCES:
        return SOURCES[str(source)]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no CUDA source {source!r}; known: {sorted(SOURCES)}")
    return path


def _nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    return nvcc


def nvcc_command(
    output: Path, *, arch: str = "sm_90", shared: bool = True, host: bool = True, source: str | Path | None = None
) -> list[str]:
    """The nvcc command line: a shared library (``shared``) or an object file; ``host=False`` drops the launcher."""
    cmd = [_nvcc(), "-O3", f"-arch={arch}", "-std=c++17"]
    cmd += ["-shared", "-Xcompiler", "-fPIC"] if shared else ["-c"]
    if not host:
        cmd.append("-DEDGEKIT_NO_HOST")
    return [*cmd, "-o", str(output), str(source_path(source))]


def supported_archs() -> set[str]:
    """``sm_XX`` names this nvcc can compile for (``nvcc --list-gpu-arch``); empty without nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        return set()
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=False).stdout
    return {line.strip().replace("compute_", "sm_") for line in out.splitlines() if line.strip().startswith("compute_")}


def device_command(
    source: str | Path, output: Path, archs: list[str] | tuple[str, ...], kind: str = "fatbin"
) -> list[str]:
    """nvcc for device code only (``-DEDGEKIT_NO_HOST``): ``ptx`` / ``cubin`` for one arch, or a ``fatbin`` holding
    SASS and PTX for every arch of ``archs`` (one call, so ptxas runs for each)."""
    if kind not in ("ptx", "cubin", "fatbin"):
        raise ValueError(f"kind must be ptx, cubin or fatbin, got {kind!r}")
    if kind != "fatbin" and len(archs) != 1:
        raise ValueError(f"{kind} takes exactly one arch, got {list(archs)}")
    cmd = [_nvcc(), "-O3", "-std=c++17", "-DEDGEKIT_NO_HOST", f"--{kind}"]
    if kind == "fatbin":
        for arch in archs:
            num = arch.removeprefix("sm_")
            cmd += ["-gencode", f"arch=compute_{num},code=[sm_{num},compute_{num}]"]
    else:
        cmd.append(f"-arch={archs[0]}")
    return [*cmd, "-o", str(output), str(source_path(source))]


def compile_device(source: str | Path, output: Path, archs, kind: str = "fatbin") -> Path:
    """Run ``device_command``; raises RuntimeError with nvcc's messages on failure."""
    _run_nvcc(device_command(source, Path(output), list(archs), kind))
    return Path(output)


def _run_nvcc(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")


def compile_shared(out_dir: Path, *, arch: str = "sm_90", source: str | Path | None = None) -> Path:
    """Build ``libedgekit_<name>_<arch>.so`` in ``out_dir`` (written to a temporary name, then renamed); the
    default source (MatMulLowBit) keeps its historical name ``libedgekit_lowbit_<arch>.so``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = source_path(source)
    stem = "lowbit" if src == SOURCE else src.stem
    target = out_dir / f"libedgekit_{stem}_{arch}.so"
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        _run_nvcc(nvcc_command(Path(tmp), arch=arch, shared=True, source=src))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def compile_object(output: Path, *, arch: str = "sm_90", host: bool = True, source: str | Path | None = None) -> Path:
    """Compile to an object file only (``nvcc -c``): the check that the source builds, no GPU needed."""
    _run_nvcc(nvcc_command(Path(output), arch=arch, shared=False, host=host, source=source))
    return Path(output)


def tile_m(M: int) -> int:
    """Rows of A per block: the smallest of 1, 2, 4, 8 that is >= M (8 for larger M), as in the launcher."""
    return next((t for t in TILE_MS if M <= t), TILE_MS[-1])


def grid(M: int, N: int) -> tuple[int, int]:
    """The launcher's grid: (column blocks of WARPS * ROWS_PER_WARP outputs, row tiles of tile_m(M))."""
    rows = WARPS * ROWS_PER_WARP
    return (-(-N // rows), -(-M // tile_m(M)))


def _check(M: int, N: int, K: int, bits: int, group_size: int) -> None:
    if bits not in (2, 3, 4, 8) or group_size not in (32, 64, 128) or M < 0 or N < 1 or K < 1:
        raise ValueError(f"MatMulLowBit CUDA: unsupported M={M} N={N} K={K} bits={bits} group_size={group_size}")


class LowBitLibrary:
    """The compiled shared library, called through ctypes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        fn = getattr(self._lib, LAUNCHER)
        p, i = ctypes.c_void_p, ctypes.c_int
        fn.argtypes = [p, p, p, p, p, i, i, i, i, i, p]
        fn.restype = i
        self._fn = fn
        self._lib.edgekit_cuda_error_string.argtypes = [i]
        self._lib.edgekit_cuda_error_string.restype = ctypes.c_char_p
        self._set_path = getattr(self._lib, "edgekit_matmul_lowbit_set_path", None)
        self._last_path = getattr(self._lib, "edgekit_matmul_lowbit_last_path", None)
        for f, args in ((self._set_path, [i]), (self._last_path, [])):
            if f is not None:
                f.argtypes, f.restype = args, i

    def set_path(self, mode: int) -> int:
        """Select the kernel for later calls (``LOWBIT_PATH_*``); returns the previous mode."""
        if self._set_path is None:
            raise RuntimeError(f"{self.path} has no edgekit_matmul_lowbit_set_path (built from an older source)")
        prev = self._set_path(int(mode))
        if prev < 0:
            raise ValueError(f"MatMulLowBit CUDA: unknown path mode {mode}")
        return prev

    def last_path(self) -> int:
        """The path of the last successful launch: 1 the CUDA-core kernel, 2 the tensor-core kernel (0: none yet)."""
        return int(self._last_path()) if self._last_path is not None else 0

    def matmul(
        self,
        A: int,
        B_packed: int,
        scales: int,
        zero_points: int | None,
        Y: int,
        *,
        M: int,
        N: int,
        K: int,
        bits: int,
        group_size: int,
        stream: int = 0,
    ) -> None:
        """Enqueue ``Y = A @ dequant(B).T`` on ``stream``; device pointers as ints, ``zero_points`` may be None."""
        _check(M, N, K, bits, group_size)
        rc = self._fn(A, B_packed, scales, zero_points or None, Y, M, N, K, bits, group_size, stream or None)
        if rc != 0:
            raise RuntimeError(f"{LAUNCHER} failed: {self._lib.edgekit_cuda_error_string(rc).decode()} ({rc})")


class CupyLowBit:
    """The same kernels compiled by NVRTC through ``cupy.RawModule``; launched with CuPy on a given stream."""

    def __init__(self, arch: str | None = None) -> None:
        import cupy

        self._cupy = cupy
        names = [f"edgekit::matmul_lowbit_f32<{b}, {t}>" for b in (2, 3, 4, 8) for t in TILE_MS]
        options = ["-std=c++17", "-DEDGEKIT_NO_HOST"] + ([f"--gpu-architecture={arch}"] if arch else [])
        self._module = cupy.RawModule(code=SOURCE.read_text(), options=tuple(options), name_expressions=names)
        self._kernels = {
            (b, t): self._module.get_function(f"edgekit::matmul_lowbit_f32<{b}, {t}>")
            for b in (2, 3, 4, 8)
            for t in TILE_MS
        }

    def matmul(
        self,
        A: int,
        B_packed: int,
        scales: int,
        zero_points: int | None,
        Y: int,
        *,
        M: int,
        N: int,
        K: int,
        bits: int,
        group_size: int,
        stream: int = 0,
    ) -> None:
        """Same contract as ``LowBitLibrary.matmul``."""
        _check(M, N, K, bits, group_size)
        if M == 0:
            return
        kernel = self._kernels[(bits, tile_m(M))]
        ptr = np.uint64
        args = (
            ptr(A),
            ptr(B_packed),
            ptr(scales),
            ptr(zero_points or 0),
            ptr(Y),
            np.int32(M),
            np.int32(N),
            np.int32(K),
            np.int32(group_size),
        )
        with self._cupy.cuda.ExternalStream(stream):
            kernel(grid(M, N), (THREADS,), args)


# ---- MatMulSparse24 and AttentionInt8 (matmul_sparse24.cu, attention_int8.cu) ----

SPARSE24_BN = 32  # output rows per block (kBN in matmul_sparse24.cu)
# The tiled sm_80+ path (matmul_sparse24_tiled.cuh): (BN weight rows, BM tokens) per config number, and the
# launcher's path modes (edgekit_matmul_sparse24_set_path; default from $EDGEKIT_SP24_PATH: auto, old, tiled,
# tiled0..tiled3). last_path(): 1 the reference kernel, 10 + c tiled config c.
SPARSE24_TILED_CONFIGS = ((128, 128), (128, 64), (64, 64), (64, 32))
SPARSE24_PATH_AUTO, SPARSE24_PATH_REFERENCE, SPARSE24_PATH_TILED, SPARSE24_PATH_TILED_CONFIG0 = 0, 1, 2, 10


def sparse24_tile_m(M: int) -> int:
    """Tokens per block of the MatMulSparse24 launcher: 8, 16, 32 or 64 (8 * tile_mt in the source)."""
    return 8 * next((t for t in (1, 2, 4) if M <= 8 * t), 8)


def sparse24_grid(M: int, N: int) -> tuple[int, int]:
    return (-(-N // SPARSE24_BN), -(-M // sparse24_tile_m(M)))


class _Library:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        self._lib.edgekit_cuda_error_string.argtypes = [ctypes.c_int]
        self._lib.edgekit_cuda_error_string.restype = ctypes.c_char_p

    def _fn(self, name: str, argtypes: list) -> object:
        fn = getattr(self._lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn

    def _check(self, name: str, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"{name} failed: {self._lib.edgekit_cuda_error_string(rc).decode()} ({rc})")


class Sparse24Library(_Library):
    """``matmul_sparse24.cu`` compiled as a shared library; device pointers and streams as ints."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self._f16 = self._fn("edgekit_matmul_sparse24_f16", [p, p, p, p, i, i, i, p])
        self._s8 = self._fn("edgekit_matmul_sparse24_s8", [p, p, p, p, p, f, i, p, i, i, i, p])
        self._probe = self._fn("edgekit_mma_sp_probe", [i, p, p, p, p, i, p])
        self._set_path = self._fn("edgekit_matmul_sparse24_set_path", [i])
        self._last_path = self._fn("edgekit_matmul_sparse24_last_path", [])

    def set_path(self, mode: int) -> int:
        """Select the kernel for later calls (``SPARSE24_PATH_*``; ``SPARSE24_PATH_TILED_CONFIG0 + c`` forces tiled
        config c where the shape qualifies); returns the previous mode."""
        prev = self._set_path(int(mode))
        if prev < 0:
            raise ValueError(f"MatMulSparse24 CUDA: unknown path mode {mode}")
        return prev

    def last_path(self) -> int:
        """The path of the last successful launch: 1 the reference kernel, 10 + c tiled config c."""
        return int(self._last_path())

    def matmul_f16(self, X: int, values: int, indices: int, Y: int, *, M: int, N: int, K: int, stream: int = 0):
        """Y fp16 [M, N] = X fp16 [M, K] @ W.T (fp16 values [N, K/2], indices [N, ceil(K/8)])."""
        if K % 4 or K <= 0 or N <= 0 or M < 0:
            raise ValueError(f"MatMulSparse24 CUDA: unsupported M={M} N={N} K={K} (K must be a multiple of 4)")
        self._check("edgekit_matmul_sparse24_f16", self._f16(X, values, indices, Y, M, N, K, stream or None))

    def matmul_s8(
        self,
        X: int,
        values: int,
        indices: int,
        w_scale: int,
        w_rowsum: int | None,
        Y: int,
        *,
        a_scale: float,
        a_zero_point: int,
        M: int,
        N: int,
        K: int,
        stream: int = 0,
    ):
        """Y fp32 [M, N] = a_scale * w_scale[n] * ((X_u8 - a_zp) @ q.T) (int8 values; w_rowsum int32 [N])."""
        if K % 4 or K <= 0 or N <= 0 or M < 0 or not 0 <= a_zero_point <= 255:
            raise ValueError(f"MatMulSparse24 CUDA int8: unsupported M={M} N={N} K={K} a_zero_point={a_zero_point}")
        rc = self._s8(X, values, indices, w_scale, w_rowsum or None, a_scale, a_zero_point, Y, M, N, K, stream or None)
        self._check("edgekit_matmul_sparse24_s8", rc)

    def probe(self, kind: str, A: int, B: int, E: int, D: int, count: int = 1, stream: int = 0) -> None:
        """``count`` independent raw mma.sp (``mma_layout``'s kinds ``f16`` / ``s8``) on per-lane registers (device
        uint32 arrays A, B [count, 32, 4], E [count, 32] -> D [count, 32, 4])."""
        if not 1 <= count <= 65535:
            raise ValueError(f"probe: count={count} must be in 1..65535")
        rc = self._probe({"f16": 0, "s8": 1}[kind], A, B, E, D, count, stream or None)
        self._check("edgekit_mma_sp_probe", rc)


# AttentionInt8 paths (edgekit_attention_int8_set_path; default from $EDGEKIT_ATTN_PATH: auto, old, mma): auto and
# mma take the tensor-core kernel (attention_int8_d64_mma) wherever it can run (sm_80+ device and build), old the
# CUDA-core kernel. last_path(): 1 the CUDA-core kernel, 2 the tensor-core kernel. ATTN_MMA_ROWS queries per block.
ATTN_PATH_AUTO, ATTN_PATH_OLD, ATTN_PATH_MMA = 0, 1, 2
ATTN_MMA_ROWS = 64


class AttentionLibrary(_Library):
    """``attention_int8.cu`` compiled as a shared library."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self._attn = self._fn("edgekit_attention_int8_d64", [p, p, p, p, p, p, p, i, i, i, i, i, f, p])
        self._set_path = self._fn("edgekit_attention_int8_set_path", [i])
        self._last_path = self._fn("edgekit_attention_int8_last_path", [])

    def set_path(self, mode: int) -> int:
        """Select the kernel for later calls (``ATTN_PATH_*``); returns the previous mode."""
        prev = self._set_path(int(mode))
        if prev < 0:
            raise ValueError(f"AttentionInt8 CUDA: unknown path mode {mode}")
        return prev

    def last_path(self) -> int:
        """The path of the last successful launch: 1 the CUDA-core kernel, 2 the tensor-core kernel."""
        return int(self._last_path())

    def attention(
        self,
        Q8: int,
        q_scale: int,
        K8: int,
        k_scale: int,
        k_bias: int | None,
        V: int,
        O: int,
        *,
        BH: int,
        S: int,
        Skv: int,
        q_block: int,
        k_block: int,
        sm_scale: float,
        stream: int = 0,
    ) -> None:
        """O fp16 [BH, S, 64] = AttentionInt8 of the quantized inputs (``attention.quantize``'s outputs)."""
        if min(BH, S, Skv, q_block, k_block) <= 0:
            raise ValueError(f"AttentionInt8 CUDA: unsupported BH={BH} S={S} Skv={Skv} q_block={q_block}")
        rc = self._attn(
            Q8, q_scale, K8, k_scale, k_bias or None, V, O, BH, S, Skv, q_block, k_block, sm_scale, stream or None
        )
        self._check("edgekit_attention_int8_d64", rc)
