"""The rules in force: one Rulebook at a time, replaced atomically by a valid new version.

A new version comes from the rules folder (a file change seen by the watcher, or
``POST /api/v1/rules/reload``) or from the ``rules_versions`` table (a rollback). It is
compiled and checked first; a bad one is reported (log line, metric, API) and the running
rules stay. A good one is stored in ``rules_versions`` and only then becomes current, so every
decision's ``rules_version`` names a stored version.

Workers call ``current()`` once per event and decide synchronously with what they got, so an
event in flight finishes on its version. A replaced version's durable rulesets are freed only
when nothing can still use it: it stays open until the next swap, and after that until its
last ``lease()`` ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import structlog

from controller.clock import Clock
from controller.errors import ConvctlError, NotFound, RuleError
from controller.metrics import Metrics
from controller.rulebook import Rulebook
from controller.store.base import RulesVersion, Store

log = structlog.get_logger(__name__)

Files = dict[str, str]
Source = Literal["start", "watch", "api", "rollback"]


@dataclass(frozen=True, slots=True)
class ReloadFailure:
    """A version that was refused: when, how it came, and every problem found."""

    at: datetime
    source: str
    errors: list[str]
    files: list[str]


class _Version:
    """A compiled version with its files and the number of leases still using it."""

    __slots__ = ("book", "files", "leases", "loaded_at", "source")

    def __init__(self, book: Rulebook, files: Files, loaded_at: datetime, source: str) -> None:
        self.book = book
        self.files = files
        self.loaded_at = loaded_at
        self.source = source
        self.leases = 0


def read_rules_folder(folder: Path) -> Files:
    """The ``*.yaml``/``*.yml`` files directly in ``folder`` as {path: text}.

    Paths are named as ``Rulebook.load`` names them, so a version hash is the same whether
    the folder is loaded here or checked with ``convctl rules check``.
    """
    if not folder.is_dir():
        raise RuleError([f"{folder}:1:1: no such rules file or directory"])
    files: Files = {}
    problems: list[str] = []
    for child in sorted(folder.iterdir()):
        if not (child.suffix in (".yaml", ".yml") and child.is_file()):
            continue
        try:
            files[str(child)] = child.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue  # deleted between the listing and the read: the next poll sees it gone
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{child}:1:1: cannot read the file: {exc}")
    if problems:
        raise RuleError(problems)
    return files


class RulebookHolder:
    """Holds the current Rulebook and replaces it with checked new versions."""

    def __init__(
        self,
        rules_dir: Path,
        settings: dict[str, Any],
        *,
        matcher: Literal["durable", "reference"],
        default_language: str,
        store: Store,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._dir = rules_dir
        self._settings = settings
        self._matcher: Literal["durable", "reference"] = matcher
        self._default_language = default_language
        self._store = store
        self._metrics = metrics
        self._clock = clock
        files = read_rules_folder(rules_dir)
        # A bad folder at start raises: the service refuses to start without valid rules.
        self._version = _Version(self._compile(files), files, clock.now(), "start")
        self._previous: _Version | None = None
        self._retired: list[_Version] = []
        self._guard = threading.Lock()  # leases may end on another thread
        self._swap = asyncio.Lock()  # one reload or rollback at a time
        self._changed = asyncio.Condition()
        self._seen: Files | None = files  # the folder contents last acted on
        self._pending: Files | None = None  # a change seen once, acted on when it holds still
        self._watcher: asyncio.Task[None] | None = None
        self.last_error: ReloadFailure | None = None
        self.attempts = 0  # reloads and rollbacks tried (a test can wait for the next one)
        log.info(
            "rules_loaded",
            version=self._version.book.version,
            folder=str(rules_dir),
            rules=len(self._version.book.rules),
        )

    # reading ------------------------------------------------------------------------------
    def current(self) -> Rulebook:
        """The version in force; a caller deciding with it synchronously needs nothing else."""
        return self._version.book

    @contextmanager
    def lease(self) -> Iterator[Rulebook]:
        """The version in force, kept open until the block ends even if it is replaced."""
        with self._guard:
            version = self._version
            version.leases += 1
        try:
            yield version.book
        finally:
            with self._guard:
                version.leases -= 1
                self._collect()

    def status(self) -> dict[str, Any]:
        """The current version, its files, and the last refused version of the folder."""
        v = self._version
        failure = self.last_error
        return {
            "version": v.book.version,
            "loaded_at": v.loaded_at.isoformat(),
            "source": v.source,
            "rules": len(v.book.rules),
            "files": sorted(v.files),
            "folder": str(self._dir),
            "watching": self._watcher is not None and not self._watcher.done(),
            "last_error": None
            if failure is None
            else {
                "at": failure.at.isoformat(),
                "source": failure.source,
                "errors": failure.errors,
                "files": failure.files,
            },
        }

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, checked after every reload attempt."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    # lifecycle ----------------------------------------------------------------------------
    async def start(self, *, watch: bool, interval: float) -> None:
        """Record the starting version, publish it, and start watching the folder."""
        v = self._version
        await self._store.save_rules_version(
            RulesVersion(v.book.version, v.files, v.loaded_at, v.source)
        )
        self._publish()
        if watch:
            self._watcher = asyncio.create_task(self._watch(interval), name="rules-watcher")

    async def close(self) -> None:
        """Stop watching and free every version (the workers have stopped)."""
        if self._watcher is not None:
            self._watcher.cancel()
            with suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        versions = [self._version, *([self._previous] if self._previous else []), *self._retired]
        self._previous, self._retired = None, []
        for v in versions:
            v.book.close()

    # changing versions ---------------------------------------------------------------------
    async def reload(self, source: Source = "api") -> Rulebook:
        """Compile the folder again; only a valid version replaces the current one.

        Raises RuleError (with every problem) and keeps the running rules when it is bad.
        """
        async with self._swap:
            try:
                files = await asyncio.to_thread(read_rules_folder, self._dir)
            except RuleError as exc:
                self._seen = None  # whatever the folder holds next is a change
                await self._fail(exc.errors, [], source)
                raise
            return await self._from_folder(files, source)

    async def rollback(self, version: str) -> Rulebook:
        """Make a stored version current again, compiled from its stored files."""
        async with self._swap:
            record = await self._store.rules_version(version)
            if record is None:
                raise NotFound(f"unknown rules version {version!r}", code="unknown_rules_version")
            if record.version != self._version.book.version:
                try:
                    book = self._compile(record.files)
                except RuleError as exc:
                    await self._fail(exc.errors, sorted(record.files), "rollback", folder=False)
                    raise
                await self._activate(book, record.files, "rollback")
            await self._notify()
            return self._version.book

    async def poll(self) -> bool:
        """Look at the folder once; reload when its files changed and then held still for one
        poll (so a half-written file is not reported). True if a reload was tried."""
        try:
            files = await asyncio.to_thread(read_rules_folder, self._dir)
        except RuleError as exc:
            if self.last_error is None or self.last_error.errors != exc.errors:
                self._seen = None
                await self._fail(exc.errors, [], "watch")
            return False
        if files == self._seen:
            self._pending = None
            return False
        if files != self._pending:
            self._pending = files
            return False
        self._pending = None
        async with self._swap:
            if files == self._seen:  # an API reload took it meanwhile
                return False
            with suppress(RuleError):  # reported by _from_folder; the old rules stay
                await self._from_folder(files, "watch")
        return True

    async def _watch(self, interval: float) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rules_watch_failed", folder=str(self._dir))
            await asyncio.sleep(interval)

    async def _from_folder(self, files: Files, source: Source) -> Rulebook:
        self._seen = files
        if files != self._version.files:
            try:
                book = self._compile(files)
            except RuleError as exc:
                await self._fail(exc.errors, sorted(files), source)
                raise
            await self._activate(book, files, source)
        self.last_error = None
        await self._notify()
        return self._version.book

    def _compile(self, files: Files) -> Rulebook:
        try:
            return Rulebook.from_sources(
                list(files.items()),
                settings=self._settings,
                matcher=self._matcher,
                default_language=self._default_language,
            )
        except RuleError:
            raise
        except ConvctlError as exc:  # e.g. durable-rules refused a ruleset
            raise RuleError([exc.message]) from exc

    async def _activate(self, book: Rulebook, files: Files, source: Source) -> None:
        """Store the version, then swap it in and retire the old one."""
        now = self._clock.now()
        if book.version == self._version.book.version:
            book.close()
            return
        try:
            await self._store.save_rules_version(RulesVersion(book.version, files, now, source))
        except BaseException:
            book.close()
            raise
        old = self._version
        with self._guard:
            self._version = _Version(book, files, now, source)  # the atomic swap
            if self._previous is not None:
                self._retired.append(self._previous)
            self._previous = old
            self._collect()
        self._publish()
        log.info(
            "rules_reloaded",
            old=old.book.version,
            new=book.version,
            source=source,
            rules=len(book.rules),
        )

    async def _fail(
        self, errors: list[str], files: list[str], source: str, *, folder: bool = True
    ) -> None:
        self._metrics.rules_reload_failures.inc()
        log.error(
            "rules_reload_failed",
            source=source,
            folder=str(self._dir),
            running=self._version.book.version,
            errors=errors,
        )
        if folder:
            self.last_error = ReloadFailure(self._clock.now(), source, errors, files)
        await self._notify()

    def _collect(self) -> None:
        """Free retired versions nobody leases (call with ``_guard`` held)."""
        for v in [v for v in self._retired if v.leases == 0]:
            self._retired.remove(v)
            v.book.close()
            log.debug("rules_version_freed", version=v.book.version)

    def _publish(self) -> None:
        self._metrics.rules_version.clear()
        self._metrics.rules_version.labels(self._version.book.version).set(1)

    async def _notify(self) -> None:
        """One reload attempt ended (a new version, the same one, or a refusal)."""
        self.attempts += 1
        async with self._changed:
            self._changed.notify_all()
