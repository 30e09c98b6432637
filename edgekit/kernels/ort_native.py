"""Load the native ONNX Runtime custom-op library for ``ai.edgekit`` (``libedgekit_ort.so``), or fall back.

The library is built from ``runtimes/onnxruntime/`` by ``runtimes/onnxruntime/build.py`` (``make install`` runs
it) into ``edgekit/kernels/_native/``. It implements ``ai.edgekit::MatMulLowBit`` (with the extra INT attribute
``accuracy_level``: 0 = fp32 math, the default; 4 = activations quantized per row to int8 and multiplied with
VNNI) and ``ai.edgekit::MatMulSparse24`` (every variant of ``edgekit.kernels.sparse24``).

Usage::

    so = onnxruntime.SessionOptions()
    native = register(so)            # True: native library; False: reference fallback (a warning says why)
    model = model if native else ort_python.to_contrib_domain(model)
    sess = onnxruntime.InferenceSession(model.SerializeToString(), so)

Environment: ``EDGEKIT_ORT_LIBRARY`` names the library file explicitly; ``EDGEKIT_ORT_ISA=scalar|avx2|avx512``
forces a kernel path, read each time the library is registered (the library refuses a path the CPU lacks).

Imports nothing beyond the standard library at module level (no torch, no onnxruntime).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

LIBRARY_NAME = "libedgekit_ort.so"
NATIVE_DIR = Path(__file__).with_name("_native")
ISAS = ("scalar", "avx2", "avx512")


def library_path() -> Path | None:
    """The built native library, or None when it is absent (``$EDGEKIT_ORT_LIBRARY`` first, then ``_native/``)."""
    env = os.environ.get("EDGEKIT_ORT_LIBRARY")
    if env:
        return Path(env) if Path(env).is_file() else None
    candidate = NATIVE_DIR / LIBRARY_NAME
    return candidate if candidate.is_file() else None


def _cdll() -> ctypes.CDLL | None:
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    for name in ("edgekit_ort_isa", "edgekit_ort_best_isa"):
        getattr(lib, name).restype = ctypes.c_char_p
    return lib


def best_isa() -> str | None:
    """The kernel path the library picks on this CPU without ``EDGEKIT_ORT_ISA`` (None without the library)."""
    lib = _cdll()
    return None if lib is None else lib.edgekit_ort_best_isa().decode()


def active_isa() -> str | None:
    """The kernel path of the latest registration in this process (None without the library)."""
    lib = _cdll()
    return None if lib is None else lib.edgekit_ort_isa().decode()


def register_native(so) -> bool:
    """Register the native library with ``so`` (an ``onnxruntime.SessionOptions``); False when it is not built.

    Errors of the library itself (a forced ISA the CPU lacks, an ONNX Runtime older than its headers) raise.
    """
    path = library_path()
    if path is None:
        return False
    so.register_custom_ops_library(str(path))
    return True


def register(so) -> bool:
    """Register ``ai.edgekit`` ops with ``so``: the native library when built, else the Python reference.

    Returns True for the native library. Otherwise registers ``ort_python``'s library (MatMulLowBit only, in the
    ``ai.onnx.contrib`` domain: rewrite the model with ``ort_python.to_contrib_domain``), warns with the reason,
    and returns False.
    """
    if register_native(so):
        return True
    where = os.environ.get("EDGEKIT_ORT_LIBRARY") or str(NATIVE_DIR / LIBRARY_NAME)
    warnings.warn(
        f"edgekit: native ai.edgekit kernels not found ({where} is missing; build them with "
        "`python runtimes/onnxruntime/build.py`): MatMulLowBit runs through the onnxruntime-extensions "
        "reference fallback (slow), and MatMulSparse24 is unavailable",
        RuntimeWarning,
        stacklevel=2,
    )
    from edgekit.kernels import ort_python

    so.register_custom_ops_library(ort_python.register_python_op())
    return False


def session_options(intra_op_num_threads: int = 0):
    """New ``onnxruntime.SessionOptions`` with ``ai.edgekit`` registered (see ``register``) and the thread count.

    Returns ``(so, native)``; ``native`` False means the model must go through ``ort_python.to_contrib_domain``.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_num_threads
    return so, register(so)
