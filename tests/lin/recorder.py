"""The linearizability recorder: real daemon, several client processes, then the checker.

Used by ``tests/lin/test_recorder.py`` (a short run) and ``scripts/lin_record.py`` (long ones).
One run:

1. creates a fresh data directory with one tenant and key (``SystemStore``, before the daemon
   opens the directory), and starts ``facetrt serve`` as a subprocess on loopback (a port picked
   by the kernel, no HTTP) with the classes ``Register`` (``tests.facets``, which has ``cas``)
   and ``Counter`` (``facetrt.examples``);
2. starts ``processes`` worker processes (``python -m tests.lin.worker``, see there), each with
   its own connection, a seed derived from the run's seed, and its own JSON-lines history file;
3. optionally SIGKILLs the daemon ``restarts`` times while the workers run and starts it again
   on the same port and data directory: every call cut short becomes an unknown outcome, and
   every acknowledged write must still be there, or a later read will not linearize;
4. merges the histories, splits them by model (register facets ``reg-*``, counter facets
   ``ctr-*``) and checks each with :func:`tests.lin.checker.check_history`.

The data directory is fresh, so registers start absent (None) and counters at 0, which are the
models' defaults. A seed fixes the run's random choices (operations, values, faults, kill
times); the schedule itself, being real, does not replay.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from facetrt.storage import SystemStore
from tests.lin.checker import (
    COUNTER,
    REGISTER,
    CheckResult,
    Operation,
    PartitionResult,
    Verdict,
    check_history,
)
from tests.lin.worker import REGISTER_PREFIX, WorkerSpec, operation_from_json, operation_to_json
from tests.util import terminate

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
TENANT: Final = "lin"
HOST: Final = "127.0.0.1"
HISTORY_FILE: Final = "history.jsonl"
START_SECONDS: Final = 30.0
STOP_SECONDS: Final = 30.0
SERVING: Final = re.compile(
    r"protocol tcp://127\.0\.0\.1:(\d+), HTTP (?:http://127\.0\.0\.1:(\d+)|off)"
)
CLASSES_TOML: Final = """
[classes]
Register = "tests.facets:Register"
Counter = "facetrt.examples:Counter"
AgentMemory = "facetrt.examples:AgentMemory"
Alarm = "tests.facets:Alarm"
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordOptions:
    """The shape of one recorded run."""

    seed: int
    processes: int = 3
    operations: int = 200  # per worker process
    register_facets: int = 2
    register_keys: int = 2
    counter_facets: int = 2
    deadline_seconds: float = 10.0
    short_deadline_fraction: float = 0.03
    short_deadline_seconds: tuple[float, float] = (0.0001, 0.002)
    drop_fraction: float = 0.03
    drop_after_seconds: tuple[float, float] = (0.0, 0.002)
    restarts: int = 0  # daemon SIGKILLs (and restarts) during the run
    restart_interval_seconds: tuple[float, float] = (0.3, 1.0)
    round_seconds: float | None = None  # rotate to fresh facets this often (see the worker)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recording:
    """What a run recorded."""

    history: list[Operation]
    processes: int
    restarts: int
    record_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """A recorded history's verdict and what checking it cost."""

    operations: int
    unknown: int
    process_ids: int
    results: tuple[CheckResult, ...]  # one per model
    check_seconds: float

    @property
    def verdict(self) -> Verdict:
        verdicts = {result.verdict for result in self.results}
        for verdict in (Verdict.NOT_LINEARIZABLE, Verdict.UNKNOWN):
            if verdict in verdicts:
                return verdict
        return Verdict.LINEARIZABLE

    @property
    def partitions(self) -> tuple[PartitionResult, ...]:
        return tuple(p for result in self.results for p in result.partitions)

    def __str__(self) -> str:
        states = sum(p.states_explored for p in self.partitions)
        lines = [
            f"operations {self.operations} ({self.unknown} unknown outcomes) "
            f"from {self.process_ids} process ids; {len(self.partitions)} partitions; "
            f"checked in {self.check_seconds:.2f} s ({states} states): {self.verdict.value}"
        ]
        lines += [str(p) for p in self.partitions if p.verdict is not Verdict.LINEARIZABLE]
        return "\n".join(lines)


