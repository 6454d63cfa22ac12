"""The facet storage API against a plain dict: a Hypothesis stateful (model-based) test.

One interpreter (:func:`run_program`) executes generated programs of storage operations -- get,
get_many, put, put_many, delete, delete_many, list with every option, delete_all, nested
``transaction()`` blocks that commit, roll back or let their exception escape the message -- on
a storage object and records what every operation observed. It runs twice per message:

- inside a real facet (``ModelFacet.run``) on a real runtime, LMDB and trio, where reads go
  through the message's own unflushed writes, the accumulated and in-flight layers, and LMDB;
- on :class:`ModelStorage`, a dict, written independently of facetrt's layers.

The two records must be equal, operation by operation (values compared by their msgpack
encoding, so ``1``/``True``/``1.0`` and ``0.0``/``-0.0`` differ), and a message whose handler
raises must leave the model unchanged. Rules send one long program as one message, or several
short ones concurrently (so later messages read earlier ones' writes from the accumulated and
in-flight layers while a writer thread commits), reopen the runtime on the same directory and
compare everything with the model.

The runtime lives in a background thread running trio (``RuntimeHost``); the sync state
machine calls into it with ``trio.from_thread.run``. ``FACETRT_MODEL_EXAMPLES`` raises the
number of examples for a longer search.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AnyStr, ClassVar, Literal, Protocol, TypeAlias, TypeVar

import msgpack
import outcome
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from facetrt import (
    BadRequestError,
    Facet,
    HandlerError,
    Runtime,
    RuntimeConfig,
    Value,
    open_runtime,
    rpc,
)
from facetrt.testing import StoreHooks

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping

    from hypothesis.vendor.pretty import RepresentationPrinter

T = TypeVar("T")

TENANT = "model"
AGENT = "subject"
KEY_BYTES_MAX = 511
ALPHABET = "ab\x00é"  # é is two UTF-8 bytes, \x00 sorts first: byte order matters

# A 64 KiB initial map, so that larger examples also go through the map-growth path.
CONFIG = RuntimeConfig(commit_threads=2, map_size_bytes_initial=64 * 1024)
# Stores live on tmpfs when there is one (fsync costs nothing there; reopening still goes
# through LMDB's files), and every commit takes at least a millisecond, as on a disk, so
# that messages sent together overlap a commit in flight whatever the file system.
TMPFS = Path("/dev/shm")
COMMIT_SECONDS_MIN = 0.001


def _slow_commit(path: Path) -> None:
    time.sleep(COMMIT_SECONDS_MIN)


STORE_HOOKS = StoreHooks(before_commit=_slow_commit)

# -- programs ------------------------------------------------------------------------------


def _compact_runs(value: AnyStr) -> str:
    """``repr(value)``, with its longest run of one character written as ``c * n``."""
    if len(value) > 24:
        runs = [(run[:1], len(run)) for run in _runs(value)]
        char, count = max(runs, key=lambda run: run[1])
        if count > 16:
            start = value.index(char * count)
            parts = [repr(value[:start]), f"{char!r} * {count}", repr(value[start + count :])]
            return " + ".join(part for part in parts if part not in ("''", "b''"))
    return repr(value)


def _runs(value: AnyStr) -> list[AnyStr]:
    runs: list[AnyStr] = []
    start = 0
    for index in range(1, len(value) + 1):
        if index == len(value) or value[index] != value[start]:
            runs.append(value[start:index])
            start = index
    return runs


def compact_repr(value: object) -> str:
    """``repr`` that stays short for 511-byte keys and long byte strings (still valid Python).

    Hypothesis prints failing steps with it (``_repr_pretty_``) and fails on reprs over 30 kB.
    """
    if isinstance(value, str):
        return _compact_runs(value)
    if isinstance(value, bytes):
        return _compact_runs(value)
    if isinstance(value, list):
        return "[" + ", ".join(compact_repr(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{compact_repr(key)}: {compact_repr(item)}" for key, item in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, _Compact):
        fields = (f"{name}={compact_repr(item)}" for name, item in vars(value).items())
        return f"{type(value).__name__}({', '.join(fields)})"
    return repr(value)


class _Compact:
    """Printed with :func:`compact_repr`, also by Hypothesis (``_repr_pretty_``)."""

    def __repr__(self) -> str:
        return compact_repr(self)

    def _repr_pretty_(self, printer: RepresentationPrinter, cycle: bool) -> None:
        printer.text(compact_repr(self))


@dataclass(frozen=True, repr=False)
class Get(_Compact):
    key: str
    default: Value


@dataclass(frozen=True, repr=False)
class GetMany(_Compact):
    keys: list[str]


@dataclass(frozen=True, repr=False)
class Put(_Compact):
    key: str
    value: Value


@dataclass(frozen=True, repr=False)
class PutMany(_Compact):
    entries: dict[str, Value]


@dataclass(frozen=True, repr=False)
class Delete(_Compact):
    key: str


@dataclass(frozen=True, repr=False)
class DeleteMany(_Compact):
    keys: list[str]


@dataclass(frozen=True, repr=False)
class ListRange(_Compact):
    prefix: str | None = None
    start: str | None = None
    start_after: str | None = None
    end: str | None = None
    reverse: bool = False
    limit: int | None = None


@dataclass(frozen=True, repr=False)
class DeleteAll(_Compact):
    pass


@dataclass(frozen=True, repr=False)
class Checkpoint(_Compact):
    """``await trio.lowlevel.checkpoint()``: commits of earlier messages may finish meanwhile."""


TxnMode: TypeAlias = Literal["commit", "rollback", "escape"]


@dataclass(frozen=True, repr=False)
class Txn(_Compact):
    """A ``with storage.transaction():`` block.

    ``rollback`` raises at its end and catches the exception just outside the block (the
    message goes on); ``escape`` raises an exception nothing catches (the message fails).
    """

    ops: list[Op]
    mode: TxnMode


Op: TypeAlias = (
    Get | GetMany | Put | PutMany | Delete | DeleteMany | ListRange | DeleteAll | Checkpoint | Txn
)


@dataclass(frozen=True, repr=False)
class Program(_Compact):
    """One message: run ``ops``, then raise :class:`IntendedFailure` if ``fail``."""

    ops: list[Op]
    fail: bool


class IntendedFailure(Exception):
    """Raised by a handler at the end of a message on purpose."""


class RollbackBlock(Exception):
    """Raised at the end of a ``rollback`` transaction block, caught just outside it."""


class EscapeMessage(Exception):
    """Raised at the end of an ``escape`` transaction block; fails the whole message."""


class StorageLike(Protocol):
    """What the interpreter needs: ``facetrt.Storage`` and :class:`ModelStorage` both fit."""

    def get(self, key: str, default: Value = None) -> Value: ...
    def get_many(self, keys: Iterable[str]) -> dict[str, Value]: ...
    def put(self, key: str, value: Value) -> None: ...
    def put_many(self, entries: Mapping[str, Value]) -> None: ...
    def delete(self, key: str) -> bool: ...
    def delete_many(self, keys: Iterable[str]) -> int: ...
    def delete_all(self) -> None: ...
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        start_after: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> dict[str, Value]: ...


def _pairs(entries: dict[str, Value]) -> Value:
    """A dict result as [[key, value], ...]: its order is part of what is compared."""
    return [[key, value] for key, value in entries.items()]


async def _apply(storage: StorageLike, op: Op, checkpoint: Callable[[], Awaitable[None]]) -> Value:
    match op:
        case Get(key, default):
            return storage.get(key, default)
        case GetMany(keys):
            return _pairs(storage.get_many(keys))
        case Put(key, value):
            storage.put(key, value)
            return None
        case PutMany(entries):
            storage.put_many(entries)
            return None
        case Delete(key):
            return storage.delete(key)
        case DeleteMany(keys):
            return storage.delete_many(keys)
        case ListRange(prefix, start, start_after, end, reverse, limit):
            listed = storage.list(
                prefix=prefix,
                start=start,
                start_after=start_after,
                end=end,
                reverse=reverse,
                limit=limit,
            )
            return _pairs(listed)
        case DeleteAll():
            storage.delete_all()
            return None
        case Checkpoint():
            await checkpoint()
            return None
    raise AssertionError(f"not a simple operation: {op!r}")


async def execute(
    storage: StorageLike,
    ops: Iterable[Op],
    results: list[Value],
    checkpoint: Callable[[], Awaitable[None]],
) -> None:
    """Run ``ops``, appending what each observed to ``results`` as it goes.

    A transaction block's entry is the list of its operations' results; a ``bad_request`` is
    recorded as ``{"error": "BadRequestError"}`` and the program goes on.
    """
    for op in ops:
        if isinstance(op, Txn):
            inner: list[Value] = []
            results.append(inner)
            try:
                with storage.transaction():
                    await execute(storage, op.ops, inner, checkpoint)
                    if op.mode == "rollback":
                        raise RollbackBlock
                    if op.mode == "escape":
                        raise EscapeMessage
            except RollbackBlock:
                pass
            continue
        try:
            results.append(await _apply(storage, op, checkpoint))
        except BadRequestError as exc:
            results.append({"error": type(exc).__name__})


async def run_program(
    storage: StorageLike,
    program: Program,
    results: list[Value],
    checkpoint: Callable[[], Awaitable[None]],
) -> None:
    await execute(storage, program.ops, results, checkpoint)
    if program.fail:
        raise IntendedFailure("failing at the end of the message, on purpose")


# -- the model -----------------------------------------------------------------------------


def _check_key(key: str) -> bytes:
    data = key.encode()
    if not 0 < len(data) <= KEY_BYTES_MAX:
        raise BadRequestError(f"bad key of {len(data)} bytes")
    return data


class ModelStorage:
    """The storage API on a dict, as SPEC §3 describes it (no layers, no LMDB)."""

    def __init__(self, data: dict[str, Value]) -> None:
        self.data = data

    def get(self, key: str, default: Value = None) -> Value:
        _check_key(key)
        return self.data.get(key, default)

    def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
        found: dict[str, Value] = {}
        for key in keys:
            _check_key(key)
            if key in self.data:
                found[key] = self.data[key]
        return found

    def put(self, key: str, value: Value) -> None:
        _check_key(key)
        self.data[key] = value

    def put_many(self, entries: Mapping[str, Value]) -> None:
        for key in entries:
            _check_key(key)
        self.data.update(entries)

    def delete(self, key: str) -> bool:
        _check_key(key)
        return self.data.pop(key, _ABSENT) is not _ABSENT

    def delete_many(self, keys: Iterable[str]) -> int:
        distinct = dict.fromkeys(keys)
        for key in distinct:
            _check_key(key)
        return sum(self.data.pop(key, _ABSENT) is not _ABSENT for key in distinct)

    def delete_all(self) -> None:
        self.data.clear()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        saved = dict(self.data)
        try:
            yield
        except BaseException:
            self.data.clear()
            self.data.update(saved)
            raise

    def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        start_after: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> dict[str, Value]:
        if start is not None and start_after is not None:
            raise BadRequestError("start and start_after")
        if limit is not None and limit <= 0:
            raise BadRequestError("limit")
        low = None if start is None else _check_key(start)
        after = None if start_after is None else _check_key(start_after)
        high = None if end is None else _check_key(end)
        selected = [
            (key, self.data[key])
            for key in sorted(self.data, key=str.encode, reverse=reverse)
            if (prefix is None or key.startswith(prefix))
            and (low is None or key.encode() >= low)
            and (after is None or key.encode() > after)
            and (high is None or key.encode() < high)
        ]
        return dict(selected if limit is None else selected[:limit])


_ABSENT = object()


def _run_to_completion(coroutine: Coroutine[object, None, T]) -> T:
    """Run a coroutine that never suspends (the model's checkpoints are no-ops)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coroutine.close()
    raise AssertionError("the model suspended")


async def _no_checkpoint() -> None:
    pass


def run_model(model: dict[str, Value], program: Program) -> tuple[list[Value], str | None]:
    """Run ``program`` on the model; return its results and the failing exception's name.

    ``model`` is updated only if the message succeeds.
    """
    storage = ModelStorage(dict(model))
    results: list[Value] = []
    try:
        _run_to_completion(run_program(storage, program, results, _no_checkpoint))
    except (IntendedFailure, EscapeMessage) as exc:
        return results, type(exc).__name__
    model.clear()
    model.update(storage.data)
    return results, None


def _canonical(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def assert_same(what: str, observed: Value, expected: Value) -> None:
    if _canonical(observed) == _canonical(expected):
        return
    if isinstance(observed, list) and isinstance(expected, list):
        for index, (seen, wanted) in enumerate(zip(observed, expected, strict=False)):
            if _canonical(seen) != _canonical(wanted):
                raise AssertionError(
                    f"{what}: result {index} differs:\n  observed {compact_repr(seen)}\n"
                    f"  expected {compact_repr(wanted)}"
                )
    raise AssertionError(
        f"{what}:\n  observed {compact_repr(observed)}\n  expected {compact_repr(expected)}"
    )


# -- the facet -----------------------------------------------------------------------------


@dataclass
class Observation:
    sequence: int
    results: list[Value]


class ModelFacet(Facet):
    """Runs the program registered under a message id; records what it observed in-process.

    The record survives a failing message, and its sequence number tells the order in which
    concurrently sent messages ran.
    """

    programs: ClassVar[dict[str, Program]] = {}
    observed: ClassVar[dict[str, Observation]] = {}
    sequence: ClassVar[Iterator[int]] = itertools.count()

    @rpc
    async def run(self, message_id: str) -> Value:
        program = ModelFacet.programs.pop(message_id)
        results: list[Value] = []
        ModelFacet.observed[message_id] = Observation(next(ModelFacet.sequence), results)
        await run_program(self.storage, program, results, trio.lowlevel.checkpoint)
        return results

    @rpc
    async def dump(self) -> Value:
        return _pairs(self.storage.list())

    @rpc
    async def get_many(self, keys: list[str]) -> Value:
        return _pairs(self.storage.get_many(keys))


CLASSES: dict[str, type[Facet]] = {"ModelFacet": ModelFacet}


# -- a runtime in a background trio thread -------------------------------------------------


@dataclass
class _Session:
    runtime: Runtime
    close: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class RuntimeHost:
    """Runs trio in a thread and one runtime at a time in it; driven from synchronous code."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._thread_error: BaseException | None = None
        self._session: _Session | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name="storage-model-trio", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._thread_error is not None:
            raise self._thread_error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test thread by shutdown()
            self._thread_error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        assert self._token is not None
        return self._token

    def open(self) -> None:
        assert self._session is None
        self._session = trio.from_thread.run(self._open_session, trio_token=self.token)

    async def _open_session(self) -> _Session:
        assert self._nursery is not None
        session: _Session = await self._nursery.start(self._hold_runtime)
        return session

    async def _hold_runtime(
        self, *, task_status: trio.TaskStatus[_Session] = trio.TASK_STATUS_IGNORED
    ) -> None:
        session: _Session | None = None
        try:
            async with open_runtime(
                self._data_dir, classes=CLASSES, config=CONFIG, store_hooks=STORE_HOOKS
            ) as runtime:
                session = _Session(runtime)
                task_status.started(session)
                await session.close.wait()
        except Exception as exc:
            if session is None:
                raise  # the opener sees it, through nursery.start
            session.error = exc  # close() re-raises it
        finally:
            if session is not None:
                session.done.set()

    def close(self) -> None:
        """Close the runtime gracefully (every finished message flushed)."""
        session, self._session = self._session, None
        if session is None:
            return
        trio.from_thread.run(_end_session, session, trio_token=self.token)
        if session.error is not None:
            raise session.error

    def reopen(self) -> None:
        self.close()
        self.open()

    def run(self, function: Callable[[Runtime], Awaitable[T]]) -> T:
        assert self._session is not None
        return trio.from_thread.run(function, self._session.runtime, trio_token=self.token)

    def shutdown(self) -> None:
        try:
            self.close()
        finally:
            if self._stop is not None and self._token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join()
        if self._thread_error is not None:
            raise self._thread_error


async def _end_session(session: _Session) -> None:
    session.close.set()
    await session.done.wait()


async def _call_run(runtime: Runtime, message_ids: list[str]) -> list[outcome.Outcome[Value]]:
    """Send one ``run`` message per id, all at once; return each call's outcome."""
    outcomes: dict[int, outcome.Outcome[Value]] = {}

    async def call(index: int) -> None:
        outcomes[index] = await outcome.acapture(
            runtime.call, TENANT, AGENT, "run", message_ids[index], cls="ModelFacet"
        )

    async with trio.open_nursery() as nursery:
        for index in range(len(message_ids)):
            nursery.start_soon(call, index)
    return [outcomes[index] for index in range(len(message_ids))]


# -- strategies ----------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """Draw from one of ``choices`` with the given weights (shrinking towards the first)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


SHORT_KEYS = st.text(ALPHABET, min_size=1, max_size=4)


@st.composite
def long_keys(draw: st.DrawFn) -> str:
    """A key of exactly 511 UTF-8 bytes sharing its head (a prefix) with short keys."""
    head = draw(st.text(ALPHABET, max_size=3))
    tail = draw(st.text(ALPHABET, max_size=3))
    fill = draw(st.sampled_from("ab\x00"))
    key = head + fill * (KEY_BYTES_MAX - len(head.encode()) - len(tail.encode())) + tail
    assert len(key.encode()) == KEY_BYTES_MAX
    return key


BAD_KEYS = st.sampled_from(["", "a" * 512, "é" * 256, "a" * 510 + "é"])
# A few keys per example (the same for all its steps) that most operations draw from, so that
# reads, deletes and range bounds hit written keys and each other; fresh keys are still mixed in.
KEY_POOL = st.shared(
    st.lists(weighted((6, SHORT_KEYS), (1, long_keys())), min_size=1, max_size=10, unique=True),
    key="facetrt-storage-model-keys",
)
POOLED_KEYS = KEY_POOL.flatmap(st.sampled_from)
KEYS = weighted((12, POOLED_KEYS), (4, SHORT_KEYS), (2, long_keys()), (1, BAD_KEYS))
PREFIXES = st.one_of(
    st.text(ALPHABET, max_size=3),
    POOLED_KEYS.flatmap(lambda key: st.integers(0, 4).map(lambda size: key[:size])),
)

SCALARS: st.SearchStrategy[Value] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.binary(max_size=6),
)
# Containers two levels deep; explicit rather than st.recursive, whose retries cost time.
CONTAINERS: st.SearchStrategy[Value] = st.one_of(
    st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=3), SCALARS, max_size=3)
)
NESTED: st.SearchStrategy[Value] = st.one_of(
    st.lists(CONTAINERS, max_size=2), st.dictionaries(st.text(max_size=3), CONTAINERS, max_size=2)
)
VALUES: st.SearchStrategy[Value] = weighted((6, SCALARS), (2, CONTAINERS), (1, NESTED))
# Values of one to six kilobytes (one byte repeated: cheap to draw, short to print).
LARGE_VALUES: st.SearchStrategy[Value] = st.builds(
    lambda byte, size: bytes([byte]) * size, st.integers(0, 255), st.integers(1000, 6000)
)


