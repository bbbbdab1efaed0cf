"""The survey example app (a separate process) end to end through the web chat.

The agent closes the conversation; the rules invite the survey app; it asks the customer for
a rating with buttons, keeps the tapped rating as the attribute ``csat`` and leaves; the
agent wraps up and the conversation closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.testing import RULES_DIR, ExampleProcess, Service

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "survey_app"


async def _admin(svc: Service, method: str, path: str, body: Any) -> Any:
    assert svc.http is not None
    headers = {"Authorization": f"Bearer {svc.settings.admin_token}"}
    async with svc.http.request(method, svc.base_url + path, json=body, headers=headers) as r:
        assert r.status < 300, await r.text()
        return await r.json()


async def test_the_survey_app_asks_after_the_agent_closes_and_keeps_the_rating(
    make_service: Callable[..., Any], tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "default.yaml").write_text((RULES_DIR / "default.yaml").read_text())
    (rules / "survey.yaml").write_text((EXAMPLE / "survey.yaml").read_text())
    # The real clock: the app checks the signature's timestamp against its own clock.
    svc: Service = await make_service(rules_dir=rules)
    survey = ExampleProcess(EXAMPLE / "app.py", tmp_path / "survey.log")
    registered = await _admin(
        svc,
        "POST",
        "/api/v1/apps",
        {
            "name": "survey",
            "scopes": ["conversations:join", "conversations:write"],
            "webhook_url": survey.base_url + "/webhook",
        },
    )
    survey.args = (
        *("--service", svc.base_url),
        *("--token", registered["token"], "--secret", registered["webhook_secret"]),
    )
    survey.start()
    try:
        await asyncio.to_thread(survey.wait_ready)
        customer = await svc.customer()
        alice = await svc.agent("alice")
        await alice.available()
        cid = str((await customer.say("agent please"))["conversation_id"])
        await alice.take(cid)
        await customer.wait_message("controller", "now chatting with alice")
        said = await alice.say(cid, "Your refund is on its way.")
        assert said["type"] == "ack", said
        await customer.wait_message("agent", "refund")

        closed = await alice.command({"type": "close", "conversation_id": cid})
        assert closed["type"] == "ack", closed
        question = await customer.wait_message("app", "How would you rate")
        assert [b["title"] for b in question["buttons"]] == ["1", "2", "3", "4", "5"]
        conv = await svc.until(cid, lambda c: c.state == "wrap_up")
        assert conv.find("app", "survey") is not None

        await customer.say("4", payload="csat_4")
        await customer.wait_message("app", "Thank you")
        conv = await svc.until(cid, lambda c: c.find("app", "survey") is None)
        assert conv.attributes["csat"] == 4
        assert conv.state == "wrap_up"
        # The agent's desk saw the survey and the answer too.
        await alice.wait_for(lambda f: f["type"] == "message" and f["message"]["text"] == "4")

        done = await alice.command(
            {"type": "wrap_up", "conversation_id": cid, "disposition": "solved"}
        )
        assert done["type"] == "ack", done
        conv = await svc.until(cid, lambda c: c.state == "closed")
        assert conv.attributes["csat"] == 4 and conv.attributes["disposition"] == "solved"
        kinds = [ev.type for ev, _ in await svc.store.events(cid)]
        assert kinds.count("app.joined") == 1 and kinds.count("app.left") == 1
        assert [e for e in kinds if e == "app.event"] == ["app.event"] * 3  # ask, set, thanks
    finally:
        survey.stop()
