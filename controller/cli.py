"""The ``convctl`` command: serve, migrate, rules check/test/schema/reference, tokens create."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from controller.errors import ConfigError, RuleError
from controller.logs import configure_logging
from controller.settings import Settings, ensure_secrets, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convctl", description="rule-driven conversation controller"
    )
    parser.add_argument("--config", help="settings YAML file (or CONVCTL_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    sub.add_parser("migrate", help="create or upgrade the database schema")
    rules = sub.add_parser("rules", help="work with rule files")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate rule files")
    check.add_argument(
        "path", nargs="?", help="a rules folder or file (default: the configured one)"
    )
    rules_sub.add_parser("schema", help="print the JSON Schema of rule files")
    reference = rules_sub.add_parser(
        "reference", help="print the generated rule reference (Markdown tables)"
    )
    reference.add_argument(
        "--write", metavar="FILE", help="rewrite the block between the reference markers of FILE"
    )
    test = rules_sub.add_parser("test", help="run rule scenarios on a simulated clock")
    test.add_argument(
        "path", nargs="?", help="a scenario file or folder (default: <rules folder>/tests)"
    )
    test.add_argument("--rules", help="the rules folder or file (default: the configured one)")
    test.add_argument("--matcher", choices=["reference", "durable"], default="reference")
    from controller.rules_tools import add_parsers  # rules explain / rules backtest

    add_parsers(rules_sub)
    tokens = sub.add_parser("tokens", help="API tokens")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tokens_sub.add_parser("create", help="create a token and print it once")
    create.add_argument("--role", required=True, choices=["admin", "agent", "app", "crm"])
    create.add_argument("--subject", required=True)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command == "serve":
            overrides = {
                k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None
            }
            return _serve(settings.model_copy(update=overrides))
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "rules" and args.rules_command in ("explain", "backtest"):
            from controller.rules_tools import run_tool

            return run_tool(settings, args)
        if args.command == "rules" and args.rules_command == "test":
            return _rules_test(settings, args.path, args.rules, args.matcher)
        if args.command == "rules" and args.rules_command == "schema":
            return _rules_schema()
        if args.command == "rules" and args.rules_command == "reference":
            return _rules_reference(args.write)
        if args.command == "rules":
            return _rules_check(settings, args.path)
        if args.command == "tokens":
            return asyncio.run(_create_token(settings, args.role, args.subject))
    except (ConfigError, RuleError) as exc:
        for line in getattr(exc, "errors", None) or [exc.message]:
            print(f"convctl: {line}", file=sys.stderr)
        return 2
    return 1


def _serve(settings: Settings) -> int:
    configure_logging(settings.log_level, json=settings.log_json)
    settings, generated = ensure_secrets(settings)
    from controller.app import create_app  # imported late: settings errors print first

    app = create_app(settings)
    if settings.profile == "dev":
        base = f"http://{settings.host}:{settings.port}"
        # The agent token belongs to the first configured agent (the demo's alice otherwise).
        first_agent = settings.agents[0].id if settings.agents else "alice"
        print(
            f"convctl (dev profile) on {base}\n"
            f"  web chat:    {base}/webchat\n"
            f"  admin token: {settings.admin_token}\n"
            f"  agent token: {settings.agent_token} (agent '{first_agent}')\n"
            f"  secrets are kept in {settings.data_dir / 'secrets.json'}"
            + (" (just generated)" if generated else ""),
            file=sys.stderr,
            flush=True,
        )
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    return 0


async def _migrate(settings: Settings) -> int:
    from controller.store.factory import open_store, store_location

    store = await open_store(settings)
    await store.close()
    print(f"schema is up to date in {store_location(settings)}")
    return 0


def _rules_check(settings: Settings, path: str | None) -> int:
    """Load and lint the rules: 0 when clean, 1 with every error as ``file:line:col: ...``."""
    from controller.rulebook import Rulebook
    from controller.rulebook.lint import lint

    target = Path(path) if path else settings.resolved_rules_dir()
    try:
        book = Rulebook.load(
            target,
            settings=settings.rule_settings(),
            matcher="reference",
            default_language=settings.default_language,
        )
    except RuleError as exc:
        errors = exc.errors
    else:
        with book:
            errors = lint(book, bots=_known_bots(settings), queues=settings.queues)
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        print(f"convctl: {len(errors)} error(s) in {target}", file=sys.stderr)
        return 1
    print(f"{target}: {len(book.rules)} rules, version {book.version}: ok")
    return 0


def _known_bots(settings: Settings) -> list[str]:
    """Names of the configured connectors whose type is a bot (rules name bots by these)."""
    from connectors.base import connector_types

    types = connector_types()
    return [
        connector.name
        for connector in settings.connectors
        if connector.type in types and getattr(types.get(connector.type), "kind", "") == "bot"
    ]


def _rules_schema() -> int:
    from controller.rulebook.schema import schema_text

    sys.stdout.write(schema_text())
    return 0


def _rules_reference(write: str | None) -> int:
    from controller.rulebook.reference import render_reference, update_file

    if write is None:
        sys.stdout.write(render_reference())
        return 0
    changed = update_file(Path(write))
    print(f"{write}: {'updated' if changed else 'already up to date'}")
    return 0


def _rules_test(settings: Settings, path: str | None, rules: str | None, matcher: str) -> int:
    """Run scenario files against the rules: 0 all pass, 1 a scenario fails, 2 invalid files."""
    from controller.scenarios import ScenarioError, load_scenarios, run_scenarios

    rules_dir = Path(rules) if rules else settings.resolved_rules_dir()
    folder = rules_dir if rules_dir.is_dir() else rules_dir.parent
    target = Path(path) if path else folder / "tests"
    try:
        scenarios = load_scenarios(target)
    except ScenarioError as exc:
        for line in exc.errors:
            print(f"convctl: {line}", file=sys.stderr)
        return 2
    report = run_scenarios(
        scenarios,
        rules_dir,
        settings,
        matcher="durable" if matcher == "durable" else "reference",
    )
    for line in report.lines():
        print(line)
    return 0 if report.passed else 1


async def _create_token(settings: Settings, role: str, subject: str) -> int:
    from controller.api.common import hash_token
    from controller.store.factory import open_store

    store = await open_store(settings)
    try:
        token = secrets.token_urlsafe(32)
        await store.put_token(hash_token(token), role, subject, datetime.now(UTC))
    finally:
        await store.close()
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
