"""Authoring aids: the shipped JSON Schema and README reference are generated and current."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml

from controller.models.events import EVENT_TYPES
from controller.rulebook.actions import ACTION_HELP, ACTION_MODELS
from controller.rulebook.conditions import OPERATOR_HELP, OPERATORS
from controller.rulebook.fields import (
    EVENT_DESCRIPTIONS,
    FIELD_DESCRIPTIONS,
    FIELDS,
    OPEN_PREFIX_DESCRIPTIONS,
    OPEN_PREFIXES,
)
from controller.rulebook.reference import END, START, render_reference, replace_block
from controller.rulebook.schema import SCHEMA_PATH, build_schema, schema_text
from controller.testing import RULES_DIR


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = build_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_registry_entry_is_described() -> None:
    assert set(FIELD_DESCRIPTIONS) == set(FIELDS)
    assert set(OPEN_PREFIX_DESCRIPTIONS) == set(OPEN_PREFIXES)
    assert set(EVENT_DESCRIPTIONS) == set(EVENT_TYPES)
    assert set(OPERATOR_HELP) == set(OPERATORS)
    assert set(ACTION_HELP) == set(ACTION_MODELS)
    for name, (model, _) in ACTION_MODELS.items():
        arguments = {key for key in model.model_fields if key != "kind"}
        expected = {"values"} if name == "set" else arguments
        assert set(ACTION_HELP[name].args) == expected, name


def test_shipped_schema_is_the_generated_one() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), (
        "run: convctl rules schema > controller/rulebook/rules.schema.json"
    )
    assert json.loads(schema_text()) == build_schema()


def test_default_rules_validate_and_name_the_schema(
    validator: jsonschema.Draft202012Validator,
) -> None:
    text = (RULES_DIR / "default.yaml").read_text(encoding="utf-8")
    assert text.startswith(
        "# yaml-language-server: $schema=../controller/rulebook/rules.schema.json\n"
    )
    assert (RULES_DIR / "default.yaml").parent.joinpath(
        "../controller/rulebook/rules.schema.json"
    ).resolve() == SCHEMA_PATH.resolve()
    errors = [error.message for error in validator.iter_errors(yaml.safe_load(text))]
    assert errors == []


def _rule(when: dict[str, Any], then: list[Any]) -> list[dict[str, Any]]:
    return [{"name": "r", "when": {"event": "customer.message", **when}, "then": then}]


@pytest.mark.parametrize(
    ("when", "then"),
    [
        ({}, [{"clos": "idle"}]),  # misspelt action
        ({}, ["stp"]),
        ({}, [{"route": {"queue": "support", "priority": "highest"}}]),
        ({}, [{"route": {"queue": "support", "skill": ["a"]}}]),
        ({}, [{"close": "idle", "stop": None}]),
        ({}, [{"start_timer": {"name": "t", "after": "5 minutes"}}]),
        ({}, [{"transfer": {}}]),
        ({"conversation.stat": "bot"}, ["stop"]),  # misspelt field
        ({"customer.present": "yes"}, ["stop"]),
        ({"conversation.state": {"eqq": "bot"}}, ["stop"]),
        ({"conversation.state": {"eq": "bot", "ne": "agent"}}, ["stop"]),
        ({"conversation.attributes": "x"}, ["stop"]),
        ({"all": [{"a": 1, "b": 2}]}, ["stop"]),
    ],
)
def test_invalid_rules_fail_validation(
    validator: jsonschema.Draft202012Validator, when: dict[str, Any], then: list[Any]
) -> None:
    assert not validator.is_valid(_rule(when, then))


def test_valid_shapes_pass(validator: jsonschema.Draft202012Validator) -> None:
    rules = _rule(
        {
            "conversation.attributes.order_id": {"exists": True},
            "bot.slots.city": "Berlin",
            "any": [{"now.local_time": {"gte": "09:00"}}, {"not": {"queue.open": True}}],
            "conversation.labels": {"contains": "vip"},
            "event.text": {"matches": "(?i)cancel"},
        },
        [
            {"invite_bot": "demo"},
            {"set_bot_mode": {"mode": "assist"}},
            {"route": {"queue": "{{ conversation.queue | support }}", "priority": 5}},
            {"transfer": {"agent": "bob"}},
            {"send": {"to": "agents", "text": {"en": "Hi", "de": "Hallo"}}},
            {"whisper": "VIP"},
            {"start_timer": {"name": "t", "after": "settings.idle_close"}},
            {"start_timer": {"name": "t", "after": "1h30m"}},
            {"set": {"topic": "billing", "n": 3}},
            {"remove_participant": {"role": "agent", "id": None}},
            {"close": None},
            "stop",
        ],
    )
    assert [error.message for error in validator.iter_errors(rules)] == []


def test_readme_reference_block_is_current() -> None:
    readme = (RULES_DIR / "README.md").read_text(encoding="utf-8")
    assert readme.count(START) == 1 and readme.count(END) == 1
    assert replace_block(readme, render_reference()) == readme, (
        "run: convctl rules reference --write rules/README.md"
    )
    for path in FIELDS:
        assert f"| `{path}` |" in readme
    for action in ACTION_MODELS:
        assert f"| `{action}` |" in readme


def test_replace_block_needs_the_markers() -> None:
    with pytest.raises(ValueError):
        replace_block("no markers here", "x")
