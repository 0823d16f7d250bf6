"""The data block: where the text comes from, how it is prepared and split."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from lmforge.api.base import SpecModel, Uri, describe, rule_error


class NearDedup(SpecModel):
    """MinHash LSH near-duplicate removal (datasketch). Defaults follow FineWeb: 14 bands x 8 rows."""

    enabled: bool = describe("Remove near-duplicate documents.", default=True)
    ngram: int = describe(
        "Shingle size: words for space-separated text, characters for CJK text.",
        default=5,
        ge=1,
        le=32,
    )
    bands: int = describe("LSH bands.", default=14, ge=1, le=256)
    rows: int = describe("Rows per band (bands x rows = number of permutations).", default=8, ge=1, le=64)
    seed: int = describe("Seed of the MinHash permutations.", default=1, ge=0)


class QualityFilters(SpecModel):
    """Heuristic quality filters with their published default thresholds."""

    gopher_quality: bool = describe("Gopher quality rules (word count, mean word length, ...).", default=True)
    gopher_repetition: bool = describe("Gopher repetition rules (duplicate lines, n-grams).", default=True)
    c4: bool = describe("C4 rules (terminal punctuation, bad words, javascript/lorem ipsum lines).", default=False)
    fineweb: bool = describe("FineWeb rules (line punctuation ratio, short lines, duplicate lines).", default=True)


class PiiRedaction(SpecModel):
    """Replace personal data with placeholders such as <EMAIL>."""

    emails: bool = describe("Redact e-mail addresses as <EMAIL>.", default=True)
    phones: bool = describe("Redact phone numbers as <PHONE>.", default=True)
    ip_addresses: bool = describe("Redact IPv4/IPv6 addresses as <IP>.", default=True)
    id_numbers: bool = describe("Redact ID-card-like numbers as <ID>.", default=True)


class Augmentation(SpecModel):
    """Fine-tuning data augmentation. Applied to the training split only, never to validation."""

    synonym_table: Uri | None = describe(
        "TSV or JSON file of word -> synonyms used for synonym replacement.", default=None
    )
    synonym_probability: float = describe(
        "Probability of replacing each word that has synonyms.", default=0.0, ge=0.0, le=1.0
    )
    sentence_reorder_probability: float = describe(
        "Probability of shuffling the sentences of a document.", default=0.0, ge=0.0, le=1.0
    )
    copies: int = describe("Augmented copies added per original record.", default=1, ge=1, le=16)

    @model_validator(mode="after")
    def _synonyms_need_table(self) -> Augmentation:
        if self.synonym_probability > 0 and self.synonym_table is None:
            raise rule_error(
                "synonymTable",
                "synonymProbability > 0 needs a synonym table; set synonymTable: "
                "file:///path/synonyms.tsv or set synonymProbability: 0",
            )
        return self


class AnnotationRules(SpecModel):
    """Checks on labelled records. Records that break a rule are rejected and counted by rule."""

    required_fields: list[str] = describe(
        "Fields every JSONL record must have and not leave empty.", default_factory=list
    )
    label_field: str | None = describe("Field holding the label.", default=None, min_length=1)
    allowed_labels: list[str] = describe("Allowed values of labelField; empty allows any.", default_factory=list)
    min_chars: int = describe("Minimum length of the text in characters.", default=0, ge=0)
    max_chars: int | None = describe("Maximum length of the text in characters.", default=None, ge=1)

    @model_validator(mode="after")
    def _labels_need_field(self) -> AnnotationRules:
        if self.allowed_labels and not self.label_field:
            raise rule_error("labelField", "allowedLabels is set, so set labelField to the field that holds the label")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise rule_error("maxChars", f"maxChars ({self.max_chars}) is below minChars ({self.min_chars})")
        return self


class Prepare(SpecModel):
    """Data preparation run before training: clean, deduplicate, filter, redact, augment."""

    normalize: bool = describe("Unicode NFKC, collapse whitespace, drop control characters.", default=True)
    exact_dedup: bool = describe("Drop exact duplicates (hash of the normalised text).", default=True)
    near_dedup: NearDedup = describe("Near-duplicate removal.", default_factory=NearDedup)
    quality: QualityFilters = describe("Quality filters.", default_factory=QualityFilters)
    scripts: list[Literal["latin", "han", "cyrillic", "arabic", "devanagari", "greek", "hangul", "kana"]] = describe(
        "Keep documents whose letters are mostly in these scripts; empty keeps all.",
        default_factory=list,
    )
    min_script_fraction: float = describe(
        "Fraction of letters that must be in the configured scripts.", default=0.65, ge=0.0, le=1.0
    )
    pii: PiiRedaction | None = describe("PII redaction; unset disables it.", default=None)
    augment: Augmentation | None = describe("Augmentation (fine-tuning data).", default=None)
    annotation: AnnotationRules | None = describe("Annotation rules (labelled data).", default=None)
    max_record_chars: int = describe("Records longer than this are skipped and reported.", default=1_000_000, ge=1)


class Replay(SpecModel):
    """Mix earlier data into continual training so the model does not forget it."""

    sources: list[Uri] = describe(
        "Prepared data of earlier jobs: each URI is a directory holding train/ and val/ (index.json and "
        "shards) as `lmforge prepare` or a run writes it, i.e. the earlier job's data.preparedUri "
        "(default its OUTPUT/data). It must have been tokenized with this job's tokenizer (set "
        "tokenizer.uri to the earlier model's tokenizer.json). train/ is replayed; val/ measures forgetting.",
        min_length=1,
        max_length=256,
    )
    fraction: float = describe(
        "Fraction of the training samples drawn from the replay sources (split across them in proportion "
        "to their training samples); assigned per sample by a deterministic low-discrepancy sequence, so "
        "every batch holds close to this fraction.",
        default=0.05,
        gt=0.0,
        lt=1.0,
    )

    @model_validator(mode="after")
    def _distinct_sources(self) -> Replay:
        seen: set[str] = set()
        for i, uri in enumerate(self.sources):
            key = uri.rstrip("/")
            if key in seen:
                raise rule_error(f"sources[{i}]", f"{uri} is listed twice; list each earlier data directory once")
            seen.add(key)
        return self


class MixSource(SpecModel):
    """Another prepared corpus mixed into training by fraction (e.g. code or a high-quality set)."""

    uri: Uri = describe(
        "A prepared data directory holding train/ and val/ (index.json and shards), as `lmforge prepare` "
        "or a run writes it (another job's data.preparedUri, default its OUTPUT/data). It must have been "
        "tokenized with this job's tokenizer (tokenizer.uri). Only its train/ split is read.",
    )
    fraction: float = describe(
        "Fraction of the training samples drawn from this source, assigned per sample by a deterministic "
        "low-discrepancy sequence (every batch holds close to it, on any number of ranks, across resumes).",
        gt=0.0,
        lt=1.0,
    )


class Data(SpecModel):
    """Training text: where it lives, its format, and how it is split and prepared."""

    sources: list[Uri] = describe(
        "Raw text sources (files or prefixes). .gz and .zst are decompressed.",
        min_length=1,
        max_length=4096,
    )
    format: Literal["text", "jsonl", "sft"] = describe(
        "text: plain text; jsonl: one JSON object per line with a text field; "
        "sft: JSONL with prompt and response fields (only the response is learned).",
        default="text",
    )
    text_field: str = describe("JSONL field with the text (format jsonl).", default="text", min_length=1)
    prompt_field: str = describe("JSONL field with the prompt (format sft).", default="prompt", min_length=1)
    response_field: str = describe("JSONL field with the response (format sft).", default="response", min_length=1)
    validation_fraction: float = describe(
        "Fraction of documents held out for evaluation, chosen deterministically per document.",
        default=0.05,
        ge=0.0,
        le=0.5,
    )
    prepared_uri: Uri | None = describe(
        "Where tokenized shards are written and read. Defaults to OUTPUT/data.", default=None
    )
    prepare: Prepare | None = describe("Preparation pipeline; unset tokenizes the sources as they are.", default=None)
    replay: Replay | None = describe("Replay of earlier data (stage: continual).", default=None)
    mix: list[MixSource] = describe(
        "Other prepared corpora mixed into the training samples, each with its fraction; this job's own "
        "data (data.sources) gets the rest. Evaluation stays on this job's own validation split.",
        default_factory=list,
        max_length=64,
    )
    shuffle_window: int = describe(
        "Training samples shuffled together. The shards are visited in a random order per epoch and each "
        "sample moves up to this many positions, so a batch mixes about shuffleWindow / samples-per-shard "
        "shards while a rank streams (and caches) only a sliding window of about that many shards from S3, "
        "never the whole data set first. A split of at most this many samples gets a full random "
        "permutation per epoch. Keep it when resuming: another value continues in another order.",
        default=131_072,
        ge=1,
        le=2**40,
    )

    @model_validator(mode="after")
    def _fields_differ(self) -> Data:
        if self.format == "sft" and self.prompt_field == self.response_field:
            raise rule_error("responseField", "promptField and responseField must name different fields")
        self._mix_rules()
        return self

    def _mix_rules(self) -> None:
        """The mix must leave room for this job's own data and name each corpus once."""
        seen = {uri.rstrip("/"): "data.replay.sources" for uri in (self.replay.sources if self.replay else [])}
        for i, source in enumerate(self.mix):
            key = source.uri.rstrip("/")
            if key in seen:
                raise rule_error(
                    f"mix[{i}].uri", f"{source.uri} is already in {seen[key]}; list each prepared data directory once"
                )
            seen[key] = f"data.mix[{i}]"
        total = sum(source.fraction for source in self.mix)
        if self.replay is not None:
            total += self.replay.fraction
        if self.mix and total >= 1.0:
            named = "data.mix fractions" + (" and data.replay.fraction" if self.replay is not None else "")
            raise rule_error(
                "mix",
                f"the {named} add up to {total:g}, leaving nothing for data.sources; keep the sum below 1 "
                "(e.g. 0.3 for 30% mixed-in data)",
            )
