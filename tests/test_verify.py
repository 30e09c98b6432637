import numpy as np
import pytest

from edgekit.errors import VerificationFailed
from edgekit.iospec import Artifact
from edgekit.targets import Tolerances
from edgekit.verify import compare, mean_cosine, require_pass, sqnr_db

ART = Artifact(path=__import__("pathlib").Path("x.onnx"), format="onnx", sha256="0" * 64, inputs=(), outputs=())
TOL = Tolerances(min_sqnr_db=20, min_cosine=0.99, min_top1_agreement=0.9, max_accuracy_drop=0.01)


def test_sqnr_matches_definition():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 10)).astype(np.float32)
    noise = rng.normal(scale=0.1, size=ref.shape).astype(np.float32)
    expected = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / (noise.astype(np.float64) ** 2).sum())
    assert sqnr_db(ref, ref + noise) == pytest.approx(expected, abs=1e-3)
    assert sqnr_db(ref, ref) == 200.0


def test_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    assert mean_cosine(a, b) == pytest.approx((1 + 0 + 1) / 3)


def _compare(ref, out, labels=None):
    return compare({"logits": ref}, {"logits": out}, classification=True, labels=labels, tolerances=TOL,
                   tolerance_class="int8", artifact=ART, data_source="test")


def test_identical_outputs_pass():
    ref = np.random.default_rng(1).normal(size=(32, 5)).astype(np.float32)
    r = _compare(ref, ref.copy(), labels=ref.argmax(1))
    assert r.passed and r.outputs[0].top1_agreement == 1.0 and r.accuracy == r.accuracy_reference == 1.0
    require_pass(r)


def test_noisy_outputs_fail_with_reasons():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(200, 5)).astype(np.float32)
    out = ref + rng.normal(scale=1.0, size=ref.shape).astype(np.float32)
    r = _compare(ref, out, labels=ref.argmax(1))
    assert not r.passed
    text = " ".join(r.failures)
    assert "SQNR" in text and "top-1 agreement" in text and "accuracy dropped" in text
    with pytest.raises(VerificationFailed) as exc:
        require_pass(r)
    assert exc.value.report is r and exc.value.exit_code == 8


def test_shape_mismatch_and_nan_are_failures():
    ref = np.ones((4, 3), np.float32)
    assert "shape" in _compare(ref, np.ones((4, 2), np.float32)).failures[0]
    bad = ref.copy()
    bad[0, 0] = np.nan
    assert any("NaN" in f for f in _compare(ref, bad).failures)


def test_report_is_json_serialisable(tmp_path):
    import json

    ref = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    r = _compare(ref, ref * 1.01)
    path = r.save(tmp_path / "v.json")
    d = json.loads(path.read_text())
    assert d["passed"] is True and d["outputs"][0]["name"] == "logits"
