"""Deltas (issue 9, part 2): a release shipped as the tensors that changed against a base release.

A model adapted in the cloud (normalization affine parameters, biases) differs from the one a device runs in a few
small tensors. ``make_delta`` compares two bundles of the same graph and encodes what changed, per layer, with the
fewest bits whose error stays within ``error_bound`` times the changed tensor's largest magnitude: a per-layer choice,
as in L-GreCo ("Layerwise-Adaptive Gradient Compression") where each layer gets its own compression level.

- **Norm layers** (the BatchNorm-folded Convs of the bundle's ``adapt.json``, ``edgekit.agent.normtable``): a change
  that is a per-channel affine correction of the layer's output, ``y' = scale * y + shift`` (what the agent's own
  adaptation and the cloud job change), is shipped as ``scale`` and ``shift`` (2 numbers per channel) instead of the
  weight scale, int32 bias and bias scale it rewrites; the device recomputes those tensors with the same function.
- **Any other tensor**: its difference ``new - base``, symmetric integer codes with one scale per tensor (exact for
  integer tensors), or the raw values when no width within 16 bits meets the bound.

The decoded model, not the one given, is the release: ``make_delta`` writes the *result bundle* (the base model with
the decoded changes, sealed and signed) and the *delta* (``.ekd``), which carries that bundle's exact
``manifest.json`` and ``manifest.sig``, the files that differ from the base's and the codes, but not the model. Every
device ends up with the same bytes whether it installs the delta or the full bundle.

The ``.ekd`` format is compact because the models are small: a 48 KB digits bundle leaves 480 bytes for a 1 % delta,
less than one tar header. After the magic ``EKD\\x02`` come sections, each ``id (u8)``, for files a name, then a
varint length and raw DEFLATE data. The manifest and the signature are compressed with the base's own manifest and
signature as the preset dictionary (RFC 1951/zlib ``zdict``), so what did not change costs a few bytes of
back-references; codes are bit-packed.

A device rebuilds the bundle folder from the delta and the bundle it serves (``expand``), then verifies it as any
bundle: the signed manifest lists the rebuilt model's sha256, so a tampered or mismatched delta fails verification.
A delta whose base is not the installed model raises ``DeltaBaseMismatch`` (with the full bundle's location when the
delta names one). ONNX artifacts only (initializers replaced by name); TensorRT engines are refitted by the agent
(``edgekit.agent.engine``) from the rebuilt ONNX model's refittable weights.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import BundleError
from edgekit.fsutil import sha256_bytes, sha256_file

log = logging.getLogger(__name__)

MAGIC = b"EKD\x02"
SUFFIX = ".ekd"
BITS = (2, 3, 4, 5, 6, 8, 12, 16)
DELTA_SCHEMA = 2
MAX_SECTION_BYTES = 256 << 20  # decompressed, per section
MAX_DELTA_BYTES = 1 << 30
BASE_HASH_HEX = 16  # the base model's sha256 prefix in the meta: picks the path; the signed manifest binds the result
ADAPT = "adapt.json"
# section ids
S_MANIFEST, S_SIGNATURE, S_META, S_CODES, S_FILE, S_CODES_STORED, S_SIGNATURE_RAW = 1, 2, 3, 4, 5, 6, 7
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
# the preset dictionary of the meta section (part of format 2: never change it): its keys cost nothing then
META_DICT = (b'{"artifact":"model.onnx","base":"","changes":{"a":[["",5,0.01,6,0.01]],"t":[["",8,0.001]]},'
             b'"full":"","v":2}')


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
    delta: Path  # the delta (.ekd)
    stats: dict


# -- codes --------------------------------------------------------------------------------------------------------
def quantize(d: np.ndarray, bits: int) -> tuple[dict, np.ndarray]:
    """Symmetric integer codes of ``d`` at ``bits`` (one scale): (meta, codes)."""
    levels = (1 << (bits - 1)) - 1
    peak = float(np.abs(d).max(initial=0.0))
    scale = float(f"{peak / levels:.4g}") if peak > 0 else 1.0  # 4 digits: the meta stays short
    q = np.clip(np.round(np.asarray(d, np.float64) / scale), -levels, levels).astype(np.int32)
    return {"encoding": "int", "bits": bits, "scale": scale}, q


def encode(base: np.ndarray, new: np.ndarray, error_bound: float) -> tuple[dict, np.ndarray | None]:
    """(meta, codes) for one tensor: the fewest bits whose error stays within ``error_bound * max|new|`` (integer
    tensors: exactly), else the raw new values (``codes`` is then the array itself)."""
    if base.shape != new.shape or base.dtype != new.dtype or new.dtype.kind not in "fiu":
        return {"encoding": "raw"}, new
    if new.dtype.kind in "iu":
        d = new.astype(np.int64) - base.astype(np.int64)
        peak = int(np.abs(d).max(initial=0))
        if peak == 0:
            return {"encoding": "zero"}, None
        bits = next((b for b in BITS if (1 << (b - 1)) - 1 >= peak), None)
        if bits is None:
            return {"encoding": "raw"}, new
        return {"encoding": "int", "bits": bits, "scale": 1}, d.astype(np.int32)
    d = new.astype(np.float64) - base.astype(np.float64)
    if float(np.abs(d).max(initial=0.0)) == 0.0:
        return {"encoding": "zero"}, None
    bound = error_bound * float(np.abs(new).max(initial=0.0))
    for bits in BITS:
        meta, q = quantize(d, bits)
        if float(np.abs(q * meta["scale"] - d).max()) <= bound:
            return meta, q
    return {"encoding": "raw"}, new


def decode(base: np.ndarray, meta: Mapping, codes: np.ndarray | None) -> np.ndarray:
    kind = meta.get("encoding")
    if kind == "zero":
        return base
    if kind == "raw":
        return np.asarray(codes).astype(base.dtype, copy=False).reshape(base.shape)
    if kind == "int":
        q = np.asarray(codes).reshape(base.shape)
        if base.dtype.kind in "iu":
            info = np.iinfo(base.dtype)
            return np.clip(base.astype(np.int64) + q, info.min, info.max).astype(base.dtype)
        return (base.astype(np.float64) + q.astype(np.float64) * float(meta["scale"])).astype(base.dtype)
    raise DeltaError(f"unknown delta encoding {kind!r}", hint="upgrade edgekit on the device")


def _pack_codes(q: np.ndarray, bits: int) -> bytes:
    levels = (1 << (bits - 1)) - 1
    u = (np.asarray(q, np.int64).ravel() + levels).astype(np.uint32)
    planes = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def _unpack_codes(buf: bytes, bits: int, n: int) -> np.ndarray:
    levels = (1 << (bits - 1)) - 1
    flat = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[: n * bits]
    if flat.size != n * bits:
        raise DeltaError("the delta's codes are truncated")
    u = (flat.reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
    return (u - levels).astype(np.int32)


def _short(meta: Mapping) -> list:
    """A tensor's encoding as it is written: ``[bits, scale]``, bits 0 for raw values."""
    return [meta["bits"], meta["scale"]] if meta.get("encoding") == "int" else [0, 0]


