"""JSON Schema (draft 2020-12) of a rule file, generated from the engine's own registries.

Editors (YAML language server) use it for completion and help while an analyst types; it is
shipped as ``rules.schema.json`` next to this module and a test keeps that file equal to
``build_schema()``. The schema is a first line of defence only: ``convctl rules check`` stays
the authority (it also checks types against settings, templates and rule semantics).
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from controller.models.actions import PRIORITY_NAMES
from controller.models.events import EVENT_TYPES
from controller.rulebook.actions import ACTION_HELP, ACTION_MODELS
from controller.rulebook.conditions import GROUP_HELP, OPERATOR_HELP
from controller.rulebook.fields import (
    EVENT_DESCRIPTIONS,
    FIELD_DESCRIPTIONS,
    FIELDS,
    OPEN_PREFIX_DESCRIPTIONS,
    OPEN_PREFIXES,
    FieldType,
)

SCHEMA_PATH = Path(__file__).with_name("rules.schema.json")

_TYPE_NAMES: Mapping[FieldType, str] = {
    "str": "text",
    "num": "number",
    "bool": "yes/no",
    "list": "list",
    "map": "mapping",
    "any": "any",
}
_SCALAR: dict[str, Any] = {"type": ["string", "number", "boolean"]}
_TEMPLATE = {"type": "string", "pattern": r"\{\{", "description": "a {{ field }} template"}
_DURATION = r"^((\d+(\.\d+)?h)?(\d+(\.\d+)?m)?(\d+(\.\d+)?s)?|settings\.[A-Za-z0-9_.]+)$"

# Which operators each declared field type takes, and the JSON type of their literal.
_LITERAL: Mapping[FieldType, dict[str, Any]] = {
    "str": {"type": "string"},
    "num": {"type": "number"},
    "bool": {"type": "boolean"},
    "any": _SCALAR,
}


def _operator(op: str, literal: dict[str, Any]) -> dict[str, Any]:
    meaning, example = OPERATOR_HELP[op]
    return {**literal, "description": f"{meaning}. Example: {example}"}


def _field_test(declared: FieldType) -> dict[str, Any]:
    """The value a field path takes in a condition: a bare literal (eq) or one operator."""
    ops: dict[str, dict[str, Any]] = {}
    exists = _operator("exists", {"type": "boolean"})
    if declared in _LITERAL:
        literal = _LITERAL[declared]
        listed = {"type": "array", "minItems": 1, "items": literal}
        ops = {
            "eq": _operator("eq", literal),
            "ne": _operator("ne", literal),
            "in": _operator("in", listed),
            "not_in": _operator("not_in", listed),
        }
        if declared in ("str", "num", "any"):
            ordered = literal if declared != "any" else {"type": ["string", "number"]}
            for op in ("gt", "gte", "lt", "lte"):
                ops[op] = _operator(op, ordered)
        if declared in ("str", "any"):
            ops["contains"] = _operator("contains", literal)
            ops["matches"] = _operator("matches", {"type": "string"})
        bare: dict[str, Any] = dict(literal)
        if declared == "any":
            ops["eq"] = _operator("eq", {"anyOf": [_SCALAR, {"type": "array", "items": _SCALAR}]})
            ops["ne"] = dict(ops["eq"], description=_operator("ne", {})["description"])
    elif declared == "list":
        whole = {"type": "array", "items": _SCALAR}
        ops = {
            "eq": _operator("eq", whole),
            "ne": _operator("ne", whole),
            "contains": _operator("contains", _SCALAR),
        }
        bare = whole
    else:  # map: only presence can be tested
        bare = {}
    ops["exists"] = exists
    one_operator = {
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "properties": ops,
        "additionalProperties": False,
    }
    if declared == "map":
        return one_operator
    return {"anyOf": [bare, one_operator]}


def _field_properties() -> tuple[dict[str, Any], dict[str, Any]]:
    """``properties`` and ``patternProperties`` for every field path."""
    properties: dict[str, Any] = {}
    for path, declared in FIELDS.items():
        properties[path] = {
            "$ref": f"#/$defs/test_{declared}",
            "description": f"{_TYPE_NAMES[declared]}: {FIELD_DESCRIPTIONS[path]}",
        }
    patterns: dict[str, Any] = {}
    for prefix in OPEN_PREFIXES:
        patterns["^" + re.escape(prefix) + r".*[^.]$"] = {
            "$ref": "#/$defs/test_any",
            "description": f"any: {OPEN_PREFIX_DESCRIPTIONS[prefix]}",
        }
    return properties, patterns


def _conditions(with_event: bool) -> dict[str, Any]:
    """The keys of ``when`` (with ``event``) or of one nested condition (exactly one key)."""
    fields, patterns = _field_properties()
    groups: dict[str, Any] = {
        "all": {
            "type": "array",
            "minItems": 1,
            "items": {"$ref": "#/$defs/condition"},
            "description": GROUP_HELP["all"],
        },
        "any": {
            "type": "array",
            "minItems": 1,
            "items": {"$ref": "#/$defs/condition"},
            "description": GROUP_HELP["any"],
        },
        "not": {"$ref": "#/$defs/condition", "description": GROUP_HELP["not"]},
    }
    properties: dict[str, Any] = {}
    if with_event:
        properties["event"] = {
            "description": "the event type this rule is for, or a list of them",
            "anyOf": [
                {"$ref": "#/$defs/event_type"},
                {
                    "type": "array",
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": {"$ref": "#/$defs/event_type"},
                },
            ],
        }
    properties.update(groups)
    properties.update(fields)
    out: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "patternProperties": patterns,
        "additionalProperties": False,
    }
    if with_event:
        out["required"] = ["event"]
        out["description"] = "everything under 'when' must hold: an event type and conditions"
    else:
        out["minProperties"] = 1
        out["maxProperties"] = 1
        out["description"] = "one condition: all, any, not or a field path"
    return out


def _annotation_schema(annotation: Any) -> dict[str, Any]:
    """JSON Schema of a plain argument type (strings may always be templates)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return {"anyOf": [{"enum": list(args)}, _TEMPLATE]}
    if origin in (typing.Union, types.UnionType):
        options = [_annotation_schema(arg) for arg in args if arg is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {"anyOf": [schema, {"type": "null"}]} if type(None) in args else schema
    if origin is tuple or origin is list:
        return {"type": "array", "items": _annotation_schema(args[0])}
    if annotation is str:
        return {"type": "string"}
    if annotation is int:
        return {"type": "integer"}
    if annotation is float:
        return {"type": "number", "minimum": 0}
    return {}


def _argument(action: str, name: str, annotation: Any) -> dict[str, Any]:
    """One action argument, with the rule language's extras over the model's plain type."""
    if action == "route" and name == "priority":
        schema: dict[str, Any] = {
            "anyOf": [{"type": "integer"}, {"enum": list(PRIORITY_NAMES)}],
        }
    elif action == "start_timer" and name == "after":
        schema = {
            "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _DURATION}]
        }
    elif action in ("send", "whisper") and name == "text":
        schema = {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": {"type": "string"},
                    "description": "text by language, e.g. { en: Hello, de: Hallo }",
                },
            ]
        }
    else:
        schema = _annotation_schema(annotation)
    return {**schema, "description": ACTION_HELP[action].args[name]}


