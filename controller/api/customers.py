"""The Customer API: profiles, identities, lookup by identity, under ``/api/v1/customers``.

``admin`` and ``crm`` tokens manage customers, ``agent`` tokens read them. Updates need
``If-Match`` with the ETag (the version): a stale one is a 412, none a 428. POSTs take an
``Idempotency-Key`` (scoped by principal and route, stored with the request's hash in the
write's own transaction): a replay gets the original answer, another body with it a 422.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import structlog
from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)
from pydantic import StringConstraints as Str

from controller.api.common import Principal, authenticate, read_json, refuse_bad_text
from controller.apps import require_scope
from controller.customers import (
    PROFILE_SCOPE,
    CustomSchema,
    ProfileNotices,
    normalize_email,
    normalize_identity,
    normalize_phone,
)
from controller.customers import parse_identity as parse_identity_text
from controller.errors import NotFound, RequestError
from controller.keys import APPS, CLOCK, CUSTOMERS, DISPATCHER, INBOX, SETTINGS, STORE
from controller.models import NewEvent
from controller.store.base import (
    CustomerQuery,
    CustomerRecord,
    CustomerSchema,
    IdempotencyKey,
    Identity,
    Replay,
)

log = structlog.get_logger(__name__)

WRITE_SCOPE = "customers:write"


async def _writer(request: web.Request) -> Principal:
    """Admin and crm tokens, and apps with ``customers:write``, manage customers."""
    return await require_scope(request, WRITE_SCOPE, also=("crm",))


async def _reader(request: web.Request, *, agents: bool = True) -> Principal:
    """Admin and crm tokens, apps with ``customers:read`` and (unless ``agents`` is False:
    reading every profile at once) agents read customers."""
    roles = ("crm", "agent") if agents else ("crm",)
    return await require_scope(request, PROFILE_SCOPE, also=roles)


# what erasure writes in place of a personal value
ERASED = "[erased]"
# bulk upsert: the body is streamed line by line, so it may exceed the app's body limit
BULK_MAX_BYTES = 1 << 30
BULK_BATCH = 500
BULK_MAX_FAILURES = 10_000
# the streamed export reads this many profiles per store query
EXPORT_PAGE = 500

CustomKey = Annotated[str, Str(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
CustomValue = StrictBool | StrictInt | StrictFloat | Annotated[str, Str(max_length=1000)]
Language = Annotated[str, Str(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")]
Kind = Literal["whatsapp", "messenger", "webchat", "email", "phone", "external"]


class IdentityBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Kind
    value: str = Field(min_length=1, max_length=200)


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=200)
    email: str | None = Field(None, max_length=254)
    phone: str | None = Field(None, max_length=40)
    language: Language | None = None
    external_id: str | None = Field(None, min_length=1, max_length=200)
    custom: dict[CustomKey, CustomValue] = Field(default_factory=dict, max_length=100)
    identities: list[IdentityBody] = Field(default_factory=list, max_length=20)


class BulkLine(BaseModel):
    """One NDJSON line of a bulk upsert: the profile with this CRM id (given fields only)."""

    model_config = ConfigDict(extra="forbid")
    external_id: str = Field(min_length=1, max_length=200)
    name: str | None = Field(None, min_length=1, max_length=200)
    email: str | None = Field(None, max_length=254)
    phone: str | None = Field(None, max_length=40)
    language: Language | None = None
    custom: dict[CustomKey, CustomValue | None] = Field(default_factory=dict, max_length=100)


class MergeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_id: str = Field(alias="from", min_length=1, max_length=100)


class PatchBody(BaseModel):
    """Given fields replace (null clears); ``custom`` merges key by key (null removes)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=200)
    email: str | None = Field(None, max_length=254)
    phone: str | None = Field(None, max_length=40)
    language: Language | None = None
    external_id: str | None = Field(None, min_length=1, max_length=200)
    custom: dict[CustomKey, CustomValue | None] = Field(default_factory=dict, max_length=100)


def _region(request: web.Request) -> str | None:
    return request.app[SETTINGS].default_phone_region


