#!/usr/bin/env python3
"""Every edgekit CUDA kernel on the local GPU: build, check against the numpy references, benchmark.

Run from the repository root on a machine with an NVIDIA GPU, torch (CUDA) and nvcc (numpy, torch and the
standard library only; the repository root is put on ``sys.path``)::

    OUT=/some/dir python3 runtimes/cuda/check_gpu.py [--skip-bench] [--budget-s 140]

1. Build: ``matmul_lowbit.cu``, ``matmul_sparse24.cu``, ``attention_int8.cu`` with nvcc for the local compute
   capability (in parallel), plus ``matmul_sparse24.cu`` as ``compute_75`` PTX, which the driver JIT-compiles with
   ``__CUDA_ARCH__ = 750``: the CUDA-core fallback path (the one sm_72/sm_75 run) checked on this GPU.
2. ``mma.sp`` probe: 64 raw instructions per kind (f16 m16n8k32, s8 x u8 m16n8k64) on random registers, compared
   with ``edgekit/kernels/cuda/mma_layout.emulate``; then every register element's destination measured with
   batched one-hot probes, each operand on its own (``infer_b_map``: B alone; ``infer_a_map``: A against B;
   ``infer_metadata_map``: the metadata nibbles) and compared with the model (mismatches listed in the JSON).
3. Correctness (tolerances below, all against the numpy references of ``edgekit/kernels``):
   - MatMulLowBit, the CUDA-core kernel forced (``set_path(old)``): a subset of ``benchmarks/gpu_kernels.py``'s
     cases, its own tolerance (rtol 1e-3, atol 1e-3 max).
   - MatMulLowBit, the sm_80+ tensor-core path forced (``set_path(mma)``): ``LOWBIT_MMA_SHAPES`` x bits x groups
     32/128 x zero points x M = 8, 16, 37, 128: ``|Y - ref16| <= 2e-5 * (max|ref16| + |ref16|)``, ref16 = the op on
     the fp16-rounded activations in fp64 (the error against the fp32-activation reference is reported); then the
     automatic choice (M = 7 old, M = 8 mma) and a ``compute_75`` build, where forcing mma must run the old kernel.
   - MatMulSparse24 f16 (tensor cores, and the fallback): ``|Y - ref| <= 2e-3 * max|ref| + 2e-3 * |ref|``,
     ``ref = sparse24.reference_matmul`` on the fp16-rounded inputs (the kernel rounds Y to fp16 once).
   - MatMulSparse24 int8 (u8 activations with a zero point): rtol 1e-5, atol 1e-5 * max|ref| (exact int32 sums).
   - Both run twice: the reference kernel forced (``set_path(old)``), then the tiled sm_80+ path forced
     (``matmul_sparse24_tiled.cuh``; shapes it does not take, K % 64 (f16) / 128 (int8) != 0, run the reference
     and are marked ``path 1``; a qualifying shape that did not run tiled fails), with extra tiled-friendly shapes
     (N and M tails) and every tiled config (128x128, 128x64, 64x64, 64x32) forced on two of them.
   - AttentionInt8, both kernels (the CUDA-core one and the sm_80+ tensor-core one, each forced with
     ``set_path``; ``last_path`` must say which ran): ``|O - ref| <= 4e-3 + 1e-2 |ref|`` against
     ``attention.reference_quantized`` on the same quantized inputs; cosine >= 0.999 per row against exact fp64
     attention. A compute_75 PTX build with the tensor-core path forced must fall back to the CUDA-core kernel.
4. Benchmarks (CUDA events, median of samples, each batch queued behind a GPU sleep; weights rotated through
   copies exceeding 4x L2): MatMulLowBit 4- and 2-bit g128, tensor-core path vs the CUDA-core kernel vs torch fp16
   matmul, M = 16, 32, 128, 512 on 4096x4096 and 8192x8192; MatMulSparse24 f16 / int8 vs dense torch fp16 matmul
   and ``torch._int_mm``, M = 32, 128, 512 on 4096x4096 and 8192x8192, each for the reference kernel, the tiled
   path (automatic config) and every tiled config; AttentionInt8 (both kernels) vs
   ``scaled_dot_product_attention`` fp16.

Every section runs in its own try/except; progress is printed with flush. Writes ``$OUT/check_gpu.json`` and
``$OUT/check_gpu.md`` (a summary for ``benchmarks/RESULTS_GPU.md``); exits 1 on any correctness or build failure.
A watchdog writes what it has and exits 1 after ``--budget-s`` seconds. Without torch or a CUDA device it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edgekit.kernels import attention, lowbit, sparse24  # noqa: E402  (numpy only)
from edgekit.kernels.cuda import build, mma_layout  # noqa: E402


def _load_gpu_kernels():
    """``benchmarks/gpu_kernels.py`` (not a package): its timing, environment and MatMulLowBit check helpers."""
    spec = importlib.util.spec_from_file_location("edgekit_gpu_kernels", ROOT / "benchmarks" / "gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gk = _load_gpu_kernels()

SP24_CHECK = [(100, 33), (260, 72), (1000, 130), (4096, 4096)]  # (K, N); K % 4 == 0, off the tiles
SP24_MS = (1, 16, 128)
SP24_EXTRA = [(1000, 130, 5), (260, 72, 37), (4100, 96, 64)]  # (K, N, M)
SP24_TILED_EXTRA = [(256, 72, 37), (640, 200, 130), (128, 33, 1), (1024, 130, 300), (2048, 520, 257)]  # K % 128 == 0
SP24_TILED_SWEEP = [(256, 72, 37), (640, 200, 130)]  # every tiled config forced
ATTN_CHECK = [(1, 1, 128, 128, 1), (2, 4, 512, 512, 1), (1, 2, 200, 77, 32), (1, 3, 512, 512, 32)]  # B H S Skv qb
BENCH_SHAPES = [(4096, 4096), (8192, 8192)]
BENCH_MS = (32, 128, 512)
ATTN_BENCH = [(1, 16, 512), (8, 16, 512), (1, 16, 2048)]  # B, H, S (Skv = S, D = 64)
LOWBIT_CASES = [(384, 1536), (4096, 4096)]
# The tensor-core path (matmul_lowbit_mma): (K, N) shapes off every tile (N % 32, K % 128, K % group), token counts
# M off the 16 / 32 / 64 token tiles; every bits x group (32, 128) x zero points (given / symmetric), except that
# the 4096 x 4096 shape takes one set per bits (numpy time): group 32 with zero points for 2 and 4 bits, group 128
# symmetric for 3 and 8.
LOWBIT_MMA_SHAPES = [(384, 384), (1000, 130), (4096, 4096), (4160, 100)]
LOWBIT_MMA_MS = (8, 16, 37, 128)
# |Y - ref16| <= LOWBIT_MMA_TOL * (max|ref16| + |ref16|), ref16 = the op on the fp16-rounded activations (fp64
# numpy). The kernel's integer codes (q - zp) are exact in fp16 and the scales are applied in fp32 per 32 values,
# so only fp32 accumulation (tensor-core adds, then FFMA) separates it from ref16.
LOWBIT_MMA_TOL = 2e-5
LOWBIT_BENCH_MS = (16, 32, 128, 512)
LOWBIT_BENCH_BITS = (4, 2)
LOWBIT_BENCH_GROUP = 128

RESULT: dict = {"status": "running", "sections": {}, "failures": []}
_lock = threading.Lock()


def log(*args) -> None:
    print(*args, flush=True)


def out_dir() -> Path | None:
    out = os.environ.get("OUT")
    return Path(out) if out else None


def write_outputs() -> None:
    with _lock:
        out = out_dir()
        md = markdown(RESULT)
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "check_gpu.json").write_text(json.dumps(RESULT, indent=2, default=str))
        (out / "check_gpu.md").write_text(md)


def fail(section: str, what: str) -> None:
    RESULT["failures"].append(f"{section}: {what}")
    log(f"FAIL {section}: {what}")


def section(name: str):
    """Decorator: run a section, record its result or its exception; never raises."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            log(f"== {name}")
            try:
                value = fn(*args, **kwargs)
                RESULT["sections"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), "result": value}
                return value
            except Exception as e:  # noqa: BLE001 - one failed section must not hide the others
                traceback.print_exc()
                RESULT["sections"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                fail(name, f"{type(e).__name__}: {e}")
                return None
            finally:
                write_outputs()

        return run

    return wrap


# ------------------------------------------------------------------------------------------------- build


@section("build")
def build_all(torch) -> dict:
    p = torch.cuda.get_device_properties(0)
    arch = f"sm_{p.major}{p.minor}"
    tmp = Path(tempfile.mkdtemp(prefix="edgekit-check-gpu-"))
    jobs = {
        "lowbit": ("matmul_lowbit", arch),
        "sparse24": ("matmul_sparse24", arch),
        "attention": ("attention_int8", arch),
        "sparse24_fallback": ("matmul_sparse24", "compute_75"),
        "lowbit_fallback": ("matmul_lowbit", "compute_75"),
        "attention_fallback": ("attention_int8", "compute_75"),
    }
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {
            key: pool.submit(build.compile_shared, tmp / key, arch=a, source=src) for key, (src, a) in jobs.items()
        }
        paths = {}
        for key, fut in futures.items():
            try:
                paths[key] = fut.result(timeout=300)
            except Exception as e:  # noqa: BLE001
                fail("build", f"{key}: {type(e).__name__}: {str(e)[-2000:]}")
    libs = {}
    for key, path in paths.items():
        try:
            if key.startswith("lowbit"):
                libs[key] = build.LowBitLibrary(path)
            elif key.startswith("sparse24"):
                libs[key] = build.Sparse24Library(path)
            else:
                libs[key] = build.AttentionLibrary(path)
        except Exception as e:  # noqa: BLE001
            fail("build", f"load {key}: {type(e).__name__}: {e}")
    RESULT["libs"] = libs  # not serialized (default=str)
    log(f"built {sorted(libs)} for {arch} in {time.perf_counter() - t0:.1f}s")
    return {"arch": arch, "built": sorted(libs), "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------------- probe


def _probe_runner(torch, lib, kind):
    """run(A, B, E) -> D for any leading batch shape: all instructions in one launch (one warp each)."""

    def run(A, B, E):
        A, B, E = (np.asarray(x, dtype=np.uint32) for x in (A, B, E))
        batch = A.shape[:-2]
        n = int(np.prod(batch, dtype=np.int64))
        dev = [torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.int32)).cuda() for x in (A, B, E)]
        D = torch.zeros(n * 32 * 4, dtype=torch.int32, device="cuda")
        lib.probe(kind, dev[0].data_ptr(), dev[1].data_ptr(), dev[2].data_ptr(), D.data_ptr(), count=n)
        torch.cuda.synchronize()
        raw = D.cpu().numpy().reshape(batch + (32, 4))
        return raw.view(np.float32).astype(np.float64) if kind == "f16" else raw.astype(np.int64)

    return run


