"""In-process benchmarks of the embedded runtime, with their baselines measured in the same run.

    .venv/bin/python -m benchmarks.inprocess [--quick] [--repeat N] [--dir D] [--check] ...

Cases (see docs/performance.md for why each exists):

1. one ``Counter`` facet under 1, 16 and 128 concurrent callers doing durable increments
   through ``Runtime.call``: calls/s, latency, mean group-commit batch size;
2. 10,000 distinct facets with one durable write each, pulled by 256 workers, under the default
   ``RuntimeConfig`` (``open_facets_max`` 1000, so LRU passivation runs): writes/s and the
   latency of the first call to a new facet (which creates its LMDB environment); then (2r) one
   more write to the first fifth of them, long passivated, to price reopening a store;
3. baselines: (a) raw durable LMDB commits from one thread, (b) the parallel-commit limit of 32
   threads with an environment each, (c) a bare trio mailbox round trip with 128 tasks, (d) an
   ideal group-commit actor (drain the channel, one LMDB transaction per batch committed via
   ``trio.to_thread.run_sync``, wake every caller) with 100 and 128 callers, and (e) for
   reference, 32 threads creating new environments with one durable put each.

Prints a table, the ratios to the baselines and PASS/FAIL against the targets, and writes
everything (with machine information) to ``benchmarks/results/inprocess-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import itertools
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb
import trio

from facetrt import FacetrtError, RuntimeConfig, open_runtime
from facetrt.examples import Counter

from ._util import (
    CaseResult,
    Latency,
    describe_load,
    is_busy,
    load_snapshot,
    machine_info,
    render_table,
    scratch_dir,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from facetrt import Runtime, RuntimeStatistics

    from ._util import JsonValue

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TENANT = "bench"
CLASSES = {"Counter": Counter}

ONE_FACET_CALLERS = (1, 16, 128)
MANY_FACETS_WORKERS = 256
PARALLEL_THREADS = 32
MAILBOX_TASKS = 128
IDEAL_CALLERS = (100, 128)
IDEAL_QUEUE_MAX = 1024  # the ideal actor's bounded channel; above every caller count
VERIFY_SAMPLE = 16  # facets of the 10,000 whose value is read back after the run
LMDB_MAP_BYTES = 64 * 1024 * 1024
NEW_ENV_MAP_BYTES = RuntimeConfig().map_size_bytes_initial  # what a new facet store maps

TARGET_ONE_FACET_CALLS = 20_000.0
TARGET_RATIO = 0.5


@dataclass(frozen=True, slots=True)
class Options:
    seconds: float  # one measured window
    warmup_seconds: float
    repeat: int
    facets: int
    facet_runs: int  # runs of case 2, which takes tens of seconds where the others take a few
    base_dir: Path | None
    quick: bool
    check: bool
    write_json: bool


# -- baselines ---------------------------------------------------------------------------


def _open_durable_env(path: Path, map_size: int = LMDB_MAP_BYTES) -> lmdb.Environment:
    """An LMDB environment with the durability options of a facet store (sync, metasync)."""
    path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(
        str(path),
        map_size=map_size,
        subdir=True,
        readonly=False,
        metasync=True,
        sync=True,
        map_async=False,
        mode=0o600,
        create=True,
        readahead=False,
        writemap=False,
        meminit=True,
        max_readers=16,
        max_dbs=4,
        max_spare_txns=1,
        lock=True,
    )


def _single_put_commits(
    env: lmdb.Environment,
    latencies: list[float],
    *,
    deadline: float = float("inf"),
    stop: threading.Event | None = None,
) -> int:
    """Durable commits of one put each until ``deadline`` or ``stop``; returns how many."""
    commits = 0
    clock = time.perf_counter
    while True:
        started = clock()
        if started >= deadline or (stop is not None and stop.is_set()):
            return commits
        with env.begin(write=True) as txn:
            txn.put(b"count", str(commits + 1).encode())
        latencies.append(clock() - started)
        commits += 1


def raw_lmdb_one_thread(options: Options) -> CaseResult:
    """Baseline (a): the fsync-bound rate of one thread, one put per durable transaction."""
    rates: list[float] = []
    latencies: list[float] = []
    with scratch_dir(options.base_dir, "raw") as path:
        env = _open_durable_env(path / "env")
        try:
            _single_put_commits(env, [], deadline=time.perf_counter() + options.warmup_seconds)
            for _ in range(options.repeat):
                started = time.perf_counter()
                deadline = started + options.seconds
                commits = _single_put_commits(env, latencies, deadline=deadline)
                rates.append(commits / (time.perf_counter() - started))
        finally:
            env.close()
    return CaseResult(
        key="baseline_raw_lmdb_1_thread",
        title="(a) raw LMDB, 1 thread, 1 put/commit",
        unit="commits/s",
        rates=rates,
        latency=Latency.of(latencies),
    )


def parallel_commit_limit(options: Options) -> CaseResult:
    """Baseline (b): 32 threads, an environment each, durable single-put commits; the total."""
    rates: list[float] = []
    latencies: list[float] = []
    with scratch_dir(options.base_dir, "parallel") as path:
        envs = [_open_durable_env(path / f"env-{index}") for index in range(PARALLEL_THREADS)]
        try:
            for round_index in range(options.repeat + 1):  # round 0 warms up
                warmup = round_index == 0
                seconds = options.warmup_seconds if warmup else options.seconds
                commits, elapsed, samples = _parallel_round(envs, seconds)
                if not warmup:
                    rates.append(commits / elapsed)
                    latencies.extend(samples)
        finally:
            for env in envs:
                env.close()
    return CaseResult(
        key="baseline_parallel_commit_limit",
        title=f"(b) parallel-commit limit, {PARALLEL_THREADS} threads x own env",
        unit="commits/s",
        rates=rates,
        latency=Latency.of(latencies),
    )


def _parallel_round(envs: list[lmdb.Environment], seconds: float) -> tuple[int, float, list[float]]:
    stop = threading.Event()
    start = threading.Barrier(len(envs) + 1)
    counts = [0] * len(envs)
    samples: list[list[float]] = [[] for _ in envs]

    def work(index: int) -> None:
        start.wait()
        counts[index] = _single_put_commits(envs[index], samples[index], stop=stop)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(envs))]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return sum(counts), elapsed, [sample for per_thread in samples for sample in per_thread]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_env(root: Path, index: int) -> None:
    """A new durable environment with one put: the least a new facet store must cost.

    Like a store's layout (256 buckets of directories), the new directory entries are made
    durable by fsyncing their parents; the named db and the put share one write transaction.
    """
    bucket = root / f"{index % 256:02x}"
    path = bucket / f"{index:08d}"
    if not bucket.exists():
        bucket.mkdir(exist_ok=True)
        _fsync_dir(root)
    path.mkdir()
    env = _open_durable_env(path, NEW_ENV_MAP_BYTES)
    try:
        with env.begin(write=True) as txn:
            db = env.open_db(b"data", txn=txn)
            txn.put(b"count", b"1", db=db)
        _fsync_dir(path)
        _fsync_dir(bucket)
    finally:
        env.close()


def _new_env_round(root: Path, seconds: float) -> tuple[int, float, list[float]]:
    stop = threading.Event()
    start = threading.Barrier(PARALLEL_THREADS + 1)
    tickets = itertools.count()  # next() is atomic under the GIL
    counts = [0] * PARALLEL_THREADS
    samples: list[list[float]] = [[] for _ in range(PARALLEL_THREADS)]

    def work(thread: int) -> None:
        start.wait()
        clock = time.perf_counter
        while not stop.is_set():
            begun = clock()
            _create_env(root, next(tickets))
            samples[thread].append(clock() - begun)
            counts[thread] += 1

    threads = [threading.Thread(target=work, args=(index,)) for index in range(PARALLEL_THREADS)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return sum(counts), elapsed, [sample for per_thread in samples for sample in per_thread]


def new_env_limit(options: Options) -> CaseResult:
    """Baseline (e): 32 threads creating environments with one durable put each; the total.

    Not a target: it shows how much of the gap between case 2 and baseline (b) is the cost of
    creating an environment (new files and directories) rather than of the runtime.
    """
    rates: list[float] = []
    latencies: list[float] = []
    for round_index in range(options.repeat + 1):  # round 0 warms up
        warmup = round_index == 0
        with scratch_dir(options.base_dir, "new-env") as path:
            seconds = options.warmup_seconds if warmup else options.seconds
            created, elapsed, samples = _new_env_round(path, seconds)
        if not warmup:
            rates.append(created / elapsed)
            latencies.extend(samples)
    return CaseResult(
        key="baseline_new_env_limit",
        title=f"(e) new env + 1 durable put, {PARALLEL_THREADS} threads",
        unit="envs/s",
        rates=rates,
        latency=Latency.of(latencies),
    )


class _Request:
    __slots__ = ("done", "value")

    def __init__(self, value: int) -> None:
        self.value = value
        self.done = trio.Event()


async def _mailbox_window(tasks: int, seconds: float, latencies: list[float] | None) -> float:
    """Round trips/s of ``tasks`` clients through one memory channel to one server task."""
    send, receive = trio.open_memory_channel[_Request](tasks)
    round_trips = 0

    async def server() -> None:
        async with receive:
            async for request in receive:
                request.value += 1
                request.done.set()

    async def client() -> None:
        nonlocal round_trips
        clock = time.perf_counter
        while (started := clock()) < deadline:
            request = _Request(round_trips)
            await send.send(request)
            await request.done.wait()
            if latencies is not None:
                latencies.append(clock() - started)
            round_trips += 1

    started = time.perf_counter()
    deadline = started + seconds
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        async with send, trio.open_nursery() as clients:
            for _ in range(tasks):
                clients.start_soon(client)
    return round_trips / (time.perf_counter() - started)


def trio_mailbox(options: Options) -> CaseResult:
    """Baseline (c): the cost of the actor hand-off alone, no storage."""
    rates: list[float] = []
    latencies: list[float] = []

    async def run() -> None:
        await _mailbox_window(MAILBOX_TASKS, options.warmup_seconds, None)
        for _ in range(options.repeat):
            rates.append(await _mailbox_window(MAILBOX_TASKS, options.seconds, latencies))

    trio.run(run)
    return CaseResult(
        key="baseline_trio_mailbox_128",
        title=f"(c) trio mailbox round trip, {MAILBOX_TASKS} tasks",
        unit="round trips/s",
        rates=rates,
        latency=Latency.of(latencies),
    )


class _Message:
    __slots__ = ("done", "key", "value")

    def __init__(self, key: bytes, value: bytes) -> None:
        self.key = key
        self.value = value
        self.done = trio.Event()


def _commit_batch(env: lmdb.Environment, batch: list[_Message]) -> None:
    with env.begin(write=True) as txn:
        for message in batch:
            txn.put(message.key, message.value)


async def _ideal_window(
    env: lmdb.Environment, callers: int, seconds: float, latencies: list[float] | None
) -> tuple[int, int]:
    """One window of the ideal group-commit actor: (messages, commits)."""
    send, receive = trio.open_memory_channel[_Message](IDEAL_QUEUE_MAX)
    messages = commits = 0

    async def actor() -> None:
        nonlocal commits
        async with receive:
            while True:
                try:
                    batch = [await receive.receive()]
                except trio.EndOfChannel:
                    return
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await trio.to_thread.run_sync(functools.partial(_commit_batch, env, batch))
                commits += 1
                for message in batch:
                    message.done.set()

    async def caller(index: int) -> None:
        nonlocal messages
        key = f"caller-{index}".encode()
        clock = time.perf_counter
        count = 0
        while (started := clock()) < deadline:
            count += 1
            message = _Message(key, str(count).encode())
            await send.send(message)
            await message.done.wait()
            if latencies is not None:
                latencies.append(clock() - started)
            messages += 1

    deadline = time.perf_counter() + seconds
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor)
        async with send, trio.open_nursery() as clients:
            for index in range(callers):
                clients.start_soon(caller, index)
    return messages, commits


# -- facetrt: one facet, next to the ideal actor ----------------------------------------


@dataclass(slots=True, kw_only=True)
class _Sample:
    """One measured window of a single-actor case."""

    calls: int
    elapsed: float
    batch: float  # messages per commit
    loop_cpu: float  # CPU time of the trio thread / wall time
    errors: Tally[str]


async def _ideal_sample(
    env: lmdb.Environment, callers: int, seconds: float, latencies: list[float] | None
) -> _Sample:
    started = time.perf_counter()
    cpu_started = time.thread_time()
    messages, commits = await _ideal_window(env, callers, seconds, latencies)
    elapsed = time.perf_counter() - started
    return _Sample(
        calls=messages,
        elapsed=elapsed,
        batch=messages / max(1, commits),
        loop_cpu=(time.thread_time() - cpu_started) / elapsed,
        errors=Tally(),
    )


async def _facet_sample(
    rt: Runtime, agent: str, callers: int, seconds: float, latencies: list[float] | None
) -> _Sample:
    """``callers`` tasks incrementing one Counter facet until the deadline; all are counted."""
    calls = 0
    errors: Tally[str] = Tally()

    async def caller() -> None:
        nonlocal calls
        clock = time.perf_counter
        while (started := clock()) < deadline:
            try:
                await rt.call(TENANT, agent, "increment", cls="Counter")
            except FacetrtError as exc:
                errors[exc.code] += 1
                continue
            if latencies is not None:
                latencies.append(clock() - started)
            calls += 1

    before = rt.statistics()
    started = time.perf_counter()
    cpu_started = time.thread_time()
    deadline = started + seconds
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    elapsed = time.perf_counter() - started
    loop_cpu = (time.thread_time() - cpu_started) / elapsed
    commits, envelopes = _batch(before, rt.statistics())
    return _Sample(
        calls=calls,
        elapsed=elapsed,
        batch=envelopes / max(1, commits),
        loop_cpu=loop_cpu,
        errors=errors,
    )


def _batch(before: RuntimeStatistics, after: RuntimeStatistics) -> tuple[int, int]:
    """(commits, committed envelopes) between two snapshots."""
    return (
        after.commits - before.commits,
        after.committed_envelopes - before.committed_envelopes,
    )


@dataclass(slots=True, kw_only=True)
class _Series:
    """The windows of one single-actor case, gathered over the interleaved repeats."""

    key: str
    title: str
    unit: str
    sample: Callable[[float, list[float] | None], Awaitable[_Sample]]
    samples: list[_Sample] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [sample.calls / sample.elapsed for sample in self.samples]

    def result(self, details: dict[str, JsonValue]) -> CaseResult:
        errors: Tally[str] = Tally()
        for sample in self.samples:
            errors.update(sample.errors)
        per_call = statistics.median(
            sample.loop_cpu * sample.elapsed / max(1, sample.calls) for sample in self.samples
        )
        notes = {
            "batch": f"{statistics.median(sample.batch for sample in self.samples):.1f}",
            "loop cpu": f"{statistics.median(sample.loop_cpu for sample in self.samples):.0%}"
            f" = {per_call * 1e6:.1f} us/call",
        }
        if errors:
            notes["errors"] = f"{sum(errors.values()):,} {dict(errors)}"
        return CaseResult(
            key=self.key,
            title=self.title,
            unit=self.unit,
            rates=self.rates,
            latency=Latency.of(self.latencies),
            notes=notes,
            details={
                "mean_batch_per_repeat": [sample.batch for sample in self.samples],
                "loop_thread_cpu_share_per_repeat": [sample.loop_cpu for sample in self.samples],
                "loop_thread_cpu_us_per_call": per_call * 1e6,
                "errors": {**errors},
                **details,
            },
        )


def single_actor_cases(options: Options) -> list[CaseResult]:
    """Baseline (d) and case 1, interleaved: each repeat takes one window of every case.

    Load from elsewhere on the machine drifts over seconds; interleaving makes it hit the ideal
    actor and the facet alike, so their ratio compares windows taken seconds apart. Each caller
    count has its own facet (and the ideal actor its own environment), all opened up front.
    """
    expected: Tally[str] = Tally()

    def ideal(env: lmdb.Environment, callers: int) -> _Series:
        return _Series(
            key=f"baseline_ideal_actor_{callers}",
            title=f"(d) ideal group-commit actor, {callers} callers",
            unit="msgs/s",
            sample=functools.partial(_ideal_sample, env, callers),
        )

    def facet(rt: Runtime, callers: int) -> _Series:
        agent = f"counter-{callers}"

        async def sample(seconds: float, latencies: list[float] | None) -> _Sample:
            result = await _facet_sample(rt, agent, callers, seconds, latencies)
            expected[agent] += result.calls
            return result

        return _Series(
            key=f"one_facet_{callers}",
            title=f"(1) one facet, {callers} caller{'s' if callers > 1 else ''}",
            unit="calls/s",
            sample=sample,
        )

    async def run(data_dir: Path, env: lmdb.Environment) -> list[CaseResult]:
        async with open_runtime(data_dir, classes=CLASSES) as rt:
            all_series = [
                *(ideal(env, callers) for callers in IDEAL_CALLERS),
                *(facet(rt, callers) for callers in ONE_FACET_CALLERS),
            ]
            for series in all_series:
                await series.sample(options.warmup_seconds, None)
            for _ in range(options.repeat):
                for series in all_series:
                    gc.collect()
                    series.samples.append(await series.sample(options.seconds, series.latencies))
            results = []
            for series in all_series:
                details: dict[str, JsonValue] = {}
                if series.key.startswith("one_facet_"):
                    agent = f"counter-{series.key.removeprefix('one_facet_')}"
                    value = await rt.call(TENANT, agent, "get")
                    if value != expected[agent]:
                        raise AssertionError(
                            f"{agent} is {value!r} after {expected[agent]} acknowledged increments"
                        )
                    details["verified_counter"] = value
                results.append(series.result(details))
            return results

    with scratch_dir(options.base_dir, "single") as path:
        env = _open_durable_env(path / "ideal")
        try:
            return trio.run(run, path / "data", env)
        finally:
            env.close()


@dataclass(slots=True, kw_only=True)
class _Pass:
    """One pass of workers over a range of facets, one ``increment`` each."""

    calls: int
    elapsed: float
    loop_cpu: float  # CPU time of the trio thread / wall time
    process_cpu: float  # CPU time of the process (all threads) / wall time
    system_cpu: float  # kernel part of process_cpu
    passivations: int
    activations: int
    commits: int
    envelopes: int
    open_peak: int
    errors: Tally[str]

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "writes_per_s": self.rate,
            "calls": self.calls,
            "elapsed_s": self.elapsed,
            "loop_thread_cpu_share": self.loop_cpu,
            "process_cpu_share": self.process_cpu,
            "system_cpu_share": self.system_cpu,
            "passivations": self.passivations,
            "activations": self.activations,
            "commits": self.commits,
            "committed_envelopes": self.envelopes,
            "open_facets_peak": self.open_peak,
            "errors": {**self.errors},
        }


def _agent(index: int) -> str:
    return f"agent-{index:06d}"


async def _facet_pass(rt: Runtime, facets: int, latencies: list[float]) -> _Pass:
    """256 workers pulling facet indexes ``0..facets-1`` from a shared counter."""
    errors: Tally[str] = Tally()
    next_index = 0
    open_peak = 0

    async def worker() -> None:
        nonlocal next_index
        clock = time.perf_counter
        while next_index < facets:
            index = next_index
            next_index += 1
            started = clock()
            try:
                await rt.call(TENANT, _agent(index), "increment", cls="Counter")
            except FacetrtError as exc:
                errors[exc.code] += 1
                continue
            latencies.append(clock() - started)

    async def monitor() -> None:
        nonlocal open_peak
        while True:
            open_peak = max(open_peak, rt.statistics().open_facets)
            await trio.sleep(0.005)

    before = rt.statistics()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_started = time.thread_time()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor)
        async with trio.open_nursery() as workers:
            for _ in range(MANY_FACETS_WORKERS):
                workers.start_soon(worker)
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    loop_cpu = (time.thread_time() - cpu_started) / elapsed
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    after = rt.statistics()
    commits, envelopes = _batch(before, after)
    system = usage_after.ru_stime - usage.ru_stime
    return _Pass(
        calls=facets - sum(errors.values()),
        elapsed=elapsed,
        loop_cpu=loop_cpu,
        process_cpu=(usage_after.ru_utime - usage.ru_utime + system) / elapsed,
        system_cpu=system / elapsed,
        passivations=after.passivations - before.passivations,
        activations=after.activations - before.activations,
        commits=commits,
        envelopes=envelopes,
        open_peak=max(open_peak, after.open_facets),
        errors=errors,
    )


@dataclass(slots=True, kw_only=True)
class _ManyRun:
    created: _Pass
    reactivated: _Pass
    close_seconds: float


async def _many_facets_once(
    data_dir: Path,
    options: Options,
    config: RuntimeConfig,
    new_latencies: list[float],
    reactivation_latencies: list[float],
) -> _ManyRun:
    facets = options.facets
    # The first facets of pass 1 were evicted long ago (LRU): calling them again reopens them.
    again = _reactivated_count(options)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        created = await _facet_pass(rt, facets, new_latencies)
        gc.collect()
        reactivated = await _facet_pass(rt, again, reactivation_latencies)
        if not (created.errors or reactivated.errors):
            # Read a sample back (not timed): every acknowledged write must be there.
            for index in range(0, facets, max(1, facets // VERIFY_SAMPLE)):
                value = await rt.call(TENANT, _agent(index), "get")
                expected = 2 if index < again else 1
                if value != expected:
                    raise AssertionError(f"{_agent(index)} holds {value!r}, not {expected}")
        closing = time.perf_counter()
    return _ManyRun(
        created=created,
        reactivated=reactivated,
        close_seconds=time.perf_counter() - closing,
    )


def _reactivated_count(options: Options) -> int:
    return max(1, options.facets // 5)


def many_facets(options: Options) -> list[CaseResult]:
    """Case 2: ``options.facets`` new facets, one durable write each, 256 workers.

    Then, not a target: one more write to the first fifth of them, which the LRU passivated
    long before, to show what reopening an existing store costs next to creating one.
    """
    config = RuntimeConfig()
    new_latencies: list[float] = []
    reactivation_latencies: list[float] = []
    runs: list[_ManyRun] = []
    for _ in range(options.facet_runs):
        gc.collect()
        with scratch_dir(options.base_dir, "many") as path:
            runs.append(
                trio.run(
                    _many_facets_once,
                    path / "data",
                    options,
                    config,
                    new_latencies,
                    reactivation_latencies,
                )
            )
    config_json: dict[str, JsonValue] = {
        "open_facets_max": config.open_facets_max,
        "commit_threads": config.commit_threads,
        "idle_timeout_seconds": config.idle_timeout_seconds,
        "mailbox_envelopes_max": config.mailbox_envelopes_max,
    }
    results = []
    for key, title, count, latencies, passes, latency_is in (
        (
            "many_facets",
            f"(2) {options.facets:,} new facets, {MANY_FACETS_WORKERS} workers",
            options.facets,
            new_latencies,
            [run.created for run in runs],
            "first call to a new facet (activation: creating and opening its LMDB environment)",
        ),
        (
            "many_facets_reactivation",
            f"(2r) {_reactivated_count(options):,} of them again (reopen)",
            _reactivated_count(options),
            reactivation_latencies,
            [run.reactivated for run in runs],
            "first call to a passivated facet (activation: reopening its LMDB environment)",
        ),
    ):
        errors: Tally[str] = Tally()
        for one_pass in passes:
            errors.update(one_pass.errors)
        median = sorted(passes, key=lambda one_pass: one_pass.rate)[len(passes) // 2]
        notes = {
            "open max": f"{config.open_facets_max:,}",
            "peak open": f"{max(one_pass.open_peak for one_pass in passes):,}",
            "passivations": f"{median.passivations:,}",
            "cpu": f"{median.process_cpu:.0%} (sys {median.system_cpu:.0%}, "
            f"loop {median.loop_cpu:.0%})",
        }
        if errors:
            notes["errors"] = f"{sum(errors.values()):,} {dict(errors)}"
        results.append(
            CaseResult(
                key=key,
                title=title,
                unit="writes/s",
                rates=[one_pass.rate for one_pass in passes],
                latency=Latency.of(latencies),
                notes=notes,
                details={
                    "facets": count,
                    "workers": MANY_FACETS_WORKERS,
                    "config": config_json,
                    "latency_is": latency_is,
                    "runs": [one_pass.to_json() for one_pass in passes],
                    "runtime_close_s": [run.close_seconds for run in runs],
                },
            )
        )
    return results


# -- report ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    text: str
    value: float
    threshold: float
    shown: str

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "target": self.text,
            "value": self.value,
            "threshold": self.threshold,
            "passed": self.passed,
        }


def _evaluate(by_key: dict[str, CaseResult], facets: int) -> tuple[dict[str, float], list[Target]]:
    one = by_key["one_facet_128"].median
    ideal = by_key["baseline_ideal_actor_128"].median
    many = by_key["many_facets"].median
    limit = by_key["baseline_parallel_commit_limit"].median
    paired = [
        facet_rate / ideal_rate
        for facet_rate, ideal_rate in zip(
            by_key["one_facet_128"].rates, by_key["baseline_ideal_actor_128"].rates, strict=True
        )
    ]
    ratios = {
        "one facet at 128 callers / ideal group-commit actor at 128": one / ideal,
        "the same, median of the ratios of windows taken side by side": statistics.median(paired),
        f"{facets:,}-facet writes/s / parallel-commit limit": many / limit,
    }
    targets = [
        Target(
            "one facet at 128 callers >= 20,000 durable calls/s",
            one,
            TARGET_ONE_FACET_CALLS,
            f"{one:,.0f} calls/s",
        ),
        Target(
            "one facet at 128 callers >= 0.5 x ideal group-commit actor at 128",
            one / ideal,
            TARGET_RATIO,
            f"{one / ideal:.2f} x ({one:,.0f} vs {ideal:,.0f} msgs/s)",
        ),
        Target(
            f"{facets:,}-facet run >= 0.5 x parallel-commit limit",
            many / limit,
            TARGET_RATIO,
            f"{many / limit:.2f} x ({many:,.0f} writes/s vs {limit:,.0f} commits/s)",
        ),
    ]
    return ratios, targets


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="0.5 s windows, 1 repeat, 2,000 facets"
    )
    parser.add_argument("--repeat", type=int, default=None, help="repeats per case (default 3)")
    parser.add_argument("--seconds", type=float, default=None, help="one measured window")
    parser.add_argument("--facets", type=int, default=None, help="facets of case 2 (10,000)")
    parser.add_argument(
        "--facet-runs",
        type=int,
        default=1,
        help="runs of case 2 (default 1: one run creates 10,000 stores and takes ~40 s)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="scratch base (default /tmp)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    parser.add_argument("--no-json", action="store_true", help="do not write the JSON file")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    repeat = args.repeat if args.repeat is not None else (1 if quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    seconds = args.seconds if args.seconds is not None else (0.5 if quick else 2.0)
    facets = args.facets if args.facets is not None else (2_000 if quick else 10_000)
    if seconds <= 0 or facets < 1 or args.facet_runs < 1:
        parser.error("--seconds, --facets and --facet-runs must be positive")
    options = Options(
        seconds=seconds,
        warmup_seconds=min(0.3, seconds / 2),
        repeat=repeat,
        facets=facets,
        facet_runs=args.facet_runs,
        base_dir=args.dir,
        quick=quick,
        check=bool(args.check),
        write_json=not args.no_json,
    )
    return options


def main(argv: list[str] | None = None) -> int:
    options = _parse(argv)
    with scratch_dir(options.base_dir, "probe") as probe:
        machine = machine_info(probe.parent)
    machine_load = load_snapshot()
    commit = machine["git_commit"]
    print(
        f"facetrt in-process benchmarks, {machine['date_utc']}\n"
        f"  {machine['cpu_count']} CPUs ({machine['cpu_model']}), {machine['platform']}\n"
        f"  Python {machine['python']}, py-lmdb {machine['py_lmdb']} "
        f"(LMDB {machine['liblmdb']}), trio {machine['trio']}, "
        f"commit {str(commit)[:12] if commit else '?'}"
        f"{' + changes' if machine['git_tracked_changes'] else ''}\n"
        f"  data under {machine['data_dir']}: {machine['data_filesystem']}\n"
        f"  {describe_load(machine_load)} (other work on the machine skews the figures)\n"
        f"  {options.repeat} x {options.seconds:g} s windows per case"
        f" (+{options.warmup_seconds:g} s warm-up), {options.facets:,} facets"
        f" x {options.facet_runs} run(s) in case 2{', quick' if options.quick else ''}\n",
        flush=True,
    )

    cases: list[Callable[[], CaseResult | list[CaseResult]]] = [
        functools.partial(raw_lmdb_one_thread, options),
        functools.partial(parallel_commit_limit, options),
        functools.partial(new_env_limit, options),
        functools.partial(trio_mailbox, options),
        functools.partial(single_actor_cases, options),
        functools.partial(many_facets, options),
    ]
    results: list[CaseResult] = []
    run_started = time.perf_counter()
    for case in cases:
        gc.collect()
        case_started = time.perf_counter()
        produced = case()
        batch = produced if isinstance(produced, list) else [produced]
        results.extend(batch)
        for position, result in enumerate(batch):
            last = position == len(batch) - 1
            took = f" ({time.perf_counter() - case_started:.1f} s)" if last else ""
            print(f"  {result.title}: {result.median:,.0f} {result.unit}{took}", flush=True)
    total_seconds = time.perf_counter() - run_started

    by_key = {result.key: result for result in results}
    ratios, targets = _evaluate(by_key, options.facets)
    print(f"\n{render_table(results)}\n")
    print("ratios (medians)")
    for text, value in ratios.items():
        print(f"  {text}: {value:.2f}")
    print("\ntargets")
    for target in targets:
        print(f"  {'PASS' if target.passed else 'FAIL'}  {target.text}: {target.shown}")
    load_at_end = load_snapshot()
    print(f"\ntotal {total_seconds:.0f} s; at the end: {describe_load(load_at_end)}")
    busy = is_busy(machine_load) or is_busy(load_at_end)
    if busy:
        print("WARNING: the machine was busy with other work; these figures are unreliable")

    if options.write_json:
        report: dict[str, JsonValue] = {
            "benchmark": "benchmarks.inprocess",
            "machine": machine,
            "options": {
                "seconds": options.seconds,
                "warmup_seconds": options.warmup_seconds,
                "repeat": options.repeat,
                "facets": options.facets,
                "facet_runs": options.facet_runs,
                "quick": options.quick,
            },
            "cases": {result.key: result.to_json() for result in results},
            "ratios": {**ratios},
            "targets": [target.to_json() for target in targets],
            "total_seconds": total_seconds,
            "load_at_end": load_at_end,
            "machine_busy": busy,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS_DIR / f"inprocess-{stamp}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    if options.check and not all(target.passed for target in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
