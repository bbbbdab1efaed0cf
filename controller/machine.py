"""The conversation state machine and ``apply``: event + fired rules → the next snapshot.

``apply`` is pure: no I/O, no awaits, no clock other than the event's accepted time. It
returns a DecisionRecord that the worker commits in one transaction. One ConversationMachine
object is bound to a small holder and reused for every conversation (building one per event
costs more than the HTTP request; see notes/python-statemachine.md).

``closed`` is final. Reaching a final state stops python-statemachine's engine for good, so
the machine object is rebuilt after a conversation closes (once per conversation lifetime).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from statemachine import State, StateMachine
from statemachine.exceptions import TransitionNotAllowed

from controller.models import (
    Action,
    Assign,
    CancelTimer,
    Close,
    Conversation,
    Event,
    InviteApp,
    InviteBot,
    Label,
    NewEvent,
    Participant,
    RemoveParticipant,
    Route,
    Send,
    SetAttributes,
    SetBotMode,
    StartTimer,
    Stop,
    TimerRef,
    Transfer,
    Unlabel,
    Whisper,
)
from controller.rulebook import FiredRule
from controller.store.base import DecisionRecord, Message, NewOutbox, TimerOp

log = structlog.get_logger(__name__)


# Messages that reach a closed conversation: the customer's move to a new conversation,
# the others are dropped (see Decider._after_close). No rule runs for them there.
MESSAGES_AFTER_CLOSE = frozenset({"customer.message", "bot.message", "agent.message"})


class _Holder:
    """What the machine is bound to: the state value and the guard inputs."""

    def __init__(self) -> None:
        self.state: str = "new"
        self.handled_by_agent = False


class ConversationMachine(StateMachine):
    """States and guarded transitions of a conversation (see docs/architecture.md)."""

    new = State(initial=True)
    bot = State()
    queued = State()
    agent = State()
    wrap_up = State()
    closed = State(final=True)

    invite_bot = new.to(bot) | queued.to(bot)
    route = new.to(queued) | bot.to(queued) | agent.to(queued) | queued.to(queued)
    accept = queued.to(agent)
    assign = new.to(agent) | bot.to(agent) | queued.to(agent) | agent.to(agent)
    transfer_to_queue = agent.to(queued)
    transfer_to_agent = agent.to(agent)
    close = (
        new.to(wrap_up, cond="handled_by_agent")
        | new.to(closed)
        | bot.to(wrap_up, cond="handled_by_agent")
        | bot.to(closed)
        | queued.to(wrap_up, cond="handled_by_agent")
        | queued.to(closed)
        | agent.to(wrap_up)
        | wrap_up.to(closed)
    )
    finish_wrap_up = wrap_up.to(closed)


def _copy(conv: Conversation) -> Conversation:
    """A copy whose mutable parts ``apply`` may change (cheaper than a deep copy: timer refs
    and attribute values are replaced, never changed in place)."""
    return conv.model_copy(
        update={
            "participants": [p.model_copy() for p in conv.participants],
            "skills": list(conv.skills),
            "attributes": dict(conv.attributes),
            "labels": list(conv.labels),
            "timers": dict(conv.timers),
            "timer_generations": dict(conv.timer_generations),
        }
    )


def _content(data: dict[str, Any]) -> dict[str, Any] | None:
    """What a bot message shows besides text: buttons (``{"id", "title"}``) and an image."""
    content: dict[str, Any] = {}
    buttons = [
        {"id": str(b.get("payload") or b.get("id") or b["title"]), "title": str(b["title"])}
        for b in data.get("buttons") or ()
        if isinstance(b, dict) and b.get("title")
    ]
    if buttons:
        content["buttons"] = buttons
    image = data.get("image")
    if isinstance(image, str) and image:
        content["image"] = image
    return content or None


def _template_content(template: Any, language: str) -> dict[str, Any] | None:
    """Transcript content for a message sent as a WhatsApp template (an event's
    ``template``); its language defaults to the conversation's."""
    if not isinstance(template, dict):
        return None
    return {"template": {**template, "language": template.get("language") or language}}


class Refused(Exception):
    """An action or event that the conversation's state does not allow."""


