"""``lint``: configured names, rules that can never match, rules shadowed by a stop."""

from __future__ import annotations

from controller.rulebook import Rulebook
from controller.rulebook.lint import lint


def lint_of(*files: tuple[str, str]) -> list[str]:
    with Rulebook.from_sources(list(files), settings={}, matcher="reference") as book:
        return lint(book, bots=["demo", "rasa"], queues=["support", "billing"])


def test_clean_rules_have_no_findings() -> None:
    text = """\
- name: ok
  when:
    event: customer.message
    conversation.state: { in: [bot, agent] }
    conversation.priority: { gt: 1 }
    conversation.queue: { ne: billing }
  then:
    - invite_bot: demo
    - set_bot_mode: { mode: assist }
    - route: { queue: "{{ conversation.queue | nowhere }}" }
    - transfer: { queue: billing }
    - stop
- name: later-with-other-condition
  when:
    event: customer.message
    conversation.state: bot
  then:
    - close: idle
"""
    assert lint_of(("a.yaml", text)) == []


def test_unknown_bots_and_queues_at_the_action() -> None:
    text = """\
- name: names
  when:
    event: conversation.created
  then:
    - invite_bot: { bot: dmeo, mode: direct }
    - set_bot_mode: { mode: assist, bot: lex }
    - route: { queue: suport, priority: high }
    - transfer: { queue: vip }
    - transfer: { agent: bob }
"""
    assert lint_of(("a.yaml", text)) == [
        "a.yaml:5:7: rule 'names': unknown bot 'dmeo'; did you mean 'demo'? "
        "(configured: demo, rasa)",
        "a.yaml:6:7: rule 'names': unknown bot 'lex' (configured: demo, rasa)",
        "a.yaml:7:7: rule 'names': unknown queue 'suport'; did you mean 'support'? "
        "(setting 'queues': billing, support)",
        "a.yaml:8:7: rule 'names': unknown queue 'vip' (setting 'queues': billing, support)",
    ]


NEVER = """\
- name: two-values
  when:
    event: customer.message
    all:
      - conversation.state: bot
      - conversation.state: agent
  then: [stop]
- name: eq-and-ne
  when:
    event: customer.message
    conversation.state: bot
    all:
      - conversation.state: { ne: bot }
  then: [stop]
- name: in-disjoint
  when:
    event: bot.message
    conversation.state: { in: [bot, agent] }
    all:
      - conversation.state: { not_in: [bot, agent] }
  then: [stop]
- name: bounds
  when:
    event: bot.message
    conversation.idle: { gt: 10 }
    all:
      - conversation.idle: { lt: 5 }
  then: [stop]
- name: exists-and-missing
  when:
    event: bot.message
    conversation.attributes.x: { exists: false }
    all:
      - conversation.attributes.x: 3
  then: [stop]
- name: self-negation
  when:
    event: bot.ended
    all:
      - customer.present: true
      - not: { customer.present: true }
  then: [stop]
- name: every-branch
  when:
    event: bot.failed
    conversation.state: queued
    any:
      - conversation.state: bot
      - conversation.state: agent
  then: [stop]
- name: possible-branch
  when:
    event: bot.failed
    conversation.state: queued
    any:
      - conversation.state: bot
      - conversation.queue: support
  then: [stop]
- name: possible-missing
  when:
    event: bot.failed
    not:
      any:
        - conversation.queue: support
        - conversation.queue: { ne: support }
  then: [close: x]
"""


def test_rules_that_can_never_match() -> None:
    found = lint_of(("n.yaml", NEVER))
    suffix = "can never match: its conditions contradict each other"
    assert [line.split(" (the same")[0] for line in found] == [
        f"n.yaml:1:3: rule 'two-values': {suffix}",
        f"n.yaml:8:3: rule 'eq-and-ne': {suffix}",
        f"n.yaml:15:3: rule 'in-disjoint': {suffix}",
        f"n.yaml:22:3: rule 'bounds': {suffix}",
        f"n.yaml:29:3: rule 'exists-and-missing': {suffix}",
        f"n.yaml:36:3: rule 'self-negation': {suffix}",
        f"n.yaml:43:3: rule 'every-branch': {suffix}",
    ]


def test_rules_shadowed_by_an_earlier_stop() -> None:
    first = """\
- name: catch-all
  when:
    event: [customer.message, bot.message]
  then:
    - close: x
    - stop
- name: same-condition
  when:
    event: agent.message
    conversation.state: agent
  then: [stop]
"""
    second = """\
- name: shadowed
  when:
    event: customer.message
    conversation.state: bot
  then:
    - close: y
- name: shadowed-too
  when:
    event: agent.message
    conversation.state: agent
  then:
    - close: y
- name: not-shadowed
  when:
    event: agent.message
    conversation.state: queued
  then:
    - close: y
"""
    assert lint_of(("b.yaml", second), ("a.yaml", first)) == [
        "b.yaml:1:3: rule 'shadowed': never fires for 'customer.message': rule 'catch-all' "
        "(a.yaml:1:3) comes first, has no conditions and stops",
        "b.yaml:7:3: rule 'shadowed-too': never fires for 'agent.message': rule "
        "'same-condition' (a.yaml:7:3) comes first, has the same conditions and stops",
    ]
