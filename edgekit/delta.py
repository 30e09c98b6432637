"""Deltas (issue 9, part 2): a release shipped as the tensors that changed against a base release.

A model adapted in the cloud (normalization affine parameters, biases) differs from the one a device runs in a few
small tensors. ``make_delta`` compares two bundles of the same graph and encodes each changed initializer's
difference ``new - base`` with the fewest bits (2, 3, 4, 8 or 16, symmetric, one scale per tensor) whose largest
error stays within ``error_bound`` times that tensor's largest magnitude: a per-layer choice, as in L-GreCo
("Layerwise-Adaptive Gradient Compression") where each layer gets its own compression level. Codes are stored in a
deflated ``.npz``.

Both outputs carry **the same signed manifest**:

- the *result bundle*: the new bundle whose model is the base with the decoded differences applied (the model every
  device ends up with, whether it installs the delta or the full bundle);
- the *delta archive* (``.ekd``): that manifest and signature, the files that differ from the base's, ``delta.json``
  (the base artifact's sha256, the per-tensor encodings, the files to take from the base) and ``delta.npz`` — but
  not the model.

A device applies a delta to the base it serves (``completer``: an ``open_bundle`` hook that rebuilds the model file
before the bundle is verified). The signed manifest lists the rebuilt model's sha256, so a tampered or mismatched
delta cannot install: it fails verification like any altered bundle. A delta whose base is not the installed model
raises ``DeltaBaseMismatch``; the agent then installs the full bundle named in ``delta.json`` when there is one.

ONNX artifacts only (initializers replaced by name). TensorRT engines would be refitted (refittable names are in the
manifest's ``engine`` section) or rebuilt: not written yet.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import BundleError
from edgekit.fsutil import sha256_bytes, sha256_file

log = logging.getLogger(__name__)

META = "delta.json"
PAYLOAD = "delta.npz"
SUFFIX = ".ekd"
BITS = (2, 3, 4, 8, 16)
DELTA_SCHEMA = 1
MAX_PAYLOAD_BYTES = 1 << 30


class DeltaError(BundleError):
    """A delta cannot be made or applied."""


class DeltaBaseMismatch(DeltaError):
    """The delta was made against another model than the one installed here."""

    def __init__(self, message: str, *, full: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.full = full


@dataclass(frozen=True)
class DeltaResult:
    bundle_dir: Path  # the result bundle (sealed folder)
    archive: Path  # the result bundle packed (.ekb)
    delta: Path  # the delta archive (.ekd)
    stats: dict


def encode(base: np.ndarray, new: np.ndarray, error_bound: float) -> tuple[dict, np.ndarray | None]:
    """(meta, codes) for one tensor: the fewest bits whose error stays within ``error_bound * max|new|``, else the
    raw new values (``codes`` is then the float array itself)."""
    if base.shape != new.shape or base.dtype != new.dtype or new.dtype.kind != "f":
        return {"encoding": "raw"}, new
    d = new.astype(np.float64) - base.astype(np.float64)
    peak = float(np.abs(d).max(initial=0.0))
    if peak == 0.0:
        return {"encoding": "zero"}, None
    bound = error_bound * float(np.abs(new).max(initial=0.0))
    for bits in BITS:
        levels = (1 << (bits - 1)) - 1
        scale = peak / levels
        q = np.clip(np.round(d / scale), -levels, levels)
        if float(np.abs(q * scale - d).max()) <= bound:
            dtype = np.int8 if bits <= 8 else np.int16
            return {"encoding": "int", "bits": bits, "scale": scale}, q.astype(dtype)
    return {"encoding": "raw"}, new


def decode(base: np.ndarray, meta: dict, codes: np.ndarray | None) -> np.ndarray:
    kind = meta.get("encoding")
    if kind == "zero":
        return base
    if kind == "raw":
        return np.asarray(codes)
    if kind == "int":
        d = np.asarray(codes, np.float64) * float(meta["scale"])
        return (base.astype(np.float64) + d).astype(base.dtype)
    raise DeltaError(f"unknown delta encoding {kind!r}", hint="upgrade edgekit on the device")


def _graph_without_weights(model) -> bytes:
    import onnx

    g = onnx.GraphProto()
    g.CopyFrom(model.graph)
    for init in g.initializer:
        init.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            init.ClearField(f)
    return g.SerializeToString(deterministic=True)


def rebuild(base_bytes: bytes, tensors: dict[str, dict], arrays: dict[str, np.ndarray]) -> bytes:
    """The base model with each tensor of ``tensors`` decoded and replaced: the same bytes on host and device."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(base_bytes)
    by_name = {i.name: i for i in model.graph.initializer}
    for name, meta in tensors.items():
        if name not in by_name:
            raise DeltaError(f"the delta changes tensor {name!r}, which the base model does not have")
        base = numpy_helper.to_array(by_name[name])
        value = decode(base, meta, arrays.get(name))
        if value.shape != base.shape:
            raise DeltaError(f"the delta gives tensor {name!r} shape {value.shape}, the base has {base.shape}")
        by_name[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return model.SerializeToString(deterministic=True)


def _pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{f"t{i}": a for i, a in enumerate(arrays.values())})
    return buf.getvalue()


