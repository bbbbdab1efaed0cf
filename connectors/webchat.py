"""The web chat channel: a page served by the service and a WebSocket per visitor.

A visitor gets a server-signed session token (the visitor id alone is never a credential).
Each message frame carries a client id made by the page and resent unchanged on retry, which
is the inbox dedupe key. Reconnecting with the same token resumes the open conversation and
replays its history.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, ClassVar
from urllib.parse import urlsplit

import structlog
from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.base import Channel, ConnectorSettings, OutboundMessage
from controller.errors import ConvctlError, Forbidden, RequestError, Unauthorized
from controller.models import NewEvent

log = structlog.get_logger(__name__)

ENDPOINT = "web"
HistoryFn = Callable[[str, str, str], Awaitable[dict[str, Any]]]
PresentFn = Callable[[str], Awaitable[list[tuple[str, str, int]]]]


class WebChatSettings(ConnectorSettings):
    max_text_chars: int = Field(4096, ge=1, le=65536)
    messages_per_window: int = Field(30, ge=1)
    window_seconds: float = Field(10.0, gt=0)
    sessions_per_ip_per_minute: int = Field(60, ge=1)
    title: str = "Chat with us"


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    client_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    text: str = Field(min_length=1)
    # A tapped button: what the button stands for (its payload), sent along with its title.
    payload: str | None = Field(default=None, min_length=1, max_length=1024)


class _RateLimiter:
    """Sliding-window counter per key."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._hits: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        hits = self._hits[key]
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True

    def forget_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, v in self._hits.items() if not v or v[-1] <= now - self.window]:
            del self._hits[key]


