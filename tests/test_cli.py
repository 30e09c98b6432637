"""The ``edgekit`` command in-process (click's CliRunner): exit codes, key output, and that bad input writes nothing.

Builds use a tiny PyTorch model (tests/fixtures_models.py, input 1x3x16x16) so that each takes a few seconds; one
good build is shared by every test that only reads its bundle.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import pytest

from edgekit import __version__
from edgekit.cli import cli
from edgekit.keys import key_id, load_public_key

TINY = "fixtures_models:tiny_cnn"
SHAPE = "1,3,16,16"
NAME = "tiny_cnn"  # a factory's bundle is named after it
TARGETS = ("cpu-arm64", "cpu-x86", "cpu-x86-edgekit", "jetson-agx-orin", "jetson-orin-nano", "rtx-4090")
REPO_TARGETS = Path(__file__).resolve().parent.parent / "targets"


def assert_nothing_written(out: Path) -> None:
    """No bundle, archive, work folder or ``.partial`` staging folder: the output folder is absent or empty."""
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], f"a failed build left {left} in {out}"


def error_message(stderr: str) -> str:
    """The CLI's one error (``error: ...`` plus its hint), after any log lines."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, stderr
    return "\n".join(lines[starts[0]:])


def assert_flags_exist(message: str, *command_path: str) -> None:
    """Every ``--flag`` a message tells the user to pass is an option of the command they ran."""
    cmd = cli
    for name in command_path:
        cmd = cmd.commands[name]
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", message))
    assert mentioned <= known, f"the message names {sorted(mentioned - known)}, not options of " \
                               f"`edgekit {' '.join(command_path)}`: {message}"


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """Calibration/evaluation tensors for the tiny model, and the broken data files the error tests feed it."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    np.save(d / "eval.npy", rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    nan = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    nan[3, 1, 2, 3] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "wrong_shape.npy", np.zeros((8, 3, 8, 8), np.float32))
    np.save(d / "empty.npy", np.zeros((0, 3, 16, 16), np.float32))
    (d / "text.npz").write_text("these are not the arrays you are looking for\n")
    (d / "corrupt.onnx").write_bytes(b"\x08\x07garbage, not a protobuf\xff\xfe" * 8)
    (d / "folder.onnx").mkdir()
    (d / "garbage.pt2").write_bytes(bytes(range(100)))
    images = d / "images"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return SimpleNamespace(dir=d, calib=d / "calib.npy", eval=d / "eval.npy", images=images)


@pytest.fixture(scope="module")
def keys(tmp_path_factory, run_cli) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("keys")
    run_cli("keys", "generate", "--out", folder, "--name", "release")
    run_cli("keys", "generate", "--out", folder, "--name", "other")
    return SimpleNamespace(key=folder / "release.key", pub=folder / "release.pub", other_pub=folder / "other.pub")


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, run_cli, data, keys) -> SimpleNamespace:
    """One good INT8 build of the tiny model, signed with the release key. Read-only for the tests that use it."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    result = run_cli("build", "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib, "--precision", "int8",
                     "--key", keys.key, "--out", out, "--json")
    return SimpleNamespace(out=out, result=result, summary=json.loads(result.stdout), bundle=out / NAME,
                           archive=out / f"{NAME}.ekb")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, test_models_importable) -> Path:
    """The tiny model exported to ONNX by torch itself (dynamic batch), as a user would bring it."""
    import warnings

    import torch
    from fixtures_models import tiny_cnn

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tiny_cnn(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=True, external_data=False,
            input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        )
    return path


# ---------------------------------------------------------------------------------------------- help, version


def _walk(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(cli))


def test_command_tree_walk_finds_the_known_commands():
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"", "build", "targets", "targets show", "inspect", "verify", "keys", "keys generate", "plan",
            "plan show"} <= paths


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "edgekit" for p, _ in COMMANDS])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_on_every_command(run_cli, path, cmd, flag):
    assert cmd.help, f"`edgekit {' '.join(path)}` has no docstring"
    first_line = cmd.help.strip().splitlines()[0]
    result = run_cli(*path, flag)
    assert result.stdout.startswith(f"Usage: edgekit {' '.join(path)}".rstrip())
    assert one_line(first_line) in one_line(result.stdout)


