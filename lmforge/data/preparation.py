"""Preparation: ``spec.data`` to token shards, the one thing "prepare" means in lmforge.

:func:`prepare_data` is what `lmforge prepare` runs (the operator's ``<job>-prepare`` Job, when
``spec.data.prepare`` is set), what every trainer process runs when it starts (rank 0 first, the
other ranks after a barrier: see ``lmforge.trainer.loop``), and what a CompressionJob runs on its
``spec.data`` with the source model's tokenizer (:func:`lmforge.compress.data.prepare_for_compression`).

Its parts, in order:

1. Reading (:mod:`lmforge.data.sources`): every source in ``spec.data.sources`` (a file/object, or
   a prefix meaning every object under it; ``.gz`` and ``.zst`` are decompressed on the fly) is cut
   into documents by ``data.format``. Malformed JSONL lines (bad JSON, not an object, missing
   field, non-string value), empty documents and the rest of a truncated ``.gz`` / ``.zst`` file
   are skipped and counted; the summary is logged and recorded in the manifest.
2. Cleaning (:mod:`lmforge.data.cleaning`), only with ``data.prepare`` set: normalisation,
   annotation rules, deduplication, script and quality filters, PII redaction; invalid UTF-8 and
   records over ``prepare.maxRecordChars`` are skipped too; augmentation adds copies to the
   training split only; and a data report (``report.json``, ``report.md``) is written next to the
   shards and printed.
3. The split (:func:`is_validation`): a document goes to validation when the first 64 bits of
   sha256(document) / 2**64 < ``data.validationFraction``, so identical documents always land in
   the same split. If the fraction is > 0 but no document landed in validation, the last training
   document moves there (tiny corpora); if no document landed in train, the last validation
   document moves there.
4. Tokenizing (:mod:`lmforge.data.tokenize`): the tokenizer is loaded (``tokenizer.uri``) or
   trained on the training split, and each split is encoded into token shards.

Layout under the prepared URI (``spec.data.preparedUri``, default ``OUTPUT/data``)::

    tokenizer.json
    train/  index.json, shard-NNNNN.bin [, shard-NNNNN.mask.bin]   (see lmforge.data.shards)
    val/    ...
    manifest.json       written last; records the fingerprint of the settings that made the data
    report.json, report.md   with data.prepare only

Reuse by fingerprint: training pods re-run preparation every time they start (every rank, every
attempt, every restart), and `lmforge prepare` runs it whether or not the data exists, so the
operator never has to look into object storage. When ``manifest.json``, ``tokenizer.json`` and both
split indexes exist, the manifest's fingerprint (:func:`fingerprint`: sources, format, fields,
validation fraction, tokenizer settings, cleaning settings) equals the spec's and the tokenizer's
hash matches the shards', the prepared data is reused as it is, in milliseconds; otherwise what an
earlier preparation left is removed (manifest first) and the data is prepared again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from lmforge.contract import RunLayout
from lmforge.data.cleaning.report import Report
from lmforge.data.shards import INDEX, ShardWriter, read_index
from lmforge.data.sources import DocumentReader, Storages, resolve_sources
from lmforge.data.storage import Storage, join_uri
from lmforge.data.storage import storage_for as default_storage_for
from lmforge.data.tokenize import spool_line, tokenizer_for, write_split
from lmforge.data.tokenizer import ensure_eot, load_tokenizer, tokenizer_hash, vocab_size_of

if TYPE_CHECKING:
    from lmforge.api.training import TrainingJobSpec

PREPARE_FORMAT = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
_SHARD_FILE = re.compile(r"^shard-\d{5}(\.mask)?\.bin$")


@dataclass
class PreparedData:
    """What training needs from the prepared data."""

    prepared_uri: str
    tokenizer: Tokenizer
    tokenizer_uri: str
    train_tokens: int
    val_tokens: int
    vocab_size: int
    eot_id: int = 0
    reused: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


def fingerprint(spec: TrainingJobSpec) -> dict[str, Any]:
    """The settings that determine the prepared data; a change means the data is rebuilt."""
    data = spec.data
    fields: dict[str, str] = {}
    if data.format == "jsonl":
        fields = {"text": data.text_field}
    elif data.format == "sft":
        fields = {"prompt": data.prompt_field, "response": data.response_field}
    tok = spec.tokenizer
    tokenizer = {"uri": tok.uri} if tok.uri else {"vocab_size": tok.vocab_size, "min_frequency": tok.min_frequency}
    return {
        "prepare_format": PREPARE_FORMAT,
        "sources": list(data.sources),
        "format": data.format,
        "fields": fields,
        "validation_fraction": data.validation_fraction,
        "tokenizer": tokenizer,
        "prepare": data.prepare.to_manifest() if data.prepare is not None else None,
    }


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic per-document split: the first 64 bits of sha256(key) as a fraction of 2**64."""
    if fraction <= 0:
        return False
    value = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return value / 2**64 < fraction


# --- reuse -----------------------------------------------------------------------------------------