def _mismatches(measured, model, what: str, limit: int = 8) -> list[str]:
    """Readable first differences between two [32, 4, E, 2]-like maps (leading index = lane, reg, element)."""
    measured, model = np.asarray(measured), np.asarray(model)
    bad = np.argwhere((measured != model).any(axis=-1))
    return [f"{what}{tuple(int(i) for i in idx)}: device {measured[tuple(idx)].tolist()} "
            f"model {model[tuple(idx)].tolist()}" for idx in bad[:limit]]  # fmt: skip


def _probe_layouts(kind: str, run, entry: dict) -> bool:
    """Measure B, A and E layouts separately on the device (mma_layout.infer_*); record them in ``entry``."""
    ok = True
    b_map = mma_layout.infer_b_map(kind, run)  # [lane, reg, elem] -> (token, k % 4 class): B alone
    b_model = mma_layout.model_b_map(kind)
    entry["b_map_matches_model"] = bool((b_map == b_model).all())
    if not entry["b_map_matches_model"]:
        ok = False
        entry["b_map_mismatches"] = _mismatches(b_map, b_model, "B[lane, reg, byte]")
        entry["measured_b_map"] = b_map.tolist()
    a_map, consistent = mma_layout.infer_a_map(kind, run)  # [nibble, lane, reg, elem] -> (row, k of B it met)
    a_model = mma_layout.model_a_map(kind)
    entry["a_map_matches_model"] = bool((a_map == a_model).all())
    entry["a_b_tokens_consistent"] = bool(consistent.all())
    if not (entry["a_map_matches_model"] and entry["a_b_tokens_consistent"]):
        ok = False
        entry["a_map_mismatches"] = _mismatches(a_map, a_model, "A[uniform nibble #, lane, reg, elem] (row, k)")
        entry["a_inconsistent_count"] = int((~consistent).sum())
        entry["measured_a_map"] = a_map.tolist()
    e_map = mma_layout.infer_metadata_map(kind, run)  # [lane, nibble] -> (row, group)
    entry["metadata_map_matches_model"] = bool((e_map == mma_layout.e_coords(kind)).all())
    if not entry["metadata_map_matches_model"]:
        ok = False
        entry["metadata_map_mismatches"] = _mismatches(e_map, mma_layout.e_coords(kind), "E[lane, nibble] (row, group)")
        entry["measured_metadata_map"] = e_map.tolist()  # [lane][nibble] = (row, group)
    for key in ("b_map_matches_model", "a_map_matches_model", "a_b_tokens_consistent", "metadata_map_matches_model"):
        log(f"  {kind}: {key}: {entry[key]}")
    for key in ("b_map_mismatches", "a_map_mismatches", "metadata_map_mismatches"):
        for line in entry.get(key, [])[:4]:
            log(f"    {line}")
    return ok


@section("mma.sp probe")
def probe(torch, lib) -> dict:
    """Per kind: 64 random instructions against mma_layout.emulate, then each operand's layout measured on its own
    (B alone, A against B, the metadata nibbles), so a failure says which layout is wrong."""
    out = {}
    rng = np.random.default_rng(0)
    for kind in mma_layout.KINDS:
        run = _probe_runner(torch, lib, kind)
        K = mma_layout.MMA_K[kind]
        regs = []
        for trial in range(64):
            w = sparse24.random_2of4(rng, 16, K, full=trial % 2 == 0)
            if kind == "s8":
                w = np.clip(np.rint(w * 40), -127, 127).astype(np.int8)
                x = rng.integers(0, 256, size=(K, 8)).astype(np.uint8)
            else:
                w, x = w.astype(np.float16), rng.standard_normal((K, 8)).astype(np.float16)
            values, indices = sparse24.pack(w)
            regs.append(mma_layout.lane_registers(kind, values, sparse24.unpack_nibbles(indices, K), x))
        A, B, E = (np.stack(r) for r in zip(*regs))
        got, want = run(A, B, E), mma_layout.emulate(kind, A, B, E)
        err = float((np.abs(got - want).max(axis=(1, 2)) / np.maximum(np.abs(want).max(axis=(1, 2)), 1e-9)).max())
        ok = err < 1e-5
        entry = {"ok": ok, "max_rel_err": err}
        if not ok:
            fail("mma.sp probe", f"{kind}: device differs from mma_layout model (rel err {err:.2e})")
        log(f"  {kind}: random instructions {'ok' if ok else 'MISMATCH'} (max rel err {err:.1e})")
        try:
            if not _probe_layouts(kind, run, entry):
                fail("mma.sp probe", f"{kind}: a measured operand layout differs from mma_layout (see JSON)")
                entry["ok"] = False
        except Exception as e:  # noqa: BLE001 - the random check above still counts
            traceback.print_exc()
            entry["layout_probe_error"] = f"{type(e).__name__}: {e}"
            fail("mma.sp probe", f"{kind}: layout probes raised {type(e).__name__}: {e}")
        out[kind] = entry
    return out