def test_version(run_cli):
    result = run_cli("--version")
    assert result.stdout.strip() == f"edgekit, version {__version__}"


# ---------------------------------------------------------------------------------------------- targets


def test_targets_lists_every_profile(run_cli):
    lines = run_cli("targets").stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(TARGETS)
    x86 = next(line for line in lines if line.startswith("cpu-x86 "))
    assert "onnxruntime" in x86


def test_targets_json(run_cli):
    listed = json.loads(run_cli("targets", "--json").stdout)
    assert sorted(t["name"] for t in listed) == sorted(TARGETS)
    assert all(t["runtimes"] and t["description"] for t in listed)


def test_targets_show(run_cli):
    out = run_cli("targets", "show", "jetson-orin-nano").stdout
    assert out.startswith("jetson-orin-nano: ")
    assert "runtimes: tensorrt, onnxruntime" in out
    for section in ("memory:", "conv:", "depthwise_conv:", "linear:", "budgets:", "tolerances[fp32]",
                    "tolerances[int8]"):
        assert section in out


def test_targets_show_json(run_cli):
    profile = json.loads(run_cli("targets", "show", "jetson-orin-nano", "--json").stdout)
    assert profile["name"] == "jetson-orin-nano"
    assert profile["runtimes"][0] == "tensorrt"
    assert profile["hardware"]["sm"] == "8.7"
    assert {"fp32", "int8"} <= set(profile["tolerances"])


def test_targets_show_unknown(run_cli):
    result = run_cli("targets", "show", "nope", code=3)
    assert "unknown target 'nope'" in result.stderr
    assert "cpu-x86" in result.stderr  # the hint lists the known ones
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------------- keys


def test_keys_generate(run_cli, tmp_path):
    out = tmp_path / "k"
    result = run_cli("keys", "generate", "--out", out, "--name", "ci")
    priv, pub = out / "ci.key", out / "ci.pub"
    assert priv.is_file() and pub.is_file()
    assert priv.stat().st_mode & 0o077 == 0
    assert f"key id:      {key_id(load_public_key(pub))}" in result.stdout

    first_priv, first_pub = priv.read_bytes(), pub.read_bytes()
    again = run_cli("keys", "generate", "--out", out, "--name", "ci", code=3)
    assert "refusing to overwrite" in again.stderr and "ci.key" in again.stderr
    assert (priv.read_bytes(), pub.read_bytes()) == (first_priv, first_pub)  # kept as they were

    run_cli("keys", "generate", "--out", out, "--name", "ci", "--force")
    assert priv.read_bytes() != first_priv and pub.read_bytes() != first_pub


def test_keys_generate_default_name(run_cli, tmp_path):
    run_cli("keys", "generate", "--out", tmp_path)
    assert (tmp_path / "edgekit.key").is_file() and (tmp_path / "edgekit.pub").is_file()


def test_keys_generate_refusal_hints_at_force(run_cli, tmp_path):
    run_cli("keys", "generate", "--out", tmp_path)
    again = run_cli("keys", "generate", "--out", tmp_path, code=3)
    assert "--force" in again.stderr
    assert_flags_exist(error_message(again.stderr), "keys", "generate")


# ---------------------------------------------------------------------------------------------- build: bad input

