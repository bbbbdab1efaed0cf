"""Outbound campaigns: a WhatsApp template sent to an audience, paced, inside a window.

A campaign is stored with one recipient row per customer (the same campaign never messages a
customer twice). The ``CampaignRunner`` keeps one task per running campaign: it takes the
next pending recipients in audience order, fills the template's placeholders from the
customer's profile and the recipient's own parameters, and sends each as ONE store
transaction that marks the recipient ``sent`` and stores a ``campaign.message`` inbox event
(dedupe key ``campaign:{id}:{customer}``). The event opens or joins the conversation of the
customer's identity on the channel, and the machine sends the template like a message of the
controller. A crash between two sends therefore neither sends twice nor skips anyone: at
start the runner resumes every running campaign from its pending recipients.

Pacing runs on the service ``Clock``: never more than the rate's messages in any second (a
sliding window of the last second's sends), spread over the second by a small token bucket.
Outside the window (``starts_at``, ``ends_at``, daily ``hours`` in the service's timezone)
nothing is sent. What happens afterwards (delivered, read, failed, replied) is taken from the
decided events of campaign conversations (``after_commit``) and written in batches.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from controller.clock import Clock, sleep_until_woken
from controller.customers import profile_facts
from controller.errors import RequestError
from controller.metrics import Metrics
from controller.models import NewEvent
from controller.rulebook.actions import Slot, Template, parse_template
from controller.rulebook.conditions import lookup
from controller.store.base import (
    CampaignOutcome,
    CampaignRecord,
    CampaignWork,
    Committed,
    CustomerQuery,
    CustomerRecord,
    DecisionRecord,
    Store,
)

log = structlog.get_logger(__name__)

CAMPAIGNS_SCOPE = "campaigns:run"
SOURCE = "campaign"  # the inbox source of campaign.message events
ACTIVE = ("scheduled", "running")
FINISHED = ("completed", "expired", "cancelled")
# Placeholders may read the customer (as the rules see it) and the recipient's own values.
PLACEHOLDER_ROOTS = ("customer.", "params.")
# Why a recipient was skipped (besides ``opted_out``, decided in the send's transaction).
NO_IDENTITY = "no_channel_identity"
MISSING_PARAMETER = "missing_parameter"
UNKNOWN_CUSTOMER = "unknown_customer"
BATCH = 200  # pending recipients read at a time
OUTCOMES_AT_ONCE = 1000  # outcomes written in one transaction
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _micros(when: datetime) -> int:
    """Exact microseconds since the epoch (no float rounding at window edges)."""
    return (when - _EPOCH) // _US


def _at(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


# pacing ------------------------------------------------------------------------------------
class Pacer:
    """At most ``rate`` messages per second, spread out.

    Two limits hold together: a sliding window (never more than ``floor(rate)`` sends in any
    second; below one per second, one send per ``1/rate`` seconds), which is the guarantee,
    and a token bucket holding a tenth of a second's worth (at least one), which spreads the
    sends over the second instead of sending a second's worth at once.
    """

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        if rate >= 1:
            self._window, self._limit = 1_000_000, int(rate)
        else:
            self._window, self._limit = math.ceil(1_000_000 / rate), 1
        self._burst = max(1.0, rate / 10)
        self._tokens = self._burst
        self._refilled: int | None = None
        self._sent: deque[int] = deque()

    def _refill(self, now: int) -> None:
        if self._refilled is not None and now > self._refilled:
            self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self.rate / 1e6)
        self._refilled = now if self._refilled is None else max(self._refilled, now)
        while self._sent and self._sent[0] <= now - self._window:
            self._sent.popleft()

    def available(self, now: datetime) -> int:
        """How many sends may go out at ``now``."""
        at = _micros(now)
        self._refill(at)
        tokens = int(self._tokens + 1e-9)
        return max(0, min(tokens, self._limit - len(self._sent)))

    def take(self, count: int, now: datetime) -> None:
        at = _micros(now)
        self._refill(at)
        self._tokens = max(0.0, self._tokens - count)
        self._sent.extend([at] * count)

    def next_at(self, now: datetime) -> datetime:
        """The earliest time a send may go out (``now`` if one may)."""
        at = _micros(now)
        self._refill(at)
        due = at
        if self._tokens + 1e-9 < 1:
            due = max(due, at + math.ceil((1 - self._tokens) * 1e6 / self.rate))
        if len(self._sent) >= self._limit:
            due = max(due, self._sent[len(self._sent) - self._limit] + self._window)
        return _at(due)


# the window --------------------------------------------------------------------------------
def parse_hour(text: str) -> time:
    """``HH:MM`` (00:00 to 23:59)."""
    hour, sep, minute = text.partition(":")
    if not (sep and len(hour) == 2 and len(minute) == 2 and hour.isdigit() and minute.isdigit()):
        raise ValueError(f"not HH:MM: {text!r}")
    if int(hour) > 23 or int(minute) > 59:
        raise ValueError(f"not a time of day: {text!r}")
    return time(int(hour), int(minute))


@dataclass(frozen=True)
class Window:
    """When a campaign may send: from ``starts_at`` until ``ends_at``, and every day between
    ``opens`` and ``closes`` (local time in ``tz``; ``closes`` before ``opens`` spans
    midnight)."""

    starts_at: datetime | None
    ends_at: datetime | None
    opens: time | None
    closes: time | None
    tz: ZoneInfo

    @classmethod
    def of(cls, campaign: CampaignRecord, tz: ZoneInfo) -> Window:
        opens: time | None = None
        closes: time | None = None
        if campaign.hours_from and campaign.hours_to:
            opens, closes = parse_hour(campaign.hours_from), parse_hour(campaign.hours_to)
        return cls(campaign.starts_at, campaign.ends_at, opens, closes, tz)

    def ended(self, now: datetime) -> bool:
        return self.ends_at is not None and now >= self.ends_at

    def _in_hours(self, local: datetime) -> bool:
        if self.opens is None or self.closes is None:
            return True
        t = local.time()
        if self.opens < self.closes:
            return self.opens <= t < self.closes
        return t >= self.opens or t < self.closes

    def next_open(self, now: datetime) -> datetime | None:
        """None while sending is allowed; else the next moment it is (maybe after
        ``ends_at``: the caller checks)."""
        if self.starts_at is not None and now < self.starts_at:
            later = self.next_open(self.starts_at)
            return self.starts_at if later is None else later
        local = now.astimezone(self.tz)
        if self._in_hours(local):
            return None
        assert self.opens is not None
        day = local.date()
        for offset in range(3):  # today's opening, or tomorrow's (a day skipped by DST: +2)
            candidate = datetime.combine(day + timedelta(days=offset), self.opens, self.tz)
            if candidate > local:
                return candidate.astimezone(UTC)
        raise AssertionError("no opening within two days")  # pragma: no cover


# templates and audiences -------------------------------------------------------------------
def parse_placeholders(texts: Iterable[str]) -> None:
    """Check every ``{{ … }}`` of the campaign's texts: well formed, and reading
    ``customer.…`` or ``params.…`` (a 422 ``invalid_placeholder`` otherwise)."""
    for text in texts:
        parsed = parse_template(text)
        if isinstance(parsed, str):
            raise RequestError(parsed, code="invalid_placeholder", status=422)
        for part in parsed.parts:
            if isinstance(part, Slot) and not part.path.startswith(PLACEHOLDER_ROOTS):
                raise RequestError(
                    f"placeholder {{{{ {part.path} }}}} must read customer.… or params.…",
                    code="invalid_placeholder",
                    status=422,
                )


class MissingValue(Exception):
    """A placeholder without a value and without a fallback."""


def _render(text: str, facts: Mapping[str, Any]) -> str:
    parsed = parse_template(text)
    if isinstance(parsed, str):  # checked at creation
        raise MissingValue(parsed)
    if not parsed.dynamic:
        return text
    out: list[str] = []
    for part in parsed.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = lookup(facts, part.path)
        if value is None and not part.fallback:
            raise MissingValue(part.path)
        out.append(part.fallback if value is None else Template((part,)).render(facts))
    return "".join(out)


def _default_text(name: str, parameters: Sequence[str]) -> str:
    """What the transcript shows of a template sent without ``text``: its name and values."""
    return f"{name}: {', '.join(parameters)}" if parameters else name


def customer_facts(customer: CustomerRecord, params: Mapping[str, Any]) -> dict[str, Any]:
    """What placeholders read: ``customer`` as the rules see it, and ``params``."""
    facts = profile_facts(customer) or {}
    return {"customer": {"id": customer.id, **facts}, "params": dict(params)}


def channel_address(customer: CustomerRecord, kind: str) -> str | None:
    """The customer's user id on a channel of this kind: a WhatsApp ``wa_id`` (the E.164
    number of a ``whatsapp`` or else a ``phone`` identity, without its ``+``), or the
    identity of that kind; None when the customer has none."""
    wanted = (kind, "phone") if kind == "whatsapp" else (kind,)
    found = next((i for w in wanted for i in customer.identities if i.kind == w), None)
    if found is None:
        return None
    return found.value.removeprefix("+") if kind == "whatsapp" else found.value


@dataclass(frozen=True)
class AudienceFilter:
    """Customers of the Customer API to message: every given condition must hold.

    ``custom``: these custom fields have these values; ``has``: the customer has an identity
    of one of these kinds; ``language``: the profile's language; ``known``: made or
    identified by the Customer API."""

    custom: Mapping[str, Any]
    has: tuple[str, ...]
    language: str | None
    known: bool | None

    def matches(self, customer: CustomerRecord) -> bool:
        if self.known is not None and customer.known != self.known:
            return False
        if self.language is not None and customer.profile.get("language") != self.language:
            return False
        if self.has and not any(i.kind in self.has for i in customer.identities):
            return False
        return all(
            k in customer.custom and _same(customer.custom[k], v) for k, v in self.custom.items()
        )


def _same(left: Any, right: Any) -> bool:
    """Equal without coercion: ``true`` is not ``1``."""
    return type(left) is type(right) and left == right


async def expand_filter(store: Store, audience: AudienceFilter, limit: int) -> list[str]:
    """The ids of the customers matching, in id order (RequestError past ``limit``)."""
    found: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.list_customers(
            CustomerQuery(limit=200, cursor=cursor, known=audience.known)
        )
        found.extend(c.id for c in page if audience.matches(c))
        if len(found) > limit:
            raise RequestError(
                f"the audience has more than {limit} customers",
                code="audience_too_large",
                status=422,
            )
        if cursor is None:
            return found


# the runner --------------------------------------------------------------------------------
@dataclass
class _Drive:
    """One running campaign's task and how to reach it."""

    task: asyncio.Task[None]
    wake: asyncio.Event
    sleeping_until: datetime | None = None  # set while waiting on the clock


