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

# An option string names one way to compress one layer. Precision options: fp32, w8a8, w4a8, w8a8d, and weight-only
# w<bits>g<group> (asymmetric unless suffixed "s"). Structural modifiers follow a "+" (the joint option space,
# ``edgekit.joint``): "+ch<N>" keeps N channels of the channel group the layer belongs to (structured pruning: every
# layer of the group carries the same N), "+r<R>" replaces the layer by a rank-R factorization (both factors take the
# precision), "+e<R>" adds a rank-R EoRA path repairing a weight-only layer's quantization error, "sparse2:4+" /
# "sparse4:8+" in front prunes the weights to that N:M pattern. "drop" removes the layer
# together with the residual branch it belongs to (every layer of the branch says "drop").
_BASE = r"(?:fp32|w8a8|w4a8|w8a8d|w[2348]g(?:16|32|64|128|256)s?)"
_OPTION_RE = re.compile(
    rf"^(?:drop|(?:sparse(?:2:4|4:8)\+)?{_BASE}(?:\+ch[1-9]\d*)?(?:\+r[1-9]\d*)?(?:\+e[1-9]\d*)?)$")
_MOD_RE = re.compile(r"^(?:(?P<sparse>sparse(?:2:4|4:8))\+)?(?P<base>[^+]+)(?:\+ch(?P<ch>\d+))?(?:\+r(?P<r>\d+))?"
                     r"(?:\+e(?P<e>\d+))?$")

OPTION_DESCRIPTIONS = {
    "fp32": "keep float32",
    "w8a8": "int8 weights (symmetric, per output channel) x uint8 activations (per tensor, calibrated)",
    "w4a8": "4-bit weights (symmetric, per output channel, stored as int4, widened to int8 at load) x uint8 "
            "activations (per tensor, calibrated): int8 speed at half the weight bytes",
    "w8a8d": "int8 weights (per output channel) x uint8 activations quantized per call (dynamic; Linear/MatMul)",
    "w<b>g<G>": "weight-only: <b>-bit weights (2, 3, 4, 8) in groups of <G> input columns with a float32 scale and a "
                "zero point each (suffix s: symmetric, no zero points); float activations. GPTQ for Linear/MatMul, "
                "MSE-clipped rounding for embeddings",
    "<p>+ch<N>": "structured pruning: the layer's channel group keeps its N most important channels (a real "
                 "smaller layer), then precision <p>",
    "<p>+r<R>": "low rank: the layer becomes two layers of rank R (truncated SVD in the eigenspace of its inputs), "
                "each at precision <p>",
    "<p>+e<R>": "EoRA: a float rank-R path beside a weight-only layer, fitted in the eigenspace of its inputs to the "
                "error of its low-bit weight (e.g. w4g128+e16)",
    "sparse2:4+<p>": "N:M sparsity (2:4 or 4:8, SparseGPT-pruned) for targets with sparse kernels, then precision <p>",
    "drop": "remove the layer with the residual branch (block, attention or FFN sub-layer) it belongs to",
}


@dataclass(frozen=True)
class OptionParts:
    """An option string taken apart: the precision, and the structural changes made before it is applied."""

    base: str  # the precision option (fp32, w8a8, w4g32 ...); "drop" for a removed layer
    channels: int | None = None  # "+ch<N>": channels kept in the layer's group
    rank: int | None = None  # "+r<R>": low-rank factorization
    sparsity: str | None = None  # "sparse2:4+": N:M pattern
    eora: int | None = None  # "+e<R>": rank of the compensation path of a weight-only layer

    @property
    def structural(self) -> bool:
        return self.base == "drop" or any(x is not None for x in (self.channels, self.rank, self.sparsity, self.eora))

    @property
    def kind(self) -> str:
        """What the report shows: drop, prune, low-rank, sparse, quantize or float (the first that applies)."""
        if self.base == "drop":
            return "drop"
        kinds = [k for k, on in (("prune", self.channels), ("low-rank", self.rank), ("sparse", self.sparsity),
                                 ("compensate", self.eora)) if on]
        kinds.append("float" if self.base == "fp32" else "quantize")
        return "+".join(kinds)


def parse_option(option: str) -> OptionParts:
    """Split a (checked) option string into its precision and structural modifiers."""
    check_option(option)
    if option == "drop":
        return OptionParts("drop")
    m = _MOD_RE.match(option)
    if m is None:  # pragma: no cover - _OPTION_RE admits nothing _MOD_RE cannot split
        raise ConfigError(f"cannot take option {option!r} apart")
    return OptionParts(m["base"], int(m["ch"]) if m["ch"] else None, int(m["r"]) if m["r"] else None, m["sparse"],
                       int(m["e"]) if m["e"] else None)


PRECISIONS = ("fp32", "int8", "int8-dynamic", "auto")


def check_option(option: str) -> str:
    """Return ``option`` if it is a known option string, else raise ConfigError."""
    if not _OPTION_RE.match(option):
        raise ConfigError(
            f"unknown layer option {option!r}",
            hint=f"known options: {', '.join(OPTION_DESCRIPTIONS)} (e.g. w4g32, w4g128s, w2g64, w8a8+ch96, "
                 "w8a8d+r64, drop)",
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
        """Whether the plan changes the model at all (any option other than fp32, structural ones included)."""
        return any(c.option != "fp32" for c in self.layers)

    @property
    def is_structural(self) -> bool:
        return any(parse_option(c.option).structural for c in self.layers)

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
        if version != PLAN_SCHEMA_VERSION or isinstance(version, bool):
            raise ConfigError(
                f"plan schema version {version!r} is not supported: this edgekit reads \"version\": "
                f"{PLAN_SCHEMA_VERSION} (a JSON number)"
            )
        known = {"model_sha256", "target", "precision", "layers", "activations", "budget", "solver", "notes", "version"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown keys in plan: {', '.join(sorted(unknown))}")
        if "layers" in d and (not isinstance(d["layers"], list) or not all(isinstance(c, dict) for c in d["layers"])):
            raise ConfigError('a plan\'s "layers" must be a list of {"layer": ..., "option": ...} objects')
        for key in ("activations", "budget"):
            if not isinstance(d.get(key, {}), dict):
                raise ConfigError(f'a plan\'s "{key}" must be a JSON object, not {type(d[key]).__name__}')
        try:
            layers = tuple(
                LayerChoice(layer=str(c["layer"]), option=str(c["option"]), reason=str(c.get("reason", "")))
                for c in d["layers"]
            )
            names = [c.layer for c in layers]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ConfigError(f"the plan lists layer(s) {twice[:5]} more than once", hint="one entry per layer")
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
        except (KeyError, TypeError, ValueError) as exc:
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
        except UnicodeDecodeError as exc:
            raise ConfigError(f"plan file {p} is not JSON text (binary data)",
                              hint="a plan is a .json file; a bundle keeps its plan as plan.json inside") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"plan file {p} is a directory") from exc


def tolerance_class(plan: Plan) -> str:
    """The class whose verification floors apply: that of the fewest weight bits in the plan; ``structural`` for a
    plan that changes the architecture (``+ch``, ``drop``, ``+r``, N:M) unless its bits are looser still (2/3-bit)."""
    bases = [parse_option(c.option).base for c in plan.layers]
    bits = [int(b[1]) for b in bases if b.startswith("w")]
    if plan.is_structural and (not bits or min(bits) >= 4):
        return "structural"
    return "fp32" if not bits else f"int{min(bits)}"