# ------------------------------------------------------------------------------------------------- checks


@section("MatMulLowBit")
def check_lowbit(torch, lib) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    cases = [(K, N, b, g, gk.CHECK_MS) for K, N in LOWBIT_CASES for b in (2, 3, 4, 8) for g in (32, 128)]
    cases += [(K, N, b, 32, Ms) for K, N, Ms in gk.EXTRA_CASES for b in (2, 3, 4, 8)]
    with _path(lib, build.LOWBIT_PATH_OLD):  # the CUDA-core kernel, whatever M (the mma path has its own section)
        for K, N, bits, group, Ms in cases:
            rows += gk.check_case(torch, lib, rng, K, N, bits, group, Ms)
            if lib.last_path() != build.LOWBIT_PATH_OLD:
                fail("MatMulLowBit", f"K={K} N={N} w{bits}g{group}: ran path {lib.last_path()}, expected the old one")
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        fail("MatMulLowBit", f"K={r['K']} N={r['N']} M={r['M']} w{r['bits']}g{r['group']} rel err {r['rel_err']:.2e}")
    worst = max(r["rel_err"] for r in rows)
    log(f"  {len(rows) - len(bad)}/{len(rows)} ok, worst rel err {worst:.1e}")
    return {"checks": len(rows), "failed": len(bad), "worst_rel_err": worst}


def _lowbit_mma_rows(torch, lib, rng, K, N, bits, group, with_zp, Ms, label, want_path=build.LOWBIT_PATH_MMA):
    """One weight set, every M in ``Ms`` under the current path mode: rows with the error against ref16 (the op on
    fp16-rounded activations, fp64) and, for information, against ref32 (the op on the fp32 activations)."""
    packed, scales, zp = gk.random_weights(rng, K, N, bits, group, with_zp)
    op = gk.GpuOp(torch, lib, packed, scales, zp, K=K, N=N, bits=bits, group=group)
    W = lowbit.dequantize(packed, scales, zp, bits, group, K).astype(np.float64)
    A = rng.standard_normal((sum(Ms), K)).astype(np.float32)
    ref16_all = A.astype(np.float16).astype(np.float64) @ W.T
    ref32_all = A.astype(np.float64) @ W.T
    rows, start = [], 0
    for M in Ms:
        a, ref16, ref32 = A[start : start + M], ref16_all[start : start + M], ref32_all[start : start + M]
        start += M
        Y_d = torch.full((M, N), float("nan"), device="cuda")
        op(torch.from_numpy(a).cuda(), Y_d)
        torch.cuda.synchronize()
        path = lib.last_path()
        y = Y_d.cpu().numpy().astype(np.float64)
        scale = float(np.abs(ref16).max()) or 1.0
        finite = bool(np.isfinite(y).all())
        err = float(np.abs(y - ref16).max()) / scale if finite else float("inf")
        err32 = float(np.abs(y - ref32).max()) / (float(np.abs(ref32).max()) or 1.0) if finite else float("inf")
        if want_path == build.LOWBIT_PATH_OLD:  # the CUDA-core kernel (fp32 activations): its own tolerance
            s32 = float(np.abs(ref32).max()) or 1.0
            ok = finite and bool(np.allclose(y, ref32, rtol=1e-3, atol=1e-3 * s32))
        else:
            ok = finite and bool((np.abs(y - ref16) <= LOWBIT_MMA_TOL * (scale + np.abs(ref16))).all())
        ok = ok and path == want_path
        row = dict(K=K, N=N, M=M, bits=bits, group=group, zero_points=with_zp, rel_err=err, rel_err_vs_fp32=err32,
                   path=path, ok=ok)  # fmt: skip
        rows.append(row)
        if not ok:
            fail(label, f"K={K} N={N} M={M} w{bits}g{group} zp={with_zp} path {path}: rel err {err:.2e} vs ref16")
    return rows


@section("MatMulLowBit mma (sm_80+ tensor cores, fp16 activations)")
def check_lowbit_mma(torch, lib) -> dict:
    """The tensor-core path forced on LOWBIT_MMA_SHAPES x bits x groups x zero points x LOWBIT_MMA_MS (and M = 1,
    3 on one shape), then the automatic choice at M = 7 (old path) and 8 (mma)."""
    label = "MatMulLowBit mma"
    rng = np.random.default_rng(21)
    rows = []
    with _path(lib, build.LOWBIT_PATH_MMA):
        for K, N in LOWBIT_MMA_SHAPES:
            for bits in (2, 3, 4, 8):
                for group in (32, 128):
                    for with_zp in (True, False):
                        if K * N > 4_000_000 and (group, with_zp) != ((32, True) if bits in (2, 4) else (128, False)):
                            continue  # numpy time: one weight set per bits on the big shape
                        Ms = LOWBIT_MMA_MS + ((1, 3) if (K, N) == (1000, 130) else ())
                        rows += _lowbit_mma_rows(torch, lib, rng, K, N, bits, group, with_zp, Ms, label)
    with _path(lib, build.LOWBIT_PATH_AUTO):
        rows += _lowbit_mma_rows(torch, lib, rng, 1000, 130, 4, 32, True, (8,), label)
        auto_old = _lowbit_mma_rows(torch, lib, rng, 1000, 130, 4, 32, True, (7,), label, build.LOWBIT_PATH_OLD)
        rows += auto_old
    bad = [r for r in rows if not r["ok"]]
    mma_rows = [r for r in rows if r["path"] == build.LOWBIT_PATH_MMA] or rows
    worst = max(r["rel_err"] for r in mma_rows)
    worst32 = max(r["rel_err_vs_fp32"] for r in mma_rows)
    log(f"  {len(rows) - len(bad)}/{len(rows)} ok, worst rel err {worst:.1e} vs ref16 (tolerance {LOWBIT_MMA_TOL:.0e}),"
        f" {worst32:.1e} vs the fp32-activation reference")  # fmt: skip
    for r in bad[:10]:
        log(f"    {r}")
    return {"checks": len(rows), "failed": len(bad), "worst_rel_err": worst, "worst_rel_err_vs_fp32": worst32,
            "tolerance": LOWBIT_MMA_TOL, "rows": rows}  # fmt: skip


