"""Which store the settings ask for: PostgreSQL when a database URL is set, else SQLite."""

from __future__ import annotations

from controller.settings import Settings
from controller.store.base import Store


def uses_postgres(settings: Settings) -> bool:
    url = settings.database_url or ""
    return url.startswith(("postgresql://", "postgres://"))


def make_store(settings: Settings) -> Store:
    """The configured store, not opened yet."""
    if uses_postgres(settings):
        from controller.store.postgres import PostgresStore

        assert settings.database_url is not None
        return PostgresStore(
            settings.database_url,
            schema=settings.database_schema,
            min_size=settings.database_pool_min,
            max_size=settings.database_pool_max,
        )
    from controller.store.sqlite import SqliteStore

    return SqliteStore(settings.database_path, synchronous=settings.sqlite_synchronous)


async def open_store(settings: Settings) -> Store:
    """The configured store, connected and migrated."""
    store = make_store(settings)
    await store.open()
    return store


def store_location(settings: Settings) -> str:
    """Where the data lives, for messages (a database URL without its password)."""
    if uses_postgres(settings):
        from controller.store.postgres import redact_url

        assert settings.database_url is not None
        where = redact_url(settings.database_url)
        return f"{where} (schema {settings.database_schema})" if settings.database_schema else where
    return settings.database_path


__all__ = ["make_store", "open_store", "store_location", "uses_postgres"]
