"""The rules in force: one Rulebook at a time, replaced atomically by a valid new version."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import structlog

from controller.rulebook import Rulebook

log = structlog.get_logger(__name__)


class RulebookHolder:
    """Holds the current Rulebook. Workers call ``current()`` once per event, so an event
    in flight finishes on the version it started with."""

    def __init__(
        self,
        rules_dir: Path,
        settings: dict[str, Any],
        *,
        matcher: Literal["durable", "reference"],
        default_language: str,
    ) -> None:
        self._dir = rules_dir
        self._settings = settings
        self._matcher: Literal["durable", "reference"] = matcher
        self._default_language = default_language
        self._current = self._load()
        log.info(
            "rules_loaded",
            version=self._current.version,
            folder=str(rules_dir),
            rules=len(self._current.rules),
        )

    def _load(self) -> Rulebook:
        return Rulebook.load(
            self._dir,
            settings=self._settings,
            matcher=self._matcher,
            default_language=self._default_language,
        )

    def current(self) -> Rulebook:
        return self._current

    def reload(self) -> Rulebook:
        """Compile the folder again; only a valid version replaces the current one."""
        new = self._load()  # raises RuleError and keeps the old rules
        old, self._current = self._current, new
        if old.version != new.version:
            log.info("rules_reloaded", old=old.version, new=new.version)
        old.close()
        return new

    def close(self) -> None:
        self._current.close()
