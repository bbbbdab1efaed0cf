"""Prometheus metrics, one registry per application (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.store.base import PoolStats

# What an offer can become; ``offered`` counts offers made.
OFFER_OUTCOMES = ("offered", "accepted", "declined", "expired", "cancelled")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_accepted = Counter(
            "convctl_events_accepted", "Events stored in the inbox", ["type"], registry=r
        )
        self.events_duplicate = Counter(
            "convctl_events_duplicate",
            "Redelivered events ignored by the inbox",
            ["source"],
            registry=r,
        )
        self.decisions = Counter(
            "convctl_decisions", "Events decided", ["outcome", "matcher"], registry=r
        )
        self.decision_seconds = Histogram(
            "convctl_decision_seconds",
            "Time from loading an event to its commit",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.rules_fired = Counter("convctl_rules_fired", "Rules that fired", ["rule"], registry=r)
        self.actions_refused = Counter(
            "convctl_actions_refused",
            "Actions refused by the state machine",
            ["rule", "action"],
            registry=r,
        )
        self.outbox_sent = Counter(
            "convctl_outbox_delivered", "Outbox rows delivered", ["destination"], registry=r
        )
        self.outbox_retries = Counter(
            "convctl_outbox_retries", "Outbox deliveries retried", ["destination"], registry=r
        )
        self.outbox_dead = Counter(
            "convctl_outbox_dead",
            "Outbox rows given up (dead letters)",
            ["destination"],
            registry=r,
        )
        self.outbox_held = Counter(
            "convctl_outbox_held",
            "Outbox rows the provider may already have, held for its delivery status",
            ["destination"],
            registry=r,
        )
        self.outbox_confirmed = Counter(
            "convctl_outbox_confirmed",
            "Held outbox rows a delivery status showed were delivered (not sent again)",
            ["destination"],
            registry=r,
        )
        self.outbox_unconfirmed_resent = Counter(
            "convctl_outbox_unconfirmed_resent",
            "Held outbox rows sent again because no delivery status came within the hold",
            ["destination"],
            registry=r,
        )
        self.app_deliveries = Counter(
            "convctl_app_deliveries",
            "Webhook delivery attempts to apps by outcome (delivered, failed, gone, dead)",
            ["app", "outcome"],
            registry=r,
        )
        self.app_delivery_seconds = Histogram(
            "convctl_app_delivery_seconds",
            "Time an app's webhook took to answer a delivery",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.campaign_messages = Counter(
            "convctl_campaign_messages",
            "Campaign recipients by what the runner did: sent, or skipped (opted_out, "
            "no_channel_identity, missing_parameter, unknown_customer)",
            ["outcome"],
            registry=r,
        )
        self.campaign_outcomes = Counter(
            "convctl_campaign_outcomes",
            "What became of campaign messages (delivered, read, failed, replied, moved)",
            ["kind"],
            registry=r,
        )
        self.timers_fired = Counter("convctl_timers_fired", "Timers fired", registry=r)
        self.bot_requests = Counter(
            "convctl_bot_requests",
            "Questions to bots by outcome (answered, pending, timeout, error, circuit_open, "
            "callback)",
            ["bot", "outcome"],
            registry=r,
        )
        self.bot_seconds = Histogram(
            "convctl_bot_seconds",
            "Time a bot took to answer (or accept) a question",
            ["bot"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.bot_circuit_open = Gauge(
            "convctl_bot_circuit_open",
            "1 while a bot's circuit breaker is open",
            ["bot"],
            registry=r,
        )
        self.timers_pending = Gauge("convctl_timers_pending", "Timers waiting", registry=r)
        self.queue_length = Gauge(
            "convctl_queue_length", "Conversations waiting in a queue", ["queue"], registry=r
        )
        self.queue_longest_wait = Gauge(
            "convctl_queue_longest_wait_seconds",
            "How long the longest-waiting conversation of a queue has waited (0 when empty)",
            ["queue"],
            registry=r,
        )
        self.offers = Counter("convctl_offers", "Offers by outcome", ["outcome"], registry=r)
        for outcome in OFFER_OUTCOMES:
            self.offers.labels(outcome)  # every outcome is exported, at 0 until it happens
        self.handle_seconds = Histogram(
            "convctl_handle_seconds",
            "Handle time per queue: from an agent accepting a conversation to the agent being "
            "released (left, transferred, rerouted or wrap-up done)",
            ["queue"],
            registry=r,
            buckets=(30, 60, 120, 300, 600, 900, 1800, 3600, 7200),
        )
        self.websockets = Gauge(
            "convctl_websockets", "Open WebSocket connections", ["kind"], registry=r
        )
        self.channel_background = Counter(
            "convctl_channel_background",
            "Channel work after the commit (read receipts, media downloads) by outcome",
            ["channel", "outcome"],
            registry=r,
        )
        self.http_errors = Counter(
            "convctl_http_errors", "HTTP error answers", ["status", "code"], registry=r
        )
        self.recovered = Counter(
            "convctl_recovered_events",
            "Events in flight at a crash, decided again by the reference evaluator",
            registry=r,
        )
        self.rules_reload_failures = Counter(
            "convctl_rules_reload_failures",
            "Rules reloads refused because the new files were invalid",
            registry=r,
        )
        self.rules_version = Gauge(
            "convctl_rules_version_info",
            "The rules version in force (value 1)",
            ["version"],
            registry=r,
        )
        # Several processes (controller/cluster.py): how this process took work over from
        # another, ``dead`` (heartbeat timeout) or ``handover`` (the other left cleanly).
        self.cluster_takeovers = Counter(
            "convctl_cluster_takeovers",
            "Other processes whose work this process took part in, by how they went "
            "(dead: heartbeat timeout; handover: a clean stop released it)",
            ["how"],
            registry=r,
        )
        for how in ("dead", "handover"):
            self.cluster_takeovers.labels(how)
        self.cluster_leases_handed_over = Counter(
            "convctl_cluster_leases_handed_over",
            "Conversation leases this process released when it stopped",
            registry=r,
        )
        self._pool_watched = False

    def watch_pool(self, source: object) -> None:
        """Export the database connection pool of ``source`` (a store with ``pool_stats``,
        the PostgreSQL one) at every scrape; other stores have no pool and export nothing."""
        stats = getattr(source, "pool_stats", None)
        if stats is None or self._pool_watched:
            return
        self.registry.register(_PoolCollector(stats))
        self._pool_watched = True


class _PoolCollector(Collector):
    """Reads the pool when scraped (its numbers change on every query, no need to follow)."""

    def __init__(self, stats: Callable[[], PoolStats | None]) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        if s is None:
            return
        for name, text, value in (
            ("convctl_db_pool_size", "Connections open in the database pool", s.size),
            ("convctl_db_pool_idle", "Pool connections open and idle", s.idle),
            ("convctl_db_pool_in_use", "Pool connections in use", s.size - s.idle),
            ("convctl_db_pool_min", "Connections the pool keeps open at least", s.min_size),
            ("convctl_db_pool_max", "Connections the pool opens at most", s.max_size),
            ("convctl_db_pool_waiting", "Callers waiting for a pool connection now", s.waiting),
        ):
            yield GaugeMetricFamily(name, text, value=value)
        buckets: list[tuple[str, float]] = []
        seen = 0
        for bound, count in zip(s.wait_bounds, s.wait_buckets, strict=True):
            seen += count
            buckets.append((repr(bound), seen))
        buckets.append(("+Inf", s.acquires))
        yield HistogramMetricFamily(
            "convctl_db_pool_acquire_seconds",
            "Time spent waiting for a connection from the database pool",
            buckets=buckets,
            sum_value=s.wait_seconds,
        )
