from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit import bundle as bundle_mod
from edgekit.bundle import (
    BUNDLE_SCHEMA_VERSION,
    BUNDLE_SUFFIX,
    MANIFEST,
    SIGNATURE,
    OpenedBundle,
    open_bundle,
    pack,
    read_manifest,
    seal,
)
from edgekit.errors import BundleError, SignatureError
from edgekit.keys import key_id, public_key_bytes

FILES = {
    "model.onnx": b"\x08\x07onnx-model-bytes" * 100,
    "report.json": b'{"ok": true}\n',
    "ref/sketch.npz": bytes(range(256)),
}


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def sealed(tmp_path, key) -> Path:
    directory = make_tree(tmp_path / "bundle", FILES)
    seal(directory, {"name": "demo", "target": "cpu"}, key)
    return directory


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- seal / open round trips ---------------------------------------------------------------------------------


def test_seal_writes_canonical_manifest_and_signature(tmp_path, key):
    directory = make_tree(tmp_path / "b", FILES)
    given_manifest = {"name": "demo", "target": "cpu"}
    manifest = seal(directory, given_manifest, key)
    assert given_manifest == {"name": "demo", "target": "cpu"}  # not mutated
    assert manifest["name"] == "demo" and manifest["schema_version"] == BUNDLE_SCHEMA_VERSION
    assert manifest["files"] == [
        {"path": p, "sha256": sha(FILES[p]), "size": len(FILES[p])} for p in sorted(FILES)
    ]
    raw = (directory / MANIFEST).read_bytes()
    assert raw == (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    sig = json.loads((directory / SIGNATURE).read_bytes())
    public = key.public_key()
    assert sig["algorithm"] == "ed25519" and sig["key_id"] == key_id(public)
    public.verify(base64.b64decode(sig["signature"]), raw)  # raises if the signature is not over the bytes
    assert len(base64.b64decode(sig["public_key"])) == 32


def test_open_directory_round_trip(sealed, key):
    opened = open_bundle(sealed)
    assert isinstance(opened, OpenedBundle)
    assert opened.root == sealed and opened.source == sealed
    assert {f["path"]: f["sha256"] for f in opened.manifest["files"]} == {p: sha(d) for p, d in FILES.items()}
    assert opened.signature.valid and not opened.signature.trusted
    assert opened.signature.key_id == key_id(key.public_key())
    assert "not checked against a trusted key" in opened.signature.detail
    assert opened.path("ref/sketch.npz").read_bytes() == FILES["ref/sketch.npz"]

    trusted = open_bundle(sealed, trusted_keys=[Ed25519PrivateKey.generate().public_key(), key.public_key()])
    assert trusted.signature.valid and trusted.signature.trusted
    assert trusted.signature.key_id in trusted.signature.detail
    assert read_manifest(sealed) == opened.manifest


def test_path_refuses_unlisted_names(sealed):
    opened = open_bundle(sealed)
    for name in ["nope.bin", MANIFEST, SIGNATURE, "../model.onnx", "ref"]:
        with pytest.raises(BundleError):
            opened.path(name)


def test_pack_open_archive_round_trip(sealed, tmp_path, key):
    archive = pack(sealed, tmp_path / f"demo{BUNDLE_SUFFIX}")
    assert archive.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    work = tmp_path / "work"
    opened = open_bundle(archive, trusted_keys=[key.public_key()], workdir=work)
    assert opened.root == work and opened.source == archive
    assert opened.signature.trusted
    for rel, data in FILES.items():
        assert opened.path(rel).read_bytes() == data
    assert opened.manifest == open_bundle(sealed).manifest
    assert read_manifest(archive) == opened.manifest

    tmp_opened = open_bundle(archive)  # no workdir: unpacked into a fresh temporary folder
    try:
        assert tmp_opened.path("model.onnx").read_bytes() == FILES["model.onnx"]
    finally:
        shutil.rmtree(tmp_opened.root)


def test_pack_is_byte_deterministic(sealed, tmp_path):
    first = pack(sealed, tmp_path / "one.ekb").read_bytes()
    for p in sealed.rglob("*"):
        os.utime(p, (1_600_000_000, 1_700_000_000))
    (sealed / "model.onnx").chmod(0o600)
    second = pack(sealed, tmp_path / "two.ekb").read_bytes()
    assert first == second
    with tarfile.open(tmp_path / "one.ekb") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert set(names) == set(FILES) | {MANIFEST, SIGNATURE, "ref"}
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() else 0o644)


