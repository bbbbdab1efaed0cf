"""The application factory: ``create_app(settings)`` wires every part; ``convctl serve`` runs it.

Each long-lived resource is one ``cleanup_ctx`` generator: set up, yield, tear down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from connectors.base import (
    Bot,
    Channel,
    Connector,
    ConnectorContext,
    OutboundMessage,
    build_connector,
    connector_types,
)
from controller.api import (
    admin,
    agents,
    app_conversations,
    conversations,
    customers,
    health,
    openapi,
    outbound,
)
from controller.api import apps as apps_api
from controller.api import campaigns as campaigns_api
from controller.api import rules as rules_api
from controller.api.common import errors_middleware, hash_token, text_guard_middleware
from controller.api.desk import DeskHub
from controller.apps import AppRegistry, AppWebhooks
from controller.bots import BotGateway
from controller.campaigns import CampaignRunner
from controller.clock import Clock, SystemClock
from controller.cluster import Cluster
from controller.customers import CustomerProfiles
from controller.errors import ConfigError, RequestError
from controller.inbox import Inbox
from controller.keys import (
    APPS,
    BOT_GATEWAY,
    BOTS,
    CAMPAIGNS,
    CHANNELS,
    CLOCK,
    CLUSTER,
    CONNECTOR_CONTEXT,
    CUSTOMERS,
    DESK,
    DISPATCHER,
    HTTP,
    INBOX,
    METRICS,
    READY,
    ROUTER,
    RULES,
    SETTINGS,
    STORE,
    TIMERS,
    WORKERS,
)
from controller.metrics import Metrics
from controller.models import Event, NewEvent
from controller.outbox import Dispatcher
from controller.router import Router
from controller.rules import RulebookHolder
from controller.settings import AgentSeed, Settings
from controller.store.base import Accepted, Committed, DecisionRecord, OutboxRow, Store
from controller.store.factory import open_store
from controller.timers import Timers
from controller.worker import Workers

log = structlog.get_logger(__name__)

# At a stop, how long the decisions in flight may take before the workers are cancelled.
FINISH_DECISIONS_TIMEOUT = 10.0
DEMO_AGENTS = (AgentSeed(id="alice", name="Alice"), AgentSeed(id="bob", name="Bob"))


def create_app(settings: Settings, *, clock: Clock | None = None) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, text_guard_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock or SystemClock()
    app[METRICS] = Metrics()
    app[READY] = {"ready": False}
    app[DESK] = DeskHub()
    app[CLUSTER] = None
    app.router.add_routes(health.routes())
    app.router.add_routes(agents.routes())
    app.router.add_routes(conversations.routes())
    app.router.add_routes(admin.routes())
    app.router.add_routes(rules_api.routes())
    app.router.add_routes(customers.routes())
    app.router.add_routes(outbound.routes())
    app.router.add_routes(apps_api.routes())
    app.router.add_routes(app_conversations.routes())
    app.router.add_routes(campaigns_api.routes())
    app.router.add_routes(openapi.routes())
    app.router.add_get("/", _index)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_engine_ctx)
    app.cleanup_ctx.append(_connectors_ctx)
    app.cleanup_ctx.append(_running_ctx)
    app.cleanup_ctx.append(_campaigns_ctx)
    app.on_shutdown.append(_stopping)
    _add_connector_routes(app)
    return app


async def _index(request: web.Request) -> web.Response:
    return web.json_response(
        {"service": "convctl", "webchat": "/webchat", "docs": "README.md", "health": "/healthz"}
    )


# connectors are built before start so their routes can be added to the router --------------
def _add_connector_routes(app: web.Application) -> None:
    settings = app[SETTINGS]
    types = connector_types()
    channels: dict[str, Channel] = {}
    bots: dict[str, Bot] = {}
    context = ConnectorContext(
        submit=lambda events: _submit(app, events),
        bot_reply=lambda answer: app[BOT_GATEWAY].callback(answer),
        clock=app[CLOCK],
        session_secret=settings.session_secret,
        allowed_origins=settings.allowed_origins,
        data_dir=settings.data_dir,
        service={
            "history": lambda i, e, v: _history(app, i, e, v),
            "present_customers": lambda instance: _present_customers(app, instance),
            "provider_message": lambda i, p: app[STORE].provider_message(i, p),
            "confirm_delivery": lambda i, k, p: _confirm_delivery(app, i, k, p),
            "metrics": app[METRICS],
        },
    )
    app[CONNECTOR_CONTEXT] = context
    seen: set[str] = set()
    for inst in settings.connectors:
        if inst.name in seen:
            raise ConfigError(f"connector name {inst.name!r} is used twice")
        seen.add(inst.name)
        connector = build_connector(inst.name, inst.type, inst.settings, context, types)
        if isinstance(connector, Channel):
            channels[inst.name] = connector
        elif isinstance(connector, Bot):
            bots[inst.name] = connector
        app.router.add_routes(connector.routes())
    app[CHANNELS] = channels
    app[BOTS] = bots


async def _submit(app: web.Application, events: Sequence[NewEvent]) -> list[Accepted]:
    return await app[INBOX].submit(events)


async def _present_customers(app: web.Application, instance: str) -> list[tuple[str, str, int]]:
    """Customers last seen connected, whose sockets a restart lost (the web chat
    disconnects them at start). With other processes running, their sockets may live there:
    nobody is disconnected then (docs/architecture.md, "Several processes")."""
    cluster = app[CLUSTER]
    if cluster is not None and not await cluster.alone():
        return []
    return await app[STORE].present_customers(instance)


async def _history(
    app: web.Application, instance: str, endpoint: str, identity: str
) -> dict[str, Any]:
    store = app[STORE]
    cid = await store.latest_conversation_id(instance, endpoint, identity)
    if cid is None:
        return {"conversation_id": None, "open": False, "messages": []}
    conv = await store.load_conversation(cid)
    messages = await store.messages(cid, include_agent_only=False)
    return {
        "conversation_id": cid,
        "open": conv is not None and conv.state != "closed",
        "state": conv.state if conv else None,
        "customer_present": conv.customer_present if conv else False,
        "messages": [
            {
                "id": m.id,
                "from": m.sender_role,
                "text": m.text,
                "at": m.created_at.isoformat(),
                **(m.content or {}),
            }
            for m in messages
        ],
    }


# lifecycles ---------------------------------------------------------------------------------
async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = await open_store(settings)
    app[STORE] = store
    app[METRICS].watch_pool(store)  # PostgreSQL: the connection pool's gauges
    yield
    await store.close()


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, store, clock, metrics = app[SETTINGS], app[STORE], app[CLOCK], app[METRICS]
    rules = RulebookHolder(
        settings.resolved_rules_dir(),
        settings.rule_settings(),
        matcher=settings.matcher,
        default_language=settings.default_language,
        store=store,
        metrics=metrics,
        clock=clock,
    )
    app[RULES] = rules
    profiles = app[CUSTOMERS] = CustomerProfiles(store)
    await rules.start(watch=settings.rules_watch, interval=settings.rules_watch_interval)
    registry = app[APPS] = AppRegistry(store, clock)
    await registry.load()
    calendar = settings.calendar()
    cluster = app[CLUSTER] = _cluster(settings, store, metrics)
    workers = Workers(
        store,
        rules.current,
        metrics=metrics,
        clock=clock,
        timezone=settings.timezone,
        calendar=calendar,
        concurrency=settings.workers,
        matcher=settings.matcher,
        queue_facts=lambda conv: app[ROUTER].queue_facts(conv),  # the router is made below
        customer_facts=profiles.facts,
        subscribers=registry.subscribers,
        leases=cluster,
    )
    app[WORKERS] = workers
    app[INBOX] = Inbox(
        store,
        clock,
        metrics,
        workers.notify,
        first_contact_notices=registry.first_contact_notices,
        notices_written=lambda: app[DISPATCHER].wake(),  # the dispatcher is made below
    )
    dispatcher = Dispatcher(
        store,
        clock,
        metrics,
        max_attempts=settings.outbox_max_attempts,
        backoff_base=settings.outbox_backoff_base,
        backoff_max=settings.outbox_backoff_max,
    )
    app[DISPATCHER] = dispatcher
    timers = Timers(
        store,
        clock,
        metrics,
        workers.notify,
        claim=getattr(store, "claim_timers", None) if cluster is not None else None,
        poll=settings.cluster_heartbeat_interval,
    )
    app[TIMERS] = timers
    router = Router(
        store,
        clock,
        metrics,
        workers.notify,
        offer_timeout=settings.timeouts.offer,
        calendar=calendar,
        queues=settings.queue_routing,
    )
    router.set_push(app[DESK].push)
    app[ROUTER] = router
    workers.on_commit(dispatcher.after_commit)
    workers.on_commit(timers.after_commit)
    if cluster is None:
        workers.on_commit(router.after_commit)
    else:
        cluster.serve(workers.notify, workers.adopt)
        cluster.after_takeover(dispatcher.wake)
        cluster.after_takeover(timers.wake)
        # One process (the singleton lock's holder) runs the router; the others tell it
        # what their decisions changed.
        cluster.singleton(router.start, router.stop)
        workers.on_commit(lambda record, committed: _router_commit(app, record, committed))
        cluster.on_message("router", lambda message: _router_message(app, message))
        cluster.on_message("push", lambda message: _fanned_out(app, message))
        cluster.on_message("desk", lambda message: _fanned_out(app, message))
    campaigns = app[CAMPAIGNS] = CampaignRunner(
        store,
        clock,
        metrics,
        workers.notify,
        channel_kinds={n: str(getattr(c, "channel", n)) for n, c in app[CHANNELS].items()},
        timezone=settings.timezone,
        default_language=settings.default_language,
    )
    workers.on_commit(campaigns.after_commit)  # what became of campaign messages
    yield
    # Producers first, then the workers, then the rules they use.
    await dispatcher.stop()
    await timers.stop()
    await router.stop()
    await workers.stop()
    await campaigns.close()
    await rules.close()


async def _connectors_ctx(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    app[HTTP] = session
    app[CONNECTOR_CONTEXT].http = session
    dispatcher = app[DISPATCHER]
    dispatcher.register(
        "channel",
        lambda row: _deliver_channel(app, row),
        on_dead=lambda row, err: _channel_failed(app, row, err),
    )
    dispatcher.confirm_by_status("channel", _ChannelConfirmations(app))
    gateway = app[BOT_GATEWAY] = BotGateway(app[BOTS], app[CLOCK], app[METRICS], app[INBOX])
    dispatcher.register("bot", gateway.deliver, on_dead=gateway.failed, policy=gateway.policy)
    dispatcher.register("desk", lambda row: _deliver_desk(app, row))
    webhooks = AppWebhooks(app[APPS], session, app[CLOCK], app[METRICS], app[SETTINGS].apps)
    dispatcher.register("app", webhooks.deliver, on_dead=webhooks.dead, policy=webhooks.policy)
    yield
    await gateway.stop()
    await session.close()


async def _running_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, store, router = app[SETTINGS], app[STORE], app[ROUTER]
    now = app[CLOCK].now()
    seeds = list(settings.agents) or (list(DEMO_AGENTS) if settings.profile == "dev" else [])
    for seed in seeds:
        await admin.ensure_agent(app, admin.AgentBody(**seed.model_dump()))
    if settings.admin_token:
        await store.put_token(hash_token(settings.admin_token), "admin", "admin", now)
    if settings.agent_token and seeds:
        await store.put_token(hash_token(settings.agent_token), "agent", seeds[0].id, now)
    cluster = app[CLUSTER]
    if cluster is None:
        await router.start()
    timers = await app[TIMERS].start()
    if cluster is None:
        app[WORKERS].start()
        pending = await app[WORKERS].recover()
    else:
        # The first sweep finds the work this process owns or nobody owns (and, holding
        # the singleton lock, starts the router) before the workers run.
        pending = await cluster.start()
        app[WORKERS].start()
        app[READY].update(process_id=cluster.process_id)
    # Connectors start once the engine runs: what they submit at start is decided normally.
    started: list[Connector] = []
    connectors: list[Connector] = [*app[CHANNELS].values(), *app[BOTS].values()]
    for connector in connectors:
        await connector.start()
        started.append(connector)
    await app[DISPATCHER].start(shared=cluster is not None)
    app[READY].update(
        ready=True,
        timers=timers,
        recovered_conversations=pending,
        rules_version=app[RULES].current().version,
    )
    log.info(
        "ready",
        timers=timers,
        recovered_conversations=pending,
        rules_version=app[RULES].current().version,
    )
    yield
    # Stopping (SIGTERM): not ready (``on_shutdown`` said so already), no new events in, the
    # decisions in flight finish; with other processes the conversations are handed over.
    app[READY]["ready"] = False
    await app[DESK].close_all()
    for connector in reversed(started):
        await connector.stop()
    if cluster is not None:
        await cluster.hand_over(app[WORKERS].wait_idle, FINISH_DECISIONS_TIMEOUT)
        await cluster.stop()
    else:
        try:
            async with asyncio.timeout(FINISH_DECISIONS_TIMEOUT):
                await app[WORKERS].wait_idle()
        except TimeoutError:
            log.warning("decisions_unfinished_at_stop", timeout=FINISH_DECISIONS_TIMEOUT)


async def _stopping(app: web.Application) -> None:
    """The first step of a shutdown: readiness goes false before anything stops."""
    app[READY].update(ready=False, stopping=True)


async def _campaigns_ctx(app: web.Application) -> AsyncIterator[None]:
    """Campaigns send once everything else runs, and stop first (they only produce events)."""
    resumed = await app[CAMPAIGNS].start()
    if resumed:
        log.info("campaigns_resumed", campaigns=resumed)
    yield
    await app[CAMPAIGNS].stop()


# several processes (PostgreSQL) --------------------------------------------------------------
def _cluster(settings: Settings, store: Store, metrics: Metrics) -> Cluster | None:
    """This process among others sharing the database; None on SQLite (one process)."""
    from controller.store.postgres import PostgresStore

    if not isinstance(store, PostgresStore):
        return None
    return Cluster(
        store,
        heartbeat_interval=settings.cluster_heartbeat_interval,
        heartbeat_timeout=settings.cluster_heartbeat_timeout,
        metrics=metrics,
    )


def _router_commit(app: web.Application, record: DecisionRecord, committed: Committed) -> None:
    """After a decision: the router learns what changed, here or in the process running it."""
    cluster = app[CLUSTER]
    assert cluster is not None
    if cluster.leader:
        app[ROUTER].after_commit(record, committed)
        return
    conv = record.after
    touched = record.released_agents or record.assigned_agents
    if conv.queue is None and not touched and not record.event.type.startswith("agent."):
        return  # never routed, no agent involved: nothing the router follows
    cluster.publish_soon(
        {
            "kind": "router",
            "conversation": conv.id,
            "event_type": record.event.type,
            "released": list(record.released_agents),
            "assigned": list(record.assigned_agents),
        }
    )


async def _router_message(app: web.Application, message: dict[str, Any]) -> None:
    """In the router's process: a decision of another process, replayed into the router
    with the conversation as stored now."""
    cluster = app[CLUSTER]
    if cluster is None or not cluster.leader:
        return
    conv = await app[STORE].load_conversation(str(message["conversation"]))
    if conv is None:
        return
    event = Event(
        id="cluster",
        type=message["event_type"],
        conversation_id=conv.id,
        seq=0,
        source="cluster",
        dedupe_key="cluster",
        accepted_at=app[CLOCK].now(),
        data={},
    )
    record = DecisionRecord(
        event=event,
        before_version=conv.version,
        after=conv,
        rules_version="",
        matcher="",
        released_agents=[str(a) for a in message.get("released", [])],
        assigned_agents=[str(a) for a in message.get("assigned", [])],
    )
    app[ROUTER].after_commit(record, Committed([], []))


def _socket_channels(app: web.Application) -> set[str]:
    """Channel instances whose customers are reached through sockets on some process."""
    return {c.name for c in app[SETTINGS].connectors if c.type == "webchat"}


def _outbound_json(message: OutboundMessage) -> dict[str, Any]:
    return {
        "conversation_id": message.conversation_id,
        "endpoint": message.endpoint,
        "identity": message.identity,
        "message": message.message,
    }


async def _fan_out(app: web.Application, message: dict[str, Any]) -> None:
    """Several processes: what went to sockets here goes to the other processes' sockets
    too (NOTIFY). Best effort: a socket that misses it finds it in the history on reconnect."""
    cluster = app[CLUSTER]
    if cluster is None:
        return
    try:
        await cluster.publish(message)
    except Exception as exc:  # too big for NOTIFY (8000 bytes), the database away...
        log.warning("fan_out_failed", kind=message.get("kind"), error=f"{type(exc).__name__}")


async def _fanned_out(app: web.Application, message: dict[str, Any]) -> None:
    """Another process's socket push: deliver it to the sockets of this process."""
    cluster = app[CLUSTER]
    if cluster is None or message.get("from") == cluster.process_id:
        return  # NOTIFY reaches the sender too: its own sockets have it already
    if message["kind"] == "desk":
        for agent_id in message.get("agents", []):
            await app[DESK].push(str(agent_id), message["frame"])
        return
    channel = app[CHANNELS].get(str(message.get("instance")))
    if channel is None:
        return
    await channel.send(
        OutboundMessage(
            conversation_id=str(message["conversation_id"]),
            endpoint=str(message["endpoint"]),
            identity=str(message["identity"]),
            message=dict(message["message"]),
            idempotency_key="",
            customer_last_at=None,
        )
    )


