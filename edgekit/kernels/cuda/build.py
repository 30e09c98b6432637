"""Compile and load the MatMulLowBit CUDA kernel (``matmul_lowbit.cu``).

Two ways, same source:

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
LAUNCHER = "edgekit_matmul_lowbit_f32"
# Mirrors the constants of matmul_lowbit.cu.
WARPS = 8
ROWS_PER_WARP = 2
THREADS = WARPS * 32
TILE_MS = (1, 2, 4, 8)


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda; None when there is none."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def nvcc_command(output: Path, *, arch: str = "sm_90", shared: bool = True, host: bool = True) -> list[str]:
    """The nvcc command line: a shared library (``shared``) or an object file; ``host=False`` drops the launcher."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    cmd = [nvcc, "-O3", f"-arch={arch}", "-std=c++17"]
    cmd += ["-shared", "-Xcompiler", "-fPIC"] if shared else ["-c"]
    if not host:
        cmd.append("-DEDGEKIT_NO_HOST")
    return [*cmd, "-o", str(output), str(SOURCE)]


def _run_nvcc(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")


def compile_shared(out_dir: Path, *, arch: str = "sm_90") -> Path:
    """Build ``libedgekit_lowbit_<arch>.so`` in ``out_dir`` (written to a temporary name, then renamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"libedgekit_lowbit_{arch}.so"
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        _run_nvcc(nvcc_command(Path(tmp), arch=arch, shared=True))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def compile_object(output: Path, *, arch: str = "sm_90", host: bool = True) -> Path:
    """Compile to an object file only (``nvcc -c``): the check that the source builds, no GPU needed."""
    _run_nvcc(nvcc_command(Path(output), arch=arch, shared=False, host=host))
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