def _long(short) -> dict:  # noqa: ANN001 - JSON
    bits, scale = short
    if not isinstance(bits, int) or bits not in (0, *BITS) or not isinstance(scale, (int, float)):
        raise DeltaError(f"malformed delta: encoding {short!r}")
    return {"encoding": "int", "bits": bits, "scale": scale} if bits else {"encoding": "raw"}


def _raw_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


# -- the model ----------------------------------------------------------------------------------------------------
def _graph_without_weights(model) -> bytes:
    import onnx

    g = onnx.GraphProto()
    g.CopyFrom(model.graph)
    for init in g.initializer:
        init.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            init.ClearField(f)
    return g.SerializeToString(deterministic=True)


def _norm_layers(adapt_path: Path | None) -> list:
    if adapt_path is None or not Path(adapt_path).is_file():
        return []
    from edgekit.agent.normtable import load_table

    try:
        return load_table(adapt_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeltaError(f"cannot read {adapt_path}: {exc}") from None


def rebuild(base_bytes: bytes, changes: Mapping, arrays: Mapping[str, np.ndarray], layers: Sequence = ()) -> bytes:
    """The base model with ``changes`` applied: ``{"t": [[tensor, meta], ...], "a": [[layer, scale meta, shift
    meta], ...]}`` and the decoded codes in ``arrays`` (by tensor name, and ``<layer>:s`` / ``<layer>:t`` for the
    affine entries); the same bytes on host and device."""
    import onnx
    from onnx import numpy_helper

    from edgekit.agent.normtable import initial_values, overrides

    model = onnx.load_from_string(base_bytes)
    by_name = {i.name: i for i in model.graph.initializer}
    values: dict[str, np.ndarray] = {}
    for name, meta in changes.get("t", []):
        if name not in by_name:
            raise DeltaError(f"the delta changes tensor {name!r}, which the base model does not have")
        values[name] = decode(numpy_helper.to_array(by_name[name]), meta, arrays.get(name))
    affine = changes.get("a", [])
    if affine:
        table = {la.name: la for la in layers}
        missing = [a[0] for a in affine if a[0] not in table]
        if missing:
            raise DeltaBaseMismatch(f"the installed bundle has no norm layer(s) {missing} (its {ADAPT})")
        chosen = [table[a[0]] for a in affine]
        source = initial_values(model, chosen)
        scale, shift = {}, {}
        for (layer, ms, mt), la in zip(affine, chosen, strict=True):
            scale[layer] = decode(np.ones(la.channels), ms, arrays.get(f"{layer}:s"))
            shift[layer] = decode(np.zeros(la.channels), mt, arrays.get(f"{layer}:t"))
        values.update(overrides(chosen, source, scale, shift))
    for name, value in values.items():
        base = numpy_helper.to_array(by_name[name])
        if value.shape != base.shape:
            raise DeltaError(f"the delta gives tensor {name!r} shape {value.shape}, the base has {base.shape}")
        by_name[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value.astype(base.dtype)), name))
    return model.SerializeToString(deterministic=True)


