"""Open a split of *another* job's prepared data (a mix source, a replay source, an earlier data set).

Why a check on opening: prepared data is token ids, and token ids mean words only through the
tokenizer that made them. ``index.json`` records that tokenizer's hash (:func:`tokenizer_hash`);
a corpus tokenized with another tokenizer would train on noise without any error, so it is refused
with the field that named it and the fix, before any step runs.
"""

from __future__ import annotations

from lmforge.data.order import DEFAULT_WINDOW
from lmforge.data.reader import SampleReader
from lmforge.data.shards import read_index
from lmforge.data.storage import Storage, join_uri


class UnusablePreparedData(ValueError):
    """Another job's prepared data cannot be read by this run (missing, other tokenizer, too short).

    The message names the manifest field and the fix; the launcher exits INVALID_SPEC with it.
    """


FIX = (
    "point it at a prepared data directory (an earlier job's data.preparedUri, default OUTPUT/data, or "
    "what `lmforge prepare` wrote: the directory holding tokenizer.json, train/ and val/)"
)


def open_prepared_split(
    field: str,
    uri: str,
    split: str,
    storage: Storage,
    *,
    tokenizer_digest: str,
    context_length: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool,
    shuffle_window: int = DEFAULT_WINDOW,
) -> SampleReader:
    """A reader of ``uri``/``split`` after checking it exists, matches this job's tokenizer and holds a sample."""
    split_uri = join_uri(uri, split)
    try:
        index = read_index(split_uri, storage)
    except FileNotFoundError:
        raise UnusablePreparedData(f"{field}: {uri} has no {split}/index.json; {FIX}") from None
    theirs = index.get("tokenizer_hash")
    if theirs != tokenizer_digest:
        raise UnusablePreparedData(
            f"{field}: {uri} was tokenized with a different tokenizer (hash {theirs}, this job's is "
            f"{tokenizer_digest}), so its token ids mean other words; set tokenizer.uri to the tokenizer.json "
            f"that made it (e.g. {join_uri(uri, 'tokenizer.json')}) so both use the same one, or prepare that "
            "data again with this job's tokenizer"
        )
    reader = SampleReader(
        split_uri,
        storage,
        context_length,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=shuffle,
        shuffle_window=shuffle_window,
    )
    if reader.num_samples == 0:
        raise UnusablePreparedData(
            f"{field}: {split_uri} holds {reader.total_tokens} tokens, too few for one sample of "
            f"model.contextLength + 1 = {context_length + 1}; use more data there "
            "(or a larger data.validationFraction when it was prepared)"
        )
    return reader
