"""The preparation stages one by one: normalisation, dedup, quality, script, PII, augmentation, annotation."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest
import zstandard

from lmforge.api.data import Data
from lmforge.data.cleaning.annotate import AnnotationRules
from lmforge.data.cleaning.augment import Augmenter, parse_synonyms, split_sentences
from lmforge.data.cleaning.dedup import ExactDedup, NearDedup
from lmforge.data.cleaning.normalize import normalize
from lmforge.data.cleaning.pii import PiiRedactor
from lmforge.data.cleaning.quality import QualityFilters, c4, fineweb, gopher_quality, gopher_repetition
from lmforge.data.cleaning.script import ScriptFilter
from lmforge.data.cleaning.text import Doc, TextView
from lmforge.data.sources import DocumentReader
from lmforge.data.storage import LocalStorage

FIXTURES = Path(__file__).parent / "fixtures"
ZH_DOCS = (FIXTURES / "prepare_zh.txt").read_text(encoding="utf-8").split("\n\n\n")
ENGLISH = (
    "The return statement leaves the current function call with the expression list as the return value. "
    "If an expression list is present, it is evaluated, else None is substituted. "
    "When return passes control out of a try statement with a finally clause, that finally clause is executed "
    "before really leaving the function. In a generator function, the return statement indicates that the "
    "generator is done and will cause StopIteration to be raised. The returned value is used as an argument "
    "to construct the exception and becomes its value attribute.\n"
    "In an asynchronous generator function, an empty return statement indicates that the asynchronous "
    "generator is done and will cause StopAsyncIteration to be raised."
)


def test_normalize_nfkc_whitespace_and_control_characters() -> None:
    assert normalize("Ｈｅｌｌｏ\u3000world\r\n\r\n\r\n\tline\x00 two\u200b  ") == "Hello world\n\nline two"
    assert normalize("数据\u00a0 训练！") == "数据 训练!"  # NFKC folds the full-width "!"
    assert normalize("a\n\n\n\nb") == "a\n\nb"


def test_views_tokenise_chinese_by_character_and_english_by_word() -> None:
    zh = TextView(ZH_DOCS[0])
    assert zh.cjk and zh.words[:4] == ["机", "器", "学", "习"]
    en = TextView("Don't stop: it's 3 words")
    assert not en.cjk and en.words == ["don't", "stop", "it's", "3", "words"]


def test_exact_dedup_after_normalisation() -> None:
    dedup = ExactDedup()
    assert dedup(Doc([normalize("Hello  world")])) is None
    assert dedup(Doc([normalize("Hello world ")])) == "exact duplicate"
    assert dedup(Doc([normalize(ZH_DOCS[0])])) is None
    assert dedup(Doc([normalize(ZH_DOCS[0] + "\u3000")])) == "exact duplicate"


def test_near_dedup_english_word_ngrams_and_chinese_character_ngrams() -> None:
    dedup = NearDedup(ngram=5, bands=14, rows=8)
    assert dedup(Doc([ENGLISH])) is None
    assert dedup(Doc([ENGLISH.replace("finally clause", "final clause", 1)])) == "near duplicate"
    for doc in ZH_DOCS:
        assert dedup(Doc([doc])) is None  # distinct Chinese documents are kept
    edited = ZH_DOCS[1].replace("六千三百", "六千四百")
    assert dedup(Doc([edited])) == "near duplicate"
    assert dedup(Doc(["completely different words about gardening and tomatoes in summer"])) is None


def test_near_dedup_is_deterministic() -> None:
    one, two = NearDedup(seed=3), NearDedup(seed=3)
    first, second = one.signature(Doc([ENGLISH])), two.signature(Doc([ENGLISH]))
    assert first is not None and second is not None
    assert (first.hashvalues == second.hashvalues).all()


def test_gopher_quality_rules() -> None:
    assert gopher_quality(TextView(ENGLISH)) is None
    assert gopher_quality(TextView("too short to be a document")) == "gopher_quality: fewer than 50 words"
    no_stop = " ".join(["alpha", "beta", "gamma", "delta"] * 20)
    assert gopher_quality(TextView(no_stop)) == "gopher_quality: fewer than 2 stop words"
    hashes = ENGLISH + " #tag" * 40
    assert gopher_quality(TextView(hashes)) == "gopher_quality: too many # per word"
    numbers = " ".join(str(i) for i in range(100)) + " the and of"
    assert gopher_quality(TextView(numbers)).startswith("gopher_quality: mean word length below 3")
    assert gopher_quality(TextView("".join(ZH_DOCS))) is None  # Chinese: no mean-word-length rule


def test_gopher_repetition_rules() -> None:
    assert gopher_repetition(TextView(ENGLISH)) is None
    assert gopher_repetition(TextView(ZH_DOCS[2])) is None
    lines = "\n".join(["Buy cheap watches now."] * 5 + ["A genuine sentence about something else entirely."])
    assert gopher_repetition(TextView(lines)) == "gopher_repetition: duplicate lines"
    spam = "click here to win " * 30
    assert gopher_repetition(TextView(spam)).startswith("gopher_repetition: top 2-gram")
    zh_spam = "点击这里赢取大奖，" * 20
    assert gopher_repetition(TextView(zh_spam)) is not None


def test_fineweb_and_c4_rules() -> None:
    assert fineweb(TextView(ENGLISH)) is None
    menu = "\n".join(["Home", "About", "Products", "Contact us", "Blog", "Careers"])
    assert fineweb(TextView(menu)) == "fineweb: few lines end with punctuation"
    assert fineweb(TextView("\n".join(ZH_DOCS))) is None
    doc = Doc(
        [
            "Menu\n"
            + ENGLISH.replace(". ", ".\n")
            + "\nThis site uses cookies to improve your experience.\nPlease enable JavaScript to view."
        ]
    )
    assert c4(doc) is None
    assert "Menu" not in doc.text and "cookies" not in doc.text and "JavaScript" not in doc.text
    assert c4(Doc(["Lorem ipsum dolor sit amet."])) == "c4: lorem ipsum"
    assert c4(Doc(["One sentence only, here."])) == "c4: fewer than 5 sentences"


def test_quality_filters_tokenise_each_document_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.data.cleaning import text

    calls = []
    original = text._WORD

    class Counting:
        def findall(self, value: str) -> list[str]:
            calls.append(1)
            return original.findall(value)

    monkeypatch.setattr(text, "_WORD", Counting())
    filters = QualityFilters(gopher_quality=True, gopher_repetition=True, c4=False, fineweb=True)
    assert filters(Doc([ENGLISH])) is None
    assert len(calls) == 1


def test_script_filter_latin_and_han() -> None:
    han = ScriptFilter(["han"], 0.65)
    assert han(Doc([ZH_DOCS[0]])) is None
    assert han(Doc([ENGLISH])) == "under 65% of letters in han"
    latin = ScriptFilter(["latin"], 0.65)
    assert latin(Doc([ENGLISH + " 数据"])) is None
    assert latin(Doc(["Привет, как дела? Всё хорошо, спасибо."])) is not None
    assert latin(Doc(["12345 !!! ..."])) is not None  # no letters at all
    assert ScriptFilter(["han", "latin"], 0.9)(Doc([ZH_DOCS[0] + " PyTorch CUDA"])) is None


def test_pii_placeholders() -> None:
    redactor = PiiRedactor()
    text = (
        "Mail john.doe@example.com or call +1 (555) 123-4567. Server 192.168.1.10 and 2001:db8::8a2e:370:7334. "
        "SSN 123-45-6789, card 4111 1111 1111 1111. 手机13812345678，身份证11010519491231002X。"
    )
    assert redactor.redact(text) == (
        "Mail <EMAIL> or call <PHONE>. Server <IP> and <IP>. SSN <ID>, card <ID>. 手机<PHONE>，身份证<ID>。"
    )
    untouched = "Released 2024-01-15 at 12:30:45; x[::2], std::vector, version 10.5.3, pi 3.14159."
    assert redactor.redact(untouched) == untouched
    assert redactor.counts == {"<EMAIL>": 1, "<PHONE>": 2, "<IP>": 2, "<ID>": 3}
    only_email = PiiRedactor(emails=True, phones=False, ip_addresses=False, id_numbers=False)
    assert only_email.redact("a@b.io 192.168.0.1") == "<EMAIL> 192.168.0.1"


def test_augmentation_synonyms_and_chinese_sentence_reordering() -> None:
    table = parse_synonyms((FIXTURES / "synonyms.tsv").read_bytes())
    assert table == {"fast": ["quick", "rapid"], "快": ["迅速"], "big": ["large"]}
    assert parse_synonyms(b'{"big": ["large", "huge"]}') == {"big": ["large", "huge"]}
    assert split_sentences("第一句。第二句！第三句？") == ["第一句。", "第二句！", "第三句？"]
    assert split_sentences("One. Two! Three?") == ["One.", "Two!", "Three?"]
    always = Augmenter(table, 1.0, 0.0, copies=1)
    assert always.augment(["a fast car, a big house, breakfast"])[0][0] in (
        "a quick car, a large house, breakfast",
        "a rapid car, a large house, breakfast",
    )  # "breakfast" is not a whole-word match
    assert always.augment(["他跑得很快。"]) == [["他跑得很迅速。"]]
    reorder = Augmenter({}, 0.0, 1.0, copies=2)
    copies = reorder.augment(["第一句。第二句。第三句。第四句。"])
    assert copies and all(
        sorted(split_sentences(c[0])) == sorted(split_sentences("第一句。第二句。第三句。第四句。")) for c in copies
    )
    assert reorder.augment(["第一句。第二句。第三句。第四句。"]) == copies  # seeded by the text
    assert Augmenter(table, 0.0, 0.0).augment(["fast"]) == []


def test_annotation_rules_reject_and_report_conflicts() -> None:
    rules = AnnotationRules(["prompt", "response", "label"], "label", ["billing", "other"], 10, 80)

    def doc(prompt: str, response: str, **extra: object) -> Doc:
        return Doc([prompt, response], {"prompt": prompt, "response": response, **extra})

    assert rules(doc("Where is my bill?", "In your account.", label="billing")) is None
    assert rules(doc("Where is my bill?", "Check the portal.", label="other")) is None
    assert rules(doc("Where is my bill?", "Ask support.", label="other")) is None
    assert rules(doc("Hi there friend", "Hello.", label="")) == "requiredFields: 'label' missing or empty"
    assert rules(doc("Hi there friend", "Hello.", label="spam")) == "allowedLabels: label not allowed"
    assert rules(doc("Hi", "Yo", label="other")) == "minChars: shorter than 10 characters"
    assert rules(doc("Hi " * 30, "Yo", label="other")) == "maxChars: longer than 80 characters"
    assert rules.conflicts == [{"prompt": "Where is my bill?", "labels": {"billing": 1, "other": 2}}]


def _reader(fmt: str, **prepare: object) -> tuple[DocumentReader, list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    data = Data.model_validate({"sources": ["file:///x"], "format": fmt})
    reader = DocumentReader(
        data, lambda reason, example, _source: skipped.append((reason, example)), strict=True, max_chars=200
    )
    return reader, skipped


def test_reader_skips_malformed_records_and_truncated_files(tmp_path: Path) -> None:
    lines = [
        b'{"text": "good one"}\n',
        b'{"text": "bad \xff\xfe utf8"}\n',
        b"{broken json\n",
        b'{"text": "' + b"x" * 5000 + b'"}\n',
        b'{"text": "\\ud800 lone surrogate"}\n',
        b'{"text": "good two"}\n',
    ]
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines))
    body = b"".join(b'{"text": "record %d"}\n' % i for i in range(5000))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body)[:-200])
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(body)[:-200])
    reader, skipped = _reader("jsonl")
    storage = LocalStorage()
    docs = list(
        reader.read(
            [f"file://{tmp_path}/{name}" for name in ("a.jsonl", "b.jsonl.zst", "c.jsonl.gz")], lambda _: storage
        )
    )
    texts = [doc.text for doc in docs]
    assert texts[:2] == ["good one", "good two"]
    assert 2 < len(texts) < 2 + 2 * 5000  # the records before each cut are kept
    reasons = [reason for reason, _ in skipped]
    assert reasons.count("truncated or corrupt compressed file") == 2
    for reason in ("invalid UTF-8", "invalid JSON", "record too long", "invalid UTF-8 (lone surrogate escape)"):
        assert reason in reasons
    assert any("b.jsonl.zst" in example for reason, example in skipped if reason.startswith("truncated"))


def test_reader_text_format_invalid_utf8_section(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes("第一节。\n\n\n".encode() + b"bad \xff bytes\n\n\n" + "第三节。".encode())
    reader, skipped = _reader("text")
    storage = LocalStorage()
    assert [d.text for d in reader.read([f"file://{tmp_path}/t.txt"], lambda _: storage)] == ["第一节。", "第三节。"]
    assert [reason for reason, _ in skipped] == ["invalid UTF-8"]


def test_zstd_multi_frame_is_read_whole() -> None:
    from lmforge.data.sources import _ZstdRaw

    frames = zstandard.ZstdCompressor().compress(b"one\n") + zstandard.ZstdCompressor().compress(b"two\n")
    assert io.BufferedReader(_ZstdRaw(io.BytesIO(frames))).read() == b"one\ntwo\n"


def test_duplicate_ngram_scan_matches_gophers_definition() -> None:
    import random

    from lmforge.data.cleaning.quality import _duplicate_ngram_chars

    def reference(words: list[str], n: int) -> int:  # Gopher's greedy scan, as datatrove writes it
        seen: set[str] = set()
        chars, i = 0, 0
        while i < len(words) - n + 1:
            gram = "".join(words[i : i + n])
            if gram in seen:
                chars += len(gram)
                i += n
            else:
                seen.add(gram)
                i += 1
        return chars

    rng = random.Random(0)
    for _ in range(50):
        words = [rng.choice(["a", "bb", "ccc", "dd", "e"]) for _ in range(rng.randrange(5, 200))]
        view = TextView(" ".join(words))
        for n in (5, 6, 10):
            assert _duplicate_ngram_chars(view, n) == reference(words, n)