# (id, build args after --out, exit code, substrings the message must contain)
BAD_BUILDS = [
    ("unknown-target", ["--target", "nope"], 3, ["unknown target 'nope'", "cpu-x86"]),
    ("unknown-builtin", ["--model", "builtin:nope"], 3, ["unknown built-in model 'nope'", "builtin:digits-cnn"]),
    ("missing-module", ["--model", "edgekit_no_such_module:make", "--input-shape", SHAPE], 4,
     ["cannot import module 'edgekit_no_such_module'"]),
    ("missing-factory", ["--model", "fixtures_models:no_such_factory", "--input-shape", SHAPE], 4,
     ["'fixtures_models'", "'no_such_factory'"]),
    ("factory-raises", ["--model", "fixtures_models:broken_factory", "--input-shape", SHAPE], 4,
     ["broken_factory", "RuntimeError", "broken on purpose"]),
    ("missing-onnx", ["--model", "{dir}/missing.onnx"], 4, ["model file not found", "missing.onnx"]),
    ("corrupt-onnx", ["--model", "{dir}/corrupt.onnx"], 4, ["corrupt.onnx", "not a valid ONNX model"]),
    ("no-input-shape", ["--model", TINY, "--calib", "{dir}/calib.npy"], 3, ["needs its input shape", "--input-shape"]),
    ("bad-input-shape", ["--model", TINY, "--input-shape", "a,b", "--calib", "{dir}/calib.npy"], 3,
     ["--input-shape 'a,b'", "integers"]),
    ("no-calib", ["--model", TINY, "--input-shape", SHAPE], 3, ["no built-in calibration data", "--calib"]),
    ("calib-missing", ["--model", TINY, "--input-shape", SHAPE, "--calib", "{dir}/missing.npy"], 5,
     ["missing.npy", "no such file"]),
    ("calib-nan", ["--model", TINY, "--input-shape", SHAPE, "--calib", "{dir}/nan.npy"], 5,
     ["nan.npy", "NaN"]),
    ("calib-wrong-shape", ["--model", TINY, "--input-shape", SHAPE, "--calib", "{dir}/wrong_shape.npy"], 5,
     ["wrong_shape.npy", "expected samples of shape (3, 16, 16)", "(3, 8, 8)"]),
    ("calib-empty", ["--model", TINY, "--input-shape", SHAPE, "--calib", "{dir}/empty.npy"], 5,
     ["empty.npy", "empty"]),
    ("calib-text-as-npz", ["--model", TINY, "--input-shape", SHAPE, "--calib", "{dir}/text.npz"], 5,
     ["text.npz", "not a readable .npz"]),
    # found by a CLI sweep (session 28): a name that is a path wrote the bundle outside --out; NaN crashed the solver
    ("name-is-a-path", ["--model", TINY, "--input-shape", SHAPE, "--calib", "{dir}/calib.npy", "--name", "../evil"],
     3, ["invalid bundle name", "'../evil'"]),
    ("avg-bits-nan", ["--model", TINY, "--input-shape", SHAPE, "--calib", "{dir}/calib.npy", "--budget",
                      "avg-bits=nan"], 3, ["avg-bits budget 'nan'", "not a finite number"]),
    ("model-is-a-folder", ["--model", "{dir}/folder.onnx"], 4, ["folder.onnx", "is a folder"]),
    ("pt2-not-a-zip", ["--model", "{dir}/garbage.pt2"], 4, ["garbage.pt2", "not a torch.export program"]),
]


@pytest.mark.parametrize("args,code,needles", [b[1:] for b in BAD_BUILDS], ids=[b[0] for b in BAD_BUILDS])
def test_build_bad_input(run_cli, data, tmp_path, args, code, needles):
    out = tmp_path / "out"
    result = run_cli("build", "--out", out, *[a.format(dir=data.dir) for a in args], code=code)
    message = error_message(result.stderr)
    for needle in needles:
        assert needle in message
    assert_flags_exist(message, "build")
    assert_nothing_written(out)


def test_build_text_as_npz_message_does_not_suggest_unpickling(run_cli, data, tmp_path):
    result = run_cli("build", "--out", tmp_path / "out", "--model", TINY, "--input-shape", SHAPE,
                     "--calib", data.dir / "text.npz", code=5)
    assert "pickle" not in result.stderr


def test_build_bad_precision_is_usage_error(run_cli, data, tmp_path):
    out = tmp_path / "out"
    result = run_cli("build", "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib, "--precision", "bogus",
                     "--out", out, code=2)
    assert "Invalid value for '--precision'" in result.stderr
    assert "'bogus'" in result.stderr
    assert_nothing_written(out)


def test_build_onnx_with_image_folder_needs_preprocessing(run_cli, tiny_onnx, data, tmp_path):
    out = tmp_path / "out"
    result = run_cli("build", "--model", tiny_onnx, "--calib", data.images, "--precision", "int8", "--out", out,
                     code=3)
    assert "image folders need the model's preprocessing" in result.stderr
    assert ".npy" in result.stderr  # the hint says what to pass instead
    assert_flags_exist(error_message(result.stderr), "build")
    assert_nothing_written(out)


