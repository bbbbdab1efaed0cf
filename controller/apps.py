"""Apps as participants: the registry, scopes, event subscriptions and signed webhooks.

An app (a survey tool, a campaign manager, a CRM) is registered by an admin with the scopes
it may use; it calls the App API with its own token (role ``app``, subject the app id) and
receives the events it subscribed to by signed webhook. The store is the truth; this module
keeps an index of live apps and subscriptions in memory, loaded at start and updated on
every change, so the worker finds an event's subscribers without a query.

Deliveries are outbox rows (destination ``app:<app id>``) written in the transaction of the
decision, so an event is announced exactly when it is decided; the dispatcher delivers them
with this module's handler: one lane per (conversation, app), a retry policy of their own,
dead letters that the API can list and replay.
"""

from __future__ import annotations

import json
import secrets
import time

import aiohttp
import structlog
from aiohttp import web

from controller.api.common import Principal, authenticate, hash_token
from controller.clock import Clock
from controller.customers import PROFILE_EVENTS, PROFILE_SCOPE, ProfileNotices
from controller.errors import Conflict, Forbidden, NotFound, RequestError, Unauthorized
from controller.ids import new_id
from controller.keys import APPS
from controller.metrics import Metrics
from controller.models import EVENT_TYPES, Conversation, Event
from controller.outbox import DeliveryFailed, RetryPolicy
from controller.settings import AppDeliverySettings
from controller.signing import sign
from controller.store.base import AppRecord, AppSubscription, NewOutbox, OutboxRow, Store

log = structlog.get_logger(__name__)

# The closed list of scopes an app may be given (docs/apps.md explains each).
SCOPES: dict[str, str] = {
    "conversations:read": "read conversations and their transcripts",
    "conversations:write": "post messages and set attributes in conversations",
    "conversations:join": "join and leave conversations as a participant",
    "customers:read": "read customer profiles",
    "customers:write": "create, change and merge customer profiles",
    "campaigns:run": "start, pause, resume and cancel outbound campaigns",
    "events:subscribe": "subscribe to events and receive them by signed webhook",
}
EVENTS_SCOPE = "events:subscribe"
JOIN_SCOPE = "conversations:join"
WRITE_SCOPE = "conversations:write"
DESTINATION_PREFIX = "app"
# what a webhook answered that says trying again can help
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
RETRY_AFTER_MAX = 3600.0  # an app cannot park its deliveries for longer than this


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in seconds (an HTTP date is not followed)."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), RETRY_AFTER_MAX)


class MissingScope(Forbidden):
    """The app's token lacks the scope this call needs (403 naming the scope)."""

    def __init__(self, scope: str) -> None:
        super().__init__(
            f"this call needs the scope {scope!r}, which the app was not given",
            code="missing_scope",
        )
        self.details = {"scope": scope}


class UnknownName(RequestError):
    """A scope or an event type that is not on the closed list (422 naming it)."""

    def __init__(self, kind: str, name: str, known: tuple[str, ...] | list[str]) -> None:
        super().__init__(
            f"unknown {kind.replace('_', ' ')} {name!r}; known: {', '.join(known)}",
            code=f"unknown_{kind}",
            status=422,
        )
        self.details = {kind: name}


def check_scopes(scopes: list[str]) -> tuple[str, ...]:
    """The scopes, deduplicated in their order; UnknownName for one not on the list."""
    for scope in scopes:
        if scope not in SCOPES:
            raise UnknownName("scope", scope, list(SCOPES))
    return tuple(dict.fromkeys(scopes))


def check_event_types(event_types: list[str]) -> tuple[str, ...]:
    """Conversation event types (the rules' vocabulary) and profile notifications."""
    for kind in event_types:
        if kind not in EVENT_TYPES and kind not in PROFILE_EVENTS:
            raise UnknownName("event_type", kind, [*EVENT_TYPES, *PROFILE_EVENTS])
    return tuple(dict.fromkeys(event_types))


def destination(app_id: str) -> str:
    return f"{DESTINATION_PREFIX}:{app_id}"