@section("MatMulLowBit fallback (compute_75 PTX: mma forced runs the CUDA-core kernel)")
def check_lowbit_fallback(torch, lib) -> dict:
    rng = np.random.default_rng(22)
    rows = []
    with _path(lib, build.LOWBIT_PATH_MMA):
        for bits in (3, 4):
            rows += gk.check_case(torch, lib, rng, 1000, 130, bits, 32, (16, 37))
            if lib.last_path() != build.LOWBIT_PATH_OLD:
                fail("MatMulLowBit fallback", f"mma forced ran path {lib.last_path()} in a compute_75 build")
                rows[-1]["ok"] = False
    for r in rows:
        if not r["ok"]:
            fail("MatMulLowBit fallback", f"K={r['K']} N={r['N']} M={r['M']} w{r['bits']} rel err {r['rel_err']:.2e}")
    return {"checks": len(rows), "failed": sum(not r["ok"] for r in rows),
            "worst_rel_err": max(r["rel_err"] for r in rows)}  # fmt: skip


@functools.lru_cache(maxsize=16)
def _sp24_weights(K, N):
    """Random 2:4 weights (cached per shape: generating 4096 x 4096 in numpy takes a second)."""
    w = sparse24.random_2of4(np.random.default_rng(K * 7919 + N), N, K) / np.sqrt(K / 2)
    return sparse24.pack(w.astype(np.float32))


def _sp24_f16_case(torch, lib, rng, K, N, M, label):
    values, indices = _sp24_weights(K, N)
    v16 = values.astype(np.float16)
    A16 = rng.standard_normal((M, K)).astype(np.float16)
    ref = sparse24.reference_matmul(A16.astype(np.float32), v16.astype(np.float32), indices, K=K, N=N)
    Vd, Id, Ad = (torch.from_numpy(a).cuda() for a in (v16, indices, A16))
    Y = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")
    lib.matmul_f16(Ad.data_ptr(), Vd.data_ptr(), Id.data_ptr(), Y.data_ptr(), M=M, N=N, K=K)
    torch.cuda.synchronize()
    path = lib.last_path()
    y = Y.float().cpu().numpy()
    scale = float(np.abs(ref).max()) or 1.0
    finite = bool(np.isfinite(y).all())
    err = float(np.abs(y - ref).max()) / scale if finite else float("inf")
    ok = finite and bool((np.abs(y - ref) <= 2e-3 * scale + 2e-3 * np.abs(ref)).all())
    if not ok:
        fail(label, f"K={K} N={N} M={M} path {path} rel err {err:.2e}")
    return {"K": K, "N": N, "M": M, "rel_err": err, "ok": ok, "path": path}


def _sp24_s8_case(torch, lib, rng, K, N, M, zp, label):
    values, indices = _sp24_weights(K, N)
    q, w_scale = sparse24.quantize_int8_rows(values)
    rowsum = sparse24.row_sums(q)
    A = rng.integers(0, 256, size=(M, K)).astype(np.uint8)
    a_scale = 0.02
    ref = sparse24.reference_matmul(A, q, indices, w_scale, K=K, N=N, a_scale=a_scale, a_zero_point=zp)
    Qd, Id, Sd, Rd, Ad = (torch.from_numpy(a).cuda() for a in (q, indices, w_scale, rowsum, A))
    Y = torch.full((M, N), float("nan"), dtype=torch.float32, device="cuda")
    lib.matmul_s8(
        Ad.data_ptr(), Qd.data_ptr(), Id.data_ptr(), Sd.data_ptr(), Rd.data_ptr(), Y.data_ptr(),
        a_scale=a_scale, a_zero_point=zp, M=M, N=N, K=K,
    )  # fmt: skip
    torch.cuda.synchronize()
    path = lib.last_path()
    y = Y.cpu().numpy()
    scale = float(np.abs(ref).max()) or 1.0
    finite = bool(np.isfinite(y).all())
    err = float(np.abs(y - ref).max()) / scale if finite else float("inf")
    ok = finite and bool(np.allclose(y, ref, rtol=1e-5, atol=1e-5 * scale))
    if not ok:
        fail(label, f"K={K} N={N} M={M} zp={zp} path {path} rel err {err:.2e}")
    return {"K": K, "N": N, "M": M, "zp": zp, "rel_err": err, "ok": ok, "path": path}


def _sp24_cases(shapes=SP24_CHECK, ms=SP24_MS, extra=SP24_EXTRA):
    return [(K, N, M) for K, N in shapes for M in ms] + list(extra)


def _log_rows(rows) -> None:
    log("  " + " ".join(f"{r['K']}x{r['N']}/M{r['M']}:{r['rel_err']:.0e}{'' if r['ok'] else '!'}"
                        f"{'' if r.get('path', 1) == 1 else 'T' + str(r['path'] - 10)}" for r in rows))  # fmt: skip


class _path:
    """``with _path(lib, mode):`` the launcher's kernel selection (build.SPARSE24_PATH_*), restored afterwards."""

    def __init__(self, lib, mode):
        self.lib, self.mode = lib, mode

    def __enter__(self):
        self.prev = self.lib.set_path(self.mode)

    def __exit__(self, *exc):
        self.lib.set_path(self.prev)


@section("MatMulSparse24 f16")
def check_sp24_f16(torch, lib, label="MatMulSparse24 f16", cases=None) -> list:
    rng = np.random.default_rng(1)
    with _path(lib, build.SPARSE24_PATH_REFERENCE):
        rows = [_sp24_f16_case(torch, lib, rng, K, N, M, label) for K, N, M in (cases or _sp24_cases())]
    _log_rows(rows)
    return rows


@section("MatMulSparse24 int8")
def check_sp24_s8(torch, lib, label="MatMulSparse24 int8", cases=None) -> list:
    rng = np.random.default_rng(2)
    with _path(lib, build.SPARSE24_PATH_REFERENCE):
        rows = [
            _sp24_s8_case(torch, lib, rng, K, N, M, zp, label) for i, (K, N, M) in enumerate(cases or _sp24_cases())
            for zp in ((0, 117) if i % 2 == 0 else (128,))
        ]  # fmt: skip
    _log_rows(rows)
    return rows


def _tiled_qualifies(kind: str, K: int) -> bool:
    return K % (64 if kind == "f16" else 128) == 0


@section("MatMulSparse24 tiled (sm_80+: cp.async ring, ldmatrix, 2*MT mma.sp per k-step)")
def check_sp24_tiled(torch, lib) -> dict:
    """The tiled path forced on every shape class of the reference checks plus SP24_TILED_EXTRA, then each config
    forced on SP24_TILED_SWEEP; same tolerances. A qualifying shape that did not run tiled is a failure."""
    out = {}
    base = _sp24_cases() + list(SP24_TILED_EXTRA)
    sweep = [(mode, K, N, M) for mode in range(build.SPARSE24_PATH_TILED_CONFIG0,
                                               build.SPARSE24_PATH_TILED_CONFIG0 + len(build.SPARSE24_TILED_CONFIGS))
             for K, N, M in SP24_TILED_SWEEP]  # fmt: skip
    for kind in ("f16", "int8"):
        label = f"MatMulSparse24 {kind} tiled"
        rng = np.random.default_rng(11 if kind == "f16" else 12)
        rows = []
        runs = [(build.SPARSE24_PATH_TILED, K, N, M) for K, N, M in base] + sweep
        for i, (mode, K, N, M) in enumerate(runs):
            first = len(rows)
            with _path(lib, mode):
                if kind == "f16":
                    row = _sp24_f16_case(torch, lib, rng, K, N, M, label)
                    rows.append(row)
                else:
                    for zp in (0, 117) if i % 2 == 0 else (128,):
                        rows.append(_sp24_s8_case(torch, lib, rng, K, N, M, zp, label))
            for row in rows[first:]:
                row["mode"] = mode
            want = (mode - build.SPARSE24_PATH_TILED_CONFIG0) if mode >= build.SPARSE24_PATH_TILED_CONFIG0 else None
            if _tiled_qualifies("f16" if kind == "f16" else "s8", K):
                got = rows[-1]["path"] - build.SPARSE24_PATH_TILED_CONFIG0
                if got < 0 or (want is not None and got != want):
                    fail(label, f"K={K} N={N} M={M} mode {mode}: ran path {rows[-1]['path']}, expected tiled")
                    rows[-1]["ok"] = False
        _log_rows(rows)
        tiled = [r for r in rows if r["path"] >= build.SPARSE24_PATH_TILED_CONFIG0]
        log(f"  {kind}: {sum(r['ok'] for r in rows)}/{len(rows)} ok, {len(tiled)} ran tiled "
            f"(configs {sorted({r['path'] - 10 for r in tiled})})")  # fmt: skip
        out[kind] = rows
    return out


