"""Agents' capacity per channel, skill levels and teams through the settings and the admin
and agent APIs, and queues restricted to teams end to end (web chat customer, desks)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.clock import ManualClock
from controller.keys import ROUTER
from controller.testing import RULES_DIR, AgentClient, Service


async def _define(service: Service, agent: AgentClient | str, **fields: Any) -> Any:
    """POST /api/v1/agents (create or update); the answer's JSON."""
    assert service.http is not None
    agent_id = agent if isinstance(agent, str) else agent.id
    r = await service.http.post(
        service.base_url + "/api/v1/agents",
        json={"id": agent_id, "name": agent_id.title(), **fields},
        headers=service.admin_headers(),
    )
    assert r.status == 200, await r.text()
    return await r.json()


async def _me(service: Service, agent: AgentClient) -> Any:
    r = await agent.http.get(service.base_url + "/api/v1/agents/me")
    assert r.status == 200, await r.text()
    return await r.json()


async def test_agents_me_shows_channels_levels_and_teams(service: Service) -> None:
    alice = await service.agent("alice")
    defined = await _define(
        service,
        alice,
        capacity=4,
        channels={"webchat": 3, "whatsapp": 2, "messenger": 2},
        skills={"billing": 7, "german": 3},
        teams=["tier1", "gold"],
    )
    me = await _me(service, alice)
    assert me == defined
    assert me["capacity"] == 4 and me["load"] == 0
    assert me["channels"] == {
        "messenger": {"capacity": 2, "load": 0},
        "webchat": {"capacity": 3, "load": 0},
        "whatsapp": {"capacity": 2, "load": 0},
    }
    assert me["skills"] == {"billing": 7, "german": 3}
    assert me["teams"] == ["gold", "tier1"]
    # without a total, the channels add up; a plain list of skills is level 1 each
    me = await _define(service, alice, channels={"webchat": 2, "whatsapp": 1}, skills=["fr"])
    assert me["capacity"] == 3 and me["skills"] == {"fr": 1} and me["teams"] == []
    me = await _define(service, alice)  # neither: 3 in total, any channel
    assert me["capacity"] == 3 and me["channels"] == {}
    stored = await service.store.agent("alice")
    assert stored is not None and stored.capacity == 3 and dict(stored.skills) == {}


@pytest.mark.parametrize(
    "fields",
    [
        {"channels": {"webchat": -1}},
        {"channels": {"Web Chat": 1}},
        {"channels": {"webchat": 101}},
        {"skills": {"billing": 11}},
        {"skills": {"billing": 0}},
        {"skills": "billing"},
        {"teams": [""]},
        {"capacity": 0},
    ],
)
async def test_bad_agent_definitions_are_refused(service: Service, fields: Any) -> None:
    assert service.http is not None
    r = await service.http.post(
        service.base_url + "/api/v1/agents",
        json={"id": "zed", "name": "Zed", **fields},
        headers=service.admin_headers(),
    )
    assert r.status == 422, await r.text()
    assert (await r.json())["error"]["code"] == "invalid_body"
    assert not service.app[ROUTER].agent_known("zed")


async def test_agents_from_the_settings(make_service: Callable[..., Any]) -> None:
    service: Service = await make_service(
        agents=[
            {
                "id": "zoe",
                "name": "Zoe",
                "channels": {"whatsapp": 2},
                "skills": {"billing": 4},
                "teams": ["gold"],
            }
        ]
    )
    view = service.app[ROUTER].agent_view("zoe")
    assert view["capacity"] == 2 and view["channels"] == {"whatsapp": {"capacity": 2, "load": 0}}
    assert view["skills"] == {"billing": 4} and view["teams"] == ["gold"]


async def test_a_queue_for_a_team_and_a_transfer_to_it(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    """`support` is served by team tier1 only, `tier2` by team tier2: a transfer to the
    queue `tier2` is the transfer to that team."""
    service: Service = await make_service(
        clock=clock,
        queues=["support", "tier2"],
        queue_routing={"support": {"teams": ["tier1"]}, "tier2": {"teams": ["tier2"]}},
    )
    outsider = await service.agent("olga")
    alice = await service.agent("alice")
    carol = await service.agent("carol")
    await _define(service, alice, teams=["tier1"])
    await _define(service, carol, teams=["tier2"])
    clock.advance(1)
    for agent in (outsider, alice, carol):  # olga idle longest, but in no team
        await agent.available()
        clock.advance(1)
    customer = await service.customer()
    conversation_id = (await customer.say("agent"))["conversation_id"]
    await alice.take(conversation_id)
    await customer.wait_message("controller", "now chatting with alice")
    ack = await alice.command(
        {"type": "transfer", "conversation_id": conversation_id, "queue": "tier2"}
    )
    assert ack["type"] == "ack", ack
    await carol.take(conversation_id)
    conv = await service.until(conversation_id, lambda c: c.state == "agent")
    assert [(p.role, p.id) for p in conv.participants] == [("agent", "carol")]
    assert not [f for f in outsider.frames if f["type"] == "offer"]


_FACTS_RULE = """
- name: tell-who-can-help
  when:
    event: customer.message
    conversation.state: queued
    queue.waiting: { gte: 1 }
  then:
    - send:
        to: customer
        text: "{{ queue.waiting }} waiting; {{ queue.agents_available }} can help"
"""


async def test_rules_see_agents_of_the_queues_team_and_the_waiting_count(
    make_service: Callable[..., Any], tmp_path: Path, clock: ManualClock
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES_DIR / "default.yaml", rules / "default.yaml")
    (rules / "facts.yaml").write_text(_FACTS_RULE)
    service: Service = await make_service(
        clock=clock, rules_dir=rules, queue_routing={"support": {"teams": ["tier1"]}}
    )
    outsider = await service.agent("olga")
    await outsider.available()  # available, room, but not in the queue's team
    member = await service.agent("alice")
    await _define(service, member, teams=["tier1"], channels={"whatsapp": 1})
    await member.available()  # in the team, but no room for web chat
    customer = await service.customer()
    conversation_id = (await customer.say("agent"))["conversation_id"]
    await customer.wait_message("controller", "You are in the queue")
    await customer.say("anyone?")
    told = await customer.wait_message("controller", "waiting;")
    assert told["text"] == "1 waiting; 0 can help"
    await _define(service, member, teams=["tier1"], channels={"whatsapp": 1, "webchat": 1})
    offer = await member.wait_offer()
    assert offer["conversation_id"] == conversation_id
    assert not [f for f in outsider.frames if f["type"] == "offer"]
