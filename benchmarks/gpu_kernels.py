#!/usr/bin/env python3
"""MatMulLowBit CUDA kernel on a GPU: correctness against the numpy reference, then speed against dense torch.

Run from the repository root on a machine with an NVIDIA GPU, torch (CUDA) and nvcc or CuPy::

    python3 benchmarks/gpu_kernels.py [--backend auto|nvcc|cupy] [--skip-bench]

1. Builds ``edgekit/kernels/cuda/matmul_lowbit.cu`` (nvcc -> shared library via ctypes; else CuPy/NVRTC).
2. Correctness: bits 2/3/4/8 x group 32/128 x M 1/8/128 x (K, N) in (384,384) (384,1536) (1536,384) (4096,4096),
   plus small shapes with K and N off the tile sizes; random codes, random scales, zero points given for group
   32 and implicit (symmetric) for group 128. Each output is compared with ``lowbit.reference_matmul`` (numpy):
   ``allclose(rtol=1e-3, atol=1e-3 * max|Y_ref|)``.
3. Speed: M = 1 and 16 on (K, N) = (4096, 4096) and (4096, 11008), group 128, against ``torch.matmul`` with the
   dequantized weights in fp16 and fp32 (TF32 off) in the same run. Median over samples of CUDA-event-timed
   batches; each batch starts behind a ``torch.cuda._sleep`` so that the GPU never waits for Python launches, and
   rotates through enough weight copies to exceed 4x the L2 cache, so that weights stream from HBM.

Prints a PASS/FAIL summary, writes ``$OUT/gpu_kernels.json`` when ``$OUT`` is set, exits 1 on any correctness or
build failure. Without torch or a CUDA device it says so and exits 0. Needs only numpy, torch and nvcc or CuPy
(not the edgekit virtualenv): the repository root is put on ``sys.path``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekit.kernels import lowbit  # noqa: E402  (numpy only)
from edgekit.kernels.cuda import build  # noqa: E402

CHECK_SHAPES = [(384, 384), (384, 1536), (1536, 384), (4096, 4096)]
CHECK_MS = (1, 8, 128)
EXTRA_CASES = [(200, 50, (3,)), (1000, 33, (5,)), (4160, 100, (2, 17))]  # (K, N, Ms): padding, masking, tiles
BENCH_SHAPES = [(4096, 4096), (4096, 11008)]
BENCH_MS = (1, 16)
BENCH_GROUP = 128


def write_json(result: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_kernels.json").write_text(json.dumps(result, indent=2))


def random_weights(rng, K: int, N: int, bits: int, group: int, with_zp: bool):
    """Random codes, scales (about 1/2^(bits-1), so outputs are O(1)) and optional zero points; packed."""
    Kp = lowbit.padded_k(K, group)
    q = np.zeros((N, Kp), dtype=np.uint8)
    q[:, :K] = rng.integers(0, 1 << bits, size=(N, K), dtype=np.uint8)
    groups = Kp // group
    scales = (rng.uniform(0.5, 1.5, size=(N, groups)) / (1 << (bits - 1)) / np.sqrt(K)).astype(np.float32)
    zp = rng.integers(0, 1 << bits, size=(N, groups), dtype=np.uint8) if with_zp else None
    return lowbit.pack(q, bits), scales, zp


def smoke_test(torch, backend) -> None:
    """One tiny launch, so that a library that builds but cannot run (driver, arch) falls through to CuPy."""
    rng = np.random.default_rng(1)
    rows = check_case(torch, backend, rng, 64, 16, 4, 32, (1,))
    if not rows[0]["ok"]:
        raise RuntimeError(f"smoke test mismatch: {rows[0]}")


def load_backend(torch, choice: str, log: list[str]):
    """(name, object with .matmul) for the requested backend; raises when none builds and runs."""
    errors = []
    if choice in ("auto", "nvcc") and build.find_nvcc():
        try:
            t0 = time.perf_counter()
            lib = build.LowBitLibrary(build.compile_shared(Path(tempfile.mkdtemp(prefix="edgekit-cuda-"))))
            log.append(f"built with nvcc in {time.perf_counter() - t0:.1f}s")
            smoke_test(torch, lib)
            return "nvcc", lib
        except Exception as e:  # noqa: BLE001 - reported, then the next backend is tried
            errors.append(f"nvcc: {type(e).__name__}: {e}")
    elif choice == "nvcc":
        errors.append("nvcc: not found")
    if choice in ("auto", "cupy"):
        try:
            t0 = time.perf_counter()
            mod = build.CupyLowBit()
            log.append(f"built with CuPy/NVRTC in {time.perf_counter() - t0:.1f}s")
            smoke_test(torch, mod)
            return "cupy", mod
        except Exception as e:  # noqa: BLE001
            errors.append(f"cupy: {type(e).__name__}: {e}")
    log.extend(errors)
    raise RuntimeError("no backend could build and run the kernel: " + " | ".join(errors))


class GpuOp:
    """MatMulLowBit weights on the GPU and a launch closure."""

    def __init__(self, torch, backend, packed, scales, zp, *, K, N, bits, group):
        self.torch, self.backend = torch, backend
        self.B = torch.from_numpy(packed).cuda()
        self.S = torch.from_numpy(scales).cuda()
        self.Z = None if zp is None else torch.from_numpy(zp).cuda()
        self.K, self.N, self.bits, self.group = K, N, bits, group

    def __call__(self, A, Y) -> None:
        self.backend.matmul(
            A.data_ptr(),
            self.B.data_ptr(),
            self.S.data_ptr(),
            None if self.Z is None else self.Z.data_ptr(),
            Y.data_ptr(),
            M=A.shape[0],
            N=self.N,
            K=self.K,
            bits=self.bits,
            group_size=self.group,
            stream=self.torch.cuda.current_stream().cuda_stream,
        )


def check_case(torch, backend, rng, K, N, bits, group, Ms) -> list[dict]:
    with_zp = group == 32
    packed, scales, zp = random_weights(rng, K, N, bits, group, with_zp)
    op = GpuOp(torch, backend, packed, scales, zp, K=K, N=N, bits=bits, group=group)
    A_all = rng.standard_normal((sum(Ms), K)).astype(np.float32)
    ref_all = lowbit.reference_matmul(A_all, packed, scales, zp, bits=bits, group_size=group, K=K, N=N)
    rows, start = [], 0
    for M in Ms:
        A, ref = A_all[start : start + M], ref_all[start : start + M]
        start += M
        A_d = torch.from_numpy(A).cuda()
        Y_d = torch.full((M, N), float("nan"), device="cuda")
        op(A_d, Y_d)
        torch.cuda.synchronize()
        Y = Y_d.cpu().numpy()
        scale = float(np.abs(ref).max()) or 1.0
        err = float(np.nanmax(np.abs(Y - ref))) if np.isfinite(Y).all() else float("inf")
        ok = bool(np.isfinite(Y).all() and np.allclose(Y, ref, rtol=1e-3, atol=1e-3 * scale))
        rows.append(
            dict(
                K=K, N=N, M=M, bits=bits, group=group, zero_points=with_zp, max_abs_err=err, rel_err=err / scale, ok=ok
            )
        )
    return rows


def timed(torch, fns, *, reps=20, samples=25) -> dict:
    """Median ms per call; fns are rotated (distinct weight copies) and queued behind a GPU sleep."""
    for f in fns[: min(len(fns), 3)]:
        f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sleep = getattr(torch.cuda, "_sleep", None)  # private but long-standing; without it launches may gap
    sleep_cycles, times, cpu_bound, i = 2_000_000, [], 0, 0
    for _ in range(samples):
        if sleep is not None:
            sleep(sleep_cycles)
        t0 = time.perf_counter()
        start.record()
        for _ in range(reps):
            fns[i % len(fns)]()
            i += 1
        end.record()
        enqueue_ms = (time.perf_counter() - t0) * 1e3
        end.synchronize()
        gpu_ms = start.elapsed_time(end)
        times.append(gpu_ms / reps)
        if enqueue_ms > 0.5 * sleep_cycles / 1.5e6 and sleep_cycles < 64_000_000:  # sleep may not cover queueing
            sleep_cycles *= 2
            cpu_bound += 1
    return {
        "ms": statistics.median(times),
        "min_ms": min(times),
        "samples": samples,
        "reps": reps,
        "sleep_extended": cpu_bound,
        "queued_behind_sleep": sleep is not None,
    }


def copies_for(nbytes: int, l2_bytes: int) -> int:
    return int(min(64, max(2, -(-4 * l2_bytes // max(nbytes, 1)))))


def bench(torch, backend, rng, l2_bytes: int) -> list[dict]:
    rows = []
    for K, N in BENCH_SHAPES:
        weights = {b: random_weights(rng, K, N, b, BENCH_GROUP, False) for b in (2, 3, 4, 8)}
        dequantized = {b: torch.from_numpy(lowbit.dequantize(*w, b, BENCH_GROUP, K)).cuda() for b, w in weights.items()}
        dense = {"fp16": dequantized[4].half(), "fp32": dequantized[4]}  # the 4-bit weights, dequantized
        for M in BENCH_MS:
            A32 = torch.randn(M, K, device="cuda")
            entry = {"K": K, "N": N, "M": M, "dense": {}, "lowbit": {}}
            for name, Wd in dense.items():
                A = A32.to(Wd.dtype)
                copies = [Wd.clone() for _ in range(copies_for(Wd.numel() * Wd.element_size(), l2_bytes))]
                t = timed(torch, [lambda A=A, w=w: torch.matmul(A, w.t()) for w in copies])
                t["weight_GBps"] = Wd.numel() * Wd.element_size() / (t["ms"] * 1e-3) / 1e9
                entry["dense"][name] = t
                del copies
            for bits, (packed, scales, zp) in weights.items():
                nbytes = lowbit.storage_bytes(K, N, bits, BENCH_GROUP, zero_points=False)
                ops = [
                    GpuOp(torch, backend, packed, scales, zp, K=K, N=N, bits=bits, group=BENCH_GROUP)
                    for _ in range(copies_for(nbytes, l2_bytes))
                ]
                Y = torch.empty(M, N, device="cuda")
                ops[0](A32, Y)
                expect = A32 @ dequantized[bits].t()
                scale = float(expect.abs().max())
                t = timed(torch, [lambda op=op, A=A32, Y=Y: op(A, Y) for op in ops])
                t["weight_bytes"] = nbytes
                t["weight_GBps"] = nbytes / (t["ms"] * 1e-3) / 1e9
                t["speedup_vs_fp16"] = entry["dense"]["fp16"]["ms"] / t["ms"]
                t["rel_err_vs_torch_fp32"] = float((Y - expect).abs().max()) / scale
                entry["lowbit"][str(bits)] = t
                del ops
            rows.append(entry)
            d16, d32 = entry["dense"]["fp16"], entry["dense"]["fp32"]
            print(
                f"bench K={K} N={N} M={M}: dense fp16 {d16['ms'] * 1e3:.1f}us ({d16['weight_GBps']:.0f} GB/s), "
                f"fp32 {d32['ms'] * 1e3:.1f}us ({d32['weight_GBps']:.0f} GB/s)"
            )
            for bits, t in entry["lowbit"].items():
                print(
                    f"    w{bits}g{BENCH_GROUP}: {t['ms'] * 1e3:7.1f}us {t['weight_GBps']:6.0f} GB/s "
                    f"x{t['speedup_vs_fp16']:.2f} vs fp16 (rel err vs torch fp32 {t['rel_err_vs_torch_fp32']:.1e})"
                )
        del dequantized, dense
        torch.cuda.empty_cache()
    return rows


def environment(torch) -> dict:
    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": build.find_nvcc(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if env["nvcc"]:
        out = subprocess.run([env["nvcc"], "--version"], capture_output=True, text=True, check=False).stdout
        env["nvcc_version"] = out.strip().splitlines()[-1] if out.strip() else "?"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env |= {
            "device": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count,
            "memory_GiB": round(p.total_memory / 2**30, 1),
            "l2_bytes": getattr(p, "L2_cache_size", 50 << 20),
        }
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("auto", "nvcc", "cupy"), default="auto")
    ap.add_argument("--skip-bench", action="store_true", help="correctness only")
    args = ap.parse_args(argv)
    result: dict = {"status": "skipped", "log": []}
    try:
        import torch
    except ImportError:
        print("SKIP: torch is not installed, so there is no CUDA device to test (nothing run)")
        write_json(result | {"reason": "no torch"})
        return 0
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device (torch.cuda.is_available() is False); the kernel was not run")
        write_json(result | {"reason": "no CUDA device", "env": environment(torch)})
        return 0

    torch.backends.cuda.matmul.allow_tf32 = False
    result["env"] = env = environment(torch)
    print(
        "device:",
        env.get("device"),
        "cc",
        env.get("capability"),
        "| torch",
        env["torch"],
        "cuda",
        env["torch_cuda"],
        "|",
        env.get("nvcc_version", "no nvcc"),
    )
    try:
        result["backend"], backend = load_backend(torch, args.backend, result["log"])
    except Exception as e:  # noqa: BLE001
        print("FAIL: build:", e)
        write_json(result | {"status": "fail", "error": str(e)})
        return 1
    print("backend:", result["backend"], "|", "; ".join(result["log"]))

    rng = np.random.default_rng(0)
    checks, t0 = [], time.perf_counter()
    cases = [(K, N, b, g, CHECK_MS) for K, N in CHECK_SHAPES for b in (2, 3, 4, 8) for g in (32, 128)]
    cases += [(K, N, b, g, Ms) for K, N, Ms in EXTRA_CASES for b in (2, 3, 4, 8) for g in (32, 128)]
    for K, N, bits, group, Ms in cases:
        try:
            rows = check_case(torch, backend, rng, K, N, bits, group, Ms)
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
            rows = [dict(K=K, N=N, M=-1, bits=bits, group=group, ok=False, error=f"{type(e).__name__}: {e}")]
            traceback.print_exc()
        checks += rows
        errs = " ".join(f"M{r['M']}:{r.get('rel_err', float('nan')):.1e}" for r in rows)
        print(f"{'ok  ' if all(r['ok'] for r in rows) else 'FAIL'} K={K:<4} N={N:<4} w{bits}g{group:<3} {errs}")
    failed = [r for r in checks if not r["ok"]]
    result["checks"] = checks
    print(
        f"correctness: {len(checks) - len(failed)}/{len(checks)} passed in {time.perf_counter() - t0:.0f}s, "
        f"worst rel err {max(r.get('rel_err', float('inf')) for r in checks):.2e}"
    )

    if not args.skip_bench:
        try:
            result["bench"] = bench(torch, backend, rng, int(env.get("l2_bytes", 50 << 20)))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["bench_error"] = f"{type(e).__name__}: {e}"
            print("bench failed:", result["bench_error"])
    result["status"] = "fail" if failed else "pass"
    write_json(result)
    print(("PASS" if not failed else f"FAIL ({len(failed)} cases)") + ": MatMulLowBit CUDA vs numpy reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