def check_recorded(history: Sequence[Operation]) -> Report:
    """Check a merged history: register facets against REGISTER, counters against COUNTER."""
    registers = [op for op in history if op.facet.startswith(REGISTER_PREFIX)]
    counters = [op for op in history if not op.facet.startswith(REGISTER_PREFIX)]
    started = time.perf_counter()
    results = (check_history(registers, REGISTER), check_history(counters, COUNTER))
    return Report(
        operations=len(history),
        unknown=sum(not op.is_known for op in history),
        process_ids=len({op.process_id for op in history}),
        results=results,
        check_seconds=time.perf_counter() - started,
    )


def child_environment() -> dict[str, str]:
    # FACETRT_* variables would be read as daemon settings; the repository root on the path
    # lets the daemon import tests.facets.
    env = {name: value for name, value in os.environ.items() if not name.startswith("FACETRT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class DaemonProcess:
    """``facetrt serve`` on a data directory, which can be SIGKILLed and started again.

    With ``http`` it also serves the HTTP gateway (admin routes included, with the admin key
    the daemon writes on its first start), on a port the kernel picks and restarts reuse.
    """

    def __init__(self, root: Path, *, http: bool = False) -> None:
        self.root = root
        self.data_dir = root / "data"
        system = SystemStore(self.data_dir / "system")
        try:
            system.create_tenant(TENANT)
            _, self.key = system.create_key(TENANT)
        finally:
            system.close()
        self.config = root / "daemon.toml"
        self.config.write_text(f"data_dir = {str(self.data_dir)!r}\n{CLASSES_TOML}")
        self.port = 0  # the kernel picks the first; restarts reuse it, so clients find it
        self.http_port: int | None = 0 if http else None
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        # time.monotonic() once each daemon process so far had exited and been reaped: no call
        # sent to it can take effect later (see no_effect_after).
        self.ends: list[float] = []

    @property
    def url(self) -> str:
        return f"tcp://{HOST}:{self.port}"

    def start(self) -> None:
        assert self.process is None
        self.starts += 1
        out = self.root / f"daemon-{self.starts}.out"
        command = [sys.executable, "-m", "facetrt", "--log-level", "WARNING", "serve"]
        http = "" if self.http_port is None else f"{HOST}:{self.http_port}"
        command += ["--config", str(self.config), "--listen", f"{HOST}:{self.port}", "--http", http]
        with out.open("wb") as stdout, (self.root / f"daemon-{self.starts}.err").open("wb") as err:
            self.process = subprocess.Popen(
                command, stdout=stdout, stderr=err, env=child_environment(), cwd=REPO_ROOT
            )
        deadline = time.monotonic() + START_SECONDS
        while (match := SERVING.search(out.read_text())) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the daemon did not start; see {out} and its .err")
            time.sleep(0.02)
        self.port = int(match[1])
        if self.http_port is not None:
            self.http_port = int(match[2])

    @property
    def http_url(self) -> str:
        assert self.http_port, "no HTTP gateway, or not started yet"
        return f"http://{HOST}:{self.http_port}"

    @property
    def admin_key(self) -> str:
        """The admin key the daemon wrote on its first start."""
        return (self.data_dir / "admin.key").read_text().strip()

    def kill(self) -> None:
        """SIGKILL: no drain, no close; what was acknowledged must already be durable."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.ends.append(time.monotonic())
        self.process = None

    def stop(self) -> int:
        """SIGTERM (drain, close), SIGKILL if that takes too long; the exit code."""
        process, self.process = self.process, None
        if process is None:
            return 0
        terminate(process, STOP_SECONDS)
        self.ends.append(time.monotonic())
        return process.returncode


@contextlib.contextmanager
def running_daemon(root: Path) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(root)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def record(root: Path, options: RecordOptions) -> Recording:
    """Run the workers against a fresh daemon under ``root``; return the merged history."""
    rng = random.Random(options.seed)
    root.mkdir(parents=True, exist_ok=True)
    restarts = 0
    started = time.monotonic()
    with running_daemon(root) as daemon:
        outputs = [root / f"worker-{index}.jsonl" for index in range(options.processes)]
        epoch = time.monotonic()
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.lin.worker",
                    worker_spec(options, daemon, index, rng, epoch).to_json(),
                ],
                env=child_environment(),
                cwd=REPO_ROOT,
            )
            for index in range(len(outputs))
        ]
        try:
            while restarts < options.restarts and _running(workers):
                time.sleep(rng.uniform(*options.restart_interval_seconds))
                if not _running(workers):
                    break
                daemon.kill()
                daemon.start()
                restarts += 1
            for worker in workers:
                worker.wait()
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
        failed = [w.args for w in workers if w.returncode != 0]
        if failed:
            raise RuntimeError(f"worker processes failed: {failed}")
    history = no_effect_after(
        [
            operation_from_json(line)
            for path in outputs
            for line in path.read_text().splitlines()
            if line
        ],
        daemon.ends,
    )
    # The merged history, no-effect-after times included: what was checked, for inspection.
    (root / HISTORY_FILE).write_text("".join(operation_to_json(op) + "\n" for op in history))
    return Recording(
        history=history,
        processes=options.processes,
        restarts=restarts,
        record_seconds=time.monotonic() - started,
    )


def no_effect_after(history: Sequence[Operation], ends: Sequence[float]) -> list[Operation]:
    """Give each unknown outcome the end of the daemon process that could have run it.

    ``ends`` are the times, in order, at which each daemon process had exited and been reaped
    (processes never overlap: a restart follows the reaping). A call invoked at ``t`` went to
    the process running at ``t``, or to one already dead (then it had no effect at all): either
    way it took effect by the first end at or after ``t``, or never. Without this an unknown
    outcome stays a candidate to the end of its partition, across every later restart.
    """
    assert list(ends) == sorted(ends), ends
    bounded: list[Operation] = []
    for op in history:
        if not op.is_known and op.no_effect_after_seconds is None:
            index = bisect.bisect_left(ends, op.invoke_seconds)
            if index < len(ends):
                op = dataclasses.replace(op, no_effect_after_seconds=ends[index])
        bounded.append(op)
    return bounded


def _running(workers: Sequence[subprocess.Popen[bytes]]) -> bool:
    return any(worker.poll() is None for worker in workers)


def worker_spec(
    options: RecordOptions, daemon: DaemonProcess, index: int, rng: random.Random, epoch: float
) -> WorkerSpec:
    """What worker ``index`` does (its seed drawn from ``rng``); it writes its operations to
    ``worker-<index>.jsonl`` next to the daemon's data directory."""
    return WorkerSpec(
        index=index,
        url=daemon.url,
        key=daemon.key,
        output=str(daemon.root / f"worker-{index}.jsonl"),
        seed=rng.randrange(2**32),
        operations=options.operations,
        register_facets=[f"{REGISTER_PREFIX}{i}" for i in range(options.register_facets)],
        register_keys=[f"k{i}" for i in range(options.register_keys)],
        counter_facets=[f"ctr-{i}" for i in range(options.counter_facets)],
        deadline_seconds=options.deadline_seconds,
        short_deadline_fraction=options.short_deadline_fraction,
        short_deadline_seconds=options.short_deadline_seconds,
        drop_fraction=options.drop_fraction,
        drop_after_seconds=options.drop_after_seconds,
        round_seconds=options.round_seconds,
        epoch=epoch,
    )
