"""Settings: one model, read from an optional YAML file and ``CONVCTL_*`` environment variables.

Environment variables win over the file (``CONVCTL_PORT=9000``; nested keys use ``__``).
The dev profile generates missing secrets into a 0600 file next to the database; the prod
profile refuses to start without them.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from controller.errors import ConfigError

if TYPE_CHECKING:
    from controller.calendar import BusinessCalendar

_PLACEHOLDERS = {"", "change-me", "changeme", "secret", "xxx", "todo"}


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class TimeoutSettings(BaseModel):
    """Durations in seconds that the rules can name as ``settings.NAME``."""

    model_config = ConfigDict(extra="forbid")

    customer_grace: float = Field(60.0, ge=0)
    idle_reminder: float = Field(300.0, ge=0)
    idle_close: float = Field(120.0, ge=0)
    agent_grace: float = Field(30.0, ge=0)
    wrap_up: float = Field(120.0, ge=0)
    offer: float = Field(30.0, gt=0)


class AppDeliverySettings(BaseModel):
    """Webhook deliveries to apps: each delivery's timeout and the apps' retry policy."""

    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(10.0, gt=0)
    max_attempts: int = Field(8, ge=1)
    backoff_base: float = Field(1.0, gt=0)
    backoff_max: float = Field(300.0, gt=0)


SkillLevel = Annotated[int, Field(ge=1, le=10)]
ChannelKind = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
DEFAULT_CAPACITY = 3


class AgentSeed(BaseModel):
    """An agent created at start (the dev profile's demo agents), or by the admin API.

    ``capacity`` is the total over every channel; ``channels`` the capacity per channel kind
    (``{"webchat": 3, "whatsapp": 2}``: a channel not listed is never offered). Without
    ``capacity`` the total is the sum of ``channels`` (3 when neither is given). ``skills``:
    ``{"billing": 7}`` (levels 1 to 10) or a list of names (each level 1).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    name: str = Field(min_length=1, max_length=200)
    capacity: int | None = Field(None, ge=1, le=100)
    channels: dict[ChannelKind, Annotated[int, Field(ge=0, le=100)]] = Field(
        default_factory=dict, max_length=20
    )
    skills: list[str] | dict[str, SkillLevel] = Field(default_factory=list, max_length=50)
    teams: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=20
    )

    def total_capacity(self) -> int:
        if self.capacity is not None:
            return self.capacity
        return sum(self.channels.values()) if self.channels else DEFAULT_CAPACITY

    def skill_levels(self) -> dict[str, int]:
        if isinstance(self.skills, dict):
            return dict(self.skills)
        return dict.fromkeys(self.skills, 1)


class QueueRouting(BaseModel):
    """Who may be offered a queue's conversations: agents with these skills at these levels
    or higher (on top of the route action's skills) and, when ``teams`` is not empty, in one
    of these teams."""

    model_config = ConfigDict(extra="forbid")

    skills: dict[str, SkillLevel] = Field(default_factory=dict)
    teams: list[str] = Field(default_factory=list)


