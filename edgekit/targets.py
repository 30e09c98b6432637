"""Target profiles: what a device runs, how fast, and what counts as a faithful export.

Profiles are TOML files in ``targets/`` (data, never code), validated on load by pydantic models that reject
unknown keys. Code asks ``profile.supports(op, scheme)``; it never branches on a target's name.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgekit.errors import ConfigError

Runtime = Literal["onnxruntime", "tensorrt", "tflite"]
FloatType = Literal["fp32", "fp16", "bf16"]
Granularity = Literal["per-tensor", "per-channel", "group-32", "group-64", "group-128"]
Sparsity = Literal["2:4", "4:8", "unstructured"]
OpKind = Literal["conv", "depthwise_conv", "linear", "embedding"]
# Precision classes, as used for tolerances and for peak compute ("<p>_sparse" = with 2:4 sparsity).
Precision = Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4", "int3", "int2"]
# Verification classes: a precision class, or "structural" for plans that change the architecture (pruned channels,
# removed branches, low rank: the function changes by more than rounding, so fp32/int8 floors cannot apply).
ToleranceClass = Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4", "int3", "int2", "structural"]
PeakKey = Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4", "fp16_sparse", "bf16_sparse", "fp8_sparse",
                  "int8_sparse", "int4_sparse"]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_FLOAT_ACT_BITS = (16, 32)  # activation_bits values that mean float activations


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hardware(_Frozen):
    memory_bytes: int = Field(gt=0)
    bandwidth_gbs: float = Field(gt=0)
    cores: int | None = Field(default=None, gt=0)  # CPU cores available to inference
    peak_gops: dict[PeakKey, float]  # dense peak per compute precision unless the key says _sparse
    isa: list[str] = []
    sm: str | None = Field(default=None, pattern=r"^\d+\.\d+$")  # CUDA compute capability
    dla_cores: int = Field(default=0, ge=0)
    # Channel counts the kernels prefer: structured pruning rounds a channel group's width to a multiple of this.
    channel_multiple: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _positive_peaks(self) -> Hardware:
        bad = [k for k, v in self.peak_gops.items() if v <= 0]
        if bad:
            raise ValueError(f"peak_gops must be positive: {', '.join(bad)}")
        return self


class TensorRTInfo(_Frozen):
    version: str = Field(pattern=r"^\d+\.\d+(\.\d+)*$")
    plugin_api: Literal["v2", "v3"]

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


class OpSupport(_Frozen):
    """Schemes one op kind runs natively. ``activation_bits``: 8 = int8, 16/32 = float activations."""

    float_types: list[FloatType] = ["fp32"]
    weight_bits: list[int] = []
    activation_bits: list[Literal[8, 16, 32]] = []
    granularity: list[Granularity] = []
    granularity_by_bits: dict[int, list[Granularity]] = {}  # overrides `granularity` for these weight bits
    weight_only_bits: list[int] | None = None  # bits with a weight-only (float-activation) kernel; None: all
    symmetric_only: bool = False  # zero-points must be 0 for weights and activations
    sparsity: list[Sparsity] = []
    dynamic_activations: bool = False  # int8 activations may be quantized per call (ORT MatMulInteger)

    @model_validator(mode="after")
    def _check(self) -> OpSupport:
        bad = [b for b in (*self.weight_bits, *self.granularity_by_bits) if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"weight bits must be between 2 and 8, got {bad}")
        extra = sorted(set(self.granularity_by_bits) - set(self.weight_bits))
        if extra:
            raise ValueError(f"granularity_by_bits names bits not in weight_bits: {extra}")
        return self

    def granularities(self, bits: int) -> list[str]:
        return list(self.granularity_by_bits.get(bits, self.granularity))


class Budgets(_Frozen):
    latency_ms: float | None = Field(default=None, gt=0)
    size_mb: float | None = Field(default=None, gt=0)
    memory_mb: float | None = Field(default=None, gt=0)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)  # fraction


class Tolerances(_Frozen):
    min_sqnr_db: float
    min_cosine: float = Field(ge=-1, le=1)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)


@dataclass(frozen=True)
class Scheme:
    """A parsed option string such as ``w8a8``, ``w4g128``, ``fp16`` or ``sparse2:4+w8a8``."""

    float_type: str | None = None  # fp32 / fp16 / bf16 when the weights stay float
    weight_bits: int | None = None
    activation_bits: int | None = None  # None: float activations (weight-only)
    group: int | None = None  # None: per-channel
    sparsity: str | None = None
    dynamic: bool = False  # activations quantized per call rather than with calibrated scales (``w8a8d``)
    symmetric: bool = False  # weight-only without zero points (suffix ``s``: ``w4g128s``)

    @property
    def granularity(self) -> str:
        return f"group-{self.group}" if self.group else "per-channel"

    @property
    def precision(self) -> str:
        """The precision class whose tolerances apply (``int4`` for ``w4g128``, ``int8`` for ``w8a8``)."""
        return f"int{self.weight_bits}" if self.weight_bits else (self.float_type or "fp32")


_QUANT_RE = re.compile(r"^w([2-8])(?:a(8|16|32)(d)?)?(?:g([1-9]\d*)(s)?)?$")
_SPARSE_RE = re.compile(r"^sparse(\d+:\d+|-unstructured)$")
_FLOATS = ("fp32", "fp16", "bf16")


def parse_scheme(scheme: str) -> Scheme:
    """Parse ``fp32|fp16|bf16``, ``w<bits>[a<bits>][g<group>]`` and ``sparse<N:M>|sparse-unstructured``,
    joined by ``+`` in any order (at most one of each kind). Raises ConfigError if unparseable."""
    parts = scheme.split("+")
    sparse = [p for p in parts if p.startswith("sparse")]
    prec = [p for p in parts if not p.startswith("sparse")]
    sm = _SPARSE_RE.match(sparse[0]) if len(sparse) == 1 else None
    qm = _QUANT_RE.match(prec[0]) if len(prec) == 1 else None
    if len(sparse) > 1 or len(prec) > 1 or (sparse and not sm) or (prec and not qm and prec[0] not in _FLOATS):
        raise ConfigError(
            f"cannot parse option {scheme!r}",
            hint="options look like fp16, w8a8, w8, w4g128, sparse2:4+w8a8 (one precision, one sparsity)",
        )
    sparsity = None if sm is None else ("unstructured" if sm[1] == "-unstructured" else sm[1])
    if qm is None:
        return Scheme(float_type=prec[0] if prec else None, sparsity=sparsity)
    if qm[3] and qm[2] != "8":
        raise ConfigError(f"cannot parse option {scheme!r}", hint="dynamic activations are int8: w8a8d")
    return Scheme(weight_bits=int(qm[1]), activation_bits=int(qm[2]) if qm[2] else None,
                  group=int(qm[4]) if qm[4] else None, sparsity=sparsity, dynamic=bool(qm[3]), symmetric=bool(qm[5]))


class TargetProfile(_Frozen):
    name: str = Field(pattern=_NAME_RE.pattern)
    description: str
    runtimes: list[Runtime] = Field(min_length=1)  # preference order
    custom_op_domains: list[str] = []
    hardware: Hardware
    tensorrt: TensorRTInfo | None = None
    ops: dict[OpKind, OpSupport]
    budgets: Budgets = Budgets()
    tolerances: dict[ToleranceClass, Tolerances]
    hardware_table: str | None = None  # relative to the repository root; may not exist yet
    source: str = ""  # the TOML file it came from; set by the loader

    @model_validator(mode="after")
    def _consistent(self) -> TargetProfile:
        if len(set(self.runtimes)) != len(self.runtimes):
            raise ValueError(f"runtimes has duplicates: {self.runtimes}")
        if ("tensorrt" in self.runtimes) != (self.tensorrt is not None):
            raise ValueError("a [tensorrt] table is required exactly when runtimes include 'tensorrt'")
        ops = self.ops.values()
        sm = tuple(int(x) for x in self.hardware.sm.split(".")) if self.hardware.sm else None
        if self.tensorrt is not None:
            if sm is None:
                raise ValueError("TensorRT targets need hardware.sm (CUDA compute capability)")
            if self.tensorrt.major < 10 and (self.tensorrt.plugin_api != "v2" or any(
                    "bf16" in o.float_types or any(b < 8 for b in o.weight_bits) for o in ops)):
                raise ValueError("TensorRT < 10 has V2 plugins only and no INT4 or BF16")
        if sm is not None and sm < (8, 0) and any(s != "unstructured" for o in ops for s in o.sparsity):
            raise ValueError("structured sparsity needs sparse tensor cores (sm >= 8.0)")
        if sm is not None and sm < (8, 9) and any(k.startswith("fp8") for k in self.hardware.peak_gops):
            raise ValueError("FP8 needs sm >= 8.9")
        needed = {"fp32"} | {f for o in ops for f in o.float_types} | {f"int{b}" for o in ops for b in o.weight_bits}
        missing = sorted(needed - set(self.tolerances))
        if missing:
            raise ValueError(f"tolerances missing for supported precisions: {', '.join(missing)}")
        return self

    @property
    def runtime(self) -> str:
        """The preferred runtime."""
        return self.runtimes[0]

    @property
    def edgekit_kernels(self) -> bool:
        """Whether the target's runtime carries edgekit's native kernels (``ai.edgekit`` in ``custom_op_domains``):
        ONNX Runtime's custom-op library, or the TensorRT plugins."""
        return "ai.edgekit" in self.custom_op_domains

    def supports(self, op: str, scheme: str) -> bool:
        """Whether ``op`` ("conv", "depthwise_conv", "linear") runs ``scheme`` natively on this target.

        Unknown op kinds give False; an unparseable scheme raises ConfigError. Weight-only schemes (no ``a``
        part) need float activations (16/32) in ``activation_bits``. Groups go with weight-only schemes only,
        sparsity with float or integer-activation schemes only.
        """
        s = parse_scheme(scheme)
        o = self.ops.get(op)  # type: ignore[call-overload]
        if o is None:
            return False
        if s.sparsity is not None and s.sparsity not in o.sparsity:
            return False
        if s.weight_bits is None:
            return s.float_type in o.float_types if s.float_type else bool(o.float_types)
        if s.weight_bits not in o.weight_bits or s.granularity not in o.granularities(s.weight_bits):
            return False
        if o.symmetric_only and s.group is not None and not s.symmetric:
            return False
        if s.activation_bits is None or s.activation_bits in _FLOAT_ACT_BITS:  # weight-only
            if o.weight_only_bits is not None and s.weight_bits not in o.weight_only_bits:
                return False
            acts = _FLOAT_ACT_BITS if s.activation_bits is None else (s.activation_bits,)
            return s.sparsity is None and any(a in o.activation_bits for a in acts)
        if s.dynamic and not o.dynamic_activations:
            return False
        return s.group is None and s.activation_bits in o.activation_bits

    def tolerance_for(self, precision: str) -> Tolerances:
        """Verification tolerances for a precision class ("fp32", "fp16", "int8", "int4", ...)."""
        try:
            return self.tolerances[precision]  # type: ignore[index]
        except KeyError:
            raise ConfigError(
                f"target {self.name!r} has no tolerances for {precision!r}",
                hint=f"add a [tolerances.{precision}] table to {self.source or 'the profile'} "
                f"(it has: {', '.join(self.tolerances)})",
            ) from None