@section("MatMulSparse24 fallback (compute_75 PTX, CUDA cores)")
def check_sp24_fallback(torch, lib) -> dict:
    cases = _sp24_cases(shapes=[(100, 33), (1000, 130), (4096, 512)], ms=(1, 16, 128))
    f16 = check_sp24_f16.__wrapped__(torch, lib, "MatMulSparse24 fallback f16", cases)
    s8 = check_sp24_s8.__wrapped__(torch, lib, "MatMulSparse24 fallback int8", cases)
    # The tiled path forced on a shape it takes: a compute_75 build must still run the reference kernel (the
    # launcher sees the tiled kernel's PTX version < 80), not the tiled kernel's empty pre-sm_80 body.
    rng = np.random.default_rng(4)
    with _path(lib, build.SPARSE24_PATH_TILED):
        forced = [
            _sp24_f16_case(torch, lib, rng, 256, 72, 64, "MatMulSparse24 fallback f16 (tiled forced)"),
            _sp24_s8_case(torch, lib, rng, 256, 72, 64, 117, "MatMulSparse24 fallback int8 (tiled forced)"),
        ]
    for row in forced:
        if row["path"] != build.SPARSE24_PATH_REFERENCE:
            fail("MatMulSparse24 fallback", f"tiled forced ran path {row['path']} in a compute_75 build")
            row["ok"] = False
    return {"f16": f16 + forced[:1], "int8": s8 + forced[1:]}


def _attn_inputs(rng, B, H, S, Skv, outliers):
    q = rng.standard_normal((B, H, S, 64)).astype(np.float32)
    k = rng.standard_normal((B, H, Skv, 64)).astype(np.float32)
    v = rng.standard_normal((B, H, Skv, 64)).astype(np.float32)
    if outliers:
        k += (rng.standard_normal(64) * 3 + np.where(np.arange(64) < 4, 40.0, 0.0)).astype(np.float32)
    return q, k, v


def _attn_run(torch, lib, qz, B, H, S, Skv, q_block, k_block, out=None):
    dev = {name: torch.from_numpy(np.ascontiguousarray(a)).cuda() for name, a in qz.items()}
    O = out if out is not None else torch.full((B, H, S, 64), float("nan"), dtype=torch.float16, device="cuda")
    call = lambda: lib.attention(  # noqa: E731
        dev["q8"].data_ptr(), dev["q_scale"].data_ptr(), dev["k8"].data_ptr(), dev["k_scale"].data_ptr(),
        dev["k_bias"].data_ptr(), dev["v16"].data_ptr(), O.data_ptr(), BH=B * H, S=S, Skv=Skv,
        q_block=q_block, k_block=k_block, sm_scale=1.0 / math.sqrt(64),
    )  # fmt: skip
    return call, O, dev


ATTN_PATHS = (("old", build.ATTN_PATH_OLD), ("mma", build.ATTN_PATH_MMA))


def _attn_case(torch, lib, rng, i, B, H, S, Skv, qb, paths, want=None):
    outliers = i % 2 == 1
    q, k, v = _attn_inputs(rng, B, H, S, Skv, outliers)
    qz = attention.quantize(q, k, v, q_block=qb, k_block=64)
    ref = attention.reference_quantized(qz, q_block=qb, k_block=64)
    exact = attention.reference_exact(q, k, v)
    rows = []
    for name, mode in paths:
        lib.set_path(mode)
        call, O, _ = _attn_run(torch, lib, qz, B, H, S, Skv, qb, 64)
        call()
        torch.cuda.synchronize()
        ran = lib.last_path()
        o = O.float().cpu().numpy()
        finite = bool(np.isfinite(o).all())
        err = float(np.abs(o - ref).max()) if finite else float("inf")
        cos = float(attention.cosine_per_row(o, exact).min()) if finite else 0.0
        ok = finite and bool((np.abs(o - ref) <= 4e-3 + 1e-2 * np.abs(ref)).all()) and cos >= 0.999
        expect = (want or {}).get(name, mode)
        if ran != expect:
            fail("AttentionInt8", f"{name} forced, B={B} H={H} S={S} Skv={Skv}: ran path {ran}, expected {expect}")
            ok = False
        row = dict(path=name, ran=ran, B=B, H=H, S=S, Skv=Skv, q_block=qb, outlier_k=outliers, max_abs_err=err,
                   min_cos_exact=cos, ok=ok)  # fmt: skip
        rows.append(row)
        if not ok:
            what = f"{name}: B={B} H={H} S={S} Skv={Skv} qb={qb}: max abs err {err:.2e}, min cos {cos:.5f}"
            fail("AttentionInt8", what)
        log(f"  {name}: B={B} H={H} S={S} Skv={Skv} qb={qb} outliers={outliers}: err {err:.1e} cos {cos:.5f} {ok}")
    lib.set_path(build.ATTN_PATH_AUTO)
    return rows


@section("AttentionInt8")
def check_attention(torch, lib) -> list:
    """Both kernels (old forced, mma forced) against the quantized reference and exact attention."""
    rng = np.random.default_rng(3)
    rows = []
    for i, (B, H, S, Skv, qb) in enumerate(ATTN_CHECK):
        rows += _attn_case(torch, lib, rng, i, B, H, S, Skv, qb, ATTN_PATHS)
    return rows


@section("AttentionInt8 fallback")
def check_attention_fallback(torch, lib) -> list:
    """A compute_75 PTX build (JIT on this GPU) has an empty tensor-core kernel: mma forced must run the old one."""
    rng = np.random.default_rng(4)
    B, H, S, Skv, qb = ATTN_CHECK[2]
    return _attn_case(torch, lib, rng, 2, B, H, S, Skv, qb, ATTN_PATHS[1:], want={"mma": build.ATTN_PATH_OLD})


# ------------------------------------------------------------------------------------------------- benchmarks


def _timed(torch, fns) -> float:
    return gk.timed(torch, fns, reps=10, samples=15)["ms"]


