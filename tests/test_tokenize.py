"""prepare_data: text / jsonl / sft sources (file:// and s3://, .gz and .zst) to shards."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from lmforge.api.training import TrainingJobSpec
from lmforge.data.preparation import is_validation, prepare_data
from lmforge.data.reader import SampleReader
from lmforge.data.shards import read_index, verify
from lmforge.data.storage import LocalStorage, join_uri, storage_for
from tests.s3fixture import s3_client, s3_server  # noqa: F401

# ruff: noqa: F811  (pytest injects the imported s3_server fixture by parameter name)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu 数据 训练 🤖".split()


def _paragraphs(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) + "." for _ in range(count)]


def _spec(sources: list[str], out: str, **data: Any) -> TrainingJobSpec:
    tokenizer = data.pop("tokenizer", {"vocabSize": 300})
    s3 = data.pop("s3", {})
    return TrainingJobSpec.model_validate(
        {
            "data": {"sources": sources, "validationFraction": 0.2, **data},
            "output": {"uri": out},
            "tokenizer": tokenizer,
            "s3": s3,
        }
    )


def _decode_split(prepared: str, split: str, tok: Any) -> list[str]:
    storage = storage_for(prepared)
    index = verify(join_uri(prepared, split), storage)
    ids: list[int] = []
    for shard in index["shards"]:
        ids += np.frombuffer(storage.read_bytes(join_uri(prepared, split, shard["name"])), dtype="<u2").tolist()
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|endoftext|>")
    return text.split("<|endoftext|>")[:-1]


def test_text_corpus_prepares_once_and_is_reused(tmp_path: Path) -> None:
    paragraphs = _paragraphs(60)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n\n".join(paragraphs[:30]) + "\n")
    (corpus / "b.txt").write_text("\n\n\n".join(p.replace(". ", ".\n") for p in paragraphs[30:]))
    (corpus / ".hidden").write_text("never read")
    logs: list[str] = []
    spec = _spec([f"file://{corpus}"], f"file://{tmp_path}/out")
    prepared = prepare_data(spec, log=logs.append)

    assert prepared.prepared_uri == f"file://{tmp_path}/out/data"
    assert prepared.tokenizer_uri == f"file://{tmp_path}/out/data/tokenizer.json"
    assert prepared.vocab_size == prepared.tokenizer.get_vocab_size() <= 300 and not prepared.reused
    train = _decode_split(prepared.prepared_uri, "train", prepared.tokenizer)
    val = _decode_split(prepared.prepared_uri, "val", prepared.tokenizer)
    assert sorted(train + val) == sorted(paragraphs)  # one document per section (2+ blank lines)
    assert val and all(is_validation(doc, 0.2) for doc in val) and not any(is_validation(doc, 0.2) for doc in train)
    storage = LocalStorage()
    assert prepared.train_tokens == read_index(join_uri(prepared.prepared_uri, "train"), storage)["total_tokens"]
    manifest = json.loads((tmp_path / "out" / "data" / "manifest.json").read_text())
    assert manifest["stats"]["documents"] == {"train": len(train), "val": len(val)}

    logs.clear()
    again = prepare_data(spec, log=logs.append)
    assert again.reused and any("reusing" in line for line in logs)
    assert (again.train_tokens, again.val_tokens, again.vocab_size) == (
        prepared.train_tokens,
        prepared.val_tokens,
        prepared.vocab_size,
    )

    logs.clear()
    changed = prepare_data(
        _spec([f"file://{corpus}"], f"file://{tmp_path}/out", tokenizer={"vocabSize": 280}), log=logs.append
    )
    assert not changed.reused and any("changed" in line for line in logs)
    assert changed.vocab_size <= 280


def test_paragraphs_stay_together_until_a_section_break_or_the_target_size(tmp_path: Path) -> None:
    from lmforge.data.sources import TEXT_DOCUMENT_TARGET_CHARS

    section = "First paragraph.\n\nSecond paragraph of the same section."
    long_paragraph = "word " * (TEXT_DOCUMENT_TARGET_CHARS // 5 + 10)
    (tmp_path / "book.txt").write_text(section + "\n\n\n" + long_paragraph + "\n\n" + "Next chunk.")
    prepared = prepare_data(
        _spec([f"file://{tmp_path}/book.txt"], f"file://{tmp_path}/out", validationFraction=0.0), log=lambda _: None
    )
    docs = _decode_split(prepared.prepared_uri, "train", prepared.tokenizer)
    assert section in docs  # the single blank line did not split it
    assert "Next chunk." in docs  # a long block ends at its next paragraph break
    assert len(docs) == 3


def test_tiny_corpus_still_gets_a_validation_document(tmp_path: Path) -> None:
    docs = ["one small document.", "another small document."]
    docs = [d for d in docs if not is_validation(d, 0.01)]
    (tmp_path / "tiny.txt").write_text("\n\n\n".join(docs))
    logs: list[str] = []
    prepared = prepare_data(
        _spec([f"file://{tmp_path}/tiny.txt"], f"file://{tmp_path}/out", validationFraction=0.01), log=logs.append
    )
    assert prepared.train_tokens > 0 and prepared.val_tokens > 0
    assert any("moved the last training document" in line for line in logs)


def test_existing_tokenizer_is_reused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n\n".join(_paragraphs(20)))
    first = prepare_data(_spec([f"file://{tmp_path}/a.txt"], f"file://{tmp_path}/one"), log=lambda _: None)
    second = prepare_data(
        _spec([f"file://{tmp_path}/a.txt"], f"file://{tmp_path}/two", tokenizer={"uri": f"file://{tmp_path}/one/data"}),
        log=lambda _: None,
    )
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    assert (second.train_tokens, second.val_tokens) == (first.train_tokens, first.val_tokens)


def test_no_documents_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"other": "x"}\nnot json\n')
    with pytest.raises(
        ValueError, match=r"no documents in data.sources \['file://.*bad.jsonl'\].*missing field 'text': 1"
    ):
        prepare_data(
            _spec([f"file://{tmp_path}/bad.jsonl"], f"file://{tmp_path}/out", format="jsonl"), log=lambda _: None
        )
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare_data(_spec([f"file://{tmp_path}/nothing-here"], f"file://{tmp_path}/out"), log=lambda _: None)


def _jsonl(records: list[Any]) -> bytes:
    return "".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def test_jsonl_from_s3_with_gz_and_zst(s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))  # the reader's shard cache
    client = s3_client(s3_server)
    client.create_bucket(Bucket="corpus")
    texts = _paragraphs(40, seed=1)
    good_a = [{"text": t, "id": i} for i, t in enumerate(texts[:20])]
    good_b = [{"text": t} for t in texts[20:]]
    bad = [
        "{not json\n",
        json.dumps({"id": 1}) + "\n",
        json.dumps({"text": 5}) + "\n",
        "[1, 2]\n",
        "\n",
        json.dumps({"text": " "}) + "\n",
    ]
    client.put_object(
        Bucket="corpus", Key="raw/part-0.jsonl.gz", Body=gzip.compress(_jsonl(good_a[:10] + bad[:3] + good_a[10:]))
    )
    client.put_object(
        Bucket="corpus", Key="raw/part-1.jsonl.zst", Body=zstandard.ZstdCompressor().compress(_jsonl(bad[3:] + good_b))
    )
    logs: list[str] = []
    spec = _spec(
        ["s3://corpus/raw"], "s3://corpus/run", format="jsonl", s3={"endpoint": s3_server, "addressingStyle": "path"}
    )
    prepared = prepare_data(spec, log=logs.append)
    assert prepared.prepared_uri == "s3://corpus/run/data"
    storage = storage_for(prepared.prepared_uri, spec.s3)
    assert storage.exists("s3://corpus/run/data/manifest.json")
    stats = json.loads(storage.read_bytes("s3://corpus/run/data/manifest.json"))["stats"]
    assert stats["skipped"] == {
        "invalid JSON": 1,
        "missing field 'text'": 1,
        "field is not a string": 1,
        "not a JSON object": 1,
        "empty text": 1,
    }
    assert stats["documents"]["train"] + stats["documents"]["val"] == 40
    assert any("skipped 5 record(s)" in line for line in logs)
    reader = SampleReader(join_uri(prepared.prepared_uri, "train"), storage, 16)
    x, y = reader.next_batch(4)
    assert x.shape == (4, 16) and bool((y >= 0).all())
    assert list((tmp_path / "lmforge-shards").iterdir())
    assert prepare_data(spec, log=logs.append).reused


def test_sft_masks_the_prompt(s3_server: str, tmp_path: Path) -> None:
    client = s3_client(s3_server)
    client.create_bucket(Bucket="sft")
    rng = np.random.default_rng(2)
    records = [
        {"q": f"Question {i}: {' '.join(rng.choice(WORDS, 6))}?", "a": f" Answer: {' '.join(rng.choice(WORDS, 8))}."}
        for i in range(30)
    ]
    client.put_object(Bucket="sft", Key="d/a.jsonl.gz", Body=gzip.compress(_jsonl(records[:15] + [{"q": "no answer"}])))
    client.put_object(Bucket="sft", Key="d/b.jsonl.zst", Body=zstandard.ZstdCompressor().compress(_jsonl(records[15:])))
    spec = _spec(
        ["s3://sft/d/a.jsonl.gz", "s3://sft/d/b.jsonl.zst"],
        f"file://{tmp_path}/out",
        format="sft",
        promptField="q",
        responseField="a",
        s3={"endpoint": s3_server},
    )
    prepared = prepare_data(spec, log=lambda _: None)
    tok = prepared.tokenizer
    split = join_uri(prepared.prepared_uri, "train")
    index = read_index(split, LocalStorage())
    assert all(shard["mask"] for shard in index["shards"])
    reader = SampleReader(split, LocalStorage(), 32, shuffle=False)
    learned, ignored = [], []
    for _ in range(reader.num_samples):
        x, y = reader.next_batch(1)
        targets = x[0, 1:].tolist() + [None]
        for target, label in zip(targets, y[0].tolist(), strict=True):
            (ignored if label == -100 else learned).append(label if label != -100 else target)
    learned_text = tok.decode(learned, skip_special_tokens=False)
    assert "Answer:" in learned_text and "Question" not in learned_text
    assert "<|endoftext|>" in learned_text  # the end of each response is learned
    assert "Question" in tok.decode([t for t in ignored if t is not None], skip_special_tokens=False)
