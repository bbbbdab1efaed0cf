"""Rule scenarios: play conversations against the rules on a simulated clock, check outcomes.

``convctl rules test`` runs scenario files (YAML, in ``rules/tests/`` by default) in process:
the Rulebook decides, the Decider applies, ``build_facts`` builds the facts, exactly as the
worker does, but with no store, no network and no sleeping, so a 30-minute timeout takes
milliseconds. Analysts can check a rule change against whole journeys before it ships.

Semantics (also in rules/README.md, "Testing rules with scenarios"):

- A scenario starts from a snapshot (``conversation:``; defaults for everything not given)
  at a fixed instant (``start``, default 2026-01-05T09:00:00+00:00, a Monday). Rules see
  that simulated time in ``now.*`` and in ``conversation.age`` / ``idle``.
- Steps run in order. ``at`` is the time since the start (``90s``, ``5m``, ``1h30m`` or a
  number of seconds; default: the previous step's time) and never goes back.
- Before a step's event, the clock moves to ``at``: every timer due by then fires, in
  due-time order (ties by name), as ``timer.fired {name, generation}`` at its due time.
  A firing whose generation is no longer the conversation's (restarted, cancelled, or the
  conversation closed) is dropped unseen, as the worker drops stale timers.
- An event (``event`` + ``data``) is decided at ``at``; the events a decision emits
  (``conversation.closed``, ``conversation.unattended``, ``agent.left``...) are decided right
  after it, first emitted first, as the service does. A step may have no event: only time
  passes.
- ``expect`` keys are optional; each one given is checked exactly: ``rules`` (rules fired by
  the step's own event, in order), ``fired`` (timers that fired before the event, in order,
  each a name or ``{timer, rules}``), ``emitted`` (types of the events emitted during the
  step, in order, each a type or ``{event, rules}``), ``state``, ``timers`` (running timers
  after the step, any order), ``sent`` (texts sent to the customer during the step, in order,
  fnmatch patterns; bot, agent and rule messages), ``refused`` (kinds of refused actions,
  ``event:TYPE`` for a refused event), ``attributes`` (the listed attributes have these
  values; ``null`` means absent), ``labels`` (any order), ``queue``, ``priority`` (a number
  or low/normal/high/urgent).
- ``settings`` overrides the configured timeout settings for one scenario (``idle_reminder:
  5m``), so a scenario's timings do not depend on the deployment's configuration.
"""

from __future__ import annotations

import fnmatch
import heapq
import re
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from controller.errors import ConvctlError
from controller.facts import build_facts
from controller.machine import Decider
from controller.models import (
    EVENT_TYPES,
    Conversation,
    ConversationState,
    Event,
    EventType,
    NewEvent,
    Participant,
    ParticipantMode,
    ParticipantRole,
    TimerRef,
)
from controller.models.actions import PRIORITY_NAMES
from controller.rulebook import Matcher, Rulebook
from controller.rulebook.source import SourceFile, did_you_mean, syntax_error_where
from controller.settings import Settings, TimeoutSettings
from controller.store.base import DecisionRecord

DEFAULT_START = datetime.fromisoformat("2026-01-05T09:00:00+00:00")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
_CONVERSATION_ID = "cv_scenario"
MAX_EVENTS_PER_STEP = 1000  # a rule that restarts a zero-length timer on its firing loops


class _Runaway(Exception):
    """A step decided too many events: timers or emitted events feed each other."""


class ScenarioError(ConvctlError):
    """Scenario files are invalid; ``errors`` lists every problem as ``file:line:col: ...``."""

    code = "scenario_error"

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors) if errors else "invalid scenarios")
        self.errors = errors


# ---------------------------------------------------------------------------- file format


def _seconds(value: Any) -> Any:
    """A duration as seconds: a number, or text like ``90s``, ``5m``, ``1h30m``."""
    if isinstance(value, bool):
        raise ValueError("a duration is seconds or text like '90s', '5m', '1h30m'")
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if not value.strip() or match is None:
            raise ValueError(f"invalid duration {value!r}; use seconds, '90s', '5m', '1h30m'")
        hours, minutes, seconds = (float(group) if group else 0.0 for group in match.groups())
        return hours * 3600 + minutes * 60 + seconds
    return value


