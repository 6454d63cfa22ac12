"""Crash-safety harness: SIGKILL a runtime mid-write, then check that nothing acknowledged is lost.

One cycle:

1. The child (``python -m tests.crash.child``, see ``child.py``) opens the embedded runtime on the
   data directory and drives concurrent ``Counter.increment`` calls on several long-lived
   facets of one tenant, and meanwhile creates a few *fresh* facets (new stores) one after
   another, so that kills also land in store creation. Before each call it appends a *start*
   record to the cycle's log, after each reply (an acknowledgement: the write is durable) an
   *ack* record with the returned value.
2. The parent waits for the child's ``running`` line, sleeps a random delay and sends SIGKILL.
3. The parent verifies, as the crash left them, the LMDB data files of every facet the child
   touched (``lmdb.verify``; the others were not opened since they were last verified), reopens
   the data directory with :func:`facetrt.open_runtime` (its lock must be free) and reads those
   counters. With ``before`` the value read after the previous cycle (0 for a fresh facet),
   each counter must satisfy ``max(ack) <= value <= before + starts``, and every ack must be
   unique and above ``before``.

State accumulates across cycles in the same data directory (and across harnesses: cycle
numbers continue after the logs already there). The pytest test runs a few cycles,
``scripts/crash_loop.py`` hundreds; both end with :meth:`CrashHarness.verify_all`.

Log format, one record per line, ASCII: ``s <agent>`` (call started) and ``a <agent> <value>``
(call acknowledged with ``value``). A write cut short by SIGKILL can only be the last one, so a
final line without its newline is ignored; each cycle has its own log so that a torn tail is
never glued to the next child's first record.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from lmdb import verify as lmdb_verify

from facetrt import FacetAddress, FacetrtError, NotFoundError, RuntimeConfig, open_runtime
from facetrt.examples import Counter

if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Sequence

TENANT: Final = "crash"
CLASSES: Final = {"Counter": Counter}
READY_LINE: Final = b"running\n"
REPO_ROOT: Final = Path(__file__).resolve().parents[2]
DATA_FILE: Final = "data.mdb"
STORE_GLOB: Final = f"tenants/*/facets/*/*/{DATA_FILE}"

# py-lmdb's offline verifier is untyped; give it the type its docstring documents.
_verify_env: Callable[[str], list[str]] = lmdb_verify.verify


def agent_ids(facets: int) -> list[str]:
    """The long-lived facets, incremented in every cycle."""
    return [f"counter-{index}" for index in range(facets)]


def fresh_agent_ids(prefix: str, count: int) -> list[str]:
    """The facets one child creates, in creation order."""
    return [f"{prefix}{index}" for index in range(count)]


def start_record(agent: str) -> bytes:
    return f"s {agent}\n".encode()


def ack_record(agent: str, value: int) -> bytes:
    return f"a {agent} {value}\n".encode()


@dataclass(slots=True)
class CycleLog:
    """What one child logged: calls started and values acknowledged, per agent."""

    starts: collections.Counter[str] = field(default_factory=collections.Counter)
    acks: dict[str, list[int]] = field(default_factory=dict)
    torn_tail: bool = False


def read_log(path: Path) -> CycleLog:
    """Parse a cycle's log; a final line without a newline (a write cut by SIGKILL) is dropped.

    Raises:
        ValueError: a complete line is not a valid record.
    """
    log = CycleLog()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return log  # killed before it opened its log
    complete, newline, tail = data.rpartition(b"\n")
    log.torn_tail = bool(tail)
    if not newline:
        return log
    for number, line in enumerate(complete.split(b"\n"), start=1):
        fields = line.decode("ascii").split(" ")
        if fields[0] == "s" and len(fields) == 2:
            log.starts[fields[1]] += 1
        elif fields[0] == "a" and len(fields) == 3:
            log.acks.setdefault(fields[1], []).append(int(fields[2]))
        else:
            raise ValueError(f"{path}:{number}: malformed record {line!r}")
    return log


def store_dir(data_dir: Path, agent: str) -> Path:
    return data_dir / FacetAddress(TENANT, agent).relative_path()


def verify_store(directory: Path) -> list[str]:
    """Problems ``lmdb.verify`` finds in the environment at ``directory`` (none: it is sound)."""
    try:
        return _verify_env(str(directory))
    except lmdb_verify.VerifyError as exc:
        return [f"cannot verify: {exc}"]


def environment_paths(data_dir: Path) -> list[Path]:
    """The data file of every LMDB environment under a data directory: the facets' stores,
    the timer index and the daemon's system store (those that exist)."""
    paths = sorted(data_dir.glob(STORE_GLOB))
    paths += [
        path
        for path in (data_dir / "timers" / DATA_FILE, data_dir / "system" / DATA_FILE)
        if path.exists()
    ]
    return paths


