"""The two tables the allocation engine solves over, and the budget it must respect. Plain data, JSON round trips.

- ``SensitivityTable``: layer × option → distortion of the model output (measured on calibration data).
- ``CostTable``: layer × option → bytes (exact) and latency (measured or estimated), each with its source.
- ``Budget``: upper bounds on total bytes, total latency and average weight bits.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError
from edgekit.fsutil import atomic_write_text

TABLE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SensitivityTable:
    """``values[layer][option]``: output distortion when only ``layer`` takes ``option`` (0 for the float option).

    ``metric`` names the distortion (``kl`` on logits for classifiers, ``mse`` otherwise). ``additivity`` holds the
    check of how well single-layer distortions add up: {"pearson": r, "mean_rel_error": e, "samples": n}.
    """

    model_sha256: str
    data_sha256: str
    metric: str
    values: dict[str, dict[str, float]]
    additivity: dict[str, Any] = field(default_factory=dict)
    version: int = TABLE_SCHEMA_VERSION

    def layers(self) -> list[str]:
        return list(self.values)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> SensitivityTable:
        d = _read(path)
        return cls(**d)


@dataclass(frozen=True)
class CostEntry:
    bytes: int  # weight bytes of the layer under this option (exact, scales included)
    latency_ms: float  # the layer's latency under this option
    source: str  # where the latency comes from: "measured:<table>" or "roofline"


@dataclass(frozen=True)
class CostTable:
    target: str
    entries: dict[str, dict[str, CostEntry]]
    version: int = TABLE_SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {"target": self.target, "version": self.version,
                "entries": {l: {o: asdict(e) for o, e in opts.items()} for l, opts in self.entries.items()}}

    def save(self, path: Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> CostTable:
        return cls(target=d["target"], version=d.get("version", TABLE_SCHEMA_VERSION),
                   entries={l: {o: CostEntry(**e) for o, e in opts.items()} for l, opts in d["entries"].items()})

    @classmethod
    def load(cls, path: Path) -> CostTable:
        return cls.from_dict(_read(path))


def _read(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read table {path}: {exc}") from exc
    if d.get("version") != TABLE_SCHEMA_VERSION:
        raise ConfigError(f"table {path} has schema version {d.get('version')!r}, expected {TABLE_SCHEMA_VERSION}")
    return d


@dataclass(frozen=True)
class Budget:
    """Upper bounds; ``None`` means unconstrained. ``avg_bits`` is weight bits averaged over all weights."""

    size_bytes: int | None = None
    latency_ms: float | None = None
    avg_bits: float | None = None
    latency_ratio: float | None = None  # latency as a fraction of FP32's, measured in the same run ("0.6x")

    def is_empty(self) -> bool:
        return all(v is None for v in (self.size_bytes, self.latency_ms, self.avg_bits, self.latency_ratio))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


_UNITS = {"b": 1, "kb": 1e3, "kib": 1024, "mb": 1e6, "mib": 1024**2, "gb": 1e9, "gib": 1024**3}


def parse_drop(text: str) -> float:
    """``--max-drop``: ``1%`` or ``0.01`` → 0.01 (a fraction in [0, 1))."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ConfigError(f"--max-drop {text!r} is not a number or a percentage (e.g. 1% or 0.01)") from None
    if not 0 <= value < 1:
        raise ConfigError(f"--max-drop {text!r} must be between 0 and 100%")
    return value


def parse_budget(items: list[str] | tuple[str, ...]) -> Budget:
    """Parse ``--budget`` values: ``size=1.6MB``, ``latency=4ms``, ``avg-bits=4.5`` (repeatable or comma-joined)."""
    size = latency = bits = ratio = None
    for item in [p for raw in items for p in raw.split(",") if p.strip()]:
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not sep or not value:
            raise ConfigError(f"budget {item!r} is not KEY=VALUE", hint="e.g. --budget size=1.6MB or latency=4ms")
        if key == "size":
            m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", value)
            if not m or m.group(2) not in _UNITS | {"": 1}:
                raise ConfigError(f"size budget {value!r}: use a number with B, KB, MB, GB, KiB, MiB or GiB")
            size = int(float(m.group(1)) * _UNITS.get(m.group(2) or "b"))
        elif key == "latency":
            m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|us|s|x)?", value)
            if not m:
                raise ConfigError(f"latency budget {value!r}: use a number with ms, us or s, or a fraction of FP32 "
                                  "like 0.6x")
            if m.group(2) == "x":
                ratio = float(m.group(1))
            else:
                latency = float(m.group(1)) * {"ms": 1.0, "us": 1e-3, "s": 1e3, None: 1.0}[m.group(2)]
        elif key in ("avg-bits", "avg_bits", "bits"):
            try:
                bits = float(value)
            except ValueError:
                raise ConfigError(f"avg-bits budget {value!r} is not a number") from None
            if not math.isfinite(bits):
                raise ConfigError(f"avg-bits budget {value!r} is not a finite number")
        else:
            raise ConfigError(f"unknown budget {key!r}", hint="budgets: size=, latency=, avg-bits=")
    for name, v in (("size", size), ("latency", latency), ("avg-bits", bits), ("latency", ratio)):
        if v is not None and v <= 0:
            raise ConfigError(f"{name} budget must be positive")
    if latency is not None and ratio is not None:
        raise ConfigError("give the latency budget once: in ms or as a fraction of FP32 (0.6x), not both")
    return Budget(size_bytes=size, latency_ms=latency, avg_bits=bits, latency_ratio=ratio)
