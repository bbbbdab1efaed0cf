"""The ``then`` list: action arguments, templates, durations and language selection.

Arguments are checked at load time through the same pydantic models the machine receives
(with every ``{{ ... }}`` slot replaced by a stand-in), so a bad argument is a load error with
its line. At decide time only the templates and localized texts are filled in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from controller.errors import RuleError
from controller.models.actions import (
    PRIORITY_NAMES,
    Action,
    Assign,
    CancelTimer,
    Close,
    InviteApp,
    InviteBot,
    Label,
    RemoveParticipant,
    Route,
    Send,
    SetAttributes,
    SetBotMode,
    StartTimer,
    Stop,
    Transfer,
    Unlabel,
    Whisper,
)
from controller.rulebook.conditions import lookup
from controller.rulebook.fields import field_type, unknown_field_message
from controller.rulebook.source import Problems, SourceFile, Where, did_you_mean, kind_of

# ---------------------------------------------------------------------------- templates

_SLOT = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_PLACEHOLDER = "x"


@dataclass(frozen=True)
class Slot:
    """``{{ path }}`` or ``{{ path | fallback }}``."""

    path: str
    fallback: str


@dataclass(frozen=True)
class Template:
    """A string argument with zero or more slots, filled from the facts at decide time."""

    parts: tuple[str | Slot, ...]

    @property
    def dynamic(self) -> bool:
        return any(isinstance(part, Slot) for part in self.parts)

    def render(self, facts: Mapping[str, Any] | None) -> str:
        """The text with every slot replaced (a placeholder when ``facts`` is None)."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif facts is None:
                out.append(part.fallback or _PLACEHOLDER)
            else:
                value = lookup(facts, part.path)
                out.append(part.fallback if value is None else _format(value))
        return "".join(out)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(item) for item in value)
    return str(value)


def parse_template(text: str) -> Template | str:
    """Split ``text`` into literal parts and slots; an error message if malformed."""
    parts: list[str | Slot] = []
    position = 0
    for match in _SLOT.finditer(text):
        if match.start() > position:
            parts.append(text[position : match.start()])
        inner = match.group(1)
        path, bar, fallback = inner.partition("|")
        path = path.strip()
        if not path:
            return f"empty template slot in {text!r}"
        parts.append(Slot(path, fallback.strip() if bar else ""))
        position = match.end()
    rest = text[position:]
    if "{{" in rest or "}}" in rest:
        return f"unbalanced '{{{{' or '}}}}' in {text!r} (a slot is '{{{{ path | fallback }}}}')"
    if rest:
        parts.append(rest)
    return Template(tuple(parts))


@dataclass(frozen=True)
class LocalizedText:
    """Text keyed by language; one is picked per decision."""

    texts: tuple[tuple[str, Template], ...]

    def render(self, facts: Mapping[str, Any] | None, default_language: str) -> str:
        """Pick customer.language, else conversation.language, else the default, else the first."""
        by_language = dict(self.texts)
        if facts is not None:
            for path in ("customer.language", "conversation.language"):
                language = lookup(facts, path)
                if isinstance(language, str) and language in by_language:
                    return by_language[language].render(facts)
        chosen = by_language.get(default_language, self.texts[0][1])
        return chosen.render(facts)


# ---------------------------------------------------------------------------- action specs

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


@dataclass(frozen=True)
class ActionSpec:
    """One action of a rule, ready to be instantiated with the facts of a decision."""

    kind: str
    model: type[BaseModel]
    args: Mapping[str, Any]
    where: Where
    fixed: BaseModel | None  # prebuilt when no argument depends on the facts

    def build(self, facts: Mapping[str, Any], default_language: str, rule: str) -> Action:
        """The action model for these facts; RuleError if a filled-in template is invalid."""
        if self.fixed is not None:
            return self.fixed  # type: ignore[return-value]
        values = {key: _resolve(value, facts, default_language) for key, value in self.args.items()}
        try:
            return self.model.model_validate(values)  # type: ignore[return-value]
        except ValidationError as error:
            detail = "; ".join(
                f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()
            )
            raise RuleError(
                [
                    f"{self.where}: rule '{rule}': '{self.kind}' got invalid arguments"
                    + f" after filling in templates: {detail}"
                ]
            ) from error


