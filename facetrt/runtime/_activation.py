"""Activation: the running actor of one facet, with its turn loop and its group commit.

Turn loop (input gate). One task takes envelopes from the facet's mailbox and runs their
handlers one at a time, to completion, including across the handlers' awaits. All queued
envelopes are handled per wake-up; the loop parks only when the mailbox is empty.

Group commit (output gate). A finished message's write layer is absorbed into the accumulated
layer and its outcome queued. When the wake's last queued message finished (or a handler
suspends, or ``batch_envelopes_max`` messages ran) and no commit is running, the accumulated
layer becomes the in-flight layer and is committed in one LMDB transaction, by a writer thread
or inline when the loop is idle (decisions 0009, 0018); messages finished meanwhile accumulate
for the next commit. Commit completion runs as a callback on the loop thread: it releases every
reply of the batch (none before fsync returned) and starts the next commit. So commits overlap
the handlers of the next wake, a handler that awaits something slow never holds back the
replies of messages finished before it, and under load one fsync covers a whole wake.

Failure. A failed commit answers every message of its batch, and of the accumulated batch that
read its writes, with ``internal`` (``quota_exceeded`` when the store cannot grow), cancels the
turn loop (the running message fails too) and stops the activation: its writes were never
durable, so the next activation starts from disk. Queued envelopes stay in the mailbox for it.

Timers. A wake envelope from the timer scheduler runs each due timer as a message of its own
(``on_timer``; its writes and the timer's removal or retry are one all-or-nothing unit). A facet
that touched no timer in this activation has no timer state and its commits are the plain ones;
otherwise :meth:`TimerState.plan` decides what the node's timer index needs around each commit.

Lifecycle: STARTING -> RUNNING -> DRAINING -> STOPPED, each transition in one place.

Pins (operators' snapshots, decision 0008). A data operation may *pin* a starting or running
activation to read its open store from a writer thread (LMDB's compacting copy) while the
facet keeps serving. While pinned the store is neither closed (``_close`` waits for the last
pin) nor remapped (a full map's regrow waits for the last pin: ``mdb_env_set_mapsize`` under
another thread's read transaction would pull the map from under it).
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
import types
from functools import partial
from typing import TYPE_CHECKING, final

import msgpack
import outcome
import trio

from .._errors import (
    BadRequestError,
    ConflictError,
    FacetrtError,
    HandlerError,
    InternalError,
    NotFoundError,
    PolicyViolationError,
    ReentrancyError,
    StorageError,
    StoreFullError,
    UnavailableError,
)
from .._values import Value, decode_value, encode_value, is_small_scalar
from ..storage import IDEM_DB, META_DB, TIMERS_DB
from ._facet import Facet, instantiate
from ._layers import MISSING, Layer, lookup_system
from ._load import describe_recent, recent_commits
from ._storage_api import Storage
from ._timer_record import TimerRecord, wall_ms
from ._timer_scheduler import FIRE_TIMERS
from ._timer_state import HintPlan, HintResult, TimerState, commit_with_hints
from ._timers_api import Timers

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Generator

    from .._fetch import FetchRequest, FetchResponse
    from .._ids import FacetAddress
    from ..storage import FacetStore
    from ._core import RuntimeCore
    from ._mailbox import Envelope, Mailbox
    from ._reply import ReplySlot
    from ._supervisor import Supervisor

logger = logging.getLogger(__name__)

_Outcomes = list[tuple["Envelope", outcome.Outcome[Value]]]
FAILED_TIMER_NAMES_SHOWN = 20  # failed timer names listed by inspect (the count is exact)


class ActivationState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@final
class Activation:
    """The live actor of one facet; created and started by the router."""

    def __init__(
        self,
        *,
        address: FacetAddress,
        mailbox: Mailbox,
        core: RuntimeCore,
        supervisor: Supervisor,
    ) -> None:
        self.address = address
        self.mailbox = mailbox
        self.state = ActivationState.STARTING
        self._core = core
        self._config = core.config
        self._supervisor = supervisor
        self._store: FacetStore | None = None
        self._storage: Storage | None = None
        self._facet: Facet | None = None
        self._bound_class: str | None = None
        # [in-flight layer,] accumulated layer: the accumulated one is always last.
        self._pending: list[Layer] = [Layer()]
        self._accumulated: _Outcomes = []
        self._commit_running = False
        self._commit_started = 0.0
        self._commit_soon = False  # a commit is scheduled for a suspended handler's earlier work
        self._token = trio.lowlevel.current_trio_token()
        self._completed_seq = 0
        self._durable_seq = 0
        self._durable_lot = trio.lowlevel.ParkingLot()
        self._current: Envelope | None = None
        self._failure: FacetrtError | None = None
        self._scope = trio.CancelScope()
        self._stop_requested = False
        self._evicted = False
        self._timer_state: TimerState | None = None  # loaded when a timer is first touched
        self._pins = 0
        self._grow_deferred: Callable[[], None] | None = None
        # Woken when the state leaves STARTING and when the last pin goes: rare events only.
        self._maintenance_lot = trio.lowlevel.ParkingLot()
        # This activation counted a new facet against the tenant's quota and has not yet
        # created its store: undone if it stops before it does.
        self._reserved = False
        self._recent = recent_commits()
        self._run: tuple[Envelope | None, str] | None = None  # (message, its run id) for fetch
        # The facet call the current message awaits (FacetCalls), for wait cycles.
        self._waiting: tuple[FacetAddress, ReplySlot] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def request_stop(self, *, evicted: bool = False) -> None:
        """Ask the activation to passivate once its mailbox is empty."""
        self._stop_requested = True
        self._evicted = self._evicted or evicted
        self.mailbox.wake()

    def _is_stop_requested(self) -> bool:
        return self._stop_requested

    def cancel(self) -> None:
        """Stop at the next checkpoint (shutdown past its grace period)."""
        self._scope.cancel()

    @property
    def bound_class(self) -> str | None:
        return self._bound_class

    # -- pins (data operations) ----------------------------------------------------------

    def pin(self) -> None:
        """Keep the store open and its map size fixed until :meth:`unpin`; never checkpoints."""
        assert self.state in (ActivationState.STARTING, ActivationState.RUNNING), self.state
        self._pins += 1

    def unpin(self) -> None:
        assert self._pins > 0
        self._pins -= 1
        if self._pins:
            return
        self._maintenance_lot.unpark_all()
        if self._grow_deferred is not None:
            deferred, self._grow_deferred = self._grow_deferred, None
            deferred()

    async def wait_open(self) -> FacetStore | None:
        """The open store once the activation runs; None if it stopped before opening one.

        Call with a pin held (so that the store stays open once returned).
        """
        await trio.lowlevel.checkpoint()
        while self.state is ActivationState.STARTING:
            await self._maintenance_lot.park()
        return self._store if self.state is ActivationState.RUNNING else None

    async def run(self) -> None:
        """The activation task: open, serve the mailbox, passivate. Never raises FacetrtError."""
        try:
            await self._reserve_new_facet()
            await self._supervisor.acquire()
        except FacetrtError as exc:
            self._fail_mailbox(exc)
            self._unreserve()
            self.state = ActivationState.STOPPED
            self._maintenance_lot.unpark_all()
            return
        try:
            try:
                await self._open()
            except FacetrtError as exc:
                # Retrying would fail the same way: answer everything queued, then stop.
                self._fail_mailbox(exc)
                return
            with self._scope:
                await self._serve()
        except StorageError as exc:
            logger.error("a facet store failed while reading; resetting the facet: %s", exc)
            self._core.counters.resets += 1
            self._failure = InternalError(f"storage failed; the facet was reset: {exc}")
        finally:
            self.state = ActivationState.DRAINING
            self._maintenance_lot.unpark_all()
            self._supervisor.mark_busy(self)
            # Shielded without a deadline on purpose: what remains after the time-bounded
            # on_deactivate are writer-thread jobs (a commit, the close), which cannot be
            # abandoned and are bounded by the disk; leaving early would leak an open store.
            with trio.CancelScope(shield=True):
                await self._close()
            self._unreserve()
            self.state = ActivationState.STOPPED
            self._supervisor.release(evicted=self._evicted)
            self._core.counters.passivations += 1

    async def _reserve_new_facet(self) -> None:
        """Count the facet against its tenant's quota if this activation would create it.

        Checked here, where stores are created, and not per call: an existing facet costs
        one ``stat``. Before the open permit, so a refused facet evicts nobody.

        Raises:
            QuotaExceededError: the tenant has all the facets its quota allows.
        """
        core = self._core
        if core.registry.exists(self.address):
            await trio.lowlevel.checkpoint()
            return
        tenant = self.address.tenant_id
        registry, workers = core.registry, core.workers
        scan = partial(workers.call, partial(registry.count_facets, tenant))
        await core.quotas.reserve_facet(tenant, scan)
        self._reserved = True

    def _unreserve(self) -> None:
        """Give back the quota of a facet this activation counted but did not create."""
        if self._reserved:
            self._reserved = False
            if not self._core.registry.exists(self.address):
                self._core.quotas.facet_removed(self.address.tenant_id)

    async def _open(self) -> None:
        assert self.state is ActivationState.STARTING
        registry = self._core.registry
        bytes_max = self._core.quotas.effective(self.address.tenant_id).facet_bytes_max
        self._store = await self._core.workers.call(
            partial(registry.open, self.address, map_size_bytes_max=bytes_max)
        )
        self._reserved = False  # the store exists now: the facet stays counted
        self._storage = Storage(
            self._store, self._pending, value_bytes_max=self._config.value_bytes_max
        )
        raw = self._store.get(b"class", META_DB)
        self._bound_class = None if raw is None else str(decode_value(raw))
        self._purge_expired_idempotency_records()
        if self._store.count(TIMERS_DB):
            # Re-register the hint with the first commit: a store that arrived without one
            # (restored, cloned, imported) must not keep its timers asleep.
            self._timers().resync = True
        self._core.counters.activations += 1
        self.state = ActivationState.RUNNING
        self._maintenance_lot.unpark_all()

    async def _serve(self) -> None:
        handled = 0
        queue = self.mailbox.items  # the hot loop pops and tests it without Python calls
        while True:
            envelope = queue.popleft() if queue else None
            if envelope is not None:
                # The message itself, inline rather than a method: one coroutine less each.
                if not envelope.reply.abandoned:  # abandoned before it started: apply nothing
                    self._current = envelope
                    result = await self._run_message(envelope)
                    self._current = None
                    self._completed_seq += 1
                    self._accumulated.append((envelope, result))
                handled += 1
                if handled >= self._config.batch_envelopes_max:
                    handled = 0
                    self._start_commit()  # no-op while one runs: its completion starts it
                    await trio.lowlevel.checkpoint()  # let other facets and callers run
                continue
            handled = 0
            if self._accumulated and not self._commit_running:
                # The mailbox is empty: commit everything this wake finished, at once (its
                # last envelope may have been skipped, abandoned). Not after each message
                # (decision 0018, revising 0003): the next queued one would find that commit
                # running and wait for the one after it, one fsync for a single message. A
                # handler that suspends starts the commit of what finished before it
                # (_run_handler); while a commit runs, its completion starts the next.
                self._start_commit()
            if self._stop_requested:
                return
            # Idle even with a commit in flight (eviction waits for it before closing), but the
            # idle timeout counts only once the last commit is done: its completion wakes this
            # wait, and the next round marks the activation idle again, timed. The supervisor's
            # sweeper asks for a stop once idle_timeout_seconds have passed.
            self._supervisor.mark_idle(self, committing=self._commit_running)
            if self._is_stop_requested():  # mark_idle may have evicted this activation
                continue  # passivate instead of parking
            await self.mailbox.wait_nonempty()
            self._supervisor.mark_busy(self)

    async def _close(self) -> None:
        """Finish: fail what cannot run, run ``on_deactivate``, flush, close the store."""
        if self._current is not None and not self._current.reply.is_set:
            error = self._failure or UnavailableError("facet stopped while handling the message")
            self._current.reply.set(outcome.Error(error))
            self._current = None
        if self._storage is not None:
            self._storage.end_message()
        if self._failure is None and self._facet is not None and not self._scope.cancel_called:
            await self._deactivate(self._facet)
        if self._failure is None:
            self._start_commit()
        await self._wait_commit_idle()
        if self._accumulated:
            # Only after a failure: these read writes that were never made durable.
            failed, self._accumulated = self._accumulated, []
            error = self._failure or UnavailableError("facet stopped before commit")
            for envelope, _ in failed:
                envelope.reply.set(outcome.Error(error))
        while self._pins:  # a snapshot still reads the store (bounded by the disk)
            await self._maintenance_lot.park()
        if self._store is not None:
            store, self._store = self._store, None
            await self._core.workers.call(partial(self._core.registry.close, store, self.address))

    async def _deactivate(self, facet: Facet) -> None:
        """Run ``on_deactivate``, bounded in time; a failure or overrun is logged and counted."""
        with trio.move_on_after(self._config.deactivate_seconds_max) as limit:
            try:
                await self._run_hook(facet.on_deactivate)
            except FacetrtError as exc:
                logger.warning("on_deactivate of a facet failed: %s", exc.message)
        if limit.cancelled_caught:
            self._core.counters.deactivations_cut_short += 1

    def _fail_mailbox(self, error: FacetrtError) -> None:
        while (envelope := self.mailbox.get_nowait()) is not None:
            envelope.reply.set(outcome.Error(error))

    # -- messages ------------------------------------------------------------------------

    async def _run_message(self, envelope: Envelope) -> outcome.Outcome[Value]:
        storage = self._storage
        assert storage is not None
        if envelope.internal:
            if envelope.method == FIRE_TIMERS:
                return await self._fire_timers(envelope)
            return outcome.Value(self.inspect())
        try:
            facet = self._facet
            if facet is None or (envelope.cls is not None and envelope.cls != self._bound_class):
                facet = await self._facet_for(envelope)  # bind, activate or refuse
            if envelope.method not in facet.rpc_methods:
                raise NotFoundError(
                    f"class {self._bound_class!r} has no rpc method {envelope.method!r}"
                )
            key = envelope.idempotency_key
            if key is not None:
                stored = self._stored_result(key, envelope.method)
                if stored is not MISSING:
                    return outcome.Value(stored)  # type: ignore[arg-type]  # MISSING excluded
            layer = storage.begin_message()
            try:
                handler = getattr(facet, envelope.method)
                try:
                    coroutine = handler(*envelope.args, **envelope.kwargs)
                except TypeError as exc:
                    raise BadRequestError(f"bad arguments for {envelope.method!r}: {exc}") from None
                if not self._accumulated or self._commit_running:
                    value = await coroutine
                else:  # _run_handler, inlined: this is every message of a wake but its first
                    try:
                        trap = coroutine.send(None)
                    except StopIteration as finished:
                        value = finished.value
                    else:
                        self._commit_when_suspended()  # let earlier messages commit first
                        value = await _resume(coroutine, trap)
                if key is None and is_small_scalar(value, self._config.value_bytes_max):
                    encoded = None  # an immutable scalar: no copy needed
                else:
                    encoded = _encode_result(value, self._config.value_bytes_max)
                    if key is not None:
                        self._store_result(layer, key, envelope.method, encoded)
            finally:
                storage.end_message()
        except StorageError:
            raise  # a failing store is not the handler's fault: reset the facet
        except FacetrtError as exc:
            return outcome.Error(exc)
        except Exception as exc:  # noqa: BLE001 - the facet's own bug becomes handler_error
            return outcome.Error(
                HandlerError(f"{type(exc).__name__}: {exc}", type_name=type(exc).__name__)
            )
        self._pending[-1].absorb(layer)
        return outcome.Value(value if encoded is None else decode_value(encoded))

    async def _run_handler(self, coroutine: Coroutine[object, object, Value]) -> Value:
        """Await the handler's coroutine; if it suspends while finished messages wait for
        their commit, start that commit first, so that a handler awaiting something slow
        never holds back the replies of messages finished before it."""
        if not self._accumulated or self._commit_running:
            return await coroutine
        try:
            trap = coroutine.send(None)  # its first step, up to its first suspension
        except StopIteration as finished:
            value: Value = finished.value
            return value
        self._commit_when_suspended()
        return await _resume(coroutine, trap)

    def _commit_when_suspended(self) -> None:
        """Start the commit of the messages finished before a handler that just suspended.

        Not here and now: the handler has yielded its trap but trio has not received it yet,
        and a commit may run inline and release replies (callbacks, wake-ups) in between.
        Scheduled instead, it runs in the next scheduler pass, after the trap was handed over;
        once per suspension episode. It may find the work done meanwhile: that is a no-op.
        """
        if not self._commit_soon:
            self._commit_soon = True
            self._token.run_sync_soon(self._commit_now)

    def _commit_now(self) -> None:
        self._commit_soon = False
        if self._store is not None:  # still open (the activation may have stopped since)
            self._start_commit()

    def inspect(self) -> dict[str, Value]:
        """What an operator sees of this facet (no stored values), load signals included.

        Synchronous reads of committed state on the loop thread: callable between any two
        messages while the activation runs (the store is open).
        """
        store = self._store
        assert store is not None
        created = store.get(b"created", META_DB)
        oldest = self.mailbox.oldest_enqueued_at()
        timers = self._timers().summary(self._pending, names_max=FAILED_TIMER_NAMES_SHOWN)
        return {
            "tenant": self.address.tenant_id,
            "agent": self.address.agent_id,
            "class": self._bound_class,
            "created": None if created is None else decode_value(created),
            "keys": store.count(),
            "idempotency_records": store.count(IDEM_DB),
            "map_size_bytes": store.map_size_bytes,
            "map_size_bytes_max": store.map_size_bytes_max,
            "mailbox_depth": len(self.mailbox),
            "mailbox_depth_max": self.mailbox.envelopes_max,
            "mailbox_oldest_age_seconds": (
                0.0 if oldest is None else round(trio.current_time() - oldest, 6)
            ),
            "commit_running": self._commit_running,
            "timers": timers.count,
            "timers_failed": timers.failed_count,
            "timers_failed_names": list(timers.failed),
            "timer_next_due": None if timers.next_due_ms is None else timers.next_due_ms / 1000,
            **describe_recent(self._recent),
        }

    async def _facet_for(self, envelope: Envelope) -> Facet:
        """The facet instance for ``envelope``, binding and activating it if needed."""
        if self._bound_class is None:
            if envelope.cls is None:
                raise NotFoundError(f"facet {str(self.address)!r} does not exist (give a class)")
            self._bind(envelope.cls)
        elif envelope.cls is not None and envelope.cls != self._bound_class:
            raise ConflictError(
                f"facet {str(self.address)!r} is bound to class {self._bound_class!r}, "
                f"not {envelope.cls!r}"
            )
        if self._facet is None:
            cls = self._core.classes.get(self._bound_class or "")
            if cls is None:
                raise NotFoundError(f"facet class {self._bound_class!r} is not registered")
            assert self._storage is not None
            assert self._store is not None
            timers = Timers(
                storage=self._storage,
                store=self._store,
                state=self._timers,
                config=self._config,
                wall_clock=self._core.wall_clock,
                has_handler=callable(getattr(cls, "on_timer", None)),
            )
            facet = instantiate(
                cls, address=self.address, storage=self._storage, timers=timers, outbound=self
            )
            await self._run_hook(facet.on_activate)
            self._facet = facet
        return self._facet

    def _bind(self, cls: str) -> None:
        """Bind a new facet to ``cls``; durable with the next commit, whatever the handler does."""
        metadata = {
            b"class": cls,
            b"tenant": self.address.tenant_id,
            b"agent": self.address.agent_id,
            b"created": self._core.wall_clock(),
        }
        system = self._pending[-1].system
        for key, value in metadata.items():
            system[(META_DB, key)] = msgpack.packb(value)
        self._bound_class = cls

    async def _run_hook(self, hook: Callable[[], Coroutine[object, object, None]]) -> None:
        """Run ``on_activate`` / ``on_deactivate`` as a message of its own (no reply)."""
        storage = self._storage
        assert storage is not None
        layer = storage.begin_message()
        try:
            # Suspending, it lets messages finished earlier in this wake commit first (0018).
            await self._run_handler(hook())
        except FacetrtError:
            raise
        except Exception as exc:
            raise HandlerError(
                f"{hook.__name__} raised {type(exc).__name__}: {exc}", type_name=type(exc).__name__
            ) from exc
        finally:
            storage.end_message()
        self._pending[-1].absorb(layer)

    # -- timers --------------------------------------------------------------------------

    def _timers(self) -> TimerState:
        if self._timer_state is None:
            assert self._store is not None
            self._timer_state = TimerState.load(self._store)
        return self._timer_state

    async def _fire_timers(self, envelope: Envelope) -> outcome.Outcome[Value]:
        """Run every due timer (up to the per-wake limit), each as a message of its own."""
        try:
            facet = await self._facet_for(envelope)
        except StorageError:
            raise
        except FacetrtError as exc:
            return outcome.Error(exc)
        state = self._timers()
        state.resync = True  # whatever fires, the commit checks the index's hint
        now_ms = wall_ms(self._core.wall_clock())
        fired = 0
        for name in state.due_names(now_ms, self._config.timer_fires_per_wake_max):
            fired += await self._fire_timer(facet, name, now_ms)
        return outcome.Value(fired)

    async def _fire_timer(self, facet: Facet, name: str, now_ms: int) -> bool:
        """Deliver timer ``name`` once; a failure schedules its retry (or marks it failed)."""
        storage = self._storage
        assert storage is not None
        assert self._store is not None
        record = self._timers().record(self._store, storage.layers(), name)
        if record is None or record.failed or record.due_ms > now_ms:
            return False  # cancelled or moved by an earlier timer of this wake
        layer = storage.begin_message()
        try:
            layer.set_timer(name, None)  # delivered, unless on_timer sets it again
            try:
                handler = facet.on_timer  # type: ignore[attr-defined]  # checked by Timers.set
                # Suspending, it first lets earlier messages of this wake commit (0018).
                await self._run_handler(
                    handler(name, decode_value(record.payload), record.attempts + 1)
                )
            finally:
                storage.end_message()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - the facet's failure is recorded and retried
            self._timer_failed(name, record, exc, now_ms)
            return True
        self._pending[-1].absorb(layer)
        self._core.counters.timers_fired += 1
        return True

    def _timer_failed(self, name: str, record: TimerRecord, exc: Exception, now_ms: int) -> None:
        config = self._config
        message = exc.message if isinstance(exc, FacetrtError) else str(exc)
        retried = record.retried(
            f"{type(exc).__name__}: {message}",
            now_ms=now_ms,
            retries_max=config.timer_retries_max,
            first_delay_seconds=config.timer_retry_seconds_initial,
        )
        self._pending[-1].set_timer(name, retried)
        counters = self._core.counters
        counters.timer_handler_failures += 1
        counters.timers_failed += retried.failed
        logger.warning(
            "on_timer of %s failed (attempt %d%s): %s",
            self.address,
            retried.attempts,
            ", no retries left" if retried.failed else "",
            type(exc).__name__,
        )

    # -- idempotency ---------------------------------------------------------------------

    def _stored_result(self, key: str, method: str) -> Value | object:
        raw = lookup_system(self._pending, IDEM_DB, key.encode())
        if raw is MISSING:
            assert self._store is not None
            raw = self._store.get(key.encode(), IDEM_DB)
        if raw is None:
            return MISSING
        assert isinstance(raw, bytes)
        expires, stored_method, result = msgpack.unpackb(raw)
        if expires <= self._core.wall_clock():
            return MISSING
        if stored_method != method:
            raise BadRequestError(
                f"idempotency key {key!r} was used for method {stored_method!r}, not {method!r}"
            )
        return decode_value(result)

    def _store_result(self, layer: Layer, key: str, method: str, encoded: bytes) -> None:
        expires = self._core.wall_clock() + self._config.idempotency_retention_seconds
        layer.system[(IDEM_DB, key.encode())] = msgpack.packb([expires, method, encoded])

    def _purge_expired_idempotency_records(self) -> None:
        assert self._store is not None
        now = self._core.wall_clock()
        system = self._pending[-1].system
        iterator = self._store.iterate(low=None, high=None, reverse=False, db=IDEM_DB)
        for key, raw in iterator:
            if msgpack.unpackb(raw)[0] <= now:
                system[(IDEM_DB, key)] = None

    # -- group commit --------------------------------------------------------------------

    def _start_commit(self) -> None:
        """Commit the accumulated layer on a writer thread, unless nothing needs it."""
        if self._commit_running or self._failure is not None:
            return
        layer = self._pending[-1]
        outcomes, self._accumulated = self._accumulated, []
        seq = self._completed_seq
        state = self._timer_state
        plan = None if state is None else state.plan(layer)
        if layer.is_empty() and plan is None:
            self._release(outcomes, seq)  # nothing to write and nothing in flight before it
            return
        assert self._store is not None
        self._pending.append(Layer())
        self._commit_running = True
        self._submit(layer, outcomes, seq, plan)

    def _submit(self, layer: Layer, outcomes: _Outcomes, seq: int, plan: HintPlan | None) -> None:
        assert self._store is not None
        self._commit_started = time.perf_counter()
        batch = layer.to_batch()
        job: Callable[[], HintResult | None]
        if plan is None:
            job = partial(self._store.commit, batch)
        else:
            index = self._core.timer_index
            job = partial(commit_with_hints, index, self.address, plan, self._store, batch)
        if (
            plan is None
            and not self.mailbox
            and (len(outcomes) <= 1 or self._core.batch_may_commit_inline())
            and self._core.loop_is_idle()
        ):
            # Nothing else could run meanwhile: blocking the loop for the fsync costs nobody
            # anything and saves two thread hops and a loop wake-up (decision 0009). A batch
            # only while its tenant is alone on the node: what arrives during the fsync waits
            # for it, and another tenant's calls must not. Commits with timer-index work stay
            # on the threads: the index's group commit may wait.
            self._core.counters.commits_inline += 1
            self._commit_done(layer, outcomes, seq, plan, outcome.capture(job))
            return
        self._core.workers.submit(job, partial(self._commit_done, layer, outcomes, seq, plan))

    def _commit_done(
        self,
        layer: Layer,
        outcomes: _Outcomes,
        seq: int,
        plan: HintPlan | None,
        result: outcome.Outcome[HintResult | None],
    ) -> None:
        """Runs on the loop thread when a writer thread finished a commit."""
        if isinstance(result, outcome.Error):
            error = result.error
            store = self._store
            if isinstance(error, StoreFullError) and self._pins:
                # A snapshot reads this map on a writer thread: grow once it is done.
                self._grow_deferred = partial(self._commit_done, layer, outcomes, seq, plan, result)
                return
            # Growing is legal here: callbacks run between task steps, so no read is open.
            if isinstance(error, StoreFullError) and store is not None and self._grow(store):
                self._core.counters.map_grows += 1
                # The hint was already lowered (if needed): only the settle is left to do.
                self._submit(layer, outcomes, seq, _without_lower(plan))
                return
            self._commit_running = False
            self._commit_failed(error, outcomes)
            return
        self._commit_running = False
        hint = result.unwrap()
        if hint is not None:
            self._hint_settled(hint)
        counters = self._core.counters
        seconds = time.perf_counter() - self._commit_started
        counters.commits += 1
        counters.committed_envelopes += len(outcomes)
        counters.commit_seconds += seconds
        self._core.commit_stats.observe(len(outcomes), seconds)
        self._recent.append((len(outcomes), seconds))
        removed = self._pending.pop(0)
        assert removed is layer
        self._release(outcomes, seq)
        if self._accumulated or not self._pending[-1].is_empty():
            self._start_commit()
        else:
            self.mailbox.wake()  # the turn loop may now start its idle timer

    def _grow(self, store: FacetStore) -> bool:
        """Double the map within the tenant's bytes-per-facet quota as it is now (the
        operator may have changed it since the store opened); False at the quota."""
        quota = self._core.quotas.effective(self.address.tenant_id).facet_bytes_max
        store.map_size_bytes_max = quota
        return store.grow()

    def _hint_settled(self, hint: HintResult) -> None:
        state = self._timer_state
        assert state is not None
        state.planned(hint)
        scheduler = self._core.timer_scheduler
        if hint.hint_ms is not None and scheduler is not None:
            scheduler.notify(hint.hint_ms)

    def _release(self, outcomes: _Outcomes, seq: int) -> None:
        self._durable_seq = seq
        if self._durable_lot:
            self._durable_lot.unpark_all()
        core = self._core
        core.releasing = True  # reply callbacks may count on the hooks below
        try:
            for envelope, result in outcomes:
                envelope.reply.set(result)
        finally:
            core.releasing = False
        for hook in core.after_release:
            hook()

    def _commit_failed(self, error: BaseException, outcomes: _Outcomes) -> None:
        self._core.counters.commit_failures += 1
        self._core.counters.resets += 1
        if isinstance(error, StoreFullError):
            self._core.quotas.refused("facet_bytes")
            failure: FacetrtError = error
        else:
            logger.error("commit failed for a facet store; resetting it: %s", error)
            failure = InternalError(f"commit failed; the facet was reset: {error}")
        self._failure = failure
        later, self._accumulated = self._accumulated, []
        for envelope, _ in [*outcomes, *later]:
            envelope.reply.set(outcome.Error(failure))
        self._pending[:] = [Layer()]
        # The timer state described the failed commit's timers. The running message may still
        # read timers before the cancellation reaches it (a wait woken by this failure returns
        # without a checkpoint): it reloads them from the store, which agrees with the layers.
        self._timer_state = None
        self._durable_lot.unpark_all()
        self._scope.cancel()

    async def _wait_commit_idle(self) -> None:
        while self._commit_running:
            await self._durable_lot.park()

    async def wait_durable(self) -> None:
        """Wait until every finished message's writes are durable (the output gate)."""
        target = self._completed_seq
        self._start_commit()
        await trio.lowlevel.checkpoint()
        while self._durable_seq < target and self._failure is None:
            await self._durable_lot.park()
        if self._failure is not None:
            raise self._failure

    # -- outbound calls (FacetCalls) -----------------------------------------------------

    async def call_facet(
        self,
        agent_id: str,
        method: str,
        args: tuple[Value, ...],
        kwargs: dict[str, Value],
        *,
        cls: str | None,
        idempotency_key: str | None,
    ) -> Value:
        target = self._core.address_of(self.address.tenant_id, agent_id)
        chain = (*(self._current.chain if self._current else ()), self.address)
        if target in chain:
            path = " -> ".join(str(address) for address in (*chain, target))
            raise ReentrancyError(f"call would re-enter a facet on its own call chain: {path}")
        if len(chain) > self._config.call_depth_max:
            raise BadRequestError(f"call chain longer than {self._config.call_depth_max}")
        await self.wait_durable()
        # No checkpoint from the cycle check to recording the wait: a cycle closes atomically.
        self._refuse_wait_cycle(target)
        reply = self._core.submit(
            target, method, args, kwargs, cls=cls, idempotency_key=idempotency_key, chain=chain
        )
        self._waiting = (target, reply)
        try:
            return await reply.wait()
        finally:
            self._waiting = None

    @property
    def waiting_on(self) -> FacetAddress | None:
        """The facet whose reply the current message awaits; None once that reply is in
        (even if this task has not resumed yet: it no longer waits on anyone)."""
        waiting = self._waiting
        if waiting is None or waiting[1].is_set:
            return None
        return waiting[0]

    def _refuse_wait_cycle(self, target: FacetAddress) -> None:
        """Refuse a call to a facet whose current message waits, through the calls it makes,
        on this facet: two call chains that meet this way wait for each other for ever, which
        the call chain check above cannot see (decision 0016). Follows one edge per
        running facet, so it costs a dict lookup per hop."""
        router = self._core.router
        assert router is not None
        path = [self.address, target]
        address: FacetAddress | None = target
        while address is not None:
            activation = router.running_activation(address)
            address = None if activation is None else activation.waiting_on
            if address is None or address in path[1:]:
                return  # nobody waits further, or a wait cycle without us (not ours to break)
            path.append(address)
            if address == self.address:
                text = " -> ".join(str(hop) for hop in path)
                raise ReentrancyError(
                    f"call would deadlock: each facet waits on the next one's reply: {text}"
                )

    async def fetch(self, request: FetchRequest) -> FetchResponse:
        """``self.fetch``: the output gate first (like a facet call), then the egress layer."""
        egress = self._core.egress
        if egress is None:
            raise PolicyViolationError(
                "egress denied by rule no-egress: this runtime was opened without an egress "
                "gateway, so every outbound request is denied"
            )
        await self.wait_durable()
        return await egress.fetch(
            request,
            tenant=self.address.tenant_id,
            agent=self.address.agent_id,
            run_id=self._run_id(),
        )

    def _run_id(self) -> str:
        """A random id of the current message, the same for all of its fetches (audit log)."""
        current = self._current
        if self._run is None or self._run[0] is not current:
            self._run = (current, secrets.token_hex(8))
        return self._run[1]


@types.coroutine
def _resume(
    coroutine: Coroutine[object, object, Value], trap: object
) -> Generator[object, object, Value]:
    """Go on driving ``coroutine`` after it yielded ``trap`` to the scheduler: the
    delegation ``await`` does (PEP 380), for a coroutine whose first step already ran."""
    while True:
        try:
            sent = yield trap
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - Cancelled and the rest go to the handler
            try:
                trap = coroutine.throw(exc)
            except StopIteration as finished:
                value: Value = finished.value
                return value
        else:
            try:
                trap = coroutine.send(sent)
            except StopIteration as finished:
                value = finished.value
                return value


def _without_lower(plan: HintPlan | None) -> HintPlan | None:
    if plan is None or not plan.lower:
        return plan
    return HintPlan(due_ms=plan.due_ms, lower=False, settle=True)


def _encode_result(value: object, bytes_max: int) -> bytes:
    try:
        return encode_value(value, bytes_max=bytes_max, what="result")
    except BadRequestError as exc:
        # The handler returned something a caller cannot receive: the facet's bug, not the
        # caller's, so handler_error; its writes are discarded like any handler failure.
        raise HandlerError(exc.message, type_name="TypeError") from None
