"""Per-tenant quotas: facet count, bytes per facet, mailbox length and call rate.

A tenant's quotas are the node defaults (:class:`RuntimeConfig`) overridden field by field by
the operator (:class:`TenantQuotaSettings`, which the daemon keeps in the system store and
hands to :meth:`Quotas.set_overrides`). Changes apply to the next call; nothing restarts.

What each quota costs, and where it is checked (decision 0010):

- **rate**: one token bucket per rate-limited tenant, refilled lazily from the arrival time
  the call already carries: a dict lookup and a few float operations per call from outside,
  no task and no timer. Refused with ``quota_exceeded`` (SPEC §4: the rate quota).
- **mailbox length**: the bound is set on a facet's mailbox when its slot is made, and
  updated in place when the operator changes it, so the call path pays nothing for it.
- **facet count**: checked only when an activation is about to create a store, never per
  call. A tenant's count is read from disk once per process (a scan on a writer thread, the
  first time one of its facets is created) and then kept by the creations and deletions.
  Refused with ``quota_exceeded`` before any store exists.
- **bytes per facet**: the LMDB map size maximum of the tenant's stores, read when a store
  opens and whenever it needs to grow; a full store refuses its batch with ``quota_exceeded``.
- **calls in flight**: one :class:`InFlight` counter per tenant, node-wide, kept by the
  surfaces (a TCP connection counts a call from dispatch to reply, the HTTP gateway per
  request). At the bound a tenant's connections are simply not read until replies go out:
  backpressure, not refusal, since a refused call still costs the loop a decode and a reply
  while a call left unread costs nothing. The one event loop's rounds then hold at most that
  many of the tenant's calls, which is what keeps other tenants' latency (the noisy
  neighbour, docs/reliability.md section 6).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

import trio

from .._errors import QuotaExceededError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..config import RuntimeConfig, TenantQuotaSettings

# The closed set of reasons a call is refused for (metric label values).
REFUSAL_REASONS: Final = ("facets", "facet_bytes", "mailbox", "mailbox_age", "rate")
# Buckets are made lazily per calling tenant; an embedding application may use any number of
# tenant ids, so the table is bounded. Clearing it only refills the buckets (generous once).
BUCKETS_MAX: Final = 65_536


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantQuotas:
    """The quotas in force for one tenant (node defaults with its overrides applied).

    Attributes:
        facets_max: facets the tenant may have on this node.
        facet_bytes_max: LMDB map size each of its stores may grow to.
        mailbox_envelopes_max: messages queued per facet before ``overloaded``.
        calls_per_second: sustained calls per second from outside; None: no rate limit.
        calls_burst: calls at once above the rate (None when there is no rate limit).
        calls_in_flight_max: calls in flight from outside at once; None: no tenant bound.
    """

    facets_max: int
    facet_bytes_max: int
    mailbox_envelopes_max: int
    calls_per_second: float | None
    calls_burst: int | None
    calls_in_flight_max: int | None


@final
class InFlight:
    """Calls of one tenant in flight from outside, node-wide, and their bound.

    Every tenant has one from its first call on, bounded or not (``sys.maxsize``): a
    connection counts on the object it got at its handshake, so the bound can change under
    it without a call taken on one object being given back to another.
    """

    __slots__ = ("_lot", "bound", "count", "waiting")

    def __init__(self, bound: int | None) -> None:
        self.bound = sys.maxsize if bound is None else bound
        self.count = 0
        self.waiting = 0  # tasks in wait_for_room: give() wakes them only then
        self._lot = trio.lowlevel.ParkingLot()

    def give(self) -> None:
        """One call answered."""
        self.count -= 1
        if self.waiting:
            self._lot.unpark_all()

    def give_waiters(self) -> None:
        """Wake the waiters (after ``count`` went down without :meth:`give`)."""
        self._lot.unpark_all()

    def set_bound(self, bound: int | None) -> None:
        self.bound = sys.maxsize if bound is None else bound
        if self.waiting:
            self._lot.unpark_all()

    async def wait_for_room(self) -> None:
        """Return once a call was answered or the bound changed (callers check again)."""
        self.waiting += 1
        try:
            await self._lot.park()
        finally:
            self.waiting -= 1


@final
class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second of trio time; one per call."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = -math.inf  # the first take finds it full

    def take(self, now: float) -> bool:
        """Take one token at trio time ``now``; False (and nothing taken) when empty."""
        # Arrival times of one read batch may be a little older than the last update: never
        # refill backwards.
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def refund(self) -> None:
        """Give back the token of a call refused after it was taken (it changed nothing)."""
        self.tokens = min(self.burst, self.tokens + 1.0)


@final
class Quotas:
    """Effective quotas, rate buckets, facet counts and refusal counters of one runtime.

    Lives on the loop thread: every method is synchronous except :meth:`reserve_facet`.
    """

    def __init__(self, config: RuntimeConfig) -> None:
        self._config = config
        self._overrides: dict[str, TenantQuotaSettings] = {}
        self._defaults = self._resolve(None)
        # tenant -> its bucket, or None when it has no rate limit (cached, so that tenants
        # without one cost one lookup per call too).
        self._buckets: dict[str, TokenBucket | None] = {}
        # Whether any tenant may have a rate limit: the call path skips everything if not.
        self.rate_limited = config.tenant_calls_per_second is not None
        # tenant -> facets on disk (and being created); absent: not counted yet.
        self._facet_counts: dict[str, int] = {}
        # Bumped by a creation or deletion while a tenant is not counted: a scan that ran
        # meanwhile may have missed it, so its result is discarded and the scan repeated.
        self._count_epochs: dict[str, int] = {}
        self.refusals: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        # tenant -> its calls in flight; kept (never replaced) once made, see InFlight.
        self._in_flight: dict[str, InFlight] = {}

    # -- settings ------------------------------------------------------------------------

    def effective(self, tenant: str) -> TenantQuotas:
        """The quotas in force for ``tenant``."""
        settings = self._overrides.get(tenant)
        return self._defaults if settings is None else self._resolve(settings)

    def overrides(self, tenant: str) -> TenantQuotaSettings | None:
        """The operator's overrides of ``tenant`` (None: node defaults only)."""
        return self._overrides.get(tenant)

    def set_overrides(self, tenant: str, settings: TenantQuotaSettings | None) -> TenantQuotas:
        """Replace ``tenant``'s overrides (None or empty: node defaults); return the result.

        The rate applies from the next call (a bucket keeps its tokens, capped at the new
        burst); the caller updates the bounds of open mailboxes.
        """
        if settings is None or not settings.overrides():
            self._overrides.pop(tenant, None)
        else:
            self._overrides[tenant] = settings
        quotas = self.effective(tenant)
        old = self._buckets.pop(tenant, None)
        if quotas.calls_per_second is not None:
            assert quotas.calls_burst is not None
            bucket = TokenBucket(quotas.calls_per_second, quotas.calls_burst)
            if old is not None:
                bucket.tokens = min(bucket.burst, old.tokens)
                bucket.updated = old.updated
            self._buckets[tenant] = bucket
        self.rate_limited = self._config.tenant_calls_per_second is not None or any(
            settings.calls_per_second is not None for settings in self._overrides.values()
        )
        flight = self._in_flight.get(tenant)
        if flight is not None:
            flight.set_bound(quotas.calls_in_flight_max)
        return quotas

    def in_flight(self, tenant: str) -> InFlight:
        """``tenant``'s calls in flight from outside (made on first use, then kept)."""
        flight = self._in_flight.get(tenant)
        if flight is None:
            flight = InFlight(self.effective(tenant).calls_in_flight_max)
            self._in_flight[tenant] = flight
        return flight

    def forget_tenant(self, tenant: str) -> None:
        """Drop everything known about a deleted tenant (a new one of that name starts fresh)."""
        self.set_overrides(tenant, None)
        self._buckets.pop(tenant, None)
        self._in_flight.pop(tenant, None)  # its connections (revoked) keep their own object
        self._forget_count(tenant)

    def _resolve(self, settings: TenantQuotaSettings | None) -> TenantQuotas:
        """Each field: the tenant's override if set, else the node default."""
        config = self._config
        facets = settings.facets_max if settings else None
        facet_bytes = settings.facet_bytes_max if settings else None
        mailbox = settings.mailbox_envelopes_max if settings else None
        rate = settings.calls_per_second if settings else None
        burst = settings.calls_burst if settings else None
        flight = settings.calls_in_flight_max if settings else None
        rate = config.tenant_calls_per_second if rate is None else rate
        burst = config.tenant_calls_burst if burst is None else burst
        if rate is None:
            burst = None
        elif burst is None:
            burst = max(1, math.ceil(rate))  # one second's worth
        return TenantQuotas(
            facets_max=config.tenant_facets_max if facets is None else facets,
            facet_bytes_max=config.map_size_bytes_max if facet_bytes is None else facet_bytes,
            mailbox_envelopes_max=config.mailbox_envelopes_max if mailbox is None else mailbox,
            calls_per_second=rate,
            calls_burst=burst,
            calls_in_flight_max=config.tenant_calls_in_flight_max if flight is None else flight,
        )

    # -- rate (the call path) --------------------------------------------------------------

    def take_call(self, tenant: str, now: float) -> TokenBucket | None:
        """Take a token of ``tenant``'s bucket for a call arriving at trio time ``now``.

        Returns:
            The bucket (to refund if the call is refused later), or None: no rate limit.

        Raises:
            QuotaExceededError: the bucket is empty (counted): SPEC §4 puts the rate quota
                under ``quota_exceeded``, which is not retryable.
        """
        try:
            bucket = self._buckets[tenant]
        except KeyError:
            bucket = self._new_bucket(tenant)
        if bucket is None:
            return None
        # TokenBucket.take, inlined: this runs for every call of a rate-limited tenant.
        if now > bucket.updated:
            tokens = bucket.tokens + (now - bucket.updated) * bucket.rate
            bucket.tokens = tokens if tokens < bucket.burst else bucket.burst
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return bucket
        self.refusals["rate"] += 1
        raise QuotaExceededError(
            f"tenant {tenant!r} is over its rate quota of {bucket.rate:g} calls/s "
            f"(burst {bucket.burst:g})"
        )

    def _new_bucket(self, tenant: str) -> TokenBucket | None:
        if len(self._buckets) >= BUCKETS_MAX:
            self._buckets.clear()
        quotas = self.effective(tenant)
        bucket = None
        if quotas.calls_per_second is not None:
            assert quotas.calls_burst is not None
            bucket = TokenBucket(quotas.calls_per_second, quotas.calls_burst)
        self._buckets[tenant] = bucket
        return bucket

    # -- facet count -----------------------------------------------------------------------

    def facet_count(self, tenant: str) -> int | None:
        """Facets of ``tenant`` (on disk or being created); None until first counted."""
        return self._facet_counts.get(tenant)

    async def count_facets(self, tenant: str, scan: Callable[[], Awaitable[int]]) -> int:
        """``tenant``'s facet count, scanning its directory (``scan``) if not known yet."""
        while (known := self._facet_counts.get(tenant)) is None:
            epoch = self._count_epochs.get(tenant, 0)
            counted = await scan()
            if tenant not in self._facet_counts and self._count_epochs.get(tenant, 0) == epoch:
                self._facet_counts[tenant] = counted
        return known

    async def reserve_facet(self, tenant: str, scan: Callable[[], Awaitable[int]]) -> None:
        """Count one more facet of ``tenant`` before its store is created.

        No await separates the check from the increment, so activations creating facets
        together cannot pass the limit. Undo with :meth:`facet_removed` if no store results.

        Raises:
            QuotaExceededError: the tenant has ``facets_max`` facets (counted).
        """
        current = await self.count_facets(tenant, scan)
        limit = self.effective(tenant).facets_max
        if current >= limit:
            self.refusals["facets"] += 1
            raise QuotaExceededError(
                f"tenant {tenant!r} has {current} facets, its quota is {limit}; delete some "
                "or ask the operator for more"
            )
        self._facet_counts[tenant] = current + 1

    def facet_created(self, tenant: str) -> None:
        """A store of ``tenant`` appeared outside an activation (an import, clone, restore)."""
        if tenant in self._facet_counts:
            self._facet_counts[tenant] += 1
        else:
            self._count_epochs[tenant] = self._count_epochs.get(tenant, 0) + 1

    def facet_removed(self, tenant: str) -> None:
        """A store of ``tenant`` is gone (deleted, or its creation failed)."""
        if tenant in self._facet_counts:
            self._facet_counts[tenant] = max(0, self._facet_counts[tenant] - 1)
        else:
            self._count_epochs[tenant] = self._count_epochs.get(tenant, 0) + 1

    def _forget_count(self, tenant: str) -> None:
        self._facet_counts.pop(tenant, None)
        self._count_epochs[tenant] = self._count_epochs.get(tenant, 0) + 1

    # -- refusals --------------------------------------------------------------------------

    def refused(self, reason: str) -> None:
        """Count a refusal for ``reason`` (one of :data:`REFUSAL_REASONS`)."""
        self.refusals[reason] += 1
