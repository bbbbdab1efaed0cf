"""Business hours and holidays: ``queue.open`` and ``now.holiday`` as the rules see them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from controller.calendar import BusinessCalendar, parse_range
from controller.clock import ManualClock
from controller.settings import Settings
from controller.testing import Service

LISBON = ZoneInfo("Europe/Lisbon")
HOURS = {
    "support": {"mon": ["09:00-12:30", "13:30-17:00"], "sat": ["10:00-14:00"]},
    "*": {day: ["00:00-24:00"] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")},
}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=LISBON)


def test_queues_open_in_their_hours_in_the_services_timezone() -> None:
    cal = BusinessCalendar(LISBON, [date(2026, 12, 25)], HOURS)
    assert cal.open("support", at("2026-11-23T09:00"))  # a Monday
    assert not cal.open("support", at("2026-11-23T08:59"))
    assert not cal.open("support", at("2026-11-23T12:45"))  # lunch
    assert not cal.open("support", at("2026-11-23T17:00"))  # the end is not included
    assert not cal.open("support", at("2026-11-24T10:00"))  # Tuesday: no hours
    assert cal.open("support", at("2026-11-28T13:59"))  # Saturday
    assert cal.open("billing", at("2026-11-24T03:00"))  # "*": around the clock
    # 09:30 in Lisbon is 09:30 UTC in winter; a UTC time converts
    assert cal.open("support", datetime(2026, 11, 23, 9, 30, tzinfo=UTC))


def test_a_holiday_closes_every_queue_for_the_day() -> None:
    cal = BusinessCalendar(LISBON, [date(2026, 12, 25)], HOURS)
    assert cal.holiday(at("2026-12-25T23:59")) and not cal.holiday(at("2026-12-26T00:00"))
    assert not cal.open("support", at("2026-12-25T10:00"))
    assert not cal.open("billing", at("2026-12-25T10:00"))
    assert BusinessCalendar(LISBON).open("anything", at("2026-12-25T03:00"))  # no hours at all


@pytest.mark.parametrize("bad", ["9-17", "09:00", "17:00-09:00", "09:00-09:00", "9:0-10:00"])
def test_bad_ranges_are_refused_by_the_settings(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_range(bad)
    with pytest.raises(ValueError, match=bad.split("-")[0]):
        Settings(business_hours={"support": {"mon": [bad]}})


async def test_rules_see_the_queue_closed_and_the_holiday(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    # The manual clock starts on Monday 2026-01-05 at 09:00 UTC; support opens at 10:00.
    svc: Service = await make_service(
        clock=clock,
        holidays=["2026-01-06"],
        business_hours={"support": {"mon": ["10:00-17:00"], "tue": ["10:00-17:00"]}},
    )
    customer = await svc.customer()
    cid = str((await customer.say("agent please"))["conversation_id"])
    await svc.until(cid, lambda c: c.state == "queued")
    await customer.say("still there?")
    await svc.settle()
    facts = [d["facts"] for d in await svc.store.decisions(cid) if d.get("facts")]
    last = facts[-1]
    assert last["queue"]["name"] == "support" and last["queue"]["open"] is False
    assert last["now"]["holiday"] is False

    clock.advance(3600)  # 10:00: open
    await customer.say("and now?")
    await svc.settle()
    last = [d["facts"] for d in await svc.store.decisions(cid) if d.get("facts")][-1]
    assert last["queue"]["open"] is True

    clock.advance(24 * 3600)  # Tuesday 10:00, a holiday
    await customer.say("hello?")
    await svc.settle()
    last = [d["facts"] for d in await svc.store.decisions(cid) if d.get("facts")][-1]
    assert last["queue"]["open"] is False and last["now"]["holiday"] is True
