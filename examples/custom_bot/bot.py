"""A tiny bot behind convctl's custom bot connector (the contract: docs/custom-bot.md).

It needs only aiohttp, not convctl:

    python examples/custom_bot/bot.py --port 8090 --secret "$BOT_SECRET"
    python examples/custom_bot/bot.py --port 8090 --secret "$BOT_SECRET" --async \
        [--callback-url http://convctl:8080/connectors/bots/demo/callback]

It checks convctl's signature on every request, answers by keyword ("hi" with buttons,
"hours", "prices"), hands over on "agent" and ends on "bye". With ``--async`` it answers
``202`` at once and posts the answer, signed, to the callback URL (``--callback-url`` if
given, else the ``callback_url`` of the request).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections import OrderedDict
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("custom_bot")

TOLERANCE_S = 300  # refuse requests signed longer ago (or further ahead) than this
REMEMBERED_DELIVERIES = 1000

GREETING = {
    "text": "Hello! I am the example bot. What would you like to know?",
    "buttons": [
        {"title": "Opening hours", "payload": "hours"},
        {"title": "Prices", "payload": "prices"},
    ],
}
REPLIES: dict[str, tuple[str, dict[str, Any]]] = {
    "hi": ("greet", GREETING),
    "hello": ("greet", GREETING),
    "hours": ("hours", {"text": "We are open Monday to Friday, 9:00 to 17:00."}),
    "prices": (
        "prices",
        {"text": "Our plans start at 10 EUR a month.", "image": "https://example.com/plans.png"},
    ),
}
HANDOFF_WORDS = {"agent", "human", "person"}
WORD = re.compile(r"[a-z0-9']+")


# signatures --------------------------------------------------------------------------------
def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``v1=`` + hex HMAC-SHA256 of ``timestamp + "." + body`` (the exact bytes)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def check_signature(secret: str, headers: Any, body: bytes) -> str | None:
    """None if the request is signed with ``secret`` and fresh, else an error code."""
    timestamp = headers.get("Convctl-Timestamp", "")
    given = headers.get("Convctl-Signature", "")
    if not timestamp or not given:
        return "missing_signature"
    try:
        sent_at = int(timestamp)
    except ValueError:
        return "bad_signature"
    if abs(time.time() - sent_at) > TOLERANCE_S:
        return "stale_signature"
    expected = signature(secret, timestamp, body).encode()
    # Several comma-separated v1= values may come while convctl rotates its secret.
    if any(hmac.compare_digest(v.strip().encode(), expected) for v in given.split(",")):
        return None
    return "bad_signature"


def signed_headers(secret: str, body: bytes, delivery_id: str) -> dict[str, str]:
    timestamp = str(int(time.time()))
    return {
        "Content-Type": "application/json",
        "Convctl-Timestamp": timestamp,
        "Convctl-Signature": signature(secret, timestamp, body),
        "Convctl-Delivery-Id": delivery_id,
    }


# the bot's brain ------------------------------------------------------------------------------
def answer_for(text: str) -> dict[str, Any]:
    """The answer body for one customer message."""
    words = WORD.findall(text.lower())
    if HANDOFF_WORDS.intersection(words):
        return {
            "replies": [{"text": "Let me connect you to an agent."}],
            "handoff": {"queue": "support", "reason": "customer_request"},
            "intent": "handoff",
            "confidence": 1.0,
        }
    if "bye" in words:
        return {
            "replies": [{"text": "Goodbye!"}],
            "end": True,
            "intent": "goodbye",
            "confidence": 1.0,
        }
    for word in words:
        if word in REPLIES:
            intent, reply = REPLIES[word]
            return {"replies": [reply], "intent": intent, "confidence": 1.0}
    return {
        "replies": [{"text": "Sorry, I did not understand. Try 'hours', 'prices' or 'agent'."}],
        "intent": "fallback",
        "confidence": 0.0,
    }


# the HTTP side ------------------------------------------------------------------------------
def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class ExampleBot:
    def __init__(self, secret: str, *, asynchronous: bool, callback_url: str | None) -> None:
        self.secret = secret
        self.asynchronous = asynchronous
        self.callback_url = callback_url
        # Delivery id -> answer (or None in async mode): a redelivery gets the same answer.
        self.seen: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self.tasks: set[asyncio.Task[None]] = set()
        self.http: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_post("/messages", self.messages)
        app.cleanup_ctx.append(self.lifecycle)
        return app

    async def lifecycle(self, app: web.Application) -> Any:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        yield
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.http.close()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def messages(self, request: web.Request) -> web.Response:
        raw = await request.read()
        refused = check_signature(self.secret, request.headers, raw)
        if refused:
            log.warning("refused a request: %s", refused)
            return error(401, refused, f"refused: {refused}")
        try:
            body = json.loads(raw)
            conversation_id = str(body["conversation_id"])
            seq = int(body["message"]["seq"])
            text = str(body["message"]["text"])
        except (ValueError, KeyError, TypeError) as exc:
            return error(400, "invalid_body", f"unexpected request body: {exc!r}")
        delivery_id = request.headers.get("Convctl-Delivery-Id") or f"{conversation_id}:{seq}"

        callback_url = self.callback_url or body.get("callback_url")
        if self.asynchronous and callback_url:
            if delivery_id not in self.seen:  # a redelivery: the callback is already on its way
                self.remember(delivery_id, None)
                reply = {
                    **answer_for(text),
                    "conversation_id": conversation_id,
                    "reply_to": seq,
                    # Derived from the delivery id, so even a restarted bot reuses it.
                    "reply_id": "r-" + hashlib.sha256(delivery_id.encode()).hexdigest()[:32],
                }
                task = asyncio.create_task(self.call_back(callback_url, reply))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            return web.json_response({"accepted": True}, status=202)

        answer = self.seen.get(delivery_id) or answer_for(text)
        self.remember(delivery_id, answer)
        return web.json_response(answer)

    def remember(self, delivery_id: str, answer: dict[str, Any] | None) -> None:
        self.seen[delivery_id] = answer
        while len(self.seen) > REMEMBERED_DELIVERIES:
            self.seen.popitem(last=False)

    async def call_back(self, url: str, reply: dict[str, Any]) -> None:
        """POST the answer, signed; retried on 429, 5xx and network errors."""
        assert self.http is not None
        raw = json.dumps(reply).encode()
        for attempt in range(5):
            # Signed afresh on each attempt: the timestamp must be recent when it arrives.
            headers = signed_headers(self.secret, raw, reply["reply_id"])
            try:
                async with self.http.post(url, data=raw, headers=headers) as resp:
                    if resp.status < 300:
                        return
                    detail = await resp.text()
                    if resp.status != 429 and resp.status < 500:
                        log.error("callback refused: HTTP %s %s", resp.status, detail[:300])
                        return
                    log.warning("callback failed: HTTP %s, trying again", resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("callback failed: %r, trying again", exc)
            await asyncio.sleep(0.5 * 2**attempt)
        log.error("callback given up for %s", reply["reply_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument(
        "--secret",
        default=os.environ.get("CUSTOM_BOT_SECRET"),
        help="the secret shared with convctl (default: $CUSTOM_BOT_SECRET)",
    )
    parser.add_argument("--async", dest="asynchronous", action="store_true")
    parser.add_argument("--callback-url", help="where to post answers in --async mode")
    args = parser.parse_args()
    if not args.secret:
        parser.error("--secret (or CUSTOM_BOT_SECRET) is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    bot = ExampleBot(args.secret, asynchronous=args.asynchronous, callback_url=args.callback_url)
    web.run_app(bot.app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
