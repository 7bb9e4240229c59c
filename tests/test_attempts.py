"""depthq/attempts.py: a photo's attempts, counted in Redis beside its job, survive the death of the
worker that made them, so the attempt after `worker.retries` deaths can name them. On a real Redis; the
deaths themselves (SIGSEGV, a C deadlock) are caused for real in test_supervisor.py and test_gil.py."""

from __future__ import annotations

from redis import Redis

from depthq import attempts

Q, JID, HOST = "depthq", "job-1", "host-a"


def test_an_attempt_that_ends_is_no_death(redis_client: Redis) -> None:
    before = attempts.begin(redis_client, Q, JID, HOST, 100, running_ttl_s=60)
    assert before == attempts.Attempts()  # the record as it was: nothing yet
    assert redis_client.get(attempts.running_key(Q, HOST, 100)) == JID.encode()
    attempts.end(redis_client, Q, JID, HOST, 100)
    again = attempts.begin(redis_client, Q, JID, HOST, 101, running_ttl_s=60)
    assert (again.started, again.ended, again.died) == (1, 1, 0)
    assert not redis_client.exists(attempts.running_key(Q, HOST, 100))
    assert 0 < redis_client.ttl(attempts.attempts_key(Q, JID)) <= attempts.ATTEMPTS_TTL_S


def test_deaths_are_counted_and_named_in_order(redis_client: Redis) -> None:
    """Two workers die in the photo: one seen by the supervisor, one nobody saw. The third attempt
    reads both, in order, for its error file."""
    attempts.begin(redis_client, Q, JID, HOST, 200, running_ttl_s=60)
    assert attempts.record_death(redis_client, Q, HOST, 200, "killed by SIGSEGV") == JID
    assert attempts.record_death(redis_client, Q, HOST, 200, "said twice") is None  # said once only
    attempts.begin(redis_client, Q, JID, "host-b", 300, running_ttl_s=60)  # dies unseen
    third = attempts.begin(redis_client, Q, JID, HOST, 400, running_ttl_s=60)
    assert third.died == 2 and third.deaths == {1: "killed by SIGSEGV"}
    assert third.describe() == (
        "attempt 1: killed by SIGSEGV; 1 unseen: a worker not started by depthq up; see its service's log"
    )
    assert not third.timed_out


def test_timed_out_only_when_every_death_was_a_time_out(redis_client: Redis) -> None:
    for pid in (1, 2):
        attempts.begin(redis_client, Q, JID, HOST, pid, running_ttl_s=60)
        attempts.record_death(redis_client, Q, HOST, pid, f"{attempts.TIMED_OUT} after 9 s")
    after = attempts.begin(redis_client, Q, JID, HOST, 3, running_ttl_s=60)
    assert after.died == 2 and after.timed_out


def test_an_environment_failure_spends_no_attempt_and_forget_starts_afresh(redis_client: Redis) -> None:
    attempts.begin(redis_client, Q, JID, HOST, 1, running_ttl_s=60)
    attempts.cancel(redis_client, Q, JID, HOST, 1)  # a full disk: the photo was never reached
    assert attempts.begin(redis_client, Q, JID, HOST, 2, running_ttl_s=60) == attempts.Attempts()
    attempts.forget(redis_client, Q, JID)
    assert not redis_client.exists(attempts.attempts_key(Q, JID))
