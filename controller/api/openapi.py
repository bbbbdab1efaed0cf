"""The OpenAPI 3.1 document of every JSON API of the service, served at
``GET /api/v1/openapi.json`` (no token: it names routes and shapes, never data).

The document is built from one table, ``OPERATIONS``: each row names a route, who may call
it, its query and header parameters, the pydantic model of its body (the same model the
handler validates with) and its answers. Answer bodies are the ``*View`` models below;
every refusal shares one body, ``Error`` (what ``errors_middleware`` writes). A test holds
the table and the router to the same set of routes, and a schemathesis run holds the
service's answers to the document.

Not in the document: pages (``/desk``), WebSockets (``/api/v1/agents/ws``; the desk's
frames are in docs/agent-api.md) and the routes of connectors, which speak their
providers' formats (the custom bot's contract is docs/custom-bot.openapi.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from controller.api import admin, agents, app_conversations, apps, campaigns, customers, outbound
from controller.api import rules as rules_api
from controller.campaigns import ACTIVE, FINISHED
from controller.customers import CustomSchema
from controller.models import Conversation
from controller.models.events import EVENT_TYPES
from controller.rulebook.explain import Explanation
from controller.store.base import RECIPIENT_STATUSES

PATH = "/api/v1/openapi.json"
# Routes of the service's own router that the document leaves out on purpose (pages and
# sockets); connector routes are left out by their handler's package (see ``documented``).
NOT_DOCUMENTED: frozenset[tuple[str, str]] = frozenset(
    {("GET", "/desk"), ("GET", "/api/v1/agents/ws")}
)
CONNECTOR_PACKAGE = "connectors"

Role = Literal["admin", "agent", "crm", "app"]
PUBLIC: tuple[Role, ...] = ()
ADMIN: tuple[Role, ...] = ("admin",)
AGENT: tuple[Role, ...] = ("agent",)
APP: tuple[Role, ...] = ("app",)
# the Customer API: apps with customers:read / customers:write act as a crm token would
READERS: tuple[Role, ...] = ("admin", "crm", "agent", "app")
WRITERS: tuple[Role, ...] = ("admin", "crm", "app")
CONVERSATION_READERS: tuple[Role, ...] = ("admin", "agent", "app")
CAMPAIGNERS: tuple[Role, ...] = ("admin", "app")


# answer bodies ------------------------------------------------------------------------------
class _View(BaseModel):
    """An answer body: the fields named are always there; more may come in later versions."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(_View):
    code: str = Field(description="machine-readable, e.g. unknown_conversation, invalid_body")
    message: str
    errors: list[str] = Field(
        default_factory=list, description="every problem of a refused rules folder"
    )


