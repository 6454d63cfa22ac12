"""Helpers of the benchmarks: summaries, machine information, scratch directories, the table."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb
import trio

import facetrt

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


# -- summaries ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when there are none)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True, slots=True)
class Spread:
    """Minimum, median and maximum of one figure over the repeats."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(min(values), statistics.median(values), max(values))

    def to_json(self) -> dict[str, JsonValue]:
        return {"min": self.min, "median": self.median, "max": self.max}


@dataclass(frozen=True, slots=True)
class Latency:
    """Latency percentiles, in seconds, over every sample of every repeat."""

    samples: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ordered = sorted(seconds)
        return cls(
            samples=len(ordered),
            p50=percentile(ordered, 0.50),
            p99=percentile(ordered, 0.99),
            max=ordered[-1] if ordered else math.nan,
        )

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "samples": self.samples,
            "p50_ms": self.p50 * 1e3,
            "p99_ms": self.p99 * 1e3,
            "max_ms": self.max * 1e3,
        }


@dataclass(slots=True, kw_only=True)
class CaseResult:
    """One line of the table: a rate per repeat, latencies, and case-specific figures.

    ``notes`` are printed in the table; ``details`` only go to the JSON file.
    """

    key: str
    title: str
    unit: str
    rates: list[float]
    latency: Latency | None = None
    notes: dict[str, str] = field(default_factory=dict)
    details: dict[str, JsonValue] = field(default_factory=dict)

    @property
    def spread(self) -> Spread:
        return Spread.of(self.rates)

    @property
    def median(self) -> float:
        return self.spread.median

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "title": self.title,
            "unit": self.unit,
            "repeats": [*self.rates],
            "rate": self.spread.to_json(),
            "latency": None if self.latency is None else self.latency.to_json(),
            "notes": {**self.notes},
            "details": self.details,
        }


# -- machine -----------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.rstrip()


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def filesystem_of(path: Path) -> str | None:
    """``<fstype> on <mount point> (<device>)`` for ``path``, from ``/proc/mounts`` (Linux)."""
    resolved = str(path.resolve())
    best: tuple[str, str, str] | None = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            device, mount_point, fstype = parts[0], parts[1], parts[2]
            inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
            if inside and (best is None or len(mount_point) >= len(best[1])):
                best = (device, mount_point, fstype)
    if best is None:
        return None
    return f"{best[2]} on {best[1]} ({best[0]})"


def load_snapshot() -> dict[str, JsonValue]:
    """Load average and pressure stall figures: other work on the machine skews the results."""
    snapshot: dict[str, JsonValue] = {}
    with contextlib.suppress(OSError, AttributeError):
        snapshot["loadavg_1_5_15"] = [round(value, 2) for value in os.getloadavg()]
    for resource in ("cpu", "io"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            first = Path(f"/proc/pressure/{resource}").read_text().splitlines()[0]
            fields = dict(part.split("=") for part in first.split()[1:])
            snapshot[f"pressure_{resource}_some_avg10"] = float(fields["avg10"])
    return snapshot


def is_busy(snapshot: dict[str, JsonValue]) -> bool:
    """Whether other work probably skewed the figures (CPU pressure, or load above the CPUs)."""
    pressure = snapshot.get("pressure_cpu_some_avg10")
    if isinstance(pressure, float) and pressure > 20.0:
        return True
    loadavg = snapshot.get("loadavg_1_5_15")
    cpus = os.cpu_count() or 1
    return isinstance(loadavg, list) and isinstance(loadavg[0], float) and loadavg[0] > 1.5 * cpus


def describe_load(snapshot: dict[str, JsonValue]) -> str:
    loadavg = snapshot.get("loadavg_1_5_15")
    parts = []
    if isinstance(loadavg, list):
        parts.append("load average " + " ".join(f"{value}" for value in loadavg))
    for resource in ("cpu", "io"):
        value = snapshot.get(f"pressure_{resource}_some_avg10")
        if value is not None:
            parts.append(f"{resource} pressure {value}%")
    return ", ".join(parts) or "load unknown"


def source_digest() -> str:
    """SHA-256 over the ``facetrt`` package's Python sources as they are on disk now.

    The working tree may differ from the commit; this pins what was measured.
    """
    package = Path(facetrt.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def machine_info(data_dir: Path) -> dict[str, JsonValue]:
    """Where and on what the figures were measured."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    modified: list[JsonValue] = [line[3:] for line in (status or "").splitlines() if line]
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": _memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "py_lmdb": lmdb.__version__,
        "liblmdb": ".".join(str(part) for part in lmdb.version()),
        "trio": trio.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_tracked_changes": None if status is None else bool(status),
        "git_modified_files": modified,
        "facetrt_source_sha256": source_digest(),
        "data_dir": str(data_dir),
        "data_filesystem": filesystem_of(data_dir),
        "load_at_start": load_snapshot(),
    }


# -- scratch directories -----------------------------------------------------------------


@contextlib.contextmanager
def scratch_dir(base: Path | None, name: str) -> Iterator[Path]:
    """A fresh directory under ``base`` (default: the system's, usually /tmp), removed after."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"facetrt-bench-{name}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- output ------------------------------------------------------------------------------


def format_rate(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def format_ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    milliseconds = seconds * 1e3
    if milliseconds >= 100:
        return f"{milliseconds:,.0f}"
    if milliseconds >= 1:
        return f"{milliseconds:.2f}"
    return f"{milliseconds:.3f}"


def render_table(results: Sequence[CaseResult]) -> str:
    """A plain-text table: one line per case, rates as median [min - max] over the repeats."""
    header = ("case", "median", "min", "max", "unit", "p50 ms", "p99 ms", "notes")
    rows: list[tuple[str, ...]] = [header]
    for result in results:
        spread = result.spread
        latency = result.latency
        rows.append(
            (
                result.title,
                format_rate(spread.median),
                format_rate(spread.min),
                format_rate(spread.max),
                result.unit,
                format_ms(None if latency is None else latency.p50),
                format_ms(None if latency is None else latency.p99),
                ", ".join(f"{name} {value}" for name, value in result.notes.items()),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    right_aligned = {1, 2, 3, 5, 6}
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(widths[column]) if column in right_aligned else cell.ljust(widths[column])
            for column, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_result(name: str, stamp: str, result: dict[str, JsonValue]) -> Path:
    """Write ``result`` to ``benchmarks/results/<name>-<stamp>.json`` (git-ignored)."""
    results = REPO_ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{name}-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out