def _priority(value: Any) -> Any:
    """A priority as its number; names as the rules use them (``high`` is 10)."""
    if isinstance(value, str):
        if value not in PRIORITY_NAMES:
            raise ValueError(f"priority is a number or one of {', '.join(PRIORITY_NAMES)}")
        return PRIORITY_NAMES[value]
    return value


Duration = Annotated[float, BeforeValidator(_seconds), Field(ge=0)]
Priority = Annotated[int, BeforeValidator(_priority)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScenarioParticipant(_Strict):
    """A participant of the starting snapshot (joined at the start)."""

    role: ParticipantRole
    id: str = Field(min_length=1)
    mode: ParticipantMode | None = None
    primary: bool = False
    present: bool = True


class ScenarioConversation(_Strict):
    """The starting snapshot; everything not given has the value of a new conversation."""

    state: ConversationState = "new"
    participants: list[ScenarioParticipant] = Field(default_factory=list)
    channel: str = "webchat"
    language: str = "en"
    queue: str | None = None
    priority: Priority = 0
    skills: list[str] = Field(default_factory=list)
    handled_by_agent: bool | None = None  # default: an agent takes part
    customer_present: bool = True
    attributes: dict[str, Any] = Field(default_factory=dict)
    labels: list[str] = Field(default_factory=list)
    timers: dict[str, Duration] = Field(default_factory=dict)  # running, due after the start


class TimerFiring(_Strict):
    """An expected timer firing and, when given, the rules it fired."""

    timer: str
    rules: list[str] | None = None


class EmittedEvent(_Strict):
    """An expected emitted event and, when given, the rules it fired."""

    event: EventType
    rules: list[str] | None = None


def _named(key: str) -> Any:
    """Accept a bare name for ``{key: name}`` (``fired: [idle_close]``)."""
    return BeforeValidator(lambda value: {key: value} if isinstance(value, str) else value)


class Expect(_Strict):
    """What a step must produce; only the keys given are checked."""

    rules: list[str] | None = None
    fired: list[Annotated[TimerFiring, _named("timer")]] | None = None
    emitted: list[Annotated[EmittedEvent, _named("event")]] | None = None
    state: ConversationState | None = None
    timers: list[str] | None = None
    sent: list[str] | None = None
    refused: list[str] | None = None
    attributes: dict[str, Any] | None = None
    labels: list[str] | None = None
    queue: str | None = None
    priority: Priority | None = None


class Step(_Strict):
    """Move the clock to ``at`` (firing due timers), then decide ``event`` if there is one."""

    at: Duration | None = None
    event: EventType | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    expect: Expect = Field(default_factory=Expect)

    @model_validator(mode="after")
    def _data_needs_event(self) -> Step:
        if self.data and self.event is None:
            raise ValueError("'data' needs an 'event'")
        return self


class Scenario(_Strict):
    """One journey: a starting snapshot, optional setting overrides, and steps."""

    name: str = Field(min_length=1)
    description: str = ""
    start: datetime = DEFAULT_START
    conversation: ScenarioConversation = Field(default_factory=ScenarioConversation)
    settings: dict[str, Duration] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)

    @field_validator("start")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("'start' needs a UTC offset, e.g. 2026-01-05T09:00:00+00:00")
        return value

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(TimeoutSettings.model_fields))
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(TimeoutSettings.model_fields)}"
            )
        return value

    @model_validator(mode="after")
    def _time_goes_forward(self) -> Scenario:
        previous = 0.0
        for number, step in enumerate(self.steps, start=1):
            if step.at is not None and step.at < previous:
                raise ValueError(f"step {number}: 'at' goes back in time")
            previous = step.at if step.at is not None else previous
        return self


_KEYS = sorted(
    {
        key
        for model in (ScenarioParticipant, ScenarioConversation, TimerFiring, EmittedEvent)
        for key in model.model_fields
    }
    | set(Expect.model_fields)
    | set(Step.model_fields)
    | set(Scenario.model_fields)
)


