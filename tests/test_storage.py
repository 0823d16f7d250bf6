"""Storage over file:// and s3:// (moto), and the byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.api.common import S3Settings
from lmforge.data.storage import LocalStorage, S3Storage, Storage, join_uri, local_path, storage_for
from lmforge.data.tokenizer import EOT, PAD, load_tokenizer, tokenizer_hash, train_bpe
from tests.s3fixture import s3_client, s3_server  # noqa: F401

# ruff: noqa: F811  (pytest injects the imported s3_server fixture by parameter name)


def _round_trip(storage: Storage, base: str, tmp_path: Path) -> None:
    a = join_uri(base, "dir", "a.bin")
    b = join_uri(base, "dir", "sub", "b.txt")
    storage.write_bytes(a, b"0123456789")
    storage.write_bytes(b, "héllo 世界".encode())
    storage.write_bytes(join_uri(base, "dir-other", "c"), b"c")  # a sibling that only shares a prefix
    assert storage.read_bytes(a) == b"0123456789"
    assert storage.read_range(a, 3, 4) == b"3456"
    assert storage.read_range(a, 8, 10) == b"89"
    assert storage.size(b) == len("héllo 世界".encode())
    assert storage.exists(a) and not storage.exists(join_uri(base, "dir", "nope"))
    assert storage.list(join_uri(base, "dir")) == [a, b]
    assert storage.list(join_uri(base, "dir") + "/") == [a, b]
    assert storage.list(join_uri(base, "nothing")) == []
    with storage.open_read(b) as stream:
        assert stream.read().decode() == "héllo 世界"
    storage.write_bytes(a, b"overwritten")
    assert storage.read_bytes(a) == b"overwritten"

    local = tmp_path / "up.bin"
    local.write_bytes(b"x" * 100_000)
    up = join_uri(base, "up", "file.bin")
    storage.upload_file(local, up)
    down = tmp_path / "nested" / "down.bin"
    storage.download_file(up, down)
    assert down.read_bytes() == local.read_bytes()

    storage.delete(a)
    storage.delete(a)  # deleting a missing object is not an error
    assert not storage.exists(a)
    assert storage.list(join_uri(base, "dir")) == [b]

    missing = join_uri(base, "missing", "object.bin")
    for call in (
        lambda: storage.read_bytes(missing),
        lambda: storage.read_range(missing, 0, 4),
        lambda: storage.size(missing),
        lambda: storage.download_file(missing, tmp_path / "never"),
        lambda: storage.open_read(missing),
    ):
        with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
            call()


def test_file_storage_round_trip(tmp_path: Path) -> None:
    storage = storage_for(f"file://{tmp_path}")
    assert isinstance(storage, LocalStorage)
    _round_trip(storage, f"file://{tmp_path}/root", tmp_path)
    assert not list((tmp_path / "root" / "dir").glob(".*tmp*"))  # atomic writes leave no temp files


def test_file_uri_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert local_path("file://rel/x.txt") == tmp_path / "rel" / "x.txt"
    assert local_path("file:///abs/x.txt") == Path("/abs/x.txt")
    storage = storage_for("file://rel")
    storage.write_bytes("file://rel/x.txt", b"hi")
    assert (tmp_path / "rel" / "x.txt").read_bytes() == b"hi"
    assert storage.list("file://rel") == ["file://rel/x.txt"]


def test_join_uri() -> None:
    assert join_uri("s3://b/x/", "y", "/z/") == "s3://b/x/y/z"
    assert join_uri("file:///tmp/a", "b/c") == "file:///tmp/a/b/c"
    assert join_uri("s3://b", "") == "s3://b"


def test_storage_for_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="not a supported URI"):
        storage_for("http://example.com/x")


def test_s3_storage_round_trip(s3_server: str, tmp_path: Path) -> None:
    s3_client(s3_server).create_bucket(Bucket="lmforge-test")
    storage = storage_for("s3://lmforge-test/x", S3Settings(endpoint=s3_server, addressing_style="path"))
    assert isinstance(storage, S3Storage)
    _round_trip(storage, "s3://lmforge-test/root", tmp_path)
    assert storage.list("s3://lmforge-test") == [
        "s3://lmforge-test/root/dir-other/c",
        "s3://lmforge-test/root/dir/sub/b.txt",
        "s3://lmforge-test/root/up/file.bin",
    ]


def test_s3_missing_bucket_names_the_uri(s3_server: str) -> None:
    storage = S3Storage(S3Settings(endpoint=s3_server))
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/k"):
        storage.read_bytes("s3://no-such-bucket/k")
    assert not storage.exists("s3://no-such-bucket/k")


def test_tokenizer_round_trips_any_unicode(tmp_path: Path) -> None:
    corpus = [
        "The quick brown fox jumps over the lazy dog. " * 5,
        "def f(x):\n    return x + 1\n" * 5,
        "数据 训练 模型 " * 5,
    ]
    tok = train_bpe(corpus * 20, vocab_size=400, min_frequency=2)
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(PAD) == 1
    assert 258 < tok.get_vocab_size() <= 400
    for text in [
        "中文分词测试，标点！",
        "emoji 🤖🚀👩‍👩‍👧 done",
        "ünïcödé ß Ω ∑ \t\r\n  x",
        "never seen: ꙮ𓀀\U0010ffff",
        "",
        " leading space",
    ]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    storage = LocalStorage()
    uri = f"file://{tmp_path}/model/tokenizer.json"
    storage.write_bytes(uri, tok.to_str().encode())
    for where in (uri, f"file://{tmp_path}/model"):
        loaded = load_tokenizer(where, storage)
        assert tokenizer_hash(loaded) == tokenizer_hash(tok)
        assert len(tokenizer_hash(loaded)) == 16
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(f"file://{tmp_path}/nothing", storage)
