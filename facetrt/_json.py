"""msgpack values as JSON, for the HTTP gateway and data exports.

JSON has no bytes, so ``{"$bytes": "<standard base64>"}`` (an object with exactly that one
key and a string value) means bytes. A dict that really is ``{"$bytes": <str>}`` is therefore
always read as bytes. Non-finite floats are refused both ways (JSON cannot carry them); strings
must be valid UTF-8 (no lone surrogates from ``\\ud800`` escapes).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import TYPE_CHECKING, Final

from ._errors import BadRequestError
from ._values import DEPTH_MAX

if TYPE_CHECKING:
    from ._values import Value

BYTES_MARKER: Final = "$bytes"


def parse_json(body: bytes) -> Value:
    """Decode a request body: UTF-8 JSON, finite numbers, ``$bytes`` markers turned to bytes.

    UTF-8 only (RFC 8259 section 8.1; a leading byte order mark is ignored, as it allows):
    ``json.loads`` would also take UTF-16 and UTF-32 bytes, which a body declared
    ``application/json`` (charset UTF-8 or none) must not be.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"the body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        document = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
        raise BadRequestError(f"the body is not valid JSON: {exc}") from None
    return from_json(document)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def from_json(value: object, depth: int = 0) -> Value:
    """A parsed JSON value as a msgpack value (``{"$bytes": str}`` -> bytes)."""
    if isinstance(value, str):
        _check_text(value)
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= DEPTH_MAX:
        raise BadRequestError(f"JSON nested deeper than {DEPTH_MAX}")
    if isinstance(value, list):
        return [from_json(item, depth + 1) for item in value]
    assert isinstance(value, dict), value
    if len(value) == 1 and isinstance(value.get(BYTES_MARKER), str):
        try:
            return base64.b64decode(value[BYTES_MARKER], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError("a $bytes marker holds invalid base64") from None
    result: dict[str, Value] = {}
    for key, item in value.items():
        _check_text(key)
        result[key] = from_json(item, depth + 1)
    return result


def _check_text(text: str) -> None:
    # JSON "\ud800" escapes can make strings with lone surrogates, which are not UTF-8.
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise BadRequestError("a string holds a lone UTF-16 surrogate") from None


def to_json(value: object) -> object:
    """A msgpack value as JSON-ready data (bytes -> ``{"$bytes": base64}``)."""
    if isinstance(value, bytes):
        return {BYTES_MARKER: base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def dump_json(document: object) -> bytes:
    """Compact UTF-8 JSON. Raises ValueError for NaN or infinities."""
    text = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode()