def _profile(request: web.Request, body: CreateBody | PatchBody | BulkLine) -> dict[str, Any]:
    """The given fields, normalized (only those the client sent, for a PATCH)."""
    given = body.model_fields_set - {"identities"}
    fields: dict[str, Any] = {name: getattr(body, name) for name in given}
    if fields.get("email") is not None:
        fields["email"] = normalize_email(fields["email"])
    if fields.get("phone") is not None:
        fields["phone"] = normalize_phone(fields["phone"], _region(request))
    if fields.get("external_id") is not None:
        fields["external_id"] = fields["external_id"].strip()
    return fields


def _respond(record: CustomerRecord, status: int = 200) -> web.Response:
    return web.json_response(record.as_dict(), status=status, headers={"ETag": record.etag})


def _replayed(replay: Replay) -> web.Response:
    return web.json_response(
        replay.body,
        status=replay.status,
        headers={"ETag": f'"{replay.body["version"]}"', "Idempotent-Replayed": "true"},
    )


def _idempotency(
    request: web.Request, principal: Principal, payload: dict[str, Any]
) -> IdempotencyKey | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200:
        raise RequestError(
            "Idempotency-Key must be 1 to 200 characters", code="bad_idempotency_key"
        )
    resource = request.match_info.route.resource
    route = f"{request.method} {resource.canonical if resource else request.path}"
    digest = hashlib.sha256(
        json.dumps({"path": dict(request.match_info), "body": payload}, sort_keys=True).encode()
    ).hexdigest()[:32]
    return IdempotencyKey(f"{principal.role}:{principal.subject} {route}", key, digest)


def _if_match(request: web.Request, *, required: bool) -> int | None:
    """The version an ``If-Match`` names (None for ``*`` or, when optional, no header)."""
    header = request.headers.get("If-Match")
    if header is None:
        if required:
            raise RequestError(
                "send If-Match with the customer's ETag", code="precondition_required", status=428
            )
        return None
    tag = header.strip()
    if tag == "*":
        return None
    tag = tag.removeprefix("W/").strip('"')
    # a malformed tag matches no version: 412
    return int(tag) if tag.isascii() and tag.isdigit() and len(tag) <= 18 else -1


def _customer_id(request: web.Request) -> str:
    return request.match_info["customer_id"]


def _notices(request: web.Request) -> ProfileNotices:
    """The apps that hear profile notifications, as subscribed when this write starts."""
    return request.app[APPS].profile_notices()


def _delivered(request: web.Request, notices: ProfileNotices) -> None:
    """After the commit: the dispatcher's poller claims the notification rows now."""
    if notices.anyone:
        request.app[DISPATCHER].wake()


async def create(request: web.Request) -> web.Response:
    principal = await _writer(request)
    body = await read_json(request, CreateBody)
    region = _region(request)
    identities = [normalize_identity(i.kind, i.value, region) for i in body.identities]
    schema = await _schema(request)
    if schema is not None:
        schema.check(body.custom, creating=True)
    key = _idempotency(request, principal, body.model_dump(mode="json"))
    notices = _notices(request)
    result = await request.app[STORE].create_customer(
        _profile(request, body), identities, request.app[CLOCK].now(), key, notify=notices
    )
    if isinstance(result, Replay):
        return _replayed(result)
    _delivered(request, notices)
    request.app[CUSTOMERS].written(result)
    log.info("customer_created", customer_id=result.id)
    response = _respond(result, 201)
    response.headers["Location"] = f"/api/v1/customers/{result.id}"
    return response


async def get_one(request: web.Request) -> web.Response:
    await _reader(request)
    customer_id = _customer_id(request)
    record = await request.app[STORE].customer(customer_id)
    if record is None:
        into = await request.app[STORE].merged_into(customer_id)
        if into is not None:
            # a merged-away customer: a permanent redirect to the one it lives on in
            return web.json_response(
                {"id": customer_id, "merged_into": into},
                status=308,
                headers={"Location": f"/api/v1/customers/{into}"},
            )
        raise NotFound(f"unknown customer {customer_id!r}", code="unknown_customer")
    return _respond(record)


