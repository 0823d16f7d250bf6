"""PII redaction: e-mail addresses, phone numbers, IP addresses and ID-card-like numbers.

Why placeholders rather than dropping documents: the text around personal data is usually fine
training data; ``<EMAIL>``, ``<PHONE>``, ``<IP>``, ``<ID>`` keep the sentence shape so the model
learns that something goes there without learning the value.

One combined regex runs once per field; candidates are validated in Python only where a regex
cannot decide (IPv6 via :mod:`ipaddress`, digit counts of phone numbers). Precedence, first match
wins at a position: e-mail, IPv4, IPv6, ID, phone.

- ID-card-like: Chinese resident identity numbers (17 digits + check digit/X, with a plausible
  birth date), US social security numbers (``123-45-6789``), 16-digit card numbers in groups of 4.
- Phone: optional ``+country``, optional ``(area)``, then 2-4 digit groups separated by space, dot
  or dash, 9 to 15 digits in all (so dates and years are not phones). Plain 11-digit mobile
  numbers such as Chinese ``13812345678`` match too.

Boundaries are ASCII-only, so numbers written straight after Chinese text (``手机13812345678``) are found.
"""

from __future__ import annotations

import ipaddress
import re

from lmforge.data.cleaning.text import Doc

_EMAIL = r"(?P<email>[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"(?P<ipv4>(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d))"
_IPV6 = r"(?P<ipv6>(?<![0-9A-Za-z_:])(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}(?![0-9A-Za-z_:]))"
_ID = (
    r"(?P<id>(?<!\d)\d{6}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dA-Za-z])"
    r"|(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"
    r"|(?<!\d)\d{4}(?:[ -]\d{4}){3}(?!\d)|(?<!\d)\d{16}(?!\d))"
)
_PHONE = (
    r"(?P<phone>(?<![0-9A-Za-z_+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?"
    r"\d{2,4}(?:[ .-]?\d{2,5}){1,4}(?![0-9A-Za-z_]))"
)
_DIGIT = re.compile(r"\d")

PLACEHOLDERS = {"email": "<EMAIL>", "ipv4": "<IP>", "ipv6": "<IP>", "id": "<ID>", "phone": "<PHONE>"}


class PiiRedactor:
    """Replace the enabled kinds of personal data with placeholders; counts what it replaced."""

    name = "pii"

    def __init__(self, emails: bool = True, phones: bool = True, ip_addresses: bool = True, id_numbers: bool = True):
        parts = []
        if emails:
            parts.append(_EMAIL)
        if ip_addresses:
            parts += [_IPV4, _IPV6]
        if id_numbers:
            parts.append(_ID)
        if phones:
            parts.append(_PHONE)
        self._pattern = re.compile("|".join(parts)) if parts else None
        self.counts: dict[str, int] = {"<EMAIL>": 0, "<PHONE>": 0, "<IP>": 0, "<ID>": 0}

    def _replace(self, match: re.Match[str]) -> str:
        kind = match.lastgroup or ""
        value = match.group()
        if kind == "ipv6":
            try:
                ipaddress.IPv6Address(value)
            except ValueError:
                return value
            if sum(1 for group in value.split(":") if group) < 2:
                return value  # "::1"-like fragments are too often code (slices, C++ scopes)
        elif kind == "phone" and not 9 <= len(_DIGIT.findall(value)) <= 15:
            return value
        placeholder = PLACEHOLDERS[kind]
        self.counts[placeholder] += 1
        return placeholder

    def redact(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(self._replace, text)

    def __call__(self, doc: Doc) -> str | None:
        redacted = [self.redact(field) for field in doc.fields]
        if redacted != doc.fields:
            doc.set_fields(redacted)
        return None
