"""The long fuzz run: every target under libFuzzer for N inputs, with a summary to publish.

    .venv/bin/python scripts/fuzz_run.py --runs 1000000            # all targets, in turn
    .venv/bin/python scripts/fuzz_run.py --runs 1000000 --targets frames --workdir /tmp/fz

Each target runs as ``python fuzz/fuzz_<target>.py -runs=N ...`` with its dictionary, a
per-input timeout (a hang is a finding), an RSS limit, and ``FACETRT_FUZZ_ALLOCATIONS=1`` (the
tracemalloc bound per input; ``--no-allocations`` for raw speed). New corpus entries go to
``<workdir>/<target>/corpus`` (the committed seeds in ``fuzz/corpus/<target>`` are read, never
written), crashes, timeouts and OOMs to ``<workdir>/<target>/``, the full log to
``<workdir>/<target>/log.txt``. The summary gives, per target: inputs executed, libFuzzer's
``cov:`` (edges of instrumented facetrt code reached) and ``ft:`` (features), the corpus size,
time and inputs per second, the slowest input, the peak RSS and findings (crash, timeout and
OOM files), with the machine's load before and after. Exit status 1 if any target found
something or failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"frames": "frames.dict", "handshake": "frames.dict", "http_body": "http_body.dict"}
STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
EXECUTED = re.compile(r"^stat::number_of_executed_units:\s+(\d+)")
SLOWEST = re.compile(r"^stat::slowest_unit_time_sec:\s+(\d+)")
PEAK_RSS = re.compile(r"^stat::peak_rss_mb:\s+(\d+)")
FINDINGS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


@dataclass
class Summary:
    target: str
    exit_code: int
    executed: int
    cov: int
    ft: int
    corpus: int
    findings: list[str]
    seconds: float
    slowest_seconds: int
    peak_rss_mb: int

    def line(self) -> str:
        rate = self.executed / self.seconds if self.seconds else 0.0
        found = ", ".join(self.findings) or "none"
        return (
            f"{self.target:<10} exit {self.exit_code}  inputs {self.executed:>9,}  "
            f"cov {self.cov:>4}  ft {self.ft:>5}  corpus {self.corpus:>5}  "
            f"{self.seconds:>7.0f} s  {rate:>6.0f}/s  slowest input {self.slowest_seconds} s  "
            f"peak RSS {self.peak_rss_mb} MB  findings: {found}"
        )


def run_target(target: str, args: argparse.Namespace) -> Summary:
    workdir = Path(args.workdir) / target
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / "fuzz" / f"fuzz_{target}.py"),
        f"-runs={args.runs}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-max_len={args.max_len}",
        f"-dict={ROOT / 'fuzz' / TARGETS[target]}",
        f"-artifact_prefix={workdir}/",
        "-print_final_stats=1",
        str(corpus),
        str(ROOT / "fuzz" / "corpus" / target),
    ]
    if args.seed is not None:
        command.insert(2, f"-seed={args.seed}")
    env = dict(os.environ)
    env["FACETRT_FUZZ_ALLOCATIONS"] = "1" if args.allocations else "0"
    log = workdir / "log.txt"
    started = time.monotonic()
    with log.open("w") as output:
        exit_code = subprocess.run(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode
    seconds = time.monotonic() - started
    return _summarize(target, exit_code, log, workdir, seconds)


def _summarize(target: str, exit_code: int, log: Path, workdir: Path, seconds: float) -> Summary:
    executed = cov = ft = corpus = slowest = rss = 0
    for line in log.read_text(errors="replace").splitlines():
        status = STATUS.match(line)
        if status:
            executed, cov, ft, corpus = (int(group) for group in status.groups())
        for pattern in (EXECUTED, SLOWEST, PEAK_RSS):
            stat = pattern.match(line)
            if stat and pattern is EXECUTED:
                executed = int(stat.group(1))
            elif stat and pattern is SLOWEST:
                slowest = int(stat.group(1))
            elif stat:
                rss = int(stat.group(1))
    findings = sorted(path.name for path in workdir.iterdir() if path.name.startswith(FINDINGS))
    return Summary(target, exit_code, executed, cov, ft, corpus, findings, seconds, slowest, rss)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    parser.add_argument("--workdir", default="fuzz-work", help="corpus, logs and findings")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per input (a hang)")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=8192, help="largest input, bytes")
    parser.add_argument("--seed", type=int, default=None, help="libFuzzer's seed")
    parser.add_argument(
        "--no-allocations",
        dest="allocations",
        action="store_false",
        help="skip the per-input tracemalloc bound (about 2x faster)",
    )
    args = parser.parse_args()
    targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {sorted(TARGETS)}")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(f"commit {commit}, {os.cpu_count()} cpus, load before {_load()}")
    print(f"{args.runs:,} inputs per target, allocations checked: {args.allocations}")
    summaries = []
    for target in targets:
        summary = run_target(target, args)
        summaries.append(summary)
        print(summary.line(), flush=True)
    total = sum(summary.executed for summary in summaries)
    print(f"total inputs {total:,}; load after {_load()}")
    failed = [s.target for s in summaries if s.exit_code != 0 or s.findings]
    print(f"findings or failures: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
