#!/usr/bin/env python3
"""Build ``libedgekit_ort.so``, the ONNX Runtime custom-op library for the ``ai.edgekit`` domain (stdlib only).

    python runtimes/onnxruntime/build.py             # build (fails loudly)
    python runtimes/onnxruntime/build.py --optional  # what `make install` runs: on failure warn and exit 0,
                                                     # except in CI (the CI variable set), where it fails
    python runtimes/onnxruntime/build.py --force     # rebuild even when the library is newer than its sources

Output: ``edgekit/kernels/_native/libedgekit_ort.so`` (gitignored; ``edgekit.kernels.ort_native`` finds it).

ONNX Runtime's C/C++ API headers are not in the onnxruntime wheel. They come from Debian 13 (trixie)'s
``libonnxruntime-dev`` package, in this order:

1. ``$EDGEKIT_ORT_INCLUDE`` (a folder holding ``onnxruntime_cxx_api.h``);
2. the headers of an installed ``libonnxruntime-dev`` (``/usr/include/onnxruntime``, Debian 13 and later);
3. the cache ``build/ort-headers/`` filled by an earlier run;
4. otherwise the package is downloaded with ``apt-get download`` from the Debian archive that this machine's own
   apt configuration names (``/etc/apt/sources.list``, ``/etc/apt/sources.list.d/*.list|*.sources``: the main
   archive's URI, suite ``trixie``), using a temporary sources list and package lists under ``build/``, and
   unpacked there with ``dpkg-deb -x``. Nothing is installed and no host name is written in the repository.

The library asks ONNX Runtime for the C API version of these headers (1.21: ORT_API_VERSION 21), so it loads in
that and every later ONNX Runtime (the API is versioned and append-only).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = sorted((HERE / "src").glob("*.cc"))
HEADERS = sorted((HERE / "src").glob("*.h"))
OUTPUT = ROOT / "edgekit" / "kernels" / "_native" / "libedgekit_ort.so"
CACHE = ROOT / "build" / "ort-headers"
PACKAGE = "libonnxruntime-dev"
SUITE = "trixie"
MARKER = "onnxruntime_cxx_api.h"
CXXFLAGS = ["-O3", "-pthread", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Wall"]
# GCC 12 warns about its own _mm512_reduce_* helpers (an "uninitialized" __Y in avxintrin.h).
CXXFLAGS += ["-Wno-unused-function", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[edgekit-ort] {msg}", file=sys.stderr, flush=True)


def _has_headers(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "onnxruntime_c_api.h").is_file()


def _cached_include() -> Path | None:
    hits = sorted(CACHE.glob(f"usr/include/**/{MARKER}"))
    return hits[0].parent if hits else None


def apt_archive_sources() -> list[tuple[str, str | None]]:
    """(URI, Signed-By or None) of the main Debian archive entries in this machine's apt configuration.

    Security, updates and backports suites are skipped: the main archive is the entry whose suite is a plain
    release name (``bookworm``, ``stable``...).
    """
    found: list[tuple[str, str | None]] = []

    def plain(suite: str) -> bool:
        return "-" not in suite and "/" not in suite

    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if not line.startswith("deb "):
                continue
            parts = line.split()[1:]
            signed = None
            if parts and parts[0].startswith("["):
                opts = []
                while parts:
                    tok = parts.pop(0)
                    opts.append(tok)
                    if tok.endswith("]"):
                        break
                for o in " ".join(opts).strip("[]").split():
                    if o.startswith("signed-by="):
                        signed = o.split("=", 1)[1]
            if len(parts) >= 2 and plain(parts[1]):
                found.append((parts[0], signed))
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for stanza in text.split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            suites = fields.get("suites", "").split()
            if any(plain(s) for s in suites):
                for uri in fields.get("uris", "").split():
                    found.append((uri, fields.get("signed-by")))
    # Debian's archive first (its URI path ends in /debian); others (mirrors under another path) after.
    found.sort(key=lambda us: 0 if us[0].rstrip("/").endswith("/debian") else 1)
    return found


def fetch_headers() -> Path:
    """Download Debian trixie's libonnxruntime-dev into build/ort-headers and return its include folder."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BuildError(
                f"{tool} not found: cannot fetch ONNX Runtime's headers from Debian's {PACKAGE}; "
                f"set EDGEKIT_ORT_INCLUDE to a folder with {MARKER} (ONNX Runtime >= 1.21)"
            )
    sources = apt_archive_sources()
    if not sources:
        raise BuildError(
            "no Debian archive found in this machine's apt configuration (/etc/apt/sources.list*); "
            "set EDGEKIT_ORT_INCLUDE to a folder with onnxruntime_cxx_api.h"
        )
    work = ROOT / "build" / "ort-apt"
    errors = []
    for uri, signed_by in sources:
        shutil.rmtree(work, ignore_errors=True)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        (work / "deb").mkdir()
        opt = f"[signed-by={signed_by}] " if signed_by else ""
        (work / "sources.list").write_text(f"deb {opt}{uri} {SUITE} main\n")
        apt = [
            "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "Debug::NoLocking=1",
        ]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            apt += ["-o", "APT::Sandbox::User=root"]
        log(f"fetching {PACKAGE} from {SUITE} ({uri}, derived from the apt configuration)")
        try:
            subprocess.run(["apt-get", *apt, "update"], check=True, capture_output=True, text=True, timeout=300)
            subprocess.run(
                ["apt-get", *apt, "download", PACKAGE],
                check=True, capture_output=True, text=True, timeout=300, cwd=work / "deb",
            )  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            errors.append(f"{uri}: {getattr(e, 'stderr', '') or e}".strip())
            continue
        debs = sorted((work / "deb").glob(f"{PACKAGE}_*.deb"))
        if not debs:
            errors.append(f"{uri}: apt-get download produced no .deb")
            continue
        shutil.rmtree(CACHE, ignore_errors=True)
        CACHE.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(CACHE)], check=True, timeout=120)
        (CACHE / "PACKAGE").write_text(debs[0].name + "\n")
        shutil.rmtree(work, ignore_errors=True)
        inc = _cached_include()
        if inc is None:
            raise BuildError(f"{debs[0].name} holds no {MARKER}")
        log(f"headers from {debs[0].name} in {inc}")
        return inc
    raise BuildError(f"could not download {PACKAGE} ({SUITE}): " + " | ".join(errors)[-2000:])


