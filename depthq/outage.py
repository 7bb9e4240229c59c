"""A condition that lasts (a full disk, a Redis at maxmemory) is said once when it begins and once
when it ends, never once per photo per look: a week-long outage must not bury the log.

Every part that meets one (the watcher, the collector, the index, the worker, the job) keeps an
`Outage` and asks it whether this is the moment to speak.
"""

from __future__ import annotations


class Outage:
    """Whether an outage is on; true while it lasts, so `if collector.disk_failing:` reads plainly."""

    def __init__(self) -> None:
        self.active = False

    def begins(self) -> bool:
        """Note the outage; True only the first time it is met, the one time to say it."""
        first = not self.active
        self.active = True
        return first

    def ends(self) -> bool:
        """Note that it is over; True only if it was on, the one time to say it cleared."""
        was = self.active
        self.active = False
        return was

    def __bool__(self) -> bool:
        return self.active
