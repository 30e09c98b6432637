"""Model input/output descriptions and preprocessing: plain data shared by build, bundle and agent (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ConfigError

_DTYPES = {"float32", "float16", "int64", "int32", "uint8", "int8", "bool"}
# ONNX TensorProto element types → our dtype names (the ones a model interface may use)
ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8", 3: "int8", 9: "bool"}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``shape`` entries are ints, or a string for a dynamic dimension."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r} for tensor {self.name!r}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (batch dimension dropped); dynamic dims must be resolved already."""
        dims = self.shape[1:]
        if any(not isinstance(d, int) for d in dims):
            raise ConfigError(
                f"input {self.name!r} has dynamic dimensions {self.shape}", hint="pass --input-shape"
            )
        return tuple(int(d) for d in dims)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=d["name"], shape=tuple(d["shape"]), dtype=d.get("dtype", "float32"))

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model input: resize to ``size`` (H, W), scale to [0, 1], then (x - mean) / std.

    ``layout`` is the model's tensor layout (``NCHW`` or ``NHWC``); ``channels`` 3 (RGB) or 1 (grayscale).
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    channels: int = 3
    invert: bool = False  # grayscale images whose ink is dark on light (digits) are inverted first
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"layout must be NCHW or NHWC, not {self.layout!r}")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, not {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError("mean and std need one value per channel")
        if any(s == 0 for s in self.std):
            raise ConfigError("std values must be non-zero")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            size=tuple(d["size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            layout=d.get("layout", "NCHW"),
            channels=int(d.get("channels", 3)),
            invert=bool(d.get("invert", False)),
            extra=dict(d.get("extra", {})),
        )

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Normalise a batch of images already resized to ``size``: (N, H, W, C) floats in [0, 1] → model layout."""
        x = images.astype(np.float32)
        if self.invert:
            x = 1.0 - x
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x.astype(np.float32)


@dataclass(frozen=True)
class Artifact:
    """A file a runtime loads: its path, format (``onnx``, ``tflite``, ...), content hash and interface."""

    path: Path
    format: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    runtime: str = "onnxruntime"
    custom_ops: tuple[str, ...] = ()  # custom-op domains the runtime must load (e.g. "ai.edgekit")

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path.name,
            "format": self.format,
            "sha256": self.sha256,
            "size": self.size,
            "runtime": self.runtime,
            "custom_ops": list(self.custom_ops),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