class Error(BaseModel):
    """Every refusal (4xx) and failure (5xx) of the JSON APIs."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


class IndexView(_View):
    service: str
    webchat: str
    docs: str
    health: str


class HealthView(_View):
    status: str = Field(description="ok, ready, starting or database_unavailable")


class OfferView(_View):
    offer_id: str
    conversation_id: str
    expires_at: datetime


class ChannelLoadView(_View):
    capacity: int
    load: int


class AgentView(_View):
    id: str
    name: str
    presence: Literal["available", "busy", "away", "offline"]
    capacity: int
    channels: dict[str, ChannelLoadView] = Field(
        description="capacity and load per channel kind (empty: any channel, up to capacity)"
    )
    load: int = Field(description="conversations assigned and offered")
    skills: dict[str, int] = Field(description="skill name → level")
    teams: list[str]
    conversations: list[str]
    offers: list[OfferView]


class PresenceView(_View):
    presence: Literal["available", "busy", "away", "offline"]


class AcceptedView(_View):
    """A write stored as an event (202), or a retry that changed nothing (200)."""

    event_id: str
    conversation_id: str
    seq: int
    duplicate: bool


class ConversationView(Conversation):
    model_config = ConfigDict(extra="allow")
    queue_position: int | None = Field(description="1-based place in its queue while waiting")


class TranscriptLine(_View):
    id: str
    sender: str = Field(alias="from", description="customer, agent, bot, app or controller")
    sender_id: str | None
    text: str | None
    visibility: Literal["all", "agents"]
    at: datetime


class TranscriptView(_View):
    conversation_id: str
    messages: list[TranscriptLine]


class StoredEventView(_View):
    id: str
    type: str
    conversation_id: str
    seq: int
    source: str
    dedupe_key: str
    accepted_at: datetime
    data: dict[str, Any]


class DecidedEventView(StoredEventView):
    status: str
    decision: dict[str, Any] | None


class EventsView(_View):
    conversation_id: str
    events: list[DecidedEventView]


class RecordedDecision(_View):
    rules_version: str
    matcher: str
    outcome: str
    decided_at: str
    rules: list[str]
    fired: list[Any]
    refused: list[Any]


class ExplainView(_View):
    conversation_id: str
    event: StoredEventView
    recorded: RecordedDecision
    current: Explanation
    same_rules: bool
    facts: dict[str, Any]


class TokenView(_View):
    token: str = Field(description="shown once; only its hash is stored")
    role: Role
    subject: str


class RulesView(_View):
    version: str
    loaded_at: datetime
    source: str
    rules: int
    files: list[str]
    folder: str
    watching: bool
    last_error: dict[str, Any] | None


class RulesLoadedView(_View):
    version: str
    rules: int


class RulesVersionView(_View):
    version: str
    loaded_at: datetime
    source: str
    current: bool


class RulesVersionsView(_View):
    versions: list[RulesVersionView]


class IdentityView(_View):
    kind: str
    value: str


class CustomerView(_View):
    id: str
    known: bool
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    language: str | None = None
    external_id: str | None = None
    custom: dict[str, Any]
    identities: list[IdentityView]
    version: int
    created_at: datetime
    updated_at: datetime


class CustomerPageView(_View):
    customers: list[CustomerView]
    next_cursor: str | None


class CustomerSchemaView(_View):
    """The custom profile field schema in force (version 0: none stored, anything goes)."""

    version: int
    fields: list[dict[str, Any]]
    allow_unknown: bool
    created_at: datetime | None


class MergedView(_View):
    """A merged-away customer: a permanent redirect to the one it lives on in."""

    id: str
    merged_into: str


class BulkFailure(_View):
    line: int
    code: str
    message: str


class BulkView(_View):
    lines: int
    created: int
    updated: int
    unchanged: int
    failed: int
    failures: list[BulkFailure]
    failures_truncated: bool


class MergeRecord(_View):
    from_: str = Field(alias="from")
    into: str
    identities: Any
    conversations: Any
    merged_at: datetime


class MergeView(_View):
    merge: MergeRecord
    customer: CustomerView


class ExportView(_View):
    exported_at: datetime
    customer: CustomerView
    merged_from: list[Any]
    conversations: list[dict[str, Any]]


class SubscriptionView(_View):
    id: str
    app_id: str
    event_types: list[str]
    created_at: datetime


class SubscriptionsView(_View):
    subscriptions: list[SubscriptionView]


class AppRecordView(_View):
    id: str
    name: str
    description: str | None
    scopes: list[str]
    webhook_url: str | None
    enabled: bool
    status: Literal["enabled", "disabled", "deleted"]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class AppView(AppRecordView):
    subscriptions: list[SubscriptionView]


class AppCreatedView(AppView):
    token: str = Field(description="shown once")
    webhook_secret: str = Field(description="signs webhook deliveries; shown once")


class AppsView(_View):
    apps: list[AppRecordView]


class AppTokenView(_View):
    app_id: str
    token: str


class AppSecretView(_View):
    app_id: str
    webhook_secret: str


class AppDeletedView(_View):
    id: str
    status: Literal["deleted"]
    cancelled_deliveries: int


class DeliveryView(_View):
    id: str
    status: Literal["pending", "done", "dead"]
    event_type: str | None
    event_id: str
    conversation_id: str | None
    attempts: int
    replays: int
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    done_at: datetime | None


class DeliveryWithPayloadView(DeliveryView):
    payload: dict[str, Any] = Field(description="the body delivered to the app's webhook")


class DeliveriesView(_View):
    deliveries: list[DeliveryView]
    next_cursor: str | None


class CampaignView(_View):
    id: str
    name: str
    owner: str
    status: str
    channel: str
    endpoint: str
    template: dict[str, Any]
    text: str | None
    audience: dict[str, Any]
    rate: float
    window: dict[str, Any]
    recipients: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    progress: dict[str, int]


class CampaignsView(_View):
    campaigns: list[CampaignView]
    next_cursor: str | None


class RecipientView(_View):
    customer_id: str
    position: int
    status: str
    reason: str | None
    conversation_id: str | None
    event_id: str | None
    params: dict[str, Any]
    sent_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    replied_at: datetime | None
    failed_at: datetime | None


class RecipientsView(_View):
    recipients: list[RecipientView]
    next_cursor: str | None


class OptOutView(_View):
    customer_id: str
    source: str
    created_at: datetime


class OptOutsView(_View):
    opt_outs: list[OptOutView]
    next_cursor: str | None


class OptedOutView(_View):
    customer_id: str
    opted_out: bool


# the table -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Param:
    """A query or header parameter."""

    name: str
    where: Literal["query", "header"]
    schema: Mapping[str, Any]
    description: str
    required: bool = False
    example: Any = None


@dataclass(frozen=True, slots=True)
class Answer:
    """One documented answer: a body model (None: no body), or a media type and schema."""

    description: str
    model: type[BaseModel] | None = None
    media: str = "application/json"
    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    summary: str
    roles: tuple[Role, ...]
    answers: Mapping[int, Answer]
    body: type[BaseModel] | None = None
    body_required: bool = True
    body_media: str = "application/json"
    body_schema: Mapping[str, Any] | None = None  # instead of the model's (NDJSON)
    params: tuple[Param, ...] = ()
    refusals: tuple[int, ...] = ()  # besides those every such route has (see ``_refusals``)
    description: str = ""
    tags: tuple[str, ...] = ()


def _limit(most: int) -> Param:
    return Param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": most, "default": 50},
        f"page size, 1 to {most}",
    )


CURSOR = Param("cursor", "query", {"type": "string"}, "next_cursor of the previous page")
NUMERIC_CURSOR = Param(
    "cursor", "query", {"type": "string", "pattern": "^[0-9]+$"}, "next_cursor of the previous page"
)
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "minLength": 1, "maxLength": 200},
    "a retry with the same key changes nothing twice; the same key with another body is a 422",
)
IF_MATCH = Param(
    "If-Match", "header", {"type": "string"}, "the customer's ETag (or *); a stale one is a 412"
)
IF_MATCH_REQUIRED = Param(
    "If-Match", "header", {"type": "string"}, "the customer's ETag (or *)", required=True
)
TRUE_FALSE = {"type": "string", "enum": ["true", "false"]}
UPDATED_SINCE = Param(
    "updated_since",
    "query",
    {"type": "string", "format": "date-time"},
    "only customers changed at or after this time (UTC when it names no offset)",
)
DELIVERY_STATUS = Param(
    "status",
    "query",
    {"type": "string", "enum": ["pending", "done", "dead"]},
    "only deliveries in this status",
)


def _ok(model: type[BaseModel] | None, description: str = "done") -> Answer:
    return Answer(description, model)


def _accepted() -> dict[int, Answer]:
    return {
        202: _ok(AcceptedView, "stored as an event; the rules decide what follows"),
        200: _ok(AcceptedView, "a retry with the same Idempotency-Key: nothing changed"),
    }


_CONV = "/api/v1/conversations/{conversation_id}"
_APPS_ME = "/api/v1/apps/me"
_APP = "/api/v1/apps/{app_id}"
_IN = _APPS_ME + "/conversations/{conversation_id}"
_CAMPAIGNS = "/api/v1/campaigns"
_CAMPAIGN = _CAMPAIGNS + "/{campaign_id}"
_CUSTOMER = "/api/v1/customers/{customer_id}"

_SHARED_APP_ROUTES: tuple[tuple[str, str, str, dict[int, Answer], type[BaseModel] | None], ...] = (
    ("GET", "/subscriptions", "The app's event subscriptions", {200: _ok(SubscriptionsView)}, None),
    (
        "POST",
        "/subscriptions",
        "Subscribe the app to event types",
        {201: _ok(SubscriptionView, "subscribed")},
        apps.SubscribeBody,
    ),
    (
        "DELETE",
        "/subscriptions/{subscription_id}",
        "Remove a subscription",
        {204: _ok(None, "removed")},
        None,
    ),
    (
        "GET",
        "/deliveries",
        "The app's webhook deliveries, newest first",
        {200: _ok(DeliveriesView)},
        None,
    ),
    (
        "GET",
        "/deliveries/{delivery_id}",
        "One webhook delivery with its payload",
        {200: _ok(DeliveryWithPayloadView)},
        None,
    ),
    (
        "POST",
        "/deliveries/{delivery_id}/replay",
        "Queue a dead delivery again (same body, same delivery id)",
        {202: _ok(DeliveryView, "queued again")},
        None,
    ),
)


def _shared_app_operations() -> list[Operation]:
    """The subscription and delivery routes: once for the calling app, once for an admin."""
    found = []
    for base, roles, whose in ((_APPS_ME, APP, "the calling app"), (_APP, ADMIN, "an app")):
        for method, tail, summary, answers, body in _SHARED_APP_ROUTES:
            params: tuple[Param, ...] = ()
            refusals: tuple[int, ...] = (404,) if base == _APP else ()
            if tail == "/deliveries":
                params = (DELIVERY_STATUS, _limit(200), NUMERIC_CURSOR)
                refusals += (422,)
            if tail == "/subscriptions" and method == "POST":
                refusals += (409,)
            if tail.endswith("/replay"):
                refusals += (409,)
            found.append(
                Operation(
                    method,
                    base + tail,
                    f"{summary} ({whose})",
                    roles,
                    answers,
                    body=body,
                    params=params,
                    refusals=refusals,
                    tags=("apps",),
                )
            )
    return found


OPERATIONS: tuple[Operation, ...] = (
    # service --------------------------------------------------------------------------------
    Operation("GET", "/", "What this service is", PUBLIC, {200: _ok(IndexView)}, tags=("service",)),
    Operation("GET", "/healthz", "Alive", PUBLIC, {200: _ok(HealthView)}, tags=("service",)),
    Operation(
        "GET",
        "/readyz",
        "Ready: recovery done and the database answers",
        PUBLIC,
        {200: _ok(HealthView, "ready"), 503: _ok(HealthView, "starting or database unavailable")},
        tags=("service",),
    ),
    Operation(
        "GET",
        "/metrics",
        "Prometheus metrics",
        PUBLIC,
        {200: Answer("the text exposition format", media="text/plain", schema={"type": "string"})},
        tags=("service",),
    ),
    Operation(
        "GET",
        PATH,
        "This document",
        PUBLIC,
        {200: Answer("OpenAPI 3.1", schema={"type": "object"})},
        tags=("service",),
    ),
    # agents -----------------------------------------------------------------------------------
    Operation(
        "GET",
        "/api/v1/agents/me",
        "The calling agent, its conversations and offers",
        AGENT,
        {200: _ok(AgentView)},
        tags=("agents",),
    ),
    Operation(
        "PUT",
        "/api/v1/agents/me/presence",
        "Set the calling agent's presence",
        AGENT,
        {200: _ok(PresenceView)},
        body=agents.Presence,
        tags=("agents",),
    ),
    Operation(
        "POST",
        "/api/v1/offers/{offer_id}/accept",
        "Accept an offer",
        AGENT,
        _accepted(),
        refusals=(404, 409),
        tags=("agents",),
    ),
    Operation(
        "POST",
        "/api/v1/offers/{offer_id}/decline",
        "Decline an offer",
        AGENT,
        _accepted(),
        refusals=(404, 409),
        tags=("agents",),
    ),
    Operation(
        "POST",
        "/api/v1/conversations",
        "Write first to a customer on a channel",
        AGENT,
        _accepted(),
        body=outbound._OutboundBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("agents",),
    ),
    Operation(
        "POST",
        _CONV + "/messages",
        "Send a message (or a whisper to agents)",
        AGENT,
        _accepted(),
        body=agents._MessageBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("agents",),
    ),
    Operation(
        "POST",
        _CONV + "/leave",
        "Leave the conversation",
        AGENT,
        _accepted(),
        body=agents._LeaveBody,
        body_required=False,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("agents",),
    ),
    Operation(
        "POST",
        _CONV + "/wrap-up",
        "Finish the wrap-up with a disposition",
        AGENT,
        _accepted(),
        body=agents._WrapUpBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("agents",),
    ),
    Operation(
        "POST",
        _CONV + "/transfer",
        "Hand over to a queue or another agent",
        AGENT,
        _accepted(),
        body=agents._TransferBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("agents",),
    ),
    Operation(
        "POST",
        _CONV + "/invite",
        "Invite another agent (conference)",
        AGENT,
        _accepted(),
        body=agents._InviteBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("agents",),
    ),
    Operation(
        "POST",
        _CONV + "/close",
        "End the conversation with the customer",
        AGENT,
        _accepted(),
        body=agents._CloseBody,
        body_required=False,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("agents",),
    ),
    # conversations ----------------------------------------------------------------------------
    Operation(
        "GET",
        _CONV,
        "A conversation's snapshot",
        CONVERSATION_READERS,
        {200: _ok(ConversationView)},
        refusals=(404,),
        tags=("conversations",),
    ),
    Operation(
        "GET",
        _CONV + "/messages",
        "A conversation's transcript",
        CONVERSATION_READERS,
        {200: _ok(TranscriptView)},
        refusals=(404,),
        tags=("conversations",),
    ),
    Operation(
        "GET",
        _CONV + "/events",
        "A conversation's events and decisions",
        ADMIN,
        {200: _ok(EventsView)},
        refusals=(404,),
        tags=("conversations",),
    ),
    Operation(
        "GET",
        _CONV + "/events/{event_id}/explain",
        "An event's recorded decision next to the current rules' verdict",
        ADMIN,
        {200: _ok(ExplainView)},
        params=(Param("all", "query", {"type": "string"}, "1, true or yes: every rule"),),
        refusals=(404, 409),
        tags=("conversations",),
    ),
    # administration and rules -----------------------------------------------------------------
    Operation(
        "POST",
        "/api/v1/agents",
        "Create or update an agent",
        ADMIN,
        {200: _ok(AgentView)},
        body=admin.AgentBody,
        tags=("admin",),
    ),
    Operation(
        "POST",
        "/api/v1/tokens",
        "Make an API token (shown once)",
        ADMIN,
        {201: _ok(TokenView, "made")},
        body=admin.TokenBody,
        refusals=(404,),
        tags=("admin",),
    ),
    Operation(
        "GET",
        "/api/v1/rules",
        "The rules in force",
        ADMIN,
        {200: _ok(RulesView)},
        tags=("rules",),
    ),
    Operation(
        "POST",
        "/api/v1/rules/reload",
        "Compile the rules folder now",
        ADMIN,
        {200: _ok(RulesLoadedView)},
        refusals=(422,),
        tags=("rules",),
    ),
    Operation(
        "GET",
        "/api/v1/rules/versions",
        "Every rules version that was in force",
        ADMIN,
        {200: _ok(RulesVersionsView)},
        tags=("rules",),
    ),
    Operation(
        "POST",
        "/api/v1/rules/rollback",
        "Make a stored rules version current again",
        ADMIN,
        {200: _ok(RulesLoadedView)},
        body=rules_api.RollbackBody,
        refusals=(404,),
        tags=("rules",),
    ),
    # customers --------------------------------------------------------------------------------
    Operation(
        "POST",
        "/api/v1/customers",
        "Create a customer",
        WRITERS,
        {
            201: _ok(CustomerView, "created"),
            200: _ok(CustomerView, "a replay of an earlier call with this Idempotency-Key"),
        },
        body=customers.CreateBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(409,),
        tags=("customers",),
    ),
    Operation(
        "GET",
        "/api/v1/customers",
        "List customers",
        READERS,
        {200: _ok(CustomerPageView)},
        params=(
            _limit(200),
            CURSOR,
            Param("known", "query", TRUE_FALSE, "only known (or anonymous) customers"),
            Param("email", "query", {"type": "string"}, "this email"),
            Param("phone", "query", {"type": "string"}, "this phone number"),
            Param("external_id", "query", {"type": "string"}, "this CRM id"),
            Param("name", "query", {"type": "string"}, "names starting so"),
            UPDATED_SINCE,
        ),
        refusals=(422,),
        tags=("customers",),
    ),
    Operation(
        "GET",
        "/api/v1/customers/export",
        "Every live profile, streamed as NDJSON",
        WRITERS,
        {
            200: Answer(
                "one customer (as GET /api/v1/customers/{id}) per line, in id order",
                media="application/x-ndjson",
                schema={"type": "string"},
            )
        },
        params=(
            Param("known", "query", TRUE_FALSE, "only known (or anonymous) customers"),
            UPDATED_SINCE,
        ),
        refusals=(422,),
        tags=("customers",),
    ),
    Operation(
        "GET",
        "/api/v1/customers/schema",
        "The custom profile field schema",
        READERS,
        {200: _ok(CustomerSchemaView)},
        params=(
            Param("version", "query", {"type": "string", "pattern": "^[0-9]+$"}, "an older one"),
        ),
        refusals=(404, 422),
        tags=("customers",),
    ),
    Operation(
        "PUT",
        "/api/v1/customers/schema",
        "Replace the custom profile field schema (a new version)",
        ADMIN,
        {200: _ok(CustomerSchemaView)},
        body=CustomSchema,
        params=(
            Param(
                "If-Match",
                "header",
                {"type": "string"},
                'the schema version replaced ("0": none yet); a stale one is a 412',
            ),
        ),
        refusals=(412,),
        tags=("customers",),
    ),
    Operation(
        "GET",
        "/api/v1/customers/lookup",
        "Find a customer by identity",
        READERS,
        {200: _ok(CustomerView)},
        params=(
            Param(
                "identity",
                "query",
                {"type": "string"},
                "KIND:VALUE, e.g. phone:+4930123456",
                required=True,
                example="phone:+4930123456",
            ),
        ),
        refusals=(404, 422),
        tags=("customers",),
    ),
    Operation(
        "POST",
        "/api/v1/customers/bulk",
        "Upsert customers by external id (NDJSON)",
        WRITERS,
        {200: _ok(BulkView, "every line applied or listed in failures")},
        body=customers.BulkLine,
        body_media="application/x-ndjson",
        body_schema={
            "type": "array",
            "items": {"$ref": "#/components/schemas/BulkLine"},
            "description": "one BulkLine JSON object per line",
        },
        tags=("customers",),
    ),
    Operation(
        "GET",
        _CUSTOMER,
        "A customer",
        READERS,
        {200: _ok(CustomerView), 308: _ok(MergedView, "merged into another customer")},
        refusals=(404,),
        tags=("customers",),
    ),
    Operation(
        "PATCH",
        _CUSTOMER,
        "Change a customer (If-Match required)",
        WRITERS,
        {200: _ok(CustomerView)},
        body=customers.PatchBody,
        params=(IF_MATCH_REQUIRED,),
        refusals=(404, 409, 412, 428),
        tags=("customers",),
    ),
    Operation(
        "DELETE",
        _CUSTOMER,
        "Delete a customer (or erase it: admin)",
        WRITERS,
        {204: _ok(None, "deleted")},
        params=(
            Param("erase", "query", TRUE_FALSE, "erase personal data instead (admin)"),
            IF_MATCH,
        ),
        refusals=(404, 409, 412, 422),
        tags=("customers",),
    ),
    Operation(
        "POST",
        _CUSTOMER + "/identities",
        "Attach an identity",
        WRITERS,
        {200: _ok(CustomerView)},
        body=customers.IdentityBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("customers",),
    ),
    Operation(
        "POST",
        _CUSTOMER + "/merge",
        "Merge another customer into this one",
        WRITERS,
        {200: _ok(MergeView)},
        body=customers.MergeBody,
        refusals=(404, 409),
        tags=("customers",),
    ),
    Operation(
        "GET",
        _CUSTOMER + "/export",
        "Everything held about a customer",
        ADMIN,
        {200: _ok(ExportView)},
        refusals=(404,),
        tags=("customers",),
    ),
    # the app registry (admin) and the apps' own routes -----------------------------------------
    Operation(
        "POST",
        "/api/v1/apps",
        "Register an app",
        ADMIN,
        {201: _ok(AppCreatedView, "registered")},
        body=apps.CreateBody,
        refusals=(409,),
        tags=("apps",),
    ),
    Operation(
        "GET",
        "/api/v1/apps",
        "Every registered app",
        ADMIN,
        {200: _ok(AppsView)},
        params=(Param("include_deleted", "query", TRUE_FALSE, "list deleted apps too"),),
        refusals=(422,),
        tags=("apps",),
    ),
    Operation("GET", _APPS_ME, "The calling app", APP, {200: _ok(AppView)}, tags=("apps",)),
    Operation(
        "GET",
        _APP,
        "An app and its subscriptions",
        ADMIN,
        {200: _ok(AppView)},
        refusals=(404,),
        tags=("apps",),
    ),
    Operation(
        "PATCH",
        _APP,
        "Change an app",
        ADMIN,
        {200: _ok(AppView)},
        body=apps.PatchBody,
        refusals=(404, 409),
        tags=("apps",),
    ),
    Operation(
        "DELETE",
        _APP,
        "Delete (revoke) an app",
        ADMIN,
        {200: _ok(AppDeletedView)},
        refusals=(404, 409),
        tags=("apps",),
    ),
    Operation(
        "POST",
        _APP + "/token",
        "Rotate an app's token",
        ADMIN,
        {200: _ok(AppTokenView)},
        refusals=(404, 409),
        tags=("apps",),
    ),
    Operation(
        "POST",
        _APP + "/secret",
        "Rotate an app's webhook secret",
        ADMIN,
        {200: _ok(AppSecretView)},
        refusals=(404, 409),
        tags=("apps",),
    ),
    *_shared_app_operations(),
    Operation(
        "POST",
        _IN + "/join",
        "Join a conversation",
        APP,
        _accepted(),
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409, 422),
        tags=("apps",),
    ),
    Operation(
        "POST",
        _IN + "/leave",
        "Leave a conversation",
        APP,
        _accepted(),
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409, 422),
        tags=("apps",),
    ),
    Operation(
        "POST",
        _IN + "/messages",
        "Post a message in a conversation",
        APP,
        _accepted(),
        body=app_conversations._MessageBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("apps",),
    ),
    Operation(
        "PUT",
        _IN + "/attributes",
        "Set conversation attributes",
        APP,
        _accepted(),
        body=app_conversations._AttributesBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("apps",),
    ),
    Operation(
        "POST",
        _IN + "/events",
        "Report an event to the rules",
        APP,
        _accepted(),
        body=app_conversations._EventBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(404, 409),
        tags=("apps",),
    ),
    # outbound campaigns ------------------------------------------------------------------------
    Operation(
        "POST",
        _CAMPAIGNS,
        "Start a campaign",
        CAMPAIGNERS,
        {
            201: _ok(CampaignView, "created"),
            200: _ok(CampaignView, "a replay of an earlier call with this Idempotency-Key"),
        },
        body=campaigns.CreateBody,
        params=(IDEMPOTENCY_KEY,),
        refusals=(409,),
        tags=("campaigns",),
    ),
    Operation(
        "GET",
        _CAMPAIGNS,
        "Campaigns, newest first",
        CAMPAIGNERS,
        {200: _ok(CampaignsView)},
        params=(
            Param(
                "status",
                "query",
                {"type": "string", "enum": [*ACTIVE, "paused", *FINISHED]},
                "only campaigns in this status",
            ),
            _limit(200),
            CURSOR,
        ),
        refusals=(422,),
        tags=("campaigns",),
    ),
    Operation(
        "GET",
        _CAMPAIGN,
        "A campaign and its progress",
        CAMPAIGNERS,
        {200: _ok(CampaignView)},
        refusals=(404,),
        tags=("campaigns",),
    ),
    Operation(
        "GET",
        _CAMPAIGN + "/recipients",
        "A campaign's recipients and their outcomes",
        CAMPAIGNERS,
        {200: _ok(RecipientsView)},
        params=(
            Param(
                "status",
                "query",
                {"type": "string", "enum": list(RECIPIENT_STATUSES)},
                "only recipients in this status",
            ),
            _limit(1000),
            NUMERIC_CURSOR,
        ),
        refusals=(404, 422),
        tags=("campaigns",),
    ),
    Operation(
        "POST",
        _CAMPAIGN + "/pause",
        "Pause a campaign",
        CAMPAIGNERS,
        {200: _ok(CampaignView)},
        refusals=(404, 409),
        tags=("campaigns",),
    ),
    Operation(
        "POST",
        _CAMPAIGN + "/resume",
        "Resume a paused campaign",
        CAMPAIGNERS,
        {200: _ok(CampaignView)},
        refusals=(404, 409),
        tags=("campaigns",),
    ),
    Operation(
        "POST",
        _CAMPAIGN + "/cancel",
        "Cancel a campaign for good",
        CAMPAIGNERS,
        {200: _ok(CampaignView)},
        refusals=(404, 409),
        tags=("campaigns",),
    ),
    Operation(
        "GET",
        _CAMPAIGNS + "/opt-outs",
        "Customers who opted out of campaigns",
        CAMPAIGNERS,
        {200: _ok(OptOutsView)},
        params=(_limit(1000), CURSOR),
        refusals=(422,),
        tags=("campaigns",),
    ),
    Operation(
        "POST",
        _CAMPAIGNS + "/opt-outs",
        "Opt a customer out of campaigns",
        CAMPAIGNERS,
        {201: _ok(OptedOutView, "opted out"), 200: _ok(OptedOutView, "was opted out already")},
        body=campaigns.OptOutBody,
        refusals=(404,),
        tags=("campaigns",),
    ),
    Operation(
        "DELETE",
        _CAMPAIGNS + "/opt-outs/{customer_id}",
        "Opt a customer in again",
        CAMPAIGNERS,
        {204: _ok(None, "opted in")},
        refusals=(404,),
        tags=("campaigns",),
    ),
)


# request bodies as a client would send them (the fuzzing sends these too)
BODY_EXAMPLES: dict[tuple[str, str], Any] = {
    ("PUT", "/api/v1/agents/me/presence"): {"presence": "available"},
    ("POST", "/api/v1/conversations"): {
        "channel": "whatsapp",
        "to": "4930123456",
        "endpoint": "106540352242922",
        "text": "Your order has shipped.",
        "template": {"name": "order_shipped", "language": "en", "parameters": ["A-1001"]},
    },
    ("POST", _CONV + "/messages"): {"text": "Hello, this is Alice"},
    ("POST", _CONV + "/leave"): {"reason": "left"},
    ("POST", _CONV + "/wrap-up"): {"disposition": "resolved"},
    ("POST", _CONV + "/transfer"): {"queue": "billing"},
    ("POST", _CONV + "/invite"): {"agent": "bob"},
    ("POST", _CONV + "/close"): {"reason": "agent_closed"},
    ("POST", "/api/v1/agents"): {"id": "bob", "name": "Bob", "capacity": 3, "skills": ["en"]},
    ("POST", "/api/v1/tokens"): {"role": "crm", "subject": "the-crm"},
    ("POST", "/api/v1/customers"): {
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "phone": "+4930123457",
        "language": "en",
        "custom": {"tier": "gold"},
        "identities": [{"kind": "external", "value": "crm-1815"}],
    },
    ("POST", "/api/v1/customers/bulk"): [
        {"external_id": "crm-1", "name": "Grace Hopper", "custom": {"tier": "silver"}},
        {"external_id": "crm-2", "email": "alan@example.com"},
    ],
    ("PATCH", _CUSTOMER): {"language": "de", "custom": {"tier": None}},
    ("POST", _CUSTOMER + "/identities"): {"kind": "email", "value": "ada@example.org"},
    ("POST", "/api/v1/apps"): {
        "name": "survey",
        "scopes": ["events:subscribe", "conversations:join"],
        "webhook_url": "https://survey.example.com/hooks/convctl",
    },
    ("PATCH", _APP): {"enabled": False},
    ("POST", _APPS_ME + "/subscriptions"): {"event_types": ["conversation.closed"]},
    ("POST", _APP + "/subscriptions"): {"event_types": ["conversation.closed"]},
    ("POST", _IN + "/messages"): {
        "text": "How did we do?",
        "buttons": [
            {"title": "Great", "payload": "csat:5"},
            {"title": "Poor", "payload": "csat:1"},
        ],
    },
    ("PUT", _IN + "/attributes"): {"attributes": {"csat": 5}},
    ("POST", _IN + "/events"): {"name": "survey.done", "data": {"score": 5}},
    ("POST", _CAMPAIGNS): {
        "name": "Spring sale",
        "channel": "whatsapp",
        "endpoint": "106540352242922",
        "template": {
            "name": "spring_sale",
            "language": "en",
            "parameters": ["{{ customer.profile.name }}"],
        },
        "audience": {"filter": {"custom": {"tier": "gold"}}},
        "rate": 5,
        "window": {"hours": {"from": "09:00", "to": "18:00"}},
    },
    ("POST", _CAMPAIGNS + "/opt-outs"): {"customer_id": "cu_0193c1f2a4b5d6e7f8091a2b"},
}


# building the document -----------------------------------------------------------------------
def _refusals(op: Operation) -> list[int]:
    """The refusals a route has: its own, plus those of its authentication and body."""
    found = set(op.refusals) | {400}  # any route: a NUL character in its path or query
    if op.roles:
        found |= {401, 403}
    if op.body is not None:
        found |= {400, 413, 415, 422}
    if "{" in op.path:
        found.add(404)
    return sorted(found)


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
        }
        for name in names
    ]


def _param(p: Param) -> dict[str, Any]:
    found = {
        "name": p.name,
        "in": p.where,
        "required": p.required,
        "description": p.description,
        "schema": dict(p.schema),
    }
    if p.example is not None:
        found["example"] = p.example
    return found


def _scope_of(op: Operation) -> str | None:
    for route in apps.APP_API:
        if (route.method, route.path) == (op.method, op.path):
            return route.scope
    return None


def _operation(op: Operation, ref: Mapping[type[BaseModel], dict[str, Any]]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, answer in sorted(op.answers.items()):
        item: dict[str, Any] = {"description": answer.description}
        schema = dict(answer.schema) if answer.schema is not None else None
        if answer.model is not None:
            schema = ref[answer.model]
        if schema is not None:
            item["content"] = {answer.media: {"schema": schema}}
        responses[str(status)] = item
    for status in _refusals(op):
        responses.setdefault(str(status), {"$ref": f"#/components/responses/E{status}"})
    roles = list(op.roles)
    description = op.description or op.summary
    scope = _scope_of(op)
    if roles:
        description += f"\n\nTokens accepted: {', '.join(roles)}."
        if "app" in roles and scope:
            description += f" An app's token needs the scope `{scope}`."
    found: dict[str, Any] = {
        "operationId": _operation_id(op),
        "summary": op.summary,
        "description": description,
        "tags": list(op.tags),
        "security": [{"bearer": []}] if roles else [],
        "x-convctl-roles": roles,
        "parameters": [*_path_params(op.path), *(_param(p) for p in op.params)],
        "responses": responses,
    }
    if "app" in roles:
        found["x-convctl-app-scope"] = scope
    if op.body is not None:
        body_schema = dict(op.body_schema) if op.body_schema is not None else ref[op.body]
        found["requestBody"] = {
            "required": op.body_required,
            "content": {op.body_media: {"schema": body_schema}},
        }
        example = BODY_EXAMPLES.get((op.method, op.path))
        if example is not None:
            found["requestBody"]["content"][op.body_media]["example"] = example
    return found


def _operation_id(op: Operation) -> str:
    words = [op.method.lower()]
    for part in op.path.removeprefix("/api/v1").split("/"):
        if not part:
            continue
        if part.startswith("{"):
            words.append("by_" + part[1:-1])
        else:
            words.append(part.replace("-", "_").replace(".", "_"))
    return "_".join(words) if len(words) > 1 else f"{words[0]}_index"


_REASONS = {
    400: "malformed JSON, a malformed header, or a NUL character in the path or query",
    401: "no token, or an unknown one",
    403: "a token of a role (or an app scope) the route does not accept",
    404: "unknown route or resource",
    409: "the resource's state does not allow it",
    412: "If-Match names another version",
    413: "the body is too large",
    415: "the body is not of the media type the route takes",
    422: "the body or the query is not valid (details in the message)",
    428: "If-Match is required",
}


def _models() -> dict[type[BaseModel], Literal["validation", "serialization"]]:
    found: dict[type[BaseModel], Literal["validation", "serialization"]] = {Error: "serialization"}
    for op in OPERATIONS:
        if op.body is not None:
            found[op.body] = "validation"
        for answer in op.answers.values():
            if answer.model is not None:
                found.setdefault(answer.model, "serialization")
    return found


# names for request models whose class names repeat across modules
_BODY_NAMES: dict[type[BaseModel], str] = {
    agents.Presence: "PresenceBody",
    agents._MessageBody: "AgentMessageBody",
    agents._LeaveBody: "LeaveBody",
    agents._WrapUpBody: "WrapUpBody",
    agents._TransferBody: "TransferBody",
    agents._InviteBody: "InviteBody",
    agents._CloseBody: "CloseBody",
    outbound._OutboundBody: "OutboundBody",
    admin.AgentBody: "AgentBody",
    admin.TokenBody: "TokenBody",
    rules_api.RollbackBody: "RulesRollbackBody",
    customers.CreateBody: "CustomerCreateBody",
    customers.PatchBody: "CustomerPatchBody",
    customers.IdentityBody: "IdentityBody",
    customers.MergeBody: "CustomerMergeBody",
    customers.BulkLine: "BulkLine",
    apps.CreateBody: "AppCreateBody",
    apps.PatchBody: "AppPatchBody",
    apps.SubscribeBody: "SubscribeBody",
    app_conversations._MessageBody: "AppMessageBody",
    app_conversations._AttributesBody: "AttributesBody",
    app_conversations._EventBody: "AppEventBody",
    campaigns.CreateBody: "CampaignCreateBody",
    campaigns.OptOutBody: "OptOutBody",
}


def _rename_refs(node: Any, names: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                prefix, _, name = value.rpartition("/")
                out[key] = f"{prefix}/{names.get(name, name)}"
            else:
                out[key] = _rename_refs(value, names)
        return out
    if isinstance(node, list):
        return [_rename_refs(v, names) for v in node]
    return node


@cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once per process; it depends on code only)."""
    models = _models()
    keys, top = models_json_schema(
        [(m, mode) for m, mode in models.items()], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    # Pydantic names a model by its class (qualified by module when two share a name);
    # the document names each body and answer as the table does.
    names: dict[str, str] = {}
    ref: dict[type[BaseModel], dict[str, Any]] = {}
    for model, mode in models.items():
        generated = keys[(model, mode)]["$ref"].rpartition("/")[2]
        wanted = _BODY_NAMES.get(model, model.__name__)
        if wanted != generated:
            if wanted in schemas or wanted in names.values():
                raise ValueError(f"two schemas would be named {wanted!r}")
            names[generated] = wanted
        ref[model] = {"$ref": f"#/components/schemas/{wanted}"}
    schemas = {names.get(k, k): _rename_refs(v, names) for k, v in schemas.items()}
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        item = paths.setdefault(op.path, {})
        key = op.method.lower()
        if key in item:
            raise ValueError(f"{op.method} {op.path} is in the table twice")
        item[key] = _operation(op, ref)
    error_ref = ref[Error]
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "convctl",
            "version": "1",
            "summary": "Every JSON API of the convctl service",
            "description": (
                "Built from the service's code (controller/api/openapi.py). Authenticate with "
                "`Authorization: Bearer TOKEN`; each operation names the roles whose tokens it "
                "takes (`x-convctl-roles`) and, for apps, the scope it needs "
                "(`x-convctl-app-scope`). Every refusal has the body `Error`. Event types: "
                + ", ".join(EVENT_TYPES)
                + "."
            ),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": t}
            for t in (
                "service",
                "agents",
                "conversations",
                "admin",
                "rules",
                "customers",
                "apps",
                "campaigns",
            )
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                f"E{status}": {
                    "description": reason,
                    "content": {"application/json": {"schema": error_ref}},
                }
                for status, reason in _REASONS.items()
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token (admin, agent, crm or app)",
                }
            },
        },
    }


def documented(method: str, path: str, handler_module: str) -> bool:
    """Whether a route of the router belongs in the document (see the module docstring)."""
    if method == "HEAD" or (method, path) in NOT_DOCUMENTED:
        return False
    return handler_module.partition(".")[0] != CONNECTOR_PACKAGE


async def serve_document(request: web.Request) -> web.Response:
    return web.json_response(document())


def routes() -> list[web.RouteDef]:
    return [web.get(PATH, serve_document)]