@pytest.mark.parametrize("where", [
    "edgekit.build.export_onnx",  # early: inside the work folder
    "edgekit.report.write_report",  # while the bundle folder is being staged
    "edgekit.bundle.pack",  # after sealing: the folder and the archive appear together or not at all
])
def test_build_interrupted_leaves_nothing(run_cli, data, tmp_path, monkeypatch, where):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)
    out = tmp_path / "out"
    result = run_cli("build", "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib, "--out", out, code=130)
    assert "interrupted" in result.stderr
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------- build: good


def test_build_json_summary_and_outputs(tiny_build):
    s = tiny_build.summary
    assert Path(s["bundle"]) == tiny_build.bundle and Path(s["archive"]) == tiny_build.archive
    assert Path(s["report"]) == tiny_build.bundle / "report.html"
    assert s["target"] == "cpu-x86" and s["precision"] == "int8"
    assert s["verification"]["passed"] is True and s["verification"]["tolerance_class"] == "int8"
    assert s["size"]["artifact_bytes"] < s["size"]["fp32_bytes"]
    assert s["latency"]["fp32"]["median_ms"] > 0
    assert tiny_build.archive.is_file()
    assert {"model.onnx", "plan.json", "verification.json", "report.json", "report.html", "manifest.json",
            "manifest.sig"} <= {p.name for p in tiny_build.bundle.iterdir()}
    assert "edgekit build report" in (tiny_build.bundle / "report.html").read_text()
    # no work folder, staging folder or temp file left beside the outputs
    assert sorted(os.listdir(tiny_build.out)) == [NAME, f"{NAME}.ekb"]


def test_bundle_folder_is_as_readable_as_the_archive(tiny_build):
    umask = os.umask(0)
    os.umask(umask)
    if umask & 0o044:
        pytest.skip(f"umask {umask:03o} makes new files private anyway")
    assert tiny_build.archive.stat().st_mode & 0o777 == 0o644
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tiny_build.bundle, *tiny_build.bundle.iterdir()]}
    assert all(m & 0o044 == 0o044 for m in modes.values()), {k: oct(v) for k, v in modes.items()}


def test_inspect_archive(run_cli, tiny_build):
    out = run_cli("inspect", tiny_build.archive).stdout
    assert "all hashes match" in out
    assert "not checked against a trusted key" in out
    assert "for cpu-x86 (onnxruntime)" in out
    assert "plan:      int8 via uniform: 3 x w8a8" in out
    assert "PASS" in out
    assert f"lineage:   {TINY}" in out


def test_inspect_bundle_folder(run_cli, tiny_build):
    assert "all hashes match" in run_cli("inspect", tiny_build.bundle).stdout


def test_inspect_trusted_pubkey(run_cli, tiny_build, keys):
    out = run_cli("inspect", tiny_build.archive, "--pubkey", keys.pub).stdout
    assert f"valid, signed by trusted key {key_id(load_public_key(keys.pub))}" in out


def test_inspect_json(run_cli, tiny_build, keys):
    doc = json.loads(run_cli("inspect", tiny_build.archive, "--pubkey", keys.pub, "--json").stdout)
    assert doc["signature"] == {"valid": True, "trusted": True, "key_id": key_id(load_public_key(keys.pub)),
                                "detail": doc["signature"]["detail"]}
    assert doc["manifest"]["name"] == NAME
    assert doc["manifest"]["verification"]["passed"] is True


def test_inspect_untrusted_pubkey(run_cli, tiny_build, keys):
    result = run_cli("inspect", tiny_build.archive, "--pubkey", keys.other_pub, code=9)
    assert "not in the trusted keys" in result.stderr


def test_inspect_missing_bundle(run_cli, tmp_path):
    result = run_cli("inspect", tmp_path / "nothing.ekb", code=9)
    assert "no bundle at" in result.stderr


def _flip_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def test_inspect_tampered_archive(run_cli, tiny_build, tmp_path):
    tampered = tmp_path / f"{NAME}.ekb"
    with tarfile.open(tiny_build.archive, "r:gz") as src, tarfile.open(tampered, "w:gz") as dst:
        for info in src.getmembers():
            payload = src.extractfile(info).read() if info.isfile() else None
            if info.name == "model.onnx":
                payload = _flip_byte(payload)
            dst.addfile(info, io.BytesIO(payload) if payload is not None else None)
    result = run_cli("inspect", tampered, code=9)
    assert "model.onnx" in result.stderr and "does not match its manifest hash" in result.stderr


