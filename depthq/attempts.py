"""How often depthq workers started a photo's job, how often an attempt ended, and why the others died.

rq counts retries on the job, but a worker that dies inside native code (a segfault in the decoder, an
abort in Core ML, a deadlock the job timeout cannot interrupt) ends no attempt: rq only finds the job
abandoned, retries it, and finally moves it to failed with no word to the user, and the producer's
next rescan would send it again, forever. So depthq keeps its own count, in Redis beside the job:
- a worker adds one to `started` before it touches the photo, and one to `ended` however the attempt
  ends (done, bad photo, an error rq retries);
- an attempt that never ended died with its worker; why, if anyone saw it, is recorded by the worker
  itself (it ended itself past the hard time limit) or by `depthq up`'s supervisor (the signal);
- the attempt after `worker.retries` such deaths records the photo as failed, naming the deaths, and
  never runs it.

Only depthq's job function counts, so a process that is not a depthq worker (a plain `rq worker` on
the queue) cannot spend a photo's attempts. The count is keyed by the job id, that is by the photo's
content: a changed photo starts again from zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redis import Redis

# Long enough to outlive any retry back-off and rescan; short enough that Redis does not keep them for ever.
ATTEMPTS_TTL_S = 30 * 86400
TIMED_OUT = "timed out"


def attempts_key(queue_name: str, jid: str) -> str:
    """Hash: started, ended, and death:<n> (why attempt n died) for one job."""
    return f"depthq:{queue_name}:attempts:{jid}"


def running_key(queue_name: str, host: str, pid: int) -> str:
    """The job the worker process `pid` on `host` has in hand, so whoever sees it die can say why."""
    return f"depthq:{queue_name}:running:{host}:{pid}"


@dataclass(frozen=True)
class Attempts:
    """What the record held before this attempt began."""

    started: int = 0
    ended: int = 0
    deaths: dict[int, str] = field(default_factory=dict)

    @property
    def died(self) -> int:
        """Attempts that began and never ended: their worker died in them."""
        return max(0, self.started - self.ended)

    def describe(self) -> str:
        """The deaths, in order, for the error file: 'attempt 1: killed by SIGSEGV; attempt 2: ...'."""
        parts = [f"attempt {n}: {why}" for n, why in sorted(self.deaths.items())]
        unseen = self.died - len(parts)
        if unseen > 0:
            parts.append(f"{unseen} unseen: a worker not started by depthq up; see its service's log")
        return "; ".join(parts)

    @property
    def timed_out(self) -> bool:
        return bool(self.deaths) and all(why.startswith(TIMED_OUT) for why in self.deaths.values())


def _decode(raw: dict[bytes, bytes]) -> Attempts:
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    deaths = {int(k.removeprefix("death:")): v for k, v in fields.items() if k.startswith("death:")}
    return Attempts(int(fields.get("started", 0)), int(fields.get("ended", 0)), deaths)


def begin(connection: Redis, queue_name: str, jid: str, host: str, pid: int, running_ttl_s: int) -> Attempts:
    """Count one more attempt, and say which job this process has in hand. Returns the record before it."""
    key = attempts_key(queue_name, jid)
    with connection.pipeline(transaction=True) as tx:
        tx.hgetall(key)
        tx.hincrby(key, "started", 1)
        tx.expire(key, ATTEMPTS_TTL_S)
        tx.set(running_key(queue_name, host, pid), jid, ex=running_ttl_s)
        before, *_ = tx.execute()
    return _decode(before)


def end(connection: Redis, queue_name: str, jid: str, host: str, pid: int) -> None:
    """The attempt ended, whatever its outcome: it is not one a worker died in."""
    with connection.pipeline(transaction=True) as tx:
        tx.hincrby(attempts_key(queue_name, jid), "ended", 1)
        tx.delete(running_key(queue_name, host, pid))
        tx.execute()


def cancel(connection: Redis, queue_name: str, jid: str, host: str, pid: int) -> None:
    """The attempt never got to the photo: the environment failed it (a full disk). It counts neither
    as started nor as ended, so days of waiting for space spend none of the photo's attempts."""
    with connection.pipeline(transaction=True) as tx:
        tx.hincrby(attempts_key(queue_name, jid), "started", -1)
        tx.delete(running_key(queue_name, host, pid))
        tx.execute()


def record_death(connection: Redis, queue_name: str, host: str, pid: int, why: str) -> str | None:
    """Why the worker process `pid` died in its attempt, unless that was said already; returns its job."""
    jid = connection.get(running_key(queue_name, host, pid))
    if jid is None:
        return None
    key = attempts_key(queue_name, jid.decode())
    started = int(connection.hget(key, "started") or 0)
    if started:
        connection.hsetnx(key, f"death:{started}", why)
    connection.delete(running_key(queue_name, host, pid))
    return jid.decode()


def forget(connection: Redis, queue_name: str, jid: str) -> None:
    """A fresh start for a job the user asked to run again (`depthq failed retry`, `enqueue --force`)."""
    connection.delete(attempts_key(queue_name, jid))
