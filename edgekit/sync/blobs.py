"""Content-addressed blob storage for the sync service: bundles and uploads on a filesystem or S3-compatible storage.

Blobs are named by their sha256, so a name can never point at the wrong bytes and storing the same content twice
is a no-op. Uploads stream (the service must never hold a multi-GB bundle in memory) into a temporary object that
only gets its final name once its size and hash are known, so a crash or a rejected upload never leaves a partial
blob under a real name. Every sha256 argument is checked strictly before it reaches a path or an S3 key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from edgekit.errors import EdgekitError

CHUNK = 1 << 20  # reads and hashing go 1 MiB at a time
PART = 8 << 20  # S3 multipart part size; at most one part is buffered
_COPY_OBJECT_MAX = 5 << 30  # CopyObject's limit; larger blobs use a multipart copy
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MISSING = ("404", "NoSuchKey", "NotFound")  # S3 error codes of a missing key (HeadObject says just "404")


class BlobError(EdgekitError):
    """A blob-store request that cannot be served: a malformed digest, an unsatisfiable range, a bad store URL."""


class BlobTooLarge(BlobError):
    """The upload went past ``max_bytes``; nothing of it was kept."""


class BlobHashMismatch(BlobError):
    """The upload's sha256 is not the one the client announced; nothing of it was kept."""


class BlobNotFound(BlobError):
    """No blob with that sha256 is stored."""


Source = BinaryIO | Iterable[bytes]


@runtime_checkable
class BlobStore(Protocol):
    """What the service needs from blob storage; FsBlobStore and S3BlobStore implement it."""

    def put_stream(self, stream: Source, *, max_bytes: int, expect_sha256: str | None = None) -> tuple[str, int]:
        """Store the stream's bytes under their sha256; return (sha256 hex, size)."""

    def size(self, sha256: str) -> int | None:
        """The blob's size in bytes, or None if it is not stored."""

    def exists(self, sha256: str) -> bool: ...

    def open_range(self, sha256: str, start: int = 0, end: int | None = None, chunk: int = CHUNK) -> Iterator[bytes]:
        """Bytes ``start..end`` (inclusive, like HTTP Range; ``end=None``: to the last byte) in chunks."""

    def delete(self, sha256: str) -> None:
        """Remove the blob; removing a missing blob is not an error (deletes are retried)."""