def _resolve(value: Any, facts: Mapping[str, Any] | None, default_language: str) -> Any:
    if isinstance(value, Template):
        return value.render(facts)
    if isinstance(value, LocalizedText):
        return value.render(facts, default_language)
    if isinstance(value, list):
        return [_resolve(item, facts, default_language) for item in value]
    if isinstance(value, dict):
        return {key: _resolve(item, facts, default_language) for key, item in value.items()}
    return value


def _dynamic(value: Any) -> bool:
    if isinstance(value, Template):
        return value.dynamic
    if isinstance(value, LocalizedText):
        return True
    if isinstance(value, list):
        return any(_dynamic(item) for item in value)
    if isinstance(value, dict):
        return any(_dynamic(item) for item in value.values())
    return False


# action name -> (model, the argument a bare scalar stands for, whether a bare scalar is allowed)
_MODELS: dict[str, tuple[type[BaseModel], str | None]] = {
    "invite_bot": (InviteBot, "bot"),
    "invite_app": (InviteApp, "app"),
    "set_bot_mode": (SetBotMode, "mode"),
    "remove_participant": (RemoveParticipant, "role"),
    "route": (Route, "queue"),
    "assign": (Assign, "agent"),
    "transfer": (Transfer, None),
    "send": (Send, None),
    "whisper": (Whisper, "text"),
    "start_timer": (StartTimer, None),
    "cancel_timer": (CancelTimer, "name"),
    "set": (SetAttributes, None),
    "label": (Label, "label"),
    "unlabel": (Unlabel, "label"),
    "close": (Close, "reason"),
    "stop": (Stop, None),
}
ACTION_NAMES: tuple[str, ...] = tuple(_MODELS)