def test_inspect_tampered_folder(run_cli, tiny_build, tmp_path):
    copy = Path(shutil.copytree(tiny_build.bundle, tmp_path / NAME))
    model = copy / "model.onnx"
    model.write_bytes(_flip_byte(model.read_bytes()))
    result = run_cli("inspect", copy, code=9)
    assert "model.onnx" in result.stderr


@pytest.mark.parametrize("model_args", [["--model", TINY], []], ids=["explicit-model", "model-from-lineage"])
def test_verify_passes(run_cli, tiny_build, data, keys, model_args):
    out = run_cli("verify", tiny_build.archive, "--data", data.eval, "--pubkey", keys.pub, *model_args).stdout
    assert out.startswith(f"{tiny_build.archive}: ")
    assert "on 16 samples" in out and "PASS" in out


def test_verify_json_and_limit(run_cli, tiny_build, data):
    report = json.loads(run_cli("verify", tiny_build.archive, "--data", data.eval, "--model", TINY, "--limit", "5",
                                "--json").stdout)
    assert report["passed"] is True and report["samples"] == 5 and report["tolerance_class"] == "int8"


def test_verify_against_a_different_model_fails(run_cli, tiny_build, data):
    result = run_cli("verify", tiny_build.archive, "--data", data.eval, "--model", "fixtures_models:tiny_cnn_other",
                     code=8)
    assert "FAIL" in result.stdout and "failed:" in result.stdout


def test_verify_image_folder_without_preprocessing(run_cli, tiny_build, data):
    result = run_cli("verify", tiny_build.archive, "--data", data.images, "--model", TINY, code=3)
    message = error_message(result.stderr)
    assert "needs the model's preprocessing" in message
    assert_flags_exist(message, "verify")


def test_verify_untrusted_pubkey(run_cli, tiny_build, data, keys):
    result = run_cli("verify", tiny_build.archive, "--data", data.eval, "--pubkey", keys.other_pub, code=9)
    assert "not in the trusted keys" in result.stderr


def test_plan_show_lists_every_layer(run_cli, tiny_build):
    plan = json.loads((tiny_build.bundle / "plan.json").read_text())
    assert len(plan["layers"]) == 3
    out = run_cli("plan", "show", tiny_build.bundle / "plan.json").stdout
    assert out.splitlines()[0] == "plan v1 for cpu-x86: int8 via uniform, 3 layers"
    rows = out.splitlines()[1:]
    assert len(rows) == len(plan["layers"])
    for row, choice in zip(rows, plan["layers"]):
        assert row.split()[:2] == [choice["layer"], choice["option"]]
    # a bundle folder names its plan too
    assert run_cli("plan", "show", tiny_build.bundle).stdout == out


def test_plan_show_json_round_trips(run_cli, tiny_build):
    shown = json.loads(run_cli("plan", "show", tiny_build.bundle / "plan.json", "--json").stdout)
    assert shown == json.loads((tiny_build.bundle / "plan.json").read_text())


def test_plan_show_missing_file(run_cli, tmp_path):
    result = run_cli("plan", "show", tmp_path / "plan.json", code=3)
    assert "plan file not found" in result.stderr


def test_build_from_onnx_file_int8(run_cli, tiny_onnx, data, tmp_path):
    out = tmp_path / "out"
    summary = json.loads(run_cli("build", "--model", tiny_onnx, "--calib", data.calib, "--precision", "int8",
                                 "--eval", data.eval, "--no-latency", "--out", out, "--json").stdout)
    assert summary["precision"] == "int8" and summary["verification"]["passed"] is True
    assert summary["verification"]["samples"] == 16
    assert (out / "tiny" / "model.onnx").is_file() and (out / "tiny.ekb").is_file()


# ---------------------------------------------------------------------------------------------- --allow-unverified


@pytest.fixture
def impossible_target(tmp_path) -> Path:
    """cpu-x86 with SQNR floors no artifact can reach (SQNR is reported capped at 200 dB)."""
    text = (REPO_TARGETS / "cpu-x86.toml").read_text()
    assert text.count("min_sqnr_db = ") >= 2  # every precision class gets the impossible floor
    text = text.replace('name = "cpu-x86"', 'name = "impossible-x86"', 1)
    text = "\n".join("min_sqnr_db = 1000.0" if line.startswith("min_sqnr_db = ") else line
                     for line in text.splitlines())
    path = tmp_path / "impossible-x86.toml"
    path.write_text(text)
    return path


