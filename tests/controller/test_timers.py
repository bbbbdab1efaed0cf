"""The in-memory timer heap: restarted timers do not pile up (a soak run found the heap
growing by one entry per message, for timers restarted on every message)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from controller.clock import ManualClock
from controller.metrics import Metrics
from controller.store.base import TimerRow
from controller.store.sqlite import SqliteStore
from controller.timers import COMPACT_SLACK, Timers


def test_restarting_timers_keeps_the_heap_near_the_timers_pending(tmp_path: Path) -> None:
    clock = ManualClock()
    store = SqliteStore(tmp_path / "unused.db")  # never opened: the heap alone is tested
    timers = Timers(store, clock, Metrics(), lambda _: None)
    due = clock.now() + timedelta(hours=2)
    conversations = 50
    # every message restarts each conversation's idle timer (a new generation), as the
    # default rules do, long before the old one would be due
    for generation in range(1, 401):
        for n in range(conversations):
            timers._push(TimerRow(f"cv_{n}", "idle_close", generation, due))
    assert len(timers._current) == conversations
    assert len(timers._heap) <= 2 * conversations + COMPACT_SLACK + 1
    # what is left is each conversation's newest generation (and stale entries not yet
    # compacted): the newest ones are all there
    live = {(e[1], e[2], e[3]) for e in timers._heap}
    assert {(f"cv_{n}", "idle_close", 400) for n in range(conversations)} <= live