class ActionParser:
    """Parses the ``then`` list of one rule into ActionSpecs."""

    def __init__(
        self, problems: Problems, settings: Mapping[str, Any], default_language: str
    ) -> None:
        self.problems = problems
        self.settings = settings
        self.default_language = default_language

    def parse_then(
        self, src: SourceFile, node: yaml.Node, rule: str
    ) -> tuple[tuple[ActionSpec, ...], bool] | None:
        """Actions (without ``stop``) and whether the rule stops; None if invalid."""
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.problems.add(src.where(node), rule, "'then' must be a non-empty list of actions")
            return None
        before = len(self.problems.messages)
        specs: list[ActionSpec] = []
        stops = False
        for position, item in enumerate(node.value):
            name, args_node = self._split(src, item, rule)
            if name is None:
                continue
            if name == "stop":
                if args_node is not None and src.value(args_node) not in (None, {}):
                    self.problems.add(src.where(item), rule, "'stop' takes no arguments")
                elif position != len(node.value) - 1:
                    self.problems.add(src.where(item), rule, "'stop' must be the last action")
                stops = True
                continue
            spec = self._action(src, item, name, args_node, rule)
            if spec is not None:
                specs.append(spec)
        if len(self.problems.messages) != before:
            return None
        return tuple(specs), stops

    def _split(
        self, src: SourceFile, item: yaml.Node, rule: str
    ) -> tuple[str | None, yaml.Node | None]:
        if isinstance(item, yaml.ScalarNode):
            name = src.value(item)
            if name == "stop":
                return "stop", None
            self.problems.add(
                src.where(item),
                rule,
                f"an action is a one-key mapping like '{name}: ...' (only 'stop' stands alone)"
                if name in _MODELS
                else f"unknown action '{name}'" + did_you_mean(str(name), ACTION_NAMES),
            )
            return None, None
        if not isinstance(item, yaml.MappingNode) or len(item.value) != 1:
            self.problems.add(
                src.where(item), rule, "an action must be a mapping with exactly one key"
            )
            return None, None
        key_node, args_node = item.value[0]
        name = src.value(key_node)
        if not isinstance(name, str) or name not in _MODELS:
            self.problems.add(
                src.where(key_node),
                rule,
                f"unknown action '{name}'" + did_you_mean(str(name), ACTION_NAMES),
            )
            return None, None
        return name, args_node

    def _action(
        self, src: SourceFile, item: yaml.Node, name: str, args_node: yaml.Node | None, rule: str
    ) -> ActionSpec | None:
        model, shorthand = _MODELS[name]
        where = src.where(item)
        assert args_node is not None
        raw_nodes: dict[str, yaml.Node] = {}
        key_nodes: dict[str, yaml.Node] = {}
        if name == "set":
            if not isinstance(args_node, yaml.MappingNode) or not args_node.value:
                self.problems.add(
                    src.where(args_node), rule, "'set' needs a mapping of attribute: value"
                )
                return None
            values: dict[str, Any] = {}
            ok = True
            for key_node, value_node in args_node.value:
                key = src.value(key_node)
                if not isinstance(key, str) or not key:
                    self.problems.add(src.where(key_node), rule, "attribute names must be text")
                    ok = False
                    continue
                converted = self._plain(src, value_node, rule)
                ok = ok and converted is not _INVALID
                values[key] = converted
            return (
                self._finish(src, where, name, model, {"values": values}, {}, rule) if ok else None
            )
        if isinstance(args_node, yaml.MappingNode):
            for key_node, value_node in args_node.value:
                key = src.value(key_node)
                if not isinstance(key, str):
                    self.problems.add(
                        src.where(key_node),
                        rule,
                        f"argument names must be text, not {kind_of(key)}",
                    )
                    return None
                raw_nodes[key] = value_node
                key_nodes[key] = key_node
        elif (
            isinstance(args_node, yaml.ScalarNode)
            and src.value(args_node) is None
            and name == "close"
        ):
            pass
        elif isinstance(args_node, yaml.ScalarNode) and shorthand is not None:
            raw_nodes[shorthand] = args_node
        else:
            form = (
                f"'{name}: {{...}}'"
                if shorthand is None
                else f"'{name}: <{shorthand}>' or '{name}: {{...}}'"
            )
            self.problems.add(src.where(args_node), rule, f"'{name}' takes {form}")
            return None
        allowed = [field for field in model.model_fields if field != "kind"]
        args: dict[str, Any] = {}
        ok = True
        for key, value_node in raw_nodes.items():
            if key not in allowed:
                self.problems.add(
                    src.where(key_nodes.get(key, value_node)),
                    rule,
                    f"'{name}' has no argument '{key}'"
                    + did_you_mean(key, allowed)
                    + f" (it takes {', '.join(allowed)})",
                )
                ok = False
                continue
            converted = self._argument(src, name, key, value_node, rule)
            if converted is _INVALID:
                ok = False
            else:
                args[key] = converted
        if not ok:
            return None
        if name == "transfer" and not args:
            self.problems.add(src.where(args_node), rule, "'transfer' needs a queue or an agent")
            return None
        return self._finish(src, where, name, model, args, raw_nodes, rule)

    def _finish(
        self,
        src: SourceFile,
        where: Where,
        name: str,
        model: type[BaseModel],
        args: dict[str, Any],
        nodes: Mapping[str, yaml.Node],
        rule: str,
    ) -> ActionSpec | None:
        """Validate through the model with stand-ins for templates; prebuild if static."""
        try:
            sample = model.model_validate(
                {key: _resolve(value, None, self.default_language) for key, value in args.items()}
            )
        except ValidationError as error:
            for problem in error.errors():
                loc = problem["loc"]
                at = nodes.get(str(loc[0])) if loc else None
                label = ".".join(str(p) for p in loc) or name
                self.problems.add(
                    src.where(at) if at is not None else where,
                    rule,
                    f"'{name}' argument '{label}': {problem['msg']}",
                )
            return None
        fixed = None if _dynamic(args) else sample
        return ActionSpec(name, model, args, where, fixed)

    def _argument(self, src: SourceFile, action: str, key: str, node: yaml.Node, rule: str) -> Any:
        value = src.value(node)
        if action == "route" and key == "priority":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and value in PRIORITY_NAMES:
                return PRIORITY_NAMES[value]
            self.problems.add(
                src.where(node),
                rule,
                f"priority must be a whole number or one of {', '.join(PRIORITY_NAMES)}"
                + (did_you_mean(value, PRIORITY_NAMES) if isinstance(value, str) else ""),
            )
            return _INVALID
        if action == "start_timer" and key == "after":
            seconds = self._duration(value)
            if isinstance(seconds, str):
                self.problems.add(src.where(node), rule, seconds)
                return _INVALID
            return seconds
        if action in ("send", "whisper") and key == "text":
            return self._text(src, node, rule)
        return self._plain(src, node, rule)

    def _text(self, src: SourceFile, node: yaml.Node, rule: str) -> Any:
        value = src.value(node)
        if isinstance(value, str):
            return self._template(src, node, value, rule)
        if (
            isinstance(value, dict)
            and value
            and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        ):
            assert isinstance(node, yaml.MappingNode)
            texts: list[tuple[str, Template]] = []
            for key_node, text_node in node.value:
                template = self._template(src, text_node, src.value(text_node), rule)
                if template is _INVALID:
                    return _INVALID
                if isinstance(template, str):
                    template = Template((template,))
                texts.append((src.value(key_node), template))
            return LocalizedText(tuple(texts))
        self.problems.add(
            src.where(node), rule, "text must be a string or a mapping of language: text"
        )
        return _INVALID

    def _plain(self, src: SourceFile, node: yaml.Node, rule: str) -> Any:
        """A plain YAML value whose strings may hold templates."""
        if isinstance(node, yaml.SequenceNode):
            items = [self._plain(src, item, rule) for item in node.value]
            return _INVALID if any(item is _INVALID for item in items) else items
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                item = self._plain(src, value_node, rule)
                if item is _INVALID:
                    return _INVALID
                out[src.value(key_node)] = item
            return out
        value = src.value(node)
        if isinstance(value, str):
            return self._template(src, node, value, rule)
        return value

    def _template(self, src: SourceFile, node: yaml.Node, text: str, rule: str) -> Any:
        parsed = parse_template(text)
        if isinstance(parsed, str):
            self.problems.add(src.where(node), rule, parsed)
            return _INVALID
        for part in parsed.parts:
            if isinstance(part, Slot) and field_type(part.path) is None:
                self.problems.add(
                    src.where(node), rule, "template: " + unknown_field_message(part.path)
                )
                return _INVALID
        return parsed if parsed.dynamic else text

    def _duration(self, value: Any) -> float | str:
        """Seconds for a duration, or an error message."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if value >= 0 else "a duration cannot be negative"
        if not isinstance(value, str):
            return (
                "a duration is seconds, text like '90s', '5m', '1h30m' or 'settings.NAME', "
                f"not {kind_of(value)}"
            )
        if value.startswith("settings."):
            name = value[len("settings.") :]
            setting = _setting(self.settings, name)
            if setting is _INVALID:
                return f"unknown setting '{name}'" + did_you_mean(
                    name, [str(k) for k in self.settings]
                )
            if not isinstance(setting, (int, float)) or isinstance(setting, bool) or setting < 0:
                return f"setting '{name}' must be a number of seconds, not {setting!r}"
            return float(setting)
        match = _DURATION.match(value.strip())
        if not value.strip() or match is None:
            return f"invalid duration {value!r}; use seconds, or text like '90s', '5m', '1h30m'"
        hours, minutes, seconds = (float(group) if group else 0.0 for group in match.groups())
        return hours * 3600 + minutes * 60 + seconds


class _Invalid:
    """Marker for an argument that already produced a load error."""


_INVALID: Any = _Invalid()


def _setting(settings: Mapping[str, Any], name: str) -> Any:
    if name in settings:
        return settings[name]
    current: Any = settings
    for part in name.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return _INVALID
        current = current[part]
    return current


# The action registry as the schema and the reference read it: name -> (model, shorthand arg).
ACTION_MODELS: Mapping[str, tuple[type[BaseModel], str | None]] = _MODELS


@dataclass(frozen=True)
class ActionHelp:
    """What an action does, an example, and one line per argument (generated reference)."""

    summary: str
    example: str
    args: Mapping[str, str]


# A test checks that every action and every argument of its model has an entry here.
ACTION_HELP: Mapping[str, ActionHelp] = {
    "invite_bot": ActionHelp(
        "`direct`: the bot answers the customer (state → `bot`); `assist`: it only suggests to"
        " agents",
        "invite_bot: { bot: demo, mode: direct }",
        {"bot": "a configured bot connector", "mode": "`direct` (default) or `assist`"},
    ),
    "invite_app": ActionHelp(
        "a registered app joins the conversation (it then receives the conversation's events"
        " and may post messages and set attributes); `remove_participant: app` removes it",
        "invite_app: { app: survey }",
        {"app": "the app's registered name"},
    ),
    "set_bot_mode": ActionHelp(
        "before a `route`, keeps the bot as the agent's assistant",
        "set_bot_mode: { mode: assist }",
        {"mode": "`direct` or `assist`", "bot": "which bot (default: the one taking part)"},
    ),
    "remove_participant": ActionHelp(
        "removes a participant; emits `agent.left` / `bot.left`",
        'remove_participant: { role: agent, id: "{{ event.agent_id }}", reason: timeout }',
        {
            "role": "`agent`, `bot` or `app`",
            "id": "which one (default: all of that role)",
            "reason": "passed on as the event's `reason` (default `removed`)",
        },
    ),
    "route": ActionHelp(
        "→ `queued`; a direct bot and any agent leave",
        "route: { queue: support, priority: high, skills: [billing] }",
        {
            "queue": "a configured queue (setting `queues`), or a template",
            "priority": "a whole number or `low`, `normal` (default), `high`, `urgent`",
            "skills": "skills the agent needs: `billing` (any level) or `billing:5` (level 5"
            " or more, up to 10); the queue's `queue_routing` setting may add more",
        },
    ),
    "assign": ActionHelp(
        "→ `agent` without an offer",
        "assign: { agent: alice }",
        {"agent": "the agent's id"},
    ),
    "transfer": ActionHelp(
        "the current primary agent leaves; give a queue or an agent",
        "transfer: { queue: billing }",
        {"queue": "a configured queue, or a template", "agent": "the agent's id"},
    ),
    "send": ActionHelp(
        "a message; text in the customer's language, else the default language, else the first",
        'send: { to: customer, text: { en: "Hello", de: "Hallo" } }',
        {
            "to": "`customer` (default) or `agents`",
            "text": "text, or a mapping of language: text",
            "buttons": "choices for the customer: a list of `{title, payload}` (payload "
            "defaults to the title); the tapped one is `event.reply_id`",
            "template": "a WhatsApp template for customers outside the 24 h window: "
            "`{name, language, parameters: [...]}` (language defaults to the conversation's); "
            "other channels send the text",
        },
    ),
    "whisper": ActionHelp(
        "a note to the agents only",
        'whisper: "VIP customer"',
        {"text": "the note"},
    ),
    "start_timer": ActionHelp(
        "starts a timer; replaces a running timer of that name",
        "start_timer: { name: idle_reminder, after: 5m }",
        {
            "name": "the timer's name (`timer.fired` has it as `event.name`)",
            "after": "seconds, `90s`, `5m`, `1h30m` or `settings.NAME`",
        },
    ),
    "cancel_timer": ActionHelp(
        "cancels the running timer of that name, if any",
        "cancel_timer: idle_reminder",
        {"name": "the timer's name"},
    ),
    "set": ActionHelp(
        "sets conversation attributes (`conversation.attributes.NAME`)",
        "set: { topic: billing }",
        {"values": "a mapping of attribute: value"},
    ),
    "label": ActionHelp(
        "adds a label (`conversation.labels`)",
        "label: vip",
        {"label": "the label"},
    ),
    "unlabel": ActionHelp(
        "removes a label",
        "unlabel: vip",
        {"label": "the label"},
    ),
    "close": ActionHelp(
        "→ `wrap_up` if an agent handled it, else `closed`; emits `conversation.closed`",
        "close: idle",
        {"reason": "why (default `closed`); the event's `reason`"},
    ),
    "stop": ActionHelp(
        "no later rule fires for this event; must be the rule's last action",
        "- stop",
        {},
    ),
}