def _action(name: str) -> dict[str, Any]:
    """The value of one action key: its arguments as a mapping, or the shorthand scalar."""
    help_ = ACTION_HELP[name]
    description = f"{help_.summary}. Example: {help_.example}"
    model, shorthand = ACTION_MODELS[name]
    if name == "stop":
        return {"description": description, "anyOf": [{"type": "null"}, {"const": {}}]}
    if name == "set":
        return {
            "description": description,
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {},
        }
    fields = {key: info for key, info in model.model_fields.items() if key != "kind"}
    properties = {key: _argument(name, key, info.annotation) for key, info in fields.items()}
    mapping: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    required = [key for key, info in fields.items() if info.is_required()]
    if required:
        mapping["required"] = required
    if name == "transfer":
        mapping["minProperties"] = 1
    forms: list[dict[str, Any]] = [mapping]
    if shorthand is not None:
        short = dict(properties[shorthand])
        short["description"] = f"shorthand for {{ {shorthand}: ... }}"
        forms.insert(0, short)
    if name == "close":
        forms.insert(0, {"type": "null"})
    return {"description": description, "anyOf": forms}


def build_schema() -> dict[str, Any]:
    """The JSON Schema of a rule file."""
    actions = {name: _action(name) for name in ACTION_MODELS}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://convctl.dev/schemas/rules.schema.json",
        "title": "convctl rule file",
        "description": "A list of rules. Generated by `convctl rules schema`; do not edit.",
        "type": "array",
        "items": {"$ref": "#/$defs/rule"},
        "$defs": {
            "rule": {
                "type": "object",
                "description": "a rule: when an event happens and the conditions hold, do this",
                "required": ["name", "when", "then"],
                "additionalProperties": False,
                "properties": {
                    "name": {
                        "type": "string",
                        "pattern": "^[a-z0-9][a-z0-9_-]*$",
                        "description": "unique across all files: a-z, 0-9, - and _",
                    },
                    "description": {"type": "string", "description": "what the rule is for"},
                    "when": {"$ref": "#/$defs/when"},
                    "then": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"$ref": "#/$defs/action"},
                        "description": "the actions, in order; 'stop' may only come last",
                    },
                },
            },
            "event_type": {
                "description": "an event type",
                "enum": list(EVENT_TYPES),
                "x-descriptions": {name: EVENT_DESCRIPTIONS[name] for name in EVENT_TYPES},
            },
            "when": _conditions(with_event=True),
            "condition": _conditions(with_event=False),
            **{f"test_{declared}": _field_test(declared) for declared in _TYPE_NAMES},
            "action": {
                "description": "one action: a mapping with one key, or the word stop",
                "anyOf": [
                    {"const": "stop", "description": ACTION_HELP["stop"].summary},
                    {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": 1,
                        "properties": actions,
                        "additionalProperties": False,
                    },
                ],
            },
        },
    }


def schema_text() -> str:
    """The schema as shipped: indented JSON with a final newline, keys in build order."""
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> None:
    """Regenerate the shipped schema file."""
    path.write_text(schema_text(), encoding="utf-8")
