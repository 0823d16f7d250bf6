"""Documents/s of the prepare pipeline (normalise, exact dedup, Gopher + FineWeb filters, MinHash LSH) on one core.

Corpus: the sections of examples/data/python-docs.txt, remixed into DOCS documents of three random
sections' paragraphs each (mostly distinct), 10% of them near-duplicates (a few words changed) and
5% exact copies. The same documents go through datatrove's equivalent chain (GopherRepetition,
GopherQuality, FineWebQuality, MinhashDedupSignature with 14 x 8, 5-grams) when datatrove is
importable; lmforge's number includes the LSH lookups, datatrove's only the signatures.

    python bench/prepare.py [--docs 3000] [--repeat 3]

datatrove lives only in the bench environment, e.g.
    python -m venv --system-site-packages /tmp/dt && /tmp/dt/bin/pip install datatrove spacy "xxhash<4"
    /tmp/dt/bin/python bench/prepare.py
(xxhash 4 refuses the str that datatrove's MinHash passes it; spaCy is datatrove's word tokenizer.)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def corpus(count: int, seed: int = 0) -> list[str]:
    from lmforge.api.data import Data
    from lmforge.data.sources import DocumentReader
    from lmforge.data.storage import LocalStorage

    data = Data.model_validate({"sources": ["file:///x"], "format": "text"})
    reader = DocumentReader(data, lambda *_: None)
    source = f"file://{ROOT / 'examples/data/python-docs.txt'}"
    sections = [doc.text for doc in reader.read([source], lambda _: LocalStorage())]
    paragraphs = [[p for p in s.split("\n\n") if p.strip()] for s in sections]
    rng = random.Random(seed)
    docs: list[str] = []
    while len(docs) < count:
        roll = rng.random()
        if docs and roll < 0.05:
            docs.append(rng.choice(docs))
        elif docs and roll < 0.15:
            words = rng.choice(docs).split(" ")
            for _ in range(3):
                words[rng.randrange(len(words))] = rng.choice(["alpha", "beta", "gamma"])
            docs.append(" ".join(words))
        else:
            picked = [p for s in rng.sample(paragraphs, 3) for p in s]
            docs.append("\n\n".join(picked))
    return docs


def run_lmforge(texts: list[str]) -> tuple[float, int]:
    from lmforge.api.data import Prepare
    from lmforge.data.cleaning.pipeline import Pipeline
    from lmforge.data.cleaning.report import Report
    from lmforge.data.cleaning.text import Doc

    prepare = Prepare.model_validate({"quality": {"gopherQuality": True, "gopherRepetition": True, "fineweb": True}})
    docs = [Doc([t]) for t in texts]
    started = time.perf_counter()
    kept = sum(1 for _ in Pipeline(prepare, Report()).run(docs))
    return time.perf_counter() - started, kept


def run_datatrove(texts: list[str]) -> tuple[float, int]:
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    with tempfile.TemporaryDirectory() as tmp:
        try:
            from datatrove.utils.hashing import HashConfig

            config = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=14, hashes_per_bucket=8, n_grams=5)
        except ImportError:  # older datatrove
            config = MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5)
        steps = [GopherRepetitionFilter(), GopherQualityFilter(), FineWebQualityFilter()]
        signature = MinhashDedupSignature(output_folder=tmp, config=config)
        kept = 0

        def counted(stream):  # noqa: ANN001, ANN202
            nonlocal kept
            for doc in stream:
                kept += 1
                yield doc

        started = time.perf_counter()
        stream = (Document(text=t, id=str(i)) for i, t in enumerate(texts))
        for step in steps:
            stream = step.run(stream, rank=0, world_size=1)
        signature.run(counted(stream), rank=0, world_size=1)
        return time.perf_counter() - started, kept


def equal_work(texts: list[str]) -> dict[str, tuple[float, float]]:
    """Seconds per stage for both tools over ALL documents (no filter's rejects skip later stages).

    The chained numbers above are not equal work: the two tools tokenise words differently (datatrove
    uses spaCy, whose punctuation tokens make GopherQuality reject every document of this corpus), so
    their later stages see different numbers of documents. Here each stage sees every document.
    """
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.utils.hashing import HashConfig

    from lmforge.data.cleaning.dedup import NearDedup
    from lmforge.data.cleaning.quality import QualityFilters
    from lmforge.data.cleaning.text import Doc

    results: dict[str, tuple[float, float]] = {}
    started = time.perf_counter()
    filters = QualityFilters(gopher_quality=True, gopher_repetition=True, c4=False, fineweb=True)
    for text in texts:
        filters(Doc([text]))
    ours = time.perf_counter() - started
    started = time.perf_counter()
    for step in (GopherRepetitionFilter(), GopherQualityFilter(), FineWebQualityFilter()):
        for text in texts:
            step.filter(Document(text=text, id="0"))
    results["quality filters"] = (ours, time.perf_counter() - started)

    near = NearDedup(ngram=5, bands=14, rows=8)
    started = time.perf_counter()
    for text in texts:
        near.signature(Doc([text]))
    ours = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        config = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=14, hashes_per_bucket=8, n_grams=5)
        signature = MinhashDedupSignature(output_folder=tmp, config=config)
        started = time.perf_counter()
        signature.run((Document(text=t, id=str(i)) for i, t in enumerate(texts)), rank=0, world_size=1)
        results["MinHash signatures"] = (ours, time.perf_counter() - started)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    texts = corpus(args.docs)
    size = sum(map(len, texts))
    print(f"corpus: {len(texts):,} documents, {size / 1e6:.1f} MB, one core")
    seconds, kept = min(run_lmforge(texts) for _ in range(args.repeat))
    ours = len(texts) / seconds
    print(f"lmforge:   {ours:10,.0f} docs/s  ({size / seconds / 1e6:.1f} MB/s, kept {kept:,})")
    try:
        import datatrove  # noqa: F401
    except ImportError:
        print("datatrove not installed")
        return
    try:
        seconds, kept = min(run_datatrove(texts) for _ in range(args.repeat))
    except Exception as exc:  # the comparison must not hide lmforge's number
        print(f"datatrove failed: {type(exc).__name__}: {exc}")
        return
    theirs = len(texts) / seconds
    print(f"datatrove: {theirs:10,.0f} docs/s  ({size / seconds / 1e6:.1f} MB/s, kept {kept:,})")
    print(f"ratio: {ours / theirs:.2f}x (chained; not equal work, see equal_work())")
    print("equal work, every stage over all documents:")
    total_ours = total_theirs = 0.0
    for stage, (mine, other) in equal_work(texts).items():
        total_ours, total_theirs = total_ours + mine, total_theirs + other
        rates = f"lmforge {len(texts) / mine:8,.0f} docs/s   datatrove {len(texts) / other:8,.0f} docs/s"
        print(f"  {stage:<20} {rates}   {other / mine:5.2f}x")
    print(
        f"  {'filters + MinHash':<20} lmforge {len(texts) / total_ours:8,.0f} docs/s   datatrove "
        f"{len(texts) / total_theirs:8,.0f} docs/s   {total_theirs / total_ours:5.2f}x (target >= 5x)"
    )


if __name__ == "__main__":
    main()
