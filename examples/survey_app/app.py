#!/usr/bin/env python3
"""A one-question satisfaction survey, as a convctl app (a separate process).

convctl invites it into a conversation (the rules' ``invite_app: { app: survey }``, e.g.
when an agent has closed the conversation). The app then hears the conversation's events on
its webhook, signed by convctl. It asks the customer for a rating from 1 to 5 (with buttons
where the channel shows them), keeps the answer as the conversation attribute ``csat`` and
leaves. A reply that is not a rating is asked again once; then the app leaves without one.

    python examples/survey_app/app.py --port 8090 --service http://127.0.0.1:8080 \
        --token APP_TOKEN --secret WEBHOOK_SECRET

The app is registered first (``POST /api/v1/apps`` with the scopes ``conversations:join``
and ``conversations:write`` and ``webhook_url`` ``http://HOST:8090/webhook``); the answer
gives the token and the webhook secret. It needs only aiohttp.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import time
from typing import Any

from aiohttp import ClientSession, web

QUESTION = "How would you rate the help you got today, from 1 (poor) to 5 (excellent)?"
AGAIN = "Please answer with a number from 1 to 5."
THANKS = "Thank you for your feedback!"
TOLERANCE = 300  # seconds a delivery's timestamp may be off


def verify(secret: str, body: bytes, headers: Any) -> None:
    """Raise ValueError unless convctl signed ``body`` (a fresh, matching v1 signature)."""
    ts = headers.get("Convctl-Timestamp", "")
    offered = headers.get("Convctl-Signature", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > TOLERANCE:
        raise ValueError("missing or stale timestamp")
    mac = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest("v1=" + mac, v.strip()) for v in offered.split(",")):
        raise ValueError("bad signature")


class Survey:
    def __init__(self, service: str, token: str, secret: str, name: str) -> None:
        self.service = service.rstrip("/")
        self.secret = secret
        self.name = name
        self.headers = {"Authorization": f"Bearer {token}"}
        self.seen: set[str] = set()  # delivery ids handled (deliveries are at least once)
        self.asked: dict[str, int] = {}  # conversation id -> times asked
        self.http: ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.http = ClientSession()

    async def stop(self, app: web.Application) -> None:
        if self.http is not None:
            await self.http.close()

    async def call(self, method: str, cid: str, what: str, body: dict[str, Any], key: str) -> None:
        assert self.http is not None
        url = f"{self.service}/api/v1/apps/me/conversations/{cid}/{what}"
        headers = {**self.headers, "Idempotency-Key": key}
        async with self.http.request(method, url, json=body, headers=headers) as r:
            if r.status >= 400:
                # 409: the conversation moved on (closed, or the app already left); a retry
                # of this delivery cannot help. Anything else: fail, convctl retries.
                print(f"{method} {what}: {r.status} {await r.text()}", flush=True)
                if r.status != 409:
                    raise RuntimeError(f"{method} {what}: {r.status}")

    async def ask(self, cid: str, delivery: str, text: str) -> None:
        self.asked[cid] = self.asked.get(cid, 0) + 1
        buttons = [{"title": str(n), "payload": f"csat_{n}"} for n in range(1, 6)]
        await self.call(
            "POST", cid, "messages", {"text": text, "buttons": buttons}, f"ask:{delivery}"
        )

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(self.secret, body, request.headers)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=401)
        delivery = request.headers.get("Convctl-Delivery-Id", "")
        if delivery in self.seen:
            return web.json_response({"ok": True, "duplicate": True})
        payload = json.loads(body)
        event, cid = payload["event"], payload["conversation_id"]
        data = event.get("data") or {}
        if event["type"] == "app.joined" and data.get("app") == self.name:
            await self.ask(cid, delivery, QUESTION)
        elif event["type"] == "customer.message" and cid in self.asked:
            answer = str(data.get("reply_id") or data.get("text") or "")
            found = re.search(r"[1-5]", answer)
            if found:
                rating = int(found.group())
                await self.call(
                    "PUT", cid, "attributes", {"attributes": {"csat": rating}}, f"set:{delivery}"
                )
                await self.call("POST", cid, "messages", {"text": THANKS}, f"thanks:{delivery}")
                await self.call("POST", cid, "leave", {}, f"leave:{delivery}")
                self.asked.pop(cid, None)
            elif self.asked[cid] < 2:
                await self.ask(cid, delivery, AGAIN)
            else:
                await self.call("POST", cid, "leave", {}, f"leave:{delivery}")
                self.asked.pop(cid, None)
        self.seen.add(delivery)
        return web.json_response({"ok": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--service", default="http://127.0.0.1:8080")
    parser.add_argument("--token", required=True, help="the app's API token")
    parser.add_argument("--secret", required=True, help="the app's webhook secret")
    parser.add_argument("--name", default="survey", help="the app's registered name")
    args = parser.parse_args()
    survey = Survey(args.service, args.token, args.secret, args.name)
    app = web.Application()
    app.on_startup.append(survey.start)
    app.on_cleanup.append(survey.stop)
    app.router.add_post("/webhook", survey.webhook)
    app.router.add_get("/healthz", lambda r: web.json_response({"status": "ok"}))
    web.run_app(app, host=args.host, port=args.port, print=lambda *_: None)


if __name__ == "__main__":
    main()
