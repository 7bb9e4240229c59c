"""Three hosts on one machine (network namespaces and veth pairs): host a runs Redis, the producer
and the collector; hosts b and c run workers that share no disk with a. Photos dropped on a come back
as outputs on a, computed on b and c, and a worker cut off mid-job loses nothing.

Needs root and iproute2; skipped, with the reason, where those are missing (failed instead when
TEST_REQUIRE_TOOLS=1, as CI sets it).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from redis import Redis
from rq.job import Job
from rq.registry import StartedJobRegistry

from depthq.config import load_config
from depthq.contract import SERIALIZER, inflight_key, results_stream
from testkit.clips import write_clip
from testkit.cluster import Cluster, cluster
from testkit.netns import unavailable_reason
from testkit.photos import write_jpeg
from testkit.tiny_model import expected_depth
from testkit.waiting import wait_for
from tests.endstate import settle

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Cluster]:
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("TEST_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{reason}, and TEST_REQUIRE_TOOLS=1 asks for every check")
        pytest.skip(reason)
    with cluster(tmp_path_factory.mktemp("hosts"), tiny_model) as c:
        c.start_redis()
        c.start_producer()
        c.start_worker("b")
        c.start_worker("c")
        c.wait(lambda: c.workers_ready(2), "the workers on b and c")
        yield c


def _results(c: Cluster, folder: str) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (c.out / folder).glob("*.jpg.json")}


def _settle(c: Cluster) -> None:
    """How each test ends: settled, as host a's Redis and disk see it, with the cluster still up."""
    config = load_config(
        environ={},
        overrides={"producer": {"watch": str(c.inbox)}, "output": {"dir": str(c.out)}, "transport": {"mode": "redis"}},
    )
    c.wait(lambda: True, "the cluster to be up")  # fails, with the log, if a process died
    settle(config, c.client(), log=c.root)


def _queue_drained(redis: Redis) -> bool:
    return redis.llen("rq:queue:depthq") == 0 and StartedJobRegistry("depthq", connection=redis).count == 0


def test_fifty_photos_dropped_on_a_come_back_from_b_and_c(hosts: Cluster) -> None:
    c = hosts
    for i in range(50):
        write_jpeg(c.inbox / "batch" / f"{i:02d}.jpg", width=96, height=64, seed=100 + i)
    c.wait(lambda: len(_results(c, "batch")) == 50, "50 results on host a", timeout=180)
    results = _results(c, "batch")
    by_host = Counter(meta["worker"]["host"] for meta in results.values())
    assert set(by_host) == {"b", "c"}, by_host  # each worker host did some of the work
    for name, meta in results.items():
        stem = name.removesuffix(".json")
        assert meta["source"] == f"batch/{stem}"
        assert (c.out / "batch" / f"{stem}.depth.npy").stat().st_size > 96 * 64 * 4
        assert (c.out / "batch" / f"{stem}.preview.png").exists()
    assert not list(c.out.rglob(".*.tmp")) and not list(c.out.rglob("*.error.json"))
    # Nothing left behind in Redis: every photo and result was freed once collected.
    redis = c.client()
    wait_for(lambda: redis.hlen(inflight_key("depthq")) == 0, "in-flight entries to be freed", timeout=30)
    assert redis.xlen(results_stream("depthq")) == 0
    assert redis.keys("depthq:depthq:photo:*") == [] and redis.keys("depthq:depthq:result:*") == []
    # b and c never saw a's folders: the workers' own output folders were never made either.
    assert not (c.root / "b" / "no-output-here").exists() and not (c.root / "c" / "no-output-here").exists()
    _settle(c)


def test_a_clip_dropped_on_a_is_computed_on_b_and_c_and_assembled_on_a(hosts: Cluster) -> None:
    """The producer sends each chunk its own packets across the network, never the clip; b and c send
    each frame's depth back; a's collector assembles the clip where its outputs are."""
    c = hosts
    staged = write_clip(c.root / "walk.mp4", width=64, height=48, frames=40)  # 3 chunks of 16
    (c.inbox / "clips").mkdir(parents=True, exist_ok=True)
    staged.rename(c.inbox / "clips" / "walk.mp4")  # dropped whole, as a copy into the folder would be
    sidecar = c.out / "clips" / "walk.mp4.json"
    c.wait(sidecar.exists, "the clip's sidecar on host a", timeout=180)
    meta = json.loads(sidecar.read_text())
    assert meta["frames_computed"] == 40 and {w["host"] for w in meta["workers"]} <= {"b", "c"}
    depth = sorted((c.out / "clips" / "walk.mp4.depth").iterdir())
    assert [f.name for f in depth] == [f"{k:06d}.npy" for k in range(1, 41)]
    np.testing.assert_allclose(np.load(depth[0]), expected_depth(64, 48), rtol=1e-5)
    assert (c.out / "clips" / "walk.mp4.preview.mp4").stat().st_size > 0
    _settle(c)  # no staging folder left: the sidecar lands before it goes, and it before the request is acked