def verify_environments(data_dir: Path) -> tuple[int, list[str]]:
    """Walk every environment under ``data_dir`` with ``lmdb.verify``; return (environments
    walked, problems).

    Run it only while no process has the directory open (after a kill, before a restart): the
    files are then exactly what the crash left. An empty data file (a kill between creating it
    and LMDB writing its meta pages; LMDB initialises it on the next open) is not walked.
    """
    walked = 0
    problems: list[str] = []
    for path in environment_paths(data_dir):
        if path.stat().st_size == 0:
            continue
        walked += 1
        problems += [
            f"{path.parent}: lmdb.verify: {problem}" for problem in verify_store(path.parent)
        ]
    return walked, problems


def read_counters(data_dir: Path, agents: Sequence[str]) -> dict[str, int | None]:
    """Open the data directory with the runtime and read every counter (None: no such facet).

    Raises:
        FacetrtError: the runtime could not open the directory (``ConfigError`` if it is still
            locked) or a read failed.
    """
    return trio.run(_read_counters, data_dir, agents)


async def _read_counters(data_dir: Path, agents: Sequence[str]) -> dict[str, int | None]:
    values: dict[str, int | None] = {}
    config = RuntimeConfig(commit_threads=2)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        for agent in agents:
            try:
                value = await rt.call(TENANT, agent, "get")
            except NotFoundError:
                values[agent] = None
            else:
                assert isinstance(value, int), f"{agent}: get returned {value!r}"
                values[agent] = value
    return values


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashConfig:
    """Shape of the load and of the kill; the random choices are drawn per cycle."""

    facets: int = 8
    tasks_min: int = 2
    tasks_max: int = 6
    # Facets each child creates, one every ``fresh_interval_seconds`` from the start; spread
    # over the kill window so that some kills land in store creation.
    fresh_facets: int = 4
    fresh_interval_seconds: float = 0.1
    # After the child reports it is running. The short end lands in activation (store open,
    # first commits), the rest in steady group commit.
    kill_after_min_seconds: float = 0.0
    kill_after_max_seconds: float = 0.4
    ready_timeout_seconds: float = 60.0
    child_max_seconds: float = 120.0


