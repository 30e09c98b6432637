"""The wire schemas the sync service and the device client share (pydantic; no torch, no server dependencies).

Every request body is bounded (string lengths, list sizes) so that a malformed or hostile body is a 422 before any
work is done. Versioned under ``/v1``.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

API = "/v1"
HEX64 = r"^[0-9a-f]{64}$"
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # fleet names: URL- and path-safe
FLEET_RULE = "fleet names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"

NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"  # free text: no NUL (PostgreSQL refuses it) and no control characters

Hex64 = Annotated[str, Field(pattern=HEX64)]
FleetName = Annotated[str, Field(pattern=NAME)]
ShortText = Annotated[str, Field(max_length=500, pattern=NO_CONTROL)]
Version = Annotated[str, Field(max_length=64, pattern=NO_CONTROL)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    error: str
    hint: str | None = None


# -- enrollment and device authentication -------------------------------------------------------------------------
class EnrollRequest(_Strict):
    token: Annotated[str, Field(min_length=16, max_length=128)]
    public_key: Hex64  # the device's own ed25519 public key, raw, hex
    name: Annotated[str, Field(max_length=100, pattern=NO_CONTROL)] = ""


class EnrollResponse(BaseModel):
    device_id: str
    fleet: str
    trusted_root: str  # the fleet's TUF root metadata (JSON text): the device pins it
    metadata_path: str  # where the fleet's TUF metadata is served, relative to the server
    blobs_path: str


class ChallengeRequest(_Strict):
    device_id: Hex64


class ChallengeResponse(BaseModel):
    nonce: str
    expires_at: dt.datetime


class TokenRequest(_Strict):
    device_id: Hex64
    nonce: Annotated[str, Field(max_length=1000)]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]  # ed25519 over the nonce's bytes


class TokenResponse(BaseModel):
    token: str
    expires_at: dt.datetime


# -- heartbeat, desired state -------------------------------------------------------------------------------------
class Telemetry(_Strict):
    requests: Annotated[int, Field(ge=0, le=10**15)] = 0  # since the last heartbeat
    errors: Annotated[int, Field(ge=0, le=10**15)] = 0  # since the last heartbeat
    latency_p50_ms: Annotated[float, Field(ge=0, le=1e7)] | None = None
    latency_p90_ms: Annotated[float, Field(ge=0, le=1e7)] | None = None
    drift_alarm: bool = False


class Event(_Strict):
    kind: Literal["installed", "install_failed", "rolled_back"]
    version: Version = ""
    detail: ShortText = ""


class Heartbeat(_Strict):
    version: Version | None = None  # the model version the device serves
    telemetry: Telemetry = Field(default_factory=Telemetry)
    events: Annotated[list[Event], Field(max_length=100)] = Field(default_factory=list)


class DeltaOffer(BaseModel):
    """The desired release as a delta (``edgekit.delta``) for devices that serve its base release."""

    target: str  # its own TUF target (custom metadata: the base release's version and bundle hash)
    sha256: str
    size: int
    base_version: str
    base_sha256: str  # the base release's bundle (.ekb) hash


class Desired(BaseModel):
    release_id: int
    name: str
    version: str
    target: str  # the TUF target path: verify against the fleet's signed targets metadata
    sha256: str
    size: int
    delta: DeltaOffer | None = None


class HeartbeatResponse(BaseModel):
    desired: Desired | None
    poll_after_s: int
    etag: str


# -- administration -----------------------------------------------------------------------------------------------
class EnrollTokenCreate(_Strict):
    ttl_s: Annotated[int, Field(ge=60, le=30 * 86400)] = 3600


class EnrollTokenResponse(BaseModel):
    token: str
    fleet: str
    expires_at: dt.datetime


class Gates(_Strict):
    """A stage advances only while every gate holds on the devices already running the new release."""

    max_install_failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.2
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    max_latency_ratio: Annotated[float, Field(gt=0, le=100)] = 1.5  # p90 vs the devices on the previous release
    max_drift_share: Annotated[float, Field(ge=0, le=1)] = 0.5  # share of devices with the drift alarm on
    min_reports: Annotated[int, Field(ge=0, le=10**6)] = 1  # healthy reports needed before a stage advances


class RolloutCreate(_Strict):
    release_id: Annotated[int, Field(ge=1, le=2**31 - 1)]
    stages: Annotated[list[Annotated[int, Field(ge=1, le=100)]], Field(min_length=1, max_length=20)] = [1, 10, 50, 100]
    gates: Gates = Field(default_factory=Gates)
    stage_minutes: Annotated[float, Field(ge=0, le=7 * 1440)] = 10.0  # minimum time in a stage
    stage_timeout_minutes: Annotated[float, Field(gt=0, le=30 * 1440)] = 24 * 60.0  # no progress: abort

    @field_validator("stages")
    @classmethod
    def _increasing_to_100(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])) or v[-1] != 100:
            raise ValueError("stages must increase and end at 100")
        return v


def check_fleet(fleet: str) -> str:
    """``fleet`` if it is a valid fleet name, else a ConfigError (what a client checks before any request)."""
    from edgekit.errors import ConfigError

    if not re.fullmatch(NAME, fleet):
        raise ConfigError(f"bad fleet name {fleet!r}: {FLEET_RULE}")
    return fleet


def check_rollout(stages: list[int], stage_minutes: float, *, stages_option: str = "--stages",
                  time_option: str = "--stage-minutes", time_shown: str | None = None) -> None:
    """The rules the service applies to a rollout (``RolloutCreate``), checked by a client before it uploads or
    starts anything: a ConfigError naming the option."""
    from pydantic import ValidationError

    from edgekit.errors import ConfigError

    try:
        RolloutCreate(release_id=1, stages=stages, stage_minutes=stage_minutes)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["loc"][:1] == ("stages",):
            raise ConfigError(f"bad {stages_option} {','.join(map(str, stages))}: "
                              f"{err['msg'].removeprefix('Value error, ')}",
                              hint="percentages that increase and end at 100, e.g. 1,10,50,100") from None
        shown = time_shown or f"{stage_minutes:g} minutes"
        raise ConfigError(f"bad {time_option}: a stage's minimum time is 0 to 7 days, not {shown}") from None


class AdaptConfigIn(_Strict):
    """``edgekit.cloud_adapt.AdaptJobConfig``'s fields, bounded."""

    steps: Annotated[int, Field(ge=0, le=100_000)] = 150
    lr: Annotated[float, Field(gt=0, le=10)] = 0.02
    batch: Annotated[int, Field(ge=1, le=4096)] = 64
    temperature: Annotated[float, Field(gt=0, le=100)] = 2.0
    entropy_margin: Annotated[float, Field(gt=0, le=1)] = 0.6
    replay_weight: Annotated[float, Field(ge=0, le=100)] = 0.2
    holdout: Annotated[float, Field(gt=0, lt=1)] = 0.2
    min_gain: Annotated[float, Field(ge=0, lt=1)] = 0.05
    seed: Annotated[int, Field(ge=0, le=2**31)] = 0


