"""One small interface over ``file://`` and ``s3://`` locations.

URI conventions:

- ``file:///abs/path`` is an absolute path; ``file://rel/path`` is relative to the current working
  directory (the spec's :data:`lmforge.api.base.Uri` documents the same rule).
- ``s3://bucket/key`` is an object in an S3-compatible store reached with the job's
  :class:`~lmforge.api.common.S3Settings`; credentials come from the environment
  (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, filled from the Secret by the operator).

Semantics shared by both backends:

- A missing object raises :class:`FileNotFoundError` whose message names the URI.
- ``list(prefix)`` treats the prefix as a directory: it returns the full URIs of every object
  strictly under ``prefix/`` (recursively), sorted. Listing a single object's own URI gives ``[]``;
  use :meth:`Storage.exists` for that.
- ``write_bytes`` / ``upload_file`` / ``download_file`` are atomic for local files (temporary file
  then ``os.replace``); an S3 PUT is atomic by nature.
- ``delete`` of a missing object is not an error (as on S3).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lmforge.data.retry import VersionMismatch

if TYPE_CHECKING:
    from lmforge.api.common import S3Settings


def join_uri(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with single slashes: ``join_uri("s3://b/x/", "y", "z") == "s3://b/x/y/z"``."""
    uri = base
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        uri = uri if uri.endswith("/") else uri + "/"
        uri += part
    return uri


def local_path(uri: str) -> Path:
    """The local path of a ``file://`` URI (``file:///abs`` absolute, ``file://rel`` relative to the CWD)."""
    if not uri.startswith("file://"):
        raise ValueError(f"{uri!r} is not a file:// URI")
    rest = uri[len("file://") :]
    if not rest:
        raise ValueError(f"{uri!r} names no path; use file:///absolute/path or file://relative/path")
    return Path(rest).absolute()


def _dir_prefix(prefix_uri: str) -> str:
    return prefix_uri if prefix_uri.endswith("/") else prefix_uri + "/"


class Storage:
    """Read, write and list objects under ``file://`` or ``s3://`` URIs (see the module docstring)."""

    scheme: str = ""

    def read_bytes(self, uri: str) -> bytes:
        raise NotImplementedError

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        """``length`` bytes from offset ``start`` (fewer at the end of the object)."""
        raise NotImplementedError

    def fetch(self, uri: str, start: int = 0, length: int | None = None, *, if_match: str | None = None) -> bytes:
        """One attempt at the whole object (``length=None``) or a byte range, for callers that retry
        themselves (:mod:`lmforge.data.retry`): S3 disables botocore's own retries here so that every
        failure is seen and counted once. ``if_match``: the ETag the object must still have (S3
        checks it server-side; another version raises :class:`~lmforge.data.retry.VersionMismatch`)."""
        return self.read_bytes(uri) if length is None else self.read_range(uri, start, length)

    def write_bytes(self, uri: str, data: bytes) -> str | None:
        """Write the object; returns its version tag (S3's ETag) where the store has one, else None."""
        raise NotImplementedError

    def exists(self, uri: str) -> bool:
        """Whether an object (a regular file for ``file://``) exists at exactly ``uri``."""
        raise NotImplementedError

    def list(self, prefix_uri: str) -> list[str]:
        """Full URIs of every object under ``prefix_uri/`` (recursive), sorted."""
        raise NotImplementedError

    def delete(self, uri: str) -> None:
        raise NotImplementedError

    def size(self, uri: str) -> int:
        raise NotImplementedError

    def upload_file(self, local: Path, uri: str) -> None:
        raise NotImplementedError

    def download_file(self, uri: str, local: Path) -> None:
        raise NotImplementedError

    def open_read(self, uri: str) -> IO[bytes]:
        """A binary, buffered stream over the object (for reading large sources without loading them)."""
        raise NotImplementedError


def _atomic_copy(source: Path, target: Path) -> None:
    """Copy via a temporary sibling and rename, so readers never see a half-written file."""
    if source.absolute() == target.absolute():
        return
    tmp = _atomic_target(target)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


