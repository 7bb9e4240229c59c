"""The worker's side of `depthq.taking`: rq's queue class, with a dequeue that loses no job.

rq calls `dequeue_any` on its worker's queue class. This one takes the first id of the first lane
that has one (live before backfill) into the worker's taking list, in one script; while both lanes are
empty it waits on the live lane with BLMOVE into the same list, for up to `IDLE_POLL_S` at a time,
and looks at both lanes again in between. So a live drop is taken the moment it arrives, and a
backfill job at most `IDLE_POLL_S` after an idle spell (Redis cannot block on two lists and move).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from redis import Redis
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.queue import Queue
from rq.utils import as_text

from depthq.taking import TAKE

# The longest a waiting worker blocks on the live lane before it looks at the backfill lane again.
IDLE_POLL_S = 1.0


class TakingQueue(Queue):
    """rq's Queue, taking jobs into `taking_key` (set on a subclass per worker: `for_worker`)."""

    taking_key: ClassVar[str] = ""

    @classmethod
    def for_worker(cls, taking_key: str) -> type[TakingQueue]:
        return type("TakingQueue", (cls,), {"taking_key": taking_key})

    @classmethod
    def take(cls, connection: Redis, queue_keys: list[str], wait_s: float | None) -> tuple[str, str] | None:
        """One job id from the first lane that has one, moved into the taking list; None if none came."""
        taken = connection.eval(TAKE, len(queue_keys) + 1, *queue_keys, cls.taking_key)
        if taken:
            return as_text(taken[0]), as_text(taken[1])
        if not wait_s:
            return None
        jid = connection.blmove(queue_keys[0], cls.taking_key, wait_s, "LEFT", "LEFT")
        return (queue_keys[0], as_text(jid)) if jid is not None else None

    @classmethod
    def dequeue_any(
        cls,
        queues: Any,
        timeout: int | None,
        connection: Redis | None = None,
        job_class: type[Job] | None = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        assert connection is not None and cls.taking_key, "TakingQueue.for_worker(...) with a connection"
        queue_keys = [queue.key for queue in queues]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_s = None if deadline is None else min(IDLE_POLL_S, deadline - time.monotonic())
            taken = cls.take(connection, queue_keys, wait_s if wait_s is None or wait_s > 0 else None)
            if taken is None:
                if deadline is None:
                    return None
                if time.monotonic() >= deadline:
                    raise DequeueTimeout(timeout, queue_keys)
                continue
            queue_key, jid = taken
            try:
                found = cls._fetch_dequeued_job(
                    connection,
                    queue_key,
                    jid,
                    job_class=job_class,
                    serializer=serializer,
                    death_penalty_class=death_penalty_class,
                )
            except Exception:
                connection.lrem(cls.taking_key, 1, jid)  # rq deals with a job it cannot read; never again here
                raise
            if found is None:  # deleted while it waited: nothing to start
                connection.lrem(cls.taking_key, 1, jid)
                continue
            return found
