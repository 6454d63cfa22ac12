"""Benchmarks of the daemon over loopback, with their baselines measured in the same run.

    .venv/bin/python -m benchmarks.daemon [--quick] [--repeat N] [--seconds S] [--check] ...

Starts ``facetrt serve`` as a separate process (a fresh data directory, one tenant, loopback
ports picked by the kernel), a bare trio echo server speaking the same framing (another
process), and drives both from a load generator process (``benchmarks._daemon_util``):

- P1, pipelined: one ``Counter`` facet, durable increments, 1 and 8 connections with 128 calls
  in flight each, from a minimal raw-protocol client (coalesced writes), from the
  ``facetrt.client`` async client (128 tasks per connection; with ``retries=0``, so the server
  does the same work, and with its defaults, where every call carries an idempotency key),
  and the same raw client against the echo server;
- P2, one call at a time: latency of one durable increment, next to one durable LMDB commit
  (measured in this process) plus one echo round trip;
- HTTP: the gateway under ``wrk`` (1, 16 and 64 keep-alive connections), or, without ``wrk``,
  no HTTP figures (install it: ``apt-get install wrk``).

Every repeat takes one window of every case in turn, so that load drifting on the machine hits
the daemon and its baselines alike. Prints a table and PASS/FAIL against the targets, and
writes everything to ``benchmarks/results/daemon-<timestamp>.json``. ``--profile`` then runs
one more P1 window (8 connections) under py-spy and prints where the daemon's loop spends its
time, per call.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from ._daemon_util import CpuMark, Spec, cpu_seconds, machine_busy_seconds
from ._util import (
    REPO_ROOT,
    CaseResult,
    Latency,
    describe_load,
    is_busy,
    load_snapshot,
    machine_info,
    render_table,
    scratch_dir,
)
from .inprocess import _open_durable_env, _single_put_commits

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._util import JsonValue

RESULTS_DIR: Final = REPO_ROOT / "benchmarks" / "results"
TENANT: Final = "bench"
AGENT: Final = "counter-1"
# The cases with an idempotency key per call use their own facet: a store holding hundreds of
# thousands of idempotency records commits more pages per write (its free list is larger), and
# the cases run after them (P2 above all) would measure that store, not their own shape.
AGENT_IDEMPOTENT: Final = "counter-idem"
HOST: Final = "127.0.0.1"
WINDOW: Final = 128  # calls in flight per connection (P1)
P1_CONNECTIONS: Final = (1, 8)
HTTP_CONNECTIONS: Final = (1, 16, 64)
OTHER_WORK_CPUS_MAX: Final = 0.25  # other processes' CPU use above which a run is "busy"
START_SECONDS: Final = 30.0
STOP_SECONDS: Final = 20.0

TARGET_P1_CALLS: Final = 50_000.0
TARGET_P1_ECHO_RATIO: Final = 0.4
TARGET_P2_FACTOR: Final = 1.5
WORKERD_CALLS: Final = 1_150.0  # workerd, one Durable Object counter, 16 connections, here
WORKERD_P99_S: Final = 0.096
TARGET_HTTP_FACTOR: Final = 2.0

WRK_SCRIPT: Final = """\
wrk.method = "POST"
wrk.body = '{"class": "Counter"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("FACETRT_BENCH_WRK_KEY")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  -- the whole latency histogram (microseconds:count), so that windows merge exactly
  local parts = {}
  for i = 1, #latency do
    local us, n = latency(i)
    parts[#parts + 1] = us .. ":" .. n
  end
  io.write("HIST " .. table.concat(parts, ",") .. "\\n")
end
"""


@dataclass(frozen=True, slots=True)
class Options:
    seconds: float  # one measured window
    warmup_seconds: float  # unmeasured load before each window, same connections
    http_seconds: int  # wrk takes whole seconds
    repeat: int
    base_dir: Path | None
    quick: bool
    check: bool
    write_json: bool
    profile_seconds: int  # 0: no profile


# -- processes -------------------------------------------------------------------------------


def _child_environment() -> dict[str, str]:
    """This environment without ``FACETRT_*`` (the daemon would read those as settings)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FACETRT_")}
    env["PYTHONUNBUFFERED"] = "1"  # the start lines arrive at once
    return env


def _wait_for_line(path: Path, pattern: re.Pattern[str], process: subprocess.Popen[bytes]) -> str:
    """The first line of ``path`` matching ``pattern``, which ``process`` writes on start."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                if pattern.search(line):
                    return line
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{process.args!r} did not start within {START_SECONDS:g} s")


def _stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the daemon drains and closes), then SIGKILL if it takes too long."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass(slots=True)
class Daemon:
    """``facetrt serve`` in a separate process, on a fresh data directory."""

    process: subprocess.Popen[bytes]
    key: str
    tcp_port: int
    http_port: int
    data_dir: Path
    command: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def running_daemon(root: Path, extra_args: tuple[str, ...] = ()) -> Iterator[Daemon]:
    """``facetrt serve`` on a fresh data directory with one tenant; ``extra_args`` go after
    ``serve`` (``--config FILE``, for instance)."""
    data_dir = root / "data"
    facetrt = [sys.executable, "-m", "facetrt"]
    env = _child_environment()
    created = subprocess.run(
        [*facetrt, "tenant", "create", TENANT, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=START_SECONDS,
    )
    key = created.stdout.strip().splitlines()[-1]
    command = [
        *facetrt,
        "--log-level",
        "WARNING",
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"{HOST}:0",
        "--http",
        f"{HOST}:0",
        *extra_args,
    ]
    out, err = root / "daemon.out", root / "daemon.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
    try:
        line = _wait_for_line(out, re.compile(r"^facetrt serving: "), process)
        match = re.search(r"tcp://[^,]+:(\d+), HTTP http://.+:(\d+)$", line)
        if match is None:
            raise RuntimeError(f"unexpected start line {line!r}")
        yield Daemon(process, key, int(match[1]), int(match[2]), data_dir, command)
    finally:
        code = _stop(process)
        errors = err.read_text().strip()
        if code != 0 or errors:
            print(f"daemon exited with {code}; stderr:\n{errors[-4000:]}", file=sys.stderr)


@contextlib.contextmanager
def running_echo(root: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    out = root / "echo.out"
    command = [sys.executable, "-m", "benchmarks._daemon_util", "echo"]
    with out.open("wb") as stdout:
        process = subprocess.Popen(command, stdout=stdout, cwd=REPO_ROOT)
    try:
        line = _wait_for_line(out, re.compile(r"^echo serving: "), process)
        yield process, int(line.rpartition(":")[2])
    finally:
        _stop(process)


@dataclass(slots=True, kw_only=True)
class Window:
    """One measured window of the load generator."""

    calls: int
    elapsed: float
    acknowledged: int
    errors: dict[str, int]
    latencies: list[float]  # seconds
    server_cpu: float  # seconds of CPU of the whole server process in the window
    server_loop_cpu: float  # of its main thread (the trio loop)
    generator_cpu: float

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Window:
        return cls(
            calls=int(data["calls"]),
            elapsed=float(data["elapsed_s"]),
            acknowledged=int(data["acknowledged"]),
            errors={str(code): int(count) for code, count in data["errors"].items()},
            latencies=[us / 1e6 for us in data["latencies_us"]],
            server_cpu=float(data["server_cpu_s"]),
            server_loop_cpu=float(data["server_loop_cpu_s"]),
            generator_cpu=float(data["generator_cpu_s"]),
        )


class Generator:
    """The load generator process: one JSON spec in, one JSON result out, per window."""

    def __init__(self) -> None:
        command = [sys.executable, "-m", "benchmarks._daemon_util", "generate"]
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=_child_environment(),
            text=True,
        )
        self.pid = self._process.pid

    def run(self, spec: Spec) -> Window:
        stdin, stdout = self._pipes()
        stdin.write(json.dumps(dataclasses.asdict(spec)) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited with {self._process.wait()}")
        return Window.from_json(json.loads(line))

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        return self._process.stdin, self._process.stdout

    def close(self) -> None:
        stdin, _ = self._pipes()
        stdin.close()
        try:
            self._process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@dataclass(slots=True)
class SharingMark:
    """CPU time of the machine and of this benchmark's processes, to tell other work apart."""

    wall: float
    machine: float
    ours: float

    @classmethod
    def take(cls, pids: list[int]) -> SharingMark:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk runs, once waited
        ours = time.process_time() + children.ru_utime + children.ru_stime
        ours += sum(cpu_seconds(pid) for pid in pids)
        return cls(time.monotonic(), machine_busy_seconds(), ours)

    @staticmethod
    def describe(start: SharingMark, end: SharingMark) -> dict[str, float]:
        wall = end.wall - start.wall
        machine = (end.machine - start.machine) / wall
        ours = (end.ours - start.ours) / wall
        return {"machine_cpus": machine, "benchmark_cpus": ours, "other_cpus": machine - ours}


# -- cases -----------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Series:
    """The windows of one case, gathered over the interleaved repeats."""

    key: str
    title: str
    unit: str
    server: str  # "daemon", "echo", "in-process" or "http"
    windows: list[Window] = field(default_factory=list)
    details: dict[str, JsonValue] = field(default_factory=dict)

    @property
    def rates(self) -> list[float]:
        return [window.rate for window in self.windows]

    def result(self) -> CaseResult:
        latencies = [sample for window in self.windows for sample in window.latencies]
        errors: collections.Counter[str] = collections.Counter()
        for window in self.windows:
            errors.update(window.errors)
        notes: dict[str, str] = {}
        calls = sum(window.calls for window in self.windows)
        elapsed = sum(window.elapsed for window in self.windows)
        server_cpu = sum(window.server_cpu for window in self.windows)
        loop_cpu = sum(window.server_loop_cpu for window in self.windows)
        generator_cpu = sum(window.generator_cpu for window in self.windows)
        if self.server != "in-process" and calls and not math.isnan(server_cpu):
            notes["server cpu"] = (
                f"{server_cpu / elapsed:.0%} = {server_cpu / calls * 1e6:.1f} us/call"
            )
            if self.server == "daemon" or self.server == "http":
                notes["loop"] = f"{loop_cpu / elapsed:.0%} = {loop_cpu / calls * 1e6:.1f} us/call"
            if self.server != "http":
                notes["gen cpu"] = f"{generator_cpu / elapsed:.0%}"
        if errors:
            notes["errors"] = f"{sum(errors.values()):,} {dict(errors)}"
        return CaseResult(
            key=self.key,
            title=self.title,
            unit=self.unit,
            rates=self.rates,
            latency=Latency.of(latencies),
            notes=notes,
            details={
                **self.details,
                "server": self.server,
                "calls_per_repeat": [window.calls for window in self.windows],
                "elapsed_s_per_repeat": [window.elapsed for window in self.windows],
                "server_cpu_s_per_repeat": [_finite(w.server_cpu) for w in self.windows],
                "server_loop_cpu_s_per_repeat": [_finite(w.server_loop_cpu) for w in self.windows],
                "generator_cpu_s_per_repeat": [_finite(w.generator_cpu) for w in self.windows],
                "server_cpu_us_per_call": _finite(server_cpu / calls * 1e6) if calls else None,
                "server_loop_cpu_us_per_call": _finite(loop_cpu / calls * 1e6) if calls else None,
                "errors": {**errors},
            },
        )


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass(slots=True)
class Case:
    """One series and how to take a window of it."""

    series: Series
    spec: Spec | None = None  # a load generator window; None: measured here, or wrk
    connections: int = 0  # wrk's


@dataclass(slots=True)
class Bench:
    options: Options
    daemon: Daemon
    echo_pid: int
    echo_port: int
    generator: Generator
    lmdb_dir: Path
    wrk: str | None
    work_dir: Path
    # Protocol increments acknowledged per agent (warm-up and drain included).
    acknowledged: dict[str, int] = dataclasses.field(default_factory=dict)
    http_ok: int = 0  # HTTP increments answered 2xx
    http_connections_total: int = 0  # at most one unanswered request per connection per run

    def spec(
        self,
        kind: str,
        target: str,
        connections: int,
        window: int,
        *,
        agent: str = AGENT,
        **extra: Any,
    ) -> Spec:
        daemon = target == "daemon"
        return Spec(
            kind=kind,
            host=HOST,
            port=self.daemon.tcp_port if daemon else self.echo_port,
            key=self.daemon.key if daemon else "echo",
            agent=agent,
            connections=connections,
            window=window,
            warmup_s=self.options.warmup_seconds,
            seconds=self.options.seconds,
            server_pid=self.daemon.pid if daemon else self.echo_pid,
            **extra,
        )

    def count_acknowledged(self, agent: str, calls: int) -> None:
        self.acknowledged[agent] = self.acknowledged.get(agent, 0) + calls

    def take(self, case: Case) -> None:
        gc.collect()
        if case.spec is not None:
            window = self.generator.run(case.spec)
            if case.spec.port == self.daemon.tcp_port:
                self.count_acknowledged(case.spec.agent, window.acknowledged)
        elif case.series.server == "in-process":
            window = self._commit_window()
        else:
            window = self._wrk_window(case.connections)
        case.series.windows.append(window)

    def _commit_window(self) -> Window:
        """Durable single-put LMDB commits from this process, for ``seconds``."""
        env = _open_durable_env(self.lmdb_dir)
        try:
            latencies: list[float] = []
            _single_put_commits(env, [], deadline=time.perf_counter() + 0.2)  # warm up
            own = time.process_time()
            started = time.perf_counter()
            commits = _single_put_commits(env, latencies, deadline=started + self.options.seconds)
            elapsed = time.perf_counter() - started
        finally:
            env.close()
        return Window(
            calls=commits,
            elapsed=elapsed,
            acknowledged=commits,
            errors={},
            latencies=latencies,
            server_cpu=math.nan,
            server_loop_cpu=math.nan,
            generator_cpu=time.process_time() - own,
        )

    def _wrk(self, connections: int, seconds: int) -> tuple[dict[str, int], list[float], float]:
        """One ``wrk`` run; (its summary, the latency samples, the daemon's CPU seconds...)."""
        assert self.wrk is not None
        script = self.work_dir / "post.lua"
        if not script.exists():
            script.write_text(WRK_SCRIPT)
        url = f"http://{HOST}:{self.daemon.http_port}/v1/facets/{TENANT}/{AGENT}/increment"
        command = [
            self.wrk,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ]
        env = {**_child_environment(), "FACETRT_BENCH_WRK_KEY": self.daemon.key}
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, check=True, timeout=seconds + 60
        )
        summary: dict[str, int] | None = None
        latencies: list[float] = []
        for line in done.stdout.splitlines():
            if line.startswith("WRK "):
                summary = json.loads(line[4:])
            elif line.startswith("HIST ") and len(line) > 5:
                for pair in line[5:].split(","):
                    micros, _, count = pair.partition(":")
                    latencies.extend([int(micros) / 1e6] * int(count))
        if summary is None:
            raise RuntimeError(f"no summary from wrk:\n{done.stdout}\n{done.stderr}")
        ok = summary["requests"] - summary["status"]
        self.http_ok += ok
        self.http_connections_total += connections
        return summary, latencies, summary["duration_us"] / 1e6

    def _wrk_window(self, connections: int) -> Window:
        before = CpuMark.take(self.daemon.pid)
        summary, latencies, elapsed = self._wrk(connections, self.options.http_seconds)
        after = CpuMark.take(self.daemon.pid)
        errors = {
            name: summary[name]
            for name in ("connect", "read", "write", "status", "timeout")
            if summary[name]
        }
        return Window(
            calls=summary["requests"] - summary["status"],
            elapsed=elapsed,
            acknowledged=summary["requests"] - summary["status"],
            errors=errors,
            latencies=latencies,
            server_cpu=after.server - before.server,  # wrk's start and end included (~ms)
            server_loop_cpu=after.server_loop - before.server_loop,
            generator_cpu=math.nan,
        )

    def warm_http(self) -> None:
        """One unmeasured second of HTTP load: hypercorn's first requests are slower."""
        self._wrk(16, 1)


