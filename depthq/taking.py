"""Taking a job from the lanes so that a worker frozen or killed at that moment loses none.

rq takes a job from several queues with BLPOP: Redis removes the id from its queue and hands it to
the worker's connection in one step. A worker stopped (SIGSTOP) while it waits there, or killed
before it records the job as started, leaves the id in no list at all: the job stays "queued" for
ever, and every rescan takes it for pending. (With one queue rq moves the id into an intermediate
list instead, and later fails the jobs it finds stuck there.)

So a depthq worker moves the id into a list of its own, its taking list, in the same command that
takes it (`TAKE`, or BLMOVE while it waits), and removes it from there in the same transaction that
records the job as started (`worker.dequeue`). An id in a taking list is therefore a job taken and not
started. A worker announces that it lives (`alive_key`, renewed with every heartbeat); the ids of one
that is gone are pushed back to the head of their lane (`give_back`), by the next maintenance of any
other worker, by `depthq up` at once when it sees the worker die, and by the worker itself when it
stops. One script moves them, so an id is given back once, and never both given back and started.
"""

from __future__ import annotations

from redis import Redis
from rq.job import Job
from rq.queue import Queue

from depthq.contract import taking_key, taking_pattern


def alive_key(queue_name: str, worker_name: str) -> str:
    """Set while the worker lives: renewed with each heartbeat, expiring `worker.dead_after_s` after the last."""
    return f"depthq:{queue_name}:alive:{worker_name}"


# KEYS: the lanes in order, then the taking list. The first id of the first lane that has one, moved.
TAKE = """
for i = 1, #KEYS - 1 do
  local id = redis.call('LMOVE', KEYS[i], KEYS[#KEYS], 'LEFT', 'LEFT')
  if id then return {KEYS[i], id} end
end
return false
"""

# KEYS[1]: a taking list; ARGV: rq's job and queue key prefixes. Each id goes back to the head of its
# lane (the job's `origin`), the oldest taken first again; an id whose job was deleted is dropped.
_GIVE_BACK = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local given = {}
for i = 1, #ids do
  local origin = redis.call('HGET', ARGV[1] .. ids[i], 'origin')
  if origin then
    redis.call('LPUSH', ARGV[2] .. origin, ids[i])
    table.insert(given, ids[i])
  end
end
redis.call('DEL', KEYS[1])
return given
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def give_back(connection: Redis, queue_name: str, worker_name: str) -> list[str]:
    """Put the jobs `worker_name` took and never started back at the head of their lanes."""
    given = connection.eval(
        _GIVE_BACK, 1, taking_key(queue_name, worker_name), Job.redis_job_namespace_prefix,
        Queue.redis_queue_namespace_prefix,
    )  # fmt: skip
    return [_text(jid) for jid in given or []]


def takers(connection: Redis, queue_name: str) -> list[str]:
    """The workers that hold a taking list right now (an empty list does not exist in Redis)."""
    prefix = taking_key(queue_name, "")
    return sorted(_text(key)[len(prefix) :] for key in connection.scan_iter(match=taking_pattern(queue_name)))


def give_back_dead(connection: Redis, queue_name: str) -> dict[str, list[str]]:
    """Give back the takes of every worker that no longer lives. Returns the jobs given back, by worker."""
    out: dict[str, list[str]] = {}
    for worker in takers(connection, queue_name):
        if connection.exists(alive_key(queue_name, worker)):
            continue
        given = give_back(connection, queue_name, worker)
        if given:
            out[worker] = given
    return out


def give_back_process(connection: Redis, queue_name: str, host: str, pid: int) -> list[str]:
    """Give back the takes of the worker process `pid` on `host`, which just died (`depthq up` saw it):
    at once, not `worker.dead_after_s` later. Worker names are `<host>.<backend>.<pid>`."""
    given: list[str] = []
    for worker in takers(connection, queue_name):
        if worker.startswith(f"{host}.") and worker.endswith(f".{pid}"):
            given += give_back(connection, queue_name, worker)
    return given


def expire_started(connection: Redis, host: str, pid: int) -> list[str]:
    """Mark the jobs the dead worker process `pid` on `host` had started as abandoned now, so the next
    maintenance pass of any worker hands them on. Its heartbeat would lapse by itself, but a worker in
    a prediction that holds the GIL announces a lapse at the watchdog's limit (`DepthWorker.predicting`),
    minutes away: `depthq up`, which saw the death, need not wait for it. Returns the job ids."""
    from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE
    from rq.registry import StartedJobRegistry
    from rq.utils import parse_composite_key

    expired: list[str] = []
    for key in connection.scan_iter(match=WORKER_EXECUTIONS_KEY_TEMPLATE.format(f"{host}.*.{pid}")):
        for member in connection.smembers(key):
            composite = _text(member)
            jid, _ = parse_composite_key(composite)
            origin = connection.hget(Job.redis_job_namespace_prefix + jid, "origin")
            if origin is None:
                continue
            registry = StartedJobRegistry(_text(origin), connection=connection)
            if connection.zadd(registry.key, {composite: 1}, xx=True, ch=True):
                expired.append(jid)
    return expired
