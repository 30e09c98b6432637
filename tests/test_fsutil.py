import pytest

from edgekit.fsutil import atomic_write_text, sha256_bytes, sha256_file, staging_dir


def test_staging_dir_replaces_on_success(tmp_path):
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staging_dir(final) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary left behind


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_staging_dir_leaves_nothing_on_failure(tmp_path, exc):
    final = tmp_path / "bundle"
    with pytest.raises(exc):
        with staging_dir(final) as stage:
            (stage / "half.txt").write_text("half")
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_and_hashes(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    assert p.read_text() == "hello"
    assert sha256_file(p) == sha256_bytes(b"hello")
    assert [q.name for q in p.parent.iterdir()] == ["x.txt"]