def check_sha256(value: object, what: str = "sha256") -> str:
    """Return ``value`` if it is 64 lowercase hex characters; anything else could become a path or key outside."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise BlobError(f"invalid {what}: {value!r:.80}", hint="a sha256 is 64 lowercase hexadecimal characters")
    return value


def _check_range(size: int, start: int, end: int | None, chunk: int) -> int:
    """Check an inclusive range against ``size``; return the resolved end (the HTTP layer maps errors to 416).

    The one exception: a whole empty blob (start 0, no end) reads as nothing, as a plain GET of it would.
    """
    if chunk <= 0:
        raise BlobError(f"chunk must be > 0, not {chunk}")
    if size == 0 and start == 0 and end is None:
        return -1
    last = size - 1 if end is None else end
    if not (0 <= start <= last < size):
        raise BlobError(f"range {start}-{'' if end is None else end} is not satisfiable for a blob of {size} bytes")
    return last


def _chunks(stream: Source) -> Iterator[bytes]:
    """Yield a file object's bytes 1 MiB at a time, or an iterable's chunks as they come (never the whole stream)."""
    read = getattr(stream, "read", None)
    if callable(read):  # a file object is also an iterator of *lines*; read it by size instead
        while data := read(CHUNK):
            yield bytes(data)
    else:
        for data in stream:
            if data:
                yield bytes(data)


class _Hashing:
    """Counts and hashes the upload as it passes, raising BlobTooLarge the moment it goes past ``max_bytes``."""

    def __init__(self, max_bytes: int, expect_sha256: str | None) -> None:
        self.max_bytes = max_bytes
        self.expect = None if expect_sha256 is None else check_sha256(expect_sha256, "expected sha256")
        self.size = 0
        self._hash = hashlib.sha256()

    def feed(self, stream: Source) -> Iterator[bytes]:
        for data in _chunks(stream):
            self.size += len(data)
            if self.size > self.max_bytes:
                break  # read no further
            self._hash.update(data)
            yield data
        if self.size > self.max_bytes:  # a negative limit (a spent quota) refuses even an empty upload
            raise BlobTooLarge(f"upload is larger than the limit of {max(self.max_bytes, 0)} bytes")

    def digest(self) -> str:
        """The sha256 of everything fed, checked against the announced one."""
        sha = self._hash.hexdigest()
        if self.expect is not None and sha != self.expect:
            raise BlobHashMismatch(f"upload has sha256 {sha}, not the announced {self.expect}", hint="retry the upload")
        return sha


class _RangeReader(Iterator[bytes]):
    """Yields ``remaining`` bytes from ``read`` in chunks and closes the source when done, failed or dropped."""

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], Any], remaining: int, chunk: int) -> None:
        self._read, self._close, self._remaining, self._chunk = read, close, remaining, chunk

    def __next__(self) -> bytes:
        try:
            if self._remaining <= 0:
                raise StopIteration
            data = self._read(min(self._chunk, self._remaining))
            if not data:
                raise BlobError(f"blob ended {self._remaining} bytes early (changed while being read?)")
        except BaseException:
            self.close()
            raise
        self._remaining -= len(data)
        return data

    def close(self) -> None:
        self._remaining = 0
        close, self._close = self._close, None
        if close is not None:
            close()

    def __del__(self) -> None:
        self.close()


class FsBlobStore:
    """Blobs as files ``root/ab/abcdef…``; uploads go to ``root/tmp/`` and are renamed in place after an fsync."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def put_stream(self, stream: Source, *, max_bytes: int, expect_sha256: str | None = None) -> tuple[str, int]:
        hashing = _Hashing(max_bytes, expect_sha256)
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".partial", dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                for data in hashing.feed(stream):
                    f.write(data)
                f.flush()
                os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; blobs are public content
                os.fsync(f.fileno())  # the data is on disk before the name says it is complete
            sha = hashing.digest()
            final = self.path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)  # atomic; replacing an identical blob is harmless (idempotent)
            dir_fd = os.open(final.parent, os.O_RDONLY)  # and the rename itself reaches the disk
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return sha, hashing.size

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, sha256: str) -> bool:
        return self.size(sha256) is not None

    def open_range(self, sha256: str, start: int = 0, end: int | None = None, chunk: int = CHUNK) -> Iterator[bytes]:
        try:  # opened and checked eagerly, not lazily, so that errors come before a response is started
            f = open(self.path(sha256), "rb")  # the reader closes it
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {sha256}") from None
        try:
            last = _check_range(os.fstat(f.fileno()).st_size, start, end, chunk)
            f.seek(start)
            return _RangeReader(f.read, f.close, last - start + 1, chunk)
        except BaseException:
            f.close()
            raise

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


