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


def test_top1_agreement_is_broken_down_per_source_and_names_the_worst():
    """Built-in photo crops carry which photograph each came from: a failure concentrated on one photograph (session 28:
    a pruned EfficientNet-Lite0 agreed on 0 of 21 crops of one photo) shows in the report, and the pass/fail judgement
    still reads the whole set."""
    from edgekit.verify import agreement_by_group

    rng = np.random.default_rng(3)
    ref = rng.normal(size=(30, 6)).astype(np.float32)
    out = ref.copy()
    groups = np.arange(30) % 3  # three sources, ten samples each
    bad = np.where(groups == 1)[0]
    out[bad] = np.roll(ref[bad], 1, axis=1) * 5  # every sample of source 1 changes class
    out[bad[:2]] = ref[bad[:2]]  # two of its ten still agree
    r = compare({"logits": ref}, {"logits": out}, classification=True, labels=None, tolerances=TOL,
                tolerance_class="int8", artifact=ART, data_source="test", groups=groups,
                group_names=("moon", "flower", "coffee"))
    o = r.outputs[0]
    assert o.top1_agreement == pytest.approx(22 / 30)
    assert o.top1_by_group == {"moon": 1.0, "flower": 0.2, "coffee": 1.0}
    assert list(o.top1_by_group) == ["moon", "flower", "coffee"]
    assert "lowest on flower (20.0%)" in r.summary()
    assert not r.passed and r.to_dict()["outputs"][0]["top1_by_group"]["flower"] == 0.2
    # without names the ids key it; one source, or no groups, means no breakdown
    assert agreement_by_group(np.array([True, False]), np.array([4, 7])) == {"4": 1.0, "7": 0.0}
    assert agreement_by_group(np.array([True, False]), np.array([0, 0])) is None
    assert _compare(ref, out).outputs[0].top1_by_group is None


def test_builtin_photos_name_their_sources_and_subsets_keep_the_names():
    from edgekit.data import Dataset
    from edgekit.datasets import EVALUATION_SOURCES, builtin_dataset
    from edgekit.errors import DataError
    from edgekit.iospec import Preprocessing, TensorSpec

    spec = TensorSpec("x", (1, 3, 32, 32))
    d = builtin_dataset("photos", "evaluation", (spec,), Preprocessing(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3),
                        n=12)
    assert d.group_names == EVALUATION_SOURCES and d.groups.max() < len(EVALUATION_SOURCES)
    assert d.subset([1, 2]).group_names == EVALUATION_SOURCES
    with pytest.raises(DataError, match="group names"):
        Dataset("d", {"x": np.zeros((2, 1), np.float32)}, None, "t", np.array([0, 3]), ("a", "b"))
    with pytest.raises(DataError, match="group names"):
        Dataset("d", {"x": np.zeros((2, 1), np.float32)}, None, "t", None, ("a", "b"))
