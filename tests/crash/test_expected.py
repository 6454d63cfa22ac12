"""The daemon crash loop's checks (``tests/crash/expected.py``) accept what may survive a kill
and report what may not: each rule on small hand-made records."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.crash.admin import KeyExpectation
from tests.crash.daemon_worker import CallRecord
from tests.crash.expected import (
    CounterExpectation,
    FreshExpectation,
    MemoryExpectation,
    RegisterExpectation,
    StatsExpectation,
    TimerExpectation,
)
from tests.lin.history import cas, inc, read, write

if TYPE_CHECKING:
    from facetrt import Value


def _record(
    facet: str, method: str, args: list[Value], result: Value, *, known: bool = True
) -> CallRecord:
    return CallRecord(
        process_id=1,
        facet=facet,
        method=method,
        args=args,
        result=result if known else None,
        invoke_seconds=0,
        complete_seconds=1 if known else None,
    )


def _counter() -> CounterExpectation:
    counter = CounterExpectation("ctr")
    counter.add(inc(1, 5, 5, 0, 1))
    counter.add(inc(1, 10, 15, 2, 3))
    counter.add(inc(1, 100, None, 4, None))  # unknown
    return counter


def test_counter_may_hold_acknowledged_plus_any_unknown() -> None:
    for value in (15, 115):
        findings = _counter().check(value)
        assert (findings.problems, findings.lost) == ([], 0)


def test_counter_below_acknowledged_increments_loses_them() -> None:
    findings = _counter().check(5)
    assert findings.lost == 1
    assert "ctr: read 5" in findings.problems[0]
    assert _counter().check(0).lost == 2


def test_counter_above_every_increment_made_is_a_problem() -> None:
    findings = _counter().check(116)
    assert findings.lost == 0
    assert "more than the 15 acknowledged plus 100 unknown" in findings.problems[0]


def test_counter_below_a_total_seen_by_a_read_is_a_problem() -> None:
    counter = _counter()
    counter.add(read(2, 115, 5, 6))  # the unknown increment was seen
    findings = counter.check(15)
    assert findings.problems == ["ctr: read 15 after 115 was seen"]


def test_counter_below_what_an_earlier_check_read_is_a_problem() -> None:
    """The unknown increment was there after one restart: it must be after the next."""
    counter = _counter()
    assert counter.check(115).problems == []
    assert counter.check(15).problems == ["ctr: read 15 after 115 was seen"]


def _register() -> RegisterExpectation:
    register = RegisterExpectation("reg")
    register.add(write(1, "a", 0, 1))
    register.add(write(1, "lost-reply", 2, None, no_effect_after=3))
    register.add(cas(2, "a", "b", True, 4, 5))
    register.add(cas(2, "x", "never", False, 6, 7))
    return register


def test_register_holds_the_last_acknowledged_write() -> None:
    register = _register()
    assert register.acknowledged == 2
    findings = register.check("b", 10)
    assert (findings.problems, findings.lost) == ([], 0)


def test_register_with_a_superseded_value_lost_a_write() -> None:
    """ "a" was overwritten by the cas invoked after it; the unknown write's no-effect time
    also ended before the cas began; a failed cas wrote nothing; None was long gone."""
    for value in ("a", "lost-reply", "never", None):
        findings = _register().check(value, 10)
        assert findings.lost == 1, value
        assert f"reg: read {value!r}" in findings.problems[0]


def _with_unknown_writes() -> RegisterExpectation:
    register = _register()
    register.add(write(3, "maybe", 8, None))
    register.add(cas(4, "b", "maybe-cas", None, 8, None))
    return register


def test_register_may_hold_an_unknown_write_not_superseded() -> None:
    for value in ("b", "maybe", "maybe-cas"):
        assert _with_unknown_writes().check(value, 10).lost == 0


def test_register_starts_absent_until_a_write_is_acknowledged() -> None:
    register = RegisterExpectation("reg")
    assert register.check(None, 1).lost == 0
    register.add(write(1, "maybe", 2, None))
    assert register.check(None, 3).lost == 0


def test_register_keeps_what_an_earlier_check_read() -> None:
    """An unknown write found after one restart must still be there after the next, until an
    acknowledged write supersedes it."""
    register = RegisterExpectation("reg")
    register.add(write(1, "maybe", 0, None, no_effect_after=1))
    assert register.check("maybe", 2).lost == 0
    assert register.check(None, 3).lost == 1
    for value, lost in (("maybe", 1), ("next", 0)):
        register = RegisterExpectation("reg")
        register.add(write(1, "maybe", 0, None, no_effect_after=1))
        register.check("maybe", 2)
        register.add(write(2, "next", 4, 5))
        assert register.check(value, 6).lost == lost, value


def _memory() -> MemoryExpectation:
    memory = MemoryExpectation("mem")
    memory.add(_record("mem", "append_turn", ["user", "t1"], 0))
    memory.add(_record("mem", "append_turn", ["user", "t2"], None, known=False))
    memory.add(_record("mem", "append_turn", ["user", "t3"], 1))
    return memory


def _turns(*texts: str) -> list[Value]:
    return [{"role": "user", "text": text, "tokens": 0} for text in texts]


def test_memory_holds_acknowledged_turns_in_order() -> None:
    memory = _memory()
    assert memory.check(2, _turns("t1", "t3")).problems == []
    # Turns only grow, and later checks read only the new ones.
    memory.add(_record("mem", "append_turn", ["user", "t4"], 2))
    findings = memory.check(3, _turns("t4"))
    assert (findings.problems, findings.lost) == ([], 0)


def test_memory_missing_or_misplaced_turn_is_lost() -> None:
    findings = _memory().check(1, _turns("t1"))
    assert findings.lost == 1
    assert "turn 1 acknowledged as 't3'" in findings.problems[0]
    # An unknown append that did happen pushes an acknowledged one out of its place.
    assert _memory().check(2, _turns("t2", "t3")).lost == 1


def test_memory_turns_never_appended_or_twice_are_problems() -> None:
    findings = _memory().check(4, _turns("t1", "t3", "t3", "bogus"))
    assert "mem: turn 't3' appears twice" in findings.problems
    assert "mem: turn 'bogus' was never appended" in findings.problems


def test_memory_turns_going_back_are_lost() -> None:
    memory = _memory()
    memory.check(2, _turns("t1", "t3"))
    findings = memory.check(1, [])
    assert findings.lost == 1


def test_stats_counts_between_acknowledged_appends_and_all_turns() -> None:
    memory = _memory()
    memory.check(2, _turns("t1", "t3"))
    stats = StatsExpectation("stats")
    for value in (2, 3):
        assert stats.check(value, [memory]).problems == []
    assert stats.check(1, [memory]).lost == 1
    assert stats.check(4, [memory]).problems != []


def _timers() -> TimerExpectation:
    timers = TimerExpectation("alarm")
    timers.add(_record("alarm", "set", ["a", None, 0.1], None))
    timers.add(_record("alarm", "set", ["b", None, 0.1], None))
    timers.add(_record("alarm", "set", ["c", None, 0.1], None, known=False))
    return timers


def test_acknowledged_timer_is_pending_or_fired_once() -> None:
    findings = _timers().check({"a"}, {"b": 1})
    assert (findings.problems, findings.lost) == ([], 0)
    # Read in between a firing: in both.
    assert _timers().check({"a", "b"}, {"b": 1, "c": 1}).problems == []


def test_timer_gone_twice_fired_or_never_set_is_reported() -> None:
    findings = _timers().check({"a"}, {})
    assert findings.lost == 1
    assert "['b']" in findings.problems[0]
    findings = _timers().check(set(), {"a": 2, "b": 1, "zz": 1})
    assert "alarm: timer 'a' fired 2 times" in findings.problems
    assert "alarm: timer 'zz' was never set" in findings.problems


def test_fresh_counter_holds_its_amount_or_nothing_if_unknown() -> None:
    fresh = FreshExpectation()
    fresh.add(_record("fresh-1", "increment", [7], 7))
    fresh.add(_record("fresh-2", "increment", [9], None, known=False))
    findings = fresh.check({"fresh-1": 7, "fresh-2": None})
    assert (findings.problems, findings.lost) == ([], 0)
    assert fresh.new == {}  # each fresh facet is checked once

    fresh.add(_record("fresh-3", "increment", [7], 7))
    fresh.add(_record("fresh-4", "increment", [9], None, known=False))
    findings = fresh.check({"fresh-3": None, "fresh-4": 5})
    assert findings.lost == 1
    assert findings.problems == [
        "fresh-3: acknowledged 7, read None",
        "fresh-4: 9 or nothing, read 5",
    ]


def _keys() -> KeyExpectation:
    keys = KeyExpectation("t", initial={"k0"})
    keys.created |= {"k1", "k2", "k3"}
    keys.revoking |= {"k2", "k3"}
    keys.revoked.add("k2")  # k3's revocation got no answer
    keys.created_unknown = 1
    return keys


def _listing(**revoked: bool) -> list[dict[str, object]]:
    return [{"key_id": key, "revoked": 1.0 if gone else None} for key, gone in revoked.items()]


def test_keys_created_and_revoked_stay_so() -> None:
    for k3 in (False, True):  # k3's revocation may or may not have happened
        listing = _listing(k0=False, k1=False, k2=True, k3=k3, unknown=False)
        findings = _keys().check(listing)
        assert (findings.problems, findings.lost) == ([], 0)


def test_keys_lost_revived_or_invented_are_reported() -> None:
    findings = _keys().check(_listing(k0=False, k2=False, k3=True, x=False, y=False))
    assert findings.lost == 2  # k1 gone, k2 active again
    assert "keys acknowledged as created are gone: ['k1']" in findings.problems
    assert "keys acknowledged as revoked are active: ['k2']" in findings.problems
    assert any("2 keys nobody knows of" in problem for problem in findings.problems)
    findings = _keys().check(_listing(k0=False, k1=True, k2=True, k3=True))
    assert findings.problems == ["keys nobody revoked are revoked: ['k1']"]