def _reusable(
    storage: Storage, prepared: str, wanted: dict[str, Any], log: Callable[[str], None]
) -> PreparedData | None:
    manifest_uri = join_uri(prepared, MANIFEST)
    if not storage.exists(manifest_uri):
        return None
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
    except ValueError:
        log(f"data: {manifest_uri} is unreadable; preparing the data again")
        return None
    if manifest.get("fingerprint") != wanted:
        log(f"data: the data settings changed since {prepared} was prepared; preparing it again")
        return None
    needed = [join_uri(prepared, TOKENIZER_FILE)] + [join_uri(prepared, split, INDEX) for split in SPLITS]
    if not all(storage.exists(uri) for uri in needed):
        log(f"data: {prepared} is incomplete; preparing it again")
        return None
    tokenizer_uri = join_uri(prepared, TOKENIZER_FILE)
    tok = load_tokenizer(tokenizer_uri, storage)
    digest = tokenizer_hash(tok)
    indexes = {split: read_index(join_uri(prepared, split), storage) for split in SPLITS}
    if digest != manifest.get("tokenizer_hash") or any(i.get("tokenizer_hash") != digest for i in indexes.values()):
        log(f"data: the tokenizer in {prepared} does not match its shards; preparing the data again")
        return None
    eot = ensure_eot(tok)
    return PreparedData(
        prepared_uri=prepared,
        tokenizer=tok,
        tokenizer_uri=tokenizer_uri,
        train_tokens=int(indexes["train"]["total_tokens"]),
        val_tokens=int(indexes["val"]["total_tokens"]),
        vocab_size=vocab_size_of(tok),
        eot_id=eot,
        reused=True,
        stats=manifest.get("stats", {}),
    )


def _clear(storage: Storage, prepared: str) -> None:
    """Remove what an earlier preparation left (manifest first, so it can never match again)."""
    storage.delete(join_uri(prepared, MANIFEST))
    for split in SPLITS:
        storage.delete(join_uri(prepared, split, INDEX))
        for uri in storage.list(join_uri(prepared, split)):
            if _SHARD_FILE.match(uri.rsplit("/", 1)[-1]):
                storage.delete(uri)


# --- preparation ------------------------------------------------------------------------------