@dataclass(frozen=True)
class LoadedScenario:
    """A validated scenario and where it is written (for messages)."""

    spec: Scenario
    file: str
    line: int
    step_lines: tuple[int, ...]


def load_scenarios(path: Path) -> list[LoadedScenario]:
    """Read a scenario file or every *.yaml / *.yml of a folder (sorted, subfolders too).

    Raises ScenarioError listing every problem, each as ``file:line:col: ...``.
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))
    elif path.is_file():
        files = [path]
    else:
        raise ScenarioError([f"{path}:1:1: no such scenario file or folder"])
    errors: list[str] = []
    loaded: list[LoadedScenario] = []
    for file in files:
        loaded.extend(_load_file(file, errors))
    if errors:
        raise ScenarioError(errors)
    return loaded


def _load_file(file: Path, errors: list[str]) -> Iterator[LoadedScenario]:
    name = str(file)
    try:
        src = SourceFile(name, file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        where, message = syntax_error_where(name, error)
        errors.append(f"{where}: {message}")
        return
    root = src.root
    if root is None:
        return
    nodes = root.value if isinstance(root, yaml.SequenceNode) else [root]
    for position, node in enumerate(nodes, start=1):
        label = f"#{position}"
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if src.value(key) == "name" and isinstance(src.value(value), str):
                    label = repr(src.value(value))
        else:
            errors.append(f"{src.where(node)}: scenario {label}: a scenario is a mapping")
            continue
        try:
            spec = Scenario.model_validate(src.value(node))
        except ValidationError as exc:
            seen: set[str] = set()
            for problem in exc.errors():
                where = src.where(_node_at(node, problem["loc"]))
                path = ".".join(str(part) for part in problem["loc"] if not _is_tag(part))
                message = f"{where}: scenario {label}: {path or 'scenario'}: {_message(problem)}"
                if message not in seen:  # a union reports one problem once per member
                    seen.add(message)
                    errors.append(message)
            continue
        steps = next((v for k, v in node.value if src.value(k) == "steps"), None)
        step_lines = tuple(
            src.where(item).line for item in (steps.value if steps is not None else [])
        )
        yield LoadedScenario(spec, name, src.where(node).line, step_lines)


def _is_tag(part: int | str) -> bool:
    """Pydantic's name for a union member in an error location (``str``, ``TimerFiring``)."""
    return isinstance(part, str) and (
        part[:1].isupper() or part in ("str", "int", "float") or part.startswith("literal[")
    )


def _message(problem: Mapping[str, Any]) -> str:
    """A short message; unknown event types and keys get a "did you mean"."""
    kind, value = problem["type"], problem.get("input")
    last = next((p for p in reversed(problem["loc"]) if not _is_tag(p)), "")
    if kind == "literal_error" and last == "event" and isinstance(value, str):
        return f"unknown event type {value!r}" + did_you_mean(value, EVENT_TYPES)
    if kind == "extra_forbidden":
        return f"unknown key {last!r}" + did_you_mean(str(last), _KEYS)
    return str(problem["msg"])


def _node_at(node: yaml.Node, loc: Sequence[int | str]) -> yaml.Node:
    """The deepest YAML node along a pydantic error location (union tags are skipped)."""
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(
                (
                    value
                    for key, value in node.value
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part)
                ),
                None,
            )
            if found is not None:  # else a union tag or a missing key: stay on this node
                node = found
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node
            node = node.value[part]
    return node


# ---------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Decided:
    """One event decided during a step (or a timer firing dropped as stale)."""

    event: Event
    rules: tuple[str, ...]
    stale: bool = False

    def describe(self) -> str:
        what: str = self.event.type
        if self.event.type == "timer.fired":
            what += f" {self.event.data.get('name')}"
        if self.stale:
            return f"{what} (stale, dropped)"
        return f"{what} -> {', '.join(self.rules) or '(no rule)'}"


@dataclass
class StepOutcome:
    """What one step produced, compared with its ``expect``."""

    number: int
    at: float
    line: int
    event: str | None
    decided: list[Decided] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


