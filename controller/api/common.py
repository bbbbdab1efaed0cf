"""Shared pieces of the HTTP surface: JSON errors, body parsing, authentication."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from controller.errors import ConvctlError, Forbidden, RequestError, Unauthorized
from controller.keys import INBOX, METRICS, STORE
from controller.models import NewEvent
from controller.store.base import Accepted

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(status: int, code: str, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON error with a machine-readable code, and a log line."""
    try:
        return await handler(request)
    except ConvctlError as exc:
        status = exc.status if 400 <= exc.status < 600 else 500
        _count(request, status, exc.code)
        log.info(
            "request_refused", path=request.path, status=status, code=exc.code, reason=exc.message
        )
        # ``details``: what the error names (the missing scope...), next to code and message
        extra: dict[str, object] = dict(getattr(exc, "details", None) or {})
        if hasattr(exc, "errors"):
            extra["errors"] = exc.errors
        return error_body(status, exc.code, exc.message, **extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        _count(request, exc.status, code)
        log.info("request_refused", path=request.path, status=exc.status, code=code)
        return error_body(exc.status, code, exc.text or exc.reason)
    except Exception:
        log.exception("request_failed", path=request.path)
        _count(request, 500, "internal")
        return error_body(500, "internal", "internal error")


BAD_TEXT = "text may not contain NUL characters (U+0000) or unpaired surrogates"


def has_bad_text(data: object) -> bool:
    """Whether a parsed JSON value holds, in a string or a key, a NUL character or an
    unpaired surrogate (a ``\\ud800`` escape alone).

    PostgreSQL stores neither in text or JSONB, and neither is text a channel can send, so
    such input is refused at the door, on either store (the API answers the same on both)."""
    if isinstance(data, str):
        if "\x00" in data:
            return True
        if data.isascii():
            return False
        try:
            data.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(data, dict):
        return any(has_bad_text(k) or has_bad_text(v) for k, v in data.items())
    if isinstance(data, list):
        return any(has_bad_text(v) for v in data)
    return False


def refuse_bad_text(raw: bytes, data: object, status: int = 422) -> None:
    """Refuse a parsed JSON body holding bad text. UTF-8 JSON carries it only as a ``\\u``
    escape; a UTF-16 or UTF-32 body (which ``json.loads`` reads too) has NUL bytes."""
    if (b"\\u" in raw or b"\x00" in raw) and has_bad_text(data):
        raise RequestError(BAD_TEXT, code="invalid_text", status=status)


@web.middleware
async def text_guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A 400 for a NUL character in the path or the query (see ``has_bad_text``)."""
    query = request.query.items()
    if "\x00" in request.path or any(has_bad_text(k) or has_bad_text(v) for k, v in query):
        raise RequestError(BAD_TEXT, code="invalid_text")
    return await handler(request)


def _count(request: web.Request, status: int, code: str) -> None:
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.http_errors.labels(str(status), code).inc()


async def read_json(request: web.Request, model: type[M]) -> M:
    """Parse and validate a JSON body; 400 for bad JSON, 422 for a wrong shape, 413 if huge."""
    if request.content_type != "application/json":
        raise RequestError(
            "send a JSON body (Content-Type: application/json)",
            code="unsupported_media_type",
            status=415,
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestError("request body too large", code="too_large", status=413) from exc
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON: {exc}", code="malformed_json") from exc
    refuse_bad_text(raw, data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise RequestError(f"invalid body: {details}", code="invalid_body", status=422) from exc


@dataclass(frozen=True)
class Principal:
    role: str  # admin, agent, app, crm
    subject: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def authenticate(request: web.Request, *roles: str, token: str | None = None) -> Principal:
    """The caller's principal from ``Authorization: Bearer`` (or ``token`` for WebSockets)."""
    if token is None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized()
    found = await request.app[STORE].token(hash_token(token.strip()))
    if found is None:
        raise Unauthorized()
    principal = Principal(*found)
    if roles and principal.role not in roles:
        raise Forbidden(f"this route needs the role {' or '.join(roles)}", code="wrong_role")
    return principal


async def submit_once(app: web.Application, event: NewEvent) -> Accepted:
    """Store a write's event; a retry with the same key returns the original, and the same
    key with another body (its ``request_hash`` in the data) is a 422."""
    accepted = (await app[INBOX].submit([event]))[0]
    if accepted.duplicate:
        original = await app[STORE].event(accepted.event_id)
        if original is not None and original.data.get("request_hash") != event.data.get(
            "request_hash"
        ):
            raise RequestError(
                "this idempotency key was used with a different request",
                code="idempotency_key_reused",
                status=422,
            )
    return accepted


def accepted_response(accepted: Accepted) -> web.Response:
    """202 with the stored event, or 200 for a retry that changed nothing."""
    return web.json_response(
        {
            "event_id": accepted.event_id,
            "conversation_id": accepted.conversation_id,
            "seq": accepted.seq,
            "duplicate": accepted.duplicate,
        },
        status=200 if accepted.duplicate else 202,
    )


def request_hash(body: BaseModel) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()[:32]
