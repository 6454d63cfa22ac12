"""The fuzz targets in CI: the committed corpus replayed, and a short coverage-guided run.

The long run (a million inputs per target) is ``scripts/fuzz_run.py``; its figures are in
``docs/reliability.md`` section 5.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz._harness import ALLOCATIONS_ENV

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"frames": "frames.dict", "handshake": "frames.dict", "http_body": "http_body.dict"}
# Inputs per target, the three at once on the two cores: 39 s of CPU, ~20 s on an idle
# machine. The handshake target's inputs cost twice the others' (frames fed byte by byte).
SHORT_RUNS = {"frames": 20_000, "handshake": 10_000, "http_body": 20_000}
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


def _check(target: str) -> Callable[[bytes], None]:
    module = importlib.import_module(f"fuzz.fuzz_{target}")
    check: Callable[[bytes], None] = module.check
    return check


@pytest.fixture
def allocations_checked() -> Iterator[None]:
    """tracemalloc on, so that each target's allocation bound is asserted too."""
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.usefixtures("allocations_checked")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_committed_corpus_passes_every_oracle(target: str) -> None:
    """Seeds and the reproducers of fixed bugs (``repro-*``) stay clean: a regression of one
    of those bugs fails here, in-process, without atheris."""
    check = _check(target)
    inputs = sorted((ROOT / "fuzz" / "corpus" / target).iterdir())
    assert len(inputs) >= 5
    for path in inputs:
        check(path.read_bytes())


def test_atheris_is_installed_in_ci() -> None:
    """CI must really fuzz: the Hypothesis fallback is for machines without a wheel."""
    if os.environ.get("CI"):
        assert HAS_ATHERIS, "atheris is missing: pip install -e '.[test]' on Linux"


@pytest.mark.slow
def test_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    """Each target for its SHORT_RUNS inputs under libFuzzer (coverage-guided: fixed seed, the
    allocation bound on, 10 s on one input is a hang, 2 GB RSS an OOM): exit status 0 and no
    crash files. Where atheris has no wheel, the same oracles run on Hypothesis' random
    inputs instead (CI has atheris: ``test_atheris_is_installed_in_ci``)."""
    if not HAS_ATHERIS:
        _fallback_run()
        return
    env = {**os.environ, ALLOCATIONS_ENV: "1"}
    runs = {}
    for target, dictionary in TARGETS.items():
        workdir = tmp_path / target
        (workdir / "corpus").mkdir(parents=True)
        command = [
            sys.executable,
            str(ROOT / "fuzz" / f"fuzz_{target}.py"),
            f"-runs={SHORT_RUNS[target]}",
            "-seed=1",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-dict={ROOT / 'fuzz' / dictionary}",
            f"-artifact_prefix={workdir}/",
            str(workdir / "corpus"),
            str(ROOT / "fuzz" / "corpus" / target),
        ]
        log = (workdir / "log.txt").open("w")
        runs[target] = (subprocess.Popen(command, stdout=log, stderr=log, env=env), log)
    failures = []
    for target, (process, log) in runs.items():
        code = process.wait(timeout=600)
        log.close()
        text = (tmp_path / target / "log.txt").read_text(errors="replace")
        found = [path.name for path in (tmp_path / target).iterdir() if "-" in path.name]
        if code != 0 or found or f"Done {SHORT_RUNS[target]} runs" not in text:
            failures.append(f"{target}: exit {code}, findings {found}\n{text[-3000:]}")
    assert not failures, "\n\n".join(failures)


def _fallback_run() -> None:
    checks = [_check(target) for target in TARGETS]

    @settings(
        max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(st.sampled_from(checks), st.binary(max_size=2048))
    def run(check: Callable[[bytes], None], data: bytes) -> None:
        check(data)

    tracemalloc.start()
    try:
        run()
    finally:
        tracemalloc.stop()