async def patch(request: web.Request) -> web.Response:
    await _writer(request)
    expected = _if_match(request, required=True)
    body = await read_json(request, PatchBody)
    schema = await _schema(request)
    if schema is not None:
        schema.check(body.custom, creating=False)
    before = await request.app[STORE].customer(_customer_id(request))
    notices = _notices(request)
    record = await request.app[STORE].update_customer(
        _customer_id(request),
        _profile(request, body),
        request.app[CLOCK].now(),
        expected_version=expected,
        notify=notices,
    )
    _delivered(request, notices)
    request.app[CUSTOMERS].written(record)
    identified = before is not None and not before.known and record.known
    kind = "customer.identified" if identified else "customer.updated"
    await _announce(request.app, record, kind)
    return _respond(record)


async def delete(request: web.Request) -> web.Response:
    """Delete (admin, crm); ``?erase=true`` erases instead (admin only)."""
    erase = _bool("erase", request.query.get("erase"))
    if erase:
        await authenticate(request, "admin")
    else:
        await _writer(request)
    customer_id = _customer_id(request)
    store = request.app[STORE]
    notices = _notices(request)
    if erase:
        version = await store.erase_customer(
            customer_id, request.app[CLOCK].now(), ERASED, notify=notices
        )
        _delivered(request, notices)
        request.app[CUSTOMERS].deleted(customer_id, version)
        log.info("customer_erased", customer_id=customer_id)
        return web.Response(status=204)
    version = await store.delete_customer(
        customer_id,
        request.app[CLOCK].now(),
        expected_version=_if_match(request, required=False),
        notify=notices,
    )
    _delivered(request, notices)
    request.app[CUSTOMERS].deleted(customer_id, version)
    log.info("customer_deleted", customer_id=customer_id)
    return web.Response(status=204)


def _bool(name: str, value: str | None) -> bool | None:
    if value is None:
        return None
    if value in ("true", "false"):
        return value == "true"
    raise RequestError(f"{name} must be true or false", code="invalid_query", status=422)


def _since(value: str | None) -> datetime | None:
    """``updated_since``: an ISO 8601 time (UTC when it names no offset)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace(" ", "+"))
    except ValueError:
        raise RequestError(
            "updated_since must be an ISO 8601 time, e.g. 2026-01-05T09:00:00Z",
            code="invalid_query",
            status=422,
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


async def list_all(request: web.Request) -> web.Response:
    await _reader(request)
    q = request.query
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 200:
        raise RequestError("limit must be 1 to 200", code="invalid_query", status=422)
    email, phone = q.get("email"), q.get("phone")
    if phone is not None:
        phone = normalize_identity("phone", phone, _region(request)).value
    query = CustomerQuery(
        limit=limit,
        cursor=q.get("cursor") or None,
        known=_bool("known", q.get("known")),
        email=normalize_email(email) if email is not None else None,
        phone=phone,
        external_id=q.get("external_id"),
        name_prefix=q.get("name") or None,
        updated_since=_since(q.get("updated_since")),
    )
    records, cursor = await request.app[STORE].list_customers(query)
    return web.json_response({"customers": [r.as_dict() for r in records], "next_cursor": cursor})


async def export_all(request: web.Request) -> web.StreamResponse:
    """Every live profile with its identities as NDJSON, in id order, streamed page by page.

    Memory stays constant: one page of ``EXPORT_PAGE`` profiles is read (a keyset query
    after the last id sent), written, and dropped before the next. Each profile appears
    once; one changed during the export appears as it was when its page was read.
    ``Convctl-Export-Started-At`` is the service time the export began: the next
    incremental export passes it (less a margin) as ``updated_since``.
    """
    await _reader(request, agents=False)
    known = _bool("known", request.query.get("known"))
    since = _since(request.query.get("updated_since"))
    store = request.app[STORE]
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-ndjson",
            "Convctl-Export-Started-At": request.app[CLOCK].now().isoformat(),
        }
    )
    await response.prepare(request)
    cursor: str | None = None
    sent = 0
    while True:
        records, cursor = await store.list_customers(
            CustomerQuery(limit=EXPORT_PAGE, cursor=cursor, known=known, updated_since=since)
        )
        if records:
            lines = "".join(json.dumps(r.as_dict(), separators=(",", ":")) + "\n" for r in records)
            await response.write(lines.encode())  # waits while the client is slow to read
            sent += len(records)
        if cursor is None:
            break
    await response.write_eof()
    log.info("customers_exported", profiles=sent, known=known, updated_since=str(since))
    return response


async def lookup(request: web.Request) -> web.Response:
    await _reader(request)
    text = request.query.get("identity")
    if text is None:
        raise RequestError("give ?identity=KIND:VALUE", code="invalid_query", status=422)
    identity = parse_identity_text(text, _region(request))
    record = await request.app[STORE].lookup_customer(identity)
    if record is None:
        raise NotFound(f"no customer with identity {identity}", code="unknown_identity")
    return _respond(record)


async def attach_identity(request: web.Request) -> web.Response:
    principal = await _writer(request)
    body = await read_json(request, IdentityBody)
    identity: Identity = normalize_identity(body.kind, body.value, _region(request))
    key = _idempotency(request, principal, body.model_dump(mode="json"))
    store = request.app[STORE]
    before = await store.customer(_customer_id(request))
    notices = _notices(request)
    result = await store.attach_identity(
        _customer_id(request), identity, request.app[CLOCK].now(), key, notify=notices
    )
    if isinstance(result, Replay):
        return _replayed(result)
    _delivered(request, notices)
    request.app[CUSTOMERS].written(result)
    log.info("customer_identified", customer_id=result.id, kind=identity.kind)
    if before is None or before.version != result.version:
        await _announce(request.app, result, "customer.identified")
    return _respond(result)


class _BulkReport:
    def __init__(self) -> None:
        self.counts = {"lines": 0, "created": 0, "updated": 0, "unchanged": 0, "failed": 0}
        self.failures: list[dict[str, Any]] = []

    def fail(self, line: int, code: str, message: str) -> None:
        self.counts["failed"] += 1
        if len(self.failures) < BULK_MAX_FAILURES:
            self.failures.append({"line": line, "code": code, "message": message})


def _bulk_line(request: web.Request, raw: bytes, schema: CustomSchema | None) -> dict[str, Any]:
    """A line's normalized fields; RequestError for a line that cannot be applied (the
    schema's required fields are checked by the store, for lines that create a profile)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON: {exc}", code="malformed_json") from exc
    refuse_bad_text(raw, data, status=400)
    try:
        line = BulkLine.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {e['msg']}" for e in exc.errors()
        )
        raise RequestError(f"invalid line: {details}", code="invalid_line") from exc
    if schema is not None:
        schema.check(line.custom, creating=False)
    fields = _profile(request, line)
    fields["external_id"] = line.external_id.strip()
    return fields