@dataclass
class ScenarioResult:
    """The outcome of one scenario: the failing steps and every rule that fired."""

    name: str
    file: str
    line: int
    failures: list[StepOutcome] = field(default_factory=list)
    rules_fired: set[str] = field(default_factory=set)

    @property
    def passed(self) -> bool:
        return not self.failures


class _Simulation:
    """The simulated conversation: snapshot, pending timers and the events decided so far."""

    def __init__(self, scenario: Scenario, book: Rulebook, matcher: Matcher, tz: ZoneInfo):
        self.book = book
        self.matcher: Matcher = matcher
        self.tz = tz
        self.decider = Decider()
        self.start = scenario.start
        self.now = scenario.start
        self.seq = 0
        self.decided_in_step = 0
        self.conv = _snapshot(scenario)
        self.pending: list[tuple[datetime, str, int]] = []
        for name, ref in self.conv.timers.items():
            heapq.heappush(self.pending, (ref.due_at, name, ref.generation))

    def advance(self, to: datetime, out: list[tuple[Decided, DecisionRecord | None]]) -> None:
        """Fire every timer due by ``to`` (with what it emits), then set the clock to ``to``."""
        while self.pending and self.pending[0][0] <= to:
            due, name, generation = heapq.heappop(self.pending)
            self.now = max(self.now, due)
            event = self._event("timer.fired", "timers", {"name": name, "generation": generation})
            self.decide(event, out)
        self.now = to

    def decide(self, event: Event, out: list[tuple[Decided, DecisionRecord | None]]) -> None:
        """Decide ``event`` and then, in order, every event it (transitively) emits."""
        queue: deque[Event] = deque([event])
        while queue:
            current = queue.popleft()
            self.decided_in_step += 1
            if self.decided_in_step > MAX_EVENTS_PER_STEP:
                raise _Runaway(f"more than {MAX_EVENTS_PER_STEP} events decided in one step")
            if current.type == "timer.fired":
                ref = self.conv.timers.get(str(current.data.get("name")))
                if ref is None or ref.generation != current.data.get("generation"):
                    out.append((Decided(current, (), stale=True), None))
                    continue
            facts = build_facts(self.conv, current, self.tz)
            fired = self.book.decide(facts, matcher=self.matcher)
            record = self.decider.apply(
                self.conv, current, fired, rules_version=self.book.version, matcher=self.matcher
            )
            record.after.version = self.conv.version + 1
            self.conv = record.after
            for op in record.timers:
                if op.due_at is not None:
                    heapq.heappush(self.pending, (op.due_at, op.name, op.generation))
            out.append((Decided(current, tuple(rule.rule for rule in fired)), record))
            queue.extend(self._accepted(emitted) for emitted in record.emitted)

    def event(self, event_type: str, data: dict[str, Any]) -> Event:
        return self._event(event_type, "scenario", data)

    def _accepted(self, emitted: NewEvent) -> Event:
        return self._event(emitted.type, emitted.source, emitted.data)

    def _event(self, event_type: str, source: str, data: dict[str, Any]) -> Event:
        self.seq += 1
        return Event(
            id=f"ev_{self.seq}",
            type=event_type,  # type: ignore[arg-type]
            conversation_id=self.conv.id,
            seq=self.seq,
            source=source,
            dedupe_key=f"{source}:{self.seq}",
            accepted_at=self.now,
            data=dict(data),
        )


def _snapshot(scenario: Scenario) -> Conversation:
    spec, start = scenario.conversation, scenario.start
    timers = {
        name: TimerRef(generation=1, due_at=start + timedelta(seconds=after))
        for name, after in spec.timers.items()
    }
    has_agent = any(p.role == "agent" for p in spec.participants)
    return Conversation(
        id=_CONVERSATION_ID,
        state=spec.state,
        channel=spec.channel,
        instance=spec.channel,
        endpoint="scenario",
        identity="visitor_1",
        customer_id="cu_scenario",
        created_at=start,
        last_activity_at=start,
        participants=[
            Participant(
                role=p.role,
                id=p.id,
                mode=p.mode,
                primary=p.primary,
                present=p.present,
                joined_at=start,
            )
            for p in spec.participants
        ],
        queue=spec.queue,
        priority=spec.priority,
        enqueued_at=start if spec.state == "queued" else None,
        handled_by_agent=has_agent if spec.handled_by_agent is None else spec.handled_by_agent,
        skills=list(spec.skills),
        attributes=dict(spec.attributes),
        labels=list(spec.labels),
        timers=timers,
        timer_generations={name: 1 for name in timers},
        customer_present=spec.customer_present,
        language=spec.language,
    )