def build_cases(bench: Bench) -> tuple[list[Case], list[Case]]:
    """(protocol cases, HTTP cases), in the order each repeat takes them."""
    protocol: list[Case] = []
    for connections in P1_CONNECTIONS:
        shape = f"{connections} conn{'s' if connections > 1 else ''} x {WINDOW}"
        details: dict[str, JsonValue] = {"connections": connections, "in_flight": WINDOW}
        protocol += [
            Case(
                Series(
                    key=f"echo_{connections}",
                    title=f"(e1) echo server, raw client, {shape}",
                    unit="calls/s",
                    server="echo",
                    details=details,
                ),
                bench.spec("raw", "echo", connections, WINDOW),
            ),
            Case(
                Series(
                    key=f"p1_raw_{connections}",
                    title=f"(P1) daemon, raw client, {shape}",
                    unit="calls/s",
                    server="daemon",
                    details=details,
                ),
                bench.spec("raw", "daemon", connections, WINDOW),
            ),
            Case(
                Series(
                    key=f"p1_client_{connections}",
                    title=f"(P1c) daemon, facetrt.client retries=0, {shape}",
                    unit="calls/s",
                    server="daemon",
                    details={**details, "client_retries": 0},
                ),
                bench.spec("client", "daemon", connections, WINDOW, retries=0),
            ),
            Case(
                Series(
                    key=f"p1_client_default_{connections}",
                    title=f"(P1d) daemon, facetrt.client defaults, {shape}",
                    unit="calls/s",
                    server="daemon",
                    details={**details, "client_retries": 3, "idempotency_key_per_call": True},
                ),
                bench.spec("client", "daemon", connections, WINDOW, agent=AGENT_IDEMPOTENT),
            ),
        ]
    one: dict[str, JsonValue] = {"connections": 1, "in_flight": 1}
    protocol += [
        Case(
            Series(
                key="echo_one_at_a_time",
                title="(e2) echo server, 1 call at a time",
                unit="calls/s",
                server="echo",
                details=one,
            ),
            bench.spec("raw", "echo", 1, 1),
        ),
        Case(
            Series(
                key="p2_one_at_a_time",
                title="(P2) daemon, raw client, 1 call at a time",
                unit="calls/s",
                server="daemon",
                details=one,
            ),
            bench.spec("raw", "daemon", 1, 1),
        ),
        Case(
            Series(
                key="lmdb_commit",
                title="(c) durable LMDB commit, 1 put, in-process",
                unit="commits/s",
                server="in-process",
                details={"options": "sync=True, metasync=True, writemap=False"},
            )
        ),
    ]
    http: list[Case] = []
    if bench.wrk is not None:
        for connections in HTTP_CONNECTIONS:
            http.append(
                Case(
                    Series(
                        key=f"http_{connections}",
                        title=f"(H) HTTP gateway, wrk, {connections} conn"
                        f"{'s' if connections > 1 else ''}",
                        unit="calls/s",
                        server="http",
                        details={"connections": connections, "load_generator": "wrk -t1"},
                    ),
                    connections=connections,
                )
            )
    return protocol, http