async def _bulk_flush(
    request: web.Request,
    batch: list[tuple[int, dict[str, Any]]],
    report: _BulkReport,
    schema: CustomSchema | None,
) -> None:
    if not batch:
        return
    notices = _notices(request)
    outcomes = await request.app[STORE].bulk_upsert_customers(
        batch,
        request.app[CLOCK].now(),
        notify=notices,
        required_custom=schema.required if schema is not None else (),
    )
    _delivered(request, notices)
    profiles = request.app[CUSTOMERS]
    told: list[NewEvent] = []
    for outcome in outcomes:
        if outcome.outcome == "failed":
            report.fail(outcome.line, outcome.code or "failed", outcome.message or "")
            continue
        report.counts[outcome.outcome] += 1
        if outcome.record is not None and outcome.outcome != "unchanged":
            profiles.written(outcome.record)
            # A bulk line's customer is known (it has a CRM id): an update, as its
            # profile.updated notification says.
            told += [
                _customer_event(outcome.record, "customer.updated", conversation_id)
                for conversation_id in outcome.conversations
            ]
    batch.clear()
    if told:  # after the cache holds the new records: the rules read them
        await _tell(request.app, told)


class _Batches:
    """Lines go to the store in batches of ``BULK_BATCH``, one batch in flight while the next
    is read and validated: the store's writer and the parsing overlap. Batches still commit
    one after the other, in file order."""

    def __init__(
        self, request: web.Request, report: _BulkReport, schema: CustomSchema | None
    ) -> None:
        self._request = request
        self._report = report
        self._schema = schema
        self._lines: list[tuple[int, dict[str, Any]]] = []
        self._in_flight: asyncio.Future[None] | None = None

    async def add(self, number: int, fields: dict[str, Any]) -> None:
        self._lines.append((number, fields))
        if len(self._lines) >= BULK_BATCH:
            await self._send()

    async def _send(self) -> None:
        await self._wait()
        if self._lines:
            batch, self._lines = self._lines, []
            self._in_flight = asyncio.ensure_future(
                _bulk_flush(self._request, batch, self._report, self._schema)
            )

    async def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            await in_flight

    async def finish(self) -> None:
        """Send what is left and wait until every batch is stored."""
        await self._send()
        await self._wait()


