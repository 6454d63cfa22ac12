"""Daemon crash loop: SIGKILL ``facetrt serve`` under load from client processes, again and again.

The daemon is a real ``facetrt serve`` (``tests.lin.recorder.DaemonProcess``: loopback TCP, a
tenant and key made before it starts, the classes Register, Counter, AgentMemory and Alarm).
Several client processes (``python -m tests.crash.daemon_worker``) call it through
``facetrt.client`` and record every outcome (see there). One cycle:

1. the clients are calling (they were told ``go``), and a thread of the parent creates and
   revokes tenant keys through the admin HTTP API (system store writes, ``tests/crash/admin.py``);
   after a random delay the daemon is killed with SIGKILL, and the time it was reaped is noted:
   no call can take effect after it;
2. the clients are told ``pause``: each finishes the call in flight (it fails: the daemon is
   gone) and answers once its records are written; the parent reads the new records;
3. with no process holding the data directory, every LMDB environment is verified with
   ``lmdb.verify`` as the crash left it: every facet's store, the timer index and the system
   store;
4. the daemon is started again on the same data directory and port, and the parent reads every
   facet through ``facetrt.client.SyncClient`` and checks it against the records
   (``tests/crash/expected.py``): every acknowledged write is present;
5. the clients are told ``go`` again.

:meth:`DaemonCrashHarness.finish` then pauses the clients with the daemon running, waits until
every timer has fired (each acknowledged timer exactly once), stops the daemon with SIGTERM,
verifies every environment again, and checks the linearizability of the whole register and
counter history across every kill (``tests/lin/checker.py``), the parent's reads included. An
unknown outcome's no-effect-after time is the end of the daemon process that could have run it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from facetrt import NotFoundError
from facetrt.client import SyncClient
from facetrt.examples import STATS_AGENT
from tests.crash import verify_environments, wait_line
from tests.crash.admin import AdminWriter, KeyExpectation, list_keys
from tests.crash.daemon_worker import (
    ALARM_PREFIX,
    GO,
    MEMORY_PREFIX,
    PAUSE,
    PAUSED,
    READY,
    STOP,
    CallRecord,
    CrashSpec,
)
from tests.crash.expected import (
    CounterExpectation,
    Findings,
    FreshExpectation,
    MemoryExpectation,
    RegisterExpectation,
    StatsExpectation,
    TimerExpectation,
)
from tests.lin.checker import Operation, OpKind
from tests.lin.recorder import (
    HISTORY_FILE,
    REPO_ROOT,
    TENANT,
    DaemonProcess,
    RecordOptions,
    Report,
    check_recorded,
    child_environment,
    no_effect_after,
    worker_spec,
)
from tests.lin.worker import (
    COUNTER_KEY,
    REGISTER_PREFIX,
    operation_from_json,
    operation_to_json,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from facetrt import Value

PARENT_PROCESS_ID: Final = -1  # the parent's reads in the linearizability history
DRAIN_POLL_SECONDS: Final = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonCrashConfig:
    """The load and the kills; random choices come from the harness's generator."""

    processes: int = 4
    register_facets: int = 2
    register_keys: int = 2
    counter_facets: int = 2
    memory_facets: int = 2
    alarm_facets: int = 2
    # Of the calls: appends, timer sets, fresh facets; the rest are register and counter ones.
    append_fraction: float = 0.15
    timer_fraction: float = 0.1
    fresh_fraction: float = 0.01
    timer_delay_max_seconds: float = 0.5
    # Injected faults besides the kills: more unknown outcomes, and drops mid-call.
    short_deadline_fraction: float = 0.01
    drop_fraction: float = 0.01
    # After the clients are told to go. The short end lands in connection and activation.
    kill_after_min_seconds: float = 0.0
    kill_after_max_seconds: float = 1.0
    answer_seconds: float = 60.0  # a client's longest wait for ready or paused
    drain_seconds: float = 30.0  # every timer has fired this long after the clients stop


@dataclass(slots=True, kw_only=True)
class DaemonCycleReport:
    cycle: int
    kill_after_seconds: float
    calls: int = 0  # outcomes recorded during the cycle
    acknowledged: int = 0  # of them, acknowledged writes
    unknown: int = 0  # of them, unknown outcomes
    environments: int = 0  # walked by lmdb.verify after the kill
    lost: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonCrashSummary:
    """The end of a run: the final checks."""

    environments: int
    timers_fired: int
    lost: int
    problems: list[str]
    linearizability: Report


