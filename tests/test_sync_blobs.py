"""The sync service's blob stores: the same contract on a filesystem and on S3 (a local moto server, no real AWS)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekit.sync.blobs import (
    BlobError,
    BlobHashMismatch,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    FsBlobStore,
    S3BlobStore,
    open_store,
)
from tests.sync_pg import pg_server, pg_url  # noqa: F401

MiB = 1 << 20
DATA = os.urandom(3 * MiB)
SHA = hashlib.sha256(DATA).hexdigest()
BAD_SHAS = ["../../etc/passwd", SHA.upper(), SHA[:63], SHA + "0", "", f"{SHA[:62]}/x"]
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,  # nothing from ~/.aws either
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free local port, with fake credentials in the environment for the module.

    Without moto's server extra (flask), moto's in-process mock stands in: the same S3 model, answering boto3 for
    this endpoint URL without a socket (nothing listens there, so a request it missed could not leave the machine).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        for name, value in FAKE_AWS.items():
            mp.setenv(name, value)
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as e:
            from moto import mock_aws

            warnings.warn(f"moto's server is not installed ({e}); S3 tests use moto's in-process mock", stacklevel=1)
            mp.setenv("MOTO_S3_CUSTOM_ENDPOINTS", endpoint)
            with mock_aws():
                yield endpoint
            return
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield endpoint
        finally:
            server.stop()


def _bucket(endpoint: str) -> tuple[object, str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    name = f"blobs-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "fs":
        return FsBlobStore(tmp_path / "blobs")
    client, bucket = _bucket(request.getfixturevalue("s3_endpoint"))
    return S3BlobStore(bucket, "fleet/v1", client=client)


def _leftovers(store: BlobStore) -> list[str]:
    """Everything the store holds besides finished blobs' names: temporary files/objects, pending multipart uploads."""
    if isinstance(store, FsBlobStore):
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert isinstance(store, S3BlobStore)
    objects = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return sorted(o["Key"] for o in objects) + [f"upload {u['Key']}" for u in uploads]


def _pieces(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """``data`` in chunks of the given sizes, cycling (uneven chunks: smaller and larger than 1 MiB)."""
    pos, i = 0, 0
    while pos < len(data):
        yield data[pos : pos + sizes[i % len(sizes)]]
        pos += sizes[i % len(sizes)]
        i += 1


def test_put_from_file_and_iterator(store: BlobStore) -> None:
    assert store.put_stream(io.BytesIO(DATA), max_bytes=len(DATA)) == (SHA, len(DATA))  # exactly at the limit
    assert store.exists(SHA) and store.size(SHA) == len(DATA)
    assert b"".join(store.open_range(SHA)) == DATA
    # the same content again, now as uneven chunks: idempotent, one blob
    assert store.put_stream(_pieces(DATA, [700_000, 2 * MiB, 1]), max_bytes=10 * MiB, expect_sha256=SHA) == (
        SHA,
        len(DATA),
    )
    assert b"".join(store.open_range(SHA)) == DATA
    blob = f"{SHA[:2]}/{SHA}" if isinstance(store, FsBlobStore) else f"fleet/v1/blobs/{SHA}"
    assert _leftovers(store) == [blob]
    store.delete(SHA)
    assert not store.exists(SHA) and store.size(SHA) is None
    store.delete(SHA)  # deleting again is fine


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, None),
        (0, len(DATA) - 1),
        (12345, 1_500_000),  # in the middle
        (len(DATA) - 1, None),  # the last byte
        (len(DATA) - 1, len(DATA) - 1),
        (MiB - 10, MiB + 10),  # over a chunk boundary
        (5, 5),
    ],
)
def test_open_range(store: BlobStore, start: int, end: int | None) -> None:
    store.put_stream(io.BytesIO(DATA), max_bytes=len(DATA))
    want = DATA[start : None if end is None else end + 1]
    assert b"".join(store.open_range(SHA, start, end)) == want
    chunks = list(store.open_range(SHA, start, end, chunk=64 * 1024))
    assert b"".join(chunks) == want and all(len(c) <= 64 * 1024 for c in chunks)


def test_bad_ranges(store: BlobStore) -> None:
    store.put_stream(io.BytesIO(DATA), max_bytes=len(DATA))
    for start, end in [(10, 9), (0, len(DATA)), (-1, 5), (len(DATA), None), (len(DATA) + 5, len(DATA) + 9)]:
        with pytest.raises(BlobError, match="not satisfiable"):
            store.open_range(SHA, start, end)  # raises at once, before anything is iterated
    with pytest.raises(BlobError):
        store.open_range(SHA, 0, 10, chunk=0)


def test_empty_blob(store: BlobStore) -> None:
    sha, size = store.put_stream(iter([]), max_bytes=0)
    assert (sha, size) == (hashlib.sha256(b"").hexdigest(), 0)
    assert store.size(sha) == 0 and b"".join(store.open_range(sha)) == b""
    with pytest.raises(BlobError):
        store.open_range(sha, 0, 0)