async def require_scope(
    request: web.Request, scope: str | None, *, also: tuple[str, ...] = ()
) -> Principal:
    """The caller, if it may make this call: an admin token, a token of a role in ``also``
    (the route checks those further), or the token of a live app holding ``scope`` (None:
    any app). A disabled or deleted app's token is a 401, a missing scope a 403
    ``missing_scope`` naming it, any other role a 403 ``wrong_role``."""
    principal = await authenticate(request)
    if principal.role == "admin" or principal.role in also:
        return principal
    if principal.role != "app":
        roles = " or ".join(("an app", "admin", *also))
        raise Forbidden(f"this route needs {roles} token", code="wrong_role")
    app = request.app[APPS].get(principal.subject)
    if app is None or not app.enabled:
        raise Unauthorized("the app of this token is disabled or was deleted")
    if scope is not None and scope not in app.scopes:
        raise MissingScope(scope)
    return principal


class AppRegistry:
    """Registered apps and their subscriptions: store writes, and the in-memory index."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._apps: dict[str, AppRecord] = {}  # live (not deleted) apps
        self._subscriptions: dict[str, AppSubscription] = {}
        self._index: dict[str, tuple[str, ...]] = {}  # event type -> app ids

    async def load(self) -> None:
        self._apps = {a.id: a for a in await self._store.app_records()}
        self._subscriptions = {s.id: s for s in await self._store.app_subscriptions()}
        self._reindex()

    def _reindex(self) -> None:
        index: dict[str, set[str]] = {}
        for sub in self._subscriptions.values():
            for kind in sub.event_types:
                index.setdefault(kind, set()).add(sub.app_id)
        self._index = {kind: tuple(sorted(ids)) for kind, ids in index.items()}

    def get(self, app_id: str) -> AppRecord | None:
        """A live app (None once deleted)."""
        return self._apps.get(app_id)

    def named(self, name: str) -> AppRecord | None:
        """A live app by its registered name (rules invite apps by name)."""
        return next((a for a in self._apps.values() if a.name == name), None)

    # the worker's hook -------------------------------------------------------------------
    def subscribers(self, event: Event, conversation: Conversation) -> list[NewOutbox]:
        """One outbox row per app that hears this event: apps subscribed to its type (with
        the ``events:subscribe`` scope) and apps taking part in the conversation (with the
        ``conversations:join`` scope). Only enabled apps with a webhook URL hear anything."""
        rows = []
        hearing = {
            a: "subscriber" for a in self._index.get(event.type, ()) if self._can(a, EVENTS_SCOPE)
        }
        for p in conversation.participants:
            app = self.named(p.id) if p.role == "app" else None
            if app is not None and app.id not in hearing and self._can(app.id, JOIN_SCOPE):
                hearing[app.id] = "participant"
        for app_id, why in hearing.items():
            rows.append(
                NewOutbox(
                    destination(app_id),
                    {
                        "type": event.type,
                        "conversation_id": event.conversation_id,
                        "app_id": app_id,
                        "as": why,
                        "event": {
                            "id": event.id,
                            "type": event.type,
                            "seq": event.seq,
                            "data": event.data,
                            "accepted_at": event.accepted_at.isoformat(),
                        },
                    },
                )
            )
        return rows

    def profile_notices(self) -> ProfileNotices:
        """Who hears profile notifications now: apps subscribed to the type that hold
        ``events:subscribe`` and ``customers:read`` (the store writes their rows inside the
        customer write's transaction)."""
        return ProfileNotices(
            {
                kind: tuple(
                    a
                    for a in self._index.get(kind, ())
                    if self._can(a, EVENTS_SCOPE) and self._can(a, PROFILE_SCOPE)
                )
                for kind in PROFILE_EVENTS
            }
        )

    def first_contact_notices(self) -> ProfileNotices | None:
        """Who hears ``profile.created`` for the anonymous customer a channel's first contact
        makes (the inbox's hook, on every submit): None, after one dictionary look-up, when
        nobody does — then the store's accept does nothing extra."""
        subscribed = self._index.get("profile.created")
        if not subscribed:
            return None
        apps = tuple(
            a for a in subscribed if self._can(a, EVENTS_SCOPE) and self._can(a, PROFILE_SCOPE)
        )
        return ProfileNotices({"profile.created": apps}) if apps else None

    def _can(self, app_id: str, scope: str) -> bool:
        app = self._apps.get(app_id)
        return app is not None and app.enabled and bool(app.webhook_url) and scope in app.scopes

    # registry ----------------------------------------------------------------------------
    async def create(
        self,
        *,
        name: str,
        scopes: tuple[str, ...],
        webhook_url: str | None,
        description: str | None,
    ) -> tuple[AppRecord, str, str]:
        """Register an app; returns it with its token and webhook secret (shown only now)."""
        now = self._clock.now()
        token, secret = _new_token(), _new_secret()
        record = AppRecord(
            id=new_id("ap"),
            name=name,
            description=description,
            scopes=scopes,
            webhook_url=webhook_url,
            webhook_secret=secret,
            enabled=True,
            created_at=now,
            updated_at=now,
        )
        stored = await self._store.create_app(record, hash_token(token))
        self._apps[stored.id] = stored
        log.info("app_created", app_id=stored.id, scopes=list(scopes))
        return stored, token, secret

    async def record(self, app_id: str) -> AppRecord:
        """An app as stored (deleted ones too); NotFound if it never existed."""
        found = await self._store.app_record(app_id)
        if found is None:
            raise NotFound(f"unknown app {app_id!r}", code="unknown_app")
        return found

    async def live(self, app_id: str) -> AppRecord:
        """An app that can still be changed: Conflict ``app_deleted`` once deleted."""
        found = await self.record(app_id)
        if found.deleted_at is not None:
            raise Conflict(f"app {app_id!r} was deleted", code="app_deleted")
        return found

    async def all(self) -> list[AppRecord]:
        return await self._store.app_records()

    async def update(self, app_id: str, changes: dict[str, object]) -> AppRecord:
        stored = await self._store.update_app(app_id, changes, self._clock.now())
        self._apps[app_id] = stored
        log.info("app_updated", app_id=app_id, fields=sorted(changes))
        return stored

    async def rotate_token(self, app_id: str) -> str:
        """A new token; every earlier token of the app stops working at once."""
        token = _new_token()
        await self._store.replace_app_token(app_id, hash_token(token), self._clock.now())
        log.info("app_token_rotated", app_id=app_id)
        return token

    async def rotate_secret(self, app_id: str) -> str:
        """A new webhook secret; deliveries are signed with it from now on (retries too)."""
        secret = _new_secret()
        await self.update(app_id, {"webhook_secret": secret})
        log.info("app_secret_rotated", app_id=app_id)
        return secret

    async def delete(self, app_id: str) -> int:
        """Revoke an app: tokens, subscriptions, pending deliveries (returns how many)."""
        cancelled = await self._store.delete_app(
            app_id, self._clock.now(), "revoked: the app was deleted"
        )
        self._apps.pop(app_id, None)
        for sid in [s.id for s in self._subscriptions.values() if s.app_id == app_id]:
            del self._subscriptions[sid]
        self._reindex()
        log.info("app_deleted", app_id=app_id, cancelled_deliveries=cancelled)
        return cancelled

    # subscriptions -----------------------------------------------------------------------
    async def subscribe(self, app_id: str, event_types: tuple[str, ...]) -> AppSubscription:
        app = await self.live(app_id)
        if not app.webhook_url:
            raise Conflict("the app has no webhook_url to deliver events to", code="no_webhook_url")
        if PROFILE_SCOPE not in app.scopes and any(k in PROFILE_EVENTS for k in event_types):
            raise MissingScope(PROFILE_SCOPE)  # profile notifications carry personal data
        sub = AppSubscription(new_id("sb"), app_id, event_types, self._clock.now())
        await self._store.add_app_subscription(sub)
        self._subscriptions[sub.id] = sub
        self._reindex()
        log.info("app_subscribed", app_id=app_id, subscription_id=sub.id, types=list(event_types))
        return sub

    async def subscriptions(self, app_id: str) -> list[AppSubscription]:
        return await self._store.app_subscriptions(app_id)

    async def unsubscribe(self, app_id: str, subscription_id: str) -> None:
        if not await self._store.delete_app_subscriptions(app_id, [subscription_id]):
            raise NotFound(f"unknown subscription {subscription_id!r}", code="unknown_subscription")
        self._subscriptions.pop(subscription_id, None)
        self._reindex()
        log.info("app_unsubscribed", app_id=app_id, subscription_id=subscription_id)

    async def drop_gone(self, app_id: str, event_type: str) -> list[str]:
        """The receiver answered 410 Gone: drop the app's subscriptions to this type."""
        ids = [
            s.id
            for s in self._subscriptions.values()
            if s.app_id == app_id and event_type in s.event_types
        ]
        if ids:
            await self._store.delete_app_subscriptions(app_id, ids)
            for sid in ids:
                self._subscriptions.pop(sid, None)
            self._reindex()
        log.warning("app_subscription_gone", app_id=app_id, event_type=event_type, dropped=ids)
        return ids


class AppWebhooks:
    """The dispatcher's handler for ``app:<id>`` rows: a signed POST to the app's webhook."""

    def __init__(
        self,
        registry: AppRegistry,
        http: aiohttp.ClientSession,
        clock: Clock,
        metrics: Metrics,
        settings: AppDeliverySettings,
    ) -> None:
        self._registry = registry
        self._http = http
        self._clock = clock
        self._metrics = metrics
        self._settings = settings
        self._policy = RetryPolicy(
            settings.max_attempts, settings.backoff_base, settings.backoff_max
        )

    def policy(self, destination: str) -> RetryPolicy:
        return self._policy

    async def deliver(self, row: OutboxRow) -> None:
        """POST the event; return on 2xx, else raise DeliveryFailed (retryable or not)."""
        app_id = row.destination.partition(":")[2]
        app = self._registry.get(app_id)
        if app is None:
            raise DeliveryFailed("revoked: the app was deleted", retryable=False)
        if not app.enabled:
            raise DeliveryFailed("disabled: the app is disabled", retryable=False)
        needed = JOIN_SCOPE if row.payload.get("as") == "participant" else EVENTS_SCOPE
        if needed not in app.scopes:
            raise DeliveryFailed(f"missing_scope: the app lost {needed}", retryable=False)
        if row.payload.get("type") in PROFILE_EVENTS and PROFILE_SCOPE not in app.scopes:
            raise DeliveryFailed(f"missing_scope: the app lost {PROFILE_SCOPE}", retryable=False)
        if not app.webhook_url:
            raise DeliveryFailed("no_webhook_url: the app has no webhook_url", retryable=False)
        body = json.dumps(
            {"id": row.idempotency_key, **row.payload}, separators=(",", ":")
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "convctl-webhooks",
            **sign(
                app.webhook_secret,
                body,
                now=self._clock.now().timestamp(),
                delivery_id=row.idempotency_key,
            ),
        }
        started = time.perf_counter()
        try:
            async with self._http.post(
                app.webhook_url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
                allow_redirects=False,
            ) as response:
                status = response.status
                excerpt = (await response.content.read(300)).decode(errors="replace")
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except TimeoutError as exc:
            self._count(app_id, "failed")
            raise DeliveryFailed(
                f"timeout: no answer within {self._settings.timeout:g} s", retryable=True
            ) from exc
        except aiohttp.ClientError as exc:
            self._count(app_id, "failed")
            raise DeliveryFailed(f"connection: {exc}", retryable=True) from exc
        finally:
            self._metrics.app_delivery_seconds.observe(time.perf_counter() - started)
        if 200 <= status < 300:
            self._count(app_id, "delivered")
            return
        if status == 410:
            self._count(app_id, "gone")
            dropped = await self._registry.drop_gone(app_id, str(row.payload.get("type")))
            raise DeliveryFailed(
                f"gone: the webhook answered 410 Gone; subscriptions dropped: "
                f"{', '.join(dropped) or 'none'}",
                retryable=False,
            )
        self._count(app_id, "failed")
        retryable = status >= 500 or status in _RETRYABLE_STATUSES
        failed = DeliveryFailed(f"http_{status}: {excerpt.strip()[:200]}", retryable=retryable)
        failed.retry_after = retry_after
        raise failed

    async def dead(self, row: OutboxRow, error: str) -> None:
        app_id = row.destination.partition(":")[2]
        self._count(app_id, "dead")
        log.warning("app_delivery_dead", app_id=app_id, delivery_id=row.idempotency_key)

    def _count(self, app_id: str, outcome: str) -> None:
        self._metrics.app_deliveries.labels(app_id, outcome).inc()


def _new_token() -> str:
    return "cva_" + secrets.token_urlsafe(32)


def _new_secret() -> str:
    return "cvs_" + secrets.token_urlsafe(32)


__all__ = [
    "SCOPES",
    "AppRegistry",
    "AppWebhooks",
    "MissingScope",
    "check_event_types",
    "check_scopes",
    "destination",
    "require_scope",
]
