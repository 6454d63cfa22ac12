"""Histories written by hand, for the tests of the checker and of the crash loop's checks.

``write(p, value, t0, t1)`` is process ``p`` writing ``value``, invoked at ``t0``, replied at
``t1`` (None: unknown outcome); ``read``, ``cas`` and ``inc`` likewise.
"""

from __future__ import annotations

from tests.lin.checker import Operation, OpKind, Value

FACET = "acme/agent"


def operation(
    process_id: int,
    kind: OpKind,
    invoke: float,
    complete: float | None,
    *,
    argument: Value = None,
    expected: Value = None,
    result: Value = None,
    key: str = "k",
    facet: str = FACET,
    no_effect_after: float | None = None,
) -> Operation:
    return Operation(
        process_id=process_id,
        facet=facet,
        key=key,
        kind=kind,
        argument=argument,
        expected=expected,
        result=result,
        invoke_seconds=invoke,
        complete_seconds=complete,
        no_effect_after_seconds=no_effect_after,
    )


def write(
    p: int,
    value: Value,
    t0: float,
    t1: float | None,
    *,
    key: str = "k",
    no_effect_after: float | None = None,
) -> Operation:
    return operation(
        p, OpKind.WRITE, t0, t1, argument=value, key=key, no_effect_after=no_effect_after
    )


def read(p: int, result: Value, t0: float, t1: float | None, *, key: str = "k") -> Operation:
    return operation(p, OpKind.READ, t0, t1, result=result, key=key)


def cas(
    p: int, expected: Value, new: Value, ok: bool | None, t0: float, t1: float | None
) -> Operation:
    return operation(p, OpKind.CAS, t0, t1, argument=new, expected=expected, result=ok)


def inc(
    p: int,
    n: int,
    total: int | None,
    t0: float,
    t1: float | None,
    *,
    no_effect_after: float | None = None,
) -> Operation:
    return operation(
        p, OpKind.INCREMENT, t0, t1, argument=n, result=total, no_effect_after=no_effect_after
    )
