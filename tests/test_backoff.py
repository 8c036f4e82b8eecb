"""`backoff_delay`: ceilings, the three jitters, and equality with the loops it replaces."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from cdc_sync.backoff import MAX_DOUBLINGS, backoff_delay


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


@pytest.mark.parametrize(("attempt", "ceiling"), [
    (1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (7, 32.0), (8, 60.0), (500, 60.0), (10**9, 60.0),
])
def test_ceiling_doubles_from_base_up_to_cap(attempt: int, ceiling: float) -> None:
    assert backoff_delay(attempt, 0.5, 60.0, jitter="none") == ceiling


@pytest.mark.parametrize("attempt", [0, -3])
def test_attempts_below_one_count_as_one(attempt: int) -> None:
    assert backoff_delay(attempt, 0.5, 60.0, jitter="none") == 0.5


def test_doublings_stop_so_nothing_overflows() -> None:
    # without the limit, 2.0 ** 2000 raises OverflowError
    huge = backoff_delay(2000, 1e-30, float("inf"), jitter="none")
    assert huge == 1e-30 * 2.0 ** MAX_DOUBLINGS


def test_full_jitter_spans_zero_to_ceiling() -> None:
    assert backoff_delay(3, 0.5, 60.0, rand=fixed(0.0)) == 0.0
    assert backoff_delay(3, 0.5, 60.0, rand=fixed(0.25)) == 0.5
    assert backoff_delay(3, 0.5, 60.0, rand=fixed(0.999)) == pytest.approx(1.998)


def test_equal_jitter_spans_half_to_ceiling() -> None:
    assert backoff_delay(3, 0.5, 60.0, jitter="equal", rand=fixed(0.0)) == 1.0
    assert backoff_delay(3, 0.5, 60.0, jitter="equal", rand=fixed(0.5)) == 1.5
    assert backoff_delay(9, 0.5, 10.0, jitter="equal", rand=fixed(0.999)) == pytest.approx(9.995)


def test_no_jitter_does_not_draw() -> None:
    def never() -> float:
        raise AssertionError("rand called")

    assert backoff_delay(4, 0.5, 60.0, jitter="none", rand=never) == 4.0


def test_default_rand_stays_in_range() -> None:
    for attempt in (1, 4, 12):
        ceiling = backoff_delay(attempt, 0.5, 10.0, jitter="none")
        full = [backoff_delay(attempt, 0.5, 10.0) for _ in range(200)]
        equal = [backoff_delay(attempt, 0.5, 10.0, jitter="equal") for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in full)
        assert all(ceiling / 2 <= d <= ceiling for d in equal)
        assert max(full) > ceiling / 2


def test_unknown_jitter_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown jitter"):
        backoff_delay(1, 0.5, 60.0, jitter="half")  # type: ignore[arg-type]


def test_same_draws_as_the_connector_runners_old_formula() -> None:
    # ConnectorRunner.backoff_delay before it used this module.
    old_rng, new_rng = random.Random(7), random.Random(7)
    for failures in [*range(0, 70), 500]:
        ceiling = min(60.0, 0.5 * 2.0 ** min(max(failures - 1, 0), 62))
        assert backoff_delay(failures, 0.5, 60.0, rand=new_rng.random) == \
            old_rng.uniform(0.0, ceiling)


def test_same_waits_as_a_doubling_reconnect_loop() -> None:
    # The reconnect loop of Pipeline.run: wait backoff * (0.5 + random() / 2), then
    # backoff = min(backoff * 2, max); backoff back to the initial value after a success.
    old_rng, new_rng = random.Random(11), random.Random(11)
    outcomes = [False] * 9 + [True] + [False] * 3 + [True, True] + [False] * 40
    backoff, old_waits = 0.5, []
    for ok in outcomes:
        if ok:
            backoff = 0.5
            continue
        old_waits.append(backoff * (0.5 + old_rng.random() / 2))
        backoff = min(backoff * 2, 10.0)
    attempt, new_waits = 0, []
    for ok in outcomes:
        if ok:
            attempt = 0
            continue
        attempt += 1
        new_waits.append(backoff_delay(attempt, 0.5, 10.0, jitter="equal", rand=new_rng.random))
    assert new_waits == old_waits