def test_a_worker_cut_off_mid_job_is_recovered_by_the_other(hosts: Cluster) -> None:
    c = hosts
    redis = c.client()
    # Only b is listening when the photo arrives (an idle worker's blocking pop would take it
    # otherwise); c's worker comes back at the moment of the cut.
    c.stop("worker-c0")
    c.wait_exit("worker-c0", timeout=60)
    write_jpeg(c.inbox / "cut" / "big.jpg", width=6000, height=4000, seed=7)
    registry = StartedJobRegistry("depthq", connection=redis)

    def started_on_b() -> str | None:
        for jid in registry.get_job_ids():
            job = Job.fetch(jid, connection=redis, serializer=SERIALIZER)
            if job.meta.get("host") == "b":  # the job's first stage names its host
                return jid
        return None

    c.wait(started_on_b, "b to start the big photo", timeout=60)
    jid = started_on_b()
    c.net.cut("b")
    cut_at = time.monotonic()
    c.start_worker("c", index=1)
    sidecar = c.out / "cut" / "big.jpg.json"
    c.wait(sidecar.exists, "c to finish b's photo", timeout=180)
    recovery_s = time.monotonic() - cut_at
    meta = json.loads(sidecar.read_text())
    assert meta["worker"]["host"] == "c" and meta["job_id"] == jid
    assert (meta["width"], meta["height"]) == (6000, 4000)
    files = sorted(p.name for p in (c.out / "cut").iterdir())
    assert files == ["big.jpg.depth.npy", "big.jpg.json", "big.jpg.preview.png"]
    c.wait(lambda: redis.hlen(inflight_key("depthq")) == 0, "in-flight entries to be freed", timeout=30)
    assert redis.xlen(results_stream("depthq")) == 0
    print(f"\nrecovered {recovery_s:.1f} s after b was cut off (worker.dead_after_s=10)")

    # b's cable back in: it finds its job went to c, drops its copy, and sends nothing.
    written = sidecar.stat().st_mtime_ns
    c.net.restore("b")
    c.wait(lambda: "its copy is dropped" in c.log("worker-b0"), "b to notice its job went elsewhere", timeout=120)
    assert sidecar.stat().st_mtime_ns == written and json.loads(sidecar.read_text())["worker"]["host"] == "c"
    assert redis.xlen(results_stream("depthq")) == 0 and redis.hlen(inflight_key("depthq")) == 0
    assert Job.fetch(jid, connection=redis, serializer=SERIALIZER).get_status() == "finished"  # not failed by b
    _settle(c)


def test_the_collector_killed_while_results_arrive_loses_none(hosts: Cluster) -> None:
    """SIGKILL `depthq watch` (producer and collector) part-way through 30 results, then start it
    again: every photo still ends as one complete output set, with no temporary file left."""
    c = hosts
    redis = c.client()
    for i in range(30):
        write_jpeg(c.inbox / "killed" / f"{i:02d}.jpg", width=320, height=240, seed=300 + i)
    c.wait(lambda: len(_results(c, "killed")) >= 3, "the first results", timeout=120)
    # Frozen wherever it is (maybe mid-write), then killed once the workers have sent what they can:
    # the results it had read but not written, and those it never read, are all in Redis.
    c.stop("producer", signal.SIGSTOP)
    collected_before = len(_results(c, "killed"))
    c.wait(lambda: _queue_drained(redis), "the workers to finish what was enqueued", timeout=120)
    waiting = redis.xlen(results_stream("depthq"))
    c.stop("producer", signal.SIGKILL)
    c.wait_exit("producer", timeout=30)
    c.start_producer(name="producer-again")
    c.wait(lambda: len(_results(c, "killed")) == 30, "all 30 results after the restart", timeout=180)
    assert collected_before < 30 and waiting > 0  # the kill came while results were still arriving
    print(f"\nkilled the collector with {collected_before} results written and {waiting} waiting in Redis")
    for name in _results(c, "killed"):
        stem = name.removesuffix(".json")
        assert (c.out / "killed" / f"{stem}.depth.npy").stat().st_size > 320 * 240 * 4
        assert (c.out / "killed" / f"{stem}.preview.png").exists()
    assert not list((c.out / "killed").glob(".*.tmp")) and not list((c.out / "killed").glob("*.error.json"))
    c.wait(lambda: redis.hlen(inflight_key("depthq")) == 0, "in-flight entries to be freed", timeout=30)
    assert redis.xlen(results_stream("depthq")) == 0
    _settle(c)