class LocalStorage(Storage):
    """``file://`` URIs on the local (or a shared, mounted) file system."""

    scheme = "file"

    def _path(self, uri: str) -> Path:
        return local_path(uri)

    def read_bytes(self, uri: str) -> bytes:
        try:
            return self._path(uri).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{uri} does not exist") from None

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length} for {uri}")
        try:
            with open(self._path(uri), "rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{uri} does not exist") from None

    def write_bytes(self, uri: str, data: bytes) -> str | None:
        path = self._path(uri)
        tmp = _atomic_target(path)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return None

    def exists(self, uri: str) -> bool:
        return self._path(uri).is_file()

    def list(self, prefix_uri: str) -> list[str]:
        root = self._path(prefix_uri)
        if not root.is_dir():
            return []
        base = _dir_prefix(prefix_uri)
        return sorted(base + p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)

    def size(self, uri: str) -> int:
        path = self._path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{uri} does not exist")
        return path.stat().st_size

    def upload_file(self, local: Path, uri: str) -> None:
        path = self._path(uri)
        _atomic_copy(Path(local), path)

    def download_file(self, uri: str, local: Path) -> None:
        source = self._path(uri)
        if not source.is_file():
            raise FileNotFoundError(f"{uri} does not exist")
        _atomic_copy(source, Path(local))

    def open_read(self, uri: str) -> IO[bytes]:
        try:
            return open(self._path(uri), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{uri} does not exist") from None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``("bucket", "key")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket; use s3://BUCKET/KEY")
    return bucket, key


