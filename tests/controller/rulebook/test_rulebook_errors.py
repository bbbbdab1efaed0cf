"""Load errors: all reported at once, each with file:line:col and the rule name."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import ConvctlError, RuleError
from controller.rulebook import Rulebook


def errors_of(sources: dict[str, str], settings: dict[str, object] | None = None) -> list[str]:
    with pytest.raises(RuleError) as caught:
        Rulebook.from_sources(list(sources.items()), settings=settings or {})
    assert isinstance(caught.value, ConvctlError)
    return caught.value.errors


BAD = """\
- name: one
  when:
    event: customer.mesage
    conversation.stat: bot
  then:
    - rout: {queue: x}
- name: two
  when:
    event: customer.message
    customer.present: "yes"
    conversation.priority: {gt: "3"}
    event.text: {matches: "(unclosed"}
    now.local_time: 10:30
  then:
    - start_timer: {name: t, after: settings.nope}
    - route: {queue: q, priority: highest, skill: [a]}
    - send: {to: everyone, text: hi}
"""


def test_many_errors_in_one_file_with_positions() -> None:
    errors = errors_of({"bad.yaml": BAD}, settings={"idle": 5})
    assert errors == [
        (
            "bad.yaml:3:12: rule 'one': unknown event type 'customer.mesage'; "
            "did you mean 'customer.message'?"
        ),
        (
            "bad.yaml:4:5: rule 'one': unknown field 'conversation.stat'; "
            "did you mean 'conversation.state'?"
        ),
        "bad.yaml:6:7: rule 'one': unknown action 'rout'; did you mean 'route'?",
        "bad.yaml:10:23: rule 'two': 'customer.present' is a boolean, but the value is text",
        (
            "bad.yaml:11:33: rule 'two': 'conversation.priority' is a number; 'gt' needs a number "
            "(or text for a text field), not text"
        ),
        (
            "bad.yaml:12:27: rule 'two': invalid regular expression: "
            "missing ), unterminated subpattern at position 0"
        ),
        (
            "bad.yaml:13:21: rule 'two': 'now.local_time' is text, but the value is a number "
            '(quote it, e.g. "09:30", if you meant text)'
        ),
        "bad.yaml:15:37: rule 'two': unknown setting 'nope'",
        (
            "bad.yaml:16:35: rule 'two': priority must be a whole number or one of low, normal, "
            "high, urgent; did you mean 'high'?"
        ),
        (
            "bad.yaml:16:44: rule 'two': 'route' has no argument 'skill'; did you mean 'skills'? "
            "(it takes queue, priority, skills)"
        ),
        (
            "bad.yaml:17:18: rule 'two': 'send' argument 'to': "
            "Input should be 'customer' or 'agents'"
        ),
    ]


def test_duplicate_names_across_files_and_missing_parts() -> None:
    errors = errors_of(
        {
            "a.yaml": "- name: dup\n  when: {event: bot.failed}\n  then: [stop]\n",
            "b.yaml": (
                "- name: dup\n  when: {event: bot.failed}\n  then: [stop]\n"
                "- name: Bad Name\n  when: {event: bot.failed}\n  then: [stop]\n"
                "- name: nothing\n  wen: {event: bot.failed}\n"
                "- name: empty\n  when: {conversation.state: bot}\n  then: []\n"
            ),
        }
    )
    assert errors == [
        "b.yaml:1:9: rule 'dup': duplicate rule name (first defined at a.yaml:1:9)",
        (
            "b.yaml:4:9: rule 'Bad Name': 'name' must be lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit"
        ),
        "b.yaml:8:3: rule 'nothing': unknown rule key 'wen'; did you mean 'when'?",
        "b.yaml:7:3: rule 'nothing': missing 'when'",
        "b.yaml:7:3: rule 'nothing': missing 'then'",
        "b.yaml:10:9: rule 'empty': 'when' needs an 'event' (one type or a list)",
        "b.yaml:11:9: rule 'empty': 'then' must be a non-empty list of actions",
    ]


@pytest.mark.parametrize(
    ("when", "then", "message"),
    [
        ("conversation.attributes: {eq: 1}", "[stop]", "'conversation.attributes' is a mapping"),
        ("conversation.labels: {in: [a]}", "[stop]", "compares a single value"),
        ("conversation.state: {in: []}", "[stop]", "needs a non-empty list"),
        ("conversation.state: {eq: null}", "[stop]", "use 'exists: false'"),
        ("conversation.state: {is: bot}", "[stop]", "unknown operator 'is'"),
        ("conversation.state: {eq: a, ne: b}", "[stop]", "exactly one operator"),
        ("al: []", "[stop]", "unknown condition 'al'; did you mean 'all'?"),
        ("all: []", "[stop]", "non-empty list"),
        ("not: {a: 1, b: 2}", "[stop]", "exactly one key"),
        ("customer.profile.x: {exists: 1}", "[stop]", "'exists' takes true or false"),
        ("customer.prfile.tier: gold", "[stop]", "did you mean 'customer.profile.tier'?"),
        ("queue.open: {contains: x}", "[stop]", "'contains' works on text and lists"),
        ("queue.position: {matches: x}", "[stop]", "'matches' works on text"),
        ("queue.name: {gt: 3}", "[stop]", "'gt' needs a number"),
        ("queue.name: bot", "[stop, {label: x}]", "'stop' must be the last action"),
        ("queue.name: bot", "[{labl: x}]", "did you mean 'label'?"),
        ("queue.name: bot", "[{label: ''}]", "'label' argument 'label'"),
        ("queue.name: bot", "[{transfer: {}}]", "needs a queue or an agent"),
        ("queue.name: bot", "[{send: {text: {}}}]", "text must be a string or a mapping"),
        ("queue.name: bot", "[{send: {text: '{{ customr.id }}'}}]", "did you mean 'customer.id'?"),
        ("queue.name: bot", "[{send: {text: 'a {{ b'}}]", "unbalanced"),
        ("queue.name: bot", "[{start_timer: {name: t, after: 5 minutes}}]", "invalid duration"),
        ("queue.name: bot", "[{start_timer: {name: t, after: -1}}]", "cannot be negative"),
        ("queue.name: bot", "[{start_timer: {name: t, after: settings.s}}]", "must be a number"),
        ("queue.name: bot", "[{route: [a]}]", "'route' takes"),
        ("queue.name: bot", "[send]", "one-key mapping"),
    ],
)
def test_single_error(when: str, then: str, message: str) -> None:
    text = f"- name: r\n  when: {{event: bot.failed, {when}}}\n  then: {then}\n"
    errors = errors_of({"f.yaml": text}, settings={"s": "soon"})
    assert len(errors) == 1, errors
    assert errors[0].startswith("f.yaml:")
    assert message in errors[0]


def test_file_level_errors(tmp_path: Path) -> None:
    assert errors_of({"x.yaml": "a: 1\n"}) == ["x.yaml:1:1: a rules file is a list of rules"]
    (error,) = errors_of({"y.yaml": "- name: r\n  when: [\n"})
    assert error.startswith("y.yaml:3:1: YAML syntax error")
    with pytest.raises(RuleError, match="no such rules file"):
        Rulebook.load(tmp_path / "missing.yaml", settings={})
