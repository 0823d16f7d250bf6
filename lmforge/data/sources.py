"""Reading ``spec.data.sources``, the first part of preparation: files, then documents as :class:`Doc` records.

:func:`resolve_sources` lists every file a source names (a file/object, or a prefix meaning every
object under it); :class:`DocumentReader` cuts each into documents by ``data.format`` (``.gz`` and
``.zst`` are decompressed on the fly):

- ``text``: each file is a stream of lines. A document ends at two or more consecutive blank lines
  (a section break), or at a paragraph break (one blank line) once it holds
  ``TEXT_DOCUMENT_TARGET_CHARS`` characters, so books and manuals become section-sized documents
  rather than one end-of-text token per paragraph. Blocks longer than ``MAX_TEXT_DOCUMENT_CHARS``
  are cut at a line boundary so that a file without blank lines never has to fit in memory.
- ``jsonl``: one JSON object per line, the text in ``data.textField``.
- ``sft``: one JSON object per line with ``data.promptField`` and ``data.responseField``.

Why a reader of its own, that never crashes on bad input: real corpora contain broken JSON lines,
invalid UTF-8, a line of several gigabytes, or a ``.gz`` / ``.zst`` upload that was cut short. Each
is skipped, counted under a reason and shown with an example (through the
``skip(reason, example, source)`` callback), and the rest of the file is still used. Storage errors
(network, permissions) are not input problems and propagate as before.

- Lines are read as bytes with a length limit (``maxRecordChars``), so a huge record never has to
  fit in memory; it is drained and reported as "record too long".
- UTF-8 is decoded incrementally per line; invalid bytes make the record "invalid UTF-8" (in
  ``strict`` mode; otherwise they become U+FFFD, the behaviour without ``data.prepare``).
- ``.zst`` is decoded frame by frame with ``zstandard``'s decompressobj, which (unlike its stream
  reader) tells a stream that ends inside a frame from a complete one; ``gzip`` raises EOFError.
  Records read before the cut are kept; the file is reported as truncated.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

from lmforge.data.cleaning.text import Doc

if TYPE_CHECKING:
    from lmforge.api.common import S3Settings
    from lmforge.api.data import Data
    from lmforge.data.storage import Storage

MAX_TEXT_DOCUMENT_CHARS = 1_000_000
TEXT_DOCUMENT_TARGET_CHARS = 8_000
EXAMPLE_CHARS = 200
TRUNCATED = "truncated or corrupt compressed file"
INVALID_UTF8 = "invalid UTF-8"
TOO_LONG = "record too long"
_SURROGATE = re.compile("[\ud800-\udfff]")

Skip = Callable[[str, str, str], None]


class Storages:
    """One storage object per scheme, built with the spec's S3 settings."""

    def __init__(self, factory: Callable[..., Storage], s3: S3Settings | None) -> None:
        self.factory = factory
        self.s3 = s3
        self._by_scheme: dict[str, Storage] = {}

    def __call__(self, uri: str) -> Storage:
        scheme = uri.split("://", 1)[0]
        if scheme not in self._by_scheme:
            self._by_scheme[scheme] = self.factory(uri, self.s3)
        return self._by_scheme[scheme]


def resolve_sources(sources: list[str], storages: Callable[[str], Storage]) -> list[str]:
    """Every file a source names: the object itself, or all objects under the prefix (sorted).

    Hidden files (a name starting with ``.``) under a prefix are ignored.
    """
    files: list[str] = []
    for source in sources:
        storage = storages(source)
        if storage.exists(source):
            files.append(source)
            continue
        found = [uri for uri in storage.list(source) if not uri.rsplit("/", 1)[-1].startswith(".")]
        if not found:
            raise FileNotFoundError(
                f"data source {source} matches no file or object; check data.sources (a file, or a "
                "prefix/directory holding the files)"
            )
        files.extend(found)
    return files


class _ZstdRaw(io.RawIOBase):
    """Multi-frame zstd decompression that raises EOFError when the input ends inside a frame."""

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 17)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended inside a frame")
                return 0
            self._pending = memoryview(self._feed(chunk))
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            out.append(self._obj.decompress(data))
            if not self._obj.eof:
                break
            self._in_frame = False
            data = self._obj.unused_data
            self._obj = self._dctx.decompressobj()
        return b"".join(out)


def corrupt_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a compressed source is truncated or corrupt (not a storage failure)."""
    errors: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error]
    with contextlib.suppress(ImportError):
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


@contextlib.contextmanager
def open_binary(uri: str, storage: Storage) -> Iterator[IO[bytes]]:
    """The object's bytes, decompressing ``.gz`` and ``.zst``."""
    with storage.open_read(uri) as raw:
        lowered = uri.lower()
        if lowered.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as binary:
                yield binary  # type: ignore[misc]
        elif lowered.endswith((".zst", ".zstd")):
            yield io.BufferedReader(_ZstdRaw(raw), buffer_size=1 << 20)
        else:
            yield raw