async def bulk(request: web.Request) -> web.Response:
    """NDJSON upsert by external id, streamed: batches of 500 lines, each line atomic."""
    await _writer(request)
    if request.content_type != "application/x-ndjson":
        raise RequestError(
            "send NDJSON (Content-Type: application/x-ndjson)",
            code="unsupported_media_type",
            status=415,
        )
    report = _BulkReport()
    schema = await _schema(request)  # one version for the whole file
    batches = _Batches(request, report, schema)
    number = size = 0
    while True:
        try:
            raw = await request.content.readline()
        except ValueError as exc:  # aiohttp's bound on one line
            await batches.finish()
            raise RequestError(
                f"line {number + 1} is too long (lines before it were applied)",
                code="line_too_long",
                status=413,
            ) from exc
        if not raw:
            break
        number += 1
        size += len(raw)
        if size > BULK_MAX_BYTES:
            await batches.finish()
            raise RequestError(
                f"body larger than {BULK_MAX_BYTES} bytes (lines before {number} were applied)",
                code="too_large",
                status=413,
            )
        if not raw.strip():
            continue
        report.counts["lines"] += 1
        try:
            fields = _bulk_line(request, raw, schema)
        except RequestError as exc:
            report.fail(number, exc.code, exc.message)
        else:
            await batches.add(number, fields)
    await batches.finish()
    log.info("customers_bulk_upserted", **report.counts)
    return web.json_response(
        {
            **report.counts,
            "failures": sorted(report.failures, key=lambda f: int(f["line"])),
            "failures_truncated": report.counts["failed"] > len(report.failures),
        }
    )


async def merge(request: web.Request) -> web.Response:
    """``{"from": ID}``: ID's identities and conversations move here; ID becomes a tombstone."""
    await _writer(request)
    body = await read_json(request, MergeBody)
    store = request.app[STORE]
    notices = _notices(request)
    result = await store.merge_customers(
        _customer_id(request), body.from_id, request.app[CLOCK].now(), notify=notices
    )
    _delivered(request, notices)
    profiles = request.app[CUSTOMERS]
    profiles.written(result.record)
    profiles.deleted(result.from_id, result.from_version)
    if not result.repeated:
        log.info(
            "customers_merged",
            into=result.into_id,
            merged=result.from_id,
            conversations=result.conversations,
        )
    # Again on a repeat: the dedupe keys make it a no-op, and it heals a crash after the commit.
    await _announce(
        request.app,
        result.record,
        "customer.merged",
        dedupe=f"merged:{result.from_id}",
        data={"merged_from": result.from_id},
    )
    response = web.json_response(result.as_dict(), headers={"ETag": result.record.etag})
    if result.repeated:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def export(request: web.Request) -> web.Response:
    """Everything held about one customer: profile, identities, conversations, transcripts."""
    await authenticate(request, "admin")
    store = request.app[STORE]
    customer_id = _customer_id(request)
    record = await store.customer(customer_id)
    if record is None:
        raise NotFound(f"unknown customer {customer_id!r}", code="unknown_customer")
    conversations = []
    for conv in await store.customer_conversations(customer_id):
        messages = await store.messages(conv["id"], include_agent_only=True)
        conv["transcript"] = [
            {
                "sender_role": m.sender_role,
                "sender_id": m.sender_id,
                "text": m.text,
                "visibility": m.visibility,
                "created_at": m.created_at.isoformat(),
            }
            for m in messages
        ]
        conversations.append(conv)
    return web.json_response(
        {
            "exported_at": request.app[CLOCK].now().isoformat(),
            "customer": record.as_dict(),
            "merged_from": await store.merged_from(customer_id),
            "conversations": conversations,
        }
    )


async def _schema(request: web.Request) -> CustomSchema | None:
    """The custom field schema in force (None: any scalar custom value is accepted)."""
    stored = await request.app[STORE].customer_schema()
    return CustomSchema.model_validate(stored.document) if stored is not None else None