# -- report ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    text: str
    value: float
    threshold: float
    shown: str
    at_most: bool = False  # lower is better

    @property
    def passed(self) -> bool:
        return self.value <= self.threshold if self.at_most else self.value >= self.threshold

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "target": self.text,
            "value": self.value,
            "threshold": self.threshold,
            "at_most": self.at_most,
            "passed": self.passed,
        }


def _paired(numerator: CaseResult, denominator: CaseResult) -> float:
    return statistics.median(
        a / b for a, b in zip(numerator.rates, denominator.rates, strict=True) if b
    )


def evaluate(by_key: dict[str, CaseResult]) -> tuple[dict[str, float], list[Target]]:
    ratios: dict[str, float] = {}
    targets: list[Target] = []
    for connections in P1_CONNECTIONS:
        shape = f"{connections} conn{'s' if connections > 1 else ''} x {WINDOW}"
        p1, echo = by_key[f"p1_raw_{connections}"], by_key[f"echo_{connections}"]
        client = by_key[f"p1_client_{connections}"]
        ratio = p1.median / echo.median
        ratios[f"P1 {shape} / echo {shape}"] = ratio
        ratios[f"the same, median of the ratios of windows taken side by side ({shape})"] = _paired(
            p1, echo
        )
        ratios[f"facetrt.client retries=0 / raw client ({shape})"] = client.median / p1.median
        targets += [
            Target(
                f"P1 {shape} >= 50,000 durable calls/s",
                p1.median,
                TARGET_P1_CALLS,
                f"{p1.median:,.0f} calls/s",
            ),
            Target(
                f"P1 {shape} >= 0.4 x echo baseline",
                ratio,
                TARGET_P1_ECHO_RATIO,
                f"{ratio:.2f} x ({p1.median:,.0f} vs {echo.median:,.0f} calls/s)",
            ),
        ]
    p2 = by_key["p2_one_at_a_time"].latency
    commit = by_key["lmdb_commit"].latency
    echo_rt = by_key["echo_one_at_a_time"].latency
    assert p2 is not None
    assert commit is not None
    assert echo_rt is not None
    floor = commit.p50 + echo_rt.p50
    ratios["P2 p50 / (commit p50 + echo round trip p50)"] = p2.p50 / floor
    ratios["P2 p99 / (commit p99 + echo round trip p99)"] = p2.p99 / (commit.p99 + echo_rt.p99)
    targets.append(
        Target(
            "P2 p50 <= 1.5 x (durable commit p50 + echo round trip p50)",
            p2.p50 / floor,
            TARGET_P2_FACTOR,
            f"{p2.p50 / floor:.2f} x ({p2.p50 * 1e3:.3f} ms vs {commit.p50 * 1e3:.3f} + "
            f"{echo_rt.p50 * 1e3:.3f} = {floor * 1e3:.3f} ms)",
            at_most=True,
        )
    )
    http = by_key.get("http_16")
    if http is not None and http.latency is not None:
        ratios["HTTP 16 conns / workerd (1,150 requests/s)"] = http.median / WORKERD_CALLS
        targets += [
            Target(
                "HTTP, 16 conns >= 2 x workerd's 1,150 requests/s",
                http.median,
                TARGET_HTTP_FACTOR * WORKERD_CALLS,
                f"{http.median:,.0f} calls/s = {http.median / WORKERD_CALLS:.2f} x workerd",
            ),
            Target(
                "HTTP, 16 conns: p99 < workerd's 96 ms",
                http.latency.p99,
                WORKERD_P99_S,
                f"p99 {http.latency.p99 * 1e3:.1f} ms",
                at_most=True,
            ),
        ]
    return ratios, targets


