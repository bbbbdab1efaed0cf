"""Fixtures for the rulebook tests: build rulebooks from inline YAML and always close them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controller.rulebook import Rulebook

MakeBook = Callable[..., Rulebook]


@pytest.fixture
def make_book() -> Iterator[MakeBook]:
    """``make_book(yaml_text, settings=..., matcher=...)``; several files as a dict name->text."""
    books: list[Rulebook] = []

    def make(
        text: str | dict[str, str],
        *,
        settings: dict[str, Any] | None = None,
        matcher: Any = "durable",
        default_language: str = "en",
    ) -> Rulebook:
        sources = list(text.items()) if isinstance(text, dict) else [("rules.yaml", text)]
        book = Rulebook.from_sources(
            sources,
            settings=settings or {},
            matcher=matcher,
            default_language=default_language,
        )
        books.append(book)
        return book

    yield make
    for book in books:
        book.close()


def _fired(book: Rulebook, facts: dict[str, Any]) -> list[str]:
    durable = [rule.rule for rule in book.decide(facts, matcher="durable")]
    reference = [rule.rule for rule in book.decide(facts, matcher="reference")]
    assert durable == reference
    return durable


@pytest.fixture
def fired() -> Callable[[Rulebook, dict[str, Any]], list[str]]:
    """Names of the rules that fire, checked to be the same under both matchers."""
    return _fired
