"""The Plan: which compression option each layer gets, why, and under which budget.

Plans are plain, frozen data. They are written as versioned JSON that a person can read, diff and edit, and
``edgekit apply`` replays them. Layer names are exact (selectors are resolved before a Plan is made).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError

PLAN_SCHEMA_VERSION = 1

# An option string names one way to compress one layer; later issues add more (sparse2:4+w8a8, rank=32, drop ...),
# parsed by the same grammar. Weight-only options: w<bits>g<group>, asymmetric (zero points) unless suffixed "s".
_OPTION_RE = re.compile(r"^(fp32|w8a8|w4a8|w8a8d|w[2348]g(16|32|64|128|256)s?)$")

OPTION_DESCRIPTIONS = {
    "fp32": "keep float32",
    "w8a8": "int8 weights (symmetric, per output channel) x uint8 activations (per tensor, calibrated)",
    "w4a8": "4-bit weights (symmetric, per output channel, stored as int4, widened to int8 at load) x uint8 "
            "activations (per tensor, calibrated): int8 speed at half the weight bytes",
    "w8a8d": "int8 weights (per output channel) x uint8 activations quantized per call (dynamic; Linear/MatMul)",
    "w<b>g<G>": "weight-only: <b>-bit weights (2, 3, 4, 8) in groups of <G> input columns with a float32 scale and a "
                "zero point each (suffix s: symmetric, no zero points); float activations. GPTQ for Linear/MatMul, "
                "MSE-clipped rounding for embeddings",
}

PRECISIONS = ("fp32", "int8", "int8-dynamic", "auto")


def check_option(option: str) -> str:
    """Return ``option`` if it is a known option string, else raise ConfigError."""
    if not _OPTION_RE.match(option):
        raise ConfigError(
            f"unknown layer option {option!r}",
            hint=f"known options: {', '.join(OPTION_DESCRIPTIONS)} (e.g. w4g32, w4g128s, w2g64)",
        )
    return option


@dataclass(frozen=True)
class LayerChoice:
    """The option chosen for one layer (an exact name from the layer inventory) and the reason."""

    layer: str
    option: str
    reason: str = ""

    def __post_init__(self) -> None:
        check_option(self.option)


@dataclass(frozen=True)
class Plan:
    """Per-layer choices for one model on one target.

    ``activations`` describes how activations of quantized layers are handled (scheme and calibration
    method); ``budget`` is what the plan was made to meet; ``solver`` names who made the choices.
    """

    model_sha256: str
    target: str
    precision: str
    layers: tuple[LayerChoice, ...]
    activations: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    solver: str = "uniform"
    notes: tuple[str, ...] = ()
    version: int = PLAN_SCHEMA_VERSION

    def option_for(self, layer: str) -> str:
        for choice in self.layers:
            if choice.layer == layer:
                return choice.option
        raise KeyError(layer)

    def layers_with(self, option: str) -> list[str]:
        return [c.layer for c in self.layers if c.option == option]

    @property
    def is_quantized(self) -> bool:
        return any(c.option != "fp32" for c in self.layers)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(c) for c in self.layers]
        d["notes"] = list(self.notes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> Path:
        from edgekit.fsutil import atomic_write_text

        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict):
            raise ConfigError("a plan must be a JSON object")
        version = d.get("version")
        if version != PLAN_SCHEMA_VERSION:
            raise ConfigError(
                f"plan schema version {version!r} is not supported (this edgekit reads {PLAN_SCHEMA_VERSION})"
            )
        known = {"model_sha256", "target", "precision", "layers", "activations", "budget", "solver", "notes", "version"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown keys in plan: {', '.join(sorted(unknown))}")
        try:
            layers = tuple(
                LayerChoice(layer=str(c["layer"]), option=str(c["option"]), reason=str(c.get("reason", "")))
                for c in d["layers"]
            )
            return cls(
                model_sha256=str(d["model_sha256"]),
                target=str(d["target"]),
                precision=str(d["precision"]),
                layers=layers,
                activations=dict(d.get("activations", {})),
                budget=dict(d.get("budget", {})),
                solver=str(d.get("solver", "uniform")),
                notes=tuple(d.get("notes", ())),
                version=int(version),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed plan: missing or wrong field {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError as exc:
            raise ConfigError(f"plan file not found: {p}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"plan file {p} is not valid JSON: {exc}") from exc


def tolerance_class(plan: Plan) -> str:
    """The precision class whose verification floors apply: that of the fewest weight bits in the plan."""
    bits = [int(c.option[1]) for c in plan.layers if c.option != "fp32" and c.option.startswith("w")]
    return "fp32" if not bits else f"int{min(bits)}"
