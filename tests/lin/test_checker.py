"""The linearizability checker accepts what is linearizable and rejects what is not.

Hand-written histories pin the classic anomalies; Hypothesis builds histories from a real
sequential execution (always linearizable), corrupts them (observably, so never linearizable),
and compares the checker with a brute-force oracle on small histories.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Hashable
from typing import TYPE_CHECKING, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lin.checker import (
    COUNTER,
    REGISTER,
    CounterModel,
    Operation,
    OpKind,
    PartitionKey,
    RegisterModel,
    Value,
    Verdict,
    check_history,
    partition_history,
)
from tests.lin.history import FACET, cas, inc, operation, read, write

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tests.lin.checker import CheckResult, Model

StateT = TypeVar("StateT", bound=Hashable)

# -- register ------------------------------------------------------------------------------


def test_sequential_register_history_is_linearizable() -> None:
    history = [read(0, None, 0, 1), write(0, 1, 2, 3), read(1, 1, 4, 5), write(1, 2, 6, 7)]
    assert check_history(history, REGISTER).verdict is Verdict.LINEARIZABLE


def test_stale_read_after_completed_write_is_rejected() -> None:
    history = [write(0, 1, 0, 1), write(0, 2, 2, 3), read(1, 1, 4, 5)]
    result = check_history(history, REGISTER)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    (failure,) = result.failures
    assert failure.partition == PartitionKey(facet=FACET, key="k")
    assert failure.explanation is not None
    assert failure.explanation.blocking == history[2]
    assert history[2] in failure.explanation.unplaced


def test_read_of_a_value_never_written_is_rejected() -> None:
    history = [write(0, 1, 0, 1), read(1, 7, 0.5, 2)]
    assert check_history(history, REGISTER).verdict is Verdict.NOT_LINEARIZABLE


def test_read_overlapping_a_write_may_see_either_value() -> None:
    for seen in (None, 1):
        history = [write(0, 1, 0, 10), read(1, seen, 2, 3)]
        assert check_history(history, REGISTER).verdict is Verdict.LINEARIZABLE


def test_overlapping_writes_fix_one_order_for_all_readers() -> None:
    """Two readers after both writes must agree on which write came last."""
    writes = [write(0, 1, 0, 10), write(1, 2, 0, 10)]
    agree = [*writes, read(2, 2, 11, 12), read(3, 2, 13, 14)]
    assert check_history(agree, REGISTER).verdict is Verdict.LINEARIZABLE
    disagree = [*writes, read(2, 2, 11, 12), read(3, 1, 13, 14)]
    assert check_history(disagree, REGISTER).verdict is Verdict.NOT_LINEARIZABLE


def test_reads_overlapping_writes_may_not_go_back_in_time() -> None:
    """Concurrent readers can each see either write, but one reader cannot see 2 then 1."""
    writes = [write(0, 1, 0, 1), write(1, 2, 2, 20)]
    fine = [*writes, read(2, 1, 3, 4), read(3, 2, 5, 6), read(2, 2, 7, 8)]
    assert check_history(fine, REGISTER).verdict is Verdict.LINEARIZABLE
    back = [*writes, read(2, 2, 3, 4), read(3, 1, 5, 6)]
    assert check_history(back, REGISTER).verdict is Verdict.NOT_LINEARIZABLE


def test_unknown_write_may_or_may_not_have_happened() -> None:
    base = [write(0, 1, 0, 1), write(1, 2, 2, None)]
    for seen in (1, 2):
        history = [*base, read(2, seen, 5, 6)]
        assert check_history(history, REGISTER).verdict is Verdict.LINEARIZABLE


def test_unknown_write_that_was_seen_cannot_be_unseen() -> None:
    history = [write(0, 1, 0, 1), write(1, 2, 2, None), read(2, 2, 5, 6), read(2, 1, 7, 8)]
    assert check_history(history, REGISTER).verdict is Verdict.NOT_LINEARIZABLE


def test_unknown_write_cannot_take_effect_before_its_invocation() -> None:
    history = [read(0, 2, 0, 1), write(1, 2, 5, None)]
    assert check_history(history, REGISTER).verdict is Verdict.NOT_LINEARIZABLE


def test_unknown_write_takes_effect_before_its_no_effect_time_or_never() -> None:
    """The daemon that could run the write died at 3: after that it no longer exists."""
    base = [write(0, 1, 0, 1), write(1, 2, 2, None, no_effect_after=3)]
    assert check_history([*base, read(2, 2, 2.5, 6)], REGISTER).verdict is Verdict.LINEARIZABLE
    assert check_history([*base, read(2, 1, 4, 5)], REGISTER).verdict is Verdict.LINEARIZABLE
    # Seen before 3, gone after: no, since a write that happened stays.
    gone = [*base, read(2, 2, 2.5, 2.8), read(2, 1, 4, 5)]
    assert check_history(gone, REGISTER).verdict is Verdict.NOT_LINEARIZABLE
    # Invoked at 4, after the write's no-effect time: the read cannot see it.
    late = [*base, write(3, 3, 4, 5), read(2, 2, 6, 7)]
    assert check_history(late, REGISTER).verdict is Verdict.NOT_LINEARIZABLE
    # At the same instant as the no-effect time: ties are overlap.
    tie = [*base, write(3, 3, 3, 5), read(2, 2, 6, 7)]
    assert check_history(tie, REGISTER).verdict is Verdict.LINEARIZABLE


def test_unknown_increment_counts_before_its_no_effect_time_or_never() -> None:
    base = [inc(0, 1, 1, 0, 1), inc(1, 10, None, 2, None, no_effect_after=3)]
    for total in (1, 11):
        history = [*base, read(2, total, 4, 5)]
        assert check_history(history, COUNTER).verdict is Verdict.LINEARIZABLE
    # Not counted by 4, so never: a later total cannot include it.
    history = [*base, read(2, 1, 4, 5), read(2, 11, 6, 7)]
    assert check_history(history, COUNTER).verdict is Verdict.NOT_LINEARIZABLE


def test_unknown_read_is_ignored_whatever_it_claims() -> None:
    history = [write(0, 1, 0, 1), read(1, 99, 2, None)]
    assert check_history(history, REGISTER).verdict is Verdict.LINEARIZABLE
    assert partition_history(history) == {PartitionKey(facet=FACET, key="k"): [history[0]]}


def test_cas_succeeds_only_on_the_expected_value() -> None:
    ok = [write(0, 1, 0, 1), cas(0, 1, 2, True, 2, 3), read(1, 2, 4, 5)]
    assert check_history(ok, REGISTER).verdict is Verdict.LINEARIZABLE
    wrong = [write(0, 1, 0, 1), cas(0, 5, 2, True, 2, 3)]
    assert check_history(wrong, REGISTER).verdict is Verdict.NOT_LINEARIZABLE
    spurious_failure = [write(0, 1, 0, 1), cas(0, 1, 2, False, 2, 3)]
    assert check_history(spurious_failure, REGISTER).verdict is Verdict.NOT_LINEARIZABLE
    lost = [write(0, 1, 0, 1), cas(0, 1, 2, True, 2, 3), read(1, 1, 4, 5)]
    assert check_history(lost, REGISTER).verdict is Verdict.NOT_LINEARIZABLE


def test_two_concurrent_cas_on_one_value_cannot_both_succeed() -> None:
    history = [write(0, 0, 0, 1), cas(1, 0, 1, True, 2, 5), cas(2, 0, 2, True, 2, 5)]
    assert check_history(history, REGISTER).verdict is Verdict.NOT_LINEARIZABLE
    one = [write(0, 0, 0, 1), cas(1, 0, 1, True, 2, 5), cas(2, 0, 2, False, 2, 5)]
    assert check_history(one, REGISTER).verdict is Verdict.LINEARIZABLE


def test_unknown_cas_applies_only_if_it_would_have_swapped() -> None:
    history = [write(0, 1, 0, 1), cas(1, 1, 2, None, 2, None), read(2, 2, 5, 6)]
    assert check_history(history, REGISTER).verdict is Verdict.LINEARIZABLE
    mismatched = [write(0, 1, 0, 1), cas(1, 9, 2, None, 2, None), read(2, 2, 5, 6)]
    assert check_history(mismatched, REGISTER).verdict is Verdict.NOT_LINEARIZABLE


def test_register_keeps_integers_and_booleans_apart() -> None:
    history = [write(0, True, 0, 1), read(1, 1, 2, 3)]
    assert check_history(history, REGISTER).verdict is Verdict.NOT_LINEARIZABLE


def test_register_initial_value_is_configurable() -> None:
    history = [read(0, "seed", 0, 1)]
    assert check_history(history, REGISTER).verdict is Verdict.NOT_LINEARIZABLE
    seeded = RegisterModel(initial_value="seed")
    assert check_history(history, seeded).verdict is Verdict.LINEARIZABLE


# -- counter -------------------------------------------------------------------------------


def test_concurrent_increments_may_return_in_either_order() -> None:
    history = [inc(0, 1, 2, 0, 10), inc(1, 1, 1, 0, 10), read(2, 2, 11, 12)]
    assert check_history(history, COUNTER).verdict is Verdict.LINEARIZABLE


def test_lost_increment_is_rejected() -> None:
    history = [inc(0, 1, 1, 0, 1), inc(1, 1, 2, 2, 3), read(2, 1, 4, 5)]
    assert check_history(history, COUNTER).verdict is Verdict.NOT_LINEARIZABLE


def test_counter_values_that_repeat_are_rejected() -> None:
    history = [inc(0, 1, 1, 0, 10), inc(1, 1, 1, 0, 10)]
    assert check_history(history, COUNTER).verdict is Verdict.NOT_LINEARIZABLE


def test_counter_values_that_skip_are_rejected() -> None:
    history = [inc(0, 1, 1, 0, 1), inc(0, 1, 3, 2, 3)]
    assert check_history(history, COUNTER).verdict is Verdict.NOT_LINEARIZABLE
    # ... unless an increment with an unknown outcome explains the gap.
    explained = [*history, inc(1, 1, None, 0.5, None)]
    assert check_history(explained, COUNTER).verdict is Verdict.LINEARIZABLE


def test_unknown_increment_may_or_may_not_count() -> None:
    for total in (1, 3):
        history = [inc(0, 1, 1, 0, 1), inc(1, 2, None, 2, None), read(2, total, 5, 6)]
        assert check_history(history, COUNTER).verdict is Verdict.LINEARIZABLE
    history = [inc(0, 1, 1, 0, 1), inc(1, 2, None, 2, None), read(2, 2, 5, 6)]
    assert check_history(history, COUNTER).verdict is Verdict.NOT_LINEARIZABLE


def test_counter_initial_value_is_configurable() -> None:
    history = [inc(0, 5, 15, 0, 1)]
    assert check_history(history, CounterModel(initial_value=10)).verdict is Verdict.LINEARIZABLE
    assert check_history(history, COUNTER).verdict is Verdict.NOT_LINEARIZABLE


# -- unknown outcomes at scale: what the search prunes --------------------------------------

UNKNOWN_OUTCOMES = 30


def _unknown_increments(applied_every: int) -> tuple[list[Operation], int]:
    """Thirty increments with unknown outcomes invoked at 0, then 200 known sequential ones;
    every ``applied_every``-th known one (0: none) is preceded by one of the thirty taking
    effect. Amounts are random up to a million, as the recorder draws them."""
    rng = random.Random(5)
    unknown = [
        inc(1000 + u, rng.randint(1, 1_000_000), None, 0, None) for u in range(UNKNOWN_OUTCOMES)
    ]
    pending = [op.argument for op in unknown]
    history, total = list(unknown), 0
    for n in range(200):
        if applied_every and n % applied_every == 0 and pending:
            amount = pending.pop()
            assert isinstance(amount, int)
            total += amount
        amount = rng.randint(1, 1_000_000)
        total += amount
        history.append(inc(0, amount, total, 1 + n, 1.5 + n))
    return history, total


@pytest.mark.parametrize("applied_every", [0, 10])
def test_unknown_increments_cost_a_few_states_each(applied_every: int) -> None:
    """Each unknown increment stays a candidate to the end. Tried first, every subset of them
    would be cached before every known increment: 2^30 per step. Known operations are tried
    first, and a total already passed is a dead end (counters only grow), so each costs a
    few failed tries per step."""
    history, total = _unknown_increments(applied_every)
    result = check_history(history, COUNTER)
    assert result.verdict is Verdict.LINEARIZABLE, str(result)
    assert result.partitions[0].states_explored < 50_000

    corrupted = [*history, read(2, total + 1, 1000, 1001)]
    result = check_history(corrupted, COUNTER)
    assert result.verdict is Verdict.NOT_LINEARIZABLE, str(result)
    assert result.partitions[0].states_explored < 50_000


def test_unknown_writes_never_read_cost_a_few_states_each() -> None:
    """Unknown writes nobody read, then a stale read: to reject it every order of the writes
    must be ruled out. A write just before another write leaves no trace, so the search never
    places one there, and it is rejected without trying every subset."""
    history = [write(1000 + u, f"u{u}", 0, None) for u in range(UNKNOWN_OUTCOMES)]
    for n in range(100):
        history += [write(0, n, 1 + 3 * n, 1.5 + 3 * n), read(0, n, 2 + 3 * n, 2.5 + 3 * n)]
    assert check_history(history, REGISTER).verdict is Verdict.LINEARIZABLE
    stale = [*history, read(1, 98, 1000, 1001)]
    result = check_history(stale, REGISTER)
    assert result.verdict is Verdict.NOT_LINEARIZABLE, str(result)
    assert result.partitions[0].states_explored < 50_000


def test_unknown_outcomes_past_their_no_effect_time_are_dropped() -> None:
    """Unknown increments of a daemon that was killed are dropped at the kill, so they cost
    nothing after it: a stale read at the end is rejected at once, although nothing else
    prunes here (amounts are negative, so a counter may go down)."""
    history: list[Operation] = []
    total = 0
    for kill in range(20):
        start = 100.0 * kill
        history += [
            inc(1000 * (kill + 1) + u, -(2**u), None, start, None, no_effect_after=start + 50)
            for u in range(1, 6)
        ]
        for n in range(20):
            total += 1
            history.append(inc(0, 1, total, start + 60 + n, start + 60.5 + n))
    history.append(read(1, total - 1, 5000, 5001))
    result = check_history(history, COUNTER)
    assert result.verdict is Verdict.NOT_LINEARIZABLE, str(result)
    assert result.partitions[0].states_explored < 5_000  # about 2^5 per kill
    # Without the kill times all 100 stay candidates to the end: the search gives up.
    unbounded = [dataclasses.replace(op, no_effect_after_seconds=None) for op in history]
    result = check_history(unbounded, COUNTER, states_max=5_000)
    assert result.verdict is Verdict.UNKNOWN


# -- partitions, limits, malformed histories -----------------------------------------------


def test_partitions_are_checked_independently() -> None:
    """Per key each history is fine; only a whole-history order would need to agree."""
    history = [
        write(0, 1, 0, 10, key="a"),
        write(1, 1, 0, 10, key="b"),
        read(2, None, 1, 2, key="a"),
        read(2, 1, 3, 4, key="b"),
        read(3, 1, 1, 2, key="a"),
        read(3, None, 3, 4, key="b"),
    ]
    result = check_history(history, REGISTER)
    assert result.verdict is Verdict.LINEARIZABLE
    assert [str(p.partition) for p in result.partitions] == [f"{FACET}:a", f"{FACET}:b"]


def test_same_key_in_two_facets_is_two_partitions() -> None:
    history = [
        operation(0, OpKind.WRITE, 0, 1, argument=1, facet="t/x"),
        operation(1, OpKind.READ, 2, 3, result=None, facet="t/y"),
    ]
    assert len(partition_history(history)) == 2
    assert check_history(history, REGISTER).verdict is Verdict.LINEARIZABLE


def test_only_the_failing_partition_is_reported() -> None:
    history = [
        write(0, 1, 0, 1, key="good"),
        read(0, 1, 2, 3, key="good"),
        write(1, 1, 0, 1, key="bad"),
        read(1, 2, 2, 3, key="bad"),
    ]
    result = check_history(history, REGISTER)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    assert [p.partition.key for p in result.failures] == ["bad"]
    text = str(result)
    assert f"{FACET}:bad" in text
    assert "read -> 2" in text
    assert f"{FACET}:good" not in text


def test_search_limit_gives_unknown_not_an_endless_search() -> None:
    """Twelve overlapping writes and an impossible read: every order must be ruled out."""
    history = [write(p, p, 0, 10) for p in range(12)] + [read(12, "never", 11, 12)]
    limited = check_history(history, REGISTER, states_max=100)
    assert limited.verdict is Verdict.UNKNOWN
    (partition,) = limited.partitions
    assert partition.states_explored == 100
    assert partition.explanation is None
    assert str(limited).startswith("unknown (search limit)")
    assert check_history(history, REGISTER).verdict is Verdict.NOT_LINEARIZABLE


def test_not_linearizable_wins_over_unknown() -> None:
    history = [write(p, p, 0, 10, key="big") for p in range(8)]
    history += [read(8, "never", 11, 12, key="big"), read(9, 5, 0, 1, key="small")]
    assert check_history(history, REGISTER, states_max=10).verdict is Verdict.NOT_LINEARIZABLE


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([write(0, 1, 5, 4)], "completes before"),
        ([write(0, 1, 0, 5), write(0, 2, 4, 6)], "overlapping"),
        ([write(0, 1, 0, None), write(0, 2, 4, 6)], "after an unknown outcome"),
        ([inc(0, 1, 1, 0, 1)], "no 'increment'"),
        ([cas(0, 1, 2, None, 0, 1)], "boolean result"),
        ([write(0, 1, 0, 1, no_effect_after=2)], "only an unknown outcome"),
        ([write(0, 1, 5, None, no_effect_after=4)], "before its invocation"),
    ],
)
def test_malformed_register_history_is_refused(history: list[Operation], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_history(history, REGISTER)


def test_malformed_counter_history_is_refused() -> None:
    with pytest.raises(ValueError, match="integer amount"):
        check_history([operation(0, OpKind.INCREMENT, 0, 1, argument="1", result=1)], COUNTER)
    with pytest.raises(ValueError, match="no 'write'"):
        check_history([write(0, 1, 0, 1)], COUNTER)


def test_empty_history_is_linearizable() -> None:
    assert check_history([], REGISTER).verdict is Verdict.LINEARIZABLE


# -- generated histories -------------------------------------------------------------------

# Linearization point of step k of a generated execution; gaps of 10 leave room for intervals.
SPACING = 10
UNWRITTEN = "never written"


@st.composite
def executions(draw: st.DrawFn, kind: str, steps_max: int = 24) -> list[Operation]:
    """A history recorded from a real sequential execution, with random overlapping intervals.

    Step k takes effect at time ``SPACING * k``; each operation's interval contains its step's
    time and never overlaps its process's neighbours. A process's last operation may have an
    unknown outcome, and then may or may not have taken effect.
    """
    processes = draw(st.integers(1, 4))
    owners = draw(st.lists(st.integers(0, processes - 1), min_size=1, max_size=steps_max))
    keys = draw(st.lists(st.sampled_from(["a", "b"]), min_size=len(owners), max_size=len(owners)))
    last_step = {p: k for k, p in enumerate(owners)}
    state: dict[str, Value] = {}
    ops: list[Operation] = []
    for k, (p, key) in enumerate(zip(owners, keys, strict=True)):
        unknown = last_step[p] == k and draw(st.booleans())
        applied = not unknown or draw(st.booleans())
        when = SPACING * k
        if kind == "register":
            op = _register_step(draw, k, key, state, applied=applied)
        else:
            op = _counter_step(draw, key, state, applied=applied)
        invoke = when - draw(st.integers(0, SPACING // 2 if k else 0))
        complete = None if unknown else when + draw(st.integers(0, SPACING // 2))
        # An unknown outcome may have a no-effect-after time: after its effect if it had one,
        # anywhere after its invocation if not.
        no_effect_after = None
        if unknown and draw(st.booleans()):
            no_effect_after = (when if applied else invoke) + draw(st.integers(0, 3 * SPACING))
        ops.append(
            operation(
                p,
                op.kind,
                invoke,
                complete,
                argument=op.argument,
                expected=op.expected,
                result=op.result,
                key=key,
                no_effect_after=no_effect_after,
            )
        )
    return _stretch(draw, ops)


def _register_step(
    draw: st.DrawFn, k: int, key: str, state: dict[str, Value], *, applied: bool
) -> Operation:
    current = state.get(key)
    kind = draw(st.sampled_from([OpKind.READ, OpKind.WRITE, OpKind.CAS]))
    if kind is OpKind.READ:
        return operation(0, kind, 0, 0, result=current)
    # Written values are unique (the step number), so a corrupted read is always observable.
    if kind is OpKind.WRITE:
        if applied:
            state[key] = k
        return operation(0, kind, 0, 0, argument=k)
    expected = current if draw(st.booleans()) else -1
    swaps = expected == current
    if applied and swaps:
        state[key] = k
    return operation(0, kind, 0, 0, argument=k, expected=expected, result=swaps)


def _counter_step(
    draw: st.DrawFn, key: str, state: dict[str, Value], *, applied: bool
) -> Operation:
    current = state.get(key, 0)
    assert isinstance(current, int)
    if draw(st.booleans()):
        return operation(0, OpKind.READ, 0, 0, result=current)
    n = draw(st.integers(1, 3))
    if applied:
        state[key] = current + n
    return operation(0, OpKind.INCREMENT, 0, 0, argument=n, result=current + n)


def _stretch(draw: st.DrawFn, ops: list[Operation]) -> list[Operation]:
    """Widen some intervals into the idle time around them, so more operations overlap."""
    by_process: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        by_process.setdefault(op.process_id, []).append(i)
    stretched = list(ops)
    for indexes in by_process.values():
        for before, after in itertools.pairwise([None, *indexes, None]):
            if before is None or after is None:
                continue
            gap_start = ops[before].complete_seconds
            assert gap_start is not None
            gap = ops[after].invoke_seconds - gap_start
            extend = draw(st.integers(0, int(gap)))
            stretched[after] = _with_times(ops[after], ops[after].invoke_seconds - extend)
        first = indexes[0]
        stretched[first] = _with_times(
            stretched[first], stretched[first].invoke_seconds - draw(st.integers(0, 100))
        )
    return stretched


def _with_times(op: Operation, invoke: float) -> Operation:
    return dataclasses.replace(op, invoke_seconds=invoke)


def _with_result(op: Operation, result: Value) -> Operation:
    return dataclasses.replace(op, result=result)


def _check(history: Sequence[Operation], kind: str) -> CheckResult:
    # Two calls rather than one dict: each model has its own state type.
    if kind == "register":
        return check_history(history, REGISTER)
    return check_history(history, COUNTER)


def _oracle(history: Sequence[Operation], kind: str) -> Verdict:
    found = (
        _brute_force(history, REGISTER) if kind == "register" else _brute_force(history, COUNTER)
    )
    return Verdict.LINEARIZABLE if found else Verdict.NOT_LINEARIZABLE


@pytest.mark.slow  # a few hundred generated histories: about half a second
@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from(["register", "counter"]))
def test_generated_execution_is_linearizable(data: st.DataObject, kind: str) -> None:
    history = data.draw(executions(kind))
    result = _check(history, kind)
    assert result.verdict is Verdict.LINEARIZABLE, str(result)


@pytest.mark.slow  # a few hundred generated histories: about half a second
@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from(["register", "counter"]))
def test_observably_corrupted_execution_is_rejected(data: st.DataObject, kind: str) -> None:
    """A read of a value nobody wrote, or a counter value below zero, fits no order at all."""
    history = data.draw(executions(kind))
    corruptible = [
        i
        for i, op in enumerate(history)
        if op.is_known and op.kind in (OpKind.READ, OpKind.INCREMENT)
    ]
    if not corruptible:
        return
    i = data.draw(st.sampled_from(corruptible))
    history[i] = _with_result(history[i], UNWRITTEN if kind == "register" else -1)
    result = _check(history, kind)
    assert result.verdict is Verdict.NOT_LINEARIZABLE, str(result)
    (failure,) = result.failures
    assert failure.partition.key == history[i].key


@pytest.mark.slow  # a few hundred generated histories: about half a second
@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from(["register", "counter"]))
def test_corrupted_small_execution_matches_brute_force(data: st.DataObject, kind: str) -> None:
    """Any single-result corruption is rejected exactly when no order explains it."""
    history = [op for op in data.draw(executions(kind, steps_max=6)) if op.key == "a"]
    known = [i for i, op in enumerate(history) if op.is_known and op.kind is not OpKind.WRITE]
    if known:
        i = data.draw(st.sampled_from(known))
        history[i] = _with_result(history[i], data.draw(_results(history[i].kind)))
    assert _check(history, kind).verdict is _oracle(history, kind)


def _results(kind: OpKind) -> st.SearchStrategy[Value]:
    if kind is OpKind.CAS:
        return st.booleans()
    if kind is OpKind.INCREMENT:
        return st.integers(0, 8)
    return st.one_of(st.none(), st.integers(0, 8))


# Interval length, or for an unknown outcome: None, or ("by", its no-effect-after offset).
_lengths = st.one_of(st.integers(0, 6), st.none(), st.tuples(st.just("by"), st.integers(0, 6)))


def _row(
    p: int,
    invoke: int,
    length: int | tuple[str, int] | None,
    kind: OpKind,
    argument: Value,
    expected: Value,
    result: Value,
) -> Operation:
    complete = length if isinstance(length, int) else None
    no_effect_after = length[1] if isinstance(length, tuple) else None
    return operation(
        p,
        kind,
        invoke,
        None if complete is None else invoke + complete,
        argument=argument,
        expected=expected,
        result=result,
        no_effect_after=None if no_effect_after is None else invoke + no_effect_after,
    )


@pytest.mark.slow  # a few hundred generated histories: about half a second
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 6),
            _lengths,
            st.sampled_from([OpKind.READ, OpKind.WRITE, OpKind.CAS]),
            st.sampled_from([None, 1, 2]),
            st.sampled_from([None, 1, 2]),
            st.one_of(st.none(), st.booleans(), st.integers(1, 2)),
        ),
        max_size=6,
    )
)
def test_random_register_history_matches_brute_force(
    rows: list[tuple[int, int | tuple[str, int] | None, OpKind, Value, Value, Value]],
) -> None:
    """Arbitrary small histories, mostly nonsense: the verdict must equal the oracle's."""
    history: list[Operation] = []
    for p, (invoke, length, kind, argument, expected, result) in enumerate(rows):
        if kind is OpKind.CAS and isinstance(length, int) and not isinstance(result, bool):
            result = False
        if kind is OpKind.WRITE:
            result = None
        history.append(_row(p, invoke, length, kind, argument, expected, result))
    assert _check(history, "register").verdict is _oracle(history, "register")


