"""Exponential backoff with jitter: how long to wait before the next retry.

Contract:

- `backoff_delay(attempt, base, cap)` is a pure function of its arguments and one draw of
  `rand()` (a float in [0, 1), `random.random` by default); it sleeps nothing, keeps no state.
- `attempt` counts the consecutive failures so far, starting at 1: the ceiling of the delay is
  `min(cap, base * 2**(attempt - 1))` (attempts below 1 count as 1; after 62 doublings the
  ceiling stops growing, so no attempt count overflows).
- `jitter` says where in that ceiling the delay falls:
  - `"full"`: uniform in [0, ceiling) — `ceiling * rand()`; spreads many clients the most.
  - `"equal"`: uniform in [ceiling / 2, ceiling) — `ceiling * (0.5 + rand() / 2)`; never
    retries sooner than half the ceiling.
  - `"none"`: exactly the ceiling; `rand` is not called.
- Callers own the attempt counter: increment it per failed try, reset it after a success.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final, Literal

__all__ = ["MAX_DOUBLINGS", "Jitter", "backoff_delay"]

Jitter = Literal["full", "equal", "none"]

MAX_DOUBLINGS: Final = 62


def backoff_delay(attempt: int, base: float, cap: float, *, jitter: Jitter = "full",
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the `attempt`-th consecutive failure (see the module docstring)."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), MAX_DOUBLINGS))
    if jitter == "full":
        return ceiling * rand()
    if jitter == "equal":
        return ceiling * (0.5 + rand() / 2)
    if jitter == "none":
        return ceiling
    raise ValueError(f"unknown jitter {jitter!r}")
