"""Replay inputs through a target's oracle without atheris: reproduce a crash, measure coverage.

    python fuzz/replay.py frames fuzz-work/frames/crash-1a2b...        # one input
    python -m coverage run --branch fuzz/replay.py frames fuzz-work/frames/corpus fuzz/corpus/frames
    python -m coverage report --include='facetrt/protocol/*'

Arguments are a target (``frames``, ``handshake``, ``http_body``) and files or directories of
inputs. The allocation bound is checked (tracemalloc on). An input whose oracle fails stops the
replay with its traceback and its file name.
"""

from __future__ import annotations

import importlib
import sys
import tracemalloc
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: find the fuzz package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(arguments: list[str]) -> int:
    if len(arguments) < 2:
        sys.stderr.write(__doc__ or "")
        return 2
    target, *places = arguments
    check = importlib.import_module(f"fuzz.fuzz_{target}").check
    files = []
    for place in map(Path, places):
        files.extend(sorted(place.iterdir()) if place.is_dir() else [place])
    tracemalloc.start()
    for path in files:
        try:
            check(path.read_bytes())
        except BaseException:
            sys.stderr.write(f"failed on {path}\n")
            raise
    sys.stderr.write(f"{len(files)} inputs replayed through {target}: all oracles held\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