def _affine_fit(layer, old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel that best explain the change of ``layer``'s tensors (``normtable.overrides``)."""
    w0, w1 = old[layer.weight].astype(np.float64), new[layer.weight].astype(np.float64)
    if layer.weight_kind == "float":
        a, b = w0.reshape(w0.shape[0], -1), w1.reshape(w1.shape[0], -1)
        s = (a * b).sum(1) / np.maximum((a * a).sum(1), 1e-30)
    else:
        s = w1 / np.where(w0 == 0, 1.0, w0)
    b0, b1 = old[layer.bias].astype(np.float64), new[layer.bias].astype(np.float64)
    if layer.bias_kind == "float":
        t = b1 - b0 * s
    else:
        t = (b1 - b0) * s * old[layer.bias_scale].astype(np.float64)
    return s, t


def _within(a: np.ndarray, b: np.ndarray, bound: float) -> bool:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a64 - b64).max(initial=0.0)) <= bound * max(float(np.abs(b64).max(initial=0.0)), 1e-30)


def _affine_bits(base_bytes: bytes, la, s: np.ndarray, t: np.ndarray, new: Mapping[str, np.ndarray],
                 names: Sequence[str], error_bound: float):  # noqa: ANN001 - a NormLayer
    """The fewest bits for ``scale`` (the weight-scale tensors within the bound, shift exact) for which some width of
    ``shift`` puts every tensor within the bound, and that width: ``((scale meta, codes), (shift meta, codes))``, or
    None when even 16 bits miss. An int32 bias is held to the bound as the float bias it encodes."""
    import onnx
    from onnx import numpy_helper

    def value(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        # an int32 bias is compared as the bias it stands for (times its scale, which follows the weight scale)
        if name == la.bias and la.bias_kind == "qdq":
            return tensors[name].astype(np.float64) * tensors[la.bias_scale].astype(np.float64)
        return tensors[name]

    def ok(qs, qt, which: Sequence[str]) -> bool:
        trial = {"a": [[la.name, qs[0], qt[0]]]}
        got = rebuild(base_bytes, trial, {f"{la.name}:s": qs[1], f"{la.name}:t": qt[1]}, [la])
        rebuilt = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(got).graph.initializer}
        return all(_within(value(rebuilt, n), value(new, n), error_bound) for n in which)

    exact_t = ({"encoding": "raw"}, t.astype(np.float64))
    scale_tensors = [n for n in (la.weight, la.bias_scale) if n is not None]
    for bits_s in BITS:  # the bias depends on the scale too: a scale that is fine alone may leave no shift width
        qs = quantize(s - 1.0, bits_s)
        if not ok(qs, exact_t, scale_tensors):
            continue
        qt = next((q for q in (quantize(t, b) for b in BITS) if ok(qs, q, names)), None)
        if qt is not None:
            return qs, qt
    return None


