"""A scripted demo bot: keyword → reply, and a handoff keyword. Needs no external system."""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import Field

from connectors.base import Bot, BotMessage, BotReply, BotRequest, BotSettings, ConnectorSettings


class DemoBotSettings(BotSettings):
    replies: dict[str, str] = Field(
        default_factory=lambda: {
            "hi": "Hello! I am the demo bot. Ask me about 'hours' or 'prices', or write "
            "'agent' to talk to a person.",
            "hello": "Hello! Write 'agent' to talk to a person.",
            "hours": "We are open Monday to Friday, 9:00 to 17:00.",
            "prices": "Our plans start at 10 EUR a month.",
            "bye": "Goodbye!",
        }
    )
    handoff_keywords: list[str] = Field(default_factory=lambda: ["agent", "human", "person"])
    handoff_reply: str = "Let me find an agent for you."
    end_keywords: list[str] = Field(default_factory=lambda: ["bye"])
    fallback: str = "Sorry, I did not understand. Write 'agent' to talk to a person."


_WORD = re.compile(r"[a-z0-9']+")


class DemoBot(Bot):
    """Answers by the first known keyword in the message, in the order words appear."""

    settings_model: ClassVar[type[ConnectorSettings]] = DemoBotSettings
    settings: DemoBotSettings  # type: ignore[assignment]

    async def ask(self, request: BotRequest) -> BotReply:
        words = _WORD.findall(request.text.lower())
        s = self.settings
        for word in words:
            if word in s.handoff_keywords:
                return BotReply(
                    messages=(BotMessage(s.handoff_reply),),
                    handoff=True,
                    intent="handoff",
                    confidence=1.0,
                )
        for word in words:
            if word in s.replies:
                return BotReply(
                    messages=(BotMessage(s.replies[word]),),
                    ended=word in s.end_keywords,
                    intent=word,
                    confidence=1.0,
                )
        return BotReply(messages=(BotMessage(s.fallback),), intent="fallback", confidence=0.0)
