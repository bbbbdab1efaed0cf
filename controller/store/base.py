"""The Store interface and the records that cross it.

Every write that must be atomic is one method: accepting events (inbox dedupe, conversation
resolution and sequence numbers), committing a decision (snapshot, decision record, outbox,
timers, transcript, emitted events), firing a timer, and each router step (offer, accept,
decline, expire). A PostgreSQL implementation keeps the same methods and takes a row lock on
the conversation inside the same transactions.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.models import Conversation, Event, NewEvent


@dataclass(frozen=True, slots=True)
class Accepted:
    """The inbox's answer for one event: where it went, and whether it was already there."""

    event_id: str
    conversation_id: str
    seq: int
    duplicate: bool


# Upper bounds (seconds) of the pool's acquire-wait histogram.
POOL_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The connection pool now, and how long callers waited for a connection so far.
    ``wait_buckets[i]`` counts the acquires that waited at most ``POOL_WAIT_BUCKETS[i]``
    (not cumulative, bounds ``wait_bounds``); ``acquires`` counts them all."""

    size: int
    idle: int
    min_size: int
    max_size: int
    waiting: int
    acquires: int
    wait_seconds: float
    wait_bounds: tuple[float, ...]
    wait_buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NewOutbox:
    destination: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    conversation_id: str
    event_id: str
    n: int
    destination: str
    payload: dict[str, Any]
    attempts: int
    # 0: nothing is known against sending it; 1 (UNSURE_CLAIMED): it was claimed, maybe in
    # flight, when its process died; 2 (UNSURE_HELD): it waits for a delivery status (or its
    # hold to pass) because the provider may already have it.
    unsure: int = 0

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and restarts: the deciding event and the row's place in it."""
        return f"{self.event_id}:{self.n}"


@dataclass(frozen=True, slots=True)
class Committed:
    """What a committed decision produced: its emitted events and its outbox rows (claimed in
    the same transaction, so the dispatcher can deliver them without polling)."""

    accepted: list[Accepted]
    outbox: list[OutboxRow]


@dataclass(frozen=True, slots=True)
class TimerOp:
    """Set (``due_at`` given) or delete (``due_at`` None) the named timer of a conversation."""

    name: str
    generation: int
    due_at: datetime | None


@dataclass(frozen=True, slots=True)
class TimerRow:
    conversation_id: str
    name: str
    generation: int
    due_at: datetime


@dataclass(frozen=True, slots=True)
class Message:
    """One line of a conversation's transcript, as the customer or an agent sees it."""

    id: str
    conversation_id: str
    sender_role: str
    sender_id: str
    text: str
    created_at: datetime
    visibility: str = "all"  # "all" or "agents" (whispers, suggestions)
    # What it shows besides text: {"buttons": [{"id", "title"}], "image": url}; None if none.
    content: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ProviderMessage:
    """What a channel's provider calls one of our messages (a WhatsApp ``wamid``, a
    Messenger ``mid``), recorded when the send returned it."""

    instance: str
    provider_id: str
    conversation_id: str
    message_id: str
    sent_at: datetime


@dataclass(slots=True)
class DecisionRecord:
    """Everything one decided event changes, committed in one transaction."""

    event: Event
    before_version: int
    after: Conversation
    rules_version: str
    matcher: str
    outcome: str = "decided"  # "decided" or "stale" (a timer of an old generation)
    fired: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[NewOutbox] = field(default_factory=list)
    timers: list[TimerOp] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    emitted: list[NewEvent] = field(default_factory=list)
    released_agents: list[str] = field(default_factory=list)
    assigned_agents: list[str] = field(default_factory=list)
    # the facts the rules saw (None when no rule was consulted, e.g. a stale timer)
    facts: dict[str, Any] | None = None
    # Several processes (PostgreSQL): the fencing token of the lease the decision was made
    # under; the commit is refused (Conflict ``lease_lost``) unless this process still holds
    # the conversation's lease with this token. None: no lease (one process, SQLite).
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class AgentRecord:
    id: str
    name: str
    presence: str
    capacity: int  # in total, over every channel
    skills: Mapping[str, int]  # name -> level, 1 to 10
    idle_since: datetime
    # Capacity per channel kind (``webchat``, ``whatsapp``...); empty: any channel, up to
    # ``capacity``. A channel not listed in a non-empty mapping is not offered at all.
    channels: Mapping[str, int] = field(default_factory=dict)
    teams: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OfferRecord:
    id: str
    conversation_id: str
    agent_id: str
    status: str
    created_at: datetime
    expires_at: datetime