def find_include() -> Path:
    env = os.environ.get("EDGEKIT_ORT_INCLUDE")
    if env:
        if not _has_headers(Path(env)):
            raise BuildError(f"EDGEKIT_ORT_INCLUDE={env} holds no {MARKER}")
        return Path(env)
    for system in (Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime")):
        if _has_headers(system):
            return system
    return _cached_include() or fetch_headers()


def up_to_date(output: Path) -> bool:
    if not output.is_file():
        return False
    newest = max(p.stat().st_mtime for p in [*SOURCES, *HEADERS, Path(__file__)])
    return output.stat().st_mtime >= newest


def compile_library(include: Path, output: Path, jobs: int) -> None:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"C++ compiler {cxx!r} not found (install g++, or set CXX)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgekit-ort-") as tmp:
        objs, pending = [], []
        for src in SOURCES:
            obj = Path(tmp) / (src.stem + ".o")
            objs.append(obj)
            cmd = [cxx, *CXXFLAGS, "-I", str(include), "-I", str(HERE / "src"), "-c", str(src), "-o", str(obj)]
            pending.append((src, cmd))
        running: list[tuple[Path, subprocess.Popen]] = []
        failures = []
        while pending or running:
            while pending and len(running) < jobs:
                src, cmd = pending.pop(0)
                log(f"compiling {src.name}")
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                running.append((src, proc))
            src, proc = running.pop(0)
            out, _ = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"{src.name}:\n{out}")
            elif out.strip():
                log(out.strip())
        if failures:
            raise BuildError("compilation failed:\n" + "\n".join(failures)[-6000:])
        tmp_out = Path(tmp) / output.name
        link = [cxx, "-shared", "-o", str(tmp_out), *map(str, objs), "-pthread", "-Wl,--no-undefined", "-Wl,-O1"]
        res = subprocess.run(link, capture_output=True, text=True)
        if res.returncode != 0:
            raise BuildError("link failed:\n" + res.stdout + res.stderr)
        shutil.move(str(tmp_out), output)
    log(f"built {output}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optional", action="store_true", help="warn and exit 0 on failure, unless CI is set")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--jobs", "-j", type=int, default=2, help="parallel compiler processes (default 2)")
    p.add_argument("--output", type=Path, default=OUTPUT)
    args = p.parse_args(argv)
    try:
        if not args.force and up_to_date(args.output):
            log(f"{args.output} is up to date")
            return 0
        compile_library(find_include(), args.output, max(1, args.jobs))
        return 0
    except (BuildError, OSError, subprocess.SubprocessError) as e:
        msg = f"could not build libedgekit_ort.so: {e}"
        if args.optional and not os.environ.get("CI"):
            log(f"WARNING: {msg}")
            log("WARNING: ai.edgekit ops will run through the reference fallback (edgekit.kernels.ort_python)")
            return 0
        log(f"ERROR: {msg}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