def prepare_data(
    spec: TrainingJobSpec,
    *,
    storage_for: Callable[..., Storage] = default_storage_for,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Read, clean (with ``data.prepare``), split and tokenize ``spec.data`` into shards under the prepared URI.

    Earlier shards whose manifest matches :func:`fingerprint` are reused instead (see the module docstring).
    """
    data = spec.data
    prepared = RunLayout(spec.output.uri, prepared_uri=data.prepared_uri).data
    storages = Storages(storage_for, spec.s3)
    storage = storages(prepared)
    wanted = fingerprint(spec)
    reused = _reusable(storage, prepared, wanted, log)
    if reused is not None:
        log(
            f"data: reusing prepared data at {prepared} (train {reused.train_tokens:,} tokens, "
            f"val {reused.val_tokens:,} tokens, vocabulary {reused.vocab_size})"
        )
        return reused

    started = time.time()
    _clear(storage, prepared)
    files = resolve_sources(list(data.sources), storages)
    log(f"data: preparing {len(files)} file(s) from {len(data.sources)} source(s) into {prepared}")
    report = Report()
    report.files = len(files)
    docs, augmenter = _documents(spec, files, storages, report)
    skipped = report.skipped
    counts = {"train": 0, "val": 0}
    augmented = 0
    with tempfile.TemporaryDirectory(prefix="lmforge-prepare-") as tmp:
        spools = {split: Path(tmp) / f"{split}.jsonl" for split in SPLITS}
        with contextlib.ExitStack() as stack:
            outs = {split: stack.enter_context(open(spools[split], "w", encoding="utf-8")) for split in SPLITS}

            def flush(split: str, record: Any) -> None:
                nonlocal augmented
                outs[split].write(spool_line(record))
                if split == "train" and augmenter is not None:
                    for copy in augmenter.augment(record if isinstance(record, list) else [record]):
                        outs[split].write(spool_line(copy if len(copy) > 1 else copy[0]))
                        augmented += 1

            # The newest document of each split is held back so that one can move split at the end.
            held: dict[str, Any] = {"train": None, "val": None}
            for key, record in docs:
                split = "val" if is_validation(key, data.validation_fraction) else "train"
                if held[split] is not None:
                    flush(split, held[split])
                held[split] = record
                counts[split] += 1
            total = counts["train"] + counts["val"]
            if total == 0:
                raise ValueError(_empty_message(spec, files, report, storage, prepared, log))
            if data.validation_fraction > 0 and counts["val"] == 0 and counts["train"] >= 2:
                held["val"], held["train"] = held["train"], None
                counts["val"], counts["train"] = 1, counts["train"] - 1
                log("data: no document fell into validation by hash; moved the last training document there")
            elif counts["train"] == 0:
                held["train"], held["val"] = held["val"], None
                counts["train"], counts["val"] = 1, counts["val"] - 1
                log("data: no document fell into training by hash; moved the last validation document there")
            for split in SPLITS:
                if held[split] is not None:
                    flush(split, held[split])
        if skipped:
            log(f"data: skipped {sum(skipped.values())} record(s): {_summary(skipped)}")
        if data.validation_fraction > 0 and counts["val"] == 0:
            log("data: warning: the validation split is empty (one document in all)")

        tok = tokenizer_for(spec, storages, spools["train"], log)
        eot = ensure_eot(tok)
        digest = tokenizer_hash(tok)
        vocab = vocab_size_of(tok)
        tokenizer_uri = join_uri(prepared, TOKENIZER_FILE)
        storage.write_bytes(tokenizer_uri, tok.to_str().encode("utf-8"))

        tokens: dict[str, int] = {}
        for split in SPLITS:
            writer = ShardWriter(join_uri(prepared, split), storage, digest, vocab)
            tokens[split] = write_split(spools[split], writer, tok, eot, sft=data.format == "sft")

    documents = {"train": counts["train"] + augmented, "val": counts["val"]}
    stats = {
        "files": len(files),
        "documents": documents,
        "tokens": tokens,
        "skipped": dict(skipped),
        "seconds": round(time.time() - started, 3),
    }
    if data.prepare is not None:
        report.extra["split"] = {**counts, "augmented": augmented}
        report.extra["tokens"] = tokens
        report.extra["seconds"] = stats["seconds"]
        json_uri, md_uri = report.write(storage, prepared)
        stats["prepare"] = {
            "read": report.read,
            "out": total,
            "removed": {row["stage"]: row["removed"] for row in report.stages()},
            "augmented": augmented,
            "report": json_uri,
        }
        log(report.to_markdown().rstrip())
        log(f"data: report written to {md_uri} and {json_uri}")
    manifest = {
        "format": PREPARE_FORMAT,
        "fingerprint": wanted,
        "tokenizer_hash": digest,
        "vocab_size": vocab,
        "eot_id": eot,
        "stats": stats,
        "created": time.time(),
    }
    storage.write_bytes(join_uri(prepared, MANIFEST), json.dumps(manifest, indent=1).encode())
    log(
        f"data: prepared {documents['train']:,} training / {documents['val']:,} validation documents, "
        f"{tokens['train']:,} / {tokens['val']:,} tokens, vocabulary {vocab}, in {stats['seconds']:.1f}s"
    )
    return PreparedData(
        prepared_uri=prepared,
        tokenizer=tok,
        tokenizer_uri=tokenizer_uri,
        train_tokens=tokens["train"],
        val_tokens=tokens["val"],
        vocab_size=vocab,
        eot_id=eot,
        reused=False,
        stats=stats,
    )


def _documents(
    spec: TrainingJobSpec, files: list[str], storages: Callable[[str], Storage], report: Report
) -> tuple[Iterator[tuple[str, Any]], Any]:
    """``(split key, record)`` of the documents to split, and the augmenter (None without one).

    Without ``data.prepare`` the records are the sources' documents as they are; with it they are
    what the cleaning pipeline keeps (the key is the cleaned text, so the split follows it).
    """
    data = spec.data
    settings = data.prepare
    reader = DocumentReader(
        data,
        report.skip_input,
        strict=settings is not None,
        max_chars=settings.max_record_chars if settings is not None else None,
    )
    docs = reader.read(files, storages)
    if settings is None:

        def plain() -> Iterator[tuple[str, Any]]:
            for doc in docs:
                report.read += 1
                yield doc.key, doc.record

        return plain(), None
    from lmforge.data.cleaning.pipeline import Pipeline

    pipeline = Pipeline(settings, report, lambda uri: storages(uri).read_bytes(uri))
    return ((doc.key, doc.record) for doc in pipeline.run(docs)), pipeline.augmenter


def _empty_message(
    spec: TrainingJobSpec,
    files: list[str],
    report: Report,
    storage: Storage,
    prepared: str,
    log: Callable[[str], None],
) -> str:
    """Why no document is left; with data.prepare the report is written first, for the details."""
    data = spec.data
    skipped = report.skipped
    if data.prepare is None:
        return (
            f"no documents in data.sources {list(data.sources)}: {len(files)} file(s) read"
            + (f", skipped {_summary(skipped)}" if skipped else ", all empty")
            + f"; check data.format ({data.format}) and the field names"
        )
    _, md_uri = report.write(storage, prepared)
    log(report.to_markdown().rstrip())
    removed = [f"{row['stage']} removed {row['removed']:,}" for row in report.stages() if row["removed"]]
    top = report.to_dict()["top_reasons"][:3]
    reasons = "; ".join(f"{item['stage']}: {item['reason']} ({item['count']:,})" for item in top)
    return (
        f"no documents left after data.prepare: {report.read:,} record(s) read from {len(files)} file(s)"
        + (f", {sum(skipped.values()):,} unreadable" if skipped else "")
        + (f"; {', '.join(removed)}" if removed else "")
        + (f". Top reasons: {reasons}" if reasons else "")
        + f". Loosen data.prepare (quality filters, scripts, annotation rules) or check the sources; report: {md_uri}"
    )


def _summary(skipped: Counter[str]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in skipped.most_common())
