"""Asking bots: the outbox's bot deliveries, their guards, and answers turned into events.

Every bot, whatever its platform, is asked the same way: within its timeout, retried with
backoff by the outbox up to its own attempt limit, and behind a circuit breaker, so a bot
that is down or slow costs its conversations one ``bot.failed`` each (the rules then route
to a person) and never stalls anything else. Answers that come back later through a
connector's callback route take the same way into the inbox as synchronous ones.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import structlog

from connectors.base import Bot, BotCallback, BotReply, BotRequest
from controller.clock import Clock
from controller.errors import BotError, NotFound, RequestError
from controller.inbox import Inbox
from controller.metrics import Metrics
from controller.models import NewEvent
from controller.outbox import RetryPolicy
from controller.store.base import OutboxRow

log = structlog.get_logger(__name__)

# Reasons a bot.failed event can give; a connector's BotError message may start with one.
ANSWERED_KEPT = 10_000
FALLBACKS_ATTRIBUTE = "bot_fallbacks"
UNDERSTOOD_NOTHING = frozenset({"fallback", "no_match", "no_input"})
FAILURE_REASONS = ("timeout", "circuit_open", "malformed", "unavailable", "rejected", "no_bot")


@dataclass
class CircuitBreaker:
    """Stops asking a bot after ``failures`` failures in a row, for ``reset`` seconds.

    Then one question is let through (half open): its success closes the circuit, its
    failure opens it again for another ``reset`` seconds.
    """

    failures: int
    reset: float
    clock: Clock
    consecutive: int = 0
    open_until: datetime | None = None
    trial: bool = False

    @property
    def state(self) -> str:
        if self.open_until is None:
            return "closed"
        return "half_open" if self.clock.now() >= self.open_until else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.trial:
            self.trial = True
            return True
        return False

    def succeeded(self) -> None:
        self.consecutive = 0
        self.open_until = None
        self.trial = False

    def failed(self) -> bool:
        """Count a failure; True when it opened the circuit."""
        self.consecutive += 1
        reopen = self.trial or (self.open_until is None and self.consecutive >= self.failures)
        self.trial = False
        if reopen:
            self.open_until = self.clock.now() + timedelta(seconds=self.reset)
        return reopen


def reply_events(
    bot: str,
    conversation_id: str,
    reply: BotReply,
    key: str,
    reply_to_seq: int | None,
) -> list[NewEvent]:
    """The events one answer makes: a ``bot.message`` per message, then the outcome.

    ``key`` is stable for one answer, so a redelivered answer makes no second event.
    """
    source = f"bot:{bot}"
    common: dict[str, Any] = {
        "bot": bot,
        "intent": reply.intent,
        "confidence": reply.confidence,
        "slots": reply.slots,
        "reply_to_seq": reply_to_seq,
    }
    if reply.attributes:
        common["attributes"] = reply.attributes
    events = []
    for i, m in enumerate(reply.messages):
        data = {**common, "text": m.text}
        if m.buttons:
            data["buttons"] = [{"title": b.title, "payload": b.payload} for b in m.buttons]
        if m.image:
            data["image"] = m.image
        if m.custom is not None:
            data["custom"] = m.custom
        events.append(
            NewEvent(
                type="bot.message",
                source=source,
                dedupe_key=f"{key}:{i}",
                conversation_id=conversation_id,
                data=data,
            )
        )
    outcomes: list[tuple[str, dict[str, Any]]] = []
    if reply.failed:
        outcomes.append(("bot.failed", {"reason": reply.failed}))
    if reply.handoff:
        outcomes.append(("bot.handoff", dict(reply.handoff_data)))
    if reply.ended and not reply.handoff:  # handing over ends the bot's part, not the talk
        outcomes.append(("bot.ended", {}))
    for kind, extra in outcomes:
        events.append(
            NewEvent(
                type=kind,  # type: ignore[arg-type]
                source=source,
                dedupe_key=f"{key}:{kind}",
                conversation_id=conversation_id,
                data={**extra, **common},
            )
        )
    return events


class BotGateway:
    """Delivers ``bot:<name>`` outbox rows and takes answers from callback routes."""

    def __init__(self, bots: dict[str, Bot], clock: Clock, metrics: Metrics, inbox: Inbox) -> None:
        self._bots = bots
        self._clock = clock
        self._metrics = metrics
        self._inbox = inbox
        self.breakers = {
            name: CircuitBreaker(bot.settings.breaker_failures, bot.settings.breaker_reset, clock)
            for name, bot in bots.items()
        }
        # Questions whose answer is to come by callback: (bot, conversation) -> watchdog.
        self._awaiting: dict[tuple[str, str], tuple[str, int, asyncio.Task[None]]] = {}
        self._stopped = False
        # The newest question answered by callback per (bot, conversation): an answer can
        # arrive before the bot's "accepted" does. Bounded: oldest entries go first.
        self._answered_seq: OrderedDict[tuple[str, str], int] = OrderedDict()

    async def stop(self) -> None:
        self._stopped = True
        watchdogs = [task for _, _, task in self._awaiting.values()]
        self._awaiting.clear()
        for task in watchdogs:
            task.cancel()
        await asyncio.gather(*watchdogs, return_exceptions=True)

    def policy(self, destination: str) -> RetryPolicy | None:
        bot = self._bots.get(destination.split(":", 1)[-1])
        if bot is None:
            return None
        s = bot.settings
        return RetryPolicy(s.max_attempts, s.retry_backoff, s.retry_backoff * 8)

    async def deliver(self, row: OutboxRow) -> None:
        name = row.destination.split(":", 1)[1]
        bot = self._bots.get(name)
        if bot is None:
            raise BotError(f"no_bot: no bot instance {name!r}", retryable=False)
        breaker = self.breakers[name]
        if not breaker.allow():
            self._metrics.bot_requests.labels(name, "circuit_open").inc()
            raise BotError(f"circuit_open: bot {name} failed too often", retryable=False)
        p = row.payload
        attributes = p.get("attributes")
        request = BotRequest(
            conversation_id=row.conversation_id,
            text=str(p.get("text", "")),
            language=str(p.get("language", "en")),
            mode=str(p.get("mode", "direct")),
            reply_to_seq=int(p.get("reply_to_seq", 0)),
            idempotency_key=row.idempotency_key,
            channel=str(p.get("channel", "")),
            customer_id=str(p.get("customer_id", "")),
            attributes=dict(attributes) if isinstance(attributes, dict) else {},
        )
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(bot.settings.timeout):
                reply = await bot.ask(request)
        except TimeoutError:
            self._failed(name, breaker, "timeout")
            raise BotError(
                f"timeout: no answer within {bot.settings.timeout:g} s", retryable=True
            ) from None
        except BotError:
            self._failed(name, breaker, "error")
            raise
        except (aiohttp.ClientError, OSError) as exc:
            self._failed(name, breaker, "error")
            raise BotError(f"unavailable: {type(exc).__name__}: {exc}", retryable=True) from exc
        breaker.succeeded()
        self._metrics.bot_requests.labels(name, "pending" if reply.pending else "answered").inc()
        self._metrics.bot_seconds.labels(name).observe(asyncio.get_running_loop().time() - started)
        if reply.pending:
            # The answer comes through the connector's callback route; if none comes within
            # the bot's timeout, the rules hear bot.failed as for a bot that did not answer.
            self._await_callback(name, row, bot.settings.timeout)
            return
        reply = self._count_fallbacks(reply, request, bot.settings.fallbacks_before_failure)
        events = reply_events(
            name, row.conversation_id, reply, row.idempotency_key, request.reply_to_seq
        )
        if events:
            await self._inbox.submit(events)

    @staticmethod
    def _count_fallbacks(reply: BotReply, request: BotRequest, limit: int) -> BotReply:
        """Fallbacks in a row are counted on the conversation (``bot_fallbacks``); the
        answer reports ``failed`` only once there were ``limit`` of them."""
        before = request.attributes.get(FALLBACKS_ATTRIBUTE, "0")
        count = int(before) if before.isdigit() else 0
        if reply.failed not in UNDERSTOOD_NOTHING:
            if count == 0:
                return reply
            return replace(reply, attributes={**reply.attributes, FALLBACKS_ATTRIBUTE: "0"})
        count += 1
        return replace(
            reply,
            failed=reply.failed if count >= limit else None,
            attributes={**reply.attributes, FALLBACKS_ATTRIBUTE: str(count)},
        )

    def _await_callback(self, name: str, row: OutboxRow, timeout: float) -> None:
        if self._stopped:
            return
        key = (name, row.conversation_id)
        previous = self._awaiting.pop(key, None)
        if previous is not None:
            previous[2].cancel()  # a newer question supersedes it
        seq = int(row.payload.get("reply_to_seq", 0))
        if self._answered_seq.get(key, -1) >= seq:
            return  # its answer came already
        task = asyncio.create_task(self._watch(key, row, timeout))
        self._awaiting[key] = (row.idempotency_key, seq, task)

    async def _watch(self, key: tuple[str, str], row: OutboxRow, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if self._awaiting.get(key, ("",))[0] != row.idempotency_key:
            return
        del self._awaiting[key]
        name = key[0]
        self._failed(name, self.breakers[name], "timeout")
        log.warning("bot_callback_missing", bot=name, timeout=timeout)
        await self.failed(row, f"BotError: timeout: no callback within {timeout:g} s")

    def _answered(self, name: str, conversation_id: str, seq: int | None) -> None:
        """A callback arrived: the watchdog of the question it answers stands down."""
        if seq is not None:
            key = (name, conversation_id)
            self._answered_seq[key] = max(seq, self._answered_seq.pop(key, -1))
            while len(self._answered_seq) > ANSWERED_KEPT:
                self._answered_seq.popitem(last=False)
        waiting = self._awaiting.get((name, conversation_id))
        if waiting is not None and (seq is None or seq >= waiting[1]):
            del self._awaiting[(name, conversation_id)]
            waiting[2].cancel()

    def _failed(self, name: str, breaker: CircuitBreaker, outcome: str) -> None:
        self._metrics.bot_requests.labels(name, outcome).inc()
        if breaker.failed():
            log.warning("bot_circuit_opened", bot=name, reset=breaker.reset)
        self._metrics.bot_circuit_open.labels(name).set(1 if breaker.open_until else 0)

    async def failed(self, row: OutboxRow, error: str) -> None:
        """A question became a dead letter: tell the rules, once, with a reason."""
        name = row.destination.split(":", 1)[1]
        detail = error.partition(": ")[2]  # "BotError: timeout: ..."
        reason = next((r for r in FAILURE_REASONS if detail.startswith(r)), "error")
        try:
            await self._inbox.submit(
                [
                    NewEvent(
                        type="bot.failed",
                        source=f"bot:{name}",
                        dedupe_key=f"{row.idempotency_key}:failed",
                        conversation_id=row.conversation_id,
                        data={
                            "bot": name,
                            "reason": reason,
                            "error": error[:500],
                            "reply_to_seq": row.payload.get("reply_to_seq"),
                        },
                    )
                ]
            )
        except RequestError as exc:  # e.g. the conversation closed meanwhile
            log.info("dead_letter_event_not_stored", kind="bot.failed", refused=exc.code)

    async def callback(self, answer: BotCallback) -> None:
        """An answer that came later through a callback route.

        Raises RequestError (a 4xx for the caller) when the conversation is unknown or closed.
        """
        if answer.bot not in self._bots:
            raise NotFound(f"no bot instance {answer.bot!r}", code="unknown_bot")
        self._metrics.bot_requests.labels(answer.bot, "callback").inc()
        self._answered(answer.bot, answer.conversation_id, answer.reply_to_seq)
        events = reply_events(
            answer.bot, answer.conversation_id, answer.reply, answer.dedupe_key, answer.reply_to_seq
        )
        if events:
            await self._inbox.submit(events)