class S3BlobStore:
    """Blobs as objects ``prefix/blobs/<sha256>``; uploads stream as a multipart upload to ``prefix/tmp/<uuid>``.

    The final key depends on the hash, known only at the end, so the finished temporary object is copied to it
    (server-side) and deleted; a failed or rejected upload aborts the multipart upload, leaving nothing behind. An
    upload that fits in one part goes up with a single PutObject instead.
    """

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None, endpoint_url: str | None = None) -> None:
        if client is None:
            import boto3  # only the S3 store needs boto3

            client = boto3.client("s3", endpoint_url=endpoint_url)  # None: boto3 reads AWS_ENDPOINT_URL(_S3)
        from botocore.exceptions import ClientError

        self.client, self._client_error = client, ClientError
        self.bucket, self.prefix = bucket, prefix.strip("/")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def key(self, sha256: str) -> str:
        return self._key(f"blobs/{check_sha256(sha256)}")

    def put_stream(self, stream: Source, *, max_bytes: int, expect_sha256: str | None = None) -> tuple[str, int]:
        hashing = _Hashing(max_bytes, expect_sha256)
        tmp = self._key(f"tmp/{uuid.uuid4().hex}")
        buf = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        stored = False  # whether the temporary object exists (and must be deleted)

        def upload_part(body: bytes) -> None:
            n = len(parts) + 1
            r = self.client.upload_part(Bucket=self.bucket, Key=tmp, UploadId=upload_id, PartNumber=n, Body=body)
            parts.append({"PartNumber": n, "ETag": r["ETag"]})

        try:
            for data in hashing.feed(stream):
                buf += data
                while len(buf) >= PART:
                    if upload_id is None:
                        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=tmp)["UploadId"]
                    upload_part(bytes(buf[:PART]))
                    del buf[:PART]
            sha = hashing.digest()  # raises BlobHashMismatch before anything is completed
            if upload_id is None:  # it fitted in one part: a single PutObject
                self.client.put_object(Bucket=self.bucket, Key=tmp, Body=bytes(buf))
            else:
                if buf:
                    upload_part(bytes(buf))
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=tmp, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
            upload_id, stored = None, True
            if self.size(sha) != hashing.size:  # already stored (idempotent): no copy needed
                self._copy(tmp, self.key(sha), hashing.size)
        except BaseException:
            if upload_id is not None:
                self._quietly(self.client.abort_multipart_upload, Bucket=self.bucket, Key=tmp, UploadId=upload_id)
            raise
        finally:
            if stored:
                self._quietly(self.client.delete_object, Bucket=self.bucket, Key=tmp)
        return sha, hashing.size

    def _copy(self, src: str, dst: str, size: int) -> None:
        source = {"Bucket": self.bucket, "Key": src}
        if size <= _COPY_OBJECT_MAX:
            self.client.copy_object(Bucket=self.bucket, Key=dst, CopySource=source)
        else:  # boto3's managed copy does a multipart UploadPartCopy
            self.client.copy(source, self.bucket, dst)

    @staticmethod
    def _quietly(call: Callable[..., Any], **kwargs: Any) -> None:
        """Best-effort cleanup: the original error matters more (a bucket lifecycle rule can sweep ``tmp/``)."""
        with contextlib.suppress(Exception):
            call(**kwargs)

    def size(self, sha256: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))["ContentLength"])
        except self._client_error as e:
            if e.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise

    def exists(self, sha256: str) -> bool:
        return self.size(sha256) is not None

    def open_range(self, sha256: str, start: int = 0, end: int | None = None, chunk: int = CHUNK) -> Iterator[bytes]:
        size = self.size(sha256)  # S3 clamps ranges past the end; check here so that they fail like on a filesystem
        if size is None:
            raise BlobNotFound(f"no blob {sha256}")
        last = _check_range(size, start, end, chunk)
        if last < start:
            return iter(())  # a whole empty blob: no Range header could express it
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256), Range=f"bytes={start}-{last}")
        except self._client_error as e:
            if e.response.get("Error", {}).get("Code") in _MISSING:  # deleted between the HeadObject and now
                raise BlobNotFound(f"no blob {sha256}") from None
            raise
        body = r["Body"]
        return _RangeReader(body.read, body.close, last - start + 1, chunk)

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))


def open_store(url: str) -> BlobStore:
    """The store a configuration URL names: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        if not parsed.netloc:
            raise BlobError(f"no bucket in {url!r}", hint="use s3://bucket/prefix")
        # The endpoint (MinIO, Ceph, moto...) comes from AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, which boto3 reads.
        return S3BlobStore(parsed.netloc, unquote(parsed.path))
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise BlobError(f"file URL {url!r} names a host", hint="use file:///absolute/path (three slashes)")
        return FsBlobStore(Path(unquote(parsed.path)))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # a plain path (or a Windows drive letter)
        return FsBlobStore(Path(url).expanduser())
    raise BlobError(
        f"unknown blob store URL scheme {parsed.scheme!r} in {url!r}",
        hint="use s3://bucket/prefix, file:///absolute/path or a plain path",
    )
