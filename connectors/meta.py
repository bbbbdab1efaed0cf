"""What Meta's channels share (WhatsApp Cloud API, Messenger): the app settings, the signed
webhook (GET handshake, ``X-Hub-Signature-256`` over the raw body, size limit), one inbox
submit per delivery, Graph API calls and the Graph error → ChannelSendError mapping, and the
outbound pieces both use: media, long texts cut into parts, parts sent once per key.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import hmac
import json
import re
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import aiohttp
import structlog
from aiohttp import web
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from connectors.base import Channel, ConnectorSettings, OutboundMessage, read_body
from controller.errors import ChannelSendError, Conflict, Forbidden, RequestError, WebhookAuthError
from controller.metrics import Metrics
from controller.models import NewEvent
from controller.settings import is_placeholder

log = structlog.get_logger(__name__)

ItemT = TypeVar("ItemT")


# settings ---------------------------------------------------------------------------------
def _real_token(value: str) -> str:
    if is_placeholder(value):
        raise ValueError("access_token is missing or a placeholder")
    return value


# A business endpoint's token: never shown in reprs, placeholders refused.
AccessToken = Annotated[str, Field(repr=False), AfterValidator(_real_token)]


class MetaAppSettings(ConnectorSettings):
    """One Meta app: its Graph API, its secrets and the webhook limits."""

    graph_base_url: str = Field("https://graph.facebook.com", pattern=r"^https?://[^\s/]+")
    graph_api_version: str = Field("v21.0", pattern=r"^v[0-9]+\.[0-9]+$")
    app_secret: str = Field(repr=False)
    verify_token: str = Field(repr=False)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    http_timeout_s: float = Field(10.0, gt=0)

    @field_validator("graph_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _real_secrets(self) -> MetaAppSettings:
        # Refused in every profile: a guessable app secret lets anyone forge customer messages.
        bad = [f for f in ("app_secret", "verify_token") if is_placeholder(getattr(self, f))]
        if bad:
            raise ValueError(f"missing or placeholder secrets: {', '.join(bad)}")
        return self

    @property
    def graph_url(self) -> str:
        return f"{self.graph_base_url}/{self.graph_api_version}"


def ensure_unique(ids: Iterable[str], what: str) -> None:
    """Refuse a business endpoint listed twice."""
    listed = list(ids)
    if len(listed) != len(set(listed)):
        raise ValueError(f"a {what} is listed twice")


# provider payloads ------------------------------------------------------------------------
class Payload(BaseModel):
    """Base of Meta payload models: unknown fields are tolerated (Meta adds them freely)."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class _GraphError(Payload):
    code: int | None = None
    error_subcode: int | None = None
    message: str | None = None
    error_data: dict[str, Any] | None = None


class _GraphErrorBody(Payload):
    error: _GraphError


class _Delivery(Payload):
    object: str
    entry: list[dict[str, Any]]