def offered_event(offer: OfferRecord) -> NewEvent:
    """The ``agent.offered`` event stored with a new offer (dedupe key: the offer id)."""
    return NewEvent(
        type="agent.offered",
        source="router",
        dedupe_key=f"{offer.id}:offered",
        conversation_id=offer.conversation_id,
        data={"agent_id": offer.agent_id, "offer_id": offer.id},
    )


def skill_levels(stored: Any) -> dict[str, int]:
    """An agent's stored skills as {name: level}: a plain list (before levels) is level 1."""
    if isinstance(stored, Mapping):
        return {str(name): int(level) for name, level in stored.items()}
    return {str(name): 1 for name in stored}


@dataclass(frozen=True, slots=True)
class QueuedConversation:
    conversation_id: str
    queue: str
    priority: int
    skills: tuple[str, ...]
    enqueued_at: datetime


@dataclass(frozen=True, slots=True)
class RouterSnapshot:
    """What the router rebuilds its memory from at start."""

    agents: list[AgentRecord]
    queued: list[QueuedConversation]
    pending_offers: list[OfferRecord]
    assignments: list[tuple[str, str]]  # (agent_id, conversation_id)
    tried: list[tuple[str, str]]  # (conversation_id, agent_id) that declined or let an offer expire
    accepting: list[str]  # conversations whose agent.accepted event is not decided yet
    # conversation -> channel kind, for the queued, offered and assigned conversations
    channels: dict[str, str] = field(default_factory=dict)