def _encode_changes(base_bytes: bytes, new_model, layers: Sequence, error_bound: float):
    """(changes, arrays) for make_delta: affine entries for the norm layers whose change is one, the rest per
    tensor."""
    import onnx
    from onnx import numpy_helper

    base_model = onnx.load_from_string(base_bytes)
    old = {i.name: numpy_helper.to_array(i) for i in base_model.graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in new_model.graph.initializer}
    changed = {n for n in new if not np.array_equal(new[n], old[n])}
    changes: dict = {"t": [], "a": []}
    arrays: dict[str, np.ndarray] = {}
    for la in layers:
        names = [n for n in (la.weight, la.bias, la.bias_scale) if n is not None]
        if not changed & set(names) or any(n not in old for n in names):
            continue
        s, t = _affine_fit(la, old, new)
        found = _affine_bits(base_bytes, la, s, t, new, names, error_bound)
        if found is not None:
            (ms, qs), (mt, qt) = found
            changes["a"].append([la.name, ms, mt])
            arrays[f"{la.name}:s"], arrays[f"{la.name}:t"] = qs, qt
            changed -= set(names)
    for name in sorted(changed):
        meta, codes = encode(old[name], new[name], error_bound)
        if meta["encoding"] == "zero":
            continue
        changes["t"].append([name, meta])
        if codes is not None:
            arrays[name] = codes
    return changes, arrays


# -- the container ------------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _deflate(data: bytes, zdict: bytes | None) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=zdict[-32768:]) if zdict else \
        zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return c.compress(data) + c.flush()


def _inflate(data: bytes, zdict: bytes | None) -> bytes:
    d = zlib.decompressobj(-15, zdict=zdict[-32768:]) if zdict else zlib.decompressobj(-15)
    out = d.decompress(data, MAX_SECTION_BYTES)
    if d.unconsumed_tail:
        raise DeltaError(f"a section of the delta inflates past {MAX_SECTION_BYTES} bytes")
    return out + d.flush()


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise DeltaError("the delta is truncated")
        self.pos += 1
        return self.buf[self.pos - 1]

    def varint(self) -> int:
        n = shift = 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n
            if shift > 63:
                raise DeltaError("malformed delta (length)")

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise DeltaError("the delta is truncated")
        self.pos += n
        return self.buf[self.pos - n: self.pos]