# -- profile ---------------------------------------------------------------------------------


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _window_with_sampler(bench: Bench, command: list[str]) -> tuple[Window, str]:
    """One P1 window (8 connections) while ``command`` samples the daemon; (window, stderr).

    The sampler starts after the generator's 1 s warm-up and must stop by itself.
    """
    spec = dataclasses.replace(
        bench.spec("raw", "daemon", 8, WINDOW),
        warmup_s=1.0,
        seconds=float(bench.options.profile_seconds),
    )
    holder: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        time.sleep(1.0)
        holder.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    starter = threading.Thread(target=start)
    starter.start()
    window = bench.generator.run(spec)
    bench.count_acknowledged(spec.agent, window.acknowledged)
    starter.join()
    _, err = holder[0].communicate(timeout=60)
    if holder[0].returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({holder[0].returncode}): {err.decode()[-500:]}")
    return window, err.decode()


def profile_daemon(bench: Bench, stem: Path) -> dict[str, JsonValue]:
    """Where the daemon's loop thread spends its time under P1 load (8 connections), per call.

    1. py-spy (``record --nonblocking --rate 200``, without ``--native`` or ``--idle``: samples
       are CPU time of Python frames, the daemon is not paused) over one P1 window: shares by
       part of the call path and by function, times the window's loop CPU per call.
    2. If ``perf`` is installed, ``perf record`` of the loop thread alone over one more window:
       the share of CPython's cyclic garbage collector, which py-spy cannot see (its time lands
       on whatever Python line allocated when a collection started).

    Each window's own rate shows what the profiler cost (compare with the P1 row).
    """
    pid = str(bench.daemon.pid)
    seconds = str(bench.options.profile_seconds)
    report: dict[str, JsonValue] = {}
    py_spy = _py_spy()
    if py_spy is None:
        print("  profile: py-spy not found; skipped")
        report["py_spy"] = "not found"
    else:
        out = stem.with_name(stem.name + "-py-spy.txt")
        command = [py_spy, "record", "--pid", pid, "--rate", "200", "--nonblocking"]
        command += ["--duration", seconds, "--format", "raw", "--output", str(out)]
        window, _ = _window_with_sampler(bench, command)
        loop_us = window.server_loop_cpu / max(1, window.calls) * 1e6
        summary = summarize_profile(out, loop_us)
        print(
            f"\nprofile: P1 8 conns x {WINDOW} under py-spy (200 Hz): {window.rate:,.0f} calls/s,"
            f" loop {window.server_loop_cpu / window.elapsed:.0%} = {loop_us:.1f} us/call, "
            f"process {window.server_cpu / window.elapsed:.0%}; raw samples in {out.name}"
        )
        print(summary.pop("text"))
        report["py_spy"] = {
            "calls_per_s": window.rate,
            "loop_cpu_us_per_call": loop_us,
            "server_cpu_us_per_call": window.server_cpu / max(1, window.calls) * 1e6,
            "raw_profile": str(out),
            **summary,
        }
    perf = shutil.which("perf")
    if perf is None:
        print("  (perf not found: the garbage collector's share is not measured)")
        report["perf"] = "not found"
        return report
    data = stem.with_name(stem.name + "-perf.data")
    command = [perf, "record", "--freq", "499", "--tid", pid, "--output", str(data)]
    command += ["--", "sleep", seconds]
    window, _ = _window_with_sampler(bench, command)
    loop_us = window.server_loop_cpu / max(1, window.calls) * 1e6
    symbols = subprocess.run(
        [perf, "report", "--input", str(data), "--no-children", "--sort", "symbol", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data.unlink(missing_ok=True)
    shares = summarize_perf(symbols)
    print(
        f"\nperf, loop thread only, P1 8 conns x {WINDOW}: {window.rate:,.0f} calls/s, "
        f"loop {loop_us:.1f} us/call"
    )
    for name, share in shares.items():
        print(f"  {name:<48} {share:>6.1%} {share * loop_us:>8.1f} us/call")
    report["perf"] = {"calls_per_s": window.rate, "loop_cpu_us_per_call": loop_us, **shares}
    return report


GC_SYMBOL: Final = re.compile(
    r"gc_collect|visit_decref|visit_reachable|_traverse|traverse$|PyObject_IS_GC|move_unreachable"
)


def summarize_perf(report: str) -> dict[str, float]:
    """Shares of ``perf report --sort symbol`` samples: the garbage collector, the kernel, ..."""
    shares: dict[str, float] = collections.defaultdict(float)
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(\S+)", line)
        if match is None:
            continue
        share, where, symbol = float(match[1]) / 100, match[2], match[3]
        if where == "k":
            shares["kernel (syscalls, network)"] += share
        elif GC_SYMBOL.search(symbol):
            shares["CPython cyclic garbage collector"] += share
        elif symbol.startswith("_PyEval_EvalFrameDefault"):
            shares["interpreter loop (bytecode)"] += share
        else:
            shares["rest of CPython (objects, calls), msgpack, libc"] += share
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


# Parts of a call's path through the daemon's loop thread, by the first frame that matches.
PROFILE_PARTS: Final = (
    ("read: frames decoded into events", ("Connection.next_event",)),
    ("read: socket receive and epoll", ("SocketStream.receive_some", "get_events")),
    ("dispatch: submit to the runtime", ("_Session._dispatch",)),
    ("facet: handler, storage layer", ("Activation._run_message",)),
    ("facet: turn loop, batching", ("Activation._serve", "Activation.run")),
    ("commit: submit to writer thread", ("Activation._start_commit", "StoreWorkers.submit")),
    ("reply: encode, metrics, queue", ("_Session._answer",)),
    ("commit done: release replies", ("Activation._commit_done",)),
    ("write: join and send", ("_Session._write_loop",)),
    ("HTTP / other tasks", ("hypercorn", "serve_http")),
)


def summarize_profile(path: Path, loop_us_per_call: float) -> dict[str, Any]:
    """Shares of the loop thread's samples by part of the call path, and the top functions."""
    parts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = other_threads = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        if not any(frame.startswith("cmd_serve ") for frame in frames):
            other_threads += count  # writer threads
            continue
        total += count
        for frame in dict.fromkeys(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
        for name, needles in PROFILE_PARTS:
            if any(needle in frame for frame in frames for needle in needles):
                parts[name] += count
                break
        else:
            parts["trio scheduler, other"] += count
    if not total:
        return {"text": "  (no samples of the loop thread)", "samples": 0}
    lines = [f"  loop-thread samples {total:,} (writer threads {other_threads:,})", ""]
    lines.append(f"  {'part of the call path':<40} {'share':>6} {'us/call':>8}")
    ordered = sorted(parts.items(), key=lambda item: -item[1])
    for name, count in ordered:
        share = count / total
        lines.append(f"  {name:<40} {share:>6.1%} {share * loop_us_per_call:>8.1f}")
    lines += ["", f"  {'function (inclusive)':<72} {'share':>6} {'us/call':>8}"]
    skip: tuple[str, ...] = ("<module>", "_run_module_as_main", "_run_code", "main (")
    skip = (*skip, "cmd_serve", "run (trio", "unrolled_run")
    top_inclusive = [
        (frame, count)
        for frame, count in inclusive.most_common(60)
        if not frame.startswith(skip) and count < total
    ][:30]
    for frame, count in top_inclusive:
        share = count / total
        lines.append(f"  {frame[:72]:<72} {share:>6.1%} {share * loop_us_per_call:>8.1f}")
    lines += ["", f"  {'function (self)':<72} {'share':>6} {'us/call':>8}"]
    for frame, count in own.most_common(15):
        share = count / total
        lines.append(f"  {frame[:72]:<72} {share:>6.1%} {share * loop_us_per_call:>8.1f}")
    return {
        "text": "\n".join(lines),
        "samples": total,
        "writer_thread_samples": other_threads,
        "parts": {name: count / total for name, count in ordered},
        "top_inclusive": {frame: count / total for frame, count in top_inclusive},
        "top_self": {frame: count / total for frame, count in own.most_common(15)},
    }


# -- main ------------------------------------------------------------------------------------


def verify_counter(bench: Bench) -> int:
    """Each counter holds every acknowledged increment (``counter-1`` plus HTTP requests cut at
    wrk's end); the sum of the counters."""
    from facetrt.client import SyncClient

    total = 0
    with SyncClient(f"tcp://{HOST}:{bench.daemon.tcp_port}", key=bench.daemon.key) as client:
        for agent in sorted({AGENT, *bench.acknowledged}):
            value = client.call(agent, "get", cls="Counter")
            acknowledged = bench.acknowledged.get(agent, 0)
            low = acknowledged + (bench.http_ok if agent == AGENT else 0)
            high = low + (bench.http_connections_total if agent == AGENT else 0)
            if not isinstance(value, int) or not low <= value <= high:
                raise AssertionError(
                    f"{agent} is {value!r} after {acknowledged:,} acknowledged protocol calls "
                    f"and {bench.http_ok:,} HTTP 2xx (at most {bench.http_connections_total} more)"
                )
            total += value
    return total


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.daemon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 s windows, 1 repeat")
    parser.add_argument("--repeat", type=int, default=None, help="repeats per case (default 3)")
    parser.add_argument("--seconds", type=float, default=None, help="one window (default 2)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch base (default /tmp)")
    parser.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=8,
        default=0,
        metavar="SECONDS",
        help="then profile the daemon under P1 load: py-spy, and perf if installed (8 s each)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    parser.add_argument("--no-json", action="store_true", help="do not write the JSON file")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    repeat = args.repeat if args.repeat is not None else (1 if quick else 3)
    seconds = args.seconds if args.seconds is not None else (1.0 if quick else 2.0)
    if repeat < 1 or seconds <= 0 or args.profile < 0:
        parser.error("--repeat, --seconds and --profile must be positive")
    return Options(
        seconds=seconds,
        warmup_seconds=0.3,
        http_seconds=max(1, round(seconds)),
        repeat=repeat,
        base_dir=args.dir,
        quick=quick,
        check=bool(args.check),
        write_json=not args.no_json,
        profile_seconds=args.profile,
    )


def main(argv: list[str] | None = None) -> int:
    options = _parse(argv)
    wrk = shutil.which("wrk")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_started = time.perf_counter()
    with scratch_dir(options.base_dir, "daemon") as root:
        machine = machine_info(root)
        machine_load = load_snapshot()
        commit = machine["git_commit"]
        print(
            f"facetrt daemon benchmarks over loopback, {machine['date_utc']}\n"
            f"  {machine['cpu_count']} CPUs ({machine['cpu_model']}), {machine['platform']}\n"
            f"  Python {machine['python']}, py-lmdb {machine['py_lmdb']} "
            f"(LMDB {machine['liblmdb']}), trio {machine['trio']}, "
            f"commit {str(commit)[:12] if commit else '?'}"
            f"{' + changes' if machine['git_tracked_changes'] else ''}\n"
            f"  data under {root}: {machine['data_filesystem']}\n"
            f"  {describe_load(machine_load)} (other work on the machine skews the figures)\n"
            f"  {options.repeat} x {options.seconds:g} s windows per case "
            f"(+{options.warmup_seconds:g} s warm-up each), HTTP load: "
            f"{'wrk ' + wrk if wrk else 'none (wrk not found: apt-get install wrk)'}"
            f"{', quick' if options.quick else ''}\n",
            flush=True,
        )
        with (
            running_daemon(root) as daemon,
            running_echo(root) as (echo, echo_port),
            contextlib.closing(Generator()) as generator,
        ):
            print(
                f"  daemon pid {daemon.pid} (tcp {daemon.tcp_port}, http {daemon.http_port}), "
                f"echo pid {echo.pid}, load generator pid {generator.pid}",
                flush=True,
            )
            bench = Bench(
                options=options,
                daemon=daemon,
                echo_pid=echo.pid,
                echo_port=echo_port,
                generator=generator,
                lmdb_dir=root / "lmdb",
                wrk=wrk,
                work_dir=root,
            )
            protocol, http = build_cases(bench)
            pids = [daemon.pid, echo.pid, generator.pid]
            sharing_start = SharingMark.take(pids)
            if http:
                bench.warm_http()
            for repeat in range(options.repeat):
                for case in [*protocol, *http]:
                    bench.take(case)
                    window = case.series.windows[-1]
                    print(
                        f"  [{repeat + 1}/{options.repeat}] {case.series.title}: "
                        f"{window.rate:,.0f} {case.series.unit}",
                        flush=True,
                    )
            sharing = SharingMark.describe(sharing_start, SharingMark.take(pids))
            counter = verify_counter(bench)
            results = [case.series.result() for case in [*protocol, *http]]
            by_key = {result.key: result for result in results}
            ratios, targets = evaluate(by_key)
            total_seconds = time.perf_counter() - run_started
            print(f"\n{render_table(results)}\n")
            print(
                f"counters {AGENT} and {AGENT_IDEMPOTENT} = {counter:,} in all: every "
                "acknowledged increment is there"
            )
            print("\nratios (medians)")
            for text, value in ratios.items():
                print(f"  {text}: {value:.2f}")
            print("\ntargets")
            for target in targets:
                print(f"  {'PASS' if target.passed else 'FAIL'}  {target.text}: {target.shown}")
            if not http:
                print("  (HTTP targets not measured: wrk not found)")
            load_at_end = load_snapshot()
            other_cpus = max(0.0, sharing["other_cpus"])  # tick rounding can make it negative
            print(
                f"\ntotal {total_seconds:.0f} s; CPU use during the measurements: "
                f"{sharing['machine_cpus']:.2f} CPUs busy, of which this benchmark's processes "
                f"{sharing['benchmark_cpus']:.2f} and other work {other_cpus:.2f}\n"
                f"at the end: {describe_load(load_at_end)} (this benchmark's own load included)"
            )
            busy = is_busy(machine_load) or other_cpus > OTHER_WORK_CPUS_MAX
            if busy:
                print("WARNING: the machine was busy with other work; these figures are unreliable")
            profile: dict[str, JsonValue] | None = None
            if options.profile_seconds:
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                profile = profile_daemon(bench, RESULTS_DIR / f"daemon-{stamp}")
        wrk_version = None
        if wrk:
            version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
            wrk_version = (version.stdout or version.stderr).splitlines()[0].strip()

    if options.write_json:
        report: dict[str, JsonValue] = {
            "benchmark": "benchmarks.daemon",
            "machine": machine,
            "options": {
                "seconds": options.seconds,
                "warmup_seconds": options.warmup_seconds,
                "http_seconds": options.http_seconds,
                "repeat": options.repeat,
                "quick": options.quick,
                "in_flight_per_connection": WINDOW,
            },
            "daemon_command": [*daemon.command],
            "wrk": wrk_version,
            "cases": {result.key: result.to_json() for result in results},
            "ratios": {**ratios},
            "targets": [target.to_json() for target in targets],
            "counter": counter,
            "total_seconds": total_seconds,
            "load_at_end": load_at_end,
            "cpu_sharing": {**sharing},
            "machine_busy": busy,
            "profile": profile,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"daemon-{stamp}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    if options.check and not all(target.passed for target in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
