"""Compile + check (load, validate, lint) N generated rules, against 10 rules in the same run.

    python bench/rules_compile.py                 # 1,000 rules vs 10, median of 5 runs
    python bench/rules_compile.py -n 2000 --repeat 3 --durable --json

Prints seconds (median) and the ratio N rules / 10 rules. ``--durable`` also times building the
durable-rules rulesets (the native part the service builds on first decide).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controller.rulebook import Rulebook  # noqa: E402
from controller.rulebook.lint import lint  # noqa: E402

# Generated rules mix the shapes analysts write: an equality on an attribute, a number
# comparison, an `any` of a substring test and a label membership, and two actions.

_EVENTS = ("customer.message", "bot.message", "agent.message", "timer.fired", "bot.handoff")


def rules_yaml(count: int, *, event_types: int = 1) -> str:
    """``count`` rules, spread round-robin over the first ``event_types`` event types."""
    out: list[str] = []
    for i in range(count):
        event = _EVENTS[i % max(1, min(event_types, len(_EVENTS)))]
        out.append(
            f"""- name: r{i}
  description: generated rule {i}
  when:
    event: {event}
    conversation.state: {{ in: [bot, agent] }}
    conversation.attributes.topic: t{i % 40}
    conversation.priority: {{ gte: {i % 20} }}
    any:
      - event.text: {{ contains: w{i % 97} }}
      - conversation.labels: {{ contains: l{i % 7} }}
  then:
    - set: {{ last_rule: r{i} }}
    - route: {{ queue: support, priority: high }}
"""
        )
    return "".join(out)


def facts_pool(size: int, *, seed: int = 7, event_types: int = 1) -> list[dict[str, Any]]:
    """Facts of ``size`` events of the benchmark's event types."""
    rng = random.Random(seed)
    pool: list[dict[str, Any]] = []
    for n in range(size):
        pool.append(
            {
                "event": {
                    "type": _EVENTS[n % max(1, min(event_types, len(_EVENTS)))],
                    "text": f"hello w{rng.randrange(97)} w{rng.randrange(97)}",
                },
                "conversation": {
                    "state": rng.choice(["bot", "agent", "queued"]),
                    "priority": rng.choice([0, 10, 20]),
                    "labels": [f"l{rng.randrange(7)}"],
                    "attributes": {"topic": f"t{rng.randrange(40)}"},
                },
                "customer": {"present": True},
            }
        )
    return pool


def compile_and_check(text: str, durable: bool) -> tuple[float, float, int]:
    """(seconds to load + lint, seconds to build durable rulesets or 0, number of findings)."""
    start = time.perf_counter()
    book = Rulebook.from_sources([("bench.yaml", text)], settings={}, matcher="reference")
    findings = lint(book, bots=["demo"], queues=["support"])
    checked = time.perf_counter() - start
    native = 0.0
    if durable:
        start = time.perf_counter()
        book._durable_matcher()  # build the rulesets now, as the first decide would
        native = time.perf_counter() - start
    book.close()
    return checked, native, len(findings)


def measure(count: int, repeat: int, durable: bool, event_types: int) -> dict[str, float]:
    text = rules_yaml(count, event_types=event_types)
    runs = [compile_and_check(text, durable) for _ in range(repeat)]
    assert all(run[2] == 0 for run in runs), "generated rules must lint clean"
    return {
        "rules": count,
        "check_s": statistics.median(run[0] for run in runs),
        "durable_build_s": statistics.median(run[1] for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="rules to compile (default 1000)")
    parser.add_argument("--baseline", type=int, default=10, help="baseline rules (default 10)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per size; the median counts")
    parser.add_argument("--event-types", type=int, default=5, help="event types rules spread over")
    parser.add_argument("--durable", action="store_true", help="also build durable rulesets")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    measure(args.baseline, 1, args.durable, args.event_types)  # warm imports and caches
    base = measure(args.baseline, args.repeat, args.durable, args.event_types)
    big = measure(args.n, args.repeat, args.durable, args.event_types)
    result = {
        "baseline": base,
        "large": big,
        "ratio_check": big["check_s"] / base["check_s"],
        "per_rule_ms": 1000 * big["check_s"] / args.n,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"compile + check {args.baseline:>5} rules: {base['check_s']:.4f} s")
    print(f"compile + check {args.n:>5} rules: {big['check_s']:.4f} s  (aim < 1 s)")
    print(
        f"ratio {args.n}/{args.baseline}: {result['ratio_check']:.1f}x,"
        f" {result['per_rule_ms']:.3f} ms per rule"
    )
    if args.durable:
        print(
            f"durable rulesets: {base['durable_build_s']:.4f} s ({args.baseline} rules),"
            f" {big['durable_build_s']:.4f} s ({args.n} rules)"
        )


if __name__ == "__main__":
    main()
