"""Identifiers: sortable, random, URL-safe."""

from __future__ import annotations

import os
import time


def new_id(prefix: str) -> str:
    """A new id like ``cv_0193...``: millisecond time first (sorts by creation), then randomness."""
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(8).hex()}"