@pytest.mark.slow  # a few hundred generated histories: about half a second
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 6),
            _lengths,
            st.sampled_from([OpKind.READ, OpKind.INCREMENT]),
            st.sampled_from([-1, 1, 2]),
            st.integers(-1, 4),
        ),
        max_size=6,
    )
)
def test_random_counter_history_matches_brute_force(
    rows: list[tuple[int, int | tuple[str, int] | None, OpKind, int, int]],
) -> None:
    """As for registers; amounts are sometimes negative, which turns the growing-total prune
    off, so both searches are compared with the oracle."""
    history = [
        _row(p, invoke, length, kind, amount if kind is OpKind.INCREMENT else None, None, result)
        for p, (invoke, length, kind, amount, result) in enumerate(rows)
    ]
    assert _check(history, "counter").verdict is _oracle(history, "counter")


def _brute_force(history: Sequence[Operation], model: Model[StateT]) -> bool:
    """Try every subset of the unknown-outcome operations and every order: tiny inputs only."""
    known = [op for op in history if op.is_known]
    maybe = [op for op in history if not op.is_known and op.kind is not OpKind.READ]
    for size in range(len(maybe) + 1):
        for chosen in itertools.combinations(maybe, size):
            for order in itertools.permutations([*known, *chosen]):
                if _respects_real_time(order) and _legal(order, model):
                    return True
    return False


def _respects_real_time(order: Sequence[Operation]) -> bool:
    for i, first in enumerate(order):
        for later in order[i + 1 :]:
            # An unknown outcome that took effect did so by its no-effect-after time.
            end = later.complete_seconds if later.is_known else later.no_effect_after_seconds
            if end is not None and end < first.invoke_seconds:
                return False
    return True


def _legal(order: Sequence[Operation], model: Model[StateT]) -> bool:
    state = model.initial()
    for op in order:
        accepted, state = model.step(state, op)
        if not accepted:
            return False
    return True
