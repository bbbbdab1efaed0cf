"""Decision cost with N rules against 10 rules, for the durable and the reference matcher.

    python bench/rules_decide.py                  # 1,000 vs 10 rules, all on one event type
    python bench/rules_decide.py --event-types 5 --seconds 3 --json

Times ``Rulebook.decide`` (leaf tests in Python, matching, actions built) over a pool of
generated facts in one process; prints events/s per size and matcher, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.rules_compile import facts_pool, rules_yaml  # noqa: E402
from controller.rulebook import Rulebook  # noqa: E402
from controller.rulebook.book import Matcher  # noqa: E402


def rate(book: Rulebook, matcher: Matcher, pool: list[dict[str, Any]], seconds: float) -> float:
    """Decisions per second over ``seconds`` (after a short warm-up)."""
    for facts in pool[:50]:
        book.decide(facts, matcher=matcher)
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for facts in pool:
            book.decide(facts, matcher=matcher)
        done += len(pool)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def fired_per_event(book: Rulebook, pool: list[dict[str, Any]]) -> float:
    return sum(len(book.decide(facts, matcher="reference")) for facts in pool) / len(pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="rules (default 1000)")
    parser.add_argument("--baseline", type=int, default=10, help="baseline rules (default 10)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--event-types", type=int, default=1, help="event types rules spread over")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    pool = facts_pool(200, event_types=args.event_types)
    result: dict[str, Any] = {"event_types": args.event_types}
    for count in (args.baseline, args.n):
        text = rules_yaml(count, event_types=args.event_types)
        with Rulebook.from_sources([("bench.yaml", text)], settings={}, matcher="durable") as book:
            result[str(count)] = {
                "fired_per_event": fired_per_event(book, pool),
                "durable": rate(book, "durable", pool, args.seconds),
                "reference": rate(book, "reference", pool, args.seconds),
            }
    base, big = result[str(args.baseline)], result[str(args.n)]
    for matcher in ("durable", "reference"):
        result[f"ratio_{matcher}"] = base[matcher] / big[matcher]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"rules spread over {args.event_types} event type(s); events/s in one thread")
    print(f"{'rules':>6} {'fired/event':>12} {'durable ev/s':>14} {'reference ev/s':>15}")
    for count in (args.baseline, args.n):
        row = result[str(count)]
        print(
            f"{count:>6} {row['fired_per_event']:>12.2f} {row['durable']:>14.0f}"
            f" {row['reference']:>15.0f}"
        )
    print(
        f"slowdown {args.n}/{args.baseline}: durable {result['ratio_durable']:.1f}x,"
        f" reference {result['ratio_reference']:.1f}x"
    )


if __name__ == "__main__":
    main()