def _schema_answer(stored: CustomerSchema | None) -> web.Response:
    if stored is None:  # no schema: version 0, every key allowed
        body: dict[str, Any] = {"version": 0, "fields": [], "allow_unknown": True}
        body["created_at"] = None
    else:
        body = {"version": stored.version, **stored.document}
        body["created_at"] = stored.created_at.isoformat()
    return web.json_response(body, headers={"ETag": f'"{body["version"]}"'})


async def get_schema(request: web.Request) -> web.Response:
    """The custom field schema in force, or ``?version=N`` (an older one)."""
    await _reader(request)
    raw = request.query.get("version")
    if raw is None:
        return _schema_answer(await request.app[STORE].customer_schema())
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise RequestError("version must be a number", code="invalid_query", status=422)
    stored = await request.app[STORE].customer_schema(int(raw))
    if stored is None:
        raise NotFound(f"no customer schema version {raw}", code="unknown_schema_version")
    return _schema_answer(stored)


async def put_schema(request: web.Request) -> web.Response:
    """Replace the custom field schema (admin): a new version, unless it is the same.

    Stored profiles are not re-checked: the schema applies to writes from now on.
    ``If-Match`` (optional) names the version this one replaces (``"0"``: none yet).
    """
    await authenticate(request, "admin")
    expected = _if_match(request, required=False)
    body = await read_json(request, CustomSchema)
    stored, created = await request.app[STORE].save_customer_schema(
        body.model_dump(mode="json", exclude_none=True),
        request.app[CLOCK].now(),
        expected_version=expected,
    )
    if created:
        log.info("customer_schema_saved", version=stored.version, fields=len(body.fields))
    return _schema_answer(stored)


async def _announce(
    app: web.Application,
    record: CustomerRecord,
    kind: str,
    *,
    dedupe: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Tell the customer's open conversations (their rules may react at once).

    After the commit, with a dedupe key per customer version: not atomic with the write (a
    crash in between loses the event; the next event of the conversation still sees the
    profile, since facts are read at decide time).
    """
    await _tell(
        app,
        [
            _customer_event(record, kind, conversation_id, dedupe=dedupe, data=data)
            for conversation_id in await app[STORE].customer_open_conversations(record.id)
        ],
    )


def _customer_event(
    record: CustomerRecord,
    kind: str,
    conversation_id: str,
    *,
    dedupe: str | None = None,
    data: dict[str, Any] | None = None,
) -> NewEvent:
    """A customer change as an event of one of its conversations, deduplicated per
    customer version (or ``dedupe``), type and conversation."""
    return NewEvent(
        type=kind,  # type: ignore[arg-type]
        source="customers",
        dedupe_key=f"{record.id}:{dedupe or f'v{record.version}'}:{kind}:{conversation_id}",
        conversation_id=conversation_id,
        data={"customer_id": record.id, "known": record.known, **(data or {})},
    )


async def _tell(app: web.Application, events: list[NewEvent]) -> None:
    """Submit customer events: all in one inbox transaction, or, when one is refused (its
    conversation closed meanwhile, which rolls that transaction back), one by one."""
    if len(events) > 1:
        try:
            await app[INBOX].submit(events)
        except RequestError as exc:
            log.info("customer_events_one_by_one", events=len(events), refused=exc.code)
        else:
            return
    for event in events:
        try:
            await app[INBOX].submit([event])
        except RequestError as exc:  # this conversation closed meanwhile
            log.info("customer_event_not_stored", kind=event.type, refused=exc.code)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/v1/customers", create),
        web.get("/api/v1/customers", list_all),
        web.get("/api/v1/customers/lookup", lookup),
        web.get("/api/v1/customers/export", export_all),
        web.get("/api/v1/customers/schema", get_schema),
        web.put("/api/v1/customers/schema", put_schema),
        web.post("/api/v1/customers/bulk", bulk),
        web.get("/api/v1/customers/{customer_id}", get_one),
        web.patch("/api/v1/customers/{customer_id}", patch),
        web.delete("/api/v1/customers/{customer_id}", delete),
        web.post("/api/v1/customers/{customer_id}/identities", attach_identity),
        web.post("/api/v1/customers/{customer_id}/merge", merge),
        web.get("/api/v1/customers/{customer_id}/export", export),
    ]
