"""A fake Meta Graph API (WhatsApp Cloud, Messenger) and a fake Meta webhook sender, for tests.

``FakeGraph`` is a real aiohttp server on 127.0.0.1 (ephemeral port): it records every request
(and its answer), answers ``POST /{version}/{phone_number_id}/messages`` with a fresh ``wamid``,
serves media (info + bytes), checks what Graph checks (Bearer token of the number,
``messaging_product``, payload key matching ``type``, text and caption lengths, media by
``link``/``id``, reply buttons, list messages, interactive headers) and can be scripted to fail.
For Messenger it answers ``POST /{version}/me/messages`` (Page token in the ``access_token``
query parameter, ``recipient.id``, ``messaging_type`` / ``tag``, exactly one of ``message`` /
``sender_action``, text length, attachments by URL, quick replies) with a fresh ``mid``, and
sender actions (``mark_seen``, ``typing_on``, ``typing_off``, alone) with the ``recipient_id``.
``MetaSender`` (alias ``WhatsAppSender``, ``MessengerSender``) signs webhook bodies with the app
secret and POSTs them; the builders below make WhatsApp and Messenger payloads.
Like Meta, the fake can post a ``sent`` status webhook for every WhatsApp message it accepts
(``post_statuses``), retrying until the receiver answers 200, and it can ``stall`` sends: take
one and answer too late, or answer too late without taking it.
Everything waits on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

GraphPredicate = Callable[["GraphRequest"], bool]


@dataclass(frozen=True)
class GraphRequest:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    status: int  # what the fake answered
    page_id: str | None = None  # Messenger: the Page whose token was used
    response: Any = None  # the JSON body the fake answered with

    @property
    def provider_id(self) -> str | None:
        """The id the fake gave an accepted send (a ``wamid`` or a Messenger ``mid``)."""
        if not isinstance(self.response, dict):
            return None
        if "message_id" in self.response:
            return str(self.response["message_id"])
        messages = self.response.get("messages") or [{}]
        found = messages[0].get("id")
        return str(found) if found else None

    @property
    def token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return token if scheme == "Bearer" else None

    @property
    def access_token(self) -> str | None:
        """The ``access_token`` query parameter (how Messenger sends pass the Page token)."""
        return self.query.get("access_token")

    @property
    def is_send(self) -> bool:
        """A message sent (not a read receipt, not a sender action)."""
        parts = self.path.strip("/").split("/")
        return (
            len(parts) == 3
            and parts[2] == "messages"
            and not self.is_read_receipt
            and not self.is_sender_action
        )

    @property
    def is_sender_action(self) -> bool:
        """A Messenger ``{"recipient", "sender_action"}`` call on ``/me/messages``."""
        parts = self.path.strip("/").split("/")
        return (
            len(parts) == 3
            and parts[2] == "messages"
            and isinstance(self.json, dict)
            and "sender_action" in self.json
        )

    @property
    def sender_action(self) -> str | None:
        """The sender action of that call (``mark_seen``, ``typing_on``…), else None."""
        return str(self.json["sender_action"]) if self.is_sender_action else None

    @property
    def is_read_receipt(self) -> bool:
        """A WhatsApp ``{"status": "read", "message_id"}`` call on ``/messages``."""
        parts = self.path.strip("/").split("/")
        return (
            len(parts) == 3
            and parts[2] == "messages"
            and isinstance(self.json, dict)
            and self.json.get("status") == "read"
        )

    @property
    def phone_number_id(self) -> str | None:
        parts = self.path.strip("/").split("/")
        return parts[1] if self.is_send and parts[1] != "me" else None


@dataclass
class GraphFailure:
    """A scripted error answer: ``times`` (None = always) for sends matching ``to`` (the
    recipient: WhatsApp ``to``, Messenger ``recipient.id``) and the number or Page, once
    ``after`` matching sends went through."""

    status: int
    code: int
    message: str = "scripted failure"
    details: str = ""
    times: int | None = 1
    to: str | None = None
    phone_number_id: str | None = None
    subcode: int | None = None
    after: int = 0

    def matches(self, endpoint: str, body: Any) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.phone_number_id is not None and self.phone_number_id != endpoint:
            return False
        return self.to is None or _recipient(body) == self.to


@dataclass
class GraphStall:
    """The next ``times`` WhatsApp sends are answered only after ``seconds``: ``taken`` ones
    are accepted first (a wamid, a status webhook ``status_after`` seconds later), the others
    never are (answered 503)."""

    times: int
    taken: bool
    seconds: float
    status_after: float = 0.0


def _recipient(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    recipient = body.get("recipient")
    found = recipient.get("id") if isinstance(recipient, dict) else body.get("to")
    return found if isinstance(found, str) else None


@dataclass
class FakeGraph:
    """The fake Graph API. ``tokens`` maps phone_number_id → the only token accepted for it,
    ``page_tokens`` page_id → the Page's token (Messenger)."""

    version: str = "v21.0"
    tokens: dict[str, str] = field(default_factory=dict)
    page_tokens: dict[str, str] = field(default_factory=dict)
    media: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[GraphRequest] = field(default_factory=list)
    failures: list[GraphFailure] = field(default_factory=list)
    base_url: str = ""
    # Answer the next ``fail_reads`` read receipts with a 500 (scripted failures skip them).
    fail_reads: int = 0
    # Messenger: answer the next ``fail_sender_actions`` sender actions with a 500 (code 2;
    # scripted failures skip them). ``before_sender_action`` is awaited with each valid one's
    # body before it is answered (to look at the service then, or to hold the answer).
    fail_sender_actions: int = 0
    before_sender_action: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    stalls: list[GraphStall] = field(default_factory=list)

    def reads(self) -> list[GraphRequest]:
        """Read receipts the fake accepted, in order."""
        return [r for r in self.requests if r.is_read_receipt and r.status == 200]

    def sender_actions(self, *, accepted: bool = True) -> list[GraphRequest]:
        """Messenger sender actions, in order: those the fake accepted (200), or all."""
        return [
            r for r in self.requests if r.is_sender_action and (r.status == 200 or not accepted)
        ]

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._hook: MetaSender | None = None
        self._hook_retry = 0.1
        self._statuses: list[tuple[str, dict[str, Any]]] = []  # (phone_number_id, status)
        self._statuses_waiting = asyncio.Event()
        self._status_task: asyncio.Task[None] | None = None
        self.statuses_posted = 0
        self._stopping = asyncio.Event()  # ends stalls early
        app = web.Application()
        app.router.add_post("/{version}/me/messages", self._me_messages)  # before the next
        app.router.add_post("/{version}/{phone_number_id}/messages", self._messages)
        app.router.add_get("/media-bytes/{media_id}", self._media_bytes)
        app.router.add_get("/{version}/{media_id}", self._media_info)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> FakeGraph:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._status_task is not None:
            self._status_task.cancel()
            await asyncio.gather(self._status_task, return_exceptions=True)
        if self._hook is not None:
            await self._hook.http.close()
        await self._runner.cleanup()

    def post_statuses(self, url: str, app_secret: str, *, retry_every: float = 0.1) -> None:
        """Post a signed ``sent`` status webhook to ``url`` for every WhatsApp message the
        fake accepts from now on (in order, up to 50 in one body, as Meta batches them); a
        body the receiver does not answer 200 (or cannot be reached) is posted again after
        ``retry_every`` seconds, until it is."""
        self._hook = MetaSender(aiohttp.ClientSession(), url, app_secret)
        self._hook_retry = retry_every
        self._status_task = asyncio.create_task(self._post_statuses())

    def stall(
        self, times: int = 1, *, taken: bool, seconds: float, status_after: float = 0.0
    ) -> GraphStall:
        stall = GraphStall(times, taken, seconds, status_after)
        self.stalls.append(stall)
        return stall

    def _owe_status(self, number: str, item: dict[str, Any]) -> None:
        self._statuses.append((number, item))
        self._statuses_waiting.set()

    def statuses_pending(self) -> int:
        """Statuses accepted sends still owe the receiver."""
        return len(self._statuses)

    async def _post_statuses(self) -> None:
        assert self._hook is not None
        while True:
            await self._statuses_waiting.wait()
            self._statuses_waiting.clear()
            while self._statuses:
                number = self._statuses[0][0]
                batch = []
                for endpoint, item in self._statuses[:50]:
                    if endpoint != number:
                        break
                    batch.append(item)
                try:
                    answer, _ = await self._hook.post(envelope([change(number, statuses=batch)]))
                except (aiohttp.ClientError, OSError):
                    answer = 0
                if answer == 200:
                    del self._statuses[: len(batch)]
                    self.statuses_posted += len(batch)
                else:
                    await asyncio.sleep(self._hook_retry)

    # scripting ---------------------------------------------------------------------------
    def fail(
        self,
        *,
        status: int,
        code: int,
        times: int | None = 1,
        to: str | None = None,
        phone_number_id: str | None = None,
        page_id: str | None = None,
        message: str = "scripted failure",
        details: str = "",
        subcode: int | None = None,
        after: int = 0,
    ) -> GraphFailure:
        """Answer the next ``times`` matching sends (None: all of them) with a Graph error,
        letting the first ``after`` matching sends through."""
        endpoint = phone_number_id or page_id
        failure = GraphFailure(status, code, message, details, times, to, endpoint, subcode, after)
        self.failures.append(failure)
        return failure

    # assertions --------------------------------------------------------------------------
    def sent(self, predicate: GraphPredicate | None = None) -> list[GraphRequest]:
        """Sends the fake accepted (answered 200), in order."""
        return [
            r
            for r in self.requests
            if r.is_send and r.status == 200 and (predicate is None or predicate(r))
        ]

    async def wait_for(
        self, predicate: Callable[[list[GraphRequest]], bool], *, timeout: float = 10.0
    ) -> list[GraphRequest]:
        """Wait until ``predicate(requests)`` holds; return the requests."""
        async with asyncio.timeout(timeout), self._changed:
            while not predicate(self.requests):
                await self._changed.wait()
            return list(self.requests)

    async def wait_sent(
        self, count: int = 1, predicate: GraphPredicate | None = None, *, timeout: float = 10.0
    ) -> list[GraphRequest]:
        """Wait until at least ``count`` accepted sends match; return them."""
        await self.wait_for(lambda _: len(self.sent(predicate)) >= count, timeout=timeout)
        return self.sent(predicate)

    # handlers ----------------------------------------------------------------------------
    async def _record(
        self,
        request: web.Request,
        body: Any,
        status: int,
        page_id: str | None = None,
        response: Any = None,
    ) -> None:
        async with self._changed:
            self.requests.append(
                GraphRequest(
                    request.method,
                    request.path,
                    dict(request.query),
                    dict(request.headers),
                    body,
                    status,
                    page_id,
                    response,
                )
            )
            self._changed.notify_all()

    async def _answer(
        self,
        request: web.Request,
        body: Any,
        status: int,
        payload: dict[str, Any],
        page_id: str | None = None,
    ) -> web.Response:
        await self._record(request, body, status, page_id, payload)
        return web.json_response(payload, status=status)

    def _scripted(self, endpoint: str, body: Any) -> GraphFailure | None:
        """The first scripted failure for this send, used up by one."""
        for failure in self.failures:
            if failure.matches(endpoint, body):
                if failure.after > 0:
                    failure.after -= 1
                    continue
                if failure.times is not None:
                    failure.times -= 1
                return failure
        return None

    def _auth_error(self, request: web.Request, phone_number_id: str | None) -> str | None:
        if "access_token" in request.query:
            return "access tokens go in the Authorization header, not the query string"
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return "missing bearer token"
        if phone_number_id is not None and phone_number_id in self.tokens:
            if self.tokens[phone_number_id] != token:
                return "token does not belong to this phone number"
        elif self.tokens and token not in self.tokens.values():
            return "unknown token"
        return None

    async def _send_body(
        self, request: web.Request, error: Callable[[int, str], dict[str, Any]]
    ) -> tuple[Any, web.Response | None]:
        """A send's JSON body, or the answer refusing it (bad JSON, another API version)."""
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return None, await self._answer(request, None, 400, error(100, "malformed JSON"))
        if request.match_info["version"] != self.version:
            return body, await self._answer(request, body, 400, error(100, "unknown API version"))
        return body, None

    async def _messages(self, request: web.Request) -> web.Response:
        number = request.match_info["phone_number_id"]
        body, refused = await self._send_body(request, _error)
        if refused is not None:
            return refused
        if (auth := self._auth_error(request, number)) is not None:
            return await self._answer(request, body, 401, _error(190, auth))
        if isinstance(body, dict) and body.get("status") == "read":
            return await self._read_receipt(request, body)
        if (problem := _invalid_send(body)) is not None:
            return await self._answer(request, body, 400, _error(100, problem))
        if (failure := self._scripted(number, body)) is not None:
            payload = _error(failure.code, failure.message, failure.details, failure.subcode)
            return await self._answer(request, body, failure.status, payload)
        stall = next((s for s in self.stalls if s.times > 0), None)
        if stall is not None:
            stall.times -= 1
            if not stall.taken:
                await self._stall(stall.seconds)
                return await self._answer(request, body, 503, _error(2, "service unavailable"))
        wamid = f"wamid.FAKE{next(self._ids):06d}"
        answer = {
            "messaging_product": "whatsapp",
            "contacts": [{"input": body.get("to"), "wa_id": body.get("to")}],
            "messages": [{"id": wamid, "message_status": "accepted"}],
        }
        await self._record(request, body, 200, None, answer)
        if self._hook is not None:
            callback = body.get("biz_opaque_callback_data")
            item = status(wamid, "sent", str(body.get("to")), callback_data=callback)
            if stall is not None and stall.status_after > 0:
                later = asyncio.get_running_loop().call_later
                later(stall.status_after, self._owe_status, number, item)
            else:
                self._owe_status(number, item)
        if stall is not None:
            await self._stall(stall.seconds)
        return web.json_response(answer)

    async def _stall(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _read_receipt(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        if body.get("messaging_product") != "whatsapp" or not str(
            body.get("message_id", "")
        ).startswith("wamid."):
            return await self._answer(request, body, 400, _error(100, "invalid read receipt"))
        if self.fail_reads > 0:
            self.fail_reads -= 1
            return await self._answer(request, body, 500, _error(131000, "scripted failure"))
        return await self._answer(request, body, 200, {"success": True})

    async def _me_messages(self, request: web.Request) -> web.Response:
        """Messenger's Send API: the Page is the one whose token is in ``access_token``."""
        body, refused = await self._send_body(request, _page_error)
        if refused is not None:
            return refused
        token = request.query.get("access_token", "")
        page = next((p for p, t in self.page_tokens.items() if t and t == token), None)
        if page is None:
            auth = "unknown access_token" if token else "access_token query parameter missing"
            return await self._answer(request, body, 401, _page_error(190, auth))
        if (problem := _invalid_page_send(body)) is not None:
            return await self._answer(request, body, 400, _page_error(100, problem), page)
        if "sender_action" in body:
            return await self._sender_action(request, body, page)
        if (failure := self._scripted(page, body)) is not None:
            payload = _page_error(failure.code, failure.message, failure.subcode)
            return await self._answer(request, body, failure.status, payload, page)
        answer = {
            "recipient_id": body["recipient"]["id"],
            "message_id": f"m_FAKE{next(self._ids):06d}",
        }
        return await self._answer(request, body, 200, answer, page)

    async def _sender_action(
        self, request: web.Request, body: dict[str, Any], page: str
    ) -> web.Response:
        """A valid sender action: ``before_sender_action``, then a scripted 500 or 200."""
        if self.before_sender_action is not None:
            await self.before_sender_action(body)
        if self.fail_sender_actions > 0:
            self.fail_sender_actions -= 1
            return await self._answer(request, body, 500, _page_error(2, "scripted failure"), page)
        return await self._answer(
            request, body, 200, {"recipient_id": body["recipient"]["id"]}, page
        )

    async def _media_info(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        if (auth := self._auth_error(request, None)) is not None:
            return await self._answer(request, None, 401, _error(190, auth))
        if media_id not in self.media:
            return await self._answer(request, None, 404, _error(100, "unknown media"))
        content, mime = self.media[media_id]
        return await self._answer(
            request,
            None,
            200,
            {
                "messaging_product": "whatsapp",
                "url": f"{self.base_url}/media-bytes/{media_id}",
                "mime_type": mime,
                "sha256": hashlib.sha256(content).hexdigest(),
                "file_size": str(len(content)),  # Graph sends a string or a number
                "id": media_id,
            },
        )

    async def _media_bytes(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        if self._auth_error(request, None) is not None or media_id not in self.media:
            await self._record(request, None, 401)
            return web.Response(status=401)
        await self._record(request, None, 200)
        content, mime = self.media[media_id]
        return web.Response(body=content, content_type=mime.split(";")[0])


def _page_error(code: int, message: str, subcode: int | None = None) -> dict[str, Any]:
    """A Graph error body as Messenger's Send API answers it."""
    error: dict[str, Any] = {
        "message": f"(#{code}) {message}",
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "FAKE",
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


def _error(
    code: int, message: str, details: str = "", subcode: int | None = None
) -> dict[str, Any]:
    body = _page_error(code, message, subcode)
    body["error"]["error_data"] = {"messaging_product": "whatsapp", "details": details or message}
    return body


MESSAGING_TYPES = frozenset({"RESPONSE", "UPDATE", "MESSAGE_TAG"})
MESSAGE_TAGS = frozenset(
    {"HUMAN_AGENT", "CONFIRMED_EVENT_UPDATE", "POST_PURCHASE_UPDATE", "ACCOUNT_UPDATE"}
)
SENDER_ACTIONS = frozenset({"typing_on", "typing_off", "mark_seen"})


def _invalid_page_send(body: Any) -> str | None:
    """What Messenger's Send API would reject in a body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    recipient = body.get("recipient")
    if not isinstance(recipient, dict) or not isinstance(recipient.get("id"), str):
        return "recipient.id is required"
    if ("message" in body) == ("sender_action" in body):
        return "exactly one of message and sender_action"
    if "sender_action" in body:
        if body["sender_action"] in SENDER_ACTIONS:
            return None
        return "sender_action must be typing_on, typing_off or mark_seen"
    if body.get("messaging_type") not in MESSAGING_TYPES:
        return "messaging_type must be RESPONSE, UPDATE or MESSAGE_TAG"
    if (body["messaging_type"] == "MESSAGE_TAG") != ("tag" in body):
        return "a tag goes with messaging_type MESSAGE_TAG, and only with it"
    if "tag" in body and body["tag"] not in MESSAGE_TAGS:
        return "unknown message tag"
    msg = body["message"]
    if not isinstance(msg, dict) or ("text" in msg) == ("attachment" in msg):
        return "message needs exactly one of text and attachment"
    if "text" in msg and not 1 <= len(str(msg["text"]).strip()) <= 2000:
        return "message.text must have 1 to 2000 characters"
    if "attachment" in msg and (problem := _invalid_attachment(msg["attachment"])) is not None:
        return problem
    if "metadata" in msg and not 1 <= len(str(msg["metadata"])) <= 1000:
        return "message.metadata must have 1 to 1000 characters"
    replies = msg.get("quick_replies", [])
    if not isinstance(replies, list) or len(replies) > 13:
        return "at most 13 quick replies"
    for reply in replies:
        if reply.get("content_type") == "text" and not (
            1 <= len(reply.get("title", "")) <= 20 and reply.get("payload")
        ):
            return "a text quick reply needs a title of 1 to 20 characters and a payload"
    return None


ATTACHMENT_TYPES = frozenset({"image", "audio", "video", "file"})


def _invalid_attachment(attachment: Any) -> str | None:
    """What the Send API would reject in an attachment sent by URL, or None."""
    if not isinstance(attachment, dict) or attachment.get("type") not in ATTACHMENT_TYPES:
        return "attachment.type must be image, audio, video or file"
    payload = attachment.get("payload")
    if not isinstance(payload, dict) or not str(payload.get("url", "")).startswith("http"):
        return "attachment.payload.url is required"
    return None


MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})
CAPTIONED = frozenset({"image", "video", "document"})


def _invalid_media(kind: str, media: dict[str, Any]) -> str | None:
    """What Graph would reject in a media object (by ``link`` or uploaded ``id``), or None."""
    if ("link" in media) == ("id" in media):
        return f"{kind} needs exactly one of link and id"
    if "caption" in media and (kind not in CAPTIONED or not 1 <= len(media["caption"]) <= 1024):
        return "a caption (image, video, document only) has 1 to 1024 characters"
    if "filename" in media and kind != "document":
        return "only documents have a filename"
    return None


def _invalid_interactive(interactive: dict[str, Any]) -> str | None:
    """What Graph would reject in reply buttons or a list message, or None."""
    kind = interactive.get("type")
    body = str((interactive.get("body") or {}).get("text", ""))
    action = interactive.get("action") or {}
    if kind == "button":
        if not 1 <= len(body) <= 1024:
            return "reply buttons need a body text of 1 to 1024 characters"
        buttons = action.get("buttons", [])
        if not 1 <= len(buttons) <= 3:
            return "reply buttons: 1 to 3 buttons"
        if any(not 1 <= len(b.get("reply", {}).get("title", "")) <= 20 for b in buttons):
            return "reply button titles have 1 to 20 characters"
        if len({b["reply"].get("id") for b in buttons}) < len(buttons):
            return "reply button ids must be unique"
        header = interactive.get("header")
        if header is not None:
            htype = header.get("type")
            if htype == "text":
                return None if header.get("text") else "a text header needs a text"
            if htype not in ("image", "video", "document") or not isinstance(
                header.get(htype), dict
            ):
                return "a header is text, image, video or document"
            return _invalid_media(htype, header[htype])
    elif kind == "list":
        if not 1 <= len(body) <= 4096:
            return "a list needs a body text of 1 to 4096 characters"
        if not 1 <= len(str(action.get("button", ""))) <= 20:
            return "a list needs a button label of 1 to 20 characters"
        sections = action.get("sections", [])
        rows = [row for section in sections for row in section.get("rows", [])]
        if not 1 <= len(sections) <= 10 or not 1 <= len(rows) <= 10:
            return "a list has 1 to 10 sections and 1 to 10 rows in all"
        if len(sections) > 1 and any(not s.get("title") for s in sections):
            return "sections of a list with several need a title"
        if any(not 1 <= len(r.get("title", "")) <= 24 for r in rows):
            return "list row titles have 1 to 24 characters"
        if any(not 1 <= len(str(r.get("id", ""))) <= 200 for r in rows):
            return "list row ids have 1 to 200 characters"
        if len({r["id"] for r in rows}) < len(rows):
            return "list row ids must be unique"
    return None


def _invalid_send(body: Any) -> str | None:
    """What Graph would reject in a send body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if body.get("messaging_product") != "whatsapp":
        return "messaging_product must be 'whatsapp'"
    if not isinstance(body.get("to"), str) or not body["to"]:
        return "'to' is required"
    kind = body.get("type", "text")
    if not isinstance(body.get(kind), dict):
        return f"a message of type {kind!r} needs the {kind!r} object"
    if kind == "text" and not str(body["text"].get("body", "")).strip():
        return "text.body is required"
    if kind == "text" and len(body["text"]["body"]) > 4096:
        return "text.body has at most 4096 characters"
    if kind in MEDIA_TYPES and (problem := _invalid_media(kind, body[kind])) is not None:
        return problem
    if len(str(body.get("biz_opaque_callback_data", ""))) > 512:
        return "biz_opaque_callback_data has at most 512 characters"
    if kind == "template":
        template = body["template"]
        if not template.get("name") or not isinstance(template.get("language"), dict):
            return "a template needs a name and language.code"
        for component in template.get("components", []):
            if any(p.get("type") != "text" or "text" not in p for p in component["parameters"]):
                return "template text parameters need a text"
    if kind == "interactive":
        return _invalid_interactive(body["interactive"])
    return None


# the webhook side: Meta as the sender ----------------------------------------------------
def signature(body: bytes, app_secret: str) -> str:
    """The ``X-Hub-Signature-256`` header value Meta sends for ``body``."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def text_message(
    wa_id: str, text: str, wamid: str, *, timestamp: int | None = None
) -> dict[str, Any]:
    return message(wa_id, "text", wamid, {"text": {"body": text}}, timestamp=timestamp)


def message(
    wa_id: str,
    kind: str,
    wamid: str,
    content: dict[str, Any] | None = None,
    *,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """One ``messages[]`` item; ``content`` holds the type's payload key(s)."""
    return {
        "from": wa_id,
        "id": wamid,
        "timestamp": str(timestamp or int(time.time())),
        "type": kind,
        **(content or {}),
    }


def status(
    wamid: str,
    state: str,
    recipient: str,
    *,
    error_code: int | None = None,
    callback_data: str | None = None,
) -> dict[str, Any]:
    """One ``statuses[]`` item; ``failed`` ones carry ``errors[]`` with ``error_code``;
    ``callback_data`` is the ``biz_opaque_callback_data`` of the send."""
    item: dict[str, Any] = {
        "id": wamid,
        "status": state,
        "timestamp": str(int(time.time())),
        "recipient_id": recipient,
        "pricing": {"billable": True, "pricing_model": "PMP", "category": "service"},
    }
    if callback_data is not None:
        item["biz_opaque_callback_data"] = callback_data
    if error_code is not None:
        item["errors"] = [
            {
                "code": error_code,
                "title": "scripted",
                "message": "scripted",
                "error_data": {"details": "scripted failure"},
            }
        ]
    return item


def change(
    phone_number_id: str,
    *,
    messages: list[dict[str, Any]] | None = None,
    statuses: list[dict[str, Any]] | None = None,
    names: dict[str, str] | None = None,
    display_phone_number: str = "15550001111",
) -> dict[str, Any]:
    """One ``changes[]`` item (field ``messages``) for a business number."""
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": display_phone_number,
            "phone_number_id": phone_number_id,
        },
    }
    if messages:
        senders = dict.fromkeys(m["from"] for m in messages)
        value["contacts"] = [
            {"profile": {"name": (names or {}).get(w, f"User {w}")}, "wa_id": w} for w in senders
        ]
        value["messages"] = messages
    if statuses:
        value["statuses"] = statuses
    return {"field": "messages", "value": value}


def envelope(*entries: list[dict[str, Any]], waba_id: str = "102290129340398") -> dict[str, Any]:
    """The webhook body: one ``entry`` per list of changes."""
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": waba_id, "changes": changes} for changes in entries],
    }


# Messenger payloads --------------------------------------------------------------------------
def messaging_item(
    psid: str, page_id: str, *, timestamp: int | None = None, **content: Any
) -> dict[str, Any]:
    """One ``messaging[]`` event from ``psid`` to the Page; ``content`` is its kind's key, e.g.
    ``message={...}``, ``postback={...}``, ``delivery={...}``, ``read={...}``, ``reaction=...``."""
    return {
        "sender": {"id": psid},
        "recipient": {"id": page_id},
        "timestamp": timestamp or int(time.time() * 1000),
        **content,
    }


def messenger_text(
    psid: str, page_id: str, text: str, mid: str, *, timestamp: int | None = None
) -> dict[str, Any]:
    return messaging_item(psid, page_id, timestamp=timestamp, message={"mid": mid, "text": text})


def messenger_echo(psid: str, page_id: str, text: str, mid: str) -> dict[str, Any]:
    """The echo of a message the Page sent: sender and recipient swapped, ``is_echo``."""
    item = messaging_item(page_id, psid, message={"mid": mid, "text": text, "is_echo": True})
    item["message"]["app_id"] = 263902037430900
    return item


def page_envelope(*entries: tuple[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The Messenger webhook body: one ``entry`` per (page_id, messaging items)."""
    return {
        "object": "page",
        "entry": [
            {"id": page_id, "time": int(time.time() * 1000), "messaging": items}
            for page_id, items in entries
        ],
    }


@dataclass
class MetaSender:
    """Meta's side of the webhook: signs bodies with the app secret and POSTs them."""

    http: aiohttp.ClientSession
    url: str
    app_secret: str

    async def post(
        self, payload: dict[str, Any] | bytes, *, signature_header: str | None = "sign"
    ) -> tuple[int, Any]:
        """POST ``payload``; ``signature_header`` None sends none, another string sends it as
        is. Returns (status, parsed JSON body or text)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if signature_header == "sign":
            headers["X-Hub-Signature-256"] = signature(body, self.app_secret)
        elif signature_header is not None:
            headers["X-Hub-Signature-256"] = signature_header
        async with self.http.post(self.url, data=body, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def verify(self, mode: str, token: str, challenge: str) -> tuple[int, str]:
        """Meta's GET handshake."""
        params = {"hub.mode": mode, "hub.verify_token": token, "hub.challenge": challenge}
        async with self.http.get(self.url, params=params) as resp:
            return resp.status, await resp.text()


WhatsAppSender = MetaSender
MessengerSender = MetaSender
