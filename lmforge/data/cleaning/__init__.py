"""Cleaning: the document stages of preparation, run when ``spec.data.prepare`` is set.

Preparation (:mod:`lmforge.data.preparation`) reads the sources (:mod:`lmforge.data.sources`),
passes the documents through this package, splits them and tokenizes them into shards. The spec
field keeps its API name, ``data.prepare``; here it means the cleaning settings.

One job per module:

- :mod:`.text`: the document record and its one-time tokenisation shared by all filters.
- :mod:`.normalize`: NFKC, whitespace, control characters.
- :mod:`.annotate`: required fields, allowed labels, length limits, conflicting labels.
- :mod:`.dedup`: exact (hash) and near (MinHash LSH, datasketch) duplicate removal.
- :mod:`.script`: keep documents mostly written in the configured Unicode scripts.
- :mod:`.quality`: Gopher quality, Gopher repetition, C4 and FineWeb rules.
- :mod:`.pii`: e-mails, phones, IP addresses, ID numbers to placeholders.
- :mod:`.augment`: synonym replacement and sentence reordering (training split only).
- :mod:`.report`: the data report (JSON and Markdown).
- :mod:`.pipeline`: the stages in order.

This package imports nothing heavy at import time; :mod:`.dedup` needs ``datasketch``.
"""