def test_build_verification_failure_writes_nothing(run_cli, data, impossible_target, tmp_path):
    out = tmp_path / "out"
    result = run_cli("build", "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib, "--precision", "int8",
                     "--target", impossible_target, "--no-latency", "--out", out, code=8)
    assert "verification failed" in result.stderr
    assert "< 1000.0 dB" in result.stderr
    assert "--allow-unverified" in result.stderr  # the hint
    assert_nothing_written(out)


def test_build_allow_unverified_marks_the_bundle_failed(run_cli, data, impossible_target, tmp_path):
    out = tmp_path / "out"
    summary = json.loads(run_cli("build", "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib,
                                 "--precision", "int8", "--target", impossible_target, "--no-latency",
                                 "--allow-unverified", "--out", out, "--json").stdout)
    assert summary["target"] == "impossible-x86"
    assert summary["verification"]["passed"] is False
    manifest = json.loads((out / NAME / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is False
    assert any("1000.0 dB" in f for f in manifest["verification"]["failures"])
    assert (out / f"{NAME}.ekb").is_file()
    assert "FAIL" in (out / NAME / "report.html").read_text()


# ---------------------------------------------------------------------------------------------- apply (replay a plan)


def _edited_plan(tiny_build, tmp_path, edit) -> Path:
    plan = json.loads((tiny_build.bundle / "plan.json").read_text())
    edit(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_apply_replays_an_edited_plan(run_cli, tiny_build, data, tmp_path):
    def keep_first_float(plan):
        plan["layers"][0].update(option="fp32", reason="edited by hand")

    path = _edited_plan(tiny_build, tmp_path, keep_first_float)
    out = tmp_path / "out"
    result = run_cli("apply", path, "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib, "--out", out,
                     "--json", "--no-latency")
    summary = json.loads(result.stdout)
    assert summary["verification"]["passed"]
    replayed = json.loads((out / NAME / "plan.json").read_text())
    first = replayed["layers"][0]
    assert first["option"] == "fp32" and first["reason"] == "edited by hand"
    assert all(c["option"] == "w8a8" for c in replayed["layers"][1:])
    # the artifact really keeps that layer float: its weight is still a float initializer
    import onnx

    graph = onnx.load(str(out / NAME / "model.onnx")).graph
    node = next(n for n in graph.node if n.name == first["layer"])
    weights = {i.name: i for i in graph.initializer}
    assert weights[node.input[1]].data_type == onnx.TensorProto.FLOAT
    # (not "the artifact grew": this layer has 216 weights, fewer bytes as float than its int8 scales and Q/DQ nodes)
    assert summary["size"]["artifact_bytes"] == (out / NAME / "model.onnx").stat().st_size


@pytest.mark.parametrize("edit, code, needle", [
    (lambda p: p["layers"][0].update(layer="no_such_layer"), 3, "does not fit this model"),
    (lambda p: p["layers"].pop(), 3, "does not fit this model"),
    (lambda p: p["layers"][0].update(option="w9"), 3, "unknown layer option"),
    (lambda p: p.update(version=7), 3, "schema version"),
])
def test_apply_refuses_plans_that_do_not_fit(run_cli, tiny_build, data, tmp_path, edit, code, needle):
    path = _edited_plan(tiny_build, tmp_path, edit)
    out = tmp_path / "out"
    result = run_cli("apply", path, "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib, "--out", out,
                     code=code)
    assert needle in result.stderr
    assert not (out / NAME).exists() and not (out / f"{NAME}.ekb").exists()


def test_apply_refuses_an_option_the_target_lacks(run_cli, tiny_build, data, tmp_path):
    src = (Path(__file__).parents[1] / "targets" / "cpu-x86.toml").read_text()
    target = tmp_path / "cpu-x86.toml"  # a profile whose convolutions have no int8
    target.write_text(src.replace("[ops.conv]\nfloat_types = [\"fp32\"]\nweight_bits = [8, 4]\nactivation_bits = [8]",
                                  "[ops.conv]\nfloat_types = [\"fp32\"]\nweight_bits = []\nactivation_bits = [32]"))
    path = _edited_plan(tiny_build, tmp_path, lambda p: None)
    result = run_cli("apply", path, "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib,
                     "--target", target, "--out", tmp_path / "out", code=6)
    assert "does not support" in result.stderr


def test_hardware_probe_writes_a_table_the_cost_model_reads(run_cli, tiny_onnx, tmp_path):
    from edgekit.cost import HardwareTable, cost_table, layer_geometry
    from edgekit.inventory import layer_inventory
    from edgekit.targets import load_target

    out = tmp_path / "hw.json"
    result = run_cli("hardware", "probe", tiny_onnx, "--out", out, "--rounds", "1", "--per-round", "2",
                     "--copies", "1")
    assert "layer signatures" in result.stdout
    table = HardwareTable.load(out)
    layers = layer_inventory(tiny_onnx)
    cost = cost_table(layers, load_target("cpu-x86"), {layer.name: ["fp32", "w8a8"] for layer in layers},
                      hardware=table, geometry=layer_geometry(tiny_onnx))
    sources = {e.source for row in cost.entries.values() for e in row.values()}
    assert sources and all(s.startswith("measured:") for s in sources)
    # --merge keeps what is there and measures nothing new for the same model
    run_cli("hardware", "probe", tiny_onnx, "--out", out, "--merge", "--rounds", "1", "--per-round", "2")
    assert HardwareTable.load(out).entries.keys() == table.entries.keys()


def test_build_bundle_name_path_writes_nothing_outside_out(run_cli, data, tmp_path):
    out = tmp_path / "a" / "out"
    run_cli("build", "--out", out, "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib, "--name",
            "../../evil", code=3)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # not even the --out folders


def test_a_failed_build_leaves_no_empty_out_folder(run_cli, data, tmp_path):
    """The build creates --out before it allocates; an infeasible budget found then removes what it created."""
    out = tmp_path / "new" / "out"
    result = run_cli("build", "--out", out, "--model", TINY, "--input-shape", SHAPE, "--calib", data.calib,
                     "--eval", data.eval, "--budget", "size=1B", "--no-latency", code=3)
    assert "error:" in result.stderr
    assert not (tmp_path / "new").exists()


def test_seed_must_not_be_negative(run_cli, data, tmp_path):
    result = run_cli("build", "--out", tmp_path / "out", "--model", TINY, "--input-shape", SHAPE, "--seed", "-1",
                     code=2)
    assert "--seed" in result.stderr


@pytest.mark.parametrize("args", [
    ["keys", "generate", "--out", "{file}/keys"],
    ["build", "--model", TINY, "--input-shape", SHAPE, "--calib", "{calib}", "--out", "{file}/out"],
])
def test_an_output_path_through_a_file_is_a_clear_error(run_cli, data, tmp_path, args):
    """Found by a CLI sweep: NotADirectoryError reached the user as an internal error (exit 1)."""
    (tmp_path / "f").write_text("a file, not a folder\n")
    result = run_cli(*[a.format(file=tmp_path / "f", calib=data.calib) for a in args], code=3)
    message = error_message(result.stderr)
    assert "internal error" not in result.stderr and str(tmp_path / "f") in message


def test_hardware_probe_of_a_missing_or_corrupt_onnx_is_a_model_error(run_cli, data, tmp_path):
    for model in (tmp_path / "nosuch.onnx", data.dir / "corrupt.onnx"):
        result = run_cli("hardware", "probe", model, "--out", tmp_path / "t.json", code=4)
        assert model.name in error_message(result.stderr)
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("args, needle", [
    (["--model", "builtin:digits-cnn", "--input-shape", "1,1,100,100"], "not (1, 100, 100)"),
    (["--model", TINY, "--input-shape", SHAPE, "--calib", "{calib}", "--solver", "dp"],
     "--solver dp solves a --budget"),
])
def test_options_that_would_be_ignored_are_errors(run_cli, data, tmp_path, args, needle):
    """Found by a CLI sweep: both were silently ignored."""
    out = tmp_path / "out"
    result = run_cli("build", "--out", out, *[a.format(calib=data.calib) for a in args], code=3)
    assert needle in error_message(result.stderr)
    assert not out.exists()
