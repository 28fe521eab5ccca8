"""GCRA, the generic cell rate algorithm: an exact rate limit with a burst, kept as one number per key.

A limit of ``q`` requests per ``w`` seconds admits one request every ``T = w / q`` seconds on average, and up
to ``burst`` at once after a quiet spell. The state of a key is its *theoretical arrival time* (TAT): when the
key would be fully rested. A request at ``now`` is admitted when ``max(TAT, now) + T - now <= burst * T``, and
then the TAT moves forward by ``T``; a refused request changes nothing, so a client that keeps calling above
the limit is still admitted at exactly the sustained rate (a sliding window that counts refusals would lock it
out for good). Everything a ``RateLimit`` header says comes from the same arithmetic: what is left of the
burst, how long until one more request is admitted, how long until the burst is whole again. The same
algorithm is what Redis 8's ``GCRA`` command and most gateways' local limiters compute.

:class:`LocalGcra` keeps the TATs of one process in a dict (about a microsecond a check); a shared store
(Redis) can keep the same numbers for several instances.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

RATE = re.compile(r"^\s*(?P<count>[1-9][0-9]{0,8})\s*/\s*(?P<unit>s|sec|second|min|minute|h|hour|d|day)\s*$")
SECONDS = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86_400,
           "day": 86_400}
UNIT_NAMES = {1: "second", 60: "minute", 3600: "hour", 86_400: "day"}
EPSILON = 1e-9
"""Float slack: a request exactly on time is on time."""


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` requests per ``window`` seconds, up to ``burst`` at once."""

    count: int
    window: int
    burst: int
    interval: float = field(init=False, compare=False)
    """Seconds between two requests at the sustained rate (GCRA's emission interval)."""
    capacity: float = field(init=False, compare=False)
    """How far ahead of now the TAT may run: ``burst`` intervals."""

    def __post_init__(self) -> None:  # computed once: they are read on every limited request
        object.__setattr__(self, "interval", self.window / self.count)
        object.__setattr__(self, "capacity", self.burst * self.window / self.count)

    @classmethod
    def parse(cls, text: str, burst: int | None = None) -> Rate:
        """``"50/s"``, ``"3000/min"``, ``"100000/h"`` or ``"1000000/d"``; ``burst`` defaults to one window's
        count. Raises ValueError with what is accepted."""
        match = RATE.match(text)
        if match is None:
            raise ValueError(f"cannot read the rate {text!r}: write requests per second, minute, hour or day, "
                             "e.g. \"50/s\", \"3000/min\", \"100000/h\"")
        count, window = int(match["count"]), SECONDS[match["unit"]]
        if burst is not None and burst < 1:
            raise ValueError("burst is at least 1")
        return cls(count, window, burst if burst is not None else count)

    def __str__(self) -> str:
        return f"{self.count}/{UNIT_NAMES[self.window]}"


class Decision(NamedTuple):
    """One limit's answer for one request (a tuple: made on every limited request, and a frozen dataclass
    costs several times as much to build)."""

    allowed: bool
    remaining: int
    """Requests that would still be admitted at once, after this one."""
    retry_after: float
    """Seconds until one more request would be admitted (0 when one would be now)."""
    reset_after: float
    """Seconds until the burst is whole again."""


class LocalGcra:
    """The TATs of this process, in monotonic seconds (a clock that never jumps back)."""

    def __init__(self) -> None:
        self._tat: dict[object, float] = {}

    def check(self, limits: Sequence[tuple[object, Rate]], now: float) -> list[Decision]:
        """Admit a request under every ``(key, rate)`` at once, or under none: a request refused by one limit
        uses nothing of the others (their decisions then say what is left without it)."""
        store = self._tat
        tats = []
        admitted = True
        for key, rate in limits:
            tat = store.get(key, now)
            if tat < now:
                tat = now
            tats.append(tat)
            if tat + rate.interval - now > rate.capacity + EPSILON:
                admitted = False
        decisions = []
        for tat, (key, rate) in zip(tats, limits, strict=True):
            interval = rate.interval
            if admitted:
                tat = store[key] = tat + interval
            ahead = tat - now
            waited = ahead + interval - rate.capacity  # > 0: how long until one more fits
            left = math.floor((rate.capacity - ahead) / interval + EPSILON)
            if waited <= EPSILON:
                decisions.append(Decision(True, left if left > 0 else 0, 0.0, ahead))
            else:
                decisions.append(Decision(admitted, left if left > 0 else 0, waited, ahead))
        return decisions
