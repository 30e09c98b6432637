"""The MatMulLowBit CUDA source compiles (nvcc, no GPU needed); the Python launch geometry matches the launcher."""

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
