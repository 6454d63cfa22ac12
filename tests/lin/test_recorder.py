"""The recorder end to end: a real daemon, client processes, unknown outcomes, the checker.

One short recording (3 worker processes x 200 operations, with short deadlines and dropped
connections) is shared by the tests: it must be linearizable, and the same pipeline must reject
it once one recorded result is falsified, so a pass is not the checker seeing nothing.
``FACETRT_LIN_SEED`` replays a failed run's random choices.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest

from tests.lin.checker import Operation, OpKind, Verdict
from tests.lin.recorder import Recording, RecordOptions, check_recorded, record
from tests.lin.worker import REGISTER_PREFIX


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Recording]:
    seed = int(os.environ.get("FACETRT_LIN_SEED") or random.SystemRandom().randrange(2**32))
    root = tmp_path_factory.mktemp("lin")
    # Fault rates well above the long run's, so that a short run has unknown outcomes too.
    options = RecordOptions(
        seed=seed, processes=3, operations=200, short_deadline_fraction=0.05, drop_fraction=0.05
    )
    return seed, record(root, options)


@pytest.mark.slow
def test_recorded_history_is_linearizable(recording: tuple[int, Recording]) -> None:
    seed, recorded = recording
    history = recorded.history
    report = check_recorded(history)
    context = f"seed {seed} (FACETRT_LIN_SEED={seed} replays its choices)"
    assert report.verdict is Verdict.LINEARIZABLE, f"{context}\n{report}"
    assert report.operations == 3 * 200, context  # overloaded refusals are left out: none here
    kinds = {(op.facet.startswith(REGISTER_PREFIX), op.kind) for op in history if op.is_known}
    assert kinds == {
        (True, OpKind.READ),
        (True, OpKind.WRITE),
        (True, OpKind.CAS),
        (False, OpKind.READ),
        (False, OpKind.INCREMENT),
    }, context
    assert any(op.kind is OpKind.CAS and op.result is True for op in history), context
    # The faults did their job: some outcomes are unknown, and each one ended its process id.
    assert report.unknown > 0, context
    assert report.process_ids > 3, context


def _read_from_the_future(
    history: list[Operation], counters: bool, rng: random.Random
) -> tuple[int, Operation] | None:
    """A known read, falsified to return a value that only a later operation produced.

    Register: the value of a write or cas invoked after the read completed (values are unique,
    so nothing else wrote it). Counter: the total a later increment returned, which exceeds
    anything the counter held before, since every amount is positive. Either way no order can
    explain the read: the pipeline must say not linearizable, whatever the schedule was.
    """
    choices: list[tuple[int, Operation]] = []
    for index, read in enumerate(history):
        if read.kind is not OpKind.READ or read.complete_seconds is None:
            continue
        if read.facet.startswith(REGISTER_PREFIX) == counters:
            continue
        for later in history:
            if (later.facet, later.key) != (read.facet, read.key):
                continue
            if later.invoke_seconds <= read.complete_seconds:
                continue
            if later.kind in (OpKind.WRITE, OpKind.CAS):
                value = later.argument
            elif later.kind is OpKind.INCREMENT and later.is_known:
                value = later.result
            else:
                continue
            choices.append((index, dataclasses.replace(read, result=value)))
            break
    return rng.choice(choices) if choices else None


@pytest.mark.slow
@pytest.mark.parametrize("counters", [False, True], ids=["register", "counter"])
def test_pipeline_rejects_a_tampered_history(
    recording: tuple[int, Recording], counters: bool
) -> None:
    seed, recorded = recording
    history = list(recorded.history)
    falsified = _read_from_the_future(history, counters, random.Random(seed))
    assert falsified is not None, f"seed {seed}: no read to falsify"
    index, tampered = falsified
    history[index] = tampered

    report = check_recorded(history)
    assert report.verdict is Verdict.NOT_LINEARIZABLE, f"seed {seed}: {tampered}\n{report}"
    failed = {str(p.partition) for p in report.partitions if p.verdict is not Verdict.LINEARIZABLE}
    assert failed == {f"{tampered.facet}:{tampered.key}"}, f"seed {seed}\n{report}"