def make_delta(base: Path, new: Path, out: Path, key, *, error_bound: float = 1e-3, full: str | None = None,
               trusted_keys=None) -> DeltaResult:
    """The result bundle and the delta archive of ``new`` against ``base`` (bundle folders or archives) in ``out``."""
    import onnx

    from edgekit.bundle import open_bundle, pack, seal

    if not 0.0 < error_bound < 1.0:
        raise DeltaError(f"error bound must be in (0, 1), not {error_bound}")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="edgekit-delta-") as tmp:
        work = Path(tmp)
        b = open_bundle(base, trusted_keys=trusted_keys, workdir=work / "base")
        n = open_bundle(new, trusted_keys=trusted_keys, workdir=work / "new")
        for opened in (b, n):
            if opened.manifest["artifact"].get("format") not in ("onnx", "tensorrt-onnx"):
                raise DeltaError(f"{opened.source} is not an ONNX bundle: deltas replace ONNX initializers")
        base_bytes = b.path(b.manifest["artifact"]["path"]).read_bytes()
        new_model = onnx.load(str(n.path(n.manifest["artifact"]["path"])))
        base_model = onnx.load_from_string(base_bytes)
        if _graph_without_weights(base_model) != _graph_without_weights(new_model):
            raise DeltaError("the two models differ in more than their weights",
                             hint="ship the full bundle: a delta only replaces tensors of the same graph")
        from onnx import numpy_helper

        old = {i.name: numpy_helper.to_array(i) for i in base_model.graph.initializer}
        tensors, arrays, bits = {}, {}, {}
        for init in new_model.graph.initializer:
            value = numpy_helper.to_array(init)
            if np.array_equal(value, old[init.name]):
                continue
            meta, codes = encode(old[init.name], value, error_bound)
            if meta["encoding"] == "zero":
                continue
            tensors[init.name] = meta
            if codes is not None:
                arrays[init.name] = codes
            bits[init.name] = meta.get("bits", 32)
        if not tensors:
            raise DeltaError("the two bundles have the same weights: nothing to ship")
        result_bytes = rebuild(base_bytes, tensors, arrays)
        # the result bundle: the new one with the rebuilt model, sealed again
        result = out / n.manifest["name"]
        if result.exists():
            raise DeltaError(f"{result} exists", hint="choose another --out")
        stage = work / "result"
        shutil.copytree(n.root, stage)
        for name in ("manifest.json", "manifest.sig"):
            (stage / name).unlink()
        art_path = n.manifest["artifact"]["path"]
        (stage / art_path).write_bytes(result_bytes)
        manifest = {k: v for k, v in n.manifest.items() if k not in ("files", "schema_version")}
        manifest["artifact"] = {**manifest["artifact"], "sha256": sha256_bytes(result_bytes),
                                "size": len(result_bytes)}
        manifest["delta_of"] = {"version": b.manifest.get("version"), "artifact_sha256": b.manifest["artifact"][
            "sha256"], "error_bound": error_bound}
        seal(stage, manifest, key)
        # the delta: the same manifest and signature, the files the base does not have as they are, delta.json +
        # delta.npz; no model
        dstage = work / "delta"
        shutil.copytree(stage, dstage)
        (dstage / art_path).unlink()
        base_files = {f["path"]: f["sha256"] for f in b.manifest["files"]}
        sealed = json.loads((stage / "manifest.json").read_text())
        reused = sorted(f["path"] for f in sealed["files"]
                        if f["path"] != art_path and base_files.get(f["path"]) == f["sha256"])
        for path in reused:
            (dstage / path).unlink()
        payload = _pack_arrays(arrays)
        (dstage / PAYLOAD).write_bytes(payload)
        meta = {"schema_version": DELTA_SCHEMA, "artifact": art_path,
                "base_artifact_sha256": sha256_bytes(base_bytes), "result_artifact_sha256": sha256_bytes(result_bytes),
                "tensors": tensors, "order": list(arrays), "from_base": reused, "full": full}
        (dstage / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stage, result)
        archive = pack(result, out / f"{result.name}.ekb")
        delta_path = out / f"{result.name}{SUFFIX}"
        _pack_delta(dstage, delta_path)
    stats = {"tensors": len(tensors), "bits": bits, "delta_bytes": delta_path.stat().st_size,
             "payload_bytes": len(payload), "model_bytes": len(result_bytes), "full_bytes": archive.stat().st_size,
             "files_from_base": len(reused)}
    stats["ratio"] = stats["delta_bytes"] / stats["full_bytes"]
    log.info("delta of %d tensor(s): %d bytes, %.2f%% of the full bundle", len(tensors), stats["delta_bytes"],
             100 * stats["ratio"])
    return DeltaResult(result, archive, delta_path, stats)