class ConnectorInstance(BaseModel):
    """One configured connector: ``{name, type, settings}``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    type: str
    settings: dict[str, Any] = Field(default_factory=dict)


def _default_connectors() -> list[ConnectorInstance]:
    return [
        ConnectorInstance(name="webchat", type="webchat"),
        ConnectorInstance(name="demo", type="demo_bot"),
    ]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONVCTL_", env_nested_delimiter="__", extra="forbid"
    )

    profile: Literal["dev", "prod"] = "dev"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    data_dir: Path = Path("data")
    database: str = ""  # default: <data_dir>/convctl.db
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    # PostgreSQL for several processes: postgresql://user:password@host:5432/db (unset: SQLite)
    database_url: str | None = None
    database_schema: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    database_pool_min: int = Field(1, ge=0, le=1000)
    database_pool_max: int = Field(10, ge=1, le=1000)
    # Several processes on PostgreSQL (docs/architecture.md, "Several processes"): every
    # process heartbeats each interval (seconds, real time); one silent for the timeout is
    # dead, and its conversations, timers and outbox rows are taken over by the others.
    cluster_heartbeat_interval: float = Field(1.0, gt=0, le=60)
    cluster_heartbeat_timeout: float = Field(5.0, gt=0, le=600)
    rules_dir: Path | None = None  # default: ./rules when present, else the packaged rules
    matcher: Literal["durable", "reference"] = "durable"
    rules_watch: bool = True  # poll rules_dir and reload when its files change
    rules_watch_interval: float = Field(1.0, gt=0)
    default_language: str = "en"
    timezone: str = "UTC"
    # Days every queue is closed (rules: now.holiday), and opening hours per queue ("*": every
    # queue without its own) as weekday -> ["09:00-17:00", ...] in `timezone` (queue.open).
    holidays: list[date] = Field(default_factory=list)
    business_hours: dict[str, dict[Weekday, list[str]]] = Field(default_factory=dict)
    # ISO region for phone numbers written without a country code (e.g. "DE"); none: refused
    default_phone_region: str | None = Field(None, pattern=r"^[A-Z]{2}$")
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    session_secret: str = ""
    admin_token: str = ""
    agent_token: str = ""
    allowed_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_message_chars: int = Field(4096, ge=1)
    outbox_max_attempts: int = Field(8, ge=1)
    outbox_backoff_base: float = Field(0.5, gt=0)
    outbox_backoff_max: float = Field(300.0, gt=0)
    apps: AppDeliverySettings = Field(default_factory=AppDeliverySettings)
    workers: int = Field(64, ge=1, le=10000)
    agents: list[AgentSeed] = Field(default_factory=list)
    connectors: list[ConnectorInstance] = Field(default_factory=_default_connectors)
    queues: list[str] = Field(default_factory=lambda: ["support"])  # rules may route only here
    # Per queue: skills with minimum levels and teams its agents need (router).
    queue_routing: dict[str, QueueRouting] = Field(default_factory=dict)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must be a postgresql:// URL (SQLite needs none)")
        return value

    @field_validator("cluster_heartbeat_timeout")
    @classmethod
    def _heartbeat_timeout(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("cluster_heartbeat_interval")
        if isinstance(interval, float) and value < 2 * interval:
            raise ValueError(
                "cluster_heartbeat_timeout must be at least twice cluster_heartbeat_interval"
            )
        return value

    @field_validator("business_hours")
    @classmethod
    def _hours(cls, value: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
        from controller.calendar import parse_range

        for week in value.values():
            for ranges in week.values():
                for text in ranges:
                    parse_range(text)  # raises ValueError naming the bad range
        return value

    def calendar(self) -> BusinessCalendar:
        from zoneinfo import ZoneInfo

        from controller.calendar import BusinessCalendar

        return BusinessCalendar(ZoneInfo(self.timezone), self.holidays, self.business_hours)

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)

    @property
    def database_path(self) -> str:
        return self.database or str(self.data_dir / "convctl.db")

    def rule_settings(self) -> dict[str, Any]:
        """Values rules may name as ``settings.NAME``."""
        return {**self.timeouts.model_dump(), "default_language": self.default_language}

    def resolved_rules_dir(self) -> Path:
        if self.rules_dir is not None:
            return self.rules_dir
        here = Path(__file__).resolve().parent
        # ./rules of the working folder, the rules shipped in the wheel, the source tree's.
        for candidate in (Path("rules"), here / "default_rules", here.parent / "rules"):
            if (candidate / "default.yaml").is_file():
                return candidate
        raise ConfigError("no rules folder found: set rules_dir (CONVCTL_RULES_DIR)")


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (if any), then the environment, then ``overrides``."""
    data: dict[str, Any] = {}
    path = path or os.environ.get("CONVCTL_CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"settings file {path} must hold a mapping")
        data.update(loaded)
    # The environment beats the file: drop file keys the environment sets.
    for key in list(data):
        if f"CONVCTL_{key.upper()}" in os.environ:
            del data[key]
    data.update(overrides)
    try:
        return Settings(**data)
    except ValueError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc


_REQUIRED_SECRETS = ("session_secret", "admin_token")
_DEV_SECRETS = (*_REQUIRED_SECRETS, "agent_token")


def is_placeholder(value: str) -> bool:
    """True for an empty or well-known placeholder secret (``change-me``, ``secret``…)."""
    return value.strip().lower() in _PLACEHOLDERS


def ensure_secrets(settings: Settings) -> tuple[Settings, list[str]]:
    """Fill missing secrets (dev) or refuse (prod). Returns the settings and the names generated.

    The prod profile needs the session secret and the admin token; an agent token set there
    must not be a placeholder either (agents normally get tokens from the API).
    """
    if settings.profile == "prod":
        bad = [f for f in _REQUIRED_SECRETS if is_placeholder(getattr(settings, f))]
        if settings.agent_token and is_placeholder(settings.agent_token):
            bad.append("agent_token")
        if bad:
            raise ConfigError(
                "missing or placeholder secrets in the prod profile: "
                + ", ".join(f"CONVCTL_{f.upper()}" for f in bad)
            )
        return settings, []
    missing = [f for f in _DEV_SECRETS if is_placeholder(getattr(settings, f))]
    if not missing:
        return settings, []
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    secrets_file = settings.data_dir / "secrets.json"
    stored: dict[str, str] = {}
    if secrets_file.exists():
        stored = json.loads(secrets_file.read_text(encoding="utf-8"))
    generated = []
    for name in missing:
        if name not in stored:
            stored[name] = secrets.token_urlsafe(32)
            generated.append(name)
    fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(stored, fh)
    os.chmod(secrets_file, 0o600)
    updated = settings.model_copy(update={name: stored[name] for name in missing})
    return updated, generated
