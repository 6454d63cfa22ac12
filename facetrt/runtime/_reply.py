"""ReplySlot: a one-shot result a caller task waits for, set by an activation.

Built on ``trio.lowlevel`` rather than a ``trio.Event`` per call because it sits on the hot
path: setting it reschedules the waiting task directly, with no extra object per waiter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

    import outcome

    from .._values import Value


@final
class ReplySlot:
    """Holds the outcome of one envelope; :meth:`wait` returns or raises it exactly once.

    A caller cancelled while waiting marks the slot ``abandoned``: an activation that has not
    started the envelope yet skips it (nothing is applied); one that already started finishes it
    and commits, so a cancelled call may or may not have taken effect.
    """

    __slots__ = ("_callback", "_outcome", "_task", "abandoned")

    def __init__(self, callback: Callable[[outcome.Outcome[Value]], None] | None = None) -> None:
        self._outcome: outcome.Outcome[Value] | None = None
        self._task: trio.lowlevel.Task | None = None
        # A callback instead of a waiting task: the server's batched path answers a call
        # without a task per call. It runs on the loop thread and must not raise.
        self._callback = callback
        self.abandoned = False

    @property
    def is_set(self) -> bool:
        return self._outcome is not None

    def set(self, result: outcome.Outcome[Value]) -> None:
        assert self._outcome is None, "reply set twice"
        self._outcome = result
        if self._callback is not None:
            self._callback(result)
        elif self._task is not None:
            task, self._task = self._task, None
            trio.lowlevel.reschedule(task, result)

    async def wait(self) -> Value:
        """Wait for the outcome; cancellation abandons the call (see class docstring)."""
        if self._outcome is not None:
            await trio.lowlevel.checkpoint()
            return self._outcome.unwrap()
        assert self._task is None, "reply awaited twice"
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            self.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        value: Value = await trio.lowlevel.wait_task_rescheduled(abort)
        return value
