"""A fake Rasa server for tests: the REST and callback channels and the tracker of the HTTP API.

``FakeRasa`` is a real aiohttp server on 127.0.0.1 (ephemeral port) speaking Rasa's wire
format (``protocols/rasa.md``):
- ``GET /webhooks/rest/``, ``GET /webhooks/callback/`` → ``{"status": "ok"}``;
- ``POST /webhooks/rest/webhook`` → the scripted messages for the input text, as an array of
  ``{"recipient_id": sender, …}``;
- ``POST /webhooks/callback/webhook`` → POSTs each scripted message to ``callback_url``, one
  POST per message, then answers text ``success`` (as Rasa does: its callbacks go out while
  the webhook request is still being processed; ``callbacks_first=False`` answers first);
- ``GET /conversations/{id}/tracker`` (``?token=`` when ``api_token`` is set) → the tracker:
  latest intent, entities, slots and ``paused`` as scripted for the last input.
Knobs: answer an HTTP error, a raw (malformed) or arbitrary JSON body, hold answers until
released (for timeouts), fail the tracker. Every request is recorded; waits are on
conditions, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from controller.testing import serve_on_loopback

RASA_VERSION = "3.6.20"


@dataclass
class RasaRequest:
    """One request the fake received; ``status`` is None while it is being answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    status: int | None = None

    @property
    def sender(self) -> str | None:
        found = self.json.get("sender") if isinstance(self.json, dict) else None
        return found if isinstance(found, str) else None

    @property
    def message(self) -> str | None:
        found = self.json.get("message") if isinstance(self.json, dict) else None
        return found if isinstance(found, str) else None

    @property
    def is_webhook(self) -> bool:
        return self.method == "POST" and self.path.endswith("/webhook")


@dataclass(frozen=True)
class CallbackPost:
    """One message the fake POSTed to the callback URL: the answer's status (None: the
    connection failed, ``error`` says why)."""

    url: str
    json: dict[str, Any]
    status: int | None
    body: str = ""
    error: str = ""


@dataclass
class Turn:
    """What the bot does for one input text: its messages (without ``recipient_id``) and
    what the tracker then says about the turn."""

    messages: list[dict[str, Any]]
    intent: str | None = None
    confidence: float = 1.0
    entities: list[dict[str, Any]] = field(default_factory=list)
    slots: dict[str, Any] = field(default_factory=dict)
    paused: bool = False


@dataclass
class _Override:
    """A scripted webhook answer used instead of the turn, ``times`` times (None: always)."""

    status: int
    body: bytes
    content_type: str
    times: int | None


