"""Business hours and holidays: when a queue is open, and whether today is a holiday.

Rules read them as ``queue.open`` and ``now.holiday``. Hours are given per queue (``*`` for
every queue without its own) as weekday → ranges ``"09:00-17:00"`` in the service's
timezone; a holiday closes every queue for the whole day. A queue without hours (and no
``*``) is always open, so an installation that configures nothing keeps working around the
clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_range(text: str) -> tuple[time, time]:
    """``"09:00-17:30"`` → (09:00, 17:30); the end is after the start (no overnight ranges:
    write ``"22:00-24:00"`` and ``"00:00-06:00"`` on the next day instead)."""
    start_text, sep, end_text = text.partition("-")
    if not sep:
        raise ValueError(f"{text!r}: write a range as HH:MM-HH:MM")
    start = _clock(start_text.strip())
    end = time.max if end_text.strip() == "24:00" else _clock(end_text.strip())
    if end <= start:
        raise ValueError(f"{text!r}: the end must be after the start")
    return start, end


def _clock(text: str) -> time:
    hour, sep, minute = text.partition(":")
    if not (sep and hour.isdigit() and minute.isdigit() and len(minute) == 2):
        raise ValueError(f"{text!r} is not a time of day HH:MM")
    return time(int(hour), int(minute))


class BusinessCalendar:
    def __init__(
        self,
        tz: ZoneInfo,
        holidays: Iterable[date] = (),
        hours: Mapping[str, Mapping[Any, Iterable[str]]] | None = None,
    ) -> None:
        self._tz = tz
        self._holidays = frozenset(holidays)
        self._hours = {
            queue: {day: [parse_range(r) for r in ranges] for day, ranges in week.items()}
            for queue, week in (hours or {}).items()
        }

    def holiday(self, now: datetime) -> bool:
        return now.astimezone(self._tz).date() in self._holidays

    def open(self, queue: str, now: datetime) -> bool:
        week = self._hours.get(queue, self._hours.get("*"))
        if week is None:
            return True
        local = now.astimezone(self._tz)
        if local.date() in self._holidays:
            return False
        moment = local.time()
        return any(start <= moment < end for start, end in week.get(WEEKDAYS[local.weekday()], ()))
