"""INT8 quantization (static, QDQ): int8 weights per output channel, uint8 activations per tensor, calibrated.

On x86 the u8 x s8 integer kernels are the fast path (s8 x s8 is far slower in ONNX Runtime), so activations
stay unsigned. The math is ONNX Runtime's quantization tooling; this module decides its settings from a Plan and
quantizes exactly the layers the Plan marks ``w8a8``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgekit.data import Dataset
from edgekit.errors import CalibrationError, ExportError
from edgekit.plan import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class W8A8Config:
    """Settings of the ``w8a8`` option."""

    per_channel: bool = True
    calibration: str = "minmax"  # minmax | entropy | percentile
    percentile: float = 99.999
    calib_samples: int = 64

    def to_dict(self) -> dict:
        return {"scheme": "w8a8", "weights": "int8 symmetric per-channel" if self.per_channel else "int8 per-tensor",
                "activations": "uint8 per-tensor", "calibration": self.calibration,
                "calib_samples": self.calib_samples}


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a Dataset (one sample per call)."""

    def __init__(self, data: Dataset, track=None) -> None:
        feeds = data.feeds()
        self._it = iter(track(feeds, "calibrating", total=len(feeds)) if track else feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - part of ORT's protocol, unused by static calibration
        pass


def quantize_w8a8(
    fp32_onnx: Path, out_path: Path, plan: Plan, calib: Dataset, config: W8A8Config, *, track=None
) -> Path:
    """Write a QDQ model in which the Plan's ``w8a8`` layers are quantized and its ``fp32`` layers stay float.

    Unweighted ops between quantized layers (Add, Clip, pooling) are quantized as ONNX Runtime sees fit, so that
    integer kernels chain without float round trips. ``track`` (e.g. ``Context.track``) draws calibration progress.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    layers = plan.layers_with("w8a8")
    if not layers:
        raise ExportError("quantize_w8a8 called with a plan that quantizes no layer")
    if len(calib) == 0:
        raise CalibrationError("calibration set is empty")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra = {"CalibPercentile": config.percentile} if config.calibration == "percentile" else {}
    with tempfile.TemporaryDirectory(prefix="edgekit-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=False)
        except Exception as exc:  # pre-processing only helps; quantize the plain graph if it fails
            log.warning("ONNX Runtime's quantization pre-processing failed (%s); quantizing the graph as exported", exc)
            pre = Path(fp32_onnx)
        try:
            quantize_static(
                str(pre), str(out_path), _Reader(calib.take(config.calib_samples), track),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=config.per_channel, calibrate_method=methods[config.calibration],
                nodes_to_exclude=plan.layers_with("fp32"), extra_options=extra,
            )
        except Exception as exc:
            raise ExportError(f"INT8 quantization failed: {type(exc).__name__}: {exc}") from exc
    return Path(out_path)
