"""durable-rules at scale: sharding beyond one ruleset, and no sid leak over many decides."""

from __future__ import annotations

from typing import Any

import pytest

from controller.rulebook.matching import SHARD_LEAVES, SHARD_SIZE


def many_rules(count: int, distinct: int) -> str:
    """``count`` rules whose conditions use ``distinct`` different thresholds."""
    return "".join(
        f"""
- name: r{n}
  when:
    event: customer.message
    conversation.attributes.n: {{gte: {n % distinct}}}
    not: {{conversation.attributes.skip: {n % distinct}}}
  then: [{{label: "l{n}"}}]
"""
        for n in range(count)
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("distinct", "shards"), [(900, 9), (30, 3)])
def test_900_rules_for_one_event_type_are_sharded(
    make_book: Any, distinct: int, shards: int
) -> None:
    # 900 thresholds: 1800 leaves, the leaf budget splits; 30 thresholds: the rule count does.
    book = make_book(many_rules(900, distinct))
    (group,) = book._groups.values()
    assert len(group.shards) == shards
    assert all(len(shard.entries) <= SHARD_SIZE for shard in group.shards)
    assert all(len(shard.leaves) <= SHARD_LEAVES for shard in group.shards)
    attributes: dict[str, Any] = {"n": 20}
    facts = {"event": {"type": "customer.message"}, "conversation": {"attributes": attributes}}
    expected = [f"r{n}" for n in range(900) if n % distinct <= 20]
    for matcher in ("durable", "reference"):
        assert [rule.rule for rule in book.decide(facts, matcher=matcher)] == expected
    attributes["skip"] = 3
    result = [rule.rule for rule in book.decide(facts)]
    assert result == [f"r{n}" for n in range(900) if n % distinct <= 20 and n % distinct != 3]


@pytest.mark.timeout(120)
def test_20k_decides_do_not_leak_sids(make_book: Any) -> None:
    book = make_book(
        """
- name: greet
  when: {event: customer.message, event.text: {contains: hi}}
  then: [{label: greeted}]
- name: other
  when: {event: customer.message, not: {event.text: {contains: hi}}}
  then: [{label: other}]
"""
    )
    hits = 0
    for n in range(20_000):
        text = "hi there" if n % 2 else "hello"
        result = book.decide({"event": {"type": "customer.message", "text": text}})
        assert len(result) == 1
        hits += result[0].rule == "greet"
    assert hits == 10_000


def test_catch_all_handles_facts_matching_no_rule(make_book: Any) -> None:
    book = make_book("- name: r\n  when: {event: bot.failed, bot.name: x}\n  then: [stop]\n")
    for _ in range(2_000):
        assert book.decide({"event": {"type": "bot.failed"}, "bot": {"name": "y"}}) == []


@pytest.mark.timeout(120)
def test_decides_from_several_threads(make_book: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    book = make_book(
        "- name: r\n  when: {event: customer.message, conversation.attributes.k: {gt: 5}}\n"
        "  then: [{set: {seen: '{{ conversation.attributes.k }}'}}]\n"
    )

    def work(k: int) -> list[str]:
        facts = {"event": {"type": "customer.message"}, "conversation": {"attributes": {"k": k}}}
        return [
            str(action.values["seen"]) for rule in book.decide(facts) for action in rule.actions
        ]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(2_000)))
    assert results == [[str(k)] if k > 5 else [] for k in range(2_000)]