class CampaignRunner:
    """Sends running campaigns, one task each, and records what became of the messages."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        notify: Callable[[Iterable[str]], None],
        *,
        channel_kinds: Mapping[str, str],
        timezone: str,
        default_language: str,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._notify = notify
        self._kinds = channel_kinds  # channel instance -> channel type (whatsapp...)
        self._tz = ZoneInfo(timezone)
        self._language = default_language
        self._drives: dict[str, _Drive] = {}
        self._started = False
        self._outcomes: list[CampaignOutcome] = []
        self._outcomes_ready = asyncio.Event()
        self._writing = False
        self._writer: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # something a waiting test may care about moved

    # lifecycle -----------------------------------------------------------------------------
    async def start(self) -> int:
        """Resume every scheduled and running campaign; returns how many."""
        self._started = True
        self._writer = asyncio.create_task(self._write_outcomes(), name="campaign-outcomes")
        active = await self._store.campaigns(statuses=ACTIVE, limit=1_000_000)
        for campaign in active:
            self.wake(campaign.id)
        return len(active)

    async def stop(self) -> None:
        """Stop sending (first, at shutdown: campaigns only produce events)."""
        self._started = False
        drives = list(self._drives.values())
        for drive in drives:
            drive.task.cancel()
        await asyncio.gather(*(d.task for d in drives), return_exceptions=True)
        self._drives.clear()

    async def close(self) -> None:
        """Stop recording outcomes, once the workers have stopped deciding: what the last
        decisions reported is written first."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._outcomes:
            batch, self._outcomes = self._outcomes, []
            await self._flush(batch)

    def wake(self, campaign_id: str) -> None:
        """A campaign was created or changed: (re)read it and act on it now."""
        if not self._started:
            return
        drive = self._drives.get(campaign_id)
        if drive is not None and not drive.task.done():
            drive.wake.set()
            self._changed.set()
            return
        wake = asyncio.Event()
        task = asyncio.create_task(self._drive(campaign_id, wake), name=f"campaign-{campaign_id}")
        self._drives[campaign_id] = _Drive(task, wake)
        self._changed.set()

    @property
    def running(self) -> list[str]:
        return sorted(self._drives)

    @property
    def quiet(self) -> bool:
        """No campaign can send before the clock moves (each task waits for a later time, or
        has ended) and every outcome is written."""
        now = self._clock.now()
        busy = [
            d
            for d in self._drives.values()
            if not d.task.done()
            and (d.sleeping_until is None or d.sleeping_until <= now or d.wake.is_set())
        ]
        return not busy and not self._outcomes and not self._writing

    async def wait_quiet(self) -> None:
        """Wait until ``quiet`` (tests, benchmarks)."""
        while True:
            self._changed.clear()
            if self.quiet:
                return
            await self._changed.wait()

    # one campaign --------------------------------------------------------------------------
    async def _drive(self, campaign_id: str, wake: asyncio.Event) -> None:
        structlog.contextvars.bind_contextvars(campaign_id=campaign_id)
        pacer: Pacer | None = None
        try:
            while True:
                try:
                    wake.clear()  # what woke it is read now
                    campaign = await self._store.campaign(campaign_id)
                    if campaign is None or campaign.status not in ACTIVE:
                        if wake.is_set():  # changed again meanwhile: read it again
                            continue
                        return
                    if pacer is None or pacer.rate != campaign.rate:
                        pacer = Pacer(campaign.rate)
                    await self._step(campaign, pacer, wake)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A store that failed must not end the campaign: try again shortly.
                    log.exception("campaign_step_failed")
                    await self._sleep(campaign_id, self._clock.now() + timedelta(seconds=1))
        finally:
            drive = self._drives.get(campaign_id)
            if drive is not None and drive.wake is wake:
                del self._drives[campaign_id]
            self._changed.set()
            structlog.contextvars.unbind_contextvars("campaign_id")

    async def _sleep(self, campaign_id: str, until: datetime) -> bool:
        """Wait on the clock until ``until``, or until the campaign is woken (True: it was;
        the campaign is read again at the top of its loop, which clears the wake)."""
        drive = self._drives[campaign_id]
        if not drive.wake.is_set():
            drive.sleeping_until = until
            self._changed.set()
            try:
                await sleep_until_woken(self._clock, until, drive.wake)
            finally:
                drive.sleeping_until = None
                self._changed.set()
        return drive.wake.is_set()

    async def _step(self, campaign: CampaignRecord, pacer: Pacer, wake: asyncio.Event) -> None:
        """One move of a campaign: wait for its window, start it, send a batch, or end it."""
        window = Window.of(campaign, self._tz)
        now = self._clock.now()
        if window.ended(now):
            ended = await self._store.set_campaign_status(
                campaign.id, "expired", allowed_from=ACTIVE, now=now, skip_pending="window_ended"
            )
            if ended is not None:
                log.info("campaign_expired")
            return
        opens = window.next_open(now)
        if opens is not None:
            if window.ends_at is not None:
                opens = min(opens, window.ends_at)
            await self._sleep(campaign.id, opens)
            return
        if campaign.status == "scheduled":
            await self._store.set_campaign_status(
                campaign.id, "running", allowed_from=("scheduled",), now=now
            )
            log.info("campaign_started")
            return
        batch = await self._store.campaign_batch(campaign.id, BATCH)
        if not batch:
            done = await self._store.set_campaign_status(
                campaign.id, "completed", allowed_from=("running",), now=now
            )
            if done is not None:
                log.info("campaign_completed", recipients=done.recipients)
            return
        await self._send_batch(campaign, batch, pacer, window, wake)

    async def _send_batch(
        self,
        campaign: CampaignRecord,
        batch: Sequence[CampaignWork],
        pacer: Pacer,
        window: Window,
        wake: asyncio.Event,
    ) -> None:
        """Send a batch at the campaign's pace; return early when the campaign was changed
        (pause, cancel: read it again) or its window closed."""
        events: list[tuple[str, NewEvent]] = []
        skips: list[tuple[str, str]] = []
        for work in batch:
            prepared = self._prepare(campaign, work)
            if isinstance(prepared, NewEvent):
                events.append((work.recipient.customer_id, prepared))
            else:
                skips.append((work.recipient.customer_id, prepared))
        if skips:  # nothing is sent for these: no pacing
            now = self._clock.now()
            await asyncio.gather(
                *(self._store.campaign_skip(campaign.id, c, r, now) for c, r in skips)
            )
            for _, reason in skips:
                self._metrics.campaign_messages.labels(reason).inc()
        position = 0
        while position < len(events):
            if wake.is_set():
                return
            now = self._clock.now()
            if window.ended(now) or window.next_open(now) is not None:
                return
            count = pacer.available(now)
            if count == 0:
                if await self._sleep(campaign.id, pacer.next_at(now)):
                    return
                continue
            chunk = events[position : position + count]
            position += len(chunk)
            pacer.take(len(chunk), now)
            # Sent together: the store commits them together, each send all or nothing.
            outcomes = await asyncio.gather(
                *(self._send(campaign.id, customer, event, now) for customer, event in chunk)
            )
            if "not_running" in outcomes:
                return

    def _prepare(self, campaign: CampaignRecord, work: CampaignWork) -> NewEvent | str:
        """The recipient's ``campaign.message`` event, or why the recipient is skipped."""
        customer, recipient = work.customer, work.recipient
        if customer is None:
            return UNKNOWN_CUSTOMER
        kind = self._kinds.get(campaign.channel, campaign.channel)
        identity = channel_address(customer, kind)
        if identity is None:
            return NO_IDENTITY
        facts = customer_facts(customer, recipient.params)
        template = campaign.template
        try:
            parameters = [_render(str(p), facts) for p in template.get("parameters") or ()]
            text = (
                _render(campaign.text, facts)
                if campaign.text
                else _default_text(str(template["name"]), parameters)
            )
        except MissingValue:
            return MISSING_PARAMETER
        language = template.get("language") or customer.profile.get("language") or self._language
        return NewEvent(
            type="campaign.message",
            source=SOURCE,
            dedupe_key=f"campaign:{campaign.id}:{customer.id}",
            channel=kind,
            instance=campaign.channel,
            endpoint=campaign.endpoint,
            identity=identity,
            data={
                "campaign_id": campaign.id,
                "customer_id": customer.id,
                "text": text,
                "template": {
                    "name": template["name"],
                    "language": language,
                    "parameters": parameters,
                },
                "language": language,
            },
        )

    async def _send(
        self, campaign_id: str, customer_id: str, event: NewEvent, now: datetime
    ) -> str:
        result = await self._store.campaign_send(campaign_id, customer_id, event, now)
        if result.accepted is not None and not result.accepted.duplicate:
            self._notify([result.accepted.conversation_id])
        if result.outcome in ("sent", "opted_out", "unknown_customer"):
            self._metrics.campaign_messages.labels(result.outcome).inc()
        return result.outcome

    # outcomes ------------------------------------------------------------------------------
    def after_commit(self, record: DecisionRecord, committed: Committed) -> None:
        """The worker's hook: what a decided event of a campaign conversation says about the
        campaign's message (delivered, read, failed, replied), queued for the writer."""
        outcome = self._outcome_of(record)
        if outcome is not None:
            self._outcomes.append(outcome)
            self._outcomes_ready.set()

    def _outcome_of(self, record: DecisionRecord) -> CampaignOutcome | None:
        event, data = record.event, record.event.data
        at = event.accepted_at
        if event.type == "campaign.message":
            # moved from a conversation that closed before it was decided: follow it
            if data.get("moved_from") and record.after.state != "closed":
                return CampaignOutcome(
                    "moved",
                    at,
                    event_id=event.id,
                    campaign_id=str(data.get("campaign_id")),
                    customer_id=str(data.get("customer_id")),
                    conversation_id=record.after.id,
                )
            return None
        campaign = record.after.attributes.get("campaign")
        if not isinstance(campaign, str) or not campaign or record.outcome != "decided":
            return None
        if event.type == "customer.message":
            return CampaignOutcome(
                "replied", at, campaign_id=campaign, conversation_id=record.after.id
            )
        message_id = data.get("message_id")
        if not isinstance(message_id, str) or "." not in message_id:
            return None
        # Our message ids are "<id of the deciding event>.<n>": the send's event.
        sent_by = message_id.rpartition(".")[0]
        if event.type == "delivery.status":
            status = data.get("status")
            if status in ("delivered", "read"):
                return CampaignOutcome(str(status), at, event_id=sent_by)
            if status == "failed":
                code = data.get("error_code")
                reason = f"provider_error: {code}" if code is not None else "provider_error"
                return CampaignOutcome("failed", at, event_id=sent_by, reason=reason)
        if event.type == "delivery.failed":
            reason = str(data.get("reason") or "provider_error")
            return CampaignOutcome("failed", at, event_id=sent_by, reason=reason)
        return None

    async def _write_outcomes(self) -> None:
        while True:
            await self._outcomes_ready.wait()
            self._outcomes_ready.clear()
            while self._outcomes:
                batch = self._outcomes[:OUTCOMES_AT_ONCE]
                del self._outcomes[: len(batch)]
                self._writing = True
                try:
                    await self._flush(batch)
                finally:
                    self._writing = False
                    self._changed.set()

    async def _flush(self, batch: list[CampaignOutcome]) -> None:
        try:
            await self._store.campaign_outcomes(batch, self._clock.now())
        except asyncio.CancelledError:
            raise
        except Exception:
            # Outcomes are reports: a failed write is logged, never retried forever.
            log.exception("campaign_outcomes_not_written", outcomes=len(batch))
            return
        for outcome in batch:
            self._metrics.campaign_outcomes.labels(outcome.kind).inc()


__all__ = [
    "ACTIVE",
    "CAMPAIGNS_SCOPE",
    "FINISHED",
    "AudienceFilter",
    "CampaignRunner",
    "Pacer",
    "Window",
    "channel_address",
    "customer_facts",
    "expand_filter",
    "parse_hour",
    "parse_placeholders",
]
