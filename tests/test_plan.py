import json

import pytest

from edgekit.errors import ConfigError
from edgekit.plan import LayerChoice, Plan


def _plan():
    return Plan(
        model_sha256="ab" * 32, target="cpu-x86", precision="int8",
        layers=(LayerChoice("conv1", "w8a8", "uniform int8"), LayerChoice("fc", "fp32", "kept float")),
        activations={"scheme": "w8a8"}, budget={"size_mb": 6.0}, notes=("n",),
    )


def test_round_trip_through_json(tmp_path):
    p = _plan()
    path = p.save(tmp_path / "plan.json")
    q = Plan.load(path)
    assert q == p
    assert q.layers_with("w8a8") == ["conv1"]
    assert q.option_for("fc") == "fp32"
    assert q.is_quantized


def test_json_is_readable_and_versioned(tmp_path):
    d = json.loads(_plan().to_json())
    assert d["version"] == 1
    assert d["layers"][0] == {"layer": "conv1", "option": "w8a8", "reason": "uniform int8"}


def test_unknown_option_rejected():
    with pytest.raises(ConfigError, match="unknown layer option"):
        LayerChoice("x", "w9a9")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(version=99), "schema version"),
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.pop("layers"), "missing or wrong field"),
        (lambda d: d["layers"][0].update(option="bogus"), "unknown layer option"),
        # found by a CLI sweep: these gave ValueError/TypeError tracebacks or a message that named nothing
        (lambda d: d.update(version="1"), "a JSON number"),
        (lambda d: d.update(layers="abc"), "must be a list of"),
        (lambda d: d.update(activations="ab"), '"activations" must be a JSON object'),
        (lambda d: d["layers"].append(dict(d["layers"][0])), "more than once"),
    ],
)
def test_bad_plan_files(tmp_path, mutate, match):
    d = _plan().to_dict()
    mutate(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match):
        Plan.load(path)


def test_missing_and_invalid_plan_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")


def test_a_binary_file_or_a_folder_is_not_a_plan(tmp_path):
    (tmp_path / "b.ekb").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not JSON text"):
        Plan.load(tmp_path / "b.ekb")
    with pytest.raises(ConfigError, match="is a directory"):
        Plan.load(tmp_path)