def _pieces(binary: IO[bytes], limit: int, strict: bool) -> Iterator[tuple[str, bool, bool]]:
    """``(text, ends_line, valid_utf8)``: whole lines, or pieces of ``limit`` bytes of a longer one."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    first = True
    while True:
        raw = binary.readline(limit)
        if not raw:
            return
        ends = raw.endswith(b"\n")
        try:
            text = decoder.decode(raw, final=ends)
            valid = True
        except UnicodeDecodeError:
            decoder.reset()
            text = raw.decode("utf-8", "replace")
            valid = not strict
        if first:
            text = text.removeprefix("\ufeff")
            first = False
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        yield text, ends, valid


def _example(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"


class DocumentReader:
    """``Doc`` records of the sources in ``data.format``; bad input goes to ``skip``."""

    def __init__(self, data: Data, skip: Skip, *, strict: bool = False, max_chars: int | None = None) -> None:
        self.data = data
        self.skip = skip
        self.strict = strict
        self.max_chars = max_chars
        # bytes per read: a record of max_chars characters always fits (4 bytes per character at most)
        self.limit = max_chars * 4 + 2 if max_chars is not None else -1

    def read(self, files: list[str], storages: Callable[[str], Storage]) -> Iterator[Doc]:
        corrupt = corrupt_errors()
        for uri in files:
            with open_binary(uri, storages(uri)) as binary:
                try:
                    if self.data.format == "text":
                        yield from self._text(binary, uri)
                    else:
                        yield from self._json(binary, uri)
                except corrupt as exc:
                    self.skip(TRUNCATED, f"{uri}: {exc}", uri)

    def _text(self, binary: IO[bytes], uri: str) -> Iterator[Doc]:
        """Section-sized documents; see the module docstring for the rules."""
        block: list[str] = []
        size = 0
        blank_run = 0
        valid = True

        def emit() -> Iterator[Doc]:
            text = "".join(block).rstrip("\n")
            if not valid:
                self.skip(INVALID_UTF8, _example(text), uri)
            elif self.max_chars is not None and len(text) > self.max_chars:
                self.skip(TOO_LONG, f"{len(text):,} characters: {_example(text)}", uri)
            else:
                yield Doc([text], None, uri)

        limit = self.limit if self.limit > 0 else MAX_TEXT_DOCUMENT_CHARS * 4
        for line, _ends, line_valid in _pieces(binary, limit, self.strict):
            if not line.strip():
                blank_run += 1
                if block and (blank_run >= 2 or size >= TEXT_DOCUMENT_TARGET_CHARS):
                    yield from emit()
                    block, size, valid = [], 0, True
                elif block:
                    block.append("\n")  # a paragraph break inside the document
                continue
            blank_run = 0
            block.append(line)
            size += len(line)
            valid = valid and line_valid
            if size >= MAX_TEXT_DOCUMENT_CHARS:
                yield from emit()
                block, size, valid = [], 0, True
        if block:
            yield from emit()

    def _json(self, binary: IO[bytes], uri: str) -> Iterator[Doc]:
        data = self.data
        sft = data.format == "sft"
        wanted = [data.prompt_field, data.response_field] if sft else [data.text_field]
        skip = self.skip
        draining = False
        for line, ends, valid in _pieces(binary, self.limit, self.strict):
            if draining:
                draining = not ends
                continue
            if not ends and len(line.encode("utf-8", "surrogatepass")) >= self.limit - 1 > 0:
                skip(TOO_LONG, f"over {self.max_chars:,} characters: {_example(line)}", uri)
                draining = True
                continue
            if not line.strip():
                continue
            if not valid:
                skip(INVALID_UTF8, _example(line.strip()), uri)
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                skip("invalid JSON", _example(line.strip()), uri)
                continue
            if not isinstance(obj, dict):
                skip("not a JSON object", _example(line.strip()), uri)
                continue
            values = [obj.get(name) for name in wanted]
            missing = [name for name, value in zip(wanted, values, strict=True) if value is None]
            if missing:
                skip(f"missing field {missing[0]!r}", _example(line.strip()), uri)
                continue
            if not all(isinstance(value, str) for value in values):
                skip("field is not a string", _example(line.strip()), uri)
                continue
            if not values[-1].strip():
                skip("empty response" if sft else "empty text", _example(line.strip()), uri)
                continue
            if "\\u" in line and any(_SURROGATE.search(value) for value in values):
                skip(INVALID_UTF8 + " (lone surrogate escape)", _example(line.strip()), uri)
                continue
            if self.max_chars is not None and sum(map(len, values)) > self.max_chars:
                skip(TOO_LONG, f"{sum(map(len, values)):,} characters: {_example(line.strip())}", uri)
                continue
            yield Doc(values, obj, uri)
