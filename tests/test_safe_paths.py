"""Names chosen by whoever writes to storage never turn into local paths outside their directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.api.common import S3Settings
from lmforge.data.safe_paths import UnsafeName, check_relative, path_under
from lmforge.data.staging import fetch
from lmforge.data.storage import storage_for
from tests.s3fixture import s3_client, s3_server  # noqa: F401

# ruff: noqa: F811  (pytest injects the imported s3_server fixture by parameter name)


@pytest.mark.parametrize("name", ["", "/etc/passwd", "..", "../x", "a/../../x", "a//b", "./a", "a/.", "a\x00b"])
def test_names_that_could_leave_their_directory_are_refused(name: str) -> None:
    with pytest.raises(UnsafeName, match="refused"):
        check_relative(name, what="key")


def test_plain_relative_names_pass() -> None:
    assert check_relative("step-00000002/rng/rank-00000.pt", what="key") == "step-00000002/rng/rank-00000.pt"
    assert check_relative("shard-00000.bin", what="shard") == "shard-00000.bin"


def test_a_symbolic_link_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert path_under(root, "a/b", what="key") == root / "a" / "b"
    with pytest.raises(UnsafeName, match="symbolic link"):
        path_under(root, "link/x", what="key")


@pytest.mark.parametrize("evil", ["models/m/{absolute}/escaped-abs", "models/m/../../escaped-up", "models/m/a/../../../x"])
def test_fetch_refuses_keys_that_escape_and_writes_nothing_outside(s3_server: str, tmp_path: Path, evil: str) -> None:
    evil = evil.format(absolute=str(tmp_path))  # models/m//tmp/...: the suffix is an absolute path
    client = s3_client(s3_server)
    client.create_bucket(Bucket="tenant")
    client.put_object(Bucket="tenant", Key="models/m/config.json", Body=b"{}")
    client.put_object(Bucket="tenant", Key=evil, Body=b"payload")
    assert evil in [o["Key"] for o in client.list_objects_v2(Bucket="tenant")["Contents"]], "the server kept the key"
    storage = storage_for("s3://tenant/models/m", S3Settings(endpoint=s3_server, addressing_style="path"))
    target = tmp_path / "cache" / "model"
    with pytest.raises(UnsafeName, match="object key under s3://tenant/models/m/"):
        fetch(storage, "s3://tenant/models/m", "models", target=target)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], f"nothing is written when a key is refused: {written}"


def test_fetch_copies_plain_keys(s3_server: str, tmp_path: Path) -> None:
    client = s3_client(s3_server)
    client.create_bucket(Bucket="tenant")
    client.put_object(Bucket="tenant", Key="models/m/config.json", Body=b"{}")
    client.put_object(Bucket="tenant", Key="models/m/sub/weights.bin", Body=b"w")
    storage = storage_for("s3://tenant/models/m", S3Settings(endpoint=s3_server, addressing_style="path"))
    target = fetch(storage, "s3://tenant/models/m", "models", target=tmp_path / "model")
    assert (target / "sub" / "weights.bin").read_bytes() == b"w"
    assert (target / "config.json").read_bytes() == b"{}"