def _often_none(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return weighted((2, st.none()), (1, strategy))


@st.composite
def list_ranges(draw: st.DrawFn) -> ListRange:
    lower = draw(weighted((4, st.just("none")), (2, st.just("start")), (2, st.just("after"))))
    both = draw(weighted((6, st.just(False)), (1, st.just(True))))
    return ListRange(
        prefix=draw(_often_none(PREFIXES)),
        start=draw(KEYS) if lower == "start" or both else None,
        start_after=draw(KEYS) if lower == "after" or both else None,
        end=draw(_often_none(KEYS)),
        reverse=draw(st.booleans()),
        limit=draw(weighted((8, st.none()), (4, st.integers(1, 6)), (1, st.sampled_from([0, -1])))),
    )


SIMPLE_OPS: st.SearchStrategy[Op] = weighted(
    (12, st.builds(Put, KEYS, VALUES)),
    (4, st.builds(PutMany, st.dictionaries(KEYS, VALUES, max_size=4))),
    (5, st.builds(Get, KEYS, st.none() | VALUES)),
    (2, st.builds(GetMany, st.lists(KEYS, max_size=5))),
    (3, st.builds(Delete, KEYS)),
    (2, st.builds(DeleteMany, st.lists(KEYS, max_size=5))),
    (8, list_ranges()),
    (3, st.builds(ListRange, reverse=st.booleans())),  # everything
    (2, st.just(DeleteAll())),
    (2, st.just(Checkpoint())),
)
TXN_MODES: st.SearchStrategy[TxnMode] = weighted(
    (2, st.just("commit")), (2, st.just("rollback")), (1, st.just("escape"))
)


def transactions(inner: st.SearchStrategy[Op]) -> st.SearchStrategy[Op]:
    return st.builds(Txn, st.lists(inner, max_size=4), TXN_MODES)


# Transaction blocks nest up to three deep (explicitly, for the reason given for VALUES).
OPS: st.SearchStrategy[Op] = SIMPLE_OPS
for _ in range(3):
    OPS = weighted((6, SIMPLE_OPS), (1, transactions(OPS)))
FAIL = weighted((3, st.just(False)), (1, st.just(True)))


def programs(max_ops: int) -> st.SearchStrategy[Program]:
    return st.builds(Program, st.lists(OPS, max_size=max_ops), FAIL)


# -- the state machine ---------------------------------------------------------------------


class StorageModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, Value] = {}
        tmpfs = TMPFS.is_dir() and os.access(TMPFS, os.W_OK)
        prefix = "facetrt-storage-model-"
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=TMPFS if tmpfs else None))
        self.host = RuntimeHost(self.directory / "data")
        self.host.open()

    def teardown(self) -> None:
        try:
            self.host.shutdown()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _send(self, batch: list[Program]) -> None:
        """Send the programs as concurrent messages and check each against the model."""
        message_ids = [uuid.uuid4().hex for _ in batch]
        ModelFacet.programs.update(zip(message_ids, batch, strict=True))
        outcomes = self.host.run(lambda runtime: _call_run(runtime, message_ids))
        for message_id in message_ids:
            ModelFacet.programs.pop(message_id, None)
        observations: list[Observation] = []
        for index, message_id in enumerate(message_ids):
            observation = ModelFacet.observed.pop(message_id, None)
            if observation is None:
                raise AssertionError(f"message {index} never ran: {outcomes[index]!r}")
            observations.append(observation)
        # Replay on the model in the order the facet ran them (concurrent sends may reorder).
        order = sorted(range(len(batch)), key=lambda index: observations[index].sequence)
        for index in order:
            observation = observations[index]
            what = f"message {index} of {len(batch)} (run {order.index(index)})"
            expected, failure = run_model(self.model, batch[index])
            assert_same(what, observation.results, expected)
            result = outcomes[index]
            if failure is None:
                assert_same(f"{what}, reply", result.unwrap(), expected)
            else:
                with pytest.raises(HandlerError) as raised:
                    result.unwrap()
                assert raised.value.type_name == failure, raised.value

    def _check_state(self, extra_keys: list[str]) -> None:
        """Everything (list) and the model's keys plus ``extra_keys`` (get_many) match."""
        dumped = self.host.run(
            lambda runtime: runtime.call(TENANT, AGENT, "dump", cls="ModelFacet")
        )
        ordered = sorted(self.model, key=str.encode)
        everything: list[Value] = [[key, self.model[key]] for key in ordered]
        assert_same("dump", dumped, everything)
        keys: list[Value] = [*extra_keys, *ordered]
        found = self.host.run(
            lambda runtime: runtime.call(TENANT, AGENT, "get_many", keys, cls="ModelFacet")
        )
        present = [key for key in dict.fromkeys([*extra_keys, *ordered]) if key in self.model]
        expected: list[Value] = [[key, self.model[key]] for key in present]
        assert_same("get_many", found, expected)

    @rule(program=programs(max_ops=16))
    def one_message(self, program: Program) -> None:
        """Many operations inside one message: reads see its own unflushed writes."""
        self._send([program])

    @rule(batch=st.lists(programs(max_ops=3), min_size=1, max_size=5))
    def concurrent_messages(self, batch: list[Program]) -> None:
        """A few operations per message, sent together: reads cross the pending layers."""
        self._send(batch)

    @rule(
        put=st.builds(
            PutMany,
            st.dictionaries(
                weighted((4, POOLED_KEYS), (4, SHORT_KEYS), (1, long_keys())),
                weighted((8, VALUES), (1, LARGE_VALUES)),
                min_size=1,
                max_size=40,
            ),
        )
    )
    def bulk_put(self, put: PutMany) -> None:
        """Many keys in one message: state to read, and larger stores (the map grows)."""
        self._send([Program([put], fail=False)])

    @rule(extra_keys=st.lists(SHORT_KEYS, max_size=4))
    def check(self, extra_keys: list[str]) -> None:
        self._check_state(extra_keys)

    @rule()
    def reopen(self) -> None:
        """Close the runtime and reopen it on the same directory: state is the model."""
        self.host.reopen()
        self._check_state([])


StorageModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("FACETRT_MODEL_EXAMPLES", "50")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStorageModel = StorageModel.TestCase
