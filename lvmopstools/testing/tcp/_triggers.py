"""When a fault fires: the state that each active fault's trigger keeps (private).

:class:`FaultState` counts the occasions on which a fault was consulted and
holds the seeded random generators of the fault (jitter, slice sizes) and of
its :class:`~lvmopstools.testing.tcp.triggers.Probability` trigger, so that a
run with the same seeds fires on the same occasions. It also keeps the loop
timers of a fault that acts on its own (a refusal's time window).
"""

from __future__ import annotations

import asyncio
import random
import re

from lvmopstools.testing.tcp.faults import Fault
from lvmopstools.testing.tcp.triggers import (
    AfterN,
    Always,
    EveryKth,
    FirstN,
    Matches,
    Probability,
    TimeWindow,
)

__all__ = ["FaultState"]


class FaultState:
    """An active fault with the state its trigger needs."""

    __slots__ = ("fault", "handles", "occasions", "rng", "trigger_rng")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.occasions = 0
        seed = getattr(fault, "seed", 0)
        self.rng = random.Random(seed)
        trigger = fault.trigger
        self.trigger_rng = random.Random(
            trigger.seed if isinstance(trigger, Probability) else 0
        )
        self.handles: list[asyncio.TimerHandle] = []

    def fires(self, elapsed: float, request: bytes | None) -> bool:
        """Count one occasion and return True if the trigger fires on it."""
        self.occasions += 1
        trigger = self.fault.trigger
        n = self.occasions

        if isinstance(trigger, Always):
            return True
        if isinstance(trigger, FirstN):
            return n <= trigger.count
        if isinstance(trigger, AfterN):
            return n > trigger.count
        if isinstance(trigger, EveryKth):
            return n % trigger.k == 0
        if isinstance(trigger, TimeWindow):
            return trigger.contains(elapsed)
        if isinstance(trigger, Probability):
            return self.trigger_rng.random() < trigger.p
        if isinstance(trigger, Matches):
            return (
                request is not None and re.search(trigger.pattern, request) is not None
            )

        msg = f"trigger {trigger!r} is not supported by FlakyServer or FaultProxy"
        raise NotImplementedError(msg)

    def cancel_timers(self) -> None:
        """Cancel the loop timers of the fault (a refusal's window), if any."""
        for handle in self.handles:
            handle.cancel()
        self.handles.clear()
