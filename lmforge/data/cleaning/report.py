"""The data report: what came in, what each stage removed and why, what went out.

Why: this is the page a user reads (and signs off) before spending GPU hours on the data. It is
written next to the shards as ``report.json`` (for tools) and ``report.md`` (for people), and the
Markdown is printed at the end of the preparation.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from lmforge.data.storage import join_uri

if TYPE_CHECKING:
    from lmforge.data.storage import Storage

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 200
READ = "read"


def _clip(text: str) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"


class Report:
    """Counts and examples collected while the pipeline runs; rendered once at the end."""

    def __init__(self) -> None:
        self.files = 0
        self.read = 0
        self.stage_order: list[str] = []
        self.rejected: dict[str, Counter[str]] = {READ: Counter()}
        self.examples: dict[tuple[str, str], list[dict[str, str]]] = {}
        self.extra: dict[str, Any] = {}

    def _example(self, stage: str, reason: str, text: str, source: str) -> None:
        examples = self.examples.setdefault((stage, reason), [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"source": source, "text": _clip(text)})

    def skip_input(self, reason: str, example: str, source: str) -> None:
        """A record (or the rest of a file) that could not be read."""
        self.rejected[READ][reason] += 1
        self._example(READ, reason, example, source)

    def reject(self, stage: str, reason: str, text: str, source: str) -> None:
        counter = self.rejected.get(stage)
        if counter is None:
            counter = self.rejected[stage] = Counter()
        counter[reason] += 1
        if counter[reason] <= EXAMPLES_PER_REASON:
            self._example(stage, reason, text, source)

    @property
    def skipped(self) -> Counter[str]:
        """Input problems by reason (the manifest's ``stats.skipped``)."""
        return self.rejected[READ]

    def stages(self) -> list[dict[str, Any]]:
        """Documents in and out of each stage, in pipeline order."""
        rows = []
        current = self.read
        for name in self.stage_order:
            reasons = self.rejected.get(name, Counter())
            removed = sum(reasons.values())
            rows.append(
                {
                    "stage": name,
                    "in": current,
                    "out": current - removed,
                    "removed": removed,
                    "reasons": dict(reasons.most_common()),
                }
            )
            current -= removed
        return rows

    def to_dict(self) -> dict[str, Any]:
        stages = self.stages()
        removed = {row["stage"]: row for row in stages}
        dedup_in = next((row["in"] for row in stages if row["stage"] in ("exact_dedup", "near_dedup")), 0)
        duplicates = sum(removed[name]["removed"] for name in ("exact_dedup", "near_dedup") if name in removed)
        top = sorted(
            ((count, stage, reason) for stage, counter in self.rejected.items() for reason, count in counter.items()),
            key=lambda item: (-item[0], item[1], item[2]),
        )[:10]
        return {
            "files": self.files,
            "input": {
                "records_read": self.read,
                "skipped": sum(self.skipped.values()),
                "reasons": dict(self.skipped.most_common()),
            },
            "stages": stages,
            "documents_out": stages[-1]["out"] if stages else self.read,
            "duplicates": {
                "exact": removed.get("exact_dedup", {}).get("removed", 0),
                "near": removed.get("near_dedup", {}).get("removed", 0),
                "rate": round(duplicates / dedup_in, 6) if dedup_in else 0.0,
            },
            "annotation": {"rejected": dict(self.rejected.get("annotation", Counter()).most_common())},
            "top_reasons": [
                {"stage": stage, "reason": reason, "count": count, "examples": self.examples.get((stage, reason), [])}
                for count, stage, reason in top
            ],
            **self.extra,
        }

    def to_markdown(self) -> str:
        report = self.to_dict()
        lines = ["# Data report", ""]
        inp = report["input"]
        lines += [
            f"- files: {report['files']}",
            f"- records read: {inp['records_read']:,} (skipped while reading: {inp['skipped']:,})",
            f"- documents out: {report['documents_out']:,}",
        ]
        dup = report["duplicates"]
        lines.append(f"- duplicates: {dup['exact']:,} exact, {dup['near']:,} near (rate {dup['rate']:.2%})")
        if "split" in report:
            split = report["split"]
            lines.append(
                f"- split: {split.get('train', 0):,} train / {split.get('val', 0):,} validation documents"
                + (f", {split['augmented']:,} augmented copies in train" if split.get("augmented") else "")
            )
        if "tokens" in report:
            tokens = report["tokens"]
            lines.append(f"- tokens: {tokens.get('train', 0):,} train / {tokens.get('val', 0):,} validation")
        if report.get("pii"):
            lines.append("- PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in report["pii"].items()))
        lines += ["", "## Stages", "", "| stage | in | out | removed | top reason |", "| --- | --- | --- | --- | --- |"]
        if inp["reasons"]:
            first = next(iter(inp["reasons"].items()))
            lines.append(f"| read | - | {inp['records_read']:,} | {inp['skipped']:,} | {first[0]} ({first[1]:,}) |")
        for row in report["stages"]:
            reason = next(iter(row["reasons"].items()), None)
            top = f"{reason[0]} ({reason[1]:,})" if reason else ""
            lines.append(f"| {row['stage']} | {row['in']:,} | {row['out']:,} | {row['removed']:,} | {top} |")
        if report["annotation"]["rejected"] or report.get("label_conflicts"):
            lines += ["", "## Annotation", ""]
            for rule, count in report["annotation"]["rejected"].items():
                lines.append(f"- {rule}: {count:,}")
            conflicts = report.get("label_conflicts", {})
            if conflicts.get("count"):
                lines.append(f"- prompts with conflicting labels: {conflicts['count']:,}")
                for conflict in conflicts["examples"]:
                    labels = ", ".join(f"{label} x{count}" for label, count in conflict["labels"].items())
                    lines.append(f"  - {_clip(conflict['prompt'])!r}: {labels}")
        if report["top_reasons"]:
            lines += ["", "## Top reasons", ""]
            for item in report["top_reasons"]:
                lines.append(f"- {item['stage']}: {item['reason']} ({item['count']:,})")
                for example in item["examples"]:
                    lines.append(f"  - `{example['source']}`: {example['text']}")
        return "\n".join(lines) + "\n"

    def write(self, storage: Storage, prepared: str) -> tuple[str, str]:
        """Write ``report.json`` and ``report.md`` under ``prepared``; returns their URIs."""
        json_uri, md_uri = join_uri(prepared, REPORT_JSON), join_uri(prepared, REPORT_MD)
        storage.write_bytes(json_uri, json.dumps(self.to_dict(), indent=1, ensure_ascii=False).encode("utf-8"))
        storage.write_bytes(md_uri, self.to_markdown().encode("utf-8"))
        return json_uri, md_uri