class Store(abc.ABC):
    """Durable state of the controller. All methods are safe to call concurrently."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # inbox -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def accept(
        self, events: Sequence[NewEvent], now: datetime, *, notify: Notify | None = None
    ) -> list[Accepted]:
        """Store events once per (source, dedupe_key), in one transaction.

        An event without ``conversation_id`` is placed in the open conversation of its
        (channel instance, endpoint, identity), which is created (with a
        ``conversation.created`` event before it) when there is none. Raises NotFound for an
        unknown conversation id and Conflict for a closed one.

        A first contact that creates an anonymous customer calls ``notify`` (if given) with a
        ``created`` change inside the same transaction, like every customer write: its
        notification rows commit or roll back with the events.
        """

    @abc.abstractmethod
    async def load_for_decision(
        self, conversation_id: str, limit: int = 100
    ) -> tuple[Conversation | None, list[Event]]:
        """The snapshot and its undecided events (in sequence order), read together."""

    @abc.abstractmethod
    async def first_pending_events(self) -> list[tuple[str, str]]:
        """(conversation id, id of its first undecided event), oldest first."""

    @abc.abstractmethod
    async def event(self, event_id: str) -> Event | None: ...

    @abc.abstractmethod
    async def events(self, conversation_id: str) -> list[tuple[Event, str]]:
        """All events of a conversation with their status, in sequence order."""

    @abc.abstractmethod
    async def decisions(self, conversation_id: str) -> list[dict[str, Any]]: ...

    # conversations -----------------------------------------------------------------------
    @abc.abstractmethod
    async def load_conversation(self, conversation_id: str) -> Conversation | None: ...

    @abc.abstractmethod
    async def latest_conversation_id(
        self, instance: str, endpoint: str, identity: str
    ) -> str | None:
        """The newest conversation of an identity, open or closed (for a returning visitor)."""

    @abc.abstractmethod
    async def present_customers(self, instance: str) -> list[tuple[str, str, int]]:
        """Open conversations whose customer was last seen connected:
        (conversation id, identity, seq of that last presence event)."""

    @abc.abstractmethod
    async def commit_decision(self, record: DecisionRecord, now: datetime) -> Committed:
        """Apply one decision atomically; raises Conflict if the snapshot version moved (or,
        with ``record.lease``, if this process no longer holds the conversation's lease).

        Outbox rows are inserted claimed by this process and returned in ``Committed`` for
        the dispatcher's fast path, except (PostgreSQL) rows whose lane has older pending
        rows another process holds or nobody holds: those stay unclaimed for the poller."""

    @abc.abstractmethod
    async def messages(
        self, conversation_id: str, *, include_agent_only: bool
    ) -> list[Message]: ...

    @abc.abstractmethod
    async def record_provider_message(
        self,
        instance: str,
        provider_id: str,
        conversation_id: str,
        message_id: str,
        sent_at: datetime,
    ) -> None:
        """Remember the provider's id of a message a channel instance sent (recording the
        same (instance, provider id) again keeps the first record)."""

    @abc.abstractmethod
    async def provider_message(self, instance: str, provider_id: str) -> ProviderMessage | None:
        """Which of our messages a channel instance's provider id stands for."""

    # outbox ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def claim_outbox(self, now: datetime, limit: int) -> list[OutboxRow]:
        """Rows due for delivery, oldest first. Rows of one conversation keep their order."""

    @abc.abstractmethod
    async def outbox_done(self, row_id: int) -> None: ...

    @abc.abstractmethod
    async def outbox_retry(self, row_id: int, at: datetime, error: str) -> None: ...

    @abc.abstractmethod
    async def outbox_release(self, row_ids: Sequence[int]) -> None: ...

    @abc.abstractmethod
    async def outbox_dead(self, row_id: int, error: str) -> None: ...

    @abc.abstractmethod
    async def outbox_next_due(self) -> datetime | None: ...

    @abc.abstractmethod
    async def outbox_hold(self, row_id: int, until: datetime, error: str | None = None) -> None:
        """Unclaim a claimed row that the provider may already have (``unsure`` 2) and
        make it due at ``until``; ``error`` (an ambiguous failure) counts an attempt."""

    @abc.abstractmethod
    async def delivery_status_of(self, conversation_id: str, callback_data: str) -> str | None:
        """The provider id (``wamid``) a stored ``delivery.status`` event of the conversation
        gives for the send its ``callback_data`` names, if one came."""

    @abc.abstractmethod
    async def outbox_held(self) -> list[OutboxRow]:
        """Pending rows that wait for a delivery status (``unsure`` 2)."""

    @abc.abstractmethod
    async def outbox_confirm(self, row_id: int) -> OutboxRow | None:
        """A held row the provider says it has: mark it done, unless it was claimed again
        (its hold passed) or is no longer pending; the row when it was marked."""

    @abc.abstractmethod
    async def outbox_pending_lanes(self) -> list[tuple[str, str]]:
        """(conversation, destination) lanes with undelivered rows."""

    @abc.abstractmethod
    async def outbox_lane_pending(self, conversation_id: str, destination: str) -> int: ...

    @abc.abstractmethod
    async def outbox_rows(self, status: str | None = None) -> list[dict[str, Any]]: ...

    # timers ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def timers(self) -> list[TimerRow]: ...

    @abc.abstractmethod
    async def fire_timer(self, timer: TimerRow, now: datetime) -> Accepted | None:
        """Turn a due timer into a ``timer.fired`` event and delete it, atomically.

        Returns None when the timer is gone or has a newer generation.
        """

    # agents and routing ------------------------------------------------------------------
    @abc.abstractmethod
    async def upsert_agent(self, agent: AgentRecord) -> None: ...

    @abc.abstractmethod
    async def agent(self, agent_id: str) -> AgentRecord | None: ...

    @abc.abstractmethod
    async def set_presence(self, agent_id: str, presence: str, now: datetime) -> None: ...

    @abc.abstractmethod
    async def touch_agent_idle(self, agent_id: str, now: datetime) -> None:
        """Record that an agent became free, for longest-idle routing."""

    @abc.abstractmethod
    async def router_snapshot(self) -> RouterSnapshot: ...

    @abc.abstractmethod
    async def create_offer(self, offer: OfferRecord, now: datetime) -> Accepted:
        """Insert a pending offer and its ``agent.offered`` event together."""

    @abc.abstractmethod
    async def create_offers(
        self, offers: Sequence[OfferRecord], now: datetime
    ) -> list[Accepted | None]:
        """Insert pending offers and their ``agent.offered`` events in ONE transaction.

        One answer per offer, in order: None where the conversation is closed or unknown
        (that offer is not stored; the others are).
        """

    @abc.abstractmethod
    async def resolve_offer(
        self, offer_id: str, status: str, event_type: str, now: datetime
    ) -> Accepted | None:
        """Move a pending offer to accepted/declined/expired/cancelled with its event.

        Accepting also records the assignment (the agent's capacity is taken). Returns None
        if the offer was not pending any more.
        """

    @abc.abstractmethod
    async def offer(self, offer_id: str) -> OfferRecord | None: ...

    @abc.abstractmethod
    async def put_token(self, token_hash: str, role: str, subject: str, now: datetime) -> None: ...

    @abc.abstractmethod
    async def count(self, table: str) -> int:
        """Rows in one of the main tables (for tests, benchmarks and operators)."""

    @abc.abstractmethod
    async def token(self, token_hash: str) -> tuple[str, str] | None:
        """(role, subject) of a valid token."""

    # rules versions ----------------------------------------------------------------------
    @abc.abstractmethod
    async def save_rules_version(self, record: RulesVersion) -> bool:
        """Store a rules version that becomes current; False if that version was already
        stored (the first record of a version is kept: versions are content hashes)."""

    @abc.abstractmethod
    async def rules_versions(self) -> list[RulesVersion]:
        """Every stored version, newest first, without file contents (``files`` empty)."""

    @abc.abstractmethod
    async def rules_version(self, version: str) -> RulesVersion | None:
        """One stored version with its files, for a rollback."""

    # customers (Customer API) --------------------------------------------------------------
    @abc.abstractmethod
    async def create_customer(
        self,
        profile: Mapping[str, Any],
        identities: Sequence[Identity],
        now: datetime,
        idempotency: IdempotencyKey | None = None,
        *,
        notify: Notify | None = None,
    ) -> CustomerRecord | Replay:
        """Create a known customer with its profile fields (``PROFILE_FIELDS`` and ``custom``)
        and identities. Conflict if an identity or the external id is taken. With a key
        already used: the original answer (Replay), or a 422 for another request.

        Every write of a customer takes ``notify``: it is called inside the write's
        transaction with the ``CustomerChange`` (kinds in ``CHANGE_KINDS``) and its rows go
        into the outbox unclaimed and due at once, on the customer's lane (the row's
        conversation id is the customer id), so a change and its notifications commit
        together. A write that changes nothing (a replay, a repeated merge) notifies nobody."""

    @abc.abstractmethod
    async def customer(self, customer_id: str) -> CustomerRecord | None: ...

    @abc.abstractmethod
    async def update_customer(
        self,
        customer_id: str,
        changes: Mapping[str, Any],
        now: datetime,
        *,
        expected_version: int | None,
        notify: Notify | None = None,
    ) -> CustomerRecord:
        """Partial update: given fields replace (None clears), ``custom`` merges (None removes
        a key). A new email, phone or external id is also an identity and makes the customer
        known. NotFound; PreconditionFailed when ``expected_version`` is not the stored one."""

    @abc.abstractmethod
    async def delete_customer(
        self,
        customer_id: str,
        now: datetime,
        *,
        expected_version: int | None = None,
        notify: Notify | None = None,
    ) -> int:
        """Forget the profile and identities; the customer's conversations keep its id (a
        tombstone row stays then). Returns the tombstone's version; NotFound if absent."""

    @abc.abstractmethod
    async def list_customers(self, query: CustomerQuery) -> tuple[list[CustomerRecord], str | None]:
        """One page in id order, and the cursor of the next page (None at the end)."""

    @abc.abstractmethod
    async def lookup_customer(self, identity: Identity) -> CustomerRecord | None: ...

    @abc.abstractmethod
    async def attach_identity(
        self,
        customer_id: str,
        identity: Identity,
        now: datetime,
        idempotency: IdempotencyKey | None = None,
        *,
        notify: Notify | None = None,
    ) -> CustomerRecord | Replay:
        """Identify: add an identity (fills an empty email, phone or external id) and make the
        customer known. Conflict if another customer holds it."""

    @abc.abstractmethod
    async def customer_open_conversations(self, customer_id: str) -> list[str]: ...

    @abc.abstractmethod
    async def bulk_upsert_customers(
        self,
        lines: Sequence[tuple[int, Mapping[str, Any]]],
        now: datetime,
        *,
        notify: Notify | None = None,
        required_custom: Collection[str] = (),
    ) -> list[BulkOutcome]:
        """Upsert (line number, normalized fields with ``external_id``) by external id, in
        one transaction, each line atomic on its own: a failing line (an identity of
        another customer) changes nothing and is reported; a line equal to the stored
        profile is ``unchanged`` (so the same file twice changes nothing). A line that
        would create a customer without every key of ``required_custom`` fails with
        ``invalid_custom``. Updated lines carry their customer's open conversations."""

    @abc.abstractmethod
    async def merge_customers(
        self, into_id: str, from_id: str, now: datetime, *, notify: Notify | None = None
    ) -> MergeResult:
        """Move every identity and conversation of ``from_id`` to ``into_id`` (empty profile
        fields and custom keys of ``into_id`` are filled from it) and leave ``from_id`` as a
        tombstone pointing there. Merging the same pair again answers the first merge
        (``repeated``); a customer merged elsewhere is a 409 ``already_merged``."""

    @abc.abstractmethod
    async def merged_into(self, customer_id: str) -> str | None:
        """The customer a merged-away customer now lives in (following merge chains)."""

    @abc.abstractmethod
    async def merged_from(self, customer_id: str) -> list[str]:
        """The customers merged into this one, oldest merge first."""

    @abc.abstractmethod
    async def erase_customer(
        self, customer_id: str, now: datetime, marker: str, *, notify: Notify | None = None
    ) -> int:
        """Erasure: forget profile and identities and rewrite the customer's personal values
        wherever stored (messages, events, decision facts, outbox, conversation snapshots)
        with ``marker``; counts and states stay. Notifications on the lanes of the customer
        and of those merged into it keep only the customer's id. Returns the tombstone's
        version."""

    @abc.abstractmethod
    async def customer_schema(self, version: int | None = None) -> CustomerSchema | None:
        """The custom field schema in force (or an older ``version``); None if none."""

    @abc.abstractmethod
    async def save_customer_schema(
        self, document: Mapping[str, Any], now: datetime, *, expected_version: int | None
    ) -> tuple[CustomerSchema, bool]:
        """Store ``document`` as the next schema version, unless it equals the one in force
        (then that one, and False). PreconditionFailed when ``expected_version`` (0: no
        schema yet) is not the version in force."""

    @abc.abstractmethod
    async def customer_conversations(self, customer_id: str) -> list[dict[str, Any]]:
        """Summaries (id, channel, instance, endpoint, identity, state, created_at) of every
        conversation of the customer, oldest first (for an export)."""

    # apps (App API) ------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_app(self, app: AppRecord, token_hash: str) -> AppRecord:
        """Register an app and its first token (role ``app``, subject the app id) together.
        Conflict ``name_taken`` if a live app has that name."""

    @abc.abstractmethod
    async def app_record(self, app_id: str) -> AppRecord | None:
        """One app, deleted ones included (``deleted_at`` set)."""

    @abc.abstractmethod
    async def app_records(self, *, include_deleted: bool = False) -> list[AppRecord]:
        """Apps in creation order."""

    @abc.abstractmethod
    async def update_app(self, app_id: str, changes: Mapping[str, Any], now: datetime) -> AppRecord:
        """Change name, description, scopes, webhook_url, enabled or webhook_secret (given
        keys only). NotFound for an unknown app, Conflict ``app_deleted`` for a deleted one."""

    @abc.abstractmethod
    async def replace_app_token(self, app_id: str, token_hash: str, now: datetime) -> None:
        """Revoke every token of the app and store the new one, in one transaction."""

    @abc.abstractmethod
    async def delete_app(self, app_id: str, now: datetime, reason: str) -> int:
        """Revoke an app: tokens revoked, subscriptions deleted, pending deliveries (outbox rows
        to ``app:<id>``) dead with ``reason``; returns how many were cancelled."""

    @abc.abstractmethod
    async def add_app_subscription(self, subscription: AppSubscription) -> None: ...

    @abc.abstractmethod
    async def app_subscriptions(self, app_id: str | None = None) -> list[AppSubscription]:
        """Subscriptions of one app (or of every app), oldest first."""

    @abc.abstractmethod
    async def delete_app_subscriptions(self, app_id: str, subscription_ids: Sequence[str]) -> int:
        """Delete some of an app's subscriptions; returns how many existed."""

    # outbox rows by destination (an app's deliveries) ----------------------------------------
    @abc.abstractmethod
    async def outbox_entries(
        self,
        destination: str,
        *,
        status: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[OutboxEntry]:
        """Rows of one destination, newest first (``before_id``: the page after that row)."""

    @abc.abstractmethod
    async def outbox_entry(self, destination: str, event_id: str, n: int) -> OutboxEntry | None:
        """The row of a destination with this idempotency key (``event_id:n``)."""

    @abc.abstractmethod
    async def outbox_replay(self, row_id: int, now: datetime) -> bool:
        """Queue a dead row again (same row, same idempotency key, attempts from zero, due
        now); False if it is not dead."""

    # campaigns -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_campaign(
        self,
        campaign: CampaignRecord,
        recipients: Sequence[tuple[str, Mapping[str, Any]]],
        idempotency: IdempotencyKey | None = None,
    ) -> tuple[CampaignRecord, bool]:
        """Store a campaign and one pending recipient per customer (customer id, literal
        parameters), in audience order, in one transaction. A customer given twice is one
        recipient (the first one's parameters). Returns the campaign (``recipients`` set) and
        True; with a key already used: the campaign it created and False (a 422 for another
        request)."""

    @abc.abstractmethod
    async def campaign(self, campaign_id: str) -> CampaignRecord | None: ...

    @abc.abstractmethod
    async def campaigns(
        self,
        *,
        owner: str | None = None,
        statuses: Sequence[str] | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[CampaignRecord]:
        """Campaigns newest first (of one owner, in some statuses); ``before``: the page after
        that campaign id."""

    @abc.abstractmethod
    async def campaign_counts(self, campaign_id: str) -> dict[str, int]:
        """Recipients by status (``pending``, ``sent``, ... only the statuses present)."""

    @abc.abstractmethod
    async def set_campaign_status(
        self,
        campaign_id: str,
        status: str,
        *,
        allowed_from: Sequence[str],
        now: datetime,
        skip_pending: str | None = None,
    ) -> CampaignRecord | None:
        """Move a campaign to ``status`` if it is in one of ``allowed_from`` (None otherwise);
        with ``skip_pending``, its pending recipients become ``skipped`` with that reason, in
        the same transaction. NotFound for an unknown campaign."""

    @abc.abstractmethod
    async def campaign_batch(self, campaign_id: str, limit: int) -> list[CampaignWork]:
        """The next pending recipients in audience order, with their customers as stored
        now (None for a customer that is gone)."""

    @abc.abstractmethod
    async def campaign_send(
        self, campaign_id: str, customer_id: str, event: NewEvent, now: datetime
    ) -> CampaignSend:
        """One send, one transaction: if the campaign is running, the recipient pending and
        the customer not opted out, store ``event`` in the inbox (it opens or joins the
        conversation of its identity) and mark the recipient ``sent`` with its conversation
        and event. The customer gets the event's channel identity when nobody has it (a
        WhatsApp number reached through the profile's phone), so the conversation is theirs.
        Outcomes: ``sent``, ``opted_out`` and ``unknown_customer`` (the recipient is
        skipped), ``not_pending``, ``not_running``."""

    @abc.abstractmethod
    async def campaign_skip(
        self, campaign_id: str, customer_id: str, reason: str, now: datetime
    ) -> bool:
        """A pending recipient is skipped with ``reason``; False if it was not pending."""

    @abc.abstractmethod
    async def campaign_outcomes(self, outcomes: Sequence[CampaignOutcome], now: datetime) -> int:
        """Apply what happened after sends (delivered, read, failed, replied, moved), in one
        transaction; returns how many recipients changed. An outcome never moves a
        recipient back (read after replied keeps ``replied`` and records ``read_at``)."""

    @abc.abstractmethod
    async def campaign_recipients(
        self,
        campaign_id: str,
        *,
        status: str | None = None,
        limit: int = 50,
        after: int | None = None,
    ) -> list[CampaignRecipient]:
        """Recipients in audience order; ``after``: the page after that position."""

    @abc.abstractmethod
    async def add_opt_out(self, customer_id: str, source: str, now: datetime) -> bool:
        """Put a customer on the campaign opt-out list; False if it was there already."""

    @abc.abstractmethod
    async def remove_opt_out(self, customer_id: str) -> bool:
        """Take a customer off the opt-out list; False if it was not on it."""

    @abc.abstractmethod
    async def opt_outs(self, *, limit: int = 50, after: str | None = None) -> list[OptOut]:
        """The opt-out list in customer id order; ``after``: the page after that id."""


@dataclass(frozen=True, slots=True)
class RulesVersion:
    """A rules version that was in force: its files (path to content) and how it came."""

    version: str
    files: dict[str, str]
    loaded_at: datetime
    source: str  # "start", "watch", "api" or "rollback"


# customers ---------------------------------------------------------------------------------
PROFILE_FIELDS: tuple[str, ...] = ("name", "email", "phone", "language", "external_id")
# profile fields that are identities too (the customer can be looked up by them)
IDENTITY_FIELDS: dict[str, str] = {"email": "email", "phone": "phone", "external_id": "external"}


@dataclass(frozen=True, slots=True)
class Identity:
    """How a customer is recognised: ``kind`` (whatsapp, messenger, webchat, email, phone,
    external) and a normalized ``value`` (E.164 phones, lowercase emails)."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    id: str
    known: bool
    profile: dict[str, Any]  # PROFILE_FIELDS, None when unset
    custom: dict[str, Any]
    identities: tuple[Identity, ...]
    version: int
    created_at: datetime
    updated_at: datetime

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    def as_dict(self) -> dict[str, Any]:
        """The API's JSON shape (also stored as the answer of an idempotent write)."""
        return {
            "id": self.id,
            "known": self.known,
            **self.profile,
            "custom": dict(self.custom),
            "identities": [{"kind": i.kind, "value": i.value} for i in self.identities],
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class BulkOutcome:
    """What one bulk line did: created, updated, unchanged or failed (with code, message).
    ``conversations``: the open conversations of an updated line's customer, read in the
    write's transaction (they are told of the change after the commit)."""

    line: int
    outcome: str
    record: CustomerRecord | None
    code: str | None = None
    message: str | None = None
    conversations: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CustomerSchema:
    """A version of the custom profile field schema: the document an admin stored."""

    version: int
    document: dict[str, Any]
    created_at: datetime


# What a customer write can be, as subscribed apps are told (``profile.<kind>``).
CHANGE_KINDS: tuple[str, ...] = ("created", "updated", "identified", "merged", "deleted", "erased")


@dataclass(frozen=True, slots=True)
class CustomerChange:
    """One committed change of a customer, handed to ``Notify`` inside the write's
    transaction. ``record`` is the profile after the change (None for deleted and erased:
    those carry only the id); ``merged_from`` names the customer a merge absorbed."""

    kind: str  # one of CHANGE_KINDS
    customer_id: str
    version: int  # the customer's version after the change
    at: datetime
    record: CustomerRecord | None = None
    merged_from: str | None = None

    @property
    def notice_id(self) -> str:
        """The outbox ``event_id`` of its notifications: one per customer version."""
        return f"{self.customer_id}:v{self.version}"


# The outbox rows announcing a change (one per app that hears it). Pure and synchronous: it
# runs inside the store's transaction (on SQLite's writer thread).
Notify = Callable[[CustomerChange], Sequence[NewOutbox]]


def change_kind(before_known: bool, after: CustomerRecord) -> str:
    """``identified`` when an update made an anonymous customer known, else ``updated``."""
    return "identified" if not before_known and after.known else "updated"


@dataclass(frozen=True, slots=True)
class MergeResult:
    """A merge as recorded, with the surviving customer as it is now."""

    into_id: str
    from_id: str
    identities: int  # moved
    conversations: int  # moved
    merged_at: datetime
    record: CustomerRecord
    from_version: int  # the tombstone's version
    repeated: bool  # this pair was merged before: nothing changed now

    def as_dict(self) -> dict[str, Any]:
        return {
            "merge": {
                "from": self.from_id,
                "into": self.into_id,
                "identities": self.identities,
                "conversations": self.conversations,
                "merged_at": self.merged_at.isoformat(),
            },
            "customer": self.record.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class CustomerQuery:
    limit: int = 50
    cursor: str | None = None
    known: bool | None = None
    email: str | None = None
    phone: str | None = None
    external_id: str | None = None
    name_prefix: str | None = None
    updated_since: datetime | None = None  # changed at or after (a CRM's incremental sync)


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """An ``Idempotency-Key`` in its scope (principal and route) with the request's hash."""

    scope: str
    key: str
    request_hash: str


@dataclass(frozen=True, slots=True)
class Replay:
    """The answer first given for an idempotency key."""

    status: int
    body: dict[str, Any]


def channel_identity(channel: str, identity: str) -> Identity:
    """The identity a channel's user id stands for (WhatsApp ``wa_id`` digits → E.164)."""
    if channel == "whatsapp" and not identity.startswith("+"):
        return Identity(channel, "+" + identity)
    return Identity(channel, identity)


# apps --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AppRecord:
    """A registered third-party app. ``webhook_secret`` signs its deliveries; it is shown
    once (at creation and rotation) and never part of ``as_dict``."""

    id: str
    name: str
    description: str | None
    scopes: tuple[str, ...]
    webhook_url: str | None
    webhook_secret: str
    enabled: bool
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "scopes": list(self.scopes),
            "webhook_url": self.webhook_url,
            "enabled": self.enabled,
            "status": "deleted" if self.deleted_at else "enabled" if self.enabled else "disabled",
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "deleted_at": self.deleted_at.isoformat() if self.deleted_at else None,
        }


@dataclass(frozen=True, slots=True)
class AppSubscription:
    """An app's wish to receive events of these types (by signed webhook)."""

    id: str
    app_id: str
    event_types: tuple[str, ...]
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app_id": self.app_id,
            "event_types": list(self.event_types),
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An outbox row with its delivery state, as listed for operators and apps."""

    row: OutboxRow
    status: str  # pending, done or dead
    replays: int
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime
    done_at: datetime | None


# campaigns ---------------------------------------------------------------------------------
# What a recipient can become; ``skipped`` and ``failed`` carry a reason.
RECIPIENT_STATUSES: tuple[str, ...] = (
    "pending",
    "sent",
    "delivered",
    "read",
    "replied",
    "failed",
    "skipped",
)
CAMPAIGN_STATUSES: tuple[str, ...] = (
    "scheduled",
    "running",
    "paused",
    "completed",
    "expired",
    "cancelled",
)


@dataclass(frozen=True, slots=True)
class CampaignRecord:
    """An outbound campaign: a WhatsApp template sent to an audience at a rate, in a window.

    ``owner`` is ``admin`` or the id of the app that created it; ``template`` is ``{name,
    language, parameters}`` with ``{{ … }}`` placeholders filled per recipient; ``hours_*``
    is a daily window (``HH:MM``, the service's timezone)."""

    id: str
    name: str
    owner: str
    channel: str
    endpoint: str
    template: dict[str, Any]
    text: str | None
    audience: dict[str, Any]
    rate: float
    starts_at: datetime | None
    ends_at: datetime | None
    hours_from: str | None
    hours_to: str | None
    status: str
    recipients: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        hours = (
            {"from": self.hours_from, "to": self.hours_to}
            if self.hours_from and self.hours_to
            else None
        )
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "status": self.status,
            "channel": self.channel,
            "endpoint": self.endpoint,
            "template": self.template,
            "text": self.text,
            "audience": self.audience,
            "rate": self.rate,
            "window": {
                "starts_at": self.starts_at.isoformat() if self.starts_at else None,
                "ends_at": self.ends_at.isoformat() if self.ends_at else None,
                "hours": hours,
            },
            "recipients": self.recipients,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


@dataclass(frozen=True, slots=True)
class CampaignRecipient:
    """One customer of a campaign and what became of the message to them."""

    campaign_id: str
    customer_id: str
    position: int
    params: dict[str, Any]
    status: str
    reason: str | None = None
    conversation_id: str | None = None
    event_id: str | None = None
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    replied_at: datetime | None = None
    failed_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "customer_id": self.customer_id,
            "position": self.position,
            "status": self.status,
            "reason": self.reason,
            "conversation_id": self.conversation_id,
            "event_id": self.event_id,
            "params": self.params,
            "sent_at": iso(self.sent_at),
            "delivered_at": iso(self.delivered_at),
            "read_at": iso(self.read_at),
            "replied_at": iso(self.replied_at),
            "failed_at": iso(self.failed_at),
        }


@dataclass(frozen=True, slots=True)
class CampaignWork:
    """A pending recipient with its customer as stored now (None: the customer is gone)."""

    recipient: CampaignRecipient
    customer: CustomerRecord | None


@dataclass(frozen=True, slots=True)
class CampaignSend:
    """What one send did: ``sent`` (with the inbox's answer), ``opted_out``, ``not_pending``
    or ``not_running``."""

    outcome: str
    accepted: Accepted | None = None


@dataclass(frozen=True, slots=True)
class CampaignOutcome:
    """Something that happened after a send, for ``Store.campaign_outcomes``.

    ``kind``: ``delivered``, ``read`` or ``failed`` (of the message the send's event made:
    ``event_id``; ``failed`` with ``reason``), ``replied`` (the customer wrote in the
    recipient's conversation: ``campaign_id``, ``conversation_id``), or ``moved`` (the send's
    event found its conversation closed and moved to a new one: ``campaign_id``,
    ``customer_id``, the new ``conversation_id`` and ``event_id``)."""

    kind: str
    at: datetime
    event_id: str | None = None
    campaign_id: str | None = None
    conversation_id: str | None = None
    customer_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class OptOut:
    """A customer who asked not to receive campaigns (``source``: who recorded it)."""

    customer_id: str
    source: str
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "source": self.source,
            "created_at": self.created_at.isoformat(),
        }
