"""FetchResponse helpers and fetch's argument checks (no I/O)."""

from __future__ import annotations

import pytest

from facetrt import BadRequestError, FetchResponse
from facetrt.runtime._facet import build_request


def test_response_helpers_read_headers_charset_and_json() -> None:
    response = FetchResponse(
        status=201,
        headers=(("content-type", 'application/json; charset="latin-1"'), ("x-a", "1")),
        body='{"name": "é"}'.encode("latin-1"),
        url="https://api.example.com/",
    )
    assert response.ok
    assert response.header("Content-Type") == 'application/json; charset="latin-1"'
    assert response.header("missing", "d") == "d"
    assert response.text == '{"name": "é"}'  # the charset the response names
    with pytest.raises(UnicodeDecodeError):  # JSON is UTF-8 (RFC 8259), whatever the header
        response.json()
    utf8 = FetchResponse(status=200, headers=(), body='{"name": "é"}'.encode(), url="u")
    assert utf8.json() == {"name": "é"}
    odd = FetchResponse(
        status=500, headers=(("content-type", "text/plain; charset=nope"),), body=b"\xff", url="u"
    )
    assert not odd.ok
    assert odd.text == "\ufffd"


def test_fetch_arguments_are_checked_and_normalised() -> None:
    request = build_request("https://a/", method="post", headers=None, body=None, json=[1])
    assert (request.method, request.body) == ("POST", b"[1]")
    assert request.headers == (("Content-Type", "application/json"),)
    kept = build_request(
        "https://a/", method="PUT", headers={"content-type": "x/y"}, body=None, json={}
    )
    assert kept.headers == (("content-type", "x/y"),)
    assert build_request("https://a/", method="GET", headers=None, body="é", json=None).body == (
        "é".encode()
    )
    for bad in (
        {"url": 1},
        {"method": ""},
        {"headers": {"a": 1}},
        {"body": 3},
        {"body": "x", "json": 1},
        {"json": float("nan")},
    ):
        arguments: dict[str, object] = {
            "url": "https://a/",
            "method": "GET",
            "headers": None,
            "body": None,
            "json": None,
        }
        arguments.update(bad)
        with pytest.raises(BadRequestError):
            build_request(**arguments)  # type: ignore[arg-type]  # wrong types on purpose