def write_delta(path: Path, base_root: Path, manifest: bytes, signature: bytes, meta: dict, codes: bytes,
                files: Mapping[str, bytes]) -> None:
    base_root = Path(base_root)

    def base_file(name: str) -> bytes | None:
        p = base_root / name
        return p.read_bytes() if p.is_file() else None

    base_manifest = base_file(MANIFEST)
    out = bytearray(MAGIC)
    changes = meta["changes"]
    short = {**meta, "changes": {"t": [[n, *_short(m)] for n, m in changes.get("t", [])],
                                 "a": [[la, *_short(ms), *_short(mt)] for la, ms, mt in changes.get("a", [])]}}
    sections = [(S_META, None, json.dumps(short, separators=(",", ":"), sort_keys=True).encode(), META_DICT),
                (S_MANIFEST, None, manifest, base_manifest), (S_SIGNATURE, None, signature, base_file(SIGNATURE)),
                (S_CODES, None, codes, None)]
    sections += [(S_FILE, name, data, base_file(name)) for name, data in sorted(files.items())]
    for sid, name, data, zdict in sections:
        if sid == S_SIGNATURE:  # as raw bytes when they rebuild the file: base64 and the key's id cost ~30 bytes
            raw = _raw_signature(zdict, data)
            if raw is not None:
                sid, data, zdict = S_SIGNATURE_RAW, raw, None
        body = _deflate(data, zdict)
        if sid == S_SIGNATURE_RAW:
            body = data
        if sid == S_CODES and len(body) >= len(data):  # bit-packed codes rarely deflate: stored as they are
            sid, body = S_CODES_STORED, data
        out.append(sid)
        if name is not None:
            out += _varint(len(name.encode())) + name.encode()
        out += _varint(len(body)) + body
    Path(path).write_bytes(bytes(out))


def _signature_file(base_sig: bytes | None, raw: bytes) -> bytes:
    """The signature file ``bundle.seal`` writes, from its raw parts: the 64-byte signature (signed by the base's
    key: the rest as the base's file has it) or the 32-byte public key and the signature (another key)."""
    import base64

    from edgekit.bundle import SIGNATURE_ALGORITHM, _canonical_json

    try:
        if len(raw) == 64 and base_sig is not None:
            doc = json.loads(base_sig)
        elif len(raw) == 96:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            from edgekit.keys import key_id

            doc = {"algorithm": SIGNATURE_ALGORITHM, "key_id": key_id(Ed25519PublicKey.from_public_bytes(raw[:32])),
                   "public_key": base64.b64encode(raw[:32]).decode("ascii")}
        else:
            raise DeltaError("malformed delta: its signature")
        doc["signature"] = base64.b64encode(raw[-64:]).decode("ascii")
    except (ValueError, TypeError) as exc:
        raise DeltaError(f"malformed delta: its signature ({exc})") from None
    return _canonical_json(doc)


def _raw_signature(base_sig: bytes | None, sig: bytes) -> bytes | None:
    """The raw parts of ``sig`` (see ``_signature_file``) when they rebuild it byte for byte, else None."""
    import base64

    try:
        doc = json.loads(sig)
        raw = base64.b64decode(doc["signature"])
        for parts in (raw, base64.b64decode(doc["public_key"]) + raw):
            try:
                if _signature_file(base_sig, parts) == sig:
                    return parts
            except DeltaError:
                continue
    except (ValueError, TypeError, KeyError):
        pass
    return None


