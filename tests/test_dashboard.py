"""`depthq dashboard`: rq-dashboard with our JSON serializer, served for real, and its guard rails."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from jinja2 import DictLoader
from redis import Redis

from depthq.cli import main
from depthq.clip_jobs import chunk_job_ids
from depthq.config import Config
from depthq.ops.dashboard import create_app
from depthq.redis_server import free_port
from producer.enqueue import Enqueuer
from testkit.clips import write_clip
from testkit.photos import write_jpeg
from testkit.waiting import wait_for
from tests.browser import chromium
from worker.backends import Backend
from worker.worker import build_worker


def _get(url: str, auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@contextmanager
def _dashboard(config: Config, write_config_file: Callable[..., Path], tmp_path: Path) -> Iterator[str]:
    """`depthq dashboard` as an operator starts it, on a free port; yields its base URL. Its log must
    end with no traceback."""
    port = free_port()
    config_file = write_config_file(
        config, "dashboard.yaml", dashboard={"port": port}, queue={"name": config.queue.name}
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    depthq = Path(sys.executable).with_name("depthq")
    log = tmp_path / "dashboard.log"
    with log.open("wb") as out:
        command = [str(depthq), "dashboard", "--config", str(config_file)]
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(base + "/")[0] == 200 or proc.poll() is not None, f"the dashboard (log: {log})")
        assert proc.poll() is None, log.read_text()
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Traceback" not in log.read_text(), log.read_text()


def test_queue_and_job_pages_show_a_jobs_meta(
    make_config: Callable[..., Config],
    redis_client: Redis,
    tiny_backend: Backend,
    write_config_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    config = make_config()
    done = Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "a.jpg", width=48, height=32))
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    waiting = Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "b.jpg", seed=3))

    with _dashboard(config, write_config_file, tmp_path) as base:
        status, body = _get(base + "/0/data/queues.json")
        assert status == 200
        queues = {q["name"]: q for q in json.loads(body)["queues"]}
        assert queues["depthq"]["count"] == 1
        status, body = _get(f"{base}/0/data/job/{done.job_id}.json")
        assert status == 200, body
        job = json.loads(body)
        meta = json.loads(job["metadata"])
        assert job["status"] == "finished" and meta["stage"] == "done" and meta["timings_ms"]["total"] > 0
        assert "a.jpg" in job["description"]
        status, body = _get(f"{base}/0/data/job/{waiting.job_id}.json")
        assert status == 200 and json.loads(body)["status"] == "queued"
        assert _get(f"{base}/0/view/job/{done.job_id}")[0] == 200
        assert _get(base + "/0/view/workers")[0] == 200
        assert _get(base + "/0/data/workers.json")[0] == 200
        assert _get(base + "/gallery/")[0] == 200


def test_the_navbar_links_the_gallery_and_jobs_opens_on_the_live_queue(
    make_config: Callable[..., Config],
    redis_client: Redis,
    write_config_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """In a browser, as an operator finds them: a Gallery tab beside rq-dashboard's own, and the Jobs tab
    listing the job waiting on the queue config names (not rq's empty `default`)."""
    from playwright.sync_api import expect

    config = make_config(queue={"name": "photos"})
    waiting = Enqueuer(config, redis_client).submit(write_jpeg(config.producer.watch / "w.jpg"))
    with _dashboard(config, write_config_file, tmp_path) as base, chromium() as browser:
        for path in ("/", "/0/view/workers", f"/0/view/job/{waiting.job_id}"):
            status, body = _get(base + path)
            nav = re.search(rb"<ul[^>]*navbar-nav.*?</ul>", body, re.DOTALL)
            assert status == 200 and nav is not None and b'href="/gallery/"' in nav.group(), path
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        crashes: list[str] = []
        page.on("pageerror", lambda exc: crashes.append(str(exc)))
        page.goto(base + "/")
        tabs = page.locator("#navbarSupportedContent .navbar-nav .nav-link")
        expect(tabs).to_have_text(["Queues", "Jobs", "Workers", "Gallery"])
        tabs.filter(has_text="Jobs").click()
        page.wait_for_url(f"{base}/0/view/jobs/photos/queued/8/asc/1")
        rows = page.locator("table#jobs tbody")
        expect(rows.locator(f'tr[data-job-id="{waiting.job_id}"]')).to_be_visible(timeout=10_000)
        expect(rows).not_to_contain_text("No jobs.")
        page.locator("#navbarSupportedContent .nav-link", has_text="Gallery").click()
        page.wait_for_url(base + "/gallery/")
        expect(page.locator("header h1")).to_be_visible()
        assert not crashes


def test_a_clips_chunk_and_assemble_jobs_read_clearly_on_their_pages(
    make_config: Callable[..., Config],
    redis_client: Redis,
    tiny_backend: Backend,
    write_config_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """A clip of 10 frames in chunks of 4, its first chunk computed, in a browser: each job's page names
    the clip and its part, and the assemble's (a job with dependencies, on which rq-dashboard's own data
    fails) links its chunks. The clip's name is HTML, and the pages show it as written, never run it."""
    from playwright.sync_api import expect

    config = make_config(video={"chunk_frames": 4})
    name = "<img src=x onerror=alert(1)> walk.mp4"
    clip = Enqueuer(config, redis_client).submit(write_clip(config.producer.watch / name, frames=10))
    build_worker(config, redis_client, tiny_backend).work(burst=True, max_jobs=1, with_scheduler=False)
    chunks = chunk_job_ids(clip.job_id, 3)

    with _dashboard(config, write_config_file, tmp_path) as base, chromium() as browser:
        status, body = _get(f"{base}/0/data/job/{clip.job_id}.json")
        assert status == 200, body
        assemble = json.loads(body)
        assert (assemble["status"], assemble["depends_on"]) == ("deferred", chunks)
        assert assemble["depends_on_status"] == ["active"] * 3
        assert _get(f"{base}/0/data/job/no-such-job.json")[0] == 404
        # The gallery's clip, through waitress as the dashboard serves it: a range, as a <video> asks.
        data = (config.producer.watch / name).read_bytes()
        part = _get(f"{base}/gallery/clip/{urllib.parse.quote(name)}", headers={"Range": "bytes=16-47"})
        assert part == (206, data[16:48])

        page = browser.new_page(viewport={"width": 1280, "height": 800})
        trouble: list[str] = []
        page.on("pageerror", lambda exc: trouble.append(str(exc)))
        page.on("dialog", lambda dialog: trouble.append(f"a dialog: {dialog.message}") or dialog.dismiss())
        page.goto(f"{base}/0/view/job/{chunks[0]}")
        description = page.locator("#job-data .description-scroll")
        expect(description).to_have_text(f"{name}: chunk 1/3, frames 0-3")
        expect(page.locator("#job-data p", has_text="Metadata")).to_contain_text('"stage": "done"')
        page.goto(f"{base}/0/view/job/{clip.job_id}")
        expect(description).to_have_text(f"{name}: assemble 3 chunk(s), 10 frames")
        links = page.locator("#job-data ul li a")
        expect(links).to_have_text(chunks)
        links.nth(1).click()
        page.wait_for_url(f"{base}/0/view/job/{chunks[1]}")
        expect(description).to_have_text(f"{name}: chunk 2/3, frames 4-7")
        expect(page.locator("#job-data")).to_contain_text("queued")
        assert page.locator("#job-data img").count() == 0
        assert not trouble, trouble


def test_basic_auth_guards_every_page(make_config: Callable[..., Config], redis_url: str, tmp_path: Path) -> None:
    secret = tmp_path / "dashboard.password"
    secret.write_text("s3cret\n")
    config = make_config(dashboard={"username": "ops", "password_file": str(secret)})
    client = create_app(config, redis_url).test_client()
    good = "Basic " + base64.b64encode(b"ops:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"ops:guess").decode()
    for page in ("/", "/0/data/queues.json", "/gallery/"):
        assert client.get(page).status_code == 401
        assert client.get(page, headers={"Authorization": wrong}).status_code == 401
        assert client.get(page, headers={"Authorization": good}).status_code == 200
    # The Jobs tab's redirect names the queue: only after the login.
    assert client.get("/0/view/jobs").status_code == 401
    assert client.get("/0/view/jobs", headers={"Authorization": good}).location == "/0/view/jobs/depthq/queued/8/asc/1"


def test_the_gallery_link_survives_a_navbar_it_does_not_know(
    make_config: Callable[..., Config], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A later rq-dashboard with another navbar: the link moves to the top of the page, with one warning."""
    app = create_app(make_config(), redis_url)
    app.jinja_loader = DictLoader({"rq_dashboard/navbar.html": "<div>a navbar with no list of tabs</div>"})
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="depthq.ops.dashboard"):
        pages = [client.get(path).get_data(as_text=True) for path in ("/", "/0/view/workers")]
    for html in pages:
        assert re.search(r'<body[^>]*>\s*<nav class="navbar"><a href="/gallery/"', html), html[:500]
    assert len([r for r in caplog.records if "navbar has changed" in r.getMessage()]) == 1


def test_refuses_to_face_the_network_without_a_password(
    make_config: Callable[..., Config], redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dashboard", "--bind", "0.0.0.0", "--redis-url", redis_url]) == 2
    assert "dashboard.username and dashboard.password_file" in capsys.readouterr().err
    config = make_config(dashboard={"username": "ops"})
    with pytest.raises(Exception, match="set both"):
        create_app(config, redis_url)
    # Deliberately opened up: allowed, on the user's word.
    assert create_app(make_config(dashboard={"bind": "0.0.0.0"}), redis_url, allow_no_auth=True) is not None


def test_the_dashboard_survives_a_restart_of_depthq_up(tmp_path: Path, tiny_model: Path) -> None:
    """The embedded Redis keeps its port across restarts, so an open dashboard keeps answering."""
    from tests.test_supervisor import _ready, start_up, stop

    config = {"model": {"path": str(tiny_model), "device": "cpu"}, "dashboard": {"port": free_port()}}
    up, up_log = start_up(tmp_path, config)
    dashboard = None
    try:
        _ready(up, up_log, tmp_path, 1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
        log = tmp_path / "dashboard.log"
        with log.open("wb") as out:
            dashboard = subprocess.Popen(
                [str(Path(sys.executable).with_name("depthq")), "dashboard"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=out,
            )
        base = f"http://127.0.0.1:{config['dashboard']['port']}"
        wait_for(lambda: _get(base + "/0/data/queues.json")[0] == 200 or dashboard.poll() is not None, f"({log})")
        write_jpeg(tmp_path / "inbox" / "a.jpg")  # so the queue exists in Redis's data across the restart
        wait_for((tmp_path / "depth-out" / "a.jpg.json").exists, f"the photo ({up_log})")
        assert stop(up) == 0
        up, up_log = start_up(tmp_path, config)
        _ready(up, up_log, tmp_path, 1)
        status, body = _get(base + "/0/data/queues.json")
        assert status == 200, body
        assert "depthq" in {q["name"] for q in json.loads(body)["queues"]}
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(30)
        assert stop(up) == 0


def test_the_dashboard_follows_depthq_ups_redis_when_it_moves(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Its old port was taken while depthq up restarted: the Redis came up elsewhere, and the open
    dashboard reconnects to what depthq up now advertises."""
    from depthq.connection import embedded_url_file
    from depthq.redis_server import EmbeddedRedis

    config = make_config(redis={"url": None, "data_dir": str(tmp_path / "redis-data")})
    marker = embedded_url_file(config)
    marker.parent.mkdir(parents=True)
    servers = [EmbeddedRedis(tmp_path / f"r{i}") for i in range(2)]
    try:
        for server in servers:
            server.start()
        Redis.from_url(servers[1].url).sadd("rq:queues", "rq:queue:only-on-the-second")
        marker.write_text(servers[0].url + "\n")
        client = create_app(config, servers[0].url).test_client()
        names = lambda: {q["name"] for q in client.get("/0/data/queues.json").get_json()["queues"]}  # noqa: E731
        assert "only-on-the-second" not in names()
        servers[0].stop()
        marker.write_text(servers[1].url + "\n")
        assert "only-on-the-second" in names()
    finally:
        for server in servers:
            server.stop()
