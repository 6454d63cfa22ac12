"""RuntimeCore: the shared parts every activation uses, and the entry point of every call."""

from __future__ import annotations

import collections
import itertools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import trio

from .._errors import BadRequestError, FacetrtError, NotFoundError, UnavailableError
from .._ids import FacetAddress
from .._values import Value, copy_value, scalars_size
from ._load import CommitStats
from ._mailbox import Envelope
from ._quotas import Quotas
from ._reply import ReplySlot

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import outcome

    from ..config import RuntimeConfig
    from ..storage import StoreRegistry, TimerIndex
    from ._facet import EgressGateway, Facet
    from ._router import Router
    from ._storage_bridge import StoreJobs
    from ._timer_scheduler import TimerScheduler


ADDRESS_CACHE_MAX = 65_536
# The msgpack headers of [args, kwargs] beyond the scalars: the pair, an array, a map.
_ARGUMENT_HEADERS_BYTES = 1 + 5 + 5


@dataclass(slots=True)
class Counters:
    """Monotonic counters, read through ``Runtime.statistics()``."""

    calls: int = 0
    activations: int = 0
    passivations: int = 0
    resets: int = 0
    commits: int = 0
    committed_envelopes: int = 0
    commit_seconds: float = 0.0
    commits_inline: int = 0
    commit_failures: int = 0
    map_grows: int = 0
    deactivations_cut_short: int = 0
    overloaded: int = 0
    timer_wakes: int = 0
    timers_fired: int = 0
    timer_handler_failures: int = 0
    timers_failed: int = 0
    timer_hints_removed: int = 0


# How long one tenant must have been alone in submitting before its batches commit inline.
INLINE_BATCH_QUIET_SECONDS = 1.0


def tasks_runnable_reader() -> Callable[[], int]:
    """A function counting the running trio loop's tasks that are ready to run.

    ``trio.lowlevel.current_statistics().tasks_runnable`` builds the whole statistics object,
    which also walks every I/O registration: ~3 us here with a few sockets and 30 us with 1,000
    connections waiting, paid by every commit that asks :meth:`RuntimeCore.loop_is_idle` (each
    call of a facet called one at a time). trio has no cheaper public form, so the length of
    its run queue is read directly when the private attribute is there (pinned to the public
    figure by ``tests/runtime/test_inline_commit.py``), and the public call is the fallback if
    a trio release moves it.
    """
    run_module = getattr(getattr(trio, "_core", None), "_run", None)  # no import: may move
    context = getattr(run_module, "GLOBAL_RUN_CONTEXT", None)
    runq = getattr(getattr(context, "runner", None), "runq", None)
    if isinstance(runq, collections.deque):
        return runq.__len__
    return lambda: trio.lowlevel.current_statistics().tasks_runnable


