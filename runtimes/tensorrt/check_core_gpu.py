#!/usr/bin/env python3
"""The TensorRT plugin core on a GPU, without TensorRT: every op through ``edgekit_trt_core_run`` (the C shim that
drives the core as the wrappers do: deserialize the fields, infer the output shape, check each type/format position,
size the workspace, enqueue), against the numpy references of ``edgekit/kernels``.

Run from the repository root on a machine with an NVIDIA GPU, torch (CUDA), numpy and nvcc::

    OUT=/some/dir python3 runtimes/tensorrt/check_core_gpu.py

Builds the core, the shim and the three kernel sources for the local compute capability (nvcc in parallel), then
checks, with the inputs in the form ``edgekit.export.trt_plugins.to_tensorrt_nodes`` gives TensorRT (packed bytes as
int8, sparse values fp16), fp32 and fp16 activations:
- MatMulLowBit (2/3/4/8 bits, groups 32/128, with and without zero points, M = 1, 5, 33; K not a multiple of the
  group): ``|Y - ref| <= 1e-3 * max|ref| + 1e-3 * |ref|`` (fp32 I/O), 4e-3 for fp16 I/O (ref on fp16-rounded A);
- MatMulSparse24 float variant: ``2e-3 * max|ref| + 2e-3 * |ref|`` (the kernel is fp16), ref on fp16-rounded A;
- AttentionInt8: ``|O - ref| <= 4e-3 + 1e-2 |ref|`` against ``attention.attention_int8`` (the numpy op end to end,
  so this covers the on-GPU smoothing and quantization) and cosine >= 0.999 per row against exact attention;
- refusals: a wrong K and an unsupported input type come back as errors, not launches.
Writes ``$OUT/check_core_gpu.json``; exits 1 on any failure. Without torch or a GPU it says so and exits 0.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edgekit.kernels import attention, lowbit, sparse24  # noqa: E402  (numpy only)

HERE = Path(__file__).resolve().parent
KERNELS = ROOT / "edgekit" / "kernels" / "cuda"
FLOAT, HALF, INT8 = 0, 1, 2


def build(out_dir: Path, arch: str) -> Path:
    nvcc = os.environ.get("NVCC", "nvcc")
    jobs = []
    for stem in ("matmul_lowbit", "matmul_sparse24", "attention_int8"):
        jobs.append([nvcc, "-O3", "-std=c++17", f"-arch={arch}", "-Xcompiler", "-fPIC",
                     f"-Dedgekit_cuda_error_string=edgekit_cuda_error_string_{stem}", "-c", str(KERNELS / f"{stem}.cu"),
                     "-o", str(out_dir / f"{stem}.o")])
    for src in ("edgekit_trt_enqueue.cu", "edgekit_trt_core.cpp", "edgekit_trt_shim.cpp"):
        jobs.append([nvcc, "-O3", "-std=c++17", f"-arch={arch}", "-Xcompiler", "-fPIC", "-c", str(HERE / src),
                     "-o", str(out_dir / f"{src}.o")])
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        for cmd, proc in zip(jobs, pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), jobs)):
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    lib = out_dir / "libedgekit_trt_core.so"
    objs = [str(p) for p in out_dir.glob("*.o")]
    subprocess.run([nvcc, "-shared", f"-arch={arch}", *objs, "-o", str(lib), "-lcudart"], check=True)
    return lib


class Core:
    def __init__(self, path: Path, torch) -> None:
        self.torch = torch
        self.lib = ctypes.CDLL(str(path))
        p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        self.lib.edgekit_trt_core_run.argtypes = [ctypes.c_char_p, p, sz, i, p, p, p, p, p, p, sz, p, p, p, p,
                                                  ctypes.c_char_p, sz]
        self.lib.edgekit_trt_core_run.restype = i
        self.lib.edgekit_trt_core_state.argtypes = [ctypes.c_char_p, i, p, p, p, p, sz, ctypes.c_char_p, sz]
        self.lib.edgekit_trt_core_state.restype = sz

    def state(self, op: str, fields: dict) -> bytes:
        names = (ctypes.c_char_p * len(fields))(*[k.encode() for k in fields])
        is_float = (ctypes.c_int * len(fields))(*[isinstance(v, float) for v in fields.values()])
        vals = [ctypes.c_float(v) if isinstance(v, float) else ctypes.c_int32(v) for v in fields.values()]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        buf, err = ctypes.create_string_buffer(256), ctypes.create_string_buffer(512)
        n = self.lib.edgekit_trt_core_state(op.encode(), len(fields), names, is_float, ptrs, buf, 256, err, 512)
        if n == 0:
            raise ValueError(err.value.decode())
        return buf.raw[:n]

    def run(self, op: str, fields: dict, inputs: list):
        """Output tensor of the op on torch CUDA ``inputs``; raises ValueError with the core's message."""
        torch = self.torch
        state = self.state(op, fields)
        n = len(inputs)
        tmap = {torch.float32: FLOAT, torch.float16: HALF, torch.int8: INT8}
        types = (ctypes.c_int * n)(*[tmap[t.dtype] for t in inputs])
        ranks = (ctypes.c_int * n)(*[t.dim() for t in inputs])
        dims = (ctypes.c_longlong * (8 * n))()
        for i, t in enumerate(inputs):
            for a, d in enumerate(t.shape):
                dims[8 * i + a] = d
        out_dims, out_rank, ws = (ctypes.c_longlong * 8)(), ctypes.c_int(), ctypes.c_size_t()
        err = ctypes.create_string_buffer(1024)
        args = [op.encode(), state, len(state), n, types, ranks, dims]
        rc = self.lib.edgekit_trt_core_run(*args, None, None, None, 0, None, out_dims, ctypes.byref(out_rank),
                                           ctypes.byref(ws), err, 1024)
        if rc:
            raise ValueError(err.value.decode())
        shape = [out_dims[a] for a in range(out_rank.value)]
        out = torch.empty(shape, dtype=inputs[0].dtype, device="cuda")
        work = torch.empty(max(ws.value, 1), dtype=torch.uint8, device="cuda")
        ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in inputs])
        stream = torch.cuda.current_stream().cuda_stream
        rc = self.lib.edgekit_trt_core_run(*args, ptrs, out.data_ptr(), work.data_ptr(), ws.value, stream, out_dims,
                                           ctypes.byref(out_rank), ctypes.byref(ws), err, 1024)
        torch.cuda.synchronize()
        if rc:
            raise ValueError(err.value.decode())
        return out