class WebChatChannel(Channel):
    capabilities: ClassVar[frozenset[str]] = frozenset({"text", "buttons", "images"})
    settings_model: ClassVar[type[ConnectorSettings]] = WebChatSettings
    settings: WebChatSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sockets: dict[str, set[web.WebSocketResponse]] = defaultdict(set)
        self._message_limit = _RateLimiter(
            self.settings.messages_per_window, self.settings.window_seconds
        )
        self._session_limit = _RateLimiter(self.settings.sessions_per_ip_per_minute, 60.0)
        self._page: str | None = None
        self._sweep: asyncio.Task[None] | None = None

    # routes ----------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        base = f"/{self.name}"
        return [
            web.get(base, self._page_handler),
            web.post(f"{base}/session", self._session_handler),
            web.get(f"{base}/ws", self._ws_handler),
        ]

    async def _page_handler(self, request: web.Request) -> web.Response:
        if self._page is None:
            template = resources.files("connectors").joinpath("webchat.html").read_text("utf-8")
            self._page = template.replace("{{INSTANCE}}", self.name).replace(
                "{{TITLE}}", self.settings.title
            )
        return web.Response(text=self._page, content_type="text/html")

    async def _session_handler(self, request: web.Request) -> web.Response:
        ip = request.remote or "unknown"
        if not self._session_limit.allow(ip):
            raise RequestError("too many new sessions", code="rate_limited", status=429)
        self._check_origin(request)
        visitor = "v_" + secrets.token_urlsafe(16)
        return web.json_response({"visitor_id": visitor, "token": self._sign(visitor)})

    # tokens ----------------------------------------------------------------------------
    def _sign(self, visitor: str) -> str:
        mac = hmac.new(
            self.context.session_secret.encode(),
            f"webchat:{self.name}:{visitor}".encode(),
            hashlib.sha256,
        ).hexdigest()
        return f"{visitor}.{mac}"

    def _visitor(self, token: str) -> str:
        visitor = token.rpartition(".")[0]
        if not visitor or not hmac.compare_digest(self._sign(visitor), token):
            raise Unauthorized("invalid web chat session token")
        return visitor

    def _check_origin(self, request: web.Request) -> None:
        origin = request.headers.get("Origin")
        if origin is None:
            return  # not a browser: the token is the credential
        allowed = self.context.allowed_origins
        if allowed:
            if origin not in allowed and "*" not in allowed:
                raise Forbidden(f"origin {origin!r} is not allowed", code="origin_not_allowed")
            return
        if urlsplit(origin).netloc != request.host:
            raise Forbidden(f"origin {origin!r} is not allowed", code="origin_not_allowed")

    # socket ----------------------------------------------------------------------------
    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        visitor = self._visitor(request.query.get("token", ""))
        self._check_origin(request)
        connection = request.query.get("connection") or secrets.token_hex(8)
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=self.settings.max_text_chars * 8)
        await ws.prepare(request)
        self._sockets[visitor].add(ws)
        metrics = self.context.service.get("metrics")
        if metrics is not None:
            metrics.websockets.labels("webchat").inc()
        source = f"webchat:{self.name}"
        try:
            history: HistoryFn = self.context.service["history"]
            snapshot = await history(self.name, ENDPOINT, visitor)
            await ws.send_json({"type": "history", "visitor_id": visitor, **snapshot})
            if snapshot.get("open") and not snapshot.get("customer_present", True):
                await self._submit_status(visitor, "customer.returned", connection, source)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(ws, visitor, msg.data, source)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            sockets = self._sockets.get(visitor)
            if sockets is not None:
                sockets.discard(ws)
                if not sockets:
                    del self._sockets[visitor]
            if metrics is not None:
                metrics.websockets.labels("webchat").dec()
            if visitor not in self._sockets:
                await asyncio.shield(
                    self._submit_status(visitor, "customer.disconnected", connection, source)
                )
        return ws

    async def _submit_status(self, visitor: str, kind: str, connection: str, source: str) -> None:
        history: HistoryFn = self.context.service["history"]
        snapshot = await history(self.name, ENDPOINT, visitor)
        if not snapshot.get("open"):
            return
        try:
            await self.context.submit(
                [
                    NewEvent(
                        type=kind,  # type: ignore[arg-type]
                        source=source,
                        dedupe_key=f"{visitor}:{connection}:{kind}",
                        conversation_id=snapshot["conversation_id"],
                    )
                ]
            )
        except ConvctlError as exc:
            log.info("webchat_status_not_stored", kind=kind, reason=exc.message)

    async def _on_text(
        self, ws: web.WebSocketResponse, visitor: str, data: str, source: str
    ) -> None:
        client_id = None
        try:
            raw = json.loads(data)
            if isinstance(raw, dict):
                client_id = raw.get("client_id") if isinstance(raw.get("client_id"), str) else None
            frame = _Frame.model_validate(raw)
            if frame.type != "message":
                raise RequestError(f"unknown frame type {frame.type!r}", code="unknown_frame")
            if len(frame.text) > self.settings.max_text_chars:
                raise RequestError("message too long", code="too_long", status=413)
            if not self._message_limit.allow(visitor):
                raise RequestError("too many messages", code="rate_limited", status=429)
            accepted = await self.context.submit(
                [
                    NewEvent(
                        type="customer.message",
                        source=source,
                        dedupe_key=f"{visitor}:{frame.client_id}",
                        channel="webchat",
                        instance=self.name,
                        endpoint=ENDPOINT,
                        identity=visitor,
                        data={
                            "text": frame.text,
                            "client_id": frame.client_id,
                            **({"reply_id": frame.payload} if frame.payload else {}),
                        },
                    )
                ]
            )
            await ws.send_json(
                {
                    "type": "ack",
                    "client_id": frame.client_id,
                    "event_id": accepted[0].event_id,
                    "conversation_id": accepted[0].conversation_id,
                    "duplicate": accepted[0].duplicate,
                }
            )
        except (json.JSONDecodeError, ValidationError) as exc:
            log.info("webchat_bad_frame", error=str(exc)[:200])
            await ws.send_json(
                {
                    "type": "error",
                    "client_id": client_id,
                    "code": "bad_frame",
                    "message": "frames are JSON objects {type: 'message', client_id, text}",
                }
            )
        except RequestError as exc:
            log.info("webchat_frame_refused", code=exc.code)
            await ws.send_json(
                {"type": "error", "client_id": client_id, "code": exc.code, "message": exc.message}
            )

    # outbound --------------------------------------------------------------------------
    async def send(self, message: OutboundMessage) -> str | None:
        frame = {"type": "message", "conversation_id": message.conversation_id, **message.message}
        for ws in list(self._sockets.get(message.identity, ())):
            if not ws.closed:
                try:
                    await ws.send_json(frame)
                except ConnectionError:
                    # The transcript already holds the message; the page fetches it on reconnect.
                    log.info("webchat_push_failed")
        self._message_limit.forget_idle()
        return message.message.get("id")

    async def start(self) -> None:
        self._sweep = asyncio.create_task(self._disconnect_survivors(), name="webchat-sweep")

    async def _disconnect_survivors(self) -> None:
        """No socket survives a restart: customers last seen connected are disconnected now,
        so the grace-period rules run for them as if their page had closed. The dedupe key
        names the last presence event, so repeated restarts add nothing twice."""
        present: PresentFn = self.context.service["present_customers"]
        found = await present(self.name)
        events = [
            NewEvent(
                type="customer.disconnected",
                source=f"webchat:{self.name}",
                dedupe_key=f"{visitor}:restart-after-{seq}:customer.disconnected",
                conversation_id=conversation_id,
                data={"reason": "service_restarted"},
            )
            for conversation_id, visitor, seq in found
            if visitor not in self._sockets
        ]
        for i in range(0, len(events), 500):
            try:
                await self.context.submit(events[i : i + 500])
            except ConvctlError as exc:  # e.g. closed meanwhile: submit the rest one by one
                log.info("webchat_sweep_batch_refused", reason=exc.message)
                for ev in events[i : i + 500]:
                    with contextlib.suppress(ConvctlError):
                        await self.context.submit([ev])
        if events:
            log.info("webchat_customers_disconnected_at_start", count=len(events))

    def connected(self, visitor: str) -> int:
        return len(self._sockets.get(visitor, ()))

    async def stop(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            await asyncio.gather(self._sweep, return_exceptions=True)
        for sockets in list(self._sockets.values()):
            for ws in list(sockets):
                await ws.close()
