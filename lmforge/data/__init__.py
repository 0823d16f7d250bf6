"""Training data: storage, tokenizer, token shards and the sample reader.

- :mod:`lmforge.data.storage`: one interface over ``file://`` and ``s3://`` (read, write, list, ...).
- :mod:`lmforge.data.tokenizer`: byte-level BPE training, loading and hashing.
- :mod:`lmforge.data.shards`: the binary token shard format (``index.json`` + ``shard-NNNNN.bin``).
- :mod:`lmforge.data.tokenize`: raw sources (text, JSONL, SFT; .gz / .zst) to shards, reused on restart.
- :mod:`lmforge.data.reader`: a deterministic, resumable sample stream over the shards.
"""