def run_scenario(
    loaded: LoadedScenario, book: Rulebook, *, matcher: Matcher, timezone: str = "UTC"
) -> ScenarioResult:
    """Play one scenario against ``book``; every step is checked, failures are collected."""
    spec = loaded.spec
    sim = _Simulation(spec, book, matcher, ZoneInfo(timezone))
    result = ScenarioResult(spec.name, loaded.file, loaded.line)
    at = 0.0
    for number, step in enumerate(spec.steps, start=1):
        at = step.at if step.at is not None else at
        line = loaded.step_lines[number - 1] if number <= len(loaded.step_lines) else loaded.line
        outcome = StepOutcome(number, at, line, step.event)
        timed: list[tuple[Decided, DecisionRecord | None]] = []
        own: list[tuple[Decided, DecisionRecord | None]] = []
        sim.decided_in_step = 0
        try:
            sim.advance(spec.start + timedelta(seconds=at), timed)
            if step.event is not None:
                sim.decide(sim.event(step.event, step.data), own)
        except Exception as exc:  # a runaway loop or a bug: this scenario cannot go on
            everything = [decided for decided, _ in timed + own]
            result.rules_fired.update(rule for decided in everything for rule in decided.rules)
            outcome.decided = everything[-20:]  # the last ones
            outcome.mismatches = [f"error: {exc}"]
            result.failures.append(outcome)
            return result
        outcome.decided = [decided for decided, _ in timed + own]
        result.rules_fired.update(rule for decided in outcome.decided for rule in decided.rules)
        outcome.mismatches = _check(step, sim.conv, timed, own)
        if outcome.mismatches:
            result.failures.append(outcome)
    return result


def _check(
    step: Step,
    conv: Conversation,
    timed: list[tuple[Decided, DecisionRecord | None]],
    own: list[tuple[Decided, DecisionRecord | None]],
) -> list[str]:
    """Expected vs actual, one line per key that differs."""
    expect = step.expect
    given = expect.model_fields_set
    records = [record for _, record in timed + own if record is not None]
    problems: list[str] = []

    def differ(key: str, expected: Any, actual: Any) -> None:
        if expected != actual:
            problems.append(f"{key}: expected {expected!r}, got {actual!r}")

    if "rules" in given:
        actual_rules = list(own[0][0].rules) if own else []
        differ("rules", expect.rules, actual_rules)
    if "fired" in given:
        firings = [d for d, _ in timed if d.event.type == "timer.fired" and not d.stale]
        wanted = expect.fired or []
        actual_fired = [
            {"timer": d.event.data.get("name"), "rules": list(d.rules)} for d in firings
        ]
        shown = [
            {"timer": w.timer, "rules": w.rules} if w.rules is not None else w.timer for w in wanted
        ]
        if len(wanted) != len(firings) or any(
            w.timer != a["timer"] or (w.rules is not None and w.rules != a["rules"])
            for w, a in zip(wanted, actual_fired, strict=False)
        ):
            problems.append(f"fired: expected {shown!r}, got {actual_fired!r}")
    if "emitted" in given:
        emitted = [d for d, _ in (timed + own) if d.event.source == "controller"]
        wanted_events = expect.emitted or []
        actual_emitted = [{"event": d.event.type, "rules": list(d.rules)} for d in emitted]
        shown_events = [
            {"event": w.event, "rules": w.rules} if w.rules is not None else w.event
            for w in wanted_events
        ]
        if len(wanted_events) != len(emitted) or any(
            w.event != a["event"] or (w.rules is not None and w.rules != a["rules"])
            for w, a in zip(wanted_events, actual_emitted, strict=False)
        ):
            problems.append(f"emitted: expected {shown_events!r}, got {actual_emitted!r}")
    if "state" in given:
        differ("state", expect.state, conv.state)
    if "timers" in given:
        differ("timers", sorted(expect.timers or []), sorted(conv.timers))
    if "sent" in given:
        sent = [
            str(row.payload["message"]["text"])
            for record in records
            for row in record.outbox
            if row.destination.startswith("channel:")
        ]
        patterns = expect.sent or []
        if len(patterns) != len(sent) or not all(
            fnmatch.fnmatchcase(text, pattern)
            for text, pattern in zip(sent, patterns, strict=False)
        ):
            problems.append(f"sent: expected {patterns!r}, got {sent!r}")
    if "refused" in given:
        refused = [str(r["action"]) for record in records for r in record.refused]
        differ("refused", expect.refused, refused)
    if "attributes" in given:
        for key, value in (expect.attributes or {}).items():
            differ(f"attributes.{key}", value, conv.attributes.get(key))
    if "labels" in given:
        differ("labels", sorted(expect.labels or []), sorted(conv.labels))
    if "queue" in given:
        differ("queue", expect.queue, conv.queue)
    if "priority" in given:
        differ("priority", expect.priority, conv.priority)
    return problems


