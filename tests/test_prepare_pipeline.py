"""prepare_data with data.prepare: the pipeline end to end, the report, S3 to S3."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard

from lmforge.api.training import TrainingJobSpec
from lmforge.data.cleaning.normalize import normalize
from lmforge.data.preparation import prepare_data
from lmforge.data.storage import storage_for
from tests.s3fixture import s3_client, s3_server  # noqa: F401
from tests.test_prepare import ENGLISH, FIXTURES, ZH_DOCS
from tests.test_tokenize import _decode_split

# ruff: noqa: F811  (pytest injects the imported s3_server fixture by parameter name)

TOPICS = ["rivers", "compilers", "gardens", "markets", "bridges", "orchestras", "glaciers", "bakeries"]


def _english(i: int) -> str:
    """Distinct documents that pass the Gopher and FineWeb rules."""
    topic = TOPICS[i % len(TOPICS)]
    return f"Document {i} is about {topic} and the people who study {topic} for a living. " + ENGLISH.replace(
        "return", f"{topic}{i}"
    ).replace("generator", f"machine{i * 7}")


def _spec(sources: list[str], out: str, prepare: dict[str, Any], **data: Any) -> TrainingJobSpec:
    s3 = data.pop("s3", {})
    return TrainingJobSpec.model_validate(
        {
            "data": {"sources": sources, "validationFraction": 0.2, "prepare": prepare, **data},
            "output": {"uri": out},
            "tokenizer": {"vocabSize": 300},
            "s3": s3,
        }
    )


def _jsonl(records: list[Any]) -> bytes:
    return "".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _corpus() -> tuple[list[Any], list[str]]:
    """Records (good, duplicate, near duplicate, junk, PII) and the texts expected to survive."""
    good = [_english(i) for i in range(12)] + ZH_DOCS
    records: list[Any] = [{"text": t} for t in good]
    records += [{"text": good[0] + "  "}, {"text": good[1].replace("\n", "\r\n")}]  # exact after normalisation
    records.append({"text": good[2].replace("people who study", "folks that study")})  # near duplicate
    records.append({"text": "Home\nAbout\nContact\nLogin"})  # quality
    records.append({"text": "Привет! " * 60 + "Это документ на русском языке, и он очень длинный."})  # script
    contact = good[3] + " Write to jane@example.org or call +44 20 7946 0958 from 10.0.0.7."
    records[3] = {"text": contact}
    kept = [good[i] if i != 3 else contact for i in range(len(good))]
    return records, kept


def test_pipeline_end_to_end_with_report(tmp_path: Path) -> None:
    records, kept = _corpus()
    (tmp_path / "a.jsonl").write_bytes(_jsonl(records[:10]) + b'{"text": "bad \xff utf8"}\n{oops\n')
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(records[10:])))
    (tmp_path / "c.jsonl.gz").write_bytes(
        gzip.compress(_jsonl([{"text": f"line {i} {i * i}"} for i in range(2000)]))[:-100]
    )
    logs: list[str] = []
    spec = _spec(
        [f"file://{tmp_path}"], f"file://{tmp_path}/out", {"scripts": ["latin", "han"], "pii": {}}, format="jsonl"
    )
    prepared = prepare_data(spec, log=logs.append)
    docs = _decode_split(prepared.prepared_uri, "train", prepared.tokenizer) + _decode_split(
        prepared.prepared_uri, "val", prepared.tokenizer
    )
    assert len(docs) == len(kept)
    assert any("<EMAIL>" in d and "<PHONE>" in d and "<IP>" in d for d in docs)
    assert not any("jane@example.org" in d for d in docs)
    assert all(any(normalize(z) in d for d in docs) for z in ZH_DOCS)  # NFKC: "，" becomes ","

    out = tmp_path / "out" / "data"
    report = json.loads((out / "report.json").read_text())
    stages = {row["stage"]: row for row in report["stages"]}
    assert list(stages) == ["normalize", "exact_dedup", "script", "quality", "near_dedup", "pii"]
    assert stages["exact_dedup"]["removed"] == 2 and stages["near_dedup"]["removed"] == 1
    assert stages["script"]["removed"] == 1
    # quality: the menu, and the short "line N" records read from the truncated file before its cut
    assert stages["quality"]["removed"] == stages["quality"]["in"] - len(kept) - 1 > 1
    assert report["documents_out"] == len(kept) == report["split"]["train"] + report["split"]["val"]
    assert report["duplicates"]["rate"] == pytest.approx(3 / stages["exact_dedup"]["in"], abs=1e-6)
    assert report["input"]["reasons"]["invalid UTF-8"] == 1 and report["input"]["reasons"]["invalid JSON"] == 1
    assert report["input"]["reasons"]["truncated or corrupt compressed file"] == 1
    assert report["tokens"] == {"train": prepared.train_tokens, "val": prepared.val_tokens}
    assert report["pii"] == {"<EMAIL>": 1, "<PHONE>": 1, "<IP>": 1, "<ID>": 0}
    truncated = [r for r in report["top_reasons"] if r["reason"].startswith("truncated")]
    assert truncated and "c.jsonl.gz" in truncated[0]["examples"][0]["text"]
    markdown = (out / "report.md").read_text()
    assert "| near_dedup |" in markdown and "duplicates: 2 exact, 1 near" in markdown
    assert any("# Data report" in line for line in logs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["prepare"]["removed"]["near_dedup"] == 1
    assert prepare_data(spec, log=logs.append).reused


def test_sft_annotation_rules_and_augmentation_on_train_only(tmp_path: Path) -> None:
    records = [
        {
            "prompt": f"Question {i}: why is my parcel {i} late?",
            "response": f"It is fast. It is big. Parcel {i}.",
            "label": "shipping",
        }
        for i in range(30)
    ]
    records += [
        {"prompt": "Refund please", "response": "Sure, it is done.", "label": "spam"},
        {"prompt": "No label here", "response": "Answer without a label."},
        {"prompt": "Q", "response": "A", "label": "billing"},
        {"prompt": "Question 0: why is my parcel 0 late?", "response": "Another answer.", "label": "billing"},
    ]
    (tmp_path / "sft.jsonl").write_bytes(_jsonl(records))
    table = FIXTURES / "synonyms.tsv"
    prepare = {
        "quality": {"gopherQuality": False, "gopherRepetition": False, "fineweb": False},
        "nearDedup": {"enabled": False},
        "annotation": {
            "requiredFields": ["prompt", "response", "label"],
            "labelField": "label",
            "allowedLabels": ["billing", "shipping"],
            "minChars": 5,
        },
        "augment": {"synonymTable": f"file://{table}", "synonymProbability": 1.0, "sentenceReorderProbability": 0.5},
    }
    spec = _spec([f"file://{tmp_path}/sft.jsonl"], f"file://{tmp_path}/out", prepare, format="sft")
    prepared = prepare_data(spec, log=lambda _: None)
    report = json.loads((tmp_path / "out" / "data" / "report.json").read_text())
    assert report["annotation"]["rejected"] == {
        "requiredFields: 'label' missing or empty": 1,
        "allowedLabels: label not allowed": 1,
        "minChars: shorter than 5 characters": 1,
    }
    assert report["label_conflicts"]["count"] == 1
    assert report["label_conflicts"]["examples"][0]["labels"] == {"shipping": 1, "billing": 1}
    split = report["split"]
    # every training record but "Another answer." has a word of the synonym table
    assert split["train"] - 1 <= split["augmented"] <= split["train"]
    train = _decode_split(prepared.prepared_uri, "train", prepared.tokenizer)
    val = _decode_split(prepared.prepared_uri, "val", prepared.tokenizer)
    assert len(train) == split["train"] + split["augmented"] and len(val) == split["val"] > 0
    assert any("quick" in d or "rapid" in d for d in train)
    assert not any("quick" in d or "rapid" in d or "large" in d for d in val)


def test_empty_result_is_a_clear_error_with_a_report(tmp_path: Path) -> None:
    (tmp_path / "short.jsonl").write_bytes(_jsonl([{"text": "tiny"}, {"text": "also tiny"}]))
    spec = _spec([f"file://{tmp_path}/short.jsonl"], f"file://{tmp_path}/out", {}, format="jsonl")
    with pytest.raises(ValueError, match=r"no documents left after data.prepare: 2 record\(s\).*quality removed 2"):
        prepare_data(spec, log=lambda _: None)
    assert (tmp_path / "out" / "data" / "report.md").exists()


def test_prepare_from_s3_to_s3(s3_server: str, tmp_path: Path) -> None:
    client = s3_client(s3_server)
    client.create_bucket(Bucket="raw")
    client.create_bucket(Bucket="prepared")
    records, kept = _corpus()
    client.put_object(Bucket="raw", Key="c/part-0.jsonl.gz", Body=gzip.compress(_jsonl(records[:12])))
    client.put_object(
        Bucket="raw", Key="c/part-1.jsonl.zst", Body=zstandard.ZstdCompressor().compress(_jsonl(records[12:]))
    )
    cut = zstandard.ZstdCompressor().compress(_jsonl([{"text": f"record {i}"} for i in range(3000)]))[:-50]
    client.put_object(Bucket="raw", Key="c/part-2.jsonl.zst", Body=cut)
    spec = _spec(
        ["s3://raw/c"],
        "s3://prepared/run",
        {"scripts": ["latin", "han"], "quality": {"gopherQuality": True}},
        format="jsonl",
        s3={"endpoint": s3_server, "addressingStyle": "path"},
    )
    logs: list[str] = []
    prepared = prepare_data(spec, log=logs.append)
    assert prepared.prepared_uri == "s3://prepared/run/data"
    storage = storage_for(prepared.prepared_uri, spec.s3)
    report = json.loads(storage.read_bytes("s3://prepared/run/data/report.json"))
    assert storage.exists("s3://prepared/run/data/report.md")
    assert report["input"]["reasons"] == {"truncated or corrupt compressed file": 1}
    assert report["documents_out"] == len(kept)
    assert report["tokens"]["train"] == prepared.train_tokens > 0
    assert any("report written to s3://prepared/run/data/report.md" in line for line in logs)
