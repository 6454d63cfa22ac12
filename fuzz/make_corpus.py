"""Write the committed seed corpus: ``python fuzz/make_corpus.py`` (rewrites ``seed-*`` files).

Seeds are a few valid inputs per target (and a few classic invalid ones) that give libFuzzer
a head start; each target's layout (control bytes, then the payload) is described in its
module docstring. Reproducers of fixed bugs are kept beside them as ``repro-*`` files, which
this script leaves alone; ``tests/fuzz`` replays both kinds through each target's ``check``.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facetrt.protocol import encode_frame  # after the path fix above

CORPUS = Path(__file__).resolve().parent / "corpus"
KEY = "frt_0123456789abcdef_" + "A" * 43


def _frames(*bodies: dict[str, object]) -> bytes:
    return b"".join(encode_frame(body) for body in bodies)


def _call(call_id: int, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "t": "call",
        "id": call_id,
        "agent": "counter-1",
        "method": "increment",
        "args": [],
        "kwargs": {"by": 2},
    }
    body.update(extra)
    return body


def frame_seeds() -> dict[str, bytes]:
    """fuzz_frames: 5 control bytes (limit, flags, cuts, batch limit, answers), then bytes."""
    hello = {"t": "hello", "v": 1, "key": KEY}
    full_call = _call(
        7,
        args=[1, -2, 3.5, "text", b"\x00\xff", None, True, [1, [2]], {"k": "v"}],
        **{
            "class": "Counter",
            "idem": "idem-1",
            "trace": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        },
        deadline=1500,
    )
    return {
        "hello": bytes([7, 2, 0, 0, 0]) + _frames(hello),
        "session": bytes([7, 2, 0, 3, 0xFF])
        + _frames(hello, _call(1), _call(2), {"t": "ping", "id": 9}, {"t": "bye"}),
        "calls-cut": bytes([4, 3, 5, 4, 0x55])
        + _frames(_call(1), full_call, _call(1), {"t": "pong", "id": 3}, _call(8)),
        # A million inputs never put a call after a bye (both decoders' checks) by themselves.
        "bye-then-call": bytes([7, 2, 0, 4, 0]) + _frames(hello, _call(1), {"t": "bye"}, _call(2)),
        "bye-then-call-bytewise": bytes([7, 2, 255, 4, 0])
        + _frames(hello, {"t": "bye"}, {"t": "ping", "id": 1}, _call(2)),
        "calls-bytewise": bytes([5, 3, 255, 2, 0x0F]) + _frames(_call(1), _call(2), _call(1)),
        "client": bytes([7, 6, 3, 2, 0])
        + _frames(
            {"t": "welcome", "v": 1, "tenant": "acme", "inflight": 64, "frame": 4194304},
            {"t": "result", "id": 1, "value": {"a": [1, 2.5, b"x"]}},
            {"t": "error", "id": 2, "code": "overloaded", "message": "busy", "retryable": True},
            {"t": "error", "id": None, "code": "bad_request", "message": "m", "retryable": False},
            {"t": "bye"},
        ),
        "refused": bytes([7, 8 | 2, 0, 0, 0]) + _frames(hello, _call(1)),
        "too-long": bytes([2, 1, 0, 0, 0]) + struct.pack(">I", 1000) + b"\x80" * 10,
        "ext": bytes([7, 1, 0, 0, 0]) + struct.pack(">I", 3) + b"\xd4\x01\x00",
        "not-a-map": bytes([7, 1, 0, 0, 0]) + struct.pack(">I", 2) + b"\x91\x01",
        "midframe-eof": bytes([7, 3, 0, 0, 0]) + encode_frame(_call(1))[:-3],
    }


def handshake_seeds() -> dict[str, bytes]:
    """fuzz_handshake: 6 control bytes (t, v, key kind, mutation, position, flags), payload."""
    call = encode_frame(_call(1))
    return {
        "tenant-key": bytes([0, 0, 0, 0, 0, 0]),
        "admin-key": bytes([0, 0, 1, 0, 0, 0]),
        "revoked-key": bytes([0, 0, 2, 0, 0, 0]),
        "deleted-tenant-key": bytes([0, 0, 3, 0, 0, 0]),
        "unknown-key": bytes([0, 0, 4, 0, 0, 0]),
        "flipped-key": bytes([0, 0, 5, 0, 30, 0]) + b"Z",
        "cut-key": bytes([0, 0, 5, 8, 40, 0]),
        "cross-wired-key": bytes([0, 0, 5, 24, 0, 0]),
        "version-2": bytes([0, 5, 0, 0, 0, 0]),
        "version-bool": bytes([0, 10, 0, 0, 0, 0]),
        "not-utf8-key": bytes([0, 0, 6, 0, 0, 0]) + b"frt_\xff\xfe",
        "then-calls": bytes([0, 0, 0, 0, 0, 4]) + call + call,
        "bytewise-extra-bin-key": bytes([0, 0, 0, 0, 0, 1 | 2 | 8]) + b"extra",
        "welcome-first": bytes([4, 0, 0, 0, 0, 0]),
    }


def http_body_seeds() -> dict[str, bytes]:
    """fuzz_http_body: 4 control bytes (content type, length, cuts, flags), then the body."""
    mixed = {"args": [{"$bytes": "AAEC"}, "café", 1.5, None, True, [1, {"a": []}]], "kwargs": {}}
    return {
        "call": bytes([0, 0, 0, 0]) + b'{"args":[1,2],"kwargs":{"by":2},"class":"Counter"}',
        "mixed-chunked": bytes([1, 1, 3, 0]) + json.dumps(mixed, ensure_ascii=False).encode(),
        "empty-object": bytes([4, 2, 0, 0]) + b"{}",
        "empty": bytes([0, 0, 0, 0]),
        "small-limits-bytewise": bytes([0, 0, 255, 2]) + b'{"kwargs":{"x":"' + b"y" * 40 + b'"}}',
        "no-content-type": bytes([6, 0, 0, 0]) + b'{"args":[]}',
        "bom": bytes([0, 0, 0, 0]) + b'\xef\xbb\xbf{"args":[1]}',
        "disconnect": bytes([0, 0, 2, 1]) + b'{"args":',
        "infinite": bytes([0, 0, 0, 0]) + b'{"args":[1e999]}',
        "surrogate": bytes([0, 0, 0, 0]) + b'{"args":["\\ud800"]}',
        "big-int": bytes([0, 0, 0, 0]) + b'{"args":[18446744073709551616]}',
        "class-not-text": bytes([0, 0, 0, 0]) + b'{"class":5}',  # not found in 1M inputs either
        # 1M inputs never nested 64 deep by themselves (the depth is no branch to find).
        "deep": bytes([0, 0, 0, 0]) + b'{"args":' + b"[" * 70 + b"]" * 70 + b"}",
        "deep-objects": bytes([0, 0, 0, 0]) + b'{"kwargs":' + b'{"a":' * 70 + b"1" + b"}" * 71,
    }


def main() -> None:
    for target, seeds in (
        ("frames", frame_seeds()),
        ("handshake", handshake_seeds()),
        ("http_body", http_body_seeds()),
    ):
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("seed-*"):
            old.unlink()
        for name, data in seeds.items():
            (directory / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    main()
