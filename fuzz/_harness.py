"""What the fuzz targets share: the atheris entry point, control bytes, the allocation oracle.

This module must not import facetrt: a target imports facetrt inside :func:`instrumented` so
that atheris rewrites its bytecode for coverage, which only works on modules imported there.

**Allocation oracle.** With ``FACETRT_FUZZ_ALLOCATIONS=1`` in the environment, tracemalloc runs
for the whole session and :func:`bounded_allocation` asserts, per input, that the peak of memory
allocated by Python in one path (the peak minus what was held before it) stays within the
bound the target states. This sees what ``-rss_limit_mb`` cannot: a 3 KB input that allocates
80 MB and frees it again before the next input. It slows a run down about 2x (see
``docs/reliability.md``), so it is a mode, on in the CI run and in the documented long run.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

ALLOCATIONS_ENV = "FACETRT_FUZZ_ALLOCATIONS"


def instrumented(*, enabled: bool) -> contextlib.AbstractContextManager[object]:
    """atheris' import hook for facetrt (coverage for the search), or nothing.

    ``enabled`` is true when the target runs as a script; an import by pytest (which replays
    the corpus through ``check``) gets the plain modules.
    """
    if not enabled:
        return contextlib.nullcontext()
    from atheris.import_hook import instrument_imports

    return instrument_imports(include=["facetrt"])


def bounded_allocation(run: Callable[[], T], bytes_max: int, what: str) -> T:
    """``run()``, asserting that it allocates at most ``bytes_max`` bytes at its peak.

    Only when tracemalloc is on (``FACETRT_FUZZ_ALLOCATIONS=1``). A run over the bound is
    measured again before it counts: the first run of a path may fill lazy caches (the ``re``
    cache, interned strings, atheris' own comparison tables), which is not the input's doing.
    ``run`` must therefore be repeatable: it builds its own state from the input.
    """
    if not tracemalloc.is_tracing():
        return run()
    result, peak = _measured(run)
    if peak > bytes_max:
        result, peak = _measured(run)
        assert peak <= bytes_max, f"{what}: peak allocation {peak} bytes, over {bytes_max}"
    return result


def _measured(run: Callable[[], T]) -> tuple[T, int]:
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    result = run()
    return result, tracemalloc.get_traced_memory()[1] - held


def scratch_directory(name: str) -> Path:
    """A fresh directory for this process's stores: ``<tmp>/facetrt-fuzz/<pid>/<name>``.

    A normal exit (pytest) removes it, after the stores registered later have closed;
    libFuzzer ends the process without running ``atexit``, so directories of processes that
    are gone are removed here, when a later run starts.
    """
    base = Path(tempfile.gettempdir()) / "facetrt-fuzz"
    base.mkdir(exist_ok=True)
    for other in base.iterdir():
        if other.name.isdigit() and not _alive(int(other.name)):
            shutil.rmtree(other, ignore_errors=True)
    mine = base / str(os.getpid())
    directory = mine / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    atexit.register(shutil.rmtree, mine, ignore_errors=True)
    return directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Control:
    """The control bytes at the front of an input (missing ones read as 0), then the payload.

    A fixed-size header keeps the payload aligned with the seeds and the dictionary, and lets
    libFuzzer flip one choice (limit, split points, mode) with a one-byte mutation.
    """

    def __init__(self, data: bytes, size: int) -> None:
        self._head = data[:size].ljust(size, b"\0")
        self.payload = data[size:]

    def byte(self, index: int) -> int:
        return self._head[index]

    def pick(self, index: int, choices: tuple[int, ...]) -> int:
        return choices[self._head[index] % len(choices)]


def split_points(data_length: int, seed: int, pieces_max: int) -> list[int]:
    """Ascending cut positions inside ``data_length`` chosen by ``seed``; 255 cuts every byte.

    A small deterministic generator (not ``random``, whose algorithm may change) keeps every
    crash file a reproducer.
    """
    if data_length <= 1 or seed == 0:
        return []
    if seed == 255:
        return list(range(1, data_length))
    state = seed * 2654435761 & 0xFFFFFFFF
    cuts = set()
    for _ in range(1 + seed % pieces_max):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        cuts.add(1 + state % (data_length - 1))
    return sorted(cuts)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (ascending, inside the data); no piece is empty (EOF)."""
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds) if end > start]


def fuzz_main(check: Callable[[bytes], None]) -> None:
    """Run ``check`` under libFuzzer with this process's command line (libFuzzer's flags)."""
    import atheris

    if os.environ.get(ALLOCATIONS_ENV) == "1":
        tracemalloc.start()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
