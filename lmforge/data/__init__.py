"""Training data: storage, preparation (``spec.data`` to token shards) and the sample reader.

Storage:

- :mod:`lmforge.data.storage`: one interface over ``file://`` and ``s3://`` (read, write, list, ...).
- :mod:`lmforge.data.staging`: local copies of remote directories (fetch a model, publish outputs).
- :mod:`lmforge.data.safe_paths`: local paths from names others chose (keys, shard names), kept inside.
- :mod:`lmforge.data.retry`: bounded retries with backoff and jitter for object-store reads.

Preparation, what `lmforge prepare` and every training pod's start run:

- :mod:`lmforge.data.preparation`: ``prepare_data``: read, clean, split, tokenize; reused by fingerprint.
- :mod:`lmforge.data.sources`: the files a source names, cut into documents; bad input skipped and counted.
- :mod:`lmforge.data.cleaning`: the document stages of ``spec.data.prepare`` (filters, dedup, PII, report).
- :mod:`lmforge.data.tokenize`: the tokenizer (loaded or trained) and each split encoded into shards.
- :mod:`lmforge.data.tokenizer`: byte-level BPE training, loading and hashing.
- :mod:`lmforge.data.shards`: the binary token shard format (``index.json`` + ``shard-NNNNN.bin``).

Reading, during training:

- :mod:`lmforge.data.reader_protocol`: what every reader offers the loop, the mixer and the workers.
- :mod:`lmforge.data.reader`: a deterministic, resumable sample stream over a split's shards.
- :mod:`lmforge.data.stream_settings`: the streaming knobs (``LMFORGE_PREFETCH_DEPTH``, cache, ranges).
- :mod:`lmforge.data.blocks`: a split's shard blocks: verified GETs, shard edges, cache views, mmap.
- :mod:`lmforge.data.order`: the order an epoch visits the samples (a shuffle that streams).
- :mod:`lmforge.data.prefetch`: fetches the blocks the upcoming samples need, ahead of the reader.
- :mod:`lmforge.data.cache`: the bounded LRU cache of fetched shard blocks (memory or a directory).
- :mod:`lmforge.data.allocator`: keeps freed fetch buffers in the heap (no page faults per block).
- :mod:`lmforge.data.workers`: a SampleReader spread over DataLoader worker processes.
- :mod:`lmforge.data.mixing`: a deterministic, resumable mix of several sample streams by weight.
- :mod:`lmforge.data.other_job_data`: opens another job's prepared split (mix, replay), checked against this tokenizer.
"""