@final
class RuntimeCore:
    """Configuration, stores, writer threads and router of one runtime."""

    def __init__(
        self,
        *,
        config: RuntimeConfig,
        classes: Mapping[str, type[Facet]],
        registry: StoreRegistry,
        workers: StoreJobs,
        timer_index: TimerIndex,
        wall_clock: Callable[[], float] = time.time,
        egress: EgressGateway | None = None,
    ) -> None:
        self.config = config
        self.egress = egress
        self.classes = dict(classes)
        self.registry = registry
        self.workers = workers
        self.timer_index = timer_index
        self.timer_scheduler: TimerScheduler | None = None
        self.wall_clock = wall_clock
        self.counters = Counters()
        self.quotas = Quotas(config)
        self.commit_stats = CommitStats()
        # closing: refuse new calls from outside; stopped: the grace period is over, refuse all.
        self.closing = False
        self.stopped = False
        self.router: Router | None = None
        self._addresses: dict[tuple[str, str], FacetAddress] = {}
        # Called after an activation released a batch of replies (their callbacks ran): the
        # server sends what those callbacks queued at once, coalesced, without a task switch.
        self.after_release: list[Callable[[], None]] = []
        self.releasing = False  # inside such a batch: the hooks run once it is done
        # Fault-injection hooks may block inside a commit: keep those on the writer threads.
        self._inline_commits = config.commit_inline_when_idle and not registry.has_hooks
        self._tasks_runnable: Callable[[], int] | None = None
        # The tenant of the last message submitted, and when the one before it differed.
        self._last_tenant = ""
        self._tenant_switched_at = -math.inf

    def batch_may_commit_inline(self) -> bool:
        """Whether a commit of several messages may run on the loop thread (if it is idle).

        A batch means pipelined load, and whatever arrives during an inline fsync waits for it.
        That is the batch's own tenant's business, but not another tenant's (the noisy
        neighbour: B's p99 3.0-3.9x alone with inline batches, 1.6-2.1x without). So batches
        commit inline only while a single tenant has submitted messages for
        ``INLINE_BATCH_QUIET_SECONDS``: one tenant's pipelines keep inline commits, and once
        another tenant shows up, batches go to the writer threads (decision 0009, revised).
        """
        return trio.current_time() - self._tenant_switched_at > INLINE_BATCH_QUIET_SECONDS

    def loop_is_idle(self) -> bool:
        """Whether a commit may run on the loop thread: inline commits are enabled, no
        store job is in flight and no other task is ready to run (the caller's own task is
        not counted). Work that arrives during the fsync waits at most that long."""
        if not self._inline_commits or self.workers.jobs_in_flight:
            return False
        if self._tasks_runnable is None:  # resolved inside the run: the runner exists then
            self._tasks_runnable = tasks_runnable_reader()
        return self._tasks_runnable() == 0

    async def call(
        self,
        address: FacetAddress,
        method: str,
        args: Sequence[object],
        kwargs: Mapping[str, object],
        *,
        cls: str | None,
        idempotency_key: str | None,
        chain: tuple[FacetAddress, ...],
    ) -> Value:
        """Queue one message for ``address`` and wait for its reply.

        Cancellation abandons the call: a message not yet started is skipped; one already
        started still runs and commits (the outcome is unknown to this caller).

        Raises:
            FacetrtError: the call's outcome, with its code.
        """
        reply = self.submit(
            address, method, args, kwargs, cls=cls, idempotency_key=idempotency_key, chain=chain
        )
        return await reply.wait()

    def submit(
        self,
        address: FacetAddress,
        method: str,
        args: Sequence[object],
        kwargs: Mapping[str, object],
        *,
        cls: str | None,
        idempotency_key: str | None,
        chain: tuple[FacetAddress, ...],
        callback: Callable[[outcome.Outcome[Value]], None] | None = None,
        internal: bool = False,
        enqueued_at: float | None = None,
    ) -> ReplySlot:
        """Queue one message without waiting; never checkpoints.

        The outcome goes to ``callback`` (on the loop thread) or to whoever awaits the returned
        slot. Setting ``abandoned`` on the slot before the message starts skips it.
        ``enqueued_at`` (trio time) lets a caller submitting a batch read the clock once.

        Raises:
            FacetrtError: refused before queueing (bad input, not found, overloaded, closing).
        """
        if self.stopped or (self.closing and not chain):
            raise UnavailableError("runtime is closing")
        if type(method) is not str or not method:
            raise BadRequestError(f"method must be a non-empty str, got {method!r}")
        if cls is not None and cls not in self.classes:
            raise NotFoundError(f"unknown facet class {cls!r}")
        if idempotency_key is not None:
            self._check_idempotency_key(idempotency_key)
        call_args, call_kwargs = self._arguments(args, kwargs)
        now = trio.current_time() if enqueued_at is None else enqueued_at
        if address.tenant_id != self._last_tenant:  # see batch_may_commit_inline
            self._last_tenant = address.tenant_id
            self._tenant_switched_at = now
        bucket = None
        # Only calls from outside spend the tenant's rate: a facet's own calls were admitted
        # with the call that made them, and operators' messages are not the tenant's.
        if self.quotas.rate_limited and not chain and not internal:
            bucket = self.quotas.take_call(address.tenant_id, now)
        envelope = Envelope(
            method,
            call_args,
            call_kwargs,
            cls,
            idempotency_key,
            chain,
            ReplySlot(callback),
            now,
            internal,
        )
        self.counters.calls += 1
        try:
            self.router.submit(address, envelope)  # type: ignore[union-attr]  # set by open_runtime
        except FacetrtError:
            if bucket is not None:
                bucket.refund()  # refused: it changed nothing, so it costs nothing
            raise
        return envelope.reply

    def address_of(self, tenant: str, agent_id: str) -> FacetAddress:
        """The validated address of ``tenant/agent_id``, cached: validation is two regex
        matches, and the same few agents are called again and again.

        Raises:
            AddressError: an id breaks SPEC §2.
        """
        address = self._addresses.get((tenant, agent_id))
        if address is None:
            address = FacetAddress(tenant, agent_id)
            if len(self._addresses) >= ADDRESS_CACHE_MAX:
                self._addresses.clear()  # bounded; a refill costs one validation per id
            self._addresses[(tenant, agent_id)] = address
        return address

    def _arguments(
        self, args: Sequence[object], kwargs: Mapping[str, object]
    ) -> tuple[list[Value], dict[str, Value]]:
        """Checked arguments the handler may keep: scalars as they are, the rest deep-copied."""
        if not args and not kwargs:
            return [], {}
        bytes_max = self.config.value_bytes_max
        if all(type(key) is str for key in kwargs):
            # Keys count toward the limit too (a huge key name once passed here unchecked:
            # found by fuzz/fuzz_http_body.py), and so do the headers of [args, kwargs].
            size = scalars_size(itertools.chain(args, kwargs, kwargs.values()))
            if size is not None and size + _ARGUMENT_HEADERS_BYTES <= bytes_max:
                return list(args), dict(kwargs)  # type: ignore[arg-type]  # checked scalars
        copied = copy_value([args, kwargs], bytes_max=bytes_max, what="arguments")
        assert isinstance(copied, list)
        call_args, call_kwargs = copied
        assert isinstance(call_args, list)
        assert isinstance(call_kwargs, dict)
        return call_args, call_kwargs

    def _check_idempotency_key(self, key: object) -> None:
        limit = self.config.idempotency_key_bytes_max
        if type(key) is not str or not 0 < len(key.encode(errors="replace")) <= limit:
            raise BadRequestError(f"idempotency key must be a str of 1 to {limit} UTF-8 bytes")
