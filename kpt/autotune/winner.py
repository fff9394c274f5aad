"""The one rule that turns a group of measurements into a choice.

Lookup, the tuner's report and ``kpt-autotune show`` all call :func:`pick`, so the choice a
user is shown is the choice dispatch makes. The rule:

* only valid rows that describe the running code (fresh) compete;
* the fastest median wins, ties broken by the op's backend priority and then the config JSON,
  so the same rows always give the same answer;
* the winner must beat the op's untuned default by more than the noise (3 %, or the measured
  relative spread of either, whichever is larger); otherwise the default stays. Switching
  kernels for a gain inside the noise would make dispatch flip-flop between tuning runs;
* when the default's row itself is stale, no choice is made: nothing says whether a candidate
  beats the default's *current* code, so static dispatch decides until the group is re-tuned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from kpt.autotune.db import GROUP, Row

log = logging.getLogger("kpt")

NOISE_FLOOR = 0.03


@dataclass(frozen=True)
class Pick:
    """The chosen row of a group and the untuned default's row (None if not measured)."""

    winner: Row
    default: Row | None

    @property
    def default_us(self) -> float | None:
        if self.default is None or not self.default["valid"]:
            return None
        return self.default["median_us"]

    @property
    def speedup(self) -> float | None:
        """Default time over winner time (> 1 is faster than untuned)."""
        base = self.default_us
        return None if base is None else base / self.winner["median_us"]


def _always_fresh(_row: Row) -> bool:
    return True


def rank(row: Row, order: Sequence[str]) -> tuple:
    """Sort key: median, then backend priority (unlisted backends last, by name), then config."""
    position = order.index(row["backend"]) if row["backend"] in order else len(order)
    return (row["median_us"], position, row["backend"], row["config"])


def pick(
    rows: Iterable[Row],
    order: Sequence[str] = (),
    is_fresh: Callable[[Row], bool] = _always_fresh,
) -> Pick | None:
    """The winner of one (op, dtype, bucket, fingerprint) group, or None to keep static dispatch.

    ``order`` is the op's backend priority for the device type; ``is_fresh`` says whether a row
    was measured on the code running now.
    """
    rows = sorted(rows, key=lambda r: (r["backend"], r["config"]))
    default = next((r for r in rows if r["is_default"]), None)
    if default is not None and not is_fresh(default):
        return None
    candidates = [r for r in rows if r["valid"] and r["median_us"] is not None and is_fresh(r)]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: rank(r, order))
    if default is None or not default["valid"] or best is default:
        return Pick(best, default)
    margin = max(NOISE_FLOOR, default["spread"] or 0.0, best["spread"] or 0.0)
    if best["median_us"] < default["median_us"] * (1.0 - margin):
        return Pick(best, default)
    return Pick(default, default)


def winners(rows: Iterable[Row],
            priorities: Mapping[str, Sequence[str]]) -> dict[tuple[str, ...], Pick]:
    """Picks for every group in ``rows``, keyed by (op, dtype, bucket, fingerprint).

    ``priorities`` maps every registered op to its backend priority for the device type; rows
    of other ops (removed or renamed) are ignored. Freshness is checked against the running
    code with :func:`kpt.autotune.provenance.stale_reason`.
    """
    from kpt.autotune.provenance import stale_reason

    groups: dict[tuple[str, ...], list[Row]] = {}
    for row in rows:
        if row["op"] in priorities:
            groups.setdefault(tuple(row[k] for k in GROUP), []).append(row)

    fresh: dict[tuple, bool] = {}

    def is_fresh(row: Row) -> bool:
        key = tuple(row[k] for k in ("op", "backend", "source_hash", "kpt_version",
                                     "torch_version", "triton_version"))
        if key not in fresh:
            reason = stale_reason(row)
            if reason:
                log.debug("autotune: ignoring stale %s/%s rows: %s", row["op"], row["backend"],
                          reason)
            fresh[key] = reason is None
        return fresh[key]

    picks = {}
    for key, group in sorted(groups.items()):
        chosen = pick(group, priorities[key[0]], is_fresh)
        if chosen is not None:
            picks[key] = chosen
    return picks
