"""Spinner: the adaptive spin-then-park policy."""

from __future__ import annotations

import time

import pytest

from shm import Ring
from shm.spin import PROBE_EVERY, PURE_SPIN_S, QUICK_ANSWER_S, Spinner


def test_quick_answers_keep_the_full_budget_and_misses_halve_it_to_zero():
    spinner = Spinner(200e-6)
    assert spinner.spin(lambda: True, None) is True
    assert spinner.budget_s == pytest.approx(200e-6)
    budgets = []
    for _ in range(12):
        assert spinner.spin(lambda: False, None) is False
        budgets.append(spinner.budget_s)
    assert budgets[0] == pytest.approx(100e-6) and budgets[1] == pytest.approx(50e-6)
    assert budgets[-1] == 0.0
    # Quick answers bring it back up.
    for _ in range(10):
        spinner.spin(lambda: True, None)
    assert spinner.budget_s == pytest.approx(200e-6)


def test_a_parked_spinner_probes_now_and_then():
    """At budget 0 a wait polls 16 times and gives up; every PROBE_EVERY-th wait spins longer.
    ready() only holds on its 20th call, so only a probe can see it."""
    spinner = Spinner(200e-6)
    outcomes = []
    for _ in range(4 * PROBE_EVERY):
        spinner.budget_s = 0.0
        calls = [0]

        def ready():
            calls[0] += 1
            return calls[0] >= 20

        outcomes.append(spinner.spin(ready, None))
    hits = [i + 1 for i, ok in enumerate(outcomes) if ok]
    assert hits, "no probe ever spun past 16 polls"
    assert all(i % PROBE_EVERY == 0 for i in hits), f"only every {PROBE_EVERY}th wait may probe: {hits}"


def test_late_answers_keep_the_budget_parks_halve_it_and_quick_ones_grow_it():
    """A peer that answers after QUICK_ANSWER_S but within the budget (a 64 KiB frame takes tens of microseconds to
    decode and answer) is still worth spinning for: only a wait that ends parked shrinks the budget."""
    spinner = Spinner(200e-6)
    start = time.monotonic()
    assert spinner.spin(lambda: time.monotonic() - start > 2 * QUICK_ANSWER_S, None) is True
    assert spinner.budget_s == pytest.approx(200e-6)
    assert spinner.spin(lambda: False, None) is False
    assert spinner.budget_s == pytest.approx(100e-6)
    # Past the pure phase (yielding), but still quick: the budget grows back. A busy machine can
    # stretch one such wait beyond QUICK_ANSWER_S, so allow a few tries.
    for _ in range(20):
        spinner.budget_s = 100e-6
        start = time.monotonic()
        assert spinner.spin(lambda: time.monotonic() - start > 2 * PURE_SPIN_S, None) is True
        if spinner.budget_s == pytest.approx(200e-6):
            break
    else:
        pytest.fail(f"a quick answer never restored the budget (last {spinner.budget_s})")


def test_deadline_bounds_the_spin_and_bad_values_are_refused():
    spinner = Spinner(0.5)
    start = time.monotonic()
    assert spinner.spin(lambda: False, start + 0.01) is False
    assert time.monotonic() - start < 0.2
    assert Spinner(0).spin(lambda: True, None) is True
    for bad in (-1, 1.0, "fast", None):
        with pytest.raises(ValueError, match="spin_s"):
            Spinner(bad)
    with pytest.raises(ValueError, match="spin_s"):
        Ring.create("rt1_never_created", 4096, spin_s=-1)
