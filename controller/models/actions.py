"""Actions: what a rule asks the controller to do. Each is a small frozen model.

Rules produce these (after templates and settings are resolved); the machine applies them
in order. A refused action is refused alone and recorded with the rule that asked for it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PRIORITY_NAMES: dict[str, int] = {"low": -10, "normal": 0, "high": 10, "urgent": 20}


class _Action(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InviteBot(_Action):
    kind: Literal["invite_bot"] = "invite_bot"
    bot: str = Field(min_length=1)
    mode: Literal["direct", "assist"] = "direct"


class InviteApp(_Action):
    """An app (by its registered name) joins the conversation, e.g. a survey after the agent."""

    kind: Literal["invite_app"] = "invite_app"
    app: str = Field(min_length=1, max_length=100)


class SetBotMode(_Action):
    kind: Literal["set_bot_mode"] = "set_bot_mode"
    mode: Literal["direct", "assist"]
    bot: str | None = None


class RemoveParticipant(_Action):
    kind: Literal["remove_participant"] = "remove_participant"
    role: Literal["agent", "bot", "app"]
    id: str | None = None
    reason: str = "removed"


class Route(_Action):
    kind: Literal["route"] = "route"
    queue: str = Field(min_length=1)
    priority: int = 0
    skills: tuple[str, ...] = ()


class Assign(_Action):
    kind: Literal["assign"] = "assign"
    agent: str = Field(min_length=1)


class Transfer(_Action):
    kind: Literal["transfer"] = "transfer"
    queue: str | None = None
    agent: str | None = None


class MessageTemplate(_Action):
    """A pre-approved message template (WhatsApp), for customers outside the 24 h window.

    Channels without templates send the ``text`` of the ``send`` action instead.
    """

    name: str = Field(min_length=1, max_length=512, pattern=r"^[a-z0-9_]+$")
    language: str | None = Field(default=None, min_length=2, max_length=15)
    parameters: tuple[str | int | float, ...] = ()


class MessageButton(_Action):
    title: str = Field(min_length=1, max_length=256)
    payload: str | None = Field(default=None, min_length=1, max_length=1024)


class Send(_Action):
    """A message from the controller, to the customer or to the agents of the conversation.

    ``text`` is already resolved to one language when the action is produced. ``buttons``
    offer choices (a tapped one comes back as ``event.reply_id``); ``template`` names a
    WhatsApp template sent instead of the text where the channel has templates.
    """

    kind: Literal["send"] = "send"
    to: Literal["customer", "agents"] = "customer"
    text: str = Field(min_length=1)
    buttons: tuple[MessageButton, ...] = Field(default=(), max_length=10)
    template: MessageTemplate | None = None


class Whisper(_Action):
    kind: Literal["whisper"] = "whisper"
    text: str = Field(min_length=1)


class StartTimer(_Action):
    kind: Literal["start_timer"] = "start_timer"
    name: str = Field(min_length=1)
    after: float = Field(ge=0)


class CancelTimer(_Action):
    kind: Literal["cancel_timer"] = "cancel_timer"
    name: str = Field(min_length=1)


class SetAttributes(_Action):
    kind: Literal["set"] = "set"
    values: dict[str, Any]


class Label(_Action):
    kind: Literal["label"] = "label"
    label: str = Field(min_length=1)


class Unlabel(_Action):
    kind: Literal["unlabel"] = "unlabel"
    label: str = Field(min_length=1)


class Close(_Action):
    kind: Literal["close"] = "close"
    reason: str = "closed"


class Stop(_Action):
    kind: Literal["stop"] = "stop"


Action = Annotated[
    InviteBot
    | InviteApp
    | SetBotMode
    | RemoveParticipant
    | Route
    | Assign
    | Transfer
    | Send
    | Whisper
    | StartTimer
    | CancelTimer
    | SetAttributes
    | Label
    | Unlabel
    | Close
    | Stop,
    Field(discriminator="kind"),
]