def clean(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the keys whose value is None."""
    return {k: v for k, v in data.items() if v is not None}


def body_error(exc: ValidationError) -> RequestError:
    """A 400 that says which fields of a webhook body are wrong (at most five)."""
    details = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
    )
    return RequestError(f"invalid webhook body: {details}", code="invalid_body")


# Graph errors -----------------------------------------------------------------------------
# A code matches by itself, a (code, subcode) pair only with that subcode.
Codes = frozenset[int | tuple[int, int]]


@dataclass(frozen=True)
class GraphCodes:
    """A channel's Graph error codes per failure reason (its protocol sheet, section 5)."""

    window_closed: Codes
    invalid_recipient: Codes
    rate_limited: Codes
    transient: Codes


def _hit(codes: Codes, code: int | None, subcode: int | None) -> bool:
    if code is None:
        return False
    return code in codes or (subcode is not None and (code, subcode) in codes)


def final_failure(codes: GraphCodes, code: int | None, subcode: int | None = None) -> str | None:
    """``window_closed`` / ``invalid_recipient`` when an error code means one; else None."""
    if _hit(codes.window_closed, code, subcode):
        return "window_closed"
    if _hit(codes.invalid_recipient, code, subcode):
        return "invalid_recipient"
    return None


def send_error(status: int, data: Any, codes: GraphCodes) -> ChannelSendError:
    """Map a Graph error answer: the error code is authoritative, the HTTP status a hint."""
    error: _GraphError | None = None
    if isinstance(data, dict):
        try:
            error = _GraphErrorBody.model_validate(data).error
        except ValidationError:
            error = None
    code = error.code if error else None
    sub = error.error_subcode if error else None
    details = (error.error_data or {}).get("details") if error and error.error_data else None
    text = (error.message or "") if error else ""
    if code is not None and not text.startswith(f"(#{code})"):
        text = f"(#{code}) {text}".strip()
    described = f"HTTP {status} {text}" + (f" [{details}]" if details else "")
    if sub is not None:
        described += f" [subcode {sub}]"
    if _hit(codes.window_closed, code, sub):
        return ChannelSendError(f"window_closed: {described}", retryable=False)
    if _hit(codes.invalid_recipient, code, sub):
        return ChannelSendError(f"invalid_recipient: {described}", retryable=False)
    if status == 429 or _hit(codes.rate_limited, code, sub):
        return ChannelSendError(f"rate_limited: {described}", retryable=True)
    if status >= 500 or _hit(codes.transient, code, sub):
        return ChannelSendError(f"provider_error: {described}", retryable=True)
    return ChannelSendError(f"provider_error: {described}", retryable=False)


# outbound helpers -------------------------------------------------------------------------
def buttons_of(raw: Any) -> list[tuple[str, str]]:
    """Buttons an outbound message carries: ``["Yes", …]`` or ``[{"id", "title"}, …]``."""
    if not isinstance(raw, list):
        return []
    out: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item:
            out.append((f"b{i}", item))
        elif isinstance(item, dict) and item.get("title"):
            out.append((str(item.get("id") or f"b{i}"), str(item["title"])))
    return out


def numbered(text: str, buttons: list[tuple[str, str]]) -> str:
    """The text followed by the buttons' titles as numbered lines (for channels or messages
    that cannot show them as buttons)."""
    lines = [f"{i}. {title}" for i, (_, title) in enumerate(buttons, 1)]
    return "\n".join([text, *lines]) if text else "\n".join(lines)


def fit_buttons(
    text: str, buttons: list[tuple[str, str]], most: int, title_max: int
) -> tuple[str, bool]:
    """(text, use the buttons): buttons that do not fit degrade to numbered lines of text."""
    if not buttons:
        return text, False
    fits = len(buttons) <= most and all(len(title) <= title_max for _, title in buttons)
    if text and fits:
        return text, True
    return numbered(text, buttons), False


def joined(*texts: str | None) -> str:
    """The non-empty texts as paragraphs of one text."""
    return "\n\n".join(t for t in texts if t)


# Where a long text may be cut, best first: between paragraphs, lines, sentences, words.
_BREAKS = (
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n\s*"),
    re.compile(r"(?:(?<=[.!?\u2026])|(?<=[.!?\u2026][\"'\u201d\u2019)\]]))\s+"),
    re.compile(r"\s+"),
)


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in parts of at most ``limit`` characters, in order.

    Each cut is at the last paragraph break that keeps the part within the limit (and at
    least a third full), else the last line break, sentence end or word gap; a text without any
    is cut hard. Whitespace at a cut is dropped. A text within the limit is one part, as is.
    """
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[: limit + 1]
        head_end, tail_start = limit, limit
        for pattern in _BREAKS:
            found = [m for m in pattern.finditer(window) if limit // 3 <= m.start() <= limit]
            if found:
                head_end, tail_start = found[-1].start(), found[-1].end()
                break
        head = rest[:head_end].rstrip()
        if head:
            parts.append(head)
        rest = rest[tail_start:].lstrip()
    if rest or not parts:
        parts.append(rest)
    return parts


def split_tail(text: str, limit: int) -> tuple[str, str]:
    """(head, tail): ``tail`` is the end of ``text`` that fits in ``limit`` characters, cut
    where ``split_text`` would cut (its largest piece at the best kind of break, at least
    a third full); ``head`` is what comes before it ("" when the whole text fits)."""
    if len(text) <= limit:
        return "", text
    start = len(text) - limit  # the tail begins at or after this
    for pattern in _BREAKS:
        found = [
            m
            for m in pattern.finditer(text)
            if start <= m.end() <= len(text) - limit // 3 and m.start() > 0
        ]
        if found:
            return text[: found[0].start()].rstrip(), text[found[0].end() :]
    return text[:start], text[start:]


MediaType = Literal["image", "audio", "video", "document", "sticker"]


class OutboundMedia(BaseModel):
    """``message["media"]`` of an outbound message (``message["image"]``, a URL, is the
    same as ``{"type": "image", "url": …}``)."""

    model_config = ConfigDict(extra="forbid")

    type: MediaType
    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2048)
    filename: str | None = Field(None, min_length=1, max_length=240)
    caption: str | None = None


def media_of(message: dict[str, Any]) -> OutboundMedia | None:
    """The media an outbound message carries; a malformed one is a final send failure."""
    raw = message.get("media")
    if raw is None and message.get("image"):
        raw = {"type": "image", "url": message["image"]}
    if raw is None:
        return None
    try:
        return OutboundMedia.model_validate(raw)
    except ValidationError as exc:
        raise ChannelSendError(
            f"provider_error: invalid media: {exc.error_count()} errors", retryable=False
        ) from exc


def part_keys(key: str, count: int) -> list[str]:
    """The idempotency keys of a message's parts: the message's own key for one part,
    ``key:1`` … ``key:n`` for several."""
    return [key] if count == 1 else [f"{key}:{i}" for i in range(1, count + 1)]


def unknown_endpoint(what: str, value: str) -> ChannelSendError:
    """The conversation's business endpoint is not (any more) in the settings."""
    return ChannelSendError(f"provider_error: unknown {what} {value!r}", retryable=False)


# Parts accepted by Graph, remembered (per instance, in memory) so that retrying a message
# whose later part failed does not send its earlier parts again.
SENT_PARTS_KEPT = 4096


# the channel base -------------------------------------------------------------------------
class MetaChannel(Channel, Generic[ItemT]):
    """A channel fed by a Meta app webhook and answering through the Graph API.

    Subclasses parse the envelope into items and map items to events; the base verifies,
    limits, submits (once per delivery, in order) and calls Graph.
    """

    channel: ClassVar[str]
    webhook_object: ClassVar[str]  # the ``object`` of the deliveries this channel serves
    graph_codes: ClassVar[GraphCodes]
    capabilities: ClassVar[frozenset[str]] = frozenset({"text", "buttons", "images", "media"})
    settings: MetaAppSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Work after the commit (read receipts, sender actions, media downloads): kept so
        # that stop() can finish it; its outcomes are counted in ``stats`` and the metrics.
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: Counter[str] = Counter()
        self._source = f"{self.channel}:{self.name}"
        self._sent_parts: OrderedDict[str, str | None] = OrderedDict()

    async def stop(self) -> None:
        """Give background work a moment, then cancel what is left."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=5.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until no background work is running (tests, benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, what: str) -> None:
        self.stats[what] += 1
        metrics = self.context.service.get("metrics")
        if isinstance(metrics, Metrics):
            metrics.channel_background.labels(self.channel, what).inc()

    def routes(self) -> list[web.RouteDef]:
        path = f"/webhooks/{self.name}"
        return [web.get(path, self._verify_handler), web.post(path, self._webhook_handler)]

    @abc.abstractmethod
    def _items(self, entries: list[dict[str, Any]]) -> list[ItemT]:
        """The delivery's items, in order; raises ValidationError for a wrong shape."""

    def _parse(self, data: Any) -> list[ItemT] | None:
        """The items of a delivery; None for an ``object`` this channel does not serve."""
        delivery = _Delivery.model_validate(data)
        if delivery.object != self.webhook_object:
            log.info(
                f"{self.channel}_other_object_ignored", instance=self.name, object=delivery.object
            )
            return None
        return self._items(delivery.entry)

    @abc.abstractmethod
    async def _events(self, items: Sequence[ItemT]) -> list[NewEvent]:
        """Map the items to events (looking up open conversations where needed)."""

    # inbound ---------------------------------------------------------------------------
    async def _verify_handler(self, request: web.Request) -> web.Response:
        """Meta's subscription handshake: echo ``hub.challenge`` if the verify token matches."""
        q = request.query
        token = q.get("hub.verify_token", "")
        challenge = q.get("hub.challenge", "")
        ok = hmac.compare_digest(token.encode(), self.settings.verify_token.encode())
        if q.get("hub.mode") != "subscribe" or not ok or not challenge or len(challenge) > 256:
            log.warning(f"{self.channel}_verify_refused", instance=self.name)
            raise Forbidden("webhook verification failed", code="verification_failed")
        return web.Response(text=challenge, content_type="text/plain")

    async def _webhook_handler(self, request: web.Request) -> web.Response:
        """Verify the signature over the raw body, map every item, store all in one submit.

        The 200 goes out only after the commit, so an answered delivery is never lost; a
        redelivery is deduplicated by the items' dedupe keys.
        """
        raw = await self._read_body(request)
        self._check_signature(request, raw)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"malformed JSON: {exc}", code="malformed_json") from exc
        try:
            items = self._parse(data)
        except ValidationError as exc:
            raise body_error(exc) from exc
        if items is None:
            return web.json_response({"ok": True, "events": 0})
        stored = await self._store(items)
        return web.json_response({"ok": True, "events": stored})

    async def _read_body(self, request: web.Request) -> bytes:
        """The exact bytes received, refused past the instance's size limit (413)."""
        limit = self.settings.max_body_bytes
        return await read_body(request, limit)

    def _check_signature(self, request: web.Request, raw: bytes) -> None:
        header = request.headers.get("X-Hub-Signature-256", "")
        if not header:
            log.warning(
                f"{self.channel}_signature_missing", instance=self.name, remote=request.remote
            )
            raise WebhookAuthError("missing X-Hub-Signature-256", code="missing_signature")
        expected = hmac.new(self.settings.app_secret.encode(), raw, hashlib.sha256).hexdigest()
        scheme, _, given = header.partition("=")
        if scheme != "sha256" or not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning(
                f"{self.channel}_signature_invalid", instance=self.name, remote=request.remote
            )
            raise Forbidden("invalid X-Hub-Signature-256", code="bad_signature")

    async def _store(self, items: Sequence[ItemT]) -> int:
        """Submit every event of the delivery, in order, as one inbox submit.

        A status attaches to the identity's open conversation, found before the submit; if
        that conversation closes in between, the submit is refused and tried again (every
        item is deduplicated, so trying again adds nothing twice).
        """
        for attempt in range(3):
            events = await self._events(items)
            if not events:
                return 0
            try:
                accepted = await self.context.submit(events)
            except Conflict as exc:
                if exc.code != "conversation_closed" or attempt == 2:
                    raise
                log.info(f"{self.channel}_status_conversation_closed_retry", instance=self.name)
                continue
            self._after_commit(events)
            return sum(1 for a in accepted if not a.duplicate)
        return 0  # pragma: no cover - the loop returns or raises

    def _after_commit(self, events: Sequence[NewEvent]) -> None:
        """Called once a delivery's events are committed (duplicates included), before the
        200: start background work here, never wait on it."""

    def _customer_message(
        self, dedupe_key: str, endpoint: str, identity: str, data: dict[str, Any]
    ) -> NewEvent:
        return NewEvent(
            type="customer.message",
            source=self._source,
            dedupe_key=dedupe_key,
            channel=self.channel,
            instance=self.name,
            endpoint=endpoint,
            identity=identity,
            data=clean(data),
        )

    def _delivery_status(
        self, dedupe_key: str, conversation_id: str, data: dict[str, Any]
    ) -> NewEvent:
        return NewEvent(
            type="delivery.status",
            source=self._source,
            dedupe_key=dedupe_key,
            conversation_id=conversation_id,
            data=clean(data),
        )

    async def _open_conversation(self, endpoint: str, identity: str) -> dict[str, Any] | None:
        """The identity's open conversation (``history`` snapshot: id, messages); None if
        there is none."""
        snapshot: dict[str, Any] = await self.context.service["history"](
            self.name, endpoint, identity
        )
        return snapshot if snapshot.get("open") else None

    async def _our_message_id(self, provider_id: str, conversation_id: str) -> str | None:
        """Our id of the message the provider knows as ``provider_id``, if it was sent in
        that conversation (the service records what ``send`` returned; without its
        ``provider_message`` lookup, None)."""
        lookup = self.context.service.get("provider_message")
        if lookup is None:
            return None
        found = await lookup(self.name, provider_id)
        if found is None or getattr(found, "conversation_id", None) != conversation_id:
            return None
        message_id = getattr(found, "message_id", None)
        return str(message_id) if message_id else None

    # outbound --------------------------------------------------------------------------
    async def _send_parts(
        self,
        message: OutboundMessage,
        bodies: Sequence[dict[str, Any]],
        send_one: Callable[[dict[str, Any], str], Awaitable[str | None]],
    ) -> str | None:
        """Send a message's parts in order, each with its own idempotency key; return the
        last part's provider id. When a later part fails and the outbox tries the message
        again, the parts Graph already accepted are not sent again."""
        keys = part_keys(message.idempotency_key, len(bodies))
        provider_id: str | None = None
        for body, key in zip(bodies, keys, strict=True):
            if key in self._sent_parts:
                provider_id = self._sent_parts[key]
                continue
            provider_id = await send_one(body, key)
            if len(keys) > 1:
                self._remember_sent(key, provider_id)
        return provider_id

    def _remember_sent(self, key: str, provider_id: str | None) -> None:
        """Graph has the part sent under ``key``: a later send of it is skipped."""
        self._sent_parts[key] = provider_id
        if len(self._sent_parts) > SENT_PARTS_KEPT:
            self._sent_parts.popitem(last=False)

    async def _graph_call(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> Any:
        """One Graph API call; errors mapped to ChannelSendError (query secrets redacted)."""
        http = self.context.http
        if http is None or http.closed:  # not started yet, or shutting down: try later
            raise ChannelSendError("provider_error: the service is not running", retryable=True)
        timeout = aiohttp.ClientTimeout(total=self.settings.http_timeout_s)
        try:
            async with http.request(
                method, url, json=json_body, headers=headers, params=params, timeout=timeout
            ) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            text = f"provider_error: {type(exc).__name__}: {exc}"
            for secret in (params or {}).values():
                text = text.replace(secret, "[redacted]") if secret else text
            # Graph may have taken a request whose answer never came; one that never
            # reached it (no connection) did not.
            sent = not isinstance(exc, aiohttp.ClientConnectorError)
            raise ChannelSendError(text, retryable=True, ambiguous=sent) from exc
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if 200 <= status < 300:
            return data
        raise send_error(status, data, self.graph_codes)