def close(y: np.ndarray, ref: np.ndarray, rtol: float, atol_rel: float) -> tuple[bool, float]:
    excess = np.abs(y.astype(np.float64) - ref) - (atol_rel * np.abs(ref).max() + rtol * np.abs(ref))
    return bool((excess <= 0).all()), float(np.abs(y.astype(np.float64) - ref).max())


def check_lowbit(core: Core, torch, rng) -> list[dict]:
    out = []
    K, N = 300, 70
    for bits in (2, 3, 4, 8):
        for gs, sym in ((32, False), (128, True)):
            W = rng.standard_normal((N, K)).astype(np.float32)
            packed, scales, zp = lowbit.quantize_rtn(W, bits, gs, symmetric=sym)
            for M in (1, 5, 33):
                for dt in (torch.float32, torch.float16):
                    A = rng.standard_normal((M, K)).astype(np.float32)
                    if dt == torch.float16:
                        A = A.astype(np.float16).astype(np.float32)
                    ref = lowbit.reference_matmul(A, packed, scales, zp, bits=bits, group_size=gs, K=K, N=N)
                    ins = [torch.from_numpy(A).to("cuda", dt), torch.from_numpy(packed.view(np.int8)).cuda(),
                           torch.from_numpy(scales).cuda()]
                    if zp is not None:
                        ins.append(torch.from_numpy(zp.view(np.int8)).cuda())
                    y = core.run("EdgekitMatMulLowBit", {"K": K, "N": N, "bits": bits, "group_size": gs}, ins)
                    tol = 1e-3 if dt == torch.float32 else 4e-3
                    ok, err = close(y.float().cpu().numpy(), ref, tol, tol)
                    out.append({"op": "MatMulLowBit", "bits": bits, "group": gs, "zp": zp is not None, "M": M,
                                "dtype": str(dt), "ok": ok, "max_abs_err": err})
    return out


def check_sparse24(core: Core, torch, rng) -> list[dict]:
    out = []
    K, N = 264, 72
    w = sparse24.random_2of4(rng, N, K).astype(np.float16)
    values, indices = sparse24.pack(w)
    for M in (1, 17, 64):
        for dt in (torch.float32, torch.float16):
            A = rng.standard_normal((M, K)).astype(np.float16).astype(np.float32)
            ref = sparse24.reference_matmul(A, values.astype(np.float32), indices, K=K, N=N).astype(np.float64)
            ins = [torch.from_numpy(A).to("cuda", dt), torch.from_numpy(values).cuda(),
                   torch.from_numpy(indices.view(np.int8)).cuda()]
            y = core.run("EdgekitMatMulSparse24", {"K": K, "N": N}, ins)
            ok, err = close(y.float().cpu().numpy(), ref, 2e-3, 2e-3)
            out.append({"op": "MatMulSparse24", "M": M, "dtype": str(dt), "ok": ok, "max_abs_err": err})
    return out