@dataclass
class _Work:
    conv: Conversation
    event: Event
    now: datetime
    record: DecisionRecord
    bot_mode_kept: bool = False
    route_or_close: bool = False
    seq: int = 0
    released: set[str] = field(default_factory=set)
    assigned: set[str] = field(default_factory=set)

    def next_id(self) -> str:
        self.seq += 1
        return f"{self.event.id}.{self.seq}"


class Decider:
    """Applies events and rule actions to snapshots through one rebindable machine."""

    def __init__(self) -> None:
        self._holder = _Holder()
        self._machine = ConversationMachine(model=self._holder)

    def transition(self, conv: Conversation, trigger: str) -> None:
        """Fire a machine trigger for ``conv``; raises Refused when not allowed."""
        holder = self._holder
        holder.state = conv.state
        holder.handled_by_agent = conv.handled_by_agent
        try:
            self._machine.send(trigger)
        except TransitionNotAllowed as exc:
            raise Refused(f"{trigger} is not allowed in state {conv.state}") from exc
        conv.state = holder.state  # type: ignore[assignment]
        if self._machine.is_terminated:
            self._machine = ConversationMachine(model=self._holder)

    def apply(
        self,
        snapshot: Conversation,
        event: Event,
        fired: Sequence[FiredRule],
        *,
        rules_version: str,
        matcher: str,
    ) -> DecisionRecord:
        conv = _copy(snapshot)
        now = event.accepted_at
        work = _Work(
            conv=conv,
            event=event,
            now=now,
            record=DecisionRecord(
                event=event,
                before_version=snapshot.version,
                after=conv,
                rules_version=rules_version,
                matcher=matcher,
            ),
        )
        try:
            self._apply_event(work)
        except Refused as exc:
            log.info("event_refused", type=event.type, reason=str(exc), state=conv.state)
            work.record.refused.append(
                {"rule": None, "action": f"event:{event.type}", "reason": str(exc)}
            )
        for fired_rule in fired:
            work.record.fired.append(
                {
                    "rule": fired_rule.rule,
                    "actions": [a.model_dump(mode="json") for a in fired_rule.actions],
                }
            )
            # Every log line while this rule's actions apply carries the rule's name.
            with structlog.contextvars.bound_contextvars(rule=fired_rule.rule):
                for action in fired_rule.actions:
                    try:
                        self._apply_action(work, action)
                    except Refused as exc:
                        log.warning(
                            "action_refused",
                            action=action.kind,
                            reason=str(exc),
                            state=conv.state,
                        )
                        work.record.refused.append(
                            {"rule": fired_rule.rule, "action": action.kind, "reason": str(exc)}
                        )
        self._check_attended(work)
        if conv.state == "closed":
            work.record.timers = [op for op in work.record.timers if op.due_at is None]
            conv.timers = {}
        work.record.released_agents = sorted(work.released - work.assigned)
        work.record.assigned_agents = sorted(work.assigned)
        return work.record

    def unchanged(
        self, snapshot: Conversation, event: Event, *, rules_version: str, outcome: str
    ) -> DecisionRecord:
        """A record that changes nothing: a stale timer, or a decision that failed."""
        return DecisionRecord(
            event=event,
            before_version=snapshot.version,
            after=_copy(snapshot),
            rules_version=rules_version,
            matcher="none",
            outcome=outcome,
        )

    # events --------------------------------------------------------------------------------
    def _apply_event(self, w: _Work) -> None:
        conv, ev, data = w.conv, w.event, w.event.data
        kind = ev.type
        conv.last_activity_at = w.now
        if conv.state == "closed" and kind in MESSAGES_AFTER_CLOSE:
            self._after_close(w)
        elif kind == "customer.message":
            self._customer_present(w, True)
            conv.last_customer_message_at = w.now
            text = str(data.get("text", ""))
            msg = self._transcript(w, "customer", conv.customer_id, text)
            for p in conv.participants:
                if p.role == "bot":
                    self._ask_bot(w, p)
            # The desk frame carries the transcript's id, so a desk loading the history while
            # this frame arrives shows the message once.
            self._to_agents(w, "message", "customer", conv.customer_id, text, message_id=msg.id)
        elif kind == "customer.disconnected":
            self._customer_present(w, False)
        elif kind == "customer.returned":
            self._customer_present(w, True)
        elif kind == "bot.message":
            bot = self._answering_bot(w)
            text = str(data.get("text", ""))
            content = _content(data)
            if not text and content is None:
                pass  # a custom payload only: for the rules, never shown
            elif bot.mode == "direct" and bot.primary:
                msg = self._transcript(w, "bot", bot.id, text, content=content)
                self._to_customer(w, msg)
                self._to_agents(w, "message", "bot", bot.id, text, message_id=msg.id)
            else:
                self._to_agents(w, "suggestion", "bot", bot.id, text, message_id=None)
        elif kind in ("bot.handoff", "bot.ended"):
            bot = self._answering_bot(w)
            if not (bot.mode == "direct" and bot.primary):
                raise Refused(f"bot {bot.id} is assisting; only the serving bot hands over or ends")
        elif kind == "bot.failed":
            if conv.find("bot", str(data.get("bot", ""))) is None:
                raise Refused("the bot is no longer in the conversation")
        elif kind == "agent.accepted":
            agent_id = str(data.get("agent_id"))
            try:
                self.transition(conv, "accept")
            except Refused:
                w.released.add(agent_id)
                raise
            self._add_agent(w, agent_id, primary=True)
        elif kind == "agent.message" and data.get("to") == "agents":
            agent_id = str(data.get("agent_id"))
            if conv.find("agent", agent_id) is None:
                raise Refused(f"agent {agent_id} is not in the conversation")
            text = str(data.get("text", ""))
            self._to_agents(w, "whisper", "agent", agent_id, text, message_id=None)
        elif kind == "agent.closed":
            agent_id = str(data.get("agent_id"))
            if conv.find("agent", agent_id) is None:
                raise Refused(f"agent {agent_id} is not in the conversation")
            self._apply_action(w, Close(reason=str(data.get("reason") or "agent_closed")))
            if conv.state == "wrap_up":
                note = f"{agent_id} closed the conversation: wrap-up"
                self._to_agents(w, "system", "controller", "controller", note, message_id=None)
        elif kind == "agent.invited":
            inviter, invited = str(data.get("agent_id")), str(data.get("to_agent"))
            if conv.find("agent", inviter) is None:
                raise Refused(f"agent {inviter} is not in the conversation")
            if conv.find("agent", invited) is None:
                self.transition(conv, "assign")  # agent → agent: a secondary agent joins
                self._add_agent(w, invited, primary=False)
                w.assigned.add(invited)
                note = f"{inviter} invited {invited} to the conversation"
                self._to_agents(w, "system", "controller", "controller", note, message_id=None)
        elif kind == "agent.message":
            agent_id = str(data.get("agent_id"))
            if conv.find("agent", agent_id) is None:
                raise Refused(f"agent {agent_id} is not in the conversation")
            msg = self._transcript(w, "agent", agent_id, str(data.get("text", "")))
            self._to_customer(w, msg)
            self._to_agents(
                w, "message", "agent", agent_id, msg.text, message_id=msg.id, exclude=agent_id
            )
        elif kind == "app.joined":
            if conv.find("app", str(data.get("app"))) is None:
                self._add_app(w, str(data.get("app")))
        elif kind == "app.left":
            self._remove(w, "app", str(data.get("app")), emit=False)
        elif kind == "app.event":
            self._app_event(w, str(data.get("app")))
        elif kind == "agent.outbound":
            self._outbound(w, str(data.get("agent_id")), str(data.get("text", "")))
        elif kind == "campaign.message":
            self._campaign_message(w)
        elif kind == "agent.transferred":
            self._transfer(w, str(data.get("agent_id")), data.get("to_queue"), data.get("to_agent"))
        elif kind == "agent.left":
            self._remove(w, "agent", str(data.get("agent_id")), emit=False)
        elif kind in ("agent.disconnected", "agent.reconnected"):
            agent = conv.find("agent", str(data.get("agent_id")))
            if agent is not None:
                agent.present = kind == "agent.reconnected"
        elif kind == "agent.wrap_up_done":
            conv.attributes["disposition"] = data.get("disposition")
            self.transition(conv, "finish_wrap_up")
            self._release_all(w)
        elif kind == "timer.fired":
            conv.timers.pop(str(data.get("name")), None)

    def _ask_bot(self, w: _Work, bot: Participant) -> None:
        """The customer message being decided goes to a bot of the conversation."""
        conv, ev, data = w.conv, w.event, w.event.data
        # A tapped button or quick reply goes to the bot as its payload (what the bot
        # offered), the customer's transcript keeps the title they saw.
        asked = str(data.get("reply_id") or data.get("payload") or data.get("text", ""))
        self._outbox(
            w,
            f"bot:{bot.id}",
            {
                "bot": bot.id,
                "mode": bot.mode,
                "text": asked,
                "reply_to_seq": ev.seq,
                "language": conv.language,
                "channel": conv.channel,
                "customer_id": conv.customer_id,
                "attributes": {
                    k: v if isinstance(v, str) else json.dumps(v)
                    for k, v in conv.attributes.items()
                },
            },
        )

    def _campaign_message(self, w: _Work) -> None:
        """An outbound campaign's message (a template): it goes out like a message of the
        controller, and the conversation remembers the campaign (``attributes.campaign``) so
        the rules know who is answering. Nobody joins: the conversation stays ``new`` until
        the customer replies and the rules take over.

        A conversation closed between the send and this decision does not take it: it moves
        to a new conversation of the same customer, as a customer message would."""
        conv, ev, data = w.conv, w.event, w.event.data
        if conv.state == "closed":
            w.record.emitted.append(
                NewEvent(
                    type="campaign.message",
                    source="controller",
                    dedupe_key=f"{ev.id}:after-close",
                    channel=conv.channel,
                    instance=conv.instance,
                    endpoint=conv.endpoint,
                    identity=conv.identity,
                    data={**data, "moved_from": conv.id},
                )
            )
            return
        campaign = str(data.get("campaign_id", ""))
        attributes = {**conv.attributes, "campaign": campaign}
        if conv.state == "new":
            attributes.setdefault("direction", "outbound")
        conv.attributes = attributes
        content = _template_content(data.get("template"), conv.language)
        text = str(data.get("text", ""))
        sender = f"campaign:{campaign}"
        msg = self._transcript(w, "controller", sender, text, content=content)
        self._to_customer(w, msg)
        self._to_agents(w, "message", "controller", sender, text, message_id=msg.id)

    def _add_app(self, w: _Work, app: str) -> None:
        w.conv.participants.append(Participant(role="app", id=app, joined_at=w.now))

    def _app_event(self, w: _Work, app: str) -> None:
        """What an app in the conversation did: a message (to the customer, or to the agents
        only), attributes set, or a custom event only the rules read."""
        conv, data = w.conv, w.event.data
        if conv.find("app", app) is None:
            raise Refused(f"app {app} is not in the conversation")
        action = data.get("action")
        if action == "message":
            text = str(data.get("text", ""))
            if data.get("to") == "agents":
                self._to_agents(w, "whisper", "app", app, text, message_id=None)
                return
            content = _content(data)
            msg = self._transcript(w, "app", app, text, content=content)
            self._to_customer(w, msg)
            self._to_agents(w, "message", "app", app, text, message_id=msg.id)
        elif action == "set":
            values = data.get("attributes")
            if isinstance(values, dict):
                conv.attributes = {**conv.attributes, **values}

    def _outbound(self, w: _Work, agent_id: str, text: str) -> None:
        """An agent writes first: the agent serves the conversation and the message goes out
        (as a template where the channel needs one and the agent gave it)."""
        conv = w.conv
        if conv.find("agent", agent_id) is None:
            if conv.state != "new":
                raise Refused(f"the conversation is {conv.state} with someone else")
            self.transition(conv, "assign")
            self._add_agent(w, agent_id, primary=True)
            w.assigned.add(agent_id)
            conv.attributes = {**conv.attributes, "direction": "outbound"}
        content = _template_content(w.event.data.get("template"), conv.language)
        msg = self._transcript(w, "agent", agent_id, text, content=content)
        self._to_customer(w, msg)
        self._to_agents(w, "message", "agent", agent_id, text, message_id=msg.id, exclude=agent_id)

    def _answering_bot(self, w: _Work) -> Participant:
        """The bot an answer comes from; refuses an answer the conversation has moved past.

        Answers carry the sequence number of the customer message they answer; once a bot has
        answered a newer message, an answer to an older one is late and dropped. What the bot
        asks to keep (session attributes) is merged into the conversation's attributes.
        """
        conv, data = w.conv, w.event.data
        bot = conv.find("bot", str(data.get("bot", "")))
        if bot is None:
            raise Refused("the bot is no longer in the conversation; its answer is dropped")
        seq = data.get("reply_to_seq")
        if isinstance(seq, int):
            if seq < bot.answered_seq:
                raise Refused(
                    f"late answer to message {seq}: bot {bot.id} has answered {bot.answered_seq}"
                )
            bot.answered_seq = seq
        attributes = data.get("attributes")
        if isinstance(attributes, dict) and attributes:
            conv.attributes = {**conv.attributes, **attributes}
        return bot

    def _transfer(self, w: _Work, agent_id: str, to_queue: Any, to_agent: Any) -> None:
        """An agent hands the conversation on, to a queue or to another agent, and leaves."""
        conv = w.conv
        if conv.find("agent", agent_id) is None:
            raise Refused(f"agent {agent_id} is not in the conversation")
        if to_queue:
            self.transition(conv, "transfer_to_queue")
            self._leave_for_queue(w)
            conv.queue = str(to_queue)
            conv.enqueued_at = w.now
        else:
            self.transition(conv, "transfer_to_agent")
            self._remove(w, "agent", agent_id, emit=True, reason="transferred")
            self._add_agent(w, str(to_agent), primary=True)
            w.assigned.add(str(to_agent))
            note = f"{agent_id} transferred the conversation to {to_agent}"
            self._to_agents(w, "system", "controller", "controller", note, message_id=None)
        w.route_or_close = True

    def _after_close(self, w: _Work) -> None:
        """A message that reached a conversation closed just before it was decided.

        The customer's message starts a new conversation (linked to this one), exactly as if
        it had arrived a moment later; a bot's or agent's late message is dropped.
        """
        conv, ev = w.conv, w.event
        if ev.type != "customer.message":
            raise Refused("the conversation is closed; the late message is dropped")
        w.record.emitted.append(
            NewEvent(
                type="customer.message",
                source="controller",
                dedupe_key=f"{ev.id}:after-close",
                channel=conv.channel,
                instance=conv.instance,
                endpoint=conv.endpoint,
                identity=conv.identity,
                data={**ev.data, "moved_from": conv.id},
            )
        )

    # actions -------------------------------------------------------------------------------
    def _apply_action(self, w: _Work, action: Action) -> None:
        conv = w.conv
        if conv.state == "closed" and not isinstance(action, Stop):
            raise Refused("the conversation is closed")
        if isinstance(action, InviteBot):
            if conv.find("bot", action.bot) is not None:
                raise Refused(f"bot {action.bot} is already in the conversation")
            if action.mode == "direct":
                self.transition(conv, "invite_bot")
            bot = Participant(
                role="bot",
                id=action.bot,
                mode=action.mode,
                primary=action.mode == "direct",
                joined_at=w.now,
            )
            conv.participants.append(bot)
            if w.event.type == "customer.message":
                # Invited because of this message (say, a reply to a campaign): the bot
                # answers it, as if it had been there when it came.
                self._ask_bot(w, bot)
        elif isinstance(action, InviteApp):
            if conv.find("app", action.app) is not None:
                raise Refused(f"app {action.app} is already in the conversation")
            self._add_app(w, action.app)
            self._emit(w, "app.joined", {"app": action.app, "by": "rules"})
        elif isinstance(action, SetBotMode):
            bots = [p for p in conv.participants if p.role == "bot"]
            if action.bot is not None:
                bots = [p for p in bots if p.id == action.bot]
            if not bots:
                raise Refused("no bot in the conversation")
            for p in bots:
                p.mode = action.mode
                p.primary = action.mode == "direct" and conv.state == "bot"
            w.bot_mode_kept = action.mode == "assist"
        elif isinstance(action, RemoveParticipant):
            targets = [
                p
                for p in conv.participants
                if p.role == action.role and (action.id is None or p.id == action.id)
            ]
            if not targets:
                raise Refused(f"no {action.role} to remove")
            for p in targets:
                self._remove(w, p.role, p.id, emit=True, reason=action.reason)
        elif isinstance(action, Route):
            self.transition(conv, "route")
            self._leave_for_queue(w)
            was_queued_here = conv.queue == action.queue and conv.enqueued_at is not None
            conv.queue = action.queue
            conv.priority = action.priority
            conv.skills = list(action.skills)
            if not was_queued_here:
                conv.enqueued_at = w.now
            w.route_or_close = True
        elif isinstance(action, Assign):
            self.transition(conv, "assign")
            self._drop_direct_bot(w)
            self._add_agent(w, action.agent, primary=conv.primary is None)
            w.assigned.add(action.agent)
        elif isinstance(action, Transfer):
            if action.queue is not None:
                self.transition(conv, "transfer_to_queue")
                self._leave_for_queue(w)
                conv.queue = action.queue
                conv.enqueued_at = w.now
            elif action.agent is not None:
                self.transition(conv, "transfer_to_agent")
                for p in list(conv.participants):
                    if p.role == "agent" and p.primary:
                        self._remove(w, "agent", p.id, emit=True, reason="transferred")
                self._add_agent(w, action.agent, primary=True)
                w.assigned.add(action.agent)
            else:
                raise Refused("transfer needs a queue or an agent")
            w.route_or_close = True
        elif isinstance(action, Send):
            if action.to == "customer":
                content: dict[str, Any] = {}
                if action.buttons:
                    content["buttons"] = [
                        {"id": b.payload or b.title, "title": b.title} for b in action.buttons
                    ]
                if action.template is not None:
                    template = action.template.model_dump(mode="json")
                    content.update(_template_content(template, conv.language) or {})
                msg = self._transcript(
                    w, "controller", "controller", action.text, content=content or None
                )
                self._to_customer(w, msg)
                self._to_agents(
                    w, "message", "controller", "controller", action.text, message_id=msg.id
                )
            else:
                self._to_agents(
                    w, "system", "controller", "controller", action.text, message_id=None
                )
        elif isinstance(action, Whisper):
            self._to_agents(w, "whisper", "controller", "controller", action.text, message_id=None)
        elif isinstance(action, StartTimer):
            generation = conv.timer_generations.get(action.name, 0) + 1
            due = w.now + timedelta(seconds=action.after)
            conv.timers[action.name] = TimerRef(generation=generation, due_at=due)
            conv.timer_generations[action.name] = generation
            w.record.timers.append(TimerOp(action.name, generation, due))
        elif isinstance(action, CancelTimer):
            if conv.timers.pop(action.name, None) is not None:
                w.record.timers.append(TimerOp(action.name, 0, None))
        elif isinstance(action, SetAttributes):
            conv.attributes.update(action.values)
        elif isinstance(action, Label):
            if action.label not in conv.labels:
                conv.labels.append(action.label)
        elif isinstance(action, Unlabel):
            if action.label in conv.labels:
                conv.labels.remove(action.label)
        elif isinstance(action, Close):
            self.transition(conv, "close")
            conv.close_reason = action.reason
            w.route_or_close = True
            conv.enqueued_at = None
            if conv.state == "closed":
                self._release_all(w)
            self._emit(w, "conversation.closed", {"reason": action.reason, "state": conv.state})
        elif isinstance(action, Stop):
            pass
        else:  # pragma: no cover - the Action union is closed
            raise Refused(f"unknown action {action!r}")

    # pieces --------------------------------------------------------------------------------
    def _customer_present(self, w: _Work, present: bool) -> None:
        w.conv.customer_present = present

    def _add_agent(self, w: _Work, agent_id: str, *, primary: bool) -> None:
        conv = w.conv
        existing = conv.find("agent", agent_id)
        if existing is not None:
            existing.present = True
            existing.primary = existing.primary or primary
            return
        if primary:
            self._drop_direct_bot(w)
        conv.participants.append(
            Participant(role="agent", id=agent_id, primary=primary, joined_at=w.now)
        )
        conv.handled_by_agent = True
        conv.enqueued_at = None

    def _drop_direct_bot(self, w: _Work) -> None:
        for p in list(w.conv.participants):
            if p.role == "bot" and p.mode == "direct":
                if w.bot_mode_kept:
                    p.mode = "assist"
                    p.primary = False
                else:
                    w.conv.participants.remove(p)

    def _leave_for_queue(self, w: _Work) -> None:
        """Entering the queue: a direct bot leaves (or stays as assistant), agents leave."""
        self._drop_direct_bot(w)
        for p in list(w.conv.participants):
            if p.role == "agent":
                self._remove(w, "agent", p.id, emit=True, reason="rerouted")

    def _remove(
        self, w: _Work, role: str, participant_id: str, *, emit: bool, reason: str = "left"
    ) -> None:
        conv = w.conv
        p = conv.find(role, participant_id)  # type: ignore[arg-type]
        if p is None:
            if emit:
                raise Refused(f"{role} {participant_id} is not in the conversation")
            if role == "agent":
                w.released.add(participant_id)
            return
        conv.participants.remove(p)
        if role == "agent":
            w.released.add(participant_id)
            if p.primary:
                # In a conference the agent who stays serves the customer from now on.
                stays = next((a for a in conv.participants if a.role == "agent"), None)
                if stays is not None:
                    stays.primary = True
        if emit:
            self._emit(w, f"{role}.left", {f"{role}_id": participant_id, "reason": reason})

    def _release_all(self, w: _Work) -> None:
        for p in w.conv.participants:
            if p.role == "agent":
                w.released.add(p.id)

    def _check_attended(self, w: _Work) -> None:
        conv = w.conv
        if (
            conv.state in ("bot", "agent")
            and conv.primary is None
            and not w.route_or_close
            and w.event.type != "conversation.unattended"
        ):
            self._emit(w, "conversation.unattended", {"state": conv.state})

    def _transcript(
        self,
        w: _Work,
        role: str,
        sender: str,
        text: str,
        visibility: str = "all",
        content: dict[str, Any] | None = None,
    ) -> Message:
        msg = Message(
            id=w.next_id(),
            conversation_id=w.conv.id,
            sender_role=role,
            sender_id=sender,
            text=text,
            created_at=w.now,
            visibility=visibility,
            content=content,
        )
        w.record.messages.append(msg)
        return msg

    def _to_customer(self, w: _Work, msg: Message) -> None:
        conv = w.conv
        self._outbox(
            w,
            f"channel:{conv.instance}",
            {
                "endpoint": conv.endpoint,
                "identity": conv.identity,
                "customer_last_at": (
                    conv.last_customer_message_at.isoformat()
                    if conv.last_customer_message_at
                    else None
                ),
                "message": {
                    "id": msg.id,
                    "from": msg.sender_role,
                    "sender_id": msg.sender_id,
                    "text": msg.text,
                    "at": msg.created_at.isoformat(),
                    **(msg.content or {}),
                },
            },
        )

    def _to_agents(
        self,
        w: _Work,
        kind: str,
        role: str,
        sender: str,
        text: str,
        *,
        message_id: str | None,
        exclude: str | None = None,
    ) -> None:
        agents = [p.id for p in w.conv.participants if p.role == "agent" and p.id != exclude]
        if not agents:
            return
        if kind in ("suggestion", "whisper", "system"):
            message_id = self._transcript(w, role, sender, text, visibility="agents").id
        self._outbox(
            w,
            "desk",
            {
                "agents": agents,
                "kind": kind,
                "message": {
                    "id": message_id or w.next_id(),
                    "from": role,
                    "sender_id": sender,
                    "text": text,
                    "at": w.now.isoformat(),
                },
            },
        )

    def _outbox(self, w: _Work, destination: str, payload: dict[str, Any]) -> None:
        payload = {"conversation_id": w.conv.id, **payload}
        w.record.outbox.append(NewOutbox(destination, payload))

    def _emit(self, w: _Work, kind: str, data: dict[str, Any]) -> None:
        n = len(w.record.emitted)
        w.record.emitted.append(
            NewEvent(
                type=kind,  # type: ignore[arg-type]
                source="controller",
                dedupe_key=f"{w.event.id}:{n}",
                conversation_id=w.conv.id,
                data=data,
            )
        )
