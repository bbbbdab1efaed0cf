"""Outbound campaigns under ``/api/v1/campaigns``: an admin, or an app with ``campaigns:run``.

A campaign sends a WhatsApp template to an audience (customer ids, or a filter on the
Customer API) at a rate, inside a window; it can be paused, resumed and cancelled, and its
progress and every recipient's outcome are listed. An app sees and controls only the
campaigns it created. The opt-out list (``/api/v1/campaigns/opt-outs``) is honoured at
send time by every campaign. Sending is ``controller/campaigns.py``; docs/campaigns.md.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import structlog
from aiohttp import web
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic import StringConstraints as Str

from controller.api.apps import route_scope
from controller.api.common import Principal, refuse_bad_text
from controller.apps import require_scope
from controller.campaigns import (
    ACTIVE,
    FINISHED,
    AudienceFilter,
    expand_filter,
    parse_hour,
    parse_placeholders,
)
from controller.errors import Conflict, NotFound, RequestError
from controller.ids import new_id
from controller.keys import CAMPAIGNS, CHANNELS, CLOCK, STORE
from controller.store.base import (
    RECIPIENT_STATUSES,
    CampaignRecord,
    IdempotencyKey,
)

log = structlog.get_logger(__name__)

# A campaign's body may list many customers: it is read up to this size (the service's
# general body limit does not apply here).
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_AUDIENCE = 1_000_000
MAX_RATE = 1000.0  # messages per second (WhatsApp's highest throughput tier)

ParamKey = Annotated[str, Str(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Scalar = StrictBool | StrictInt | StrictFloat | Annotated[str, Str(max_length=1000)]
CustomerId = Annotated[str, Str(min_length=1, max_length=100)]
Kind = Literal["whatsapp", "messenger", "webchat", "email", "phone", "external"]
Hour = Annotated[str, Str(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]


class TemplateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=512, pattern=r"^[a-z0-9_]+$")
    language: str | None = Field(None, min_length=2, max_length=15)
    # body parameters in order ({{1}}, {{2}} ...); text may hold {{ customer.… }} and
    # {{ params.… }} placeholders, filled per recipient
    parameters: list[Annotated[str, Str(max_length=1000)] | StrictInt | StrictFloat] = Field(
        default_factory=list, max_length=20
    )


class RecipientBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: CustomerId
    params: dict[ParamKey, Scalar] = Field(default_factory=dict, max_length=20)


class FilterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    custom: dict[ParamKey, Scalar] = Field(default_factory=dict, max_length=20)
    has: Kind | list[Kind] | None = None
    language: str | None = Field(None, min_length=2, max_length=15)
    known: StrictBool | None = None

    @model_validator(mode="after")
    def _something(self) -> FilterBody:
        if not (self.custom or self.has or self.language or self.known is not None):
            raise ValueError("a filter needs at least one of custom, has, language, known")
        return self


class AudienceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_ids: list[CustomerId | RecipientBody] | None = Field(
        None, min_length=1, max_length=MAX_AUDIENCE
    )
    filter: FilterBody | None = None

    @model_validator(mode="after")
    def _one(self) -> AudienceBody:
        if (self.customer_ids is None) == (self.filter is None):
            raise ValueError("give either customer_ids or filter")
        return self


class HoursBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    opens: Hour = Field(alias="from")
    closes: Hour = Field(alias="to")

    @model_validator(mode="after")
    def _differ(self) -> HoursBody:
        if self.opens == self.closes:
            raise ValueError("from and to must differ")
        return self


class WindowBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None
    hours: HoursBody | None = None

    @model_validator(mode="after")
    def _ordered(self) -> WindowBody:
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    channel: str = Field(min_length=1, max_length=64)  # a channel instance
    endpoint: str = Field(min_length=1, max_length=200)  # e.g. the WhatsApp phone_number_id
    template: TemplateBody
    text: str | None = Field(None, min_length=1, max_length=4096)  # what the transcript shows
    audience: AudienceBody
    rate: float = Field(gt=0, le=MAX_RATE)  # messages per second
    window: WindowBody = Field(default_factory=WindowBody)

    @field_validator("rate", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("rate must be a number (messages per second)")
        return value


class OptOutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: CustomerId


async def _read(request: web.Request, model: type[CreateBody] | type[OptOutBody]) -> Any:
    """A JSON body of up to MAX_BODY_BYTES (a long list of customers fits), validated."""
    if request.content_type != "application/json":
        raise RequestError(
            "send a JSON body (Content-Type: application/json)",
            code="unsupported_media_type",
            status=415,
        )
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError("request body too large", code="too_large", status=413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON: {exc}", code="malformed_json") from exc
    refuse_bad_text(raw, data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:20]
        )
        raise RequestError(f"invalid body: {details}", code="invalid_body", status=422) from exc


async def _caller(request: web.Request) -> Principal:
    return await require_scope(request, route_scope(request))


def _owner(principal: Principal) -> str | None:
    """Whose campaigns the caller sees: an app its own, an admin every one (None)."""
    return principal.subject if principal.role == "app" else None


async def _campaign(request: web.Request, principal: Principal) -> CampaignRecord:
    campaign_id = request.match_info["campaign_id"]
    campaign = await request.app[STORE].campaign(campaign_id)
    owner = _owner(principal)
    if campaign is None or (owner is not None and campaign.owner != owner):
        raise NotFound(f"unknown campaign {campaign_id!r}", code="unknown_campaign")
    return campaign


async def _body(request: web.Request, campaign: CampaignRecord) -> dict[str, Any]:
    counts = await request.app[STORE].campaign_counts(campaign.id)
    progress = {status: counts.get(status, 0) for status in RECIPIENT_STATUSES}
    progress["total"] = sum(counts.values())
    return {**campaign.as_dict(), "progress": progress}


def _idempotency(
    request: web.Request, principal: Principal, body: CreateBody
) -> IdempotencyKey | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200:
        raise RequestError(
            "Idempotency-Key must be 1 to 200 characters", code="bad_idempotency_key"
        )
    digest = hashlib.sha256(body.model_dump_json(by_alias=True).encode()).hexdigest()[:32]
    return IdempotencyKey(
        f"{principal.role}:{principal.subject} POST /api/v1/campaigns", key, digest
    )


async def _audience(request: web.Request, body: AudienceBody) -> list[tuple[str, dict[str, Any]]]:
    if body.customer_ids is not None:
        return [
            (entry, {}) if isinstance(entry, str) else (entry.customer_id, dict(entry.params))
            for entry in body.customer_ids
        ]
    assert body.filter is not None
    f = body.filter
    has = (f.has,) if isinstance(f.has, str) else tuple(f.has or ())
    found = await expand_filter(
        request.app[STORE],
        AudienceFilter(custom=dict(f.custom), has=has, language=f.language, known=f.known),
        MAX_AUDIENCE,
    )
    return [(customer_id, {}) for customer_id in found]


def _audience_summary(body: AudienceBody, count: int) -> dict[str, Any]:
    """What the campaign keeps of how its audience was given (the ids are its recipients)."""
    if body.filter is not None:
        return {"filter": body.filter.model_dump(exclude_defaults=True), "customers": count}
    return {"customer_ids": count}


# campaigns ----------------------------------------------------------------------------------
async def create(request: web.Request) -> web.Response:
    principal = await _caller(request)
    body: CreateBody = await _read(request, CreateBody)
    app = request.app
    channel = app[CHANNELS].get(body.channel)
    if channel is None:
        raise RequestError(
            f"unknown channel instance {body.channel!r}", code="unknown_channel", status=422
        )
    if "templates" not in channel.capabilities:
        raise RequestError(
            f"channel {body.channel!r} cannot send templates",
            code="templates_unsupported",
            status=422,
        )
    parse_placeholders([*(str(p) for p in body.template.parameters), body.text or ""])
    now = app[CLOCK].now()
    window = body.window
    if window.ends_at is not None and window.ends_at <= now:
        raise RequestError("ends_at is in the past", code="window_over", status=422)
    key = _idempotency(request, principal, body)
    recipients = await _audience(request, body.audience)
    if not recipients:
        raise RequestError("the audience has no customers", code="empty_audience", status=422)
    hours = window.hours
    if hours is not None:  # validated by the pattern; checked the way the runner reads it
        parse_hour(hours.opens)
        parse_hour(hours.closes)
    campaign = CampaignRecord(
        id=new_id("cp"),
        name=body.name,
        owner=_owner(principal) or "admin",
        channel=body.channel,
        endpoint=body.endpoint,
        template=body.template.model_dump(mode="json"),
        text=body.text,
        audience=_audience_summary(body.audience, len(recipients)),
        rate=body.rate,
        starts_at=window.starts_at,
        ends_at=window.ends_at,
        hours_from=hours.opens if hours else None,
        hours_to=hours.closes if hours else None,
        status="scheduled" if window.starts_at and window.starts_at > now else "running",
        recipients=0,
        created_at=now,
        updated_at=now,
    )
    stored, created = await app[STORE].create_campaign(campaign, recipients, key)
    if created:
        app[CAMPAIGNS].wake(stored.id)
        log.info(
            "campaign_created",
            campaign_id=stored.id,
            owner=stored.owner,
            recipients=stored.recipients,
            rate=stored.rate,
        )
    response = web.json_response(await _body(request, stored), status=201 if created else 200)
    response.headers["Location"] = f"/api/v1/campaigns/{stored.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _page_size(request: web.Request, default: int, most: int) -> int:
    try:
        limit = int(request.query.get("limit", str(default)))
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise RequestError(f"limit must be 1 to {most}", code="invalid_query", status=422)
    return limit


async def list_all(request: web.Request) -> web.Response:
    principal = await _caller(request)
    status = request.query.get("status")
    statuses = (*ACTIVE, "paused", *FINISHED)
    if status is not None and status not in statuses:
        raise RequestError(
            f"status must be one of {', '.join(statuses)}", code="invalid_query", status=422
        )
    limit = _page_size(request, 50, 200)
    found = await request.app[STORE].campaigns(
        owner=_owner(principal),
        statuses=(status,) if status else None,
        limit=limit + 1,
        before=request.query.get("cursor") or None,
    )
    page = found[:limit]
    return web.json_response(
        {
            "campaigns": [await _body(request, c) for c in page],
            "next_cursor": page[-1].id if len(found) > limit and page else None,
        }
    )


async def get_one(request: web.Request) -> web.Response:
    principal = await _caller(request)
    return web.json_response(await _body(request, await _campaign(request, principal)))


async def _move(
    request: web.Request,
    to: str,
    allowed_from: tuple[str, ...],
    refusal: str,
    skip_pending: str | None = None,
) -> web.Response:
    principal = await _caller(request)
    campaign = await _campaign(request, principal)
    moved = await request.app[STORE].set_campaign_status(
        campaign.id,
        to,
        allowed_from=allowed_from,
        now=request.app[CLOCK].now(),
        skip_pending=skip_pending,
    )
    if moved is None:
        current = await _campaign(request, principal)
        raise Conflict(f"the campaign is {current.status}", code=refusal)
    request.app[CAMPAIGNS].wake(campaign.id)
    log.info("campaign_" + to, campaign_id=campaign.id)
    return web.json_response(await _body(request, moved))


async def pause(request: web.Request) -> web.Response:
    """A running (or scheduled) campaign stops sending once this answers."""
    return await _move(request, "paused", ACTIVE, "campaign_not_active")


async def resume(request: web.Request) -> web.Response:
    principal = await _caller(request)
    campaign = await _campaign(request, principal)
    later = campaign.starts_at is not None and campaign.starts_at > request.app[CLOCK].now()
    return await _move(
        request, "scheduled" if later else "running", ("paused",), "campaign_not_paused"
    )


async def cancel(request: web.Request) -> web.Response:
    """For good: the recipients not sent yet are skipped (``cancelled``)."""
    return await _move(
        request, "cancelled", (*ACTIVE, "paused"), "campaign_finished", skip_pending="cancelled"
    )


async def recipients(request: web.Request) -> web.Response:
    principal = await _caller(request)
    campaign = await _campaign(request, principal)
    status = request.query.get("status")
    if status is not None and status not in RECIPIENT_STATUSES:
        raise RequestError(
            f"status must be one of {', '.join(RECIPIENT_STATUSES)}",
            code="invalid_query",
            status=422,
        )
    limit = _page_size(request, 50, 1000)
    cursor = request.query.get("cursor")
    # ASCII digits only (``isdigit`` also takes "²"), and within the store's 32-bit positions
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 9):
        raise RequestError("cursor must be a number", code="invalid_query", status=422)
    found = await request.app[STORE].campaign_recipients(
        campaign.id, status=status, limit=limit + 1, after=int(cursor) if cursor else None
    )
    page = found[:limit]
    return web.json_response(
        {
            "recipients": [r.as_dict() for r in page],
            "next_cursor": str(page[-1].position) if len(found) > limit and page else None,
        }
    )


# opt-outs -----------------------------------------------------------------------------------
async def list_opt_outs(request: web.Request) -> web.Response:
    await _caller(request)
    limit = _page_size(request, 50, 1000)
    found = await request.app[STORE].opt_outs(
        limit=limit + 1, after=request.query.get("cursor") or None
    )
    page = found[:limit]
    return web.json_response(
        {
            "opt_outs": [o.as_dict() for o in page],
            "next_cursor": page[-1].customer_id if len(found) > limit and page else None,
        }
    )


async def add_opt_out(request: web.Request) -> web.Response:
    principal = await _caller(request)
    body: OptOutBody = await _read(request, OptOutBody)
    store = request.app[STORE]
    if await store.customer(body.customer_id) is None:
        raise NotFound(f"unknown customer {body.customer_id!r}", code="unknown_customer")
    source = "admin" if principal.role == "admin" else f"app:{principal.subject}"
    added = await store.add_opt_out(body.customer_id, source, request.app[CLOCK].now())
    if added:
        log.info("campaign_opt_out", customer_id=body.customer_id, source=source)
    return web.json_response(
        {"customer_id": body.customer_id, "opted_out": True}, status=201 if added else 200
    )


async def remove_opt_out(request: web.Request) -> web.Response:
    await _caller(request)
    customer_id = request.match_info["customer_id"]
    if not await request.app[STORE].remove_opt_out(customer_id):
        raise NotFound(f"customer {customer_id!r} is not opted out", code="not_opted_out")
    log.info("campaign_opt_out_removed", customer_id=customer_id)
    return web.Response(status=204)


def routes() -> list[web.RouteDef]:
    # The opt-out routes come first: ``opt-outs`` must not match ``{campaign_id}``.
    base = "/api/v1/campaigns"
    one = base + "/{campaign_id}"
    return [
        web.get(base + "/opt-outs", list_opt_outs),
        web.post(base + "/opt-outs", add_opt_out),
        web.delete(base + "/opt-outs/{customer_id}", remove_opt_out),
        web.post(base, create),
        web.get(base, list_all),
        web.get(one, get_one),
        web.get(one + "/recipients", recipients),
        web.post(one + "/pause", pause),
        web.post(one + "/resume", resume),
        web.post(one + "/cancel", cancel),
    ]


__all__ = ["routes"]
