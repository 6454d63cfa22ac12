"""Storage fault campaign: fail fdatasync, fsync, pwrite, writev and fill the disk, at random,
under a running daemon; nothing acknowledged may be lost and every environment must verify.

    .venv/bin/python scripts/fault_run.py --rounds 100 [--seed N] [--dir D]
        [--disk tmpfs|rlimit|off] [--disk-mib 256]

Needs ``fiu-run`` / ``fiu-ctrl`` (Debian ``fiu-utils``); ``--disk tmpfs`` needs root (it mounts a
tmpfs for the data directory and falls back to a file size limit where mounting is refused).

One daemon (``facetrt serve`` under ``fiu-run -x``, see ``tests/faults/daemon.py``) serves,
the whole time: counters incremented by pipelined callers, counters only read, new facets
created one after another, timers set on Alarm facets, tenants created through the admin API,
and ``/healthz`` polled. Each round picks a fault: one of the four calls, either armed once
(``onetime``, 1 to 5 times) or failing at random (probability 0.02 to 0.3) for 0.2 to 1 s, or
a full disk for 0.2 to 1 s; then 0.2 s without faults.

At the end: every acknowledged timer must have fired exactly once and no refused one; every
created tenant must exist and no refused one; the daemon is stopped (SIGTERM, exit 0), every
LMDB environment is verified, the daemon is started again without faults and every counter is
held against its callers' acknowledgements (``tests/faults/workload.py``). Prints one line per
ten rounds and a summary; exits 1 on any problem, keeping the work directory.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from facetrt.client import connect  # noqa: E402
from tests.crash import verify_environments  # noqa: E402
from tests.faults.daemon import FaultDaemon, fiu_available  # noqa: E402
from tests.faults.disk import SmallDisk, small_disk  # noqa: E402
from tests.faults.workload import (  # noqa: E402
    Ledger,
    LoadShape,
    check_tenants,
    check_timers,
    create_loop,
    read_counters,
    run_load,
    tenant_loop,
    timer_loop,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import httpx

CALLS: Final = ("fdatasync", "fsync", "pwrite", "writev")
KINDS: Final = (*CALLS, "disk full")
PROBABILITIES: Final = (0.02, 0.1, 0.3)
SHAPE: Final = LoadShape(
    writers=tuple(f"w{index}" for index in range(8)),
    callers_per_writer=4,
    readers=tuple(f"r{index}" for index in range(4)),
)
ALARMS: Final = ("alarm-0", "alarm-1")
# Where a client saw its call fail (``tests.faults.workload.failure_kind``).
CALL_FAILURE_PLACES: Final = (
    "facet commit",
    "facet read",
    "timer index write",
    "store creation",
    "system store write",
    "other",
)
METRICS: Final = {
    "commits failed": "facetrt_commit_failures_total",
    "facets reset": "facetrt_facet_resets_total",
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    parser.add_argument("--disk", choices=("tmpfs", "rlimit", "off"), default="tmpfs")
    parser.add_argument("--disk-mib", type=int, default=256, help="tmpfs size")
    options = parser.parse_args()
    if not fiu_available():
        print("fiu-run and fiu-ctrl are missing: apt-get install fiu-utils", file=sys.stderr)
        return 2
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**32)
    work_dir = options.dir or Path(tempfile.mkdtemp(prefix="facetrt-faults-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"fault campaign: seed {seed}, {options.rounds} rounds, work dir {work_dir}", flush=True)
    campaign = Campaign(work_dir, random.Random(seed), options)
    started = time.perf_counter()
    problems = trio.run(campaign.run)
    campaign.report(time.perf_counter() - started, seed)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        print(f"work dir kept for inspection: {work_dir}")
        return 1
    if options.dir is None:
        shutil.rmtree(work_dir)
    return 0


class Campaign:
    def __init__(self, root: Path, rng: random.Random, options: argparse.Namespace) -> None:
        self.root = root
        self.rng = rng
        self.options = options
        self.ledger = Ledger()
        self.disk_kind = "off"
        self.rounds: collections.Counter[str] = collections.Counter()
        self.armed: collections.Counter[str] = collections.Counter()  # one-shot faults
        self.windows: collections.Counter[str] = collections.Counter()  # random windows
        # kind -> what failed during its rounds (client-visible failures by place, and the
        # daemon's own counts of failed commits and reset facets).
        self.effects: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.verified = 0
        self.lost = 0
        self.values_checked = 0

    @contextlib.contextmanager
    def _disk(self) -> Iterator[SmallDisk | None]:
        if self.options.disk == "off":
            yield None
            return
        with small_disk(
            self.root, prefer=self.options.disk, size=self.options.disk_mib << 20
        ) as disk:
            self.disk_kind = disk.kind
            yield disk

    async def run(self) -> list[str]:
        with self._disk() as disk:
            data_dir = disk.data_dir if disk is not None else self.root / "data"
            daemon = FaultDaemon(self.root / "daemon", data_dir=data_dir, fiu=True)
            if disk is not None:
                disk.daemon = daemon
            await _blocking(daemon.start)
            try:
                problems = await self._serve_and_inject(daemon, disk)
            finally:
                code = await _blocking(daemon.stop)
            if code != 0:
                problems.append(f"the daemon exited with {code}: {daemon.stderr_text()[-2000:]}")
            if "Traceback" in daemon.stderr_text():
                problems.append(f"a traceback in the daemon's log {daemon.stderr_path}")
            self.verified, verify_problems = verify_environments(data_dir)
            problems += verify_problems
            daemon.fiu = False
            await _blocking(daemon.start)
            try:
                problems += await self._check_after_restart(daemon)
            finally:
                await _blocking(daemon.stop)
        return problems

    async def _serve_and_inject(self, daemon: FaultDaemon, disk: SmallDisk | None) -> list[str]:
        ledger = self.ledger
        async with (
            connect(daemon.url, key=daemon.key, retries=0) as client,
            daemon.http() as http,
        ):
            for reader in SHAPE.readers:
                await client.call(reader, "increment", cls="Counter")
                ledger.facet(reader).acks.append(1)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(run_load, daemon.url, daemon.key, http, SHAPE, ledger, stop)
                nursery.start_soon(create_loop, client, ledger, "new-", stop)
                for alarm in ALARMS:
                    nursery.start_soon(
                        functools.partial(
                            timer_loop, client, ledger, alarm, stop, after_seconds=0.1
                        )
                    )
                nursery.start_soon(tenant_loop, http, daemon.admin_key, ledger, "camp-", stop)
                for number in range(1, self.options.rounds + 1):
                    await self._round(daemon, disk, http)
                    if number % 10 == 0 or number == self.options.rounds:
                        self._progress(number)
                stop.set()
            problems = await check_timers(client, ledger, seconds=120)
            problems += await check_tenants(http, daemon.admin_key, ledger)
            values = await read_counters(daemon.url, daemon.key, sorted(ledger.facets))
            lost, counter_problems = ledger.check(values)
            self.lost = max(self.lost, lost)
            problems += counter_problems
        return problems

    async def _check_after_restart(self, daemon: FaultDaemon) -> list[str]:
        ledger = self.ledger
        values = await read_counters(daemon.url, daemon.key, sorted(ledger.facets))
        self.values_checked = len(values)
        lost, problems = ledger.check(values)
        self.lost = max(self.lost, lost)
        async with (
            connect(daemon.url, key=daemon.key, retries=0) as client,
            daemon.http() as http,
        ):
            problems += await check_timers(client, ledger, seconds=0)
            problems += await check_tenants(http, daemon.admin_key, ledger)
        return [f"after the restart: {problem}" for problem in problems]

    async def _round(
        self, daemon: FaultDaemon, disk: SmallDisk | None, http: httpx.AsyncClient
    ) -> None:
        rng = self.rng
        kinds = KINDS if disk is not None else CALLS
        kind = rng.choice(kinds)
        self.rounds[kind] += 1
        before = await self._snapshot(daemon, http)
        if kind == "disk full":
            assert disk is not None
            await _blocking(disk.fill)
            await trio.sleep(rng.uniform(0.2, 1.0))
            await _blocking(disk.free)
        elif rng.random() < 0.5:
            for _ in range(rng.randint(1, 5)):
                self.armed[kind] += 1
                await _blocking(functools.partial(daemon.enable, kind, once=True))
                await trio.sleep(rng.uniform(0.02, 0.2))
                await _blocking(daemon.disable, kind)  # if no such call came meanwhile
        else:
            self.windows[kind] += 1
            probability = rng.choice(PROBABILITIES)
            await _blocking(functools.partial(daemon.enable, kind, probability=probability))
            await trio.sleep(rng.uniform(0.2, 1.0))
            await _blocking(daemon.disable, kind)
        await trio.sleep(0.2)  # what failed in the round has been answered and reset
        after = await self._snapshot(daemon, http)
        after.subtract(before)
        self.effects[kind].update(+after)

    async def _snapshot(
        self, daemon: FaultDaemon, http: httpx.AsyncClient
    ) -> collections.Counter[str]:
        snapshot = collections.Counter(self.ledger.failure_kinds)
        for label, metric in METRICS.items():
            snapshot[label] = int(await daemon.metric(http, metric))
        return snapshot

    def _progress(self, number: int) -> None:
        ledger = self.ledger
        resets = sum(effects["facets reset"] for effects in self.effects.values())
        print(
            f"round {number}/{self.options.rounds}: {ledger.acknowledged} acknowledged, "
            f"{ledger.failed} failed calls, {resets} facets reset",
            flush=True,
        )

    def report(self, seconds: float, seed: int) -> None:
        ledger = self.ledger
        print(f"data directory on: {self.disk_kind}")
        print(
            "faults injected, by kind: rounds (one-shot faults armed, random windows) -> "
            "operations failed (facet commits, new-store creations, system-store writes); "
            "calls failed; facets reset"
        )
        total_operations = 0
        for kind in KINDS:
            if not self.rounds[kind]:
                continue
            effects = self.effects[kind]
            operations = {
                "commits": effects["commits failed"],
                "creations": effects["store creation"],
                "system-store writes": effects["system store write"],
            }
            total_operations += sum(operations.values())
            calls = sum(effects[place] for place in CALL_FAILURE_PLACES)
            print(
                f"  {kind:10} {self.rounds[kind]:4} rounds ({self.armed[kind]} armed, "
                f"{self.windows[kind]} windows) -> {sum(operations.values())} operations failed "
                f"({', '.join(f'{count} {name}' for name, count in operations.items())}); "
                f"{calls} calls failed; {effects['facets reset']} facets reset"
            )
        for place, message in sorted(ledger.failure_samples.items()):
            print(f"  e.g. {place}: {message[:160]}")
        timers_set = sum(len(names) for names in ledger.timers_set.values())
        timers_refused = sum(len(names) for names in ledger.timers_refused.values())
        resets = sum(effects["facets reset"] for effects in self.effects.values())
        print(
            f"fault campaign summary: {sum(self.rounds.values())} rounds, "
            f"{total_operations} operations failed by injected faults, "
            f"{ledger.acknowledged} increments acknowledged ({ledger.failed} failed, "
            f"{sum(e.unknown for e in ledger.facets.values())} unknown) on "
            f"{len(ledger.facets)} facets, {ledger.reads} reads ({len(ledger.read_failures)} "
            f"failed), {ledger.health_checks} /healthz ({len(ledger.health_failures)} failed), "
            f"{timers_set} timers acknowledged ({timers_refused} refused), "
            f"{len(ledger.tenants_created)} tenants created ({len(ledger.tenants_refused)} "
            f"refused); {resets} facets reset; acknowledged writes lost: {self.lost}; "
            f"{self.verified} environments verified; {self.values_checked} counters checked "
            f"after a restart; {seconds:.1f} s (seed {seed})"
        )


async def _blocking(fn: Callable[..., Any], *args: object) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


if __name__ == "__main__":
    sys.exit(main())