# outbox deliveries ---------------------------------------------------------------------------
async def _deliver_channel(app: web.Application, row: OutboxRow) -> None:
    instance = row.destination.split(":", 1)[1]
    channel = app[CHANNELS].get(instance)
    if channel is None:
        raise ConfigError(f"no channel instance {instance!r}")
    last_at = row.payload.get("customer_last_at")  # absent in rows queued before it existed
    message = dict(row.payload["message"])
    image = message.get("image")
    if image and "images" not in channel.capabilities:
        # A channel that cannot show an image gets its address as text.
        message.pop("image")
        message["text"] = "\n".join(t for t in (message.get("text"), str(image)) if t)
    outbound = OutboundMessage(
        conversation_id=row.conversation_id,
        endpoint=str(row.payload.get("endpoint", "")),
        identity=str(row.payload.get("identity", "")),
        message=message,
        idempotency_key=row.idempotency_key,
        customer_last_at=datetime.fromisoformat(last_at) if isinstance(last_at, str) else None,
    )
    provider_id = await channel.send(outbound)
    if instance in _socket_channels(app):
        # The customer's socket may be open on another process: those push it too.
        await _fan_out(app, {"kind": "push", "instance": instance, **_outbound_json(outbound)})
    if provider_id:
        await _remember_provider_id(app, instance, row, provider_id)


