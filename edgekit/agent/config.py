"""The agent's settings, saved as ``config.json`` in the state folder so that a restart behaves the same."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgekit.agent.adapt import GuardConfig
from edgekit.agent.monitor import MonitorConfig
from edgekit.agent.probation import ProbationConfig
from edgekit.agent.select import SelectConfig
from edgekit.errors import ConfigError
from edgekit.fsutil import atomic_write_text

CONFIG_FILE = "config.json"
TIERS = ("norm", "lame", "tent")
WHEN = ("drift", "always", "never")
_NESTED = {"monitor": MonitorConfig, "select": SelectConfig, "guard": GuardConfig, "probation": ProbationConfig}


@dataclass
class AgentConfig:
    adapt: tuple[str, ...] = ("norm",)  # tiers: norm (statistics), lame (outputs), tent (entropy, needs torch)
    adapt_when: str = "drift"  # adapt while the drift alarm is on | always | never
    adapt_every: int = 16  # requests between adaptation updates
    adapt_window: int = 64  # recent inputs the statistics come from
    adapt_min_samples: int = 16
    adapt_prior: float = 16.0  # weight of the source statistics, in samples
    adapt_async: bool = True  # updates run in a background thread (False: inside the request, reproducible)
    adapt_duty: float = 0.25  # at most this share of the time goes to adaptation updates (1: no limit)
    upload: bool = True
    # check every request's float inputs for NaN/Inf before the run (an AgentError for that request); one pass over
    # the input, about 1 % of EfficientNet-Lite0's run here. Off: they are counted on the watched requests.
    check_inputs: bool = False
    skip_similar: float | None = None  # similarity filter threshold (cosine of the input to the last one run)
    threads: int | None = None
    providers: tuple[str, ...] | None = None  # ONNX Runtime execution providers, best first
    trusted_keys: tuple[str, ...] = ()  # public key files; bundles must be signed by one of them
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    probation: ProbationConfig = field(default_factory=ProbationConfig)

    def __post_init__(self) -> None:
        self.adapt = tuple(self.adapt)
        bad = [t for t in self.adapt if t not in TIERS]
        if bad:
            raise ConfigError(f"unknown adaptation tier(s) {bad}", hint=f"choose from {', '.join(TIERS)}")
        if self.adapt_when not in WHEN:
            raise ConfigError(f"adapt_when must be one of {', '.join(WHEN)}, not {self.adapt_when!r}")
        if self.adapt_every < 1 or self.adapt_window < 2 or self.adapt_min_samples < 1:
            raise ConfigError("adapt_every, adapt_window and adapt_min_samples must be positive (window ≥ 2)")
        if not 0 < self.adapt_duty <= 1:
            raise ConfigError("adapt_duty is a share of the time in (0, 1]")
        if self.skip_similar is not None and not 0 < self.skip_similar <= 1:
            raise ConfigError("skip_similar is a cosine similarity in (0, 1]")
        self.trusted_keys = tuple(str(k) for k in self.trusted_keys)
        if self.providers is not None:
            self.providers = tuple(self.providers)

    def public_keys(self):
        if not self.trusted_keys:
            return None
        from edgekit.keys import load_public_key

        return [load_public_key(Path(k)) for k in self.trusted_keys]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AgentConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"the agent config must be a JSON object, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown agent setting(s): {', '.join(unknown)}")
        kw = dict(d)
        for key, typ in _NESTED.items():
            if key in kw and not isinstance(kw[key], (dict, typ)):
                raise ConfigError(f"the agent setting {key} must be an object of settings, not {kw[key]!r}")
            if key in kw and isinstance(kw[key], dict):
                sub = kw[key]
                names = {f.name for f in fields(typ)}
                if set(sub) - names:
                    raise ConfigError(f"unknown {key} setting(s): {', '.join(sorted(set(sub) - names))}")
                if "band" in sub:
                    sub = {**sub, "band": tuple(sub["band"])}
                kw[key] = typ(**sub)
        return cls(**kw)

    def save(self, root: Path) -> None:
        atomic_write_text(Path(root) / CONFIG_FILE, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, root: Path) -> AgentConfig:
        path = Path(root) / CONFIG_FILE
        if not path.exists():
            return cls()
        hint = "fix the file, or delete it to start from the default settings"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except ConfigError as exc:
            raise ConfigError(f"{path} is not a valid agent config: {exc.message}", hint=hint) from None
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a valid agent config: {exc}", hint=hint) from None
