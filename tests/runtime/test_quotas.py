"""Per-tenant quotas on the embedded runtime (real LMDB): each limit refuses with its code,
is counted by reason, and leaves state unchanged; changes apply to the next call."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from facetrt import (
    NotFoundError,
    OverloadedError,
    QuotaExceededError,
    RuntimeConfig,
    TenantQuotaSettings,
    open_runtime,
)
from facetrt.data import DataOperations
from facetrt.storage import count_tenant_facets
from tests.facets import CLASSES, Gate

if TYPE_CHECKING:
    from pathlib import Path

    from facetrt import Runtime

TENANT = "acme"
KIB = 1024


def _exists(rt: Runtime, agent: str) -> bool:
    return rt.core.registry.exists(rt.core.address_of(TENANT, agent))


def _quotas(**fields: object) -> TenantQuotaSettings:
    return TenantQuotaSettings.parse(fields)


# -- facet count ---------------------------------------------------------------------------


async def test_facet_quota_refuses_the_next_facet_before_any_store_exists(rt: Runtime) -> None:
    rt.set_tenant_quotas(TENANT, _quotas(facets_max=2))
    for agent in ("a", "b"):
        assert await rt.call(TENANT, agent, "increment", cls="Counter") == 1
    with pytest.raises(QuotaExceededError) as refused:
        await rt.call(TENANT, "c", "increment", cls="Counter")
    assert refused.value.retryable is False
    assert not _exists(rt, "c")
    assert count_tenant_facets(rt.core.registry.data_dir, TENANT) == 2
    assert await rt.call(TENANT, "a", "increment") == 2  # existing facets keep working
    assert await rt.call("globex", "c", "increment", cls="Counter") == 1  # per tenant
    assert rt.statistics().refusals["facets"] == 1
    assert await rt.tenant_facet_count(TENANT) == 2

    await DataOperations(rt, system=None).delete_facet(TENANT, "a")  # makes room
    assert await rt.tenant_facet_count(TENANT) == 1
    assert await rt.call(TENANT, "c", "increment", cls="Counter") == 1
    with pytest.raises(QuotaExceededError):
        await rt.call(TENANT, "d", "increment", cls="Counter")
    rt.set_tenant_quotas(TENANT, _quotas(facets_max=3))  # raised: the next call may create
    assert await rt.call(TENANT, "d", "increment", cls="Counter") == 1


async def test_facet_count_is_read_from_disk_after_a_restart(
    data_dir: Path, config: RuntimeConfig
) -> None:
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        for agent in ("a", "b", "c"):
            await rt.call(TENANT, agent, "increment", cls="Counter")
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        rt.set_tenant_quotas(TENANT, _quotas(facets_max=3))
        with pytest.raises(QuotaExceededError):
            await rt.call(TENANT, "d", "increment", cls="Counter")
        assert await rt.call(TENANT, "c", "increment", cls="Counter") == 2
        assert await rt.tenant_facet_count(TENANT) == 3
        assert not _exists(rt, "d")


async def test_facets_created_together_never_pass_the_quota(rt: Runtime) -> None:
    """Ten new facets at once against a quota of four: exactly four are created."""
    rt.set_tenant_quotas(TENANT, _quotas(facets_max=4))
    created: list[str] = []
    refused: list[str] = []

    async def create(agent: str) -> None:
        try:
            await rt.call(TENANT, agent, "increment", cls="Counter")
            created.append(agent)
        except QuotaExceededError:
            refused.append(agent)

    async with trio.open_nursery() as nursery:
        for index in range(10):
            nursery.start_soon(create, f"n{index}")
    assert (len(created), len(refused)) == (4, 6)
    assert sorted(a for a in created + refused if _exists(rt, a)) == sorted(created)
    assert count_tenant_facets(rt.core.registry.data_dir, TENANT) == 4


async def test_operator_copies_are_not_refused_but_count(rt: Runtime) -> None:
    rt.set_tenant_quotas(TENANT, _quotas(facets_max=1))
    await rt.call(TENANT, "a", "increment", cls="Counter")
    await DataOperations(rt, system=None).clone(TENANT, "a", TENANT, "b", force=False)
    assert await rt.tenant_facet_count(TENANT) == 2
    assert await rt.call(TENANT, "b", "increment") == 2
    with pytest.raises(QuotaExceededError):
        await rt.call(TENANT, "c", "increment", cls="Counter")


# -- bytes per facet -------------------------------------------------------------------------


async def test_bytes_quota_refuses_a_write_that_would_grow_past_it(data_dir: Path) -> None:
    config = RuntimeConfig(map_size_bytes_initial=64 * KIB, commit_threads=2)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        rt.set_tenant_quotas(TENANT, _quotas(facet_bytes_max=64 * KIB))
        await rt.call(TENANT, "r", "put", "small", 1, cls="Register")
        with pytest.raises(QuotaExceededError):
            await rt.call(TENANT, "r", "put", "big", "v" * 100_000)
        assert await rt.call(TENANT, "r", "get", "big") is None  # nothing written
        assert await rt.call(TENANT, "r", "get", "small") == 1
        assert rt.statistics().refusals["facet_bytes"] == 1
        assert (await rt.inspect(TENANT, "r"))["map_size_bytes_max"] == 64 * KIB

        rt.set_tenant_quotas(TENANT, _quotas(facet_bytes_max=1024 * KIB))  # no restart
        await rt.call(TENANT, "r", "put", "big", "v" * 100_000)
        assert await rt.call(TENANT, "r", "get", "big") == "v" * 100_000
        grown = (await rt.inspect(TENANT, "r"))["map_size_bytes"]
        assert isinstance(grown, int)
        assert grown > 64 * KIB

        # Lowered below the store's size: the store keeps its data (grandfathered) but
        # cannot grow any further.
        rt.set_tenant_quotas(TENANT, _quotas(facet_bytes_max=64 * KIB))
        with pytest.raises(QuotaExceededError):
            await rt.call(TENANT, "r", "put", "bigger", "w" * 400_000)
        assert await rt.call(TENANT, "r", "get", "big") == "v" * 100_000
        assert await rt.call(TENANT, "r", "get", "bigger") is None


# -- call rate -------------------------------------------------------------------------------


async def test_rate_quota_token_bucket_refills_with_trio_time(
    rt: Runtime, mock_clock: trio.testing.MockClock
) -> None:
    """trio's clock moves only when the test jumps it (an autojump clock would also skip
    ahead to the next idle timeout while a commit waits for a writer thread), so the bucket
    sees exactly the time the test lets pass."""
    await rt.call(TENANT, "c", "increment", cls="Counter")
    await rt.call("globex", "c", "increment", cls="Counter")
    rt.set_tenant_quotas(TENANT, _quotas(calls_per_second=2, calls_burst=3))
    for _ in range(3):
        assert await rt.call(TENANT, "c", "get") == 1
    with pytest.raises(QuotaExceededError) as refused:
        await rt.call(TENANT, "c", "get")
    assert refused.value.retryable is False  # SPEC §4: rate quota is quota_exceeded
    assert await rt.call("globex", "c", "get") == 1  # other tenants unaffected

    mock_clock.jump(0.5)  # one token back
    assert await rt.call(TENANT, "c", "get") == 1
    with pytest.raises(QuotaExceededError):
        await rt.call(TENANT, "c", "get")
    mock_clock.jump(10)  # refilled to the burst, not beyond
    for _ in range(3):
        await rt.call(TENANT, "c", "increment")  # writes spend tokens like reads
    with pytest.raises(QuotaExceededError):
        await rt.call(TENANT, "c", "get")
    assert rt.statistics().refusals["rate"] == 3

    rt.set_tenant_quotas(TENANT, None)  # back to the node default: no rate limit
    for _ in range(20):
        await rt.call(TENANT, "c", "get")
    assert rt.statistics().refusals["rate"] == 3


async def test_default_rate_applies_to_every_tenant_and_refused_calls_cost_nothing(
    data_dir: Path, mock_clock: trio.testing.MockClock
) -> None:
    config = RuntimeConfig(tenant_calls_per_second=1, commit_threads=2)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        assert rt.tenant_quotas(TENANT).calls_burst == 1  # one second's worth
        await rt.call(TENANT, "c", "increment", cls="Counter")
        with pytest.raises(QuotaExceededError):
            await rt.call(TENANT, "c", "get")
        mock_clock.jump(1)
        # A call refused after it took its token (here: no such facet) gives it back.
        with pytest.raises(NotFoundError):
            await rt.call(TENANT, "nobody", "get")
        assert await rt.call(TENANT, "c", "get") == 1
        # Facet-to-facet calls were admitted with the call that made them.
        mock_clock.jump(1)
        await rt.call(TENANT, "r", "put", "k", 1, cls="Register")
        mock_clock.jump(1)
        assert await rt.call(TENANT, "r2", "call", "r", "get", ["k"], None, cls="Register") == 1


# -- mailbox length --------------------------------------------------------------------------


async def test_mailbox_quota_sheds_a_burst_instead_of_queueing(rt: Runtime) -> None:
    rt.set_tenant_quotas(TENANT, _quotas(mailbox_envelopes_max=3))
    Gate.events["q"] = trio.Event()
    outcomes: dict[int, object] = {}

    async def put(index: int) -> None:
        try:
            outcomes[index] = await rt.call(TENANT, "q", "put", f"k{index}", index)
        except OverloadedError as exc:
            outcomes[index] = exc

    await rt.call(TENANT, "q", "put", "open", True, cls="Gate")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: rt.call(TENANT, "q", "wait_and_put", "w", 0))
        await trio.testing.wait_all_tasks_blocked()
        for index in range(10):
            nursery.start_soon(put, index)
        await trio.testing.wait_all_tasks_blocked()
        assert rt.statistics().queued_envelopes == 3
        assert sum(isinstance(o, OverloadedError) for o in outcomes.values()) == 7
        assert rt.statistics().mailboxes_full == 1
        Gate.events["q"].set()
    assert rt.statistics().refusals["mailbox"] == 7
    accepted = sorted(i for i, o in outcomes.items() if not isinstance(o, OverloadedError))
    assert len(accepted) == 3
    for index in range(10):
        expected = index if index in accepted else None  # shed calls wrote nothing
        assert await rt.call(TENANT, "q", "get", f"k{index}") == expected


async def test_lowered_mailbox_quota_applies_to_an_open_mailbox(rt: Runtime) -> None:
    Gate.events["l"] = trio.Event()
    await rt.call(TENANT, "l", "put", "open", True, cls="Gate")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: rt.call(TENANT, "l", "wait_and_put", "w", 0))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lambda: rt.call(TENANT, "l", "put", "queued", 1))
        await trio.testing.wait_all_tasks_blocked()
        rt.set_tenant_quotas(TENANT, _quotas(mailbox_envelopes_max=1))
        assert (await rt.inspect(TENANT, "l"))["mailbox_depth_max"] == 1
        with pytest.raises(OverloadedError):
            await rt.call(TENANT, "l", "put", "shed", 2)
        Gate.events["l"].set()
    assert await rt.call(TENANT, "l", "get", "queued") == 1
    assert await rt.call(TENANT, "l", "get", "shed") is None


def test_quota_settings_are_validated() -> None:
    assert _quotas(facets_max=5, calls_per_second=None).overrides() == {"facets_max": 5}
    for bad in ({"facets_max": 0}, {"nope": 1}, {"facet_bytes_max": 10}, {"mailbox": "x"}):
        with pytest.raises(Exception, match="invalid quotas"):
            TenantQuotaSettings.parse(bad)
