"""benchmarks/kernels.py --quick: runs in seconds on tiny shapes, prints a table that parses, writes JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.kernels import ort_native

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_prints_a_parsable_table(tmp_path):
    pytest.importorskip("onnxruntime")
    if ort_native.library_path() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build the native library (python runtimes/onnxruntime/build.py)")
        pytest.skip("libedgekit_ort.so is not built (python runtimes/onnxruntime/build.py)")
    out = tmp_path / "kernels.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("K=N"))
    rows = []
    for line in lines[header + 1 :]:
        if line.startswith("#"):
            break
        k, batch, name, layers, us, vs_fp32, _nb, gbs, pct, gops = line.split()
        rows.append((int(k), int(batch), name, float(us), float(vs_fp32)))
    names = {r[2] for r in rows}
    assert {"ort_fp32_matmul", "ort_matmulnbits4_b128_acc4", "ort_matmulinteger_u8s8"} <= names
    assert {"edgekit_lowbit2_g128_acc4", "edgekit_lowbit4_g32_acc0", "edgekit_sparse24_int8"} <= names
    assert {r[1] for r in rows} == {1, 4} and all(r[3] > 0 for r in rows)
    assert any(line.startswith(("MET", "MISS")) for line in lines)
    data = json.loads(out.read_text())
    assert data["info"]["bandwidth_gbs"] > 0 and len(data["rows"]) == len(rows)
    # the reference is the probe interleaved with the timings (default), reported beside the start/end reads
    info = data["info"]
    assert info["bandwidth_reference"] == "interleaved" and info["bandwidth_gbs"] == info["bandwidth_gbs_interleaved"]
    assert all(b > 0 for b in info["bandwidth_gbs_start_end"])
    assert {"target", "ratio", "need", "met"} <= set(data["targets"][0])