def check_attention(core: Core, torch, rng) -> list[dict]:
    out = []
    cases = [(2, 3, 100, 77, 1, 64, 1), (1, 2, 128, 128, 32, 16, 0), (1, 1, 5, 300, 1, 64, 1)]
    for B, H, S, Skv, qb, kb, smooth in cases:
        for dt in (torch.float32, torch.float16):
            q = rng.standard_normal((B, H, S, 64)).astype(np.float32)
            k = (rng.standard_normal((B, H, Skv, 64)) + 3.0 * rng.standard_normal(64)).astype(np.float32)  # offsets
            v = rng.standard_normal((B, H, Skv, 64)).astype(np.float32)
            if dt == torch.float16:
                q, k, v = (x.astype(np.float16).astype(np.float32) for x in (q, k, v))
            ref = attention.attention_int8(q, k, v, q_block=qb, k_block=kb, smooth_q=bool(smooth)).astype(np.float64)
            exact = attention.reference_exact(q, k, v)
            fields = {"q_block": qb, "k_block": kb, "smooth_q": smooth, "sm_scale": 0.125}
            ins = [torch.from_numpy(x).to("cuda", dt) for x in (q, k, v)]
            y = core.run("EdgekitAttentionInt8", fields, ins).float().cpu().numpy()
            err = np.abs(y - ref)
            ok = bool((err <= 4e-3 + 1e-2 * np.abs(ref)).all())
            cos = float(attention.cosine_per_row(y, exact).min())
            out.append({"op": "AttentionInt8", "shape": [B, H, S, Skv], "q_block": qb, "k_block": kb,
                        "smooth_q": smooth, "dtype": str(dt), "ok": ok and cos >= 0.999,
                        "max_abs_err": float(err.max()), "min_cosine_vs_exact": cos})
    return out


def check_refusals(core: Core, torch) -> list[dict]:
    out = []
    a = torch.zeros((2, 64), device="cuda")
    b = torch.zeros((8, 32), dtype=torch.int8, device="cuda")
    s = torch.zeros((8, 2), device="cuda")
    b_float = torch.zeros((8, 32), device="cuda")
    for name, fields, ins, want in [
        ("wrong K", {"K": 100, "N": 8, "bits": 4, "group_size": 32}, [a, b, s], "dimension 1 must be 100"),
        ("uint8-as-float packed", {"K": 64, "N": 8, "bits": 4, "group_size": 32}, [a, b_float, s], "unsupported type"),
    ]:
        try:
            core.run("EdgekitMatMulLowBit", fields, ins)
            out.append({"op": "refusal", "case": name, "ok": False, "error": None})
        except ValueError as e:
            out.append({"op": "refusal", "case": name, "ok": want in str(e), "error": str(e)})
    return out


def main() -> int:
    out_dir = Path(os.environ.get("OUT", tempfile.mkdtemp()))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to check")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    major, minor = torch.cuda.get_device_capability()
    report = {"device": torch.cuda.get_device_name(), "sm": f"{major}{minor}", "results": [], "errors": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            core = Core(build(Path(tmp), f"sm_{major}{minor}"), torch)
            rng = np.random.default_rng(0)
            for check in (check_lowbit, check_sparse24, check_attention):
                try:
                    report["results"] += check(core, torch, rng)
                except Exception:
                    report["errors"].append(traceback.format_exc())
            report["results"] += check_refusals(core, torch)
    except Exception:
        report["errors"].append(traceback.format_exc())
    bad = [r for r in report["results"] if not r["ok"]]
    (out_dir / "check_core_gpu.json").write_text(json.dumps(report, indent=1, default=float))
    by_op: dict[str, list] = {}
    for r in report["results"]:
        by_op.setdefault(r["op"], []).append(r)
    print(f"device: {report['device']} (sm_{report['sm']})")
    for op, rows in by_op.items():
        worst = max((r.get("max_abs_err", 0.0) for r in rows), default=0.0)
        cos = min((r.get("min_cosine_vs_exact", math.inf) for r in rows), default=math.inf)
        extra = f", min cosine vs exact {cos:.5f}" if math.isfinite(cos) else ""
        print(f"{op}: {sum(r['ok'] for r in rows)}/{len(rows)} ok, max abs err {worst:.3g}{extra}")
    for r in bad:
        print("FAIL", r)
    for e in report["errors"]:
        print("ERROR", e)
    return 1 if bad or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