def test_pack_refuses_unsealed_folder(tmp_path):
    directory = make_tree(tmp_path / "raw", FILES)
    with pytest.raises(BundleError, match="not a sealed bundle"):
        pack(directory, tmp_path / "raw.ekb")
    assert not (tmp_path / "raw.ekb").exists()


def test_pack_refuses_archive_inside_the_folder(sealed):
    with pytest.raises(BundleError):
        pack(sealed, sealed / "self.ekb")


# --- tampering and trust ---------------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_artifact_in_directory(sealed):
    flip_byte(sealed / "model.onnx")
    with pytest.raises(BundleError, match=r"file 'model.onnx' does not match its manifest hash") as info:
        open_bundle(sealed)
    assert not isinstance(info.value, SignatureError)


def test_tampered_artifact_in_archive(sealed, tmp_path):
    flip_byte(sealed / "ref" / "sketch.npz")
    archive = pack(sealed, tmp_path / "t.ekb")  # pack does not re-verify, so it carries the tampered byte
    work = tmp_path / "work"
    with pytest.raises(BundleError, match=r"file 'ref/sketch.npz' does not match its manifest hash"):
        open_bundle(archive, workdir=work)
    assert not work.exists()  # what was unpacked is removed on failure


def test_truncated_artifact(sealed):
    (sealed / "model.onnx").write_bytes(FILES["model.onnx"][:-1])
    with pytest.raises(BundleError, match="model.onnx"):
        open_bundle(sealed)