@section("bench MatMulSparse24")
def bench_sparse(torch, lib, l2_bytes: int) -> list:
    rows = []
    has_int_mm = hasattr(torch, "_int_mm")
    nibbles = torch.tensor(sparse24.VALID_NIBBLES, dtype=torch.uint8, device="cuda")
    for K, N in BENCH_SHAPES:
        # Random data made on the GPU (speed does not depend on the values; correctness is checked above).
        pick = nibbles[torch.randint(0, 6, (N, K // 4), device="cuda")]
        Id = (pick[:, 0::2] | (pick[:, 1::2] << 4)).contiguous()  # sparse24's byte layout
        v16 = (torch.randn(N, K // 2, device="cuda") / math.sqrt(K / 2)).half()
        Qd = torch.randint(-127, 128, (N, K // 2), device="cuda", dtype=torch.int8)
        Sd = torch.rand(N, device="cuda") * 0.01
        Rd = Qd.int().sum(dim=1, dtype=torch.int32)
        dense16 = (torch.randn(N, K, device="cuda") / math.sqrt(K)).half()
        n_dense = gk.copies_for(dense16.numel() * 2, l2_bytes)
        n_sp16 = gk.copies_for(v16.numel() * 2 + Id.numel(), l2_bytes)
        n_sp8 = gk.copies_for(Qd.numel() + Id.numel(), l2_bytes)
        dense_copies = [dense16.clone() for _ in range(n_dense)]
        int8_w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)  # [N, K]; w.t() is "TN"
        int8_copies = [int8_w.clone() for _ in range(gk.copies_for(K * N, l2_bytes))]
        sp16 = [(v16.clone(), Id.clone()) for _ in range(n_sp16)]
        sp8 = [(Qd.clone(), Id.clone()) for _ in range(n_sp8)]
        del dense16, int8_w
        for M in BENCH_MS:
            A16 = torch.randn(M, K, device="cuda", dtype=torch.float16)
            A8 = torch.randint(-127, 127, (M, K), device="cuda", dtype=torch.int8)
            Au8 = torch.randint(0, 256, (M, K), device="cuda", dtype=torch.uint8)
            Y16 = torch.empty(M, N, device="cuda", dtype=torch.float16)
            Y32 = torch.empty(M, N, device="cuda", dtype=torch.float32)
            entry = {"K": K, "N": N, "M": M}
            entry["dense_fp16_ms"] = _timed(torch, [functools.partial(torch.matmul, A16, w.t()) for w in dense_copies])
            if has_int_mm:
                try:
                    entry["int_mm_ms"] = _timed(
                        torch, [functools.partial(torch._int_mm, A8, w.t()) for w in int8_copies]
                    )
                except Exception as e:  # noqa: BLE001
                    entry["int_mm_error"] = f"{type(e).__name__}: {e}"
            f16_args = dict(M=M, N=N, K=K)
            f16_fns = [functools.partial(lib.matmul_f16, A16.data_ptr(), v.data_ptr(), i.data_ptr(), Y16.data_ptr(),
                                         **f16_args) for v, i in sp16]  # fmt: skip
            s8_args = dict(a_scale=0.02, a_zero_point=100, M=M, N=N, K=K)
            s8_fns = [functools.partial(lib.matmul_s8, Au8.data_ptr(), v.data_ptr(), i.data_ptr(), Sd.data_ptr(),
                                        Rd.data_ptr(), Y32.data_ptr(), **s8_args) for v, i in sp8]  # fmt: skip
            # "" = the reference kernel (the old path), "_tiled" = tiled with the launcher's automatic config,
            # "_tiled<c>" = tiled config c forced; "*_path" = what actually ran (1 reference, 10 + c tiled c).
            modes = {"": build.SPARSE24_PATH_REFERENCE, "_tiled": build.SPARSE24_PATH_TILED}
            modes.update({f"_tiled{c}": build.SPARSE24_PATH_TILED_CONFIG0 + c
                          for c in range(len(build.SPARSE24_TILED_CONFIGS))})  # fmt: skip
            for suffix, mode in modes.items():
                for kind, fns in (("f16", f16_fns), ("int8", s8_fns)):
                    with _path(lib, mode):
                        entry[f"sparse24_{kind}{suffix}_ms"] = _timed(torch, fns)
                        entry[f"sparse24_{kind}{suffix}_path"] = lib.last_path()
            flops = 2 * M * N * K
            for key in [k for k in entry if k.endswith("_ms")]:
                entry[key.replace("_ms", "_tflops")] = flops / (entry[key] * 1e-3) / 1e12
            for kind, peer in (("f16", "dense_fp16_ms"), ("int8", "int_mm_ms")):
                ms = {c: entry[f"sparse24_{kind}_tiled{c}_ms"] for c in range(len(build.SPARSE24_TILED_CONFIGS))}
                best = min(ms, key=ms.get)
                entry[f"sparse24_{kind}_best_config"] = best
                entry[f"sparse24_{kind}_best_ms"] = ms[best]
                old_ms, tiled_ms = entry[f"sparse24_{kind}_ms"], entry[f"sparse24_{kind}_tiled_ms"]
                entry[f"speedup_{kind}_tiled_vs_old"] = old_ms / tiled_ms
                if peer in entry:
                    for suffix in ("", "_tiled", "_best"):
                        ratio = entry[peer] / entry[f"sparse24_{kind}{suffix}_ms"]
                        entry[f"speedup_{kind}{suffix}_vs_{peer[:-3]}"] = ratio
            entry["speedup_f16_vs_dense"] = entry["speedup_f16_vs_dense_fp16"]  # the old key: reference kernel
            rows.append(entry)
            log(
                f"  K={K} N={N} M={M}: dense fp16 {entry['dense_fp16_ms'] * 1e3:.1f}us, "
                f"_int_mm {entry.get('int_mm_ms', float('nan')) * 1e3:.1f}us | f16 old "
                f"{entry['sparse24_f16_ms'] * 1e3:.1f}us, tiled {entry['sparse24_f16_tiled_ms'] * 1e3:.1f}us "
                f"({_pname(entry['sparse24_f16_tiled_path'])}, "
                f"x{entry['speedup_f16_tiled_vs_dense_fp16']:.2f} vs dense), "
                f"best T{entry['sparse24_f16_best_config']} {entry['sparse24_f16_best_ms'] * 1e3:.1f}us | int8 old "
                f"{entry['sparse24_int8_ms'] * 1e3:.1f}us, tiled {entry['sparse24_int8_tiled_ms'] * 1e3:.1f}us "
                f"({_pname(entry['sparse24_int8_tiled_path'])}), best T{entry['sparse24_int8_best_config']} "
                f"{entry['sparse24_int8_best_ms'] * 1e3:.1f}us"
            )
        del dense_copies, int8_copies, sp16, sp8
        torch.cuda.empty_cache()
    return rows


@section("bench MatMulLowBit")
def bench_lowbit(torch, lib, l2_bytes: int) -> list:
    """Tensor-core path vs the CUDA-core kernel vs torch fp16 matmul (cuBLAS) of same-shaped dense weights; fp32
    activations for the low-bit kernels (fp16 for cuBLAS), group 128 symmetric; weights rotated past 4x L2."""
    rows = []
    for K, N in BENCH_SHAPES:
        groups = K // LOWBIT_BENCH_GROUP
        dense = (torch.randn(N, K, device="cuda") / math.sqrt(K)).half()
        dense_copies = [dense.clone() for _ in range(gk.copies_for(dense.numel() * 2, l2_bytes))]
        del dense
        weights = {}
        for bits in LOWBIT_BENCH_BITS:  # random bytes are valid codes; speed does not depend on the values
            row_bytes = lowbit.packed_row_bytes(K, bits)
            nbytes = lowbit.storage_bytes(K, N, bits, LOWBIT_BENCH_GROUP, zero_points=False)
            S = (torch.rand(N, groups, device="cuda") + 0.5) / (1 << (bits - 1)) / math.sqrt(K)
            Bp = torch.randint(0, 256, (N, row_bytes), dtype=torch.uint8, device="cuda")
            weights[bits] = (nbytes, [(Bp.clone(), S.clone()) for _ in range(gk.copies_for(nbytes, l2_bytes))])
        for M in LOWBIT_BENCH_MS:
            A32 = torch.randn(M, K, device="cuda")
            A16 = A32.half()
            entry = {"K": K, "N": N, "M": M}
            entry["dense_fp16_ms"] = _timed(torch, [functools.partial(torch.matmul, A16, w.t()) for w in dense_copies])
            for bits, (nbytes, copies) in weights.items():
                Ys = {}
                for name, mode in (("mma", build.LOWBIT_PATH_MMA), ("old", build.LOWBIT_PATH_OLD)):
                    Y = torch.empty(M, N, device="cuda")
                    fns = [functools.partial(lib.matmul, A32.data_ptr(), b.data_ptr(), s.data_ptr(), None,
                                             Y.data_ptr(), M=M, N=N, K=K, bits=bits, group_size=LOWBIT_BENCH_GROUP)
                           for b, s in copies]  # fmt: skip
                    with _path(lib, mode):
                        entry[f"w{bits}_{name}_ms"] = _timed(torch, fns)
                        entry[f"w{bits}_{name}_path"] = lib.last_path()
                        fns[0]()
                    torch.cuda.synchronize()
                    Ys[name] = Y
                scale = float(Ys["old"].abs().max()) or 1.0
                entry[f"w{bits}_mma_vs_old_rel_diff"] = float((Ys["mma"] - Ys["old"]).abs().max()) / scale
                entry[f"w{bits}_mma_speedup_vs_old"] = entry[f"w{bits}_old_ms"] / entry[f"w{bits}_mma_ms"]
                entry[f"w{bits}_mma_vs_dense_fp16"] = entry["dense_fp16_ms"] / entry[f"w{bits}_mma_ms"]
                entry[f"w{bits}_old_vs_dense_fp16"] = entry["dense_fp16_ms"] / entry[f"w{bits}_old_ms"]
                entry[f"w{bits}_mma_weight_GBps"] = nbytes / (entry[f"w{bits}_mma_ms"] * 1e-3) / 1e9
                if entry[f"w{bits}_mma_path"] != build.LOWBIT_PATH_MMA:
                    fail("bench MatMulLowBit", f"K={K} N={N} M={M} w{bits}: mma forced ran path "
                                               f"{entry[f'w{bits}_mma_path']}")  # fmt: skip
            rows.append(entry)
            log(f"  K={K} N={N} M={M}: cuBLAS fp16 {entry['dense_fp16_ms'] * 1e3:.1f}us | " + " | ".join(
                f"w{b}g{LOWBIT_BENCH_GROUP} mma {entry[f'w{b}_mma_ms'] * 1e3:.1f}us "
                f"(x{entry[f'w{b}_mma_vs_dense_fp16']:.2f} vs fp16, x{entry[f'w{b}_mma_speedup_vs_old']:.2f} vs old "
                f"{entry[f'w{b}_old_ms'] * 1e3:.1f}us, diff {entry[f'w{b}_mma_vs_old_rel_diff']:.0e})"
                for b in LOWBIT_BENCH_BITS))  # fmt: skip
        del dense_copies, weights
        torch.cuda.empty_cache()
    return rows


@section("bench AttentionInt8")
def bench_attention(torch, lib) -> list:
    rows = []
    rng = np.random.default_rng(5)
    F = torch.nn.functional
    for B, H, S in ATTN_BENCH:
        q, k, v = _attn_inputs(rng, B, H, S, S, False)
        qz = attention.quantize(q, k, v, q_block=1, k_block=64)
        call, O, _ = _attn_run(torch, lib, qz, B, H, S, S, 1, 64)
        qt, kt, vt = (torch.from_numpy(a).cuda().half() for a in (q, k, v))
        entry = {"B": B, "H": H, "S": S, "D": 64}
        entry["sdpa_fp16_ms"] = _timed(torch, [functools.partial(F.scaled_dot_product_attention, qt, kt, vt)])
        sd = F.scaled_dot_product_attention(qt, kt, vt).float().cpu().numpy()
        for name, mode in ATTN_PATHS:
            lib.set_path(mode)
            entry[f"int8_{name}_ms"] = _timed(torch, [call])
            entry[f"int8_{name}_path"] = lib.last_path()
            entry[f"{name}_vs_sdpa"] = entry["sdpa_fp16_ms"] / entry[f"int8_{name}_ms"]
            call()
            entry[f"{name}_min_cos_vs_sdpa"] = float(attention.cosine_per_row(O.float().cpu().numpy(), sd).min())
        lib.set_path(build.ATTN_PATH_AUTO)
        entry["mma_vs_old"] = entry["int8_old_ms"] / entry["int8_mma_ms"]
        rows.append(entry)
        log(
            f"  B={B} H={H} S={S}: sdpa {entry['sdpa_fp16_ms'] * 1e3:.1f}us, old {entry['int8_old_ms'] * 1e3:.1f}us "
            f"(x{entry['old_vs_sdpa']:.2f}), mma {entry['int8_mma_ms'] * 1e3:.1f}us (x{entry['mma_vs_sdpa']:.2f}, "
            f"path {entry['int8_mma_path']}), mma vs old x{entry['mma_vs_old']:.1f}, "
            f"cos {entry['mma_min_cos_vs_sdpa']:.5f}"
        )
    return rows


# ------------------------------------------------------------------------------------------------- report


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        return out.stdout.strip() or "?"
    except Exception:  # noqa: BLE001
        return "?"


def _pname(path: int) -> str:
    """edgekit_matmul_sparse24_last_path as text: T<c> for tiled config c, old for the reference kernel."""
    return f"T{path - build.SPARSE24_PATH_TILED_CONFIG0}" if path >= build.SPARSE24_PATH_TILED_CONFIG0 else "old"


def _us(entry: dict, key: str) -> str:
    return f"{entry[key] * 1e3:.1f}" if key in entry else "–"


def markdown(result: dict) -> str:
    env = result.get("env", {})
    lines = [
        "# edgekit CUDA kernels: `runtimes/cuda/check_gpu.py`",
        "",
        f"- **Status**: {result.get('status')}"
        + (f" ({len(result['failures'])} failures)" if result["failures"] else ""),
        f"- **Device**: {env.get('device', '?')} (SM {env.get('capability', '?')}, {env.get('sms', '?')} SMs, "
        f"L2 {int(env.get('l2_bytes', 0)) >> 20} MiB), driver {env.get('driver', '?')}",
        f"- **Software**: Python {env.get('python', '?')}, torch {env.get('torch', '?')} "
        f"(CUDA {env.get('torch_cuda')}), numpy {env.get('numpy', '?')}, {env.get('nvcc_version', 'nvcc ?')}",
        f"- **Date**: {env.get('date_utc', '?')}",
        "",
        "| section | ok | seconds | notes |",
        "|---|---|---|---|",
    ]
    for name, sec in result["sections"].items():
        note = sec.get("error", "")
        res = sec.get("result")
        if isinstance(res, list) and res and "rel_err" in res[0]:
            note = f"{sum(r['ok'] for r in res)}/{len(res)} ok, worst rel err {max(r['rel_err'] for r in res):.1e}"
        elif isinstance(res, dict) and res and all(isinstance(v, list) and v and "rel_err" in v[0]
                                                   for v in res.values()):  # fmt: skip
            note = "; ".join(f"{k} {sum(r['ok'] for r in v)}/{len(v)} ok, worst rel err "
                             f"{max(r['rel_err'] for r in v):.1e}" for k, v in res.items())  # fmt: skip
        elif isinstance(res, dict) and "worst_rel_err" in res:
            note = f"{res['checks'] - res['failed']}/{res['checks']} ok, worst rel err {res['worst_rel_err']:.1e}"
        lines.append(f"| {name} | {'yes' if sec.get('ok') else 'NO'} | {sec.get('seconds', '')} | {note} |")
    for f in result["failures"][:40]:
        lines.append(f"- FAIL {f}")
    sp = result["sections"].get("bench MatMulSparse24", {}).get("result") or []
    if sp:
        lines += [
            "",
            "## MatMulSparse24 speed (µs per call, median; TFLOP/s counted as dense 2MNK)",
            "",
            "Old = the reference kernel, tiled = the sm_80+ tiled path with the launcher's automatic config (Tc), "
            "best = the fastest forced tiled config.",
            "",
            "| K × N | M | dense fp16 | `_int_mm` int8 | f16 old | f16 tiled | f16 best | int8 old | int8 tiled "
            "| int8 best | f16 tiled vs dense | int8 tiled vs _int_mm |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in sp:
            us = functools.partial(_us, e)
            nan = float("nan")
            lines.append(
                f"| {e['K']} × {e['N']} | {e['M']} | {us('dense_fp16_ms')} | {us('int_mm_ms')} | "
                f"{us('sparse24_f16_ms')} | {us('sparse24_f16_tiled_ms')} ({_pname(e['sparse24_f16_tiled_path'])}) | "
                f"{us('sparse24_f16_best_ms')} (T{e['sparse24_f16_best_config']}) | {us('sparse24_int8_ms')} | "
                f"{us('sparse24_int8_tiled_ms')} ({_pname(e['sparse24_int8_tiled_path'])}) | "
                f"{us('sparse24_int8_best_ms')} (T{e['sparse24_int8_best_config']}) | "
                f"{e.get('speedup_f16_tiled_vs_dense_fp16', nan):.2f}× | "
                f"{e.get('speedup_int8_tiled_vs_int_mm', nan):.2f}× |"
            )
    lb = result["sections"].get("bench MatMulLowBit", {}).get("result") or []
    if lb:
        lines += [
            "",
            f"## MatMulLowBit speed (g{LOWBIT_BENCH_GROUP} symmetric, µs per call, median)",
            "",
            "mma = the sm_80+ tensor-core path (fp32 activations rounded to fp16 in the kernel), old = the CUDA-core "
            "kernel (fp32), cuBLAS = torch fp16 matmul of same-sized dense fp16 weights; ratios are cuBLAS time / "
            "kernel time.",
            "",
            "| K × N | M | cuBLAS fp16 | " + " | ".join(f"w{b} mma | w{b} old | w{b} mma vs cuBLAS | w{b} old vs cuBLAS"
                                                        for b in LOWBIT_BENCH_BITS) + " |",
            "|---|---|---|" + "---|---|---|---|" * len(LOWBIT_BENCH_BITS),
        ]  # fmt: skip
        for e in lb:
            cells = [f"{e['K']} × {e['N']}", str(e["M"]), _us(e, "dense_fp16_ms")]
            for b in LOWBIT_BENCH_BITS:
                cells += [_us(e, f"w{b}_mma_ms"), _us(e, f"w{b}_old_ms"), f"{e.get(f'w{b}_mma_vs_dense_fp16', 0):.2f}×",
                          f"{e.get(f'w{b}_old_vs_dense_fp16', 0):.2f}×"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    at = result["sections"].get("bench AttentionInt8", {}).get("result") or []
    if at:
        lines += ["", "## AttentionInt8 speed (D = 64, µs; old = CUDA-core kernel, mma = tensor-core kernel)", ""]
        lines.append("| B | H | S | SDPA fp16 | old | mma | old vs SDPA | mma vs SDPA | mma vs old | min cos vs SDPA |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for e in at:
            lines.append(
                f"| {e['B']} | {e['H']} | {e['S']} | {_us(e, 'sdpa_fp16_ms')} | {_us(e, 'int8_old_ms')} | "
                f"{_us(e, 'int8_mma_ms')} | {e.get('old_vs_sdpa', 0):.2f}× | {e.get('mma_vs_sdpa', 0):.2f}× | "
                f"{e.get('mma_vs_old', 0):.1f}× | {e.get('mma_min_cos_vs_sdpa', 0):.5f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-bench", action="store_true", help="correctness only")
    ap.add_argument("--budget-s", type=float, default=140.0, help="watchdog: write results and exit 1 after this")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        log("SKIP: torch is not installed, so no CUDA GPU is present to check (nothing run)")
        RESULT["status"] = "skipped: no torch"
        write_outputs()
        return 0
    if not torch.cuda.is_available():
        log("SKIP: no CUDA GPU present (torch.cuda.is_available() is False); no kernel was run")
        RESULT["status"] = "skipped: no CUDA device"
        write_outputs()
        return 0

    def watchdog():
        RESULT["status"] = f"timeout after {args.budget_s:.0f}s"
        RESULT["failures"].append("watchdog: the run did not finish in time")
        log(f"WATCHDOG: {args.budget_s:.0f}s elapsed, writing partial results and exiting 1")
        write_outputs()
        os._exit(1)

    timer = threading.Timer(args.budget_s, watchdog)
    timer.daemon = True
    timer.start()
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    env = gk.environment(torch)
    env["driver"] = _driver()
    RESULT["env"] = env
    log(f"device: {env.get('device')} cc {env.get('capability')} | torch {env['torch']} | {env.get('nvcc_version')}")
    build_all(torch)
    libs = RESULT.pop("libs", {})
    if "sparse24" in libs:
        probe(torch, libs["sparse24"])
        check_sp24_f16(torch, libs["sparse24"])
        check_sp24_s8(torch, libs["sparse24"])
        check_sp24_tiled(torch, libs["sparse24"])
    if "sparse24_fallback" in libs:
        check_sp24_fallback(torch, libs["sparse24_fallback"])
    if "attention" in libs:
        check_attention(torch, libs["attention"])
    if "attention_fallback" in libs:
        check_attention_fallback(torch, libs["attention_fallback"])
    if "lowbit" in libs:
        check_lowbit(torch, libs["lowbit"])
        check_lowbit_mma(torch, libs["lowbit"])
    if "lowbit_fallback" in libs:
        check_lowbit_fallback(torch, libs["lowbit_fallback"])
    if not args.skip_bench:
        l2 = int(env.get("l2_bytes", 50 << 20))
        if "lowbit" in libs:
            bench_lowbit(torch, libs["lowbit"], l2)
        if "sparse24" in libs:
            bench_sparse(torch, libs["sparse24"], l2)
        if "attention" in libs:
            bench_attention(torch, libs["attention"])
    timer.cancel()
    RESULT["status"] = "fail" if RESULT["failures"] else "pass"
    RESULT["seconds"] = round(time.perf_counter() - t0, 1)
    write_outputs()
    log(markdown(RESULT))
    log(("PASS" if not RESULT["failures"] else f"FAIL ({len(RESULT['failures'])})") + f" in {RESULT['seconds']}s")
    return 1 if RESULT["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
