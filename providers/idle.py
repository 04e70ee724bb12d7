"""The idle deadline on upstream bytes. Until the first token only the
first-token deadline applies (reasoning models think silently for minutes);
from then on, an upstream that sends no bytes at all for the idle time is cut
(keep-alive comments count as life)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from contextvars import ContextVar

import anyio

SLACK = 8  # the deadline moves at most once per 1/SLACK of the idle time, not at every read


def loop_clock() -> Callable[[], float]:
    """The clock of anyio's deadlines, looked up once, for code that reads it
    per token: `anyio.current_time()` finds the running backend anew at every
    call (a sniffio look-up, ~2 us), where its asyncio backend reads just
    the loop's `time()`."""
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:  # no asyncio loop: trio
        return anyio.current_time


class IdleDeadline:
    """Moves `scope`'s deadline past each upstream read once armed, never past
    `cap` (the total deadline, kept by the same scope). Moving a deadline
    reschedules a timer (~4 us); a read costs only a clock look until 1/SLACK
    of the idle time has passed, so silence is cut after between `seconds`
    and `seconds * (1 + 1/SLACK)`."""

    __slots__ = ("cap", "clock", "next_move", "reads_seen", "scope", "seconds")

    def __init__(self, scope: anyio.CancelScope, seconds: float, cap: float = math.inf) -> None:
        self.scope, self.seconds, self.cap = scope, seconds, cap
        self.clock = loop_clock()
        self.next_move: float | None = None  # None: not armed
        self.reads_seen = False  # a local backend (echo) has no upstream bytes to watch

    def arm(self) -> None:
        """At the first token: from now on, silence is what ends the stream."""
        if self.reads_seen:
            self._move(self.clock())
        else:
            self.scope.deadline = self.cap

    def bytes_arrived(self) -> None:
        self.reads_seen = True
        if self.next_move is not None:
            now = self.clock()
            if now >= self.next_move:
                self._move(now)

    def _move(self, now: float) -> None:
        # At the latest read r, the last move m was at most seconds/SLACK before it,
        # so m + seconds * (1 + 1/SLACK) >= r + seconds: never cut early.
        self.scope.deadline = min(now + self.seconds * (1 + 1 / SLACK), self.cap)
        self.next_move = now + self.seconds / SLACK


# The running generation's idle deadline, told of every read by ReadToEOF (so
# no provider needs to pass it on); None outside a generation.
UPSTREAM_IDLE: ContextVar[IdleDeadline | None] = ContextVar("upstream_idle", default=None)
