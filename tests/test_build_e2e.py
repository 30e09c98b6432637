"""End to end through the CLI with the real built-in models: what `make demo` builds, and the digits CNN.

Slow (EfficientNet-Lite0 ~25 s, digits-cnn ~6 s plus ~12 s of training once per session), so each build runs once
per module and every test reads its outputs. Speed is not asserted here: it lives in benchmarks/.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgekit.bundle import open_bundle

pytestmark = pytest.mark.e2e

EFFNET = "efficientnet-lite0"
EFFNET_LAYERS = 50  # weighted Conv/Gemm layers of EfficientNet-Lite0
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _build(run_cli, out: Path, *args) -> SimpleNamespace:
    result = run_cli("build", *args, "--out", out, "--json")
    summary = json.loads(result.stdout)
    bundle = Path(summary["bundle"])
    return SimpleNamespace(out=out, summary=summary, bundle=bundle, archive=Path(summary["archive"]),
                           report=json.loads((bundle / "report.json").read_text()),
                           verification=summary["verification"])


@pytest.fixture(scope="module")
def effnet(tmp_path_factory, run_cli) -> SimpleNamespace:
    """`make demo`: the default model (EfficientNet-Lite0 on built-in photos) for cpu-x86."""
    return _build(run_cli, tmp_path_factory.mktemp("effnet") / "out", "--target", "cpu-x86")


@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory, run_cli) -> SimpleNamespace:
    return _build(run_cli, tmp_path_factory.mktemp("digits-int8") / "out", "--model", "builtin:digits-cnn",
                  "--precision", "int8")


@pytest.fixture(scope="module")
def digits_fp32(tmp_path_factory, run_cli) -> SimpleNamespace:
    return _build(run_cli, tmp_path_factory.mktemp("digits-fp32") / "out", "--model", "builtin:digits-cnn",
                  "--precision", "fp32")


# ---------------------------------------------------------------------------------------------- EfficientNet-Lite0


def test_effnet_default_build_is_int8_small_and_verified(effnet):
    s = effnet.summary
    assert s["target"] == "cpu-x86"
    assert s["precision"] == "int8"
    assert s["bundle"].endswith(EFFNET) and effnet.archive.is_file()
    assert s["size"]["artifact_bytes"] <= 0.30 * s["size"]["fp32_bytes"], s["size"]
    v = effnet.verification
    assert v["passed"] is True, v["failures"]
    assert v["tolerance_class"] == "int8"
    assert v["outputs"][0]["top1_agreement"] >= 0.85, v["outputs"][0]
    tried = effnet.report["precision"]["tried"]
    assert effnet.report["precision"]["requested"] == "auto"
    assert [(t["precision"], t["passed"]) for t in tried] == [("int8", True)]  # the smallest that passes wins


def test_effnet_report_has_every_layer(effnet):
    layers = effnet.report["layers"]
    assert len(layers) == EFFNET_LAYERS == effnet.report["totals"]["layers"]
    names = [layer["name"] for layer in layers]
    assert len(set(names)) == EFFNET_LAYERS
    assert all(layer["option"] in ("w8a8", "fp32") and layer["reason"] for layer in layers)
    assert effnet.report["totals"]["quantized_layers"] == sum(layer["option"] == "w8a8" for layer in layers) > 0
    plan = json.loads((effnet.bundle / "plan.json").read_text())
    assert [(c["layer"], c["option"]) for c in plan["layers"]] == [(x["name"], x["option"]) for x in layers]
    page = (effnet.bundle / "report.html").read_text()
    missing = [n for n in names if html.escape(n) not in page]
    assert not missing, f"report.html does not mention {missing}"


def test_effnet_archive_manifest_and_lineage(effnet, tmp_path):
    opened = open_bundle(effnet.archive, workdir=tmp_path / "unpacked")
    m = opened.manifest
    assert opened.signature.valid
    assert {"model.onnx", "plan.json", "verification.json", "report.json", "report.html"} <= {
        f["path"] for f in m["files"]}
    assert m["name"] == EFFNET and m["target"] == "cpu-x86" and m["runtime"] == "onnxruntime"
    assert m["artifact"]["path"] == "model.onnx"
    assert m["inputs"][0]["shape"][1:] == [3, 224, 224]
    assert m["verification"]["passed"] is True
    lineage = m["lineage"]
    assert lineage["source_model"] == f"builtin:{EFFNET}"
    assert SHA256.match(lineage["source_sha256"]) and lineage["source_sha256"] == effnet.report["model"]["sha256"]
    assert SHA256.match(lineage["calibration_sha256"]) and SHA256.match(lineage["evaluation_sha256"])
    assert {"edgekit", "torch", "onnx", "onnxruntime", "numpy"} <= set(lineage["versions"])
    # what the agent reads: the drift reference and the BatchNorm-folded convolutions it may re-normalize
    assert m["reference"] == {"sketch": "sketch.json", "adapt": "adapt.json"}
    from edgekit.agent.monitor import Sketch
    from edgekit.agent.normtable import load_table

    sketch = Sketch.load(opened.root / "sketch.json")
    assert sketch.samples == len(sketch.scores["entropy"]) and sketch.feature is not None
    layers = load_table(opened.root / "adapt.json")
    assert len(layers) >= 40 and {la.weight_kind for la in layers} <= {"qdq", "float"}
    assert all(len(la.src_mean) == la.channels and min(la.src_std) > 0 for la in layers)


def test_effnet_verify_reloads_source_from_lineage(run_cli, effnet):
    report = json.loads(run_cli("verify", effnet.archive, "--data", "builtin:photos", "--limit", "16",
                                "--json").stdout)
    assert report["passed"] is True, report["failures"]
    assert report["samples"] == 16 and report["tolerance_class"] == "int8"
    assert report["artifact_sha256"] == effnet.summary["verification"]["artifact_sha256"]


# ---------------------------------------------------------------------------------------------- digits-cnn


def test_digits_int8_keeps_accuracy(digits_int8):
    assert digits_int8.summary["precision"] == "int8"
    v = digits_int8.verification
    assert v["passed"] is True, v["failures"]
    assert v["accuracy"] is not None and v["accuracy_reference"] is not None
    assert v["accuracy_reference"] >= 0.9  # the trained model is a real classifier
    assert v["accuracy"] >= v["accuracy_reference"] - 0.01, v


def test_digits_fp32_matches_the_original(digits_fp32):
    assert digits_fp32.summary["precision"] == "fp32"
    v = digits_fp32.verification
    assert v["passed"] is True and v["tolerance_class"] == "fp32"
    assert v["outputs"][0]["sqnr_db"] >= 40.0
    assert v["outputs"][0]["top1_agreement"] == 1.0
    assert all(layer["option"] == "fp32" for layer in digits_fp32.report["layers"])