def is_delta(path: Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _split(path: Path) -> list[tuple[int, str | None, bytes]]:
    """The sections of a delta file, still compressed."""
    from edgekit.bundle import _relpath

    if Path(path).stat().st_size > MAX_DELTA_BYTES:
        raise DeltaError(f"{path} is larger than {MAX_DELTA_BYTES} bytes")
    r = _Reader(Path(path).read_bytes())
    if r.take(len(MAGIC)) != MAGIC:
        raise DeltaError(f"{path} is not an edgekit delta")
    out = []
    try:
        while r.pos < len(r.buf):
            sid = r.byte()
            if sid not in (S_MANIFEST, S_SIGNATURE, S_META, S_CODES, S_FILE, S_CODES_STORED, S_SIGNATURE_RAW):
                raise DeltaError(f"malformed delta: unknown section {sid}", hint="upgrade edgekit on the device")
            name = _relpath(r.take(r.varint()).decode(), "delta file") if sid == S_FILE else None
            out.append((sid, name, r.take(r.varint())))
    except UnicodeDecodeError:
        raise DeltaError("malformed delta: a file name is not UTF-8") from None
    return out


def read_meta(path: Path) -> dict:
    """The delta's meta (base model hash, full bundle, changes): readable without the base."""
    try:
        body = next(b for sid, _, b in _split(path) if sid == S_META)
        meta = json.loads(_inflate(body, META_DICT))
    except StopIteration:
        raise DeltaError("malformed delta: no meta section") from None
    except (zlib.error, ValueError, UnicodeDecodeError) as exc:
        raise DeltaError(f"the delta is corrupt: {exc}") from None
    try:
        c = meta["changes"]
        meta["changes"] = {"t": [[n, _long([b, sc])] for n, b, sc in c.get("t", [])],
                           "a": [[la, _long([b1, s1]), _long([b2, s2])] for la, b1, s1, b2, s2 in c.get("a", [])]}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DeltaError(f"malformed delta: its changes ({type(exc).__name__}: {exc})") from None
    return meta


def check_base(meta: Mapping, base_root: Path | None) -> None:
    """Raise ``DeltaBaseMismatch`` unless ``base_root`` holds the model the delta was made against."""
    full = meta.get("full")
    if base_root is None:
        raise DeltaBaseMismatch("this is a delta and no model is installed to apply it to", full=full)
    art = meta.get("artifact")
    base_model = Path(base_root) / art if isinstance(art, str) and "/" not in art and ".." not in art else None
    if base_model is None or not base_model.is_file() or not isinstance(meta.get("base"), str) or \
            sha256_file(base_model)[:BASE_HASH_HEX] != meta["base"]:
        raise DeltaBaseMismatch("this delta was made for another model than the one installed here", full=full,
                                hint="install the full bundle")


def read_delta(path: Path, base_root: Path) -> tuple[bytes, bytes, dict, bytes, dict[str, bytes]]:
    """(manifest, signature, meta, codes, files) of a delta made against the bundle at ``base_root`` (checked
    first: the manifest and signature inflate with the base's as their dictionary)."""
    meta = read_meta(path)
    check_base(meta, base_root)

    def base_file(name: str) -> bytes | None:
        p = Path(base_root) / name
        return p.read_bytes() if p.is_file() else None

    got: dict = {}
    files: dict[str, bytes] = {}
    try:
        for sid, name, body in _split(path):
            if sid == S_FILE:
                if name in (MANIFEST, SIGNATURE) or name in files:
                    raise DeltaError(f"malformed delta: file {name!r}")
                files[name] = _inflate(body, base_file(name))
            elif sid == S_MANIFEST:
                got[sid] = _inflate(body, base_file(MANIFEST))
            elif sid == S_SIGNATURE:
                got[S_SIGNATURE] = _inflate(body, base_file(SIGNATURE))
            elif sid == S_SIGNATURE_RAW:  # the signature file rebuilt from its raw parts
                got[S_SIGNATURE] = _signature_file(base_file(SIGNATURE), body)
            elif sid == S_CODES:
                got[S_CODES] = _inflate(body, None)
            elif sid == S_CODES_STORED:
                got[S_CODES] = body
        return got[S_MANIFEST], got[S_SIGNATURE], meta, got[S_CODES], files
    except zlib.error as exc:
        raise DeltaError(f"the delta is corrupt: {exc}") from None
    except KeyError as exc:
        raise DeltaError(f"malformed delta: no section {exc}") from None


def _code_list(changes: Mapping, base_bytes: bytes, layers: Sequence) -> list[tuple[str, dict, int, np.dtype]]:
    """(key, meta, count, dtype) of every code array, in the order they are written."""
    import onnx

    model = onnx.load_from_string(base_bytes)
    dims = {i.name: (int(np.prod(i.dims, dtype=np.int64)), i.data_type) for i in model.graph.initializer}
    channels = {la.name: la.channels for la in layers}
    out = []
    for name, meta in changes.get("t", []):
        if name not in dims:
            raise DeltaError(f"the delta changes tensor {name!r}, which the base model does not have")
        n, etype = dims[name]
        out.append((name, meta, n, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(etype))))
    for layer, ms, mt in changes.get("a", []):
        if layer not in channels:
            raise DeltaBaseMismatch(f"the installed bundle has no norm layer {layer!r} (its {ADAPT})")
        out += [(f"{layer}:s", ms, channels[layer], np.dtype(np.float64)),
                (f"{layer}:t", mt, channels[layer], np.dtype(np.float64))]
    return out