@dataclass(slots=True)
class _Client:
    process: subprocess.Popen[bytes]
    operations: Path  # its linearizability operations, JSON lines
    records: Path  # its other calls, JSON lines
    read: dict[Path, int] = field(default_factory=dict)  # bytes of each file already read

    def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\n".encode())
        self.process.stdin.flush()

    def new_lines(self, path: Path) -> list[str]:
        with path.open("rb") as file:
            file.seek(self.read.get(path, 0))
            data = file.read()
        complete, _, torn = data.rpartition(b"\n")
        # The client is paused: everything it wrote ends with a newline.
        assert not torn, f"{path}: a line without its end: {torn!r}"
        self.read[path] = self.read.get(path, 0) + len(data)
        return complete.decode().splitlines()


class DaemonCrashHarness:
    """Kill-and-check cycles of a daemon under ``work_dir``; use as a context manager.

    Raises:
        RuntimeError: the daemon or a client process did not start or stopped answering.
    """

    def __init__(
        self, work_dir: Path, rng: random.Random, config: DaemonCrashConfig | None = None
    ) -> None:
        self.config = config or DaemonCrashConfig()
        self.work_dir = work_dir
        self.rng = rng
        self.daemon = DaemonProcess(work_dir, http=True)
        self.cycles = 0
        self.history: list[Operation] = []  # register and counter operations, parent's too
        self.counters: dict[str, CounterExpectation] = {}
        self.registers: dict[tuple[str, str], RegisterExpectation] = {}
        self.memories: dict[str, MemoryExpectation] = {}
        self.stats = StatsExpectation(STATS_AGENT)
        self.timers: dict[str, TimerExpectation] = {}
        self.fresh = FreshExpectation()
        self.keys = KeyExpectation(TENANT)
        self._clients: list[_Client] = []

    def __enter__(self) -> DaemonCrashHarness:
        self.daemon.start()
        try:
            listing = list_keys(self.daemon.http_url, self.daemon.admin_key, TENANT)
            self.keys.initial = {str(key["key_id"]) for key in listing}
            self._clients = [self._start_client(index) for index in range(self.config.processes)]
            for client in self._clients:
                self._expect(client, READY)
            self._tell_all(GO)
        except BaseException:
            self._abandon()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._abandon()

    def run_cycle(self, *, after_kill: Callable[[Path], None] | None = None) -> DaemonCycleReport:
        """Kill the daemon under load, verify, restart, check. Problems are reported.

        ``after_kill`` is called with the data directory while no process holds it, after the
        verification and before the restart: the tests inject losses with it, to show that the
        checks find them.
        """
        self.cycles += 1
        config = self.config
        report = DaemonCycleReport(
            cycle=self.cycles,
            kill_after_seconds=self.rng.uniform(
                config.kill_after_min_seconds, config.kill_after_max_seconds
            ),
        )
        admin = AdminWriter(
            self.daemon.http_url,
            self.daemon.admin_key,
            self.keys,
            random.Random(self.rng.randrange(2**32)),
        )
        acknowledged = self.keys.acknowledged
        admin.start()
        time.sleep(report.kill_after_seconds)
        self.daemon.kill()
        killed = self.daemon.ends[-1]
        admin.stop()
        report.calls += admin.requests
        report.unknown += admin.unknown
        report.acknowledged += self.keys.acknowledged - acknowledged
        self._tell_all(PAUSE)
        self._take_records(report, killed)
        report.environments, problems = verify_environments(self.daemon.data_dir)
        report.problems += problems
        if after_kill is not None:
            after_kill(self.daemon.data_dir)
        self.daemon.start()
        findings = self._check()
        report.lost, report.problems = findings.lost, report.problems + findings.problems
        self._tell_all(GO)
        return report

    def finish(self) -> DaemonCrashSummary:
        """Stop the clients, drain the timers, stop the daemon, verify and check everything."""
        self._tell_all(PAUSE)
        for client in self._clients:
            client.tell(STOP)
        report = DaemonCycleReport(cycle=self.cycles + 1, kill_after_seconds=0)
        self._take_records(report, None)
        findings = self._check()
        fired = self._drain(findings)
        returncode = self.daemon.stop()
        if returncode != 0:
            findings.problems.append(f"the daemon exited with {returncode} on SIGTERM")
        environments, problems = verify_environments(self.daemon.data_dir)
        findings.problems += report.problems + problems
        history = no_effect_after(self.history, self.daemon.ends)
        # What was checked, for inspection (the recorder's format).
        (self.work_dir / HISTORY_FILE).write_text(
            "".join(operation_to_json(op) + "\n" for op in history)
        )
        return DaemonCrashSummary(
            environments=environments,
            timers_fired=fired,
            lost=findings.lost,
            problems=findings.problems,
            linearizability=check_recorded(history),
        )

    # -- clients -----------------------------------------------------------------------------

    def _start_client(self, index: int) -> _Client:
        config, daemon = self.config, self.daemon
        load = RecordOptions(
            seed=0,  # unused: worker_spec draws each client's seed from the harness's generator
            processes=config.processes,
            operations=0,  # unused: the parent says when to stop
            register_facets=config.register_facets,
            register_keys=config.register_keys,
            counter_facets=config.counter_facets,
            short_deadline_fraction=config.short_deadline_fraction,
            drop_fraction=config.drop_fraction,
        )
        lin_spec = worker_spec(load, daemon, index, self.rng, time.monotonic())
        operations = Path(lin_spec.output)
        records = self.work_dir / f"worker-{index}.records.jsonl"
        spec = CrashSpec(
            records=str(records),
            memory_facets=[f"{MEMORY_PREFIX}{i}" for i in range(config.memory_facets)],
            alarm_facets=[f"{ALARM_PREFIX}{i}" for i in range(config.alarm_facets)],
            append_fraction=config.append_fraction,
            timer_fraction=config.timer_fraction,
            fresh_fraction=config.fresh_fraction,
            timer_delay_max_seconds=config.timer_delay_max_seconds,
        )
        command = [sys.executable, "-m", "tests.crash.daemon_worker"]
        command += [lin_spec.to_json(), spec.to_json()]
        with (self.work_dir / f"worker-{index}.err").open("ab") as stderr:
            process = subprocess.Popen(
                command,
                bufsize=0,  # commands leave at once; answers are read without read-ahead
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=child_environment(),
                cwd=REPO_ROOT,
            )
        operations.touch()
        records.touch()
        return _Client(process=process, operations=operations, records=records)

    def _tell_all(self, command: str) -> None:
        for client in self._clients:
            client.tell(command)
        if command == PAUSE:
            for client in self._clients:
                self._expect(client, PAUSED)

    def _expect(self, client: _Client, answer: str) -> None:
        if not wait_line(client.process, f"{answer}\n".encode(), self.config.answer_seconds):
            raise RuntimeError(
                f"client {client.operations.name} did not answer {answer!r} within "
                f"{self.config.answer_seconds} s (exit code {client.process.poll()}); "
                f"see {self.work_dir}/worker-*.err"
            )

    def _abandon(self) -> None:
        for client in self._clients:
            with contextlib.suppress(OSError):
                client.tell(STOP)
            try:
                client.process.wait(self.config.answer_seconds)
            except subprocess.TimeoutExpired:
                client.process.kill()
                client.process.wait()
            for pipe in (client.process.stdin, client.process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self._clients = []
        self.daemon.stop()

    # -- records -----------------------------------------------------------------------------

    def _take_records(self, report: DaemonCycleReport, killed: float | None) -> None:
        """Read the clients' new records into the expectations. ``killed``: when the daemon
        that ran them was reaped, the latest an unknown outcome can have taken effect."""
        for client in self._clients:
            for line in client.new_lines(client.operations):
                op = operation_from_json(line)
                if not op.is_known and killed is not None:
                    op = _with_no_effect_after(op, killed)
                self._add_operation(report, op)
            for line in client.new_lines(client.records):
                self._add_record(report, CallRecord.from_json(line))

    def _add_operation(self, report: DaemonCycleReport, op: Operation) -> None:
        self.history.append(op)
        report.calls += 1
        report.unknown += not op.is_known
        if op.facet.startswith(REGISTER_PREFIX):
            where = (op.facet, op.key)
            expectation = self.registers.setdefault(where, RegisterExpectation(f"{where}"))
            acknowledged = expectation.acknowledged
            expectation.add(op)
            report.acknowledged += expectation.acknowledged - acknowledged
        else:
            counter = self.counters.setdefault(op.facet, CounterExpectation(op.facet))
            acknowledged = counter.acknowledged
            counter.add(op)
            report.acknowledged += counter.acknowledged - acknowledged

    def _add_record(self, report: DaemonCycleReport, record: CallRecord) -> None:
        report.calls += 1
        report.unknown += not record.is_known
        report.acknowledged += record.is_known
        if record.facet.startswith(MEMORY_PREFIX):
            memory = self.memories.setdefault(record.facet, MemoryExpectation(record.facet))
            memory.add(record)
        elif record.facet.startswith(ALARM_PREFIX):
            self.timers.setdefault(record.facet, TimerExpectation(record.facet)).add(record)
        else:
            self.fresh.add(record)

    # -- checks ------------------------------------------------------------------------------

    def _check(self) -> Findings:
        """Read every facet the clients touched and check it against their records."""
        findings = Findings()
        with SyncClient(self.daemon.url, key=self.daemon.key) as client:
            for facet, counter in self.counters.items():
                value = self._read(client, facet, COUNTER_KEY, "get", (), "Counter")
                assert isinstance(value, int)
                findings.add(counter.check(value))
            for (facet, key), register in self.registers.items():
                value = self._read(client, facet, key, "get", (key,), "Register")
                findings.add(register.check(value, time.monotonic()))
            for facet, memory in self.memories.items():
                summary = client.call(facet, "summary", cls="AgentMemory")
                assert isinstance(summary, dict)
                turns = summary["turns"]
                assert isinstance(turns, int)
                new = turns - memory.turns
                fresh_turns = client.call(facet, "last", new, cls="AgentMemory") if new > 0 else []
                assert isinstance(fresh_turns, list)
                findings.add(memory.check(turns, fresh_turns))
            if self.memories:
                stats = client.call(STATS_AGENT, "get", cls="Counter")
                assert isinstance(stats, int)
                findings.add(self.stats.check(stats, self.memories.values()))
            for facet, timers in self.timers.items():
                pending, fired = _timers(client, facet)
                findings.add(timers.check(pending, fired))
            values = {facet: _fresh_value(client, facet) for facet in self.fresh.new}
            findings.add(self.fresh.check(values))
        findings.add(
            self.keys.check(list_keys(self.daemon.http_url, self.daemon.admin_key, TENANT))
        )
        return findings

    def _read(
        self,
        client: SyncClient,
        facet: str,
        key: str,
        method: str,
        args: tuple[Value, ...],
        cls: str,
    ) -> Value:
        """A read, recorded in the linearizability history as the parent's."""
        invoke = time.monotonic()
        value = client.call(facet, method, *args, cls=cls)
        complete = time.monotonic()
        assert value is None or isinstance(value, int | str), value
        self.history.append(
            Operation(
                process_id=PARENT_PROCESS_ID,
                facet=facet,
                key=key,
                kind=OpKind.READ,
                result=value,
                invoke_seconds=invoke,
                complete_seconds=complete,
            )
        )
        return value

    def _drain(self, findings: Findings) -> int:
        """Wait until no timer is pending, then check that each fired once; return how many
        timers fired in the whole run."""
        deadline = time.monotonic() + self.config.drain_seconds
        with SyncClient(self.daemon.url, key=self.daemon.key) as client:
            while True:
                pending = {facet: _timers(client, facet)[0] for facet in self.timers}
                if not any(pending.values()) or time.monotonic() > deadline:
                    break
                time.sleep(DRAIN_POLL_SECONDS)
            fired = 0
            for facet, timers in self.timers.items():
                still, counts = _timers(client, facet)
                if still:
                    findings.problems.append(f"{facet}: timers never fired: {sorted(still)[:5]}")
                findings.add(timers.check(still, counts))
                fired += len(counts)
        return fired


def _with_no_effect_after(op: Operation, killed: float) -> Operation:
    # A call invoked after the kill went to the dead daemon: it never took effect at all.
    return dataclasses.replace(op, no_effect_after_seconds=max(killed, op.invoke_seconds))


def _timers(client: SyncClient, facet: str) -> tuple[set[str], dict[str, Value]]:
    """(pending, fired counts), read in that order (see TimerExpectation.check)."""
    listed = client.call(facet, "list_timers", cls="Alarm")
    assert isinstance(listed, list)
    pending = {str(timer["name"]) for timer in listed if isinstance(timer, dict)}
    fired = client.call(facet, "fired", cls="Alarm")
    assert isinstance(fired, dict)
    return pending, fired


def _fresh_value(client: SyncClient, facet: str) -> int | None:
    try:
        value = client.call(facet, "get")
    except NotFoundError:
        return None
    assert isinstance(value, int), value
    return value