def _pack_delta(folder: Path, path: Path) -> None:
    """A deterministic gzip tar of ``folder`` (the bundle packer's format; it refuses unlisted files, so not
    ``bundle.pack``)."""
    import gzip
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(f.relative_to(folder).as_posix())
            info.size, info.mtime, info.mode = f.stat().st_size, 0, 0o644
            with f.open("rb") as fh:
                tar.addfile(info, fh)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))


def is_delta(root: Path) -> bool:
    return (Path(root) / META).is_file()


def completer(base_root: Path | None, base_artifact: str | None) -> Callable[[Path], None]:
    """An ``open_bundle`` hook: when the unpacked folder is a delta, rebuild its model from the base model at
    ``base_root / base_artifact`` and remove the delta files, so that the folder verifies as the full bundle."""

    def complete(root: Path) -> None:
        root = Path(root)
        if not is_delta(root):
            return
        try:
            meta = json.loads((root / META).read_text())
            tensors, order, art = meta["tensors"], meta["order"], meta["artifact"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DeltaError(f"malformed {META}: {exc}") from None
        if not isinstance(art, str) or "/" in art or art.startswith("."):
            raise DeltaError(f"malformed {META}: artifact {art!r}")
        if base_root is None or base_artifact is None:
            raise DeltaBaseMismatch("this is a delta and no model is installed to apply it to", full=meta.get("full"))
        base_path = Path(base_root) / base_artifact
        if sha256_file(base_path) != meta.get("base_artifact_sha256"):
            raise DeltaBaseMismatch("this delta was made for another model than the one installed here",
                                    full=meta.get("full"), hint="install the full bundle")
        if (root / PAYLOAD).stat().st_size > MAX_PAYLOAD_BYTES:
            raise DeltaError(f"{PAYLOAD} is larger than {MAX_PAYLOAD_BYTES} bytes")
        with np.load(root / PAYLOAD, allow_pickle=False) as z:
            arrays = {name: z[f"t{i}"] for i, name in enumerate(order)}
        (root / art).write_bytes(rebuild(base_path.read_bytes(), tensors, arrays))
        for rel in meta.get("from_base") or []:  # unchanged files: as the base has them (verified just after)
            if not isinstance(rel, str) or rel.startswith(("/", ".")) or ".." in Path(rel).parts:
                raise DeltaError(f"malformed {META}: file {rel!r}")
            if not (Path(base_root) / rel).is_file():
                raise DeltaBaseMismatch(f"the installed bundle lacks {rel}, which the delta reuses",
                                        full=meta.get("full"))
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(base_root) / rel, root / rel)
        (root / META).unlink()
        (root / PAYLOAD).unlink()
        log.info("applied a delta of %d tensor(s) to the installed model", len(tensors))

    return complete
