"""The winner rule shared by lookup, the tuner and ``show``."""

from __future__ import annotations

import random

from autotune_helpers import make_row

from kpt.autotune.winner import NOISE_FLOOR, pick

ORDER = ("slow", "fast", "reference")


def _winner(rows, is_fresh=lambda r: True):
    chosen = pick(rows, ORDER, is_fresh)
    return None if chosen is None else (chosen.winner["backend"], chosen.winner["config"])


def test_fastest_wins_whatever_the_row_order():
    rows = [make_row("slow", is_default=1, median_us=10.0),
            make_row("fast", '{"block":1}', median_us=6.0),
            make_row("fast", '{"block":2}', median_us=5.0),
            make_row("reference", median_us=50.0)]
    for seed in range(5):
        random.Random(seed).shuffle(rows)
        assert _winner(rows) == ("fast", '{"block":2}')


def test_ties_break_by_backend_priority_then_config():
    rows = [make_row("slow", is_default=1, median_us=10.0),
            make_row("reference", median_us=5.0),
            make_row("fast", '{"block":2}', median_us=5.0),
            make_row("fast", '{"block":1}', median_us=5.0)]
    assert _winner(rows) == ("fast", '{"block":1}')
    assert _winner(rows[::-1]) == ("fast", '{"block":1}')


def test_a_gain_inside_the_noise_keeps_the_default():
    default = make_row("slow", is_default=1, median_us=100.0, spread=0.01)
    barely = make_row("fast", '{"block":1}', median_us=100.0 * (1 - NOISE_FLOOR) + 0.1)
    clearly = make_row("fast", '{"block":1}', median_us=90.0)
    noisy = make_row("fast", '{"block":1}', median_us=90.0, spread=0.2)  # 10% gain, 20% spread
    assert _winner([default, barely]) == ("slow", "{}")
    assert _winner([default, clearly]) == ("fast", '{"block":1}')
    assert _winner([default, noisy]) == ("slow", "{}")
    noisy_default = make_row("slow", is_default=1, median_us=100.0, spread=0.15)
    assert _winner([noisy_default, clearly]) == ("slow", "{}")


def test_invalid_rows_never_win():
    rows = [make_row("slow", is_default=1, median_us=10.0),
            make_row("fast", '{"block":4}', valid=0),
            # An imported row marked invalid but carrying a time must not count either.
            {**make_row("fast", '{"block":2}', valid=0), "median_us": 0.001}]
    assert _winner(rows) == ("slow", "{}")
    assert _winner([rows[1]]) is None


def test_an_invalid_default_is_replaced_without_margin():
    rows = [make_row("slow", is_default=1, valid=0),
            make_row("reference", median_us=50.0)]
    chosen = pick(rows, ORDER)
    assert (chosen.winner["backend"], chosen.default_us, chosen.speedup) == ("reference", None,
                                                                             None)


def test_a_stale_default_means_no_choice():
    rows = [make_row("slow", is_default=1, median_us=10.0), make_row("fast", median_us=1.0)]
    assert _winner(rows, is_fresh=lambda r: r["backend"] != "slow") is None
    # A stale candidate simply drops out.
    assert _winner(rows, is_fresh=lambda r: r["backend"] != "fast") == ("slow", "{}")
