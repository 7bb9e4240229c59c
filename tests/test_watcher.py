"""The watcher in this process: native events and polling, against a real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from redis import Redis

from producer.config import Config
from producer.enqueue import Enqueuer
from producer.watcher import Watcher
from tests.photos import write_jpeg


@contextmanager
def running(config: Config, redis_client: Redis) -> Iterator[Enqueuer]:
    enqueuer = Enqueuer(config, redis_client)
    stop = threading.Event()
    thread = threading.Thread(target=Watcher(config, enqueuer).run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield enqueuer
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def wait_count(enqueuer: Enqueuer, n: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if enqueuer.queue.count >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"expected {n} jobs, have {enqueuer.queue.count}")


@pytest.mark.parametrize("polling", [False, True], ids=["native", "polling"])
def test_new_photos_are_enqueued_once(make_config: Callable[..., Config], redis_client: Redis, polling: bool) -> None:
    config = make_config(producer={"polling": polling, "poll_interval_s": 0.2, "settle_ms": 200})
    with running(config, redis_client) as enqueuer:
        write_jpeg(config.producer.watch / "a.jpg")
        (config.producer.watch / "sub").mkdir()
        write_jpeg(config.producer.watch / "sub" / "b.JPG", seed=2)
        (config.producer.watch / "notes.txt").write_text("not a photo")
        (config.producer.watch / ".hidden.jpg").write_bytes(b"x")
        wait_count(enqueuer, 2)
        # Touching a photo again (same content) must not enqueue it a second time.
        (config.producer.watch / "a.jpg").touch()
        time.sleep(0.6)  # longer than settle + poll: gives a wrong second enqueue the chance to show up
        assert enqueuer.queue.count == 2


def test_missing_watch_folder_is_a_clear_error(make_config: Callable[..., Config], redis_client: Redis) -> None:
    config = make_config()
    config.producer.watch.rmdir()
    with pytest.raises(FileNotFoundError, match=r"producer\.watch"):
        Watcher(config, Enqueuer(config, redis_client)).run(threading.Event())


def test_output_inside_the_watched_folder_is_not_fed_back(
    make_config: Callable[..., Config], redis_client: Redis
) -> None:
    config = make_config(producer={"settle_ms": 100})
    config.output.dir = config.producer.watch / "depth-out"
    (config.output.dir).mkdir(parents=True)
    write_jpeg(config.output.dir / "old.jpg.preview.png.jpg")  # would be eligible anywhere else
    with running(config, redis_client) as enqueuer:
        write_jpeg(config.output.dir / "x.preview.jpg", seed=3)
        write_jpeg(config.producer.watch / "real.jpg", seed=4)
        wait_count(enqueuer, 1)
        time.sleep(0.5)  # settle window x5: time for a wrong enqueue to show
        assert enqueuer.queue.count == 1