def _write_codes(items, arrays: Mapping[str, np.ndarray]) -> bytes:  # noqa: ANN001 - _code_list's
    buf = io.BytesIO()
    for key, meta, _, _ in items:
        if key not in arrays:
            continue
        q = arrays[key]
        buf.write(_pack_codes(q, meta["bits"]) if meta.get("encoding") == "int" else _raw_bytes(q))
    return buf.getvalue()


def _read_codes(items, codes: bytes) -> dict[str, np.ndarray]:  # noqa: ANN001 - _code_list's
    arrays, pos = {}, 0
    for key, meta, n, dtype in items:
        if meta.get("encoding") == "int":
            size = (n * meta["bits"] + 7) // 8
            arrays[key] = _unpack_codes(codes[pos: pos + size], meta["bits"], n)
        elif meta.get("encoding") == "raw":
            le = dtype.newbyteorder("<")
            size = n * le.itemsize
            if pos + size > len(codes):
                raise DeltaError("the delta's codes are truncated")
            arrays[key] = np.frombuffer(codes[pos: pos + size], le).astype(dtype)
        else:
            continue
        pos += size
    if pos != len(codes):
        raise DeltaError("the delta's codes do not match its changes")
    return arrays


def expand(delta: Path, base_root: Path | None, dest: Path) -> dict:
    """Rebuild the bundle folder of ``delta`` in ``dest`` (new) from the bundle installed at ``base_root``: the
    shipped manifest, signature and files, the model rebuilt from the base's, every other file copied from the base.
    ``dest`` then verifies (``bundle.open_bundle``) exactly as the full bundle would. Returns the delta's meta."""
    from edgekit.bundle import _relpath

    manifest_bytes, sig, meta, codes, files = read_delta(delta, base_root)
    base_root = Path(base_root)
    full = meta.get("full")
    try:
        manifest = json.loads(manifest_bytes)
        art = _relpath(meta["artifact"], "artifact")
        listed = [_relpath(f["path"], "manifest file") for f in manifest["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DeltaError(f"malformed delta: {exc}") from None
    base_model = base_root / art
    changes = meta["changes"]
    layers = _norm_layers(base_root / ADAPT) if changes.get("a") else []
    try:
        base_bytes = base_model.read_bytes()
        model = rebuild(base_bytes, changes, _read_codes(_code_list(changes, base_bytes, layers), codes), layers)
    except DeltaError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise DeltaError(f"malformed delta: {type(exc).__name__}: {exc}") from None
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    (dest / MANIFEST).write_bytes(manifest_bytes)
    (dest / SIGNATURE).write_bytes(sig)
    for rel in listed:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == art:
            target.write_bytes(model)
        elif rel in files:
            target.write_bytes(files[rel])
        elif (base_root / rel).is_file():  # unchanged: as the base has it (verified with the rest just after)
            shutil.copyfile(base_root / rel, target)
        else:
            raise DeltaBaseMismatch(f"the installed bundle lacks {rel}, which the delta reuses", full=full)
    log.info("applied a delta of %d tensor(s) and %d norm layer(s) to the installed model",
             len(changes.get("t", [])), len(changes.get("a", [])))
    return meta


def make_delta(base: Path, new: Path, out: Path, key, *, error_bound: float = 1e-3, full: str | None = None,
               trusted_keys=None) -> DeltaResult:
    """The result bundle and the delta of ``new`` against ``base`` (bundle folders or archives) in ``out``."""
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
        if n.manifest.get("name") != b.manifest.get("name"):
            raise DeltaError(f"the bundles are of different names ({b.manifest.get('name')!r}, "
                             f"{n.manifest.get('name')!r}): a delta updates one bundle to a later version of itself")
        if not int(n.manifest.get("version", 0)) > int(b.manifest.get("version", 0)):
            raise DeltaError(f"NEW's version {n.manifest.get('version')} is not above BASE's "
                             f"{b.manifest.get('version')}: devices install only newer versions",
                             hint="check the order of BASE and NEW, or rebuild NEW with a higher --bundle-version")
        art_path = n.manifest["artifact"]["path"]
        if b.manifest["artifact"]["path"] != art_path:
            raise DeltaError("the two bundles keep their model under different names")
        base_bytes = b.path(art_path).read_bytes()
        new_model = onnx.load(str(n.path(art_path)))
        if _graph_without_weights(onnx.load_from_string(base_bytes)) != _graph_without_weights(new_model):
            raise DeltaError("the two models differ in more than their weights",
                             hint="ship the full bundle: a delta only replaces tensors of the same graph")
        layers = _norm_layers(b.root / ADAPT)
        changes, arrays = _encode_changes(base_bytes, new_model, layers, error_bound)
        if not changes["t"] and not changes["a"]:
            raise DeltaError("the two bundles have the same weights: nothing to ship")
        result_bytes = rebuild(base_bytes, changes, arrays, layers)
        # the result bundle: the new one with the rebuilt model, sealed again
        result = out / n.manifest["name"]
        if result.exists():
            raise DeltaError(f"{result} exists", hint="choose another --out")
        stage = work / "result"
        shutil.copytree(n.root, stage)
        for name in (MANIFEST, SIGNATURE):
            (stage / name).unlink()
        (stage / art_path).write_bytes(result_bytes)
        manifest = {k: v for k, v in n.manifest.items() if k not in ("files", "schema_version")}
        manifest["artifact"] = {**manifest["artifact"], "sha256": sha256_bytes(result_bytes),
                                "size": len(result_bytes)}
        sealed = seal(stage, manifest, key)
        # the delta: the sealed manifest and signature, the files that differ from the base's, the codes
        base_files = {f["path"]: f["sha256"] for f in b.manifest["files"]}
        shipped = {f["path"]: (stage / f["path"]).read_bytes() for f in sealed["files"]
                   if f["path"] != art_path and base_files.get(f["path"]) != f["sha256"]}
        codes = _write_codes(_code_list(changes, base_bytes, layers), arrays)
        meta = {"v": DELTA_SCHEMA, "artifact": art_path, "base": sha256_bytes(base_bytes)[:BASE_HASH_HEX],
                "full": full, "changes": changes}
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stage, result)
        archive = pack(result, out / f"{result.name}.ekb")
        delta_path = out / f"{result.name}{SUFFIX}"
        write_delta(delta_path, b.root, (stage / MANIFEST).read_bytes(), (stage / SIGNATURE).read_bytes(), meta,
                    codes, shipped)
    bits = {name: m.get("bits", 32) for name, m in changes["t"]}
    bits.update({layer: max(ms.get("bits", 0), mt.get("bits", 0)) for layer, ms, mt in changes["a"]})
    stats = {"tensors": len(changes["t"]), "norm_layers": len(changes["a"]), "bits": bits,
             "delta_bytes": delta_path.stat().st_size, "codes_bytes": len(codes),
             "files_shipped": sorted(shipped), "model_bytes": len(result_bytes),
             "full_bytes": archive.stat().st_size}
    stats["ratio"] = stats["delta_bytes"] / stats["full_bytes"]
    log.info("delta of %d tensor(s) and %d norm layer(s): %d bytes, %.2f%% of the full bundle", len(changes["t"]),
             len(changes["a"]), stats["delta_bytes"], 100 * stats["ratio"])
    return DeltaResult(result, archive, delta_path, stats)