def test_tampered_manifest_fails_signature(sealed, tmp_path):
    manifest = json.loads((sealed / MANIFEST).read_bytes())
    manifest["target"] = "gpu"
    (sealed / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(SignatureError, match="does not match"):
        open_bundle(sealed)
    with pytest.raises(SignatureError):
        open_bundle(pack(sealed, tmp_path / "m.ekb"), workdir=tmp_path / "w")


def test_manifest_resigned_by_attacker_is_untrusted(sealed, key):
    attacker = Ed25519PrivateKey.generate()
    flip_byte(sealed / "model.onnx")
    seal(sealed, {"name": "demo", "target": "cpu"}, attacker)
    assert open_bundle(sealed).signature.key_id == key_id(attacker.public_key())  # valid, but not trusted
    with pytest.raises(SignatureError, match="not in the trusted keys") as info:
        open_bundle(sealed, trusted_keys=[key.public_key()])
    assert key_id(attacker.public_key()) in str(info.value)


def test_wrong_trusted_key(sealed):
    with pytest.raises(SignatureError, match="not in the trusted keys"):
        open_bundle(sealed, trusted_keys=[Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(SignatureError):
        open_bundle(sealed, trusted_keys=[])


def test_signature_with_swapped_public_key(sealed):
    sig = json.loads((sealed / SIGNATURE).read_bytes())
    other = Ed25519PrivateKey.generate().public_key()
    sig["public_key"] = base64.b64encode(public_key_bytes(other)).decode()
    (sealed / SIGNATURE).write_text(json.dumps(sig))
    with pytest.raises(SignatureError):
        open_bundle(sealed)


@pytest.mark.parametrize("content", [b"", b"not json", b"{}", b'{"algorithm": "rsa"}', b"[1, 2]"])
def test_malformed_signature_file(sealed, content):
    (sealed / SIGNATURE).write_bytes(content)
    with pytest.raises(SignatureError):
        open_bundle(sealed)


def test_extra_unlisted_file(sealed):
    (sealed / "ref" / "backdoor.py").write_text("print('hi')")
    with pytest.raises(BundleError, match="backdoor.py"):
        open_bundle(sealed)


def test_missing_listed_file(sealed):
    (sealed / "report.json").unlink()
    with pytest.raises(BundleError, match="report.json"):
        open_bundle(sealed)


def test_missing_manifest_and_signature(sealed):
    (sealed / SIGNATURE).unlink()
    with pytest.raises(SignatureError, match="not signed") as info:
        open_bundle(sealed)
    assert info.value.hint
    (sealed / MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(sealed)


def test_manifest_with_unsafe_paths_is_refused(tmp_path, key):
    # A correctly signed manifest that lists a path outside the bundle must still be refused.
    for bad in ["../model.onnx", "/etc/passwd", "a/../../x", "./model.onnx"]:
        directory = make_tree(tmp_path / f"b{abs(hash(bad))}", {"model.onnx": b"x"})
        manifest = seal(directory, {}, key)
        manifest["files"][0]["path"] = bad
        raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        (directory / MANIFEST).write_bytes(raw)
        sig = json.loads((directory / SIGNATURE).read_bytes())
        sig["signature"] = base64.b64encode(key.sign(raw)).decode()
        (directory / SIGNATURE).write_text(json.dumps(sig))
        with pytest.raises(BundleError, match=r"unsafe path|'\.\.' component|invalid or duplicate path") as info:
            open_bundle(directory)
        assert not isinstance(info.value, SignatureError), bad


def test_symlinks_refused_when_sealing_and_opening(tmp_path, sealed, key):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    directory = make_tree(tmp_path / "b2", FILES)
    (directory / "link.txt").symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link"):
        seal(directory, {}, key)
    assert not (directory / MANIFEST).exists()
    (sealed / "link.txt").symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link"):
        open_bundle(sealed)


# --- not a bundle --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"hello, I am not a tar file\n" * 50, b"\x1f\x8b\x08\x00garbage-gzip"])
def test_non_tar_file_is_bundle_error(tmp_path, content):
    path = tmp_path / "x.ekb"
    path.write_bytes(content)
    with pytest.raises(BundleError):
        open_bundle(path, workdir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_nonexistent_path_and_plain_folder(tmp_path):
    with pytest.raises(BundleError, match="no bundle"):
        open_bundle(tmp_path / "missing.ekb")
    make_tree(tmp_path / "plain", FILES)
    with pytest.raises(BundleError):
        open_bundle(tmp_path / "plain")


def test_truncated_archive(sealed, tmp_path):
    data = pack(sealed, tmp_path / "a.ekb").read_bytes()
    (tmp_path / "cut.ekb").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError):
        open_bundle(tmp_path / "cut.ekb", workdir=tmp_path / "w")


def test_workdir_must_be_empty(sealed, tmp_path):
    archive = pack(sealed, tmp_path / "a.ekb")
    work = tmp_path / "w"
    work.mkdir()
    (work / "stale").write_text("x")
    with pytest.raises(BundleError, match="not an empty folder"):
        open_bundle(archive, workdir=work)
    assert (work / "stale").read_text() == "x"
    with pytest.raises(BundleError, match="not an empty folder"):
        open_bundle(archive, workdir=work / "stale")


# --- hostile archives ----------------------------------------------------------------------------------------


def hostile_archive(path: Path, sealed: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A gzip tar holding a real sealed bundle plus hand-made hostile members."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(sealed.rglob("*")):
            tar.add(p, arcname=p.relative_to(sealed).as_posix(), recursive=False)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def reg(name: str, data: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def assert_refused(archive: Path, work: Path, match: str | None = None) -> None:
    with pytest.raises(BundleError, match=match) as info:
        open_bundle(archive, workdir=work)
    assert not isinstance(info.value, SignatureError)
    assert not work.exists() or not any(work.iterdir())


def test_hostile_dotdot_member(sealed, tmp_path):
    work = tmp_path / "w" / "unpack"
    archive = hostile_archive(tmp_path / "evil.ekb", sealed, [reg("../evil"), reg("ok/../../evil2")])
    assert_refused(archive, work, r"contains a '\.\.' component")
    assert not (tmp_path / "w" / "evil").exists()
    assert not (tmp_path / "w" / "evil2").exists()
    assert not (tmp_path / "evil2").exists()


def test_hostile_absolute_member(sealed, tmp_path):
    target = tmp_path / "abs-target"
    archive = hostile_archive(tmp_path / "abs.ekb", sealed, [reg(str(target))])
    with tarfile.open(archive) as tar:
        assert str(target) in tar.getnames()  # the member really is absolute
    assert_refused(archive, tmp_path / "w", "absolute")
    assert not target.exists()
    assert not (tmp_path / "w" / str(target).lstrip("/")).exists()


def test_hostile_symlink_member(sealed, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = hostile_archive(
        tmp_path / "sym.ekb", sealed, [link("escape", str(outside), tarfile.SYMTYPE), reg("escape/pwned.txt")]
    )
    assert_refused(archive, tmp_path / "w", "symbolic link")
    assert not (outside / "pwned.txt").exists()


def test_hostile_hardlink_member(sealed, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    archive = hostile_archive(tmp_path / "hard.ekb", sealed, [link("hl", str(victim), tarfile.LNKTYPE)])
    assert_refused(archive, tmp_path / "w", "hard link")
    assert victim.read_text() == "original"
    assert not (tmp_path / "w" / "hl").exists()


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_hostile_device_member(sealed, tmp_path, kind):
    info = tarfile.TarInfo("dev")
    info.type = kind
    archive = hostile_archive(tmp_path / "dev.ekb", sealed, [(info, None)])
    assert_refused(archive, tmp_path / "w", "device or fifo")


def test_duplicate_member(sealed, tmp_path):
    archive = hostile_archive(tmp_path / "dup.ekb", sealed, [reg("model.onnx", FILES["model.onnx"])])
    assert_refused(archive, tmp_path / "w", "twice")


def test_member_and_size_limits(sealed, tmp_path, monkeypatch):
    archive = pack(sealed, tmp_path / "ok.ekb")
    monkeypatch.setattr(bundle_mod, "MAX_ARCHIVE_MEMBERS", 3)
    assert_refused(archive, tmp_path / "w1", "members")
    monkeypatch.setattr(bundle_mod, "MAX_ARCHIVE_MEMBERS", 10_000)
    monkeypatch.setattr(bundle_mod, "MAX_ARCHIVE_BYTES", 1000)
    assert_refused(archive, tmp_path / "w2", "bytes")


# --- properties ----------------------------------------------------------------------------------------------

_segment = st.text(alphabet="abcxyzABC019_-.", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
_relpaths = st.lists(_segment, min_size=1, max_size=3).map("/".join)


def _no_prefix_clash(tree: dict[str, bytes]) -> bool:
    return not any(other.startswith(p + "/") for p in tree for other in tree)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(_relpaths, st.binary(max_size=300), min_size=1, max_size=6).filter(_no_prefix_clash))
def test_seal_open_round_trips_any_small_tree(key, tree):
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_tree(Path(tmp) / "b", tree)
        manifest = seal(directory, {"note": "prop"}, key)
        assert [f["path"] for f in manifest["files"]] == sorted(tree)
        for opened in (
            open_bundle(directory, trusted_keys=[key.public_key()]),
            open_bundle(pack(directory, Path(tmp) / "b.ekb"), trusted_keys=[key.public_key()], workdir=Path(tmp) / "w"),
        ):
            assert opened.manifest == manifest and opened.signature.trusted
            for rel, data in tree.items():
                assert opened.path(rel).read_bytes() == data
                assert {"path": rel, "sha256": sha(data), "size": len(data)} in opened.manifest["files"]


# --- devices open bundles without torch ----------------------------------------------------------------------


def test_bundle_and_keys_import_no_heavy_frameworks():
    code = textwrap.dedent(
        """
        import sys
        heavy = ("torch", "onnx", "onnxruntime")
        attempted = []

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in heavy:
                    attempted.append(name)
                return None

        sys.meta_path.insert(0, Block())
        import edgekit.bundle, edgekit.keys
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        if loaded or attempted:
            print("loaded:", loaded, "attempted:", attempted)
            sys.exit(1)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
