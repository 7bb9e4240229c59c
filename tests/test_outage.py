"""depthq/outage.py: an outage is said once when it begins and once when it ends."""

from __future__ import annotations

from depthq.outage import Outage


def test_an_outage_is_said_once_each_way() -> None:
    outage = Outage()
    assert not outage and not outage.ends()  # nothing to clear before anything began
    assert [outage.begins() for _ in range(3)] == [True, False, False]
    assert outage
    assert [outage.ends() for _ in range(2)] == [True, False]
    assert not outage
    assert outage.begins()  # a second outage is said again