# ---------------------------------------------------------------------------- a whole run


@dataclass
class Report:
    """The results of a run and the rules that never fired in any scenario."""

    results: list[ScenarioResult]
    rules: tuple[str, ...]
    matcher: Matcher

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)

    @property
    def rules_fired(self) -> set[str]:
        return {rule for result in self.results for rule in result.rules_fired}

    @property
    def never_fired(self) -> list[str]:
        fired = self.rules_fired
        return [rule for rule in self.rules if rule not in fired]

    def lines(self) -> Iterator[str]:
        """The report as printed: PASS/FAIL per scenario, failure details, a summary."""
        for result in self.results:
            yield f"{'PASS' if result.passed else 'FAIL'} {result.name}"
            for step in result.failures:
                what = f"event {step.event}" if step.event else "no event"
                where = f"{result.file}:{step.line}"
                yield f"  {where}: step {step.number} (at {_fmt(step.at)}, {what})"
                for mismatch in step.mismatches:
                    yield f"    {mismatch}"
                yield "    what fired:"
                for decided in step.decided or []:
                    yield f"      {decided.describe()}"
                if not step.decided:
                    yield "      (nothing was decided)"
        failed = sum(not result.passed for result in self.results)
        summary = f"{len(self.results) - failed} passed, {failed} failed (matcher {self.matcher})"
        yield summary
        if self.never_fired:
            yield f"rules that fired in no scenario: {', '.join(self.never_fired)}"


def run_scenarios(
    scenarios: Sequence[LoadedScenario],
    rules: Path,
    settings: Settings,
    *,
    matcher: Matcher = "reference",
) -> Report:
    """Run scenarios against the rules folder (or file) ``rules``.

    A rulebook is loaded per distinct set of setting overrides, since settings are resolved
    when rules load.
    """
    books: dict[tuple[tuple[str, float], ...], Rulebook] = {}
    base = settings.rule_settings()
    try:
        results: list[ScenarioResult] = []
        default = _book(books, (), rules, base, matcher, settings.default_language)
        for loaded in scenarios:
            key = tuple(sorted(loaded.spec.settings.items()))
            book = _book(books, key, rules, base, matcher, settings.default_language)
            results.append(run_scenario(loaded, book, matcher=matcher, timezone=settings.timezone))
        return Report(results, tuple(rule.name for rule in default.rules), matcher)
    finally:
        for book in books.values():
            book.close()


def _book(
    books: dict[tuple[tuple[str, float], ...], Rulebook],
    key: tuple[tuple[str, float], ...],
    rules: Path,
    base: Mapping[str, Any],
    matcher: Matcher,
    language: str,
) -> Rulebook:
    if key not in books:
        books[key] = Rulebook.load(
            rules, settings={**base, **dict(key)}, matcher=matcher, default_language=language
        )
    return books[key]


def _fmt(seconds: float) -> str:
    """``90`` → ``1m30s``: a step's time as the files write it."""
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{secs}s" if secs or not text else "")