def targets_dir() -> Path:
    """Where profiles live: $EDGEKIT_TARGETS_DIR, else the installed wheel's copy, else the repo's targets/."""
    env = os.environ.get("EDGEKIT_TARGETS_DIR")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise ConfigError(f"EDGEKIT_TARGETS_DIR={env} is not a directory", hint="unset it or point it at targets/")
        return p
    packaged = Path(__file__).resolve().parent / "_targets"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "targets"


def list_targets() -> list[TargetProfile]:
    """Every profile in ``targets_dir()``, sorted by name."""
    return sorted((_load_file(p) for p in targets_dir().glob("*.toml")), key=lambda t: t.name)


def load_target(name_or_path: str | os.PathLike[str]) -> TargetProfile:
    """Load a profile by name (``targets_dir()/<name>.toml``) or by a path to a ``.toml`` file."""
    s = os.fspath(name_or_path)
    if s.endswith(".toml"):
        return _load_file(Path(s))
    path = targets_dir() / f"{s}.toml"
    if not _NAME_RE.match(s) or not path.is_file():
        known = sorted(p.stem for p in targets_dir().glob("*.toml"))
        raise ConfigError(
            f"unknown target {s!r}",
            hint=f"known targets: {', '.join(known) or '(none)'}; or pass a path to a .toml profile",
        )
    return _load_file(path)


def _load_file(path: Path) -> TargetProfile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"target profile not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read target profile {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "source" in data:
        raise ConfigError(f"{path}: key 'source' is set by the loader; remove it from the file")
    try:
        profile = TargetProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid target profile:\n" + _describe(exc),
                          hint="compare with a shipped profile such as targets/cpu-x86.toml") from None
    if profile.name != path.stem:
        raise ConfigError(f"{path}: name {profile.name!r} does not match the file name {path.stem!r}")
    return profile.model_copy(update={"source": str(path)})


def _describe(exc: ValidationError) -> str:
    """One readable line per pydantic error, naming the offending key."""
    lines = []
    for e in exc.errors():
        key = ".".join(str(p) for p in e["loc"] if p != "[key]")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"  missing key '{key}'")
        elif key:
            got = repr(e.get("input"))
            lines.append(f"  '{key}': {msg} (got {got[:60] + '...' if len(got) > 60 else got})")
        else:
            lines.append(f"  {msg}")
    return "\n".join(lines)