class AdaptJobCreate(_Strict):
    """A cloud adaptation job (``edgekit.sync.jobs``): the fleet's teacher distilled into ``release_id``'s model
    (default: the fleet's current release) on the samples its devices uploaded while serving it."""

    release_id: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    min_samples: Annotated[int, Field(ge=8, le=10**6)] = 32
    max_samples: Annotated[int, Field(ge=8, le=10**6)] = 5000
    config: AdaptConfigIn = Field(default_factory=AdaptConfigIn)
    delta_error_bound: Annotated[float, Field(gt=0, lt=1)] = 2e-2
    max_decoded_drop: Annotated[float, Field(ge=0, le=1)] = 0.02  # teacher agreement the delta's rounding may cost
    rollout: Annotated[list[Annotated[int, Field(ge=1, le=100)]], Field(max_length=20)] | None = None
    stage_minutes: Annotated[float, Field(ge=0, le=7 * 1440)] = 10.0


class JobInfo(BaseModel):
    id: int
    fleet: str
    kind: str
    status: str
    step: str
    attempts: int
    error: str
    runner: str
    params: dict
    state: dict
    created_at: dt.datetime
    updated_at: dt.datetime


class ReleaseInfo(BaseModel):
    id: int
    fleet: str
    name: str
    version: str
    target: str
    sha256: str
    size: int
    created_at: dt.datetime
    base_release_id: int | None = None  # set when the release is also shipped as a delta against this release
    delta_target: str | None = None
    delta_sha256: str | None = None
    delta_size: int | None = None
    origin: str = ""


class RolloutInfo(BaseModel):
    id: int
    release_id: int
    previous_id: int | None
    version: str
    stages: list[int]
    stage: int
    percent: int
    status: str
    reason: str
    stage_started_at: dt.datetime


class DeviceInfo(BaseModel):
    id: str
    name: str
    version: str | None
    last_seen: dt.datetime | None
    online: bool


class FleetStatus(BaseModel):
    fleet: str
    devices: list[DeviceInfo]
    versions: dict[str, int]
    current_release: ReleaseInfo | None
    rollout: RolloutInfo | None


class SampleAck(BaseModel):
    id: int
    sha256: str
    size: int
    bytes_left_today: int
