"""The seeded simulation in CI: a fixed set of seeds, determinism, and the checker's teeth.

A failing seed prints its report: the seed, the command that replays it
(``.venv/bin/python -m tests.sim --seed N``), the plan, the faults and every violation.
Thousands of seeds: ``scripts/sim_run.py`` (figures in docs/reliability.md, section 1).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from facetrt import FacetAddress, open_runtime
from facetrt.storage import TimerIndex
from tests.sim.checker import Entry, FacetState, check
from tests.sim.facets import CLASS_NAME, CLASSES, ROLLED_BACK, wall_clock
from tests.sim.harness import hint_violations, run_simulation
from tests.sim.history import Status
from tests.sim.plan import TENANT
from tests.sim.timer_checks import TimerRow

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio.testing import MockClock

    from tests.sim.harness import SimResult
    from tests.sim.history import DataOp, Operation

CI_SEEDS = range(1, 101)
REPO_ROOT = Path(__file__).resolve().parents[2]
# Commit failures, index write failures, a crash, a restart, repeats, handler errors; timers set,
# replaced, listed, set again by on_timer, cancelled after a delivery, failing attempts, some
# failed for good (the doctored-history tests below need each of them).
RICH_SEED = 44


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_seed_keeps_every_invariant(seed: int) -> None:
    result = run_simulation(seed)
    assert result.ok, result.report()
    assert result.history.operations, "the run sent nothing"


def test_a_seed_replays_exactly_and_seeds_differ() -> None:
    first = run_simulation(RICH_SEED)
    again = run_simulation(RICH_SEED)
    other = run_simulation(RICH_SEED + 1)
    assert first.history.trace == again.history.trace
    assert first.digest == again.digest
    assert other.digest != first.digest


@pytest.mark.slow
def test_the_replay_command_reproduces_the_run_in_another_process() -> None:
    # What a failure tells its reader to run, in a fresh interpreter with other str hashes.
    expected = run_simulation(RICH_SEED)
    command = [sys.executable, "-m", "tests.sim", "--seed", str(RICH_SEED)]
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=True
    )
    assert f"trace digest: {expected.digest}" in done.stdout, done.stdout
    assert expected.replay in done.stdout


def test_the_schedule_follows_the_seed() -> None:
    # Same plan (workload and fault rates), trio's batch order seeded differently: a
    # different interleaving, so the schedule really is one of the things the seed drives.
    first = run_simulation(RICH_SEED)
    reshuffled = run_simulation(RICH_SEED, schedule_seed=RICH_SEED + 1000)
    assert reshuffled.ok, reshuffled.report()
    assert reshuffled.plan == first.plan
    assert reshuffled.digest != first.digest


def test_a_runtime_that_loses_acknowledged_writes_is_caught() -> None:
    # Broken on purpose: an injected commit failure is reported to the runtime as success,
    # so it acknowledges writes that never reached the disk.
    result = run_simulation(RICH_SEED, lose_failed_commits=True)
    assert result.history.faults["commit_failed"] > 0
    assert not result.ok
    assert result.check.lost_writes > 0
    assert any("acknowledged, but missing from the log" in v for v in result.check.violations)
    assert f"--seed {RICH_SEED}" in result.report()


# -- the checker against doctored histories ---------------------------------------------


@pytest.fixture(scope="module")
def rich() -> SimResult:
    result = run_simulation(RICH_SEED)
    assert result.ok, result.report()
    return result


def _operations(result: SimResult, predicate: Callable[[Operation], bool]) -> list[Operation]:
    found = [op for op in result.history.operations.values() if predicate(op)]
    assert found, "the seed no longer has such an operation: pick another RICH_SEED"
    return found


def _acknowledged_write(result: SimResult) -> Operation:
    return _operations(
        result, lambda op: op.spec.kind in ("add", "put") and op.first_ok() is not None
    )[0]


def _entry(operation: Operation) -> Entry:
    spec = operation.spec
    if spec.kind == "put":
        return Entry(tag=spec.tag, kind="put", first=spec.key, second=spec.value, origin=spec.facet)
    return Entry(tag=spec.tag, kind="add", first=spec.by, second=None, origin=spec.facet)


def _violations(
    result: SimResult,
    states: dict[str, FacetState],
    operations: dict[str, Operation] | None = None,
) -> list[str]:
    return check(operations or result.history.operations, states, rules=result.rules).violations


def test_the_undoctored_history_passes(rich: SimResult) -> None:
    assert _violations(rich, rich.states) == []


def test_a_lost_acknowledged_write_is_caught(rich: SimResult) -> None:
    operation = _acknowledged_write(rich)
    states = copy.deepcopy(rich.states)
    state = states[operation.spec.facet]
    state.log = [entry for entry in state.log if entry.tag != operation.tag]
    violations = _violations(rich, states)
    assert any(operation.tag in v and "acknowledged, but missing" in v for v in violations), (
        violations
    )


def test_a_message_applied_twice_is_caught(rich: SimResult) -> None:
    operation = _acknowledged_write(rich)
    states = copy.deepcopy(rich.states)
    states[operation.spec.facet].log.append(_entry(operation))
    violations = _violations(rich, states)
    assert any(operation.tag in v and "applied 2 times" in v for v in violations), violations


def test_a_failed_operation_that_was_applied_is_caught(rich: SimResult) -> None:
    operation = _operations(rich, lambda op: op.spec.kind in ("add", "put") and op.all_failed())[0]
    states = copy.deepcopy(rich.states)
    states.setdefault(operation.spec.facet, FacetState()).log.append(_entry(operation))
    violations = _violations(rich, states)
    assert any(
        operation.tag in v and "every attempt failed, yet it was applied" in v for v in violations
    ), violations


def test_writes_of_a_handler_that_raised_are_caught(rich: SimResult) -> None:
    operation = _operations(rich, lambda op: op.spec.kind == "fail")[0]
    states = copy.deepcopy(rich.states)
    states.setdefault(operation.spec.facet, FacetState()).log.append(_entry(operation))
    violations = _violations(rich, states)
    assert any(operation.tag in v and "handler raised" in v for v in violations), violations


def test_an_order_against_real_time_is_caught(rich: SimResult) -> None:
    # Two entries of one facet where the first was acknowledged before the second was sent:
    # swapping them in the log contradicts real time.
    for facet, state in rich.states.items():
        operations = rich.history.operations
        for earlier, later in zip(state.log, state.log[1:], strict=False):
            if "fire" in (earlier.kind, later.kind):
                continue  # a timer's delivery: not an operation's own entry
            first, second = operations[earlier.tag], operations[later.tag]
            acknowledged = first.first_ok()
            if (
                acknowledged is not None
                and acknowledged.completed is not None
                and acknowledged.completed < second.first_invoked()
            ):
                states = copy.deepcopy(rich.states)
                log = states[facet].log
                index = log.index(earlier)
                log[index], log[index + 1] = log[index + 1], log[index]
                violations = _violations(rich, states)
                # Now the acknowledged one sits after one that was sent only later.
                assert any(
                    f"{earlier.tag} (at {float(index + 1)}) was acknowledged" in v
                    and f"before {later.tag}" in v
                    for v in violations
                ), violations
                return
    pytest.fail("no acknowledged-then-sent pair in the seed: pick another RICH_SEED")


def test_a_stale_read_is_caught(rich: SimResult) -> None:
    operation = _operations(rich, lambda op: op.spec.kind == "get" and op.first_ok() is not None)[0]
    operations = copy.deepcopy(rich.history.operations)
    attempt = operations[operation.tag].first_ok()
    assert attempt is not None
    assert isinstance(attempt.result, list)
    attempt.result = [-1, attempt.result[1]]  # a value no put ever wrote
    violations = _violations(rich, rich.states, operations)
    assert any(operation.tag in v and "read" in v for v in violations), violations


def test_a_repeat_with_a_different_result_is_caught(rich: SimResult) -> None:
    operation = _operations(rich, lambda op: sum(a.status is Status.OK for a in op.attempts) >= 2)[
        0
    ]
    operations = copy.deepcopy(rich.history.operations)
    repeats = [a for a in operations[operation.tag].attempts if a.status is Status.OK]
    repeats[-1].result = ["not", "the", "first", "result"]
    violations = _violations(rich, rich.states, operations)
    assert any(operation.tag in v and "replies differ" in v for v in violations), violations


def test_state_that_differs_from_its_log_is_caught(rich: SimResult) -> None:
    facet, state = next((f, s) for f, s in rich.states.items() if s.log)
    states = copy.deepcopy(rich.states)
    states[facet] = dataclasses.replace(state, count=state.count + 1)
    violations = _violations(rich, states)
    assert any(f"{facet}: counter is" in v for v in violations), violations


def test_an_entry_nobody_sent_is_caught(rich: SimResult) -> None:
    facet = next(iter(rich.states))
    states = copy.deepcopy(rich.states)
    states[facet].log.append(Entry(tag="nobody:0", kind="add", first=1, second=None))
    violations = _violations(rich, states)
    assert any("never sent" in v for v in violations), violations


def test_overlapping_turns_are_violations(rich: SimResult) -> None:
    result = check(
        rich.history.operations, rich.states, ["f0: c0:2 began inside c1:4"], rules=rich.rules
    )
    assert result.violations == ["turns overlapped: f0: c0:2 began inside c1:4"]


# -- the timer checks against doctored histories ----------------------------------------


def _last_deliveries(result: SimResult) -> list[tuple[str, int, Entry]]:
    """(facet, log index, entry) of deliveries of a set (not of a timer on_timer set again)
    after which nothing set or cancelled their timer: without them it is left undelivered."""
    found = []
    for facet, state in result.states.items():
        for index, entry in enumerate(state.log):
            timer_later = (
                other.first == entry.first
                for other in state.log[index + 1 :]
                if other.kind in ("tset", "tcancel", "fire")
            )
            rearmed = isinstance(entry.second, list) and entry.second[2] is not None
            root = not entry.tag.endswith("+")
            if entry.kind == "fire" and root and not rearmed and not any(timer_later):
                found.append((facet, index, entry))
    assert found, "the seed has no such delivery: pick another RICH_SEED"
    return found


def _set_entry(state: FacetState, instance: str) -> Entry:
    return next(e for e in state.log if e.kind == "tset" and e.tag == instance)


def test_a_timer_never_delivered_is_caught(rich: SimResult) -> None:
    facet, index, entry = _last_deliveries(rich)[0]
    states = copy.deepcopy(rich.states)
    del states[facet].log[index]
    violations = _violations(rich, states)
    assert isinstance(entry.first, str)
    assert any(
        f"timer {entry.first} instance {entry.tag} is missing" in v and "lost timer" in v
        for v in violations
    ), violations


def test_a_timer_left_scheduled_at_the_end_is_caught(rich: SimResult) -> None:
    facet, index, entry = _last_deliveries(rich)[0]
    states = copy.deepcopy(rich.states)
    state = states[facet]
    del state.log[index]
    second = _set_entry(state, entry.tag).second
    assert isinstance(second, list)
    due_ms = second[0]
    assert isinstance(due_ms, int)
    assert isinstance(entry.first, str)
    state.timers.append(
        TimerRow(
            name=entry.first,
            instance=entry.tag,
            due_ms=due_ms,
            attempts=0,
            failed=False,
            error=None,
        )
    )
    violations = _violations(rich, states)
    assert any(f"instance {entry.tag}: still scheduled at the end" in v for v in violations), (
        violations
    )


def test_a_timer_delivered_twice_is_caught(rich: SimResult) -> None:
    facet, _, entry = _last_deliveries(rich)[0]
    states = copy.deepcopy(rich.states)
    states[facet].log.append(entry)
    violations = _violations(rich, states)
    assert any(
        f"instance {entry.tag} was delivered" in v and "delivered before" in v for v in violations
    ), violations


def test_a_delivery_after_its_cancel_is_caught(rich: SimResult) -> None:
    # A cancel that found the timer, moved to just before that timer's delivery.
    for facet, state in rich.states.items():
        for index, cancel in enumerate(state.log):
            if cancel.kind != "tcancel" or cancel.second is not True:
                continue
            fire = next(
                (e for e in state.log[:index] if e.kind == "fire" and e.first == cancel.first),
                None,
            )
            if fire is None:
                continue
            states = copy.deepcopy(rich.states)
            log = states[facet].log
            log.remove(cancel)
            log.insert(log.index(fire), cancel)
            violations = _violations(rich, states)
            assert any(f"instance {fire.tag} was delivered" in v for v in violations), violations
            return
    pytest.fail("no cancel of a timer delivered before it: pick another RICH_SEED")


def test_an_early_delivery_is_caught(rich: SimResult) -> None:
    facet, index, entry = _last_deliveries(rich)[0]
    states = copy.deepcopy(rich.states)
    assert isinstance(entry.second, list)
    early = [entry.second[0], 1_600_000_000.0, entry.second[2]]
    states[facet].log[index] = dataclasses.replace(entry, second=early)
    violations = _violations(rich, states)
    assert any(
        f"instance {entry.tag} attempt" in v and "before its due time" in v for v in violations
    ), violations


def test_a_delivery_at_the_wrong_attempt_is_caught(rich: SimResult) -> None:
    # As if the writes of a failing attempt had survived (or a failure was not counted).
    facet, index, entry = _last_deliveries(rich)[0]
    states = copy.deepcopy(rich.states)
    assert isinstance(entry.second, list)
    attempt = entry.second[0]
    assert isinstance(attempt, int)
    states[facet].log[index] = dataclasses.replace(entry, second=[attempt + 1, *entry.second[1:]])
    violations = _violations(rich, states)
    assert any(f"succeeded at attempt {attempt + 1}" in v for v in violations), violations


def test_a_wrong_cancel_result_is_caught(rich: SimResult) -> None:
    facet, index, entry = next(
        (facet, index, entry)
        for facet, state in rich.states.items()
        for index, entry in enumerate(state.log)
        if entry.kind == "tcancel"
    )
    states = copy.deepcopy(rich.states)
    states[facet].log[index] = dataclasses.replace(entry, second=not entry.second)
    violations = _violations(rich, states)
    assert any(
        f"cancel {entry.tag} of timer" in v and "says it existed" in v for v in violations
    ), violations


def test_a_timer_nobody_set_is_caught(rich: SimResult) -> None:
    # What a timer set in a rolled-back transaction() block would leave if it survived.
    states = copy.deepcopy(rich.states)
    facet = next(iter(states))
    states[facet].timers.append(
        TimerRow(name="rb-t0", instance=ROLLED_BACK, due_ms=0, attempts=0, failed=False, error=None)
    )
    violations = _violations(rich, states)
    assert any(
        "timer rb-t0 instance rolled back exists" in v and "never set" in v for v in violations
    ), violations


def test_a_stale_timer_list_is_caught(rich: SimResult) -> None:
    operation = _operations(rich, lambda op: op.spec.kind == "tlist" and op.first_ok() is not None)[
        0
    ]
    operations = copy.deepcopy(rich.history.operations)
    attempt = operations[operation.tag].first_ok()
    assert attempt is not None
    assert isinstance(attempt.result, list)
    rows, length = attempt.result
    assert isinstance(rows, list)
    attempt.result = [[*rows, ["zz", "nobody", 0, 0, False, None]], length]
    violations = _violations(rich, rich.states, operations)
    assert any(
        f"tlist {operation.tag}" in v and "timer zz instance nobody exists" in v for v in violations
    ), violations


def test_attempts_too_early_too_many_or_of_a_raising_set_are_caught(rich: SimResult) -> None:
    rules = rich.rules
    assert rules.attempts, "the seed has no on_timer attempt: pick another RICH_SEED"
    observed = rules.attempts[0]
    raising = _operations(rich, lambda op: op.spec.kind == "tfail")[0]
    assert isinstance(observed.payload, dict)
    doctored = [
        dataclasses.replace(observed, wall=observed.wall - 3600.0),
        dataclasses.replace(observed, attempt=rules.attempts_max + 1),
        dataclasses.replace(observed, payload={**observed.payload, "i": raising.tag}),
    ]
    rules = dataclasses.replace(rules, attempts=doctored)
    violations = check(rich.history.operations, rich.states, rules=rules).violations
    assert any("before its due time and backoff allow" in v for v in violations), violations
    assert any("an attempt past the last one allowed" in v for v in violations), violations
    assert any(
        f"instance {raising.tag} was set by a message that raised" in v for v in violations
    ), violations


async def test_a_hint_past_a_scheduled_timer_is_caught(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    # The harness's check between runtime lifetimes: a store with a timer due at d and an
    # index that holds nothing, or something later, for its facet.
    data_dir = tmp_path / "data"
    async with open_runtime(data_dir, classes=CLASSES, wall_clock=wall_clock) as runtime:
        await runtime.call(TENANT, "f0", "tset", "c0:0", "t0", 5.0, cls=CLASS_NAME)
    assert hint_violations(data_dir, ["f0", "f1"]) == []
    index = TimerIndex(data_dir / "timers", map_size_bytes=1 << 20, readers_max=1)
    try:
        index.settle(FacetAddress(TENANT, "f0"), None)
    finally:
        index.close()
    violations = hint_violations(data_dir, ["f0", "f1"])
    assert len(violations) == 1
    assert violations[0].startswith("f0: its earliest timer is due at")


def test_handler_error_from_a_handler_that_never_raises_is_caught(rich: SimResult) -> None:
    # What a failed assertion in the facet's code (a timer that does not read back) gives.
    operation = _operations(rich, lambda op: op.spec.kind == "tset" and op.first_ok() is not None)[
        0
    ]
    operations = copy.deepcopy(rich.history.operations)
    attempt = operations[operation.tag].attempts[0]
    attempt.status, attempt.code, attempt.result = Status.FAILED, "handler_error", None
    violations = _violations(rich, rich.states, operations)
    assert any(
        operation.tag in v and "never raises, yet an attempt failed with handler_error" in v
        for v in violations
    ), violations


# -- data operations against doctored histories -------------------------------------------

# Deletes, backups, restores, clones and transfers (export, import) that completed, of facets
# with acknowledged writes before them (the tests below need each of them); DELETE_SEED: a
# completed delete, the last replacement of its facet, that erased acknowledged writes.
DATA_SEED = 47
DELETE_SEED = 6


@pytest.fixture(scope="module")
def data_rich() -> SimResult:
    result = run_simulation(DATA_SEED)
    assert result.ok, result.report()
    return result


@pytest.fixture(scope="module")
def delete_rich() -> SimResult:
    result = run_simulation(DELETE_SEED)
    assert result.ok, result.report()
    return result


def _data_violations(
    result: SimResult,
    states: dict[str, FacetState] | None = None,
    data_ops: list[DataOp] | None = None,
) -> list[str]:
    return check(
        result.history.operations,
        result.states if states is None else states,
        rules=result.rules,
        data_ops=result.history.data_ops if data_ops is None else data_ops,
    ).violations


def _completed(result: SimResult, kind: str) -> list[DataOp]:
    found = [
        op
        for op in result.history.data_ops
        if op.spec.kind == kind and op.status is Status.OK and op.ended is not None
    ]
    assert found, f"the seed has no completed {kind}: pick another DATA_SEED"
    return found


def test_the_data_seed_runs_every_kind_of_data_operation(data_rich: SimResult) -> None:
    for kind in ("delete", "backup", "restore", "clone", "transfer"):
        _completed(data_rich, kind)
    assert _data_violations(data_rich) == []


def test_a_write_that_survives_a_delete_is_caught(delete_rich: SimResult) -> None:
    """A write acknowledged before a completed delete (the facet's last replacement) put back
    at the head of the facet's log: the facet did not start empty."""
    for delete in _completed(delete_rich, "delete"):
        facet = delete.spec.facet
        later = [op for op in delete_rich.history.data_ops if op.started > delete.started]
        if any(op.spec.facet == facet and op.spec.kind != "backup" for op in later):
            continue
        log = delete_rich.states[facet].log
        for operation in delete_rich.history.operations.values():
            first = operation.first_ok()
            spec = operation.spec
            if (
                spec.facet == facet
                and spec.kind in ("add", "put")
                and first is not None
                and first.completed is not None
                and first.completed < delete.started
                and all(entry.tag != operation.tag for entry in log)
            ):
                states = copy.deepcopy(delete_rich.states)
                states[facet].log.insert(0, _entry(operation))
                violations = _data_violations(delete_rich, states)
                assert any(f"{facet}: data operations" in v for v in violations), violations
                return
    pytest.fail("no delete that erased an acknowledged write: pick another DELETE_SEED")


def test_a_backup_without_a_write_acknowledged_before_it_began_is_caught(
    data_rich: SimResult,
) -> None:
    for backup in _completed(data_rich, "backup"):
        assert backup.entries is not None
        facet = backup.spec.facet
        for index, row in enumerate(backup.entries):
            operation = data_rich.history.operations.get(str(row[0]))
            first = None if operation is None else operation.first_ok()
            replaced_before = any(
                op.spec.facet == facet and op.spec.kind != "backup" and op.started < backup.started
                for op in data_rich.history.data_ops
            )
            if (
                first is not None
                and first.completed is not None
                and first.completed < backup.started
                and row[4] == facet
                and not replaced_before
            ):
                data_ops = copy.deepcopy(data_rich.history.data_ops)
                doctored = data_ops[data_rich.history.data_ops.index(backup)]
                assert doctored.entries is not None
                del doctored.entries[index]
                violations = _data_violations(data_rich, data_ops=data_ops)
                assert any(
                    f"backup {backup.spec.tag} of {facet}" in v and "no snapshot" in v
                    for v in violations
                ), violations
                return
    pytest.fail("no backup of a facet never replaced before it: pick another DATA_SEED")


def test_a_clone_that_mixes_old_and_new_state_is_caught(data_rich: SimResult) -> None:
    """The target of the last completed clone keeps an entry of its own from before the clone
    ahead of the copied entries: neither the old state nor the new one."""
    for clone in reversed(_completed(data_rich, "clone")):
        facet = clone.spec.facet
        later = [op for op in data_rich.history.data_ops if op.started > clone.started]
        if any(op.spec.facet == facet and op.spec.kind != "backup" for op in later):
            continue
        for operation in data_rich.history.operations.values():
            first = operation.first_ok()
            spec = operation.spec
            if (
                spec.facet == facet
                and spec.kind in ("add", "put")
                and first is not None
                and first.completed is not None
                and first.completed < clone.started
            ):
                states = copy.deepcopy(data_rich.states)
                log = [e for e in states[facet].log if e.tag != operation.tag]
                states[facet].log = [_entry(operation), *log]
                violations = _data_violations(data_rich, states)
                assert any(f"{facet}: data operations" in v for v in violations), violations
                return
    pytest.fail("no clone onto a facet written before it: pick another DATA_SEED")
