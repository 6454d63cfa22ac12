"""Bad input gets a clear code and changes nothing (SPEC §2, §3, §4)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from facetrt import (
    AddressError,
    BadRequestError,
    ConflictError,
    ErrorCode,
    Facet,
    FacetrtError,
    HandlerError,
    NotFoundError,
    RuntimeConfig,
    StoreFullError,
    open_runtime,
    rpc,
)
from tests.facets import CLASSES

if TYPE_CHECKING:
    from pathlib import Path

    from facetrt import Runtime, Value

TENANT = "acme"


def _files(data_dir: Path) -> set[str]:
    return {
        os.path.relpath(os.path.join(root, name), data_dir)
        for root, dirs, files in os.walk(data_dir)
        for name in files + dirs
    }


@pytest.mark.parametrize(
    "tenant",
    ["", "A", "-a", "_a", "a/b", "../a", "a\x00", "a" * 64, "é", " a", "a.b", "\uff41"],
)
async def test_bad_tenant_ids_are_refused(rt: Runtime, data_dir: Path, tenant: str) -> None:
    before = _files(data_dir)
    with pytest.raises(AddressError) as info:
        await rt.call(tenant, "agent", "increment", cls="Counter")
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert _files(data_dir) == before


@pytest.mark.parametrize(
    "agent",
    ["", "/x", ".x", "..", "../x", "a\x00b", "a b", "é", "a\\b", "x" * 257, "\uff41", "a\nb"],
)
async def test_bad_agent_ids_are_refused(rt: Runtime, data_dir: Path, agent: str) -> None:
    before = _files(data_dir)
    with pytest.raises(AddressError):
        await rt.call(TENANT, agent, "increment", cls="Counter")
    assert _files(data_dir) == before


async def test_path_like_agent_ids_never_reach_the_filesystem(rt: Runtime, data_dir: Path) -> None:
    agent = "a/../../etc/passwd:x@y" + "z" * 234
    assert len(agent) == 256
    assert await rt.call(TENANT, agent, "increment", cls="Counter") == 1
    assert not any("passwd" in name or ".." in name for name in _files(data_dir))


async def test_unknown_class_method_and_facet(rt: Runtime, data_dir: Path) -> None:
    with pytest.raises(NotFoundError):
        await rt.call(TENANT, "c", "increment", cls="NoSuchClass")
    with pytest.raises(NotFoundError):
        await rt.call(TENANT, "never-created", "increment")
    assert not (data_dir / "tenants").exists()
    await rt.call(TENANT, "c", "increment", cls="Counter")
    with pytest.raises(NotFoundError):
        await rt.call(TENANT, "c", "no_such_method")
    with pytest.raises(NotFoundError):
        await rt.call(TENANT, "c", "on_activate")  # not an @rpc method
    with pytest.raises(NotFoundError):
        await rt.call(TENANT, "c", "__init__")
    assert await rt.call(TENANT, "c", "get") == 1


async def test_other_class_than_the_bound_one_conflicts(rt: Runtime) -> None:
    await rt.call(TENANT, "c", "increment", cls="Counter")
    with pytest.raises(ConflictError) as info:
        await rt.call(TENANT, "c", "put", "k", 1, cls="Register")
    assert info.value.code is ErrorCode.CONFLICT
    assert await rt.call(TENANT, "c", "get", cls="Counter") == 1


@pytest.mark.parametrize(
    "value",
    [{1, 2}, object(), 2**64, -(2**63) - 1, {1: "int key"}, {b"k": "bytes key"}, [print]],
)
async def test_arguments_msgpack_cannot_carry_are_refused(rt: Runtime, value: object) -> None:
    await rt.call(TENANT, "r", "put", "k", "before", cls="Register")
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "r", "put", "k", value)  # type: ignore[arg-type]  # on purpose
    assert await rt.call(TENANT, "r", "get", "k") == "before"


async def test_deeply_nested_value_is_refused(rt: Runtime) -> None:
    value: Value = []
    for _ in range(100):
        value = [value]
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "r", "put", "k", value, cls="Register")


async def test_wrong_arguments_are_bad_request(rt: Runtime) -> None:
    await rt.call(TENANT, "r", "put", "k", 1, cls="Register")
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "r", "put", "k")
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "r", "put", "k", 1, 2, 3)
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "r", "put", "k", 1, nonsense=True)
    assert await rt.call(TENANT, "r", "get", "k") == 1


@pytest.mark.parametrize("key", ["", "x" * 512, "é" * 256, 5, b"bytes"])
async def test_bad_storage_keys_are_refused_and_change_nothing(rt: Runtime, key: object) -> None:
    await rt.call(TENANT, "r", "put", "k", 1, cls="Register")
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "r", "put", key, 2)  # type: ignore[arg-type]  # on purpose
    assert await rt.call(TENANT, "r", "dump") == {"k": 1}


async def test_key_of_exactly_511_bytes_is_accepted(rt: Runtime) -> None:
    key = "é" * 255 + "x"
    assert len(key.encode()) == 511
    await rt.call(TENANT, "r", "put", key, 1, cls="Register")
    assert await rt.call(TENANT, "r", "get", key) == 1


async def test_values_over_the_limit_are_refused(data_dir: Path) -> None:
    config = RuntimeConfig(value_bytes_max=1000, commit_threads=2)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        await rt.call(TENANT, "r", "put", "k", "x" * 900, cls="Register")
        with pytest.raises(BadRequestError):
            await rt.call(TENANT, "r", "put", "k", "x" * 1001)
        with pytest.raises(BadRequestError):  # the handler's put refuses it too
            await rt.call(TENANT, "r", "put_many", {"a": "x" * 10, "b": "y" * 995})
        assert await rt.call(TENANT, "r", "dump") == {"k": "x" * 900}


async def test_argument_names_and_headers_count_toward_the_limit(data_dir: Path) -> None:
    """Regression (found by fuzz/fuzz_http_body.py): the scalar fast path counted only the
    values, so a long keyword name, or a lone argument within 11 bytes of the limit, passed
    over ``value_bytes_max`` and reached the handler (which failed, ``handler_error``)."""
    config = RuntimeConfig(value_bytes_max=1000, commit_threads=2)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        await rt.call(TENANT, "r", "put", "k", 1, cls="Register")
        long_name: dict[str, Value] = {"x" * 1000: 1}
        with pytest.raises(BadRequestError, match="over the limit"):
            await rt.call(TENANT, "r", "dump", **long_name)  # type: ignore[arg-type]  # on purpose
        with pytest.raises(BadRequestError, match="1001 bytes encoded"):
            await rt.call(TENANT, "r", "dump", "x" * 995)  # [["x" * 995], {}] is 1001 bytes
        assert await rt.call(TENANT, "r", "dump") == {"k": 1}


async def test_bad_result_is_handler_error_and_discards_writes(rt: Runtime) -> None:
    with pytest.raises(HandlerError) as info:
        await rt.call(TENANT, "r", "bad_result", cls="Register")
    assert info.value.code is ErrorCode.HANDLER_ERROR
    assert await rt.call(TENANT, "r", "get", "written") is None


async def test_bad_method_and_idempotency_key_types(rt: Runtime) -> None:
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "r", "", cls="Register")
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "r", "get", "k", cls="Register", idempotency_key="")
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "r", "get", "k", cls="Register", idempotency_key="k" * 257)


async def test_store_grows_then_refuses_with_quota_exceeded(data_dir: Path) -> None:
    config = RuntimeConfig(
        map_size_bytes_initial=64 * 1024, map_size_bytes_max=256 * 1024, commit_threads=2
    )
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        written = 0
        refused: StoreFullError | None = None
        for index in range(1000):
            try:
                await rt.call(TENANT, "r", "put", f"k{index:04d}", "v" * 4000, cls="Register")
            except StoreFullError as exc:
                refused = exc
                break
            written += 1
        assert refused is not None
        assert refused.code is ErrorCode.QUOTA_EXCEEDED
        assert not refused.retryable
        assert rt.statistics().map_grows == 2
        dump = await rt.call(TENANT, "r", "dump")
        assert isinstance(dump, dict)
        assert len(dump) == written  # the refused write changed nothing
    assert written > 16


def test_every_error_class_has_its_code_and_retryable_flag() -> None:
    from facetrt._errors import ERROR_CLASSES

    retryable = {ErrorCode.OVERLOADED, ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL}
    assert set(ERROR_CLASSES) == set(ErrorCode)
    for code, cls in ERROR_CLASSES.items():
        assert issubclass(cls, FacetrtError)
        assert cls.code is code
        assert cls.retryable is (code in retryable)


async def test_list_with_a_non_utf8_prefix_is_bad_request(data_dir: Path) -> None:
    class Lister(Facet):
        @rpc
        async def probe(self) -> None:
            self.storage.list(prefix="\ud800")  # made here: arguments could not carry it

    async with open_runtime(data_dir, classes={"Lister": Lister}) as rt:
        with pytest.raises(BadRequestError, match="prefix"):
            await rt.call(TENANT, "l", "probe", cls="Lister")