_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class _StreamAdapter(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, so that it can be buffered and decoded."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()


class S3Storage(Storage):
    """``s3://`` URIs on AWS S3 or an S3-compatible server (MinIO, Ceph RGW, ...)."""

    scheme = "s3"

    def __init__(self, settings: S3Settings | None = None) -> None:
        if settings is None:
            from lmforge.api.common import S3Settings

            settings = S3Settings()
        self.settings = settings
        self._client: Any = None
        self._client_pid: int | None = None
        self._fetch_client: Any = None
        self._fetch_client_pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for DataLoader workers: clients (sockets) are made again on the other side."""
        return {**self.__dict__, "_client": None, "_client_pid": None, "_fetch_client": None, "_fetch_client_pid": None}

    def _new_client(self, **config: Any) -> Any:
        """A boto3 S3 client for these settings; ``config`` adds botocore Config options."""
        import boto3
        from botocore.config import Config

        settings = Config(
            s3={"addressing_style": self.settings.addressing_style}, region_name=self.settings.region, **config
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self.settings.endpoint, region_name=self.settings.region, config=settings
        )

    @property
    def client(self) -> Any:
        """The boto3 client, created lazily (and again in a forked child: clients hold sockets)."""
        if self._client is None or self._client_pid != os.getpid():
            self._client = self._new_client(retries={"mode": "standard", "max_attempts": 5})
            self._client_pid = os.getpid()
        return self._client

    @property
    def fetch_client(self) -> Any:
        """A client without botocore retries (the reader retries and counts), with bounded timeouts and
        enough pooled connections for the prefetch threads."""
        if self._fetch_client is None or self._fetch_client_pid != os.getpid():
            self._fetch_client = self._new_client(
                retries={"mode": "standard", "total_max_attempts": 1},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=32,
            )
            self._fetch_client_pid = os.getpid()
        return self._fetch_client

    def fetch(self, uri: str, start: int = 0, length: int | None = None, *, if_match: str | None = None) -> bytes:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        extra = {} if length is None else {"Range": f"bytes={start}-{start + length - 1}"}
        if if_match is not None:
            extra["IfMatch"] = if_match
        try:
            response = self.fetch_client.get_object(Bucket=bucket, Key=key, **extra)
            return response["Body"].read()
        except ClientError as exc:
            if if_match is not None and _error_code(exc) in ("PreconditionFailed", "412"):
                raise VersionMismatch(f"{uri} is not the version with ETag {if_match}") from None
            error = self._missing(exc, uri)
            if error is exc:
                raise
            raise error from None

    def _missing(self, exc: Exception, uri: str) -> Exception:
        code = _error_code(exc)
        if code == "NoSuchBucket":
            bucket = split_s3_uri(uri)[0]
            return FileNotFoundError(f"{uri} does not exist: bucket {bucket!r} does not exist")
        if code in _MISSING_CODES:
            return FileNotFoundError(f"{uri} does not exist")
        if code in ("403", "AccessDenied", "Forbidden"):
            return PermissionError(
                f"access to {uri} denied; check the credentials (s3.credentialsSecret) and the bucket policy"
            )
        return exc

    def read_bytes(self, uri: str) -> bytes:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            return response["Body"].read()
        except ClientError as exc:
            raise self._missing(exc, uri) from None

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        from botocore.exceptions import ClientError

        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length} for {uri}")
        if length == 0:
            if not self.exists(uri):
                raise FileNotFoundError(f"{uri} does not exist")
            return b""
        bucket, key = split_s3_uri(uri)
        try:
            response = self.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            return response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in ("InvalidRange", "416"):
                return b""
            raise self._missing(exc, uri) from None

    def write_bytes(self, uri: str, data: bytes) -> str | None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            return self.client.put_object(Bucket=bucket, Key=key, Body=data).get("ETag")
        except ClientError as exc:
            raise self._missing(exc, uri) from None

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        if not key:
            return False
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            error = self._missing(exc, uri)
            if isinstance(error, FileNotFoundError):
                return False
            raise error from None

    def list(self, prefix_uri: str) -> list[str]:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(prefix_uri)
        prefix = _dir_prefix(key) if key else ""
        base = _dir_prefix(prefix_uri)
        found: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found.append(base + item["Key"][len(prefix) :])
        except ClientError as exc:
            raise self._missing(exc, prefix_uri) from None
        return sorted(found)

    def delete(self, uri: str) -> None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            error = self._missing(exc, uri)
            if not isinstance(error, FileNotFoundError):
                raise error from None

    def size(self, uri: str) -> int:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            raise self._missing(exc, uri) from None

    def upload_file(self, local: Path, uri: str) -> None:
        from boto3.exceptions import S3UploadFailedError

        bucket, key = split_s3_uri(uri)
        try:
            self.client.upload_file(str(local), bucket, key)
        except S3UploadFailedError as exc:
            raise OSError(f"uploading {local} to {uri} failed: {exc}") from exc

    def download_file(self, uri: str, local: Path) -> None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        local = Path(local)
        tmp = _atomic_target(local)
        try:
            self.client.download_file(bucket, key, str(tmp))
            os.replace(tmp, local)
        except ClientError as exc:
            raise self._missing(exc, uri) from None
        finally:
            tmp.unlink(missing_ok=True)

    def open_read(self, uri: str) -> IO[bytes]:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as exc:
            raise self._missing(exc, uri) from None
        return io.BufferedReader(_StreamAdapter(body), buffer_size=1 << 20)


def storage_for(uri: str, s3: S3Settings | None = None) -> Storage:
    """The backend for ``uri``'s scheme (``file://`` or ``s3://``)."""
    if uri.startswith("file://"):
        return LocalStorage()
    if uri.startswith("s3://"):
        return S3Storage(s3)
    raise ValueError(
        f"{uri!r} is not a supported URI; use s3://BUCKET/PREFIX or file:///absolute/path "
        "(file://relative/path is relative to the working directory)"
    )


def cache_dir(kind: str) -> Path:
    """A per-machine cache directory under the system temp dir (``LMFORGE_CACHE_DIR`` overrides)."""
    root = Path(os.environ.get("LMFORGE_CACHE_DIR") or tempfile.gettempdir())
    path = root / f"lmforge-{kind}"
    path.mkdir(parents=True, exist_ok=True)
    return path
