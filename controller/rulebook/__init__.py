"""Rules: YAML rule files compiled into durable-rules rulesets, with a reference matcher.

``Rulebook.load`` reads and validates the files (every problem reported with its line),
``Rulebook.decide`` says which rules fire for the facts of one event and with what actions.
"""

from __future__ import annotations

from controller.rulebook.book import CompiledRule, FiredRule, Matcher, Rulebook

__all__ = ["CompiledRule", "FiredRule", "Matcher", "Rulebook"]