@dataclass
class FakeRasa:
    """The fake server. ``turns`` maps an input text to its Turn; other texts get
    ``fallback``. ``api_token`` protects the HTTP API (``?token=``)."""

    api_token: str | None = None
    callback_url: str | None = None
    callback_headers: dict[str, str] = field(default_factory=dict)
    callbacks_first: bool = True
    turns: dict[str, Turn] = field(default_factory=dict)
    fallback: Turn = field(
        default_factory=lambda: Turn(
            [{"text": "Sorry, I did not get that."}], intent="nlu_fallback", confidence=0.31
        )
    )
    requests: list[RasaRequest] = field(default_factory=list)
    callbacks: list[CallbackPost] = field(default_factory=list)
    trackers: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_url: str = ""

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self._overrides: list[_Override] = []
        self._tracker_failures: list[_Override] = []
        self._gate: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        app = web.Application()
        app.router.add_get("/", self._hello)
        app.router.add_get("/version", self._version)
        app.router.add_get("/webhooks/rest/", self._health)
        app.router.add_get("/webhooks/callback/", self._health)
        app.router.add_post("/webhooks/rest/webhook", self._rest_webhook)
        app.router.add_post("/webhooks/callback/webhook", self._callback_webhook)
        app.router.add_get("/conversations/{sender_id}/tracker", self._tracker)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> FakeRasa:
        self.base_url = await serve_on_loopback(self._runner)
        self._http = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        self.release()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        await self._runner.cleanup()

    # scripting ---------------------------------------------------------------------------
    def script(
        self,
        text: str,
        *messages: dict[str, Any],
        intent: str | None = None,
        confidence: float = 1.0,
        entities: list[dict[str, Any]] | None = None,
        slots: dict[str, Any] | None = None,
        paused: bool = False,
    ) -> Turn:
        """Answer ``text`` with ``messages`` (none: an empty array)."""
        turn = Turn(list(messages), intent, confidence, entities or [], slots or {}, paused)
        self.turns[text] = turn
        return turn

    def fail(self, status: int = 500, *, times: int | None = 1) -> None:
        """Answer the next ``times`` webhook requests with ``status`` (as Sanic does)."""
        body = b"Internal Server Error" if status >= 500 else b"Bad Request"
        self._overrides.append(_Override(status, body, "text/plain", times))

    def answer_raw(
        self, body: str | bytes, *, times: int | None = 1, content_type: str = "application/json"
    ) -> None:
        """Answer the next ``times`` webhook requests with 200 and exactly ``body``."""
        raw = body.encode() if isinstance(body, str) else body
        self._overrides.append(_Override(200, raw, content_type, times))

    def answer_json(self, value: Any, *, times: int | None = 1) -> None:
        """Answer the next ``times`` webhook requests with 200 and ``value`` as JSON."""
        self.answer_raw(json.dumps(value), times=times)

    def fail_tracker(self, status: int = 500, *, times: int | None = 1) -> None:
        body = _error_body(status, "ServerError", "scripted failure")
        self._tracker_failures.append(
            _Override(status, json.dumps(body).encode(), "application/json", times)
        )

    def hold(self) -> None:
        """Keep every webhook request waiting (for timeouts) until ``release()``."""
        if self._gate is None or self._gate.is_set():
            self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    # assertions --------------------------------------------------------------------------
    def webhook_requests(self) -> list[RasaRequest]:
        return [r for r in self.requests if r.is_webhook]

    async def wait_for(
        self, predicate: Callable[[FakeRasa], bool], *, timeout: float = 10.0
    ) -> None:
        """Wait until ``predicate(self)`` holds."""
        async with asyncio.timeout(timeout), self._changed:
            while not predicate(self):
                await self._changed.wait()

    async def wait_callbacks(self, count: int, *, timeout: float = 10.0) -> list[CallbackPost]:
        await self.wait_for(lambda f: len(f.callbacks) >= count, timeout=timeout)
        return list(self.callbacks)

    # handlers ----------------------------------------------------------------------------
    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _record(self, request: web.Request, body: Any) -> RasaRequest:
        recorded = RasaRequest(
            request.method, request.path, dict(request.query), dict(request.headers), body
        )
        self.requests.append(recorded)
        await self._notify()
        return recorded

    async def _done(self, recorded: RasaRequest, response: web.Response) -> web.Response:
        recorded.status = response.status
        await self._notify()
        return response

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text=f"Hello from Rasa: {RASA_VERSION}")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": RASA_VERSION, "minimum_compatible_version": "3.5.0"})

    async def _health(self, request: web.Request) -> web.Response:
        recorded = await self._record(request, None)
        return await self._done(recorded, web.json_response({"status": "ok"}))

    async def _user_message(
        self, request: web.Request, channel: str
    ) -> tuple[RasaRequest, web.Response | None, str, Turn]:
        """Record and check a channel request, wait if held, apply the turn to the tracker.

        Returns the record, an answer that replaces the turn (error, scripted), the sender
        and the turn.
        """
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        recorded = await self._record(request, body)
        if self._gate is not None:
            await self._gate.wait()
        sender, text = recorded.sender, recorded.message
        if sender is None or text is None:
            answer = web.Response(status=400, text="sender and message are required")
            return recorded, answer, "", self.fallback
        for override in self._overrides:
            if override.times is None or override.times > 0:
                if override.times is not None:
                    override.times -= 1
                answer = web.Response(
                    status=override.status, body=override.body, content_type=override.content_type
                )
                return recorded, answer, sender, self.fallback
        turn = self.turns.get(text, self.fallback)
        self._apply(sender, text, turn, channel, body.get("metadata"))
        return recorded, None, sender, turn

    def _apply(self, sender: str, text: str, turn: Turn, channel: str, metadata: Any) -> None:
        tracker = self.trackers.setdefault(sender, _empty_tracker(sender))
        tracker["slots"].update(turn.slots)
        tracker["paused"] = turn.paused or tracker["paused"]
        tracker["latest_message"] = {
            "text": text,
            "intent": {"name": turn.intent, "confidence": turn.confidence} if turn.intent else {},
            "entities": list(turn.entities),
            "metadata": metadata if isinstance(metadata, dict) else {},
        }
        tracker["latest_input_channel"] = channel

    async def _rest_webhook(self, request: web.Request) -> web.Response:
        recorded, answer, sender, turn = await self._user_message(request, "rest")
        if answer is None:
            answer = web.json_response([{"recipient_id": sender, **m} for m in turn.messages])
        return await self._done(recorded, answer)

    async def _callback_webhook(self, request: web.Request) -> web.Response:
        recorded, answer, sender, turn = await self._user_message(request, "callback")
        if answer is None:
            messages = [{"recipient_id": sender, **m} for m in turn.messages]
            if self.callbacks_first:
                await self._post_callbacks(messages)
            else:
                task = asyncio.create_task(self._post_callbacks(messages))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            answer = web.Response(text="success")
        return await self._done(recorded, answer)

    async def _post_callbacks(self, messages: list[dict[str, Any]]) -> None:
        """One POST per message, in order; failures are recorded, never retried (as Rasa)."""
        for message in messages:
            url = self.callback_url or ""
            if self._http is None or not url:
                post = CallbackPost(url, message, None, error="no callback_url configured")
            else:
                try:
                    async with self._http.post(
                        url, json=message, headers=self.callback_headers
                    ) as resp:
                        post = CallbackPost(url, message, resp.status, await resp.text())
                except aiohttp.ClientError as exc:
                    post = CallbackPost(url, message, None, error=f"{type(exc).__name__}: {exc}")
            self.callbacks.append(post)
            await self._notify()

    async def _tracker(self, request: web.Request) -> web.Response:
        recorded = await self._record(request, None)
        if self.api_token is not None and request.query.get("token") != self.api_token:
            body = _error_body(401, "NotAuthenticated", "User is not authenticated.")
            return await self._done(recorded, web.json_response(body, status=401))
        for failure in self._tracker_failures:
            if failure.times is None or failure.times > 0:
                if failure.times is not None:
                    failure.times -= 1
                answer = web.Response(
                    status=failure.status, body=failure.body, content_type=failure.content_type
                )
                return await self._done(recorded, answer)
        sender = request.match_info["sender_id"]
        tracker = self.trackers.get(sender, _empty_tracker(sender))
        return await self._done(recorded, web.json_response(tracker))


def _empty_tracker(sender: str) -> dict[str, Any]:
    return {
        "sender_id": sender,
        "slots": {"session_started_metadata": None},
        "latest_message": {"intent": {}, "entities": [], "text": None, "message_id": None},
        "latest_event_time": None,
        "followup_action": None,
        "paused": False,
        "events": [],
        "latest_input_channel": None,
        "active_loop": {},
        "latest_action": {"action_name": "action_listen"},
        "latest_action_name": "action_listen",
    }


def _error_body(status: int, reason: str, message: str) -> dict[str, Any]:
    """The HTTP API's error body."""
    return {
        "version": RASA_VERSION,
        "status": "failure",
        "message": message,
        "reason": reason,
        "details": {},
        "help": None,
        "code": status,
    }
