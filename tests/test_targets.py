"""Target profiles: the shipped TOML files, the schema, supports() and the loader's errors."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pydantic
import pytest

from edgekit.errors import ConfigError
from edgekit.targets import (
    TargetProfile,
    Tolerances,
    list_targets,
    load_target,
    parse_scheme,
    targets_dir,
)

REPO_TARGETS = Path(__file__).resolve().parent.parent / "targets"
SHIPPED = sorted(p.stem for p in REPO_TARGETS.glob("*.toml"))
REQUIRED = {"cpu-x86", "cpu-arm64", "jetson-orin-nano", "jetson-agx-orin", "rtx-4090"}


def _write_variant(tmp_path: Path, base: str, old: str, new: str, name: str | None = None) -> Path:
    """Copy a shipped profile into tmp_path with one textual substitution (which must apply)."""
    text = (REPO_TARGETS / f"{base}.toml").read_text()
    assert old in text, f"fixture text {old!r} not in {base}.toml"
    path = tmp_path / f"{name or base}.toml"
    path.write_text(text.replace(old, new, 1))
    return path


# -- the shipped profiles ----------------------------------------------------------------------------

def test_required_profiles_are_shipped():
    assert REQUIRED <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name):
    t = load_target(name)
    assert isinstance(t, TargetProfile)
    assert t.name == name == Path(t.source).stem
    assert t.runtime == t.runtimes[0]
    assert t.hardware.memory_bytes > 0 and t.hardware.bandwidth_gbs > 0
    assert "fp32" in t.hardware.peak_gops
    assert isinstance(t.tolerance_for("fp32"), Tolerances)
    assert t.tolerance_for("int8").min_sqnr_db > 0
    assert ("tensorrt" in t.runtimes) == (t.tensorrt is not None)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_hardware_figure_cites_a_source(name):
    """Each [hardware] / [hardware.peak_gops] value carries a comment (its source) on its own line."""
    section = None
    for line in (REPO_TARGETS / f"{name}.toml").read_text().splitlines():
        if line.startswith("["):
            section = line.strip()
        elif section in ("[hardware]", "[hardware.peak_gops]") and "=" in line and not line.startswith("#"):
            assert "#" in line, f"{name}.toml: figure without a source comment: {line!r}"


def test_list_targets_is_sorted_and_complete():
    names = [t.name for t in list_targets()]
    assert names == sorted(names) == SHIPPED


def test_tensorrt_versions_and_devices():
    nano, agx, rtx = load_target("jetson-orin-nano"), load_target("jetson-agx-orin"), load_target("rtx-4090")
    assert nano.tensorrt.version == "10.3" and nano.tensorrt.plugin_api == "v3"
    assert nano.hardware.sm == agx.hardware.sm == "8.7" and rtx.hardware.sm == "8.9"
    assert nano.hardware.dla_cores == 0 and agx.hardware.dla_cores == 2
    assert rtx.hardware.peak_gops["int8"] == pytest.approx(660_600)
    assert agx.hardware.bandwidth_gbs == pytest.approx(204.8)


def test_cpu_x86_budgets_and_tolerances():
    t = load_target("cpu-x86")
    assert t.runtimes == ["onnxruntime"]
    assert (t.budgets.latency_ms, t.budgets.size_mb, t.budgets.max_accuracy_drop) == (3.0, 6.0, 0.01)
    assert t.tolerance_for("fp32") == Tolerances(min_sqnr_db=40, min_cosine=0.9999, min_top1_agreement=0.99)
    i8 = t.tolerance_for("int8")
    assert (i8.min_sqnr_db, i8.min_cosine, i8.min_top1_agreement, i8.max_accuracy_drop) == (12, 0.97, 0.80, 0.02)


def test_profiles_are_frozen():
    t = load_target("cpu-x86")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        t.name = "other"  # type: ignore[misc]


# -- supports() ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "target, op, scheme, expected",
    [
        ("cpu-x86", "conv", "w8a8", True),
        ("cpu-x86", "depthwise_conv", "w8a8", True),
        ("cpu-x86", "linear", "w8a8", True),
        ("cpu-x86", "conv", "fp32", True),
        ("cpu-x86", "conv", "fp16", False),
        ("cpu-x86", "linear", "w4g128", True),  # MatMulNBits (asymmetric: zero points)
        ("cpu-x86", "linear", "w4g128s", True),
        ("cpu-x86", "linear", "w2g32", True),
        ("cpu-x86", "linear", "w2g128", False),  # 2-bit groups of 32/64 only
        ("cpu-x86", "linear", "w3g32", False),  # MatMulNBits has no 3-bit kernel
        ("cpu-x86", "linear", "w8", False),  # no weight-only int8 (weight_only_bits excludes 8)
        ("cpu-x86", "embedding", "w4g128", True),  # GatherBlockQuantized
        ("cpu-x86", "embedding", "w8a8", False),
        ("cpu-x86", "conv", "sparse2:4+w8a8", False),
        ("cpu-x86", "linear", "sparse2:4+w8a8d", False),  # no sparse kernel in stock ONNX Runtime
        ("cpu-x86-edgekit", "linear", "sparse2:4+w8a8d", True),  # ai.edgekit::MatMulSparse24
        ("cpu-x86-edgekit", "linear", "sparse2:4+w8a8", True),
        ("cpu-x86-edgekit", "linear", "sparse4:8+w8a8d", False),
        ("cpu-x86-edgekit", "linear", "sparse2:4+w4g32", False),  # no sparse weight-only kernel
        ("cpu-x86-edgekit", "conv", "sparse2:4+w8a8", False),
        ("cpu-arm64", "conv", "fp16", True),
        ("cpu-arm64", "conv", "w8a8", True),
        ("cpu-arm64", "linear", "w4g128", False),
        ("jetson-orin-nano", "linear", "w4g128s", True),
        ("jetson-orin-nano", "linear", "w4g64s", True),
        ("jetson-orin-nano", "linear", "w4g128", False),  # symmetric-only target: zero points are refused
        ("jetson-orin-nano", "linear", "w4g32", False),  # TRT blocks are 64 or 128
        ("jetson-orin-nano", "linear", "w4", False),  # int4 is block-quantized only
        ("jetson-orin-nano", "linear", "w8g128", False),  # int8 has no blocks
        ("jetson-orin-nano", "linear", "w8", True),  # int8 weight-only, fp16 activations
        ("jetson-orin-nano", "linear", "w3g128", False),
        ("jetson-orin-nano", "linear", "w2g64", False),
        ("jetson-orin-nano", "conv", "w4g128", False),
        ("jetson-orin-nano", "conv", "w8a8", True),
        ("jetson-orin-nano", "conv", "fp16", True),
        ("jetson-orin-nano", "conv", "bf16", False),
        ("jetson-orin-nano", "conv", "sparse2:4+w8a8", True),
        ("jetson-orin-nano", "conv", "w8a8+sparse2:4", True),
        ("jetson-orin-nano", "linear", "sparse2:4+fp16", True),
        ("jetson-orin-nano", "conv", "sparse2:4", True),
        ("jetson-orin-nano", "conv", "sparse4:8+w8a8", False),
        ("jetson-orin-nano", "depthwise_conv", "sparse2:4+w8a8", False),
        ("jetson-orin-nano", "linear", "sparse2:4+w4g128", False),  # no sparse weight-only kernels
        ("jetson-orin-nano", "linear", "w8a8g128", False),  # groups only with float activations
        ("jetson-agx-orin", "linear", "w4g128s", True),
        ("rtx-4090", "conv", "bf16", True),
        ("rtx-4090", "linear", "w4g128s", True),
        ("rtx-4090", "linear", "sparse2:4+w8a8", True),
        ("rtx-4090", "attention", "fp16", False),  # unknown op kind
        ("cpu-x86", "embedding", "w8a8", False),
    ],
)
def test_supports(target, op, scheme, expected):
    assert load_target(target).supports(op, scheme) is expected


def test_groups_go_with_weight_only_and_sparsity_with_integer_activations(tmp_path):
    """On an op listing both int8 and float activations, groups and 2:4 each pair with one of them."""
    old = 'activation_bits = [8]\ngranularity = ["per-channel", "per-tensor"]\nsymmetric_only = false\nsparsity = []'
    new = 'activation_bits = [8, 32]\ngranularity = ["per-channel", "group-128"]\nsymmetric_only = false\n' \
          'sparsity = ["2:4"]'
    path = _write_variant(tmp_path, "cpu-x86", old, new)
    t = load_target(path)
    assert t.supports("conv", "w8g128") and t.supports("conv", "w8") and t.supports("conv", "w8a32g128")
    assert not t.supports("conv", "w8a8g128")
    assert t.supports("conv", "sparse2:4+w8a8") and t.supports("conv", "sparse2:4+fp32")
    assert not t.supports("conv", "sparse2:4+w8") and not t.supports("conv", "sparse2:4+w8g128")
    assert not t.supports("linear", "w8g128")  # the edit touched only [ops.conv]


@pytest.mark.parametrize(
    "scheme", ["", "int8", "w8a8+w4g128", "fp16+fp32", "w9", "w4g0", "w8a4", "sparse2:4+sparse4:8", "sparse",
               "w4g128+", "W8A8", "rank=32"],
)
def test_unparseable_scheme_raises(scheme):
    with pytest.raises(ConfigError, match="cannot parse option"):
        load_target("cpu-x86").supports("conv", scheme)


def test_parse_scheme_fields_and_precision():
    s = parse_scheme("sparse2:4+w8a8")
    assert (s.weight_bits, s.activation_bits, s.group, s.sparsity, s.granularity) == (8, 8, None, "2:4", "per-channel")
    g = parse_scheme("w4g128")
    assert (g.weight_bits, g.activation_bits, g.granularity, g.precision) == (4, None, "group-128", "int4")
    assert parse_scheme("fp16").precision == "fp16"
    assert parse_scheme("w8a8").precision == "int8"
    assert parse_scheme("sparse-unstructured").sparsity == "unstructured"


def test_tolerance_for_missing_precision():
    with pytest.raises(ConfigError, match="no tolerances for 'int3'") as exc:
        load_target("cpu-x86").tolerance_for("int3")
    assert "cpu-x86.toml" in str(exc.value)


# -- loader errors -------------------------------------------------------------------------------------

def test_unknown_key_is_rejected_naming_it(tmp_path):
    path = _write_variant(tmp_path, "cpu-x86", "cores = 2", "cores = 2\nturbo = true")
    with pytest.raises(ConfigError) as exc:
        load_target(str(path))
    assert "hardware.turbo" in str(exc.value) and str(path) in str(exc.value)


def test_unknown_top_level_key_is_rejected(tmp_path):
    path = _write_variant(tmp_path, "cpu-x86", 'runtimes = ["onnxruntime"]', 'runtimes = ["onnxruntime"]\nowner = "x"')
    with pytest.raises(ConfigError, match="unknown key 'owner'"):
        load_target(path)


def test_unknown_op_kind_is_rejected(tmp_path):
    path = _write_variant(tmp_path, "cpu-x86", "[ops.conv]", "[ops.attention]\nfloat_types = ['fp32']\n\n[ops.conv]")
    with pytest.raises(ConfigError, match="ops.attention"):
        load_target(path)


def test_unknown_runtime_is_rejected(tmp_path):
    path = _write_variant(tmp_path, "cpu-x86", 'runtimes = ["onnxruntime"]', 'runtimes = ["onnxruntime", "coreml"]')
    with pytest.raises(ConfigError, match=r"runtimes\.1.*coreml"):
        load_target(path)


def test_unknown_target_name_lists_known_names():
    with pytest.raises(ConfigError, match="unknown target 'no-such-board'") as exc:
        load_target("no-such-board")
    for name in REQUIRED:
        assert name in str(exc.value)


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\nruntimes = ["onnxruntime"\n')
    with pytest.raises(ConfigError, match="not valid TOML") as exc:
        load_target(str(path))
    assert str(path) in str(exc.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_target(str(tmp_path / "absent.toml"))


def test_name_must_match_file_stem(tmp_path):
    path = _write_variant(tmp_path, "cpu-x86", "", "", name="my-x86")
    with pytest.raises(ConfigError, match="does not match the file name 'my-x86'"):
        load_target(path)


def test_source_key_in_file_is_rejected(tmp_path):
    path = _write_variant(tmp_path, "cpu-x86", 'name = "cpu-x86"', 'name = "cpu-x86"\nsource = "elsewhere"')
    with pytest.raises(ConfigError, match="source"):
        load_target(path)


@pytest.mark.parametrize(
    "base, old, new, message",
    [
        # a TensorRT runtime needs a [tensorrt] table, and the other way round
        ("cpu-x86", 'runtimes = ["onnxruntime"]', 'runtimes = ["tensorrt"]', r"\[tensorrt\] table is required"),
        ("cpu-x86", 'runtimes = ["onnxruntime"]', 'runtimes = ["onnxruntime", "onnxruntime"]', "duplicates"),
        # TENSORRT.md rule 11: TRT 8.x has no INT4 / BF16 and only V2 plugins
        ("jetson-orin-nano", 'version = "10.3"', 'version = "8.6"', "TensorRT < 10"),
        # rule 12: no structured sparsity below SM 8.0 (Xavier), no FP8 below SM 8.9
        ("jetson-agx-orin", 'sm = "8.7"', 'sm = "7.2"', "structured sparsity needs"),
        ("rtx-4090", 'sm = "8.9"', 'sm = "8.6"', "FP8 needs"),
        # every supported precision needs tolerances
        ("rtx-4090", "[tolerances.bf16]\nmin_sqnr_db = 24.0\nmin_cosine = 0.998\nmin_top1_agreement = 0.97\n", "",
         "tolerances missing for supported precisions: bf16"),
        ("cpu-x86", "int8 = 665.6", "int8 = -1.0", "peak_gops must be positive"),
        ("cpu-x86", "weight_bits = [8, 4]", "weight_bits = [16]", "between 2 and 8"),
        ("cpu-x86", "min_cosine = 0.97", "min_cosine = 1.5", "tolerances.int8.min_cosine"),
    ],
)
def test_inconsistent_profiles_are_rejected(tmp_path, base, old, new, message):
    path = _write_variant(tmp_path, base, old, new)
    with pytest.raises(ConfigError, match=message):
        load_target(path)


def test_errors_are_readable_not_a_pydantic_dump(tmp_path):
    path = _write_variant(tmp_path, "cpu-x86", "cores = 2", "cores = 2\nturbo = true")
    with pytest.raises(ConfigError) as exc:
        load_target(path)
    assert "pydantic" not in str(exc.value) and "validation error" not in str(exc.value)


# -- where profiles come from --------------------------------------------------------------------------

def test_default_targets_dir_is_the_repo_folder(monkeypatch):
    monkeypatch.delenv("EDGEKIT_TARGETS_DIR", raising=False)
    assert targets_dir().resolve() == REPO_TARGETS


def test_env_override_of_targets_dir(tmp_path, monkeypatch):
    _write_variant(tmp_path, "cpu-x86", 'name = "cpu-x86"', 'name = "lab-box"', name="lab-box")
    monkeypatch.setenv("EDGEKIT_TARGETS_DIR", str(tmp_path))
    assert targets_dir() == tmp_path
    assert [t.name for t in list_targets()] == ["lab-box"]
    assert load_target("lab-box").source == str(tmp_path / "lab-box.toml")
    with pytest.raises(ConfigError, match="known targets: lab-box"):
        load_target("cpu-x86")


def test_env_override_must_be_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_TARGETS_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="EDGEKIT_TARGETS_DIR"):
        targets_dir()


def test_shipped_files_are_plain_toml_with_their_name():
    for path in REPO_TARGETS.glob("*.toml"):
        assert tomllib.loads(path.read_text())["name"] == path.stem


def test_import_does_not_pull_torch():
    code = "import sys, edgekit.targets; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
