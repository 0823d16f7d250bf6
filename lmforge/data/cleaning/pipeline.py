"""The cleaning pipeline: the enabled stages of ``spec.data.prepare``, in a fixed order.

Order, and why:

1. ``normalize``: everything after compares normalised text.
2. ``annotation``: sees every labelled record, duplicates included, so conflicting labels on the
   same prompt are found before deduplication hides them.
3. ``exact_dedup``: a hash per document, the cheapest removal, first.
4. ``script``: one regex scan.
5. ``quality``: Gopher repetition, Gopher quality, C4, FineWeb over one shared tokenisation.
6. ``near_dedup``: MinHash is the costliest stage, so it runs on what the filters kept (as FineWeb).
7. ``pii``: redaction last, so deduplication and filters see the original text.

The train/validation split and augmentation (training split only) happen after the pipeline, in
:func:`lmforge.data.preparation.prepare_data`; the pipeline builds the :class:`~.augment.Augmenter`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from lmforge.data.cleaning.normalize import normalize
from lmforge.data.cleaning.report import Report
from lmforge.data.cleaning.text import Doc

if TYPE_CHECKING:
    from lmforge.api.data import Prepare
    from lmforge.data.cleaning.augment import Augmenter


class Stage(Protocol):
    name: str

    def __call__(self, doc: Doc) -> str | None:
        """None keeps the document (possibly changed); a string rejects it for that reason."""


class Normalizer:
    name = "normalize"

    def __call__(self, doc: Doc) -> str | None:
        fields = [normalize(field) for field in doc.fields]
        if not fields[-1]:
            return "empty after normalisation"
        if fields != doc.fields:
            doc.set_fields(fields)
        return None


class Pipeline:
    """Runs the stages over documents and records every rejection in the report."""

    def __init__(self, prepare: Prepare, report: Report, read_bytes: Callable[[str], bytes] | None = None) -> None:
        self.prepare = prepare
        self.report = report
        self.stages: list[Stage] = []
        self.annotation = None
        self.pii = None
        if prepare.normalize:
            self.stages.append(Normalizer())
        if prepare.annotation is not None:
            from lmforge.data.cleaning.annotate import AnnotationRules

            ann = prepare.annotation
            self.annotation = AnnotationRules(
                ann.required_fields, ann.label_field, ann.allowed_labels, ann.min_chars, ann.max_chars
            )
            self.stages.append(self.annotation)
        if prepare.exact_dedup:
            from lmforge.data.cleaning.dedup import ExactDedup

            self.stages.append(ExactDedup())
        if prepare.scripts:
            from lmforge.data.cleaning.script import ScriptFilter

            self.stages.append(ScriptFilter(list(prepare.scripts), prepare.min_script_fraction))
        from lmforge.data.cleaning.quality import QualityFilters

        rules = prepare.quality
        quality = QualityFilters(rules.gopher_quality, rules.gopher_repetition, rules.c4, rules.fineweb)
        if quality.enabled:
            self.stages.append(quality)
        if prepare.near_dedup.enabled:
            from lmforge.data.cleaning.dedup import NearDedup

            near = prepare.near_dedup
            self.stages.append(NearDedup(near.ngram, near.bands, near.rows, near.seed))
        if prepare.pii is not None:
            from lmforge.data.cleaning.pii import PiiRedactor

            pii = prepare.pii
            self.pii = PiiRedactor(pii.emails, pii.phones, pii.ip_addresses, pii.id_numbers)
            self.stages.append(self.pii)
        report.stage_order = [stage.name for stage in self.stages]
        self.augmenter = self._augmenter(read_bytes)

    def _augmenter(self, read_bytes: Callable[[str], bytes] | None) -> Augmenter | None:
        settings = self.prepare.augment
        if settings is None:
            return None
        from lmforge.data.cleaning.augment import Augmenter, parse_synonyms

        synonyms: dict[str, list[str]] = {}
        if settings.synonym_table is not None and settings.synonym_probability > 0:
            if read_bytes is None:
                raise ValueError("augment.synonymTable is set but no storage was given to read it")
            synonyms = parse_synonyms(read_bytes(settings.synonym_table), settings.synonym_table)
            if not synonyms:
                raise ValueError(
                    f"augment.synonymTable {settings.synonym_table} holds no synonyms; expected TSV lines "
                    '\'word<TAB>synonym,synonym\' or JSON {"word": ["synonym"]}'
                )
        augmenter = Augmenter(
            synonyms, settings.synonym_probability, settings.sentence_reorder_probability, settings.copies
        )
        return augmenter if augmenter.enabled else None

    def run(self, docs: Iterable[Doc]) -> Iterator[Doc]:
        """The documents that pass every stage, changed by the transforming ones."""
        stages = self.stages
        report = self.report
        for doc in docs:
            report.read += 1
            for stage in stages:
                reason = stage(doc)
                if reason is not None:
                    report.reject(stage.name, reason, doc.text, doc.source)
                    break
            else:
                yield doc
        self.finish()

    def finish(self) -> None:
        """Copy what the stages collected (label conflicts, PII counts) into the report."""
        if self.annotation is not None:
            conflicts = self.annotation.conflicts
            self.report.extra["label_conflicts"] = {"count": len(conflicts), "examples": conflicts[:10]}
        if self.pii is not None:
            self.report.extra["pii"] = dict(self.pii.counts)