@dataclass(slots=True, kw_only=True)
class CycleReport:
    cycle: int
    tasks: int
    kill_after_seconds: float
    started: int = 0
    acknowledged: int = 0
    lost: int = 0
    verified: int = 0
    values: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class CrashHarness:
    """Runs kill-and-check cycles on ``work_dir/data``; logs go to ``work_dir/logs``.

    The values read before the first cycle are the baseline, so a harness can continue on the
    directory of an earlier run.

    Raises:
        FacetrtError: the baseline could not be read.
    """

    def __init__(
        self, work_dir: Path, rng: random.Random, config: CrashConfig | None = None
    ) -> None:
        self.config = config or CrashConfig()
        self.data_dir = work_dir / "data"
        self.log_dir = work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.agents = agent_ids(self.config.facets)
        # Continue the numbering of an earlier run: logs and fresh facet ids stay unique.
        self.cycles = max(
            (int(path.stem.removeprefix("cycle-")) for path in self.log_dir.glob("cycle-*.log")),
            default=0,
        )
        self._rng = rng
        baseline = read_counters(self.data_dir, self.agents)
        # The last value read per facet (long-lived and fresh ones).
        self.values = {agent: value or 0 for agent, value in baseline.items()}

    def run_cycle(self) -> CycleReport:
        """Start a child, kill it, check the directory. Problems are reported, not raised."""
        self.cycles += 1
        config = self.config
        report = CycleReport(
            cycle=self.cycles,
            tasks=self._rng.randint(config.tasks_min, config.tasks_max),
            kill_after_seconds=self._rng.uniform(
                config.kill_after_min_seconds, config.kill_after_max_seconds
            ),
        )
        log_path = self.log_dir / f"cycle-{report.cycle:05d}.log"
        fresh_prefix = f"fresh-{report.cycle:05d}-"
        touched = self.agents + fresh_agent_ids(fresh_prefix, config.fresh_facets)
        self._run_child(report, log_path, fresh_prefix)
        try:
            log = read_log(log_path)
        except ValueError as exc:
            report.problems.append(str(exc))
            return report
        report.started = sum(log.starts.values())
        report.acknowledged = sum(len(values) for values in log.acks.values())
        unknown = (set(log.starts) | set(log.acks)) - set(touched)
        if unknown:
            report.problems.append(f"log names facets not driven: {sorted(unknown)}")
        self._verify_stores(report, touched, log)
        try:
            recovered = read_counters(self.data_dir, touched)
        except FacetrtError as exc:
            report.problems.append(f"cannot reopen the data directory: {exc!r}")
            return report
        for agent in touched:
            self._check_counter(report, agent, recovered[agent], log)
        return report

    def verify_all(self) -> tuple[int, list[str]]:
        """Verify every store under the data directory; return (stores, problems)."""
        return verify_environments(self.data_dir)

    def _run_child(self, report: CycleReport, log_path: Path, fresh_prefix: str) -> None:
        config = self.config
        command = [
            sys.executable,
            "-m",
            "tests.crash.child",
            str(self.data_dir.resolve()),
            str(log_path.resolve()),
            f"--facets={config.facets}",
            f"--tasks={report.tasks}",
            f"--fresh={config.fresh_facets}",
            f"--fresh-prefix={fresh_prefix}",
            f"--fresh-interval={config.fresh_interval_seconds}",
            f"--max-seconds={config.child_max_seconds}",
        ]
        report.problems.extend(
            run_and_kill(command, log_path, config.ready_timeout_seconds, report.kill_after_seconds)
        )

    def _verify_stores(self, report: CycleReport, agents: Sequence[str], log: CycleLog) -> None:
        """Verify the data files of ``agents`` as the crash left them, before anything reopens
        them. A store may be missing only if its facet never acknowledged anything."""
        for agent in agents:
            path = store_dir(self.data_dir, agent) / DATA_FILE
            acknowledged = bool(self.values.get(agent) or log.acks.get(agent))
            size = path.stat().st_size if path.exists() else None
            if size is None or size == 0:
                # Killed before the store was created, or between creating the file and LMDB
                # writing its meta pages (an empty, new environment).
                if acknowledged:
                    report.problems.append(f"{agent}: {DATA_FILE} missing or empty ({size})")
                continue
            problems = verify_store(path.parent)
            report.problems.extend(f"{agent}: lmdb.verify: {problem}" for problem in problems)
            report.verified += 1

    def _check_counter(
        self, report: CycleReport, agent: str, recovered: int | None, log: CycleLog
    ) -> None:
        before = self.values.get(agent, 0)
        acks = log.acks.get(agent, [])
        value = recovered or 0
        if recovered is None and (before or acks):
            report.problems.append(f"{agent}: facet missing after the crash")
        if value < before:
            report.problems.append(f"{agent}: went back from {before} to {value}")
        lost = [ack for ack in acks if ack > value]
        if lost:
            report.lost += len(lost)
            report.problems.append(
                f"{agent}: {len(lost)} acknowledged increments lost: "
                f"read {value}, acknowledged up to {max(lost)}"
            )
        if len(set(acks)) != len(acks):
            repeated = sorted(ack for ack, n in collections.Counter(acks).items() if n > 1)
            report.problems.append(f"{agent}: values acknowledged twice: {repeated[:10]}")
        stale = [ack for ack in acks if ack <= before]
        if stale:
            report.problems.append(
                f"{agent}: acknowledged {stale[:10]}, not above {before} read before the cycle"
            )
        started = log.starts[agent]
        if value > before + started:
            report.problems.append(
                f"{agent}: read {value} but only {before} + {started} increments were started"
            )
        report.values[agent] = value
        self.values[agent] = value


def run_and_kill(
    command: list[str], log_path: Path, ready_timeout_seconds: float, kill_after_seconds: float
) -> list[str]:
    """Start a crash child, let it run ``kill_after_seconds`` once it reports running, then
    SIGKILL it. Returns the problems seen (it never reported running; it exited by itself).

    Its stderr goes to ``log_path`` with the suffix ``.err``; the repository is on its path.
    """
    problems: list[str] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    stderr_path = log_path.with_suffix(".err")
    with (
        stderr_path.open("wb") as stderr,
        subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO_ROOT,
            env=env,
        ) as child,
    ):
        try:
            if wait_line(child, READY_LINE, ready_timeout_seconds):
                time.sleep(kill_after_seconds)
            else:
                problems.append(f"child did not report running within {ready_timeout_seconds} s")
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            returncode = child.wait()
    if returncode != -signal.SIGKILL:
        errors = stderr_path.read_text(errors="replace").strip()[-2000:]
        problems.append(f"child exited with {returncode} instead of being killed; stderr: {errors}")
    return problems


def wait_line(child: subprocess.Popen[bytes], line: bytes, timeout: float) -> bool:
    """Wait for the child to write ``line`` (with its newline) on stdout; False if it writes
    something else, exits, or stays silent until ``timeout``. The child must write nothing
    more before it is answered: a second line would sit in the pipe's reader buffer."""
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    return bool(ready) and child.stdout.readline() == line