def test_too_large_stops_reading_and_leaves_nothing(store: BlobStore) -> None:
    # 20 MiB announced in 1 MiB chunks, limit 10 MiB: S3 has already uploaded a part, which must be aborted
    big = os.urandom(MiB)
    consumed = []

    def chunks() -> Iterator[bytes]:
        for i in range(20):
            consumed.append(i)
            yield big

    with pytest.raises(BlobTooLarge):
        store.put_stream(chunks(), max_bytes=10 * MiB)
    assert len(consumed) == 11  # stopped at the first chunk past the limit
    with pytest.raises(BlobTooLarge):
        store.put_stream(io.BytesIO(DATA), max_bytes=len(DATA) - 1)
    with pytest.raises(BlobTooLarge):  # a spent quota
        store.put_stream(iter([]), max_bytes=-1)
    assert _leftovers(store) == []
    assert not store.exists(SHA)


def test_hash_mismatch_leaves_nothing(store: BlobStore) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(BlobHashMismatch):
        store.put_stream(io.BytesIO(DATA), max_bytes=len(DATA), expect_sha256=wrong)
    big = os.urandom(MiB) * 9  # multipart on S3
    with pytest.raises(BlobHashMismatch):
        store.put_stream(_pieces(big, [MiB]), max_bytes=len(big), expect_sha256=wrong)
    assert _leftovers(store) == []
    assert not store.exists(SHA) and not store.exists(wrong)


def test_multipart_sizes(store: BlobStore) -> None:
    """Exactly one part, one part and a byte, several parts: all read back whole (S3: 8 MiB parts)."""
    base = os.urandom(MiB)
    for size in (8 * MiB, 8 * MiB + 1, 17 * MiB + 3):
        data = (base * 18)[:size]
        sha, n = store.put_stream(_pieces(data, [MiB, 3 * MiB]), max_bytes=size)
        assert (sha, n) == (hashlib.sha256(data).hexdigest(), size)
        assert store.size(sha) == size
        assert b"".join(store.open_range(sha, size - 5)) == data[-5:]
        assert hashlib.sha256(b"".join(store.open_range(sha))).hexdigest() == sha
    assert all("tmp" not in name and not name.startswith("upload") for name in _leftovers(store))


def test_failing_source_leaves_nothing(store: BlobStore) -> None:
    def broken() -> Iterator[bytes]:
        yield os.urandom(9 * MiB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put_stream(broken(), max_bytes=100 * MiB)
    assert _leftovers(store) == []


@pytest.mark.parametrize("bad", BAD_SHAS, ids=["traversal", "upper", "63", "65", "empty", "slash"])
def test_bad_sha256_rejected_everywhere(store: BlobStore, bad: str) -> None:
    for call in (
        lambda: store.size(bad),
        lambda: store.exists(bad),
        lambda: store.open_range(bad),
        lambda: store.delete(bad),
        lambda: store.put_stream(io.BytesIO(b"x"), max_bytes=10, expect_sha256=bad),
    ):
        with pytest.raises(BlobError, match="invalid"):
            call()
    assert _leftovers(store) == []


def test_missing_blob(store: BlobStore) -> None:
    assert store.size(SHA) is None and not store.exists(SHA)
    with pytest.raises(BlobNotFound):
        store.open_range(SHA)
    store.delete(SHA)


def test_open_store_filesystem(tmp_path: Path) -> None:
    by_url = open_store((tmp_path / "a b" / "blobs").as_uri())  # file:///…/a%20b/blobs
    assert isinstance(by_url, FsBlobStore) and by_url.root == tmp_path / "a b" / "blobs" and by_url.root.is_dir()
    plain = open_store(str(tmp_path / "plain"))
    assert isinstance(plain, FsBlobStore) and plain.root == tmp_path / "plain" and (plain.root / "tmp").is_dir()
    assert plain.put_stream(io.BytesIO(DATA), max_bytes=len(DATA)) == (SHA, len(DATA))
    assert (tmp_path / "plain" / SHA[:2] / SHA).read_bytes() == DATA


def test_open_store_s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client, bucket = _bucket(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # boto3 picks the endpoint up itself
    store = open_store(f"s3://{bucket}/fleet/prod/")
    assert isinstance(store, S3BlobStore) and (store.bucket, store.prefix) == (bucket, "fleet/prod")
    assert store.client.meta.endpoint_url == s3_endpoint
    assert store.put_stream(io.BytesIO(DATA), max_bytes=len(DATA)) == (SHA, len(DATA))
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]  # type: ignore[attr-defined]
    assert keys == [f"fleet/prod/blobs/{SHA}"]
    no_prefix = open_store(f"s3://{bucket}")
    assert isinstance(no_prefix, S3BlobStore) and no_prefix.prefix == "" and no_prefix.key(SHA) == f"blobs/{SHA}"


@pytest.mark.parametrize("url", ["ftp://host/blobs", "gs://bucket/x", "s3:///no-bucket", "file://otherhost/x"])
def test_open_store_rejects(url: str) -> None:
    with pytest.raises(BlobError) as info:
        open_store(url)
    assert info.value.hint


def test_postgres_fixture_runs_sql(pg_url: str) -> None:  # noqa: F811
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
            conn.execute(sa.text("create table blobs (sha256 text primary key, size bigint not null)"))
            conn.execute(sa.text("insert into blobs values (:s, :n)"), {"s": SHA, "n": len(DATA)})
        with engine.connect() as conn:
            assert conn.execute(sa.text("select sha256, size from blobs")).all() == [(SHA, len(DATA))]
            assert conn.execute(sa.text("select current_database()")).scalar() == pg_url.rsplit("/", 1)[1]
    finally:
        engine.dispose()
