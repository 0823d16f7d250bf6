"""data.mix: another prepared corpus mixed into training by fraction, reported in summary.json.

Corpus A (sentences) is prepared by `lmforge prepare`; job B trains on corpus B (arithmetic) with
30% of its samples from A's prepared data, on 2 ranks. A corpus tokenized with another tokenizer is
refused before training with the field and the fix.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.trainer_helpers import arithmetic_corpus, lmforge, sentences_corpus, tiny_job, write_job


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    (base / "a.txt").write_text(sentences_corpus(rng, 600) + "\n")
    (base / "b.txt").write_text(arithmetic_corpus(rng, 600) + "\n")
    job_a = tiny_job(base / "job-a", base / "data-a", base / "a.txt")
    prepared = lmforge("prepare", str(write_job(base / "a.yaml", job_a)))
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    return {"base": base, "data_a": base / "data-a", "b": base / "b.txt"}


def _mixed_job(corpora: dict[str, Path], name: str, *, shared_tokenizer: bool) -> Path:
    base = corpora["base"]
    job = tiny_job(base / name, base / f"data-{name}", corpora["b"], maxSteps=12, evalInterval=12)
    job["metadata"]["name"] = name
    if shared_tokenizer:
        job["spec"]["tokenizer"] = {"uri": f"file://{corpora['data_a']}/tokenizer.json"}
    job["spec"]["data"]["mix"] = [{"uri": f"file://{corpora['data_a']}", "fraction": 0.3}]
    return write_job(base / f"{name}.yaml", job)


@pytest.mark.slow
def test_mixed_in_corpus_supplies_its_fraction_of_the_samples_on_two_ranks(corpora: dict[str, Path]) -> None:
    result = lmforge("run", str(_mixed_job(corpora, "mixed", shared_tokenizer=True)))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((corpora["base"] / "mixed" / "summary.json").read_text())
    mix = summary["data_mix"]
    drawn = {name: entry["samples"] for name, entry in mix.items()}
    assert set(drawn) == {"data.sources", "data.mix[0]"}
    assert sum(drawn.values()) == 12 * 2 * 4  # steps x ranks x micro-batch: every sample counted once
    assert mix["data.mix[0]"]["fraction"] == pytest.approx(0.3, abs=0.02)
    assert mix["data.mix[0]"]["weight"] == pytest.approx(0.3)
    assert summary["steps"] == 12 and summary["model_uri"]


@pytest.mark.slow
def test_corpus_tokenized_with_another_tokenizer_is_refused_naming_the_field(corpora: dict[str, Path]) -> None:
    result = lmforge("run", str(_mixed_job(corpora, "badtok", shared_tokenizer=False)))
    assert result.returncode == 78, result.stderr[-3000:]
    assert "data.mix[0].uri" in result.stderr and "different tokenizer" in result.stderr
    assert "set tokenizer.uri" in result.stderr and "Traceback" not in result.stderr
    assert not (corpora["base"] / "badtok" / "model").exists()