async def _remember_provider_id(
    app: web.Application, instance: str, row: OutboxRow, provider_id: str
) -> str | None:
    """Delivery statuses name the provider's id: remember which of our messages (the row's)
    it is, and return our id. The message is sent: failing to remember must not make the
    outbox send it again."""
    message_id = (row.payload.get("message") or {}).get("id")
    if not isinstance(message_id, str) or not message_id:
        return None
    try:
        await app[STORE].record_provider_message(
            instance, provider_id, row.conversation_id, message_id, app[CLOCK].now()
        )
    except Exception as exc:
        log.warning(
            "provider_id_not_recorded",
            instance=instance,
            provider_id=provider_id,
            error=f"{type(exc).__name__}: {exc}",
        )
    return message_id


class _ChannelConfirmations:
    """Channel messages whose fate is unknown: a stored delivery status naming the send
    (WhatsApp's ``biz_opaque_callback_data`` is the row's key) shows the provider has it;
    else the channel says how long to wait for one."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def hold(self, row: OutboxRow) -> float | None:
        channel = self._app[CHANNELS].get(row.destination.split(":", 1)[1])
        return channel.status_hold(row.idempotency_key) if channel is not None else None

    async def seen(self, row: OutboxRow) -> bool:
        if self.hold(row) is None:
            return False  # this channel's statuses do not name our sends
        store = self._app[STORE]
        provider_id = await store.delivery_status_of(row.conversation_id, row.idempotency_key)
        if provider_id is None:
            return False
        await _remember_provider_id(self._app, row.destination.split(":", 1)[1], row, provider_id)
        return True


async def _confirm_delivery(
    app: web.Application, instance: str, key: str, provider_id: str
) -> tuple[bool, str | None]:
    """A channel's delivery status names the send ``key``: whether a held row (or part of
    one) waited for it, and our message id when a whole row is now done."""
    destination, dispatcher = f"channel:{instance}", app[DISPATCHER]
    if not dispatcher.holds(destination, key):
        return False, None
    row = await dispatcher.confirm(destination, key)
    if row is None:  # a part of a message: the rest goes out when the hold passes
        return True, None
    return True, await _remember_provider_id(app, instance, row, provider_id)


CHANNEL_FAILURES = ("window_closed", "invalid_recipient", "rate_limited")


async def _channel_failed(app: web.Application, row: OutboxRow, error: str) -> None:
    """A message for the customer became a dead letter: tell the rules why.

    Channels start a ChannelSendError's message with the reason; anything else is a
    ``provider_error``.
    """
    instance = row.destination.split(":", 1)[1]
    detail = error.partition(": ")[2]  # "ChannelSendError: window_closed: ..."
    reason = next((r for r in CHANNEL_FAILURES if detail.startswith(r)), "provider_error")
    message = row.payload.get("message") or {}
    await _dead_letter_event(
        app,
        row,
        "delivery.failed",
        f"channel:{instance}",
        {
            "reason": reason,
            "instance": instance,
            "message_id": message.get("id"),
            "error": error[:500],
        },
    )


async def _dead_letter_event(
    app: web.Application, row: OutboxRow, kind: str, source: str, data: dict[str, Any]
) -> None:
    """Store the event that tells the rules a row became a dead letter (once per row)."""
    try:
        await app[INBOX].submit(
            [
                NewEvent(
                    type=kind,  # type: ignore[arg-type]
                    source=source,
                    dedupe_key=f"{row.idempotency_key}:failed",
                    conversation_id=row.conversation_id,
                    data=data,
                )
            ]
        )
    except RequestError as exc:  # e.g. the conversation closed meanwhile
        log.info("dead_letter_event_not_stored", kind=kind, refused=exc.code)


async def _deliver_desk(app: web.Application, row: OutboxRow) -> None:
    hub = app[DESK]
    frame = {
        "type": row.payload.get("kind", "message"),
        "conversation_id": row.conversation_id,
        "message": row.payload.get("message"),
    }
    agents = [str(a) for a in row.payload.get("agents", [])]
    for agent_id in agents:
        await hub.push(agent_id, frame)
    await _fan_out(app, {"kind": "desk", "agents": agents, "frame": frame})
