"""Redaction: the filter every egress sink passes through (decision 0014).

Two kinds of rules:

- **Known secret values** of the node's tenants: the value itself, its percent-encoding and its
  base64 forms at every byte alignment (so ``Authorization: Basic base64(user:secret)``
  echoed back is caught too), each replaced by ``[REDACTED:NAME]``. Applied to everything: the
  response headers and body handed to facet code or to a tool, error messages, log records and
  audit records.
- **Token shapes** (bearer tokens, ``sk-`` keys, GitHub, Slack and AWS key ids, facetrt keys):
  replaced by ``[REDACTED]`` in text sinks only (logs, error messages, audit records). Not in
  response bodies: a body may legitimately carry such a token the facet asked for (an API
  that issues keys), and rewriting arbitrary bytes by shape would corrupt binary payloads.
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse
from typing import TYPE_CHECKING, Final, final

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

B64_FORM_CHARS_MIN: Final = 8
TOKEN_SHAPES: Final = (
    (re.compile(r"(?i)\b(bearer|token)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2[REDACTED]"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "sk-[REDACTED]"),
    (re.compile(r"\b(gh[pousr]_)[A-Za-z0-9]{20,}"), r"\1[REDACTED]"),
    (re.compile(r"\b(xox[abposr]-)[A-Za-z0-9-]{10,}"), r"\1[REDACTED]"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "AKIA[REDACTED]"),
    (re.compile(r"\b(frt_[0-9a-f]{16}_)[A-Za-z0-9_-]{43}"), r"\1[REDACTED]"),
)


def secret_forms(value: bytes) -> list[bytes]:
    """The spellings of ``value`` that may appear in a body or a header."""
    forms = {value, urllib.parse.quote(value, safe="").encode()}
    for offset in range(3):
        padded = b"\0" * offset + value
        start = (offset * 8 + 5) // 6  # first character holding no pad bits
        end = (len(padded) * 8) // 6  # last character holding only value bits, exclusive
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            form = encode(padded)[start:end]
            if len(form) >= B64_FORM_CHARS_MIN:
                forms.add(form)
    return sorted(forms, key=len, reverse=True)  # longest first: no partial overlap wins


@final
class Redactor:
    """Replaces known secret values (all forms) and, in text, token shapes."""

    __slots__ = ("_bytes", "_names", "_text")

    def __init__(self, secrets: Mapping[str, bytes] | None = None) -> None:
        names: dict[bytes, str] = {}
        for name, value in (secrets or {}).items():
            for form in secret_forms(value):
                names.setdefault(form, name)
        self._names = names
        ordered = sorted(names, key=len, reverse=True)
        self._bytes = re.compile(b"|".join(re.escape(f) for f in ordered)) if ordered else None
        self._text = (
            re.compile("|".join(re.escape(f.decode("latin-1")) for f in ordered))
            if ordered
            else None
        )

    @property
    def is_empty(self) -> bool:
        return self._bytes is None

    def data(self, value: bytes) -> bytes:
        """``value`` with every known secret form replaced (token shapes left alone)."""
        if self._bytes is None:
            return value
        return self._bytes.sub(lambda m: b"[REDACTED:" + self._names[m[0]].encode() + b"]", value)

    def names_in(self, value: bytes) -> set[str]:
        """The names of the secrets whose values (any form) occur in ``value``."""
        if self._bytes is None:
            return set()
        return {self._names[match[0]] for match in self._bytes.finditer(value)}

    def header(self, value: str) -> str:
        """A header value with known secret forms replaced (header values are latin-1)."""
        if self._text is None:
            return value
        return self._text.sub(lambda m: f"[REDACTED:{self._names[m[0].encode('latin-1')]}]", value)

    def text(self, value: str) -> str:
        """Text for a log, error or audit record: secret forms and token shapes replaced."""
        if self._bytes is not None:
            encoded = value.encode("utf-8", errors="surrogatepass")
            value = self.data(encoded).decode("utf-8", errors="replace")
        for pattern, replacement in TOKEN_SHAPES:
            value = pattern.sub(replacement, value)
        return value


@final
class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record (message, arguments, exception text).

    Installed on the handlers of the root logger by the daemon, so that every record that
    reaches a sink, whichever logger made it, passes through the node's current redactor.
    """

    def __init__(self, redactor: Callable[[], Redactor]) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self._redactor()
        message = record.getMessage()
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = redactor.text(formatter.formatException(record.exc_info))
            record.exc_info = None
        record.msg = redactor.text(message)
        record.args = None
        return True
