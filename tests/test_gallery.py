"""The results gallery: its JSON, thumbnails and path checks through Flask's test client, then the page in
headless Chromium while the real worker (tiny DepthPro, real Redis) lands results next to it."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from redis import Redis
from werkzeug.serving import make_server

import depthq.ops.gallery as gallery
from depthq.config import Config
from depthq.contract import recent_key
from depthq.depthmap import DepthMap
from producer.enqueue import Enqueuer
from testkit.clips import write_clip, write_undecodable_clip
from testkit.photos import write_jpeg
from testkit.tiny_model import expected_depth
from tests.browser import chromium
from worker.backends import Backend
from worker.worker import build_worker

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(worker={"retry_backoff_s": [0]})


@pytest.fixture
def compute(config: Config, redis_client: Redis, tiny_backend: Backend) -> Callable[..., None]:
    """Photos through the real producer and worker, as `depthq up` would run them."""

    def run(*photos: Path) -> None:
        enqueuer = Enqueuer(config, redis_client)
        for photo in photos:
            enqueuer.submit(photo)
        build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)

    return run


def make_app(config: Config, size: int = 48, refresh_s: float = 5.0, **kwargs: Any) -> Flask:
    app = Flask("test-gallery")
    bp = gallery.gallery_blueprint(
        output_dir=config.output.dir,
        watch_root=config.producer.watch,
        size=size,
        refresh_s=refresh_s,
        clip_extensions=config.video.extensions,
        **kwargs,
    )
    app.register_blueprint(bp, url_prefix="/gallery")
    return app


def client_for(config: Config, **kwargs: Any) -> FlaskClient:
    return make_app(config, **kwargs).test_client()


def sidecar(config: Config, source: str) -> dict[str, Any]:
    return json.loads((config.output.dir / (source + ".json")).read_text())


def set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, (seconds, seconds))


def jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        return img.size


def test_results_are_the_newest_sidecars_first_limited_to_size(config: Config, compute) -> None:
    watch = config.producer.watch
    compute(
        write_jpeg(watch / "a.jpg", seed=1), write_jpeg(watch / "trip" / "b.jpg", seed=2), write_jpeg(watch / "c.jpg")
    )
    # The order is set here, not left to how fast the worker wrote them.
    for source, t in (("a.jpg", 1_700_000_200), ("trip/b.jpg", 1_700_000_300), ("c.jpg", 1_700_000_100)):
        set_mtime(config.output.dir / (source + ".json"), t)
    body = client_for(config, size=2, refresh_s=2.0).get("/gallery/results.json").get_json()
    assert [r["source"] for r in body["results"]] == ["trip/b.jpg", "a.jpg"]
    assert body["refresh_s"] == 2.0 and body["size"] == 2 and body["generated_at"].endswith("+00:00")
    shown, meta = body["results"][0], sidecar(config, "trip/b.jpg")
    assert shown["kind"] == "result"
    assert shown["fov_deg"] == meta["fov_deg"] and shown["focal_length_px"] == meta["focal_length_px"]
    assert shown["depth"] == {k: meta["depth"][k] for k in ("min", "max", "median", "unit")}
    assert (shown["width"], shown["height"]) == (meta["width"], meta["height"])
    assert shown["host"] == meta["worker"]["host"] and shown["created_at"] == meta["created_at"]
    assert shown["model"] == {k: meta["model"][k] for k in ("name", "backend", "device")}  # what a card shows
    assert shown["thumb_url"].startswith("/gallery/thumb/trip/b.jpg?v=")
    assert shown["preview_url"].startswith("/gallery/preview/trip/b.jpg?v=")


def test_a_photo_with_a_name_too_long_to_keep_is_shown_under_its_own_name(config: Config, compute) -> None:
    """Its outputs carry a shortened name (contract.output_base); the listing reads the real one from
    the sidecar, so the card, its thumbnail and its preview are the photo's."""
    name = "長" * 80 + ".jpg"  # 244 bytes
    compute(write_jpeg(config.producer.watch / name, seed=3))
    client = client_for(config)
    (card,) = client.get("/gallery/results.json").get_json()["results"]
    assert card["source"] == name and card["kind"] == "result"
    assert client.get(card["thumb_url"]).status_code == 200
    assert client.get(card["preview_url"]).status_code == 200


def test_a_failed_photo_is_a_card_with_its_error(config: Config, compute) -> None:
    broken = config.producer.watch / "broken.jpg"
    broken.write_text("this is not a JPEG")
    compute(broken)
    [card] = client_for(config).get("/gallery/results.json").get_json()["results"]
    error = json.loads((config.output.dir / "broken.jpg.error.json").read_text())["error"]
    assert card["source"] == "broken.jpg" and card["kind"] == "error"
    assert card["error"] == {"type": error["type"], "message": error["message"]}
    assert "preview_url" not in card


def test_a_corrupt_sidecar_is_skipped_and_warned_about_once(
    config: Config, compute, caplog: pytest.LogCaptureFixture
) -> None:
    compute(write_jpeg(config.producer.watch / "good.jpg"))
    (config.output.dir / "torn.jpg.json").write_text('{"source": "torn.jpg", "width": ')
    (config.output.dir / "list.jpg.json").write_text("[1, 2, 3]\n")
    client = client_for(config, refresh_s=1e-9)  # every request rescans
    with caplog.at_level(logging.WARNING, logger="depthq.ops.gallery"):
        for _ in range(2):
            results = client.get("/gallery/results.json").get_json()["results"]
            assert [r["source"] for r in results] == ["good.jpg"]
        assert client.get("/gallery/").status_code == 200
    warned = [r.getMessage() for r in caplog.records if r.name == "depthq.ops.gallery" and r.levelno == logging.WARNING]
    assert len(warned) == 2, warned
    assert any("torn.jpg.json" in w for w in warned) and any("list.jpg.json" in w for w in warned)


def test_odd_values_in_a_sidecar_reach_the_page_as_null(config: Config) -> None:
    config.output.dir.mkdir(parents=True)
    odd = '{"fov_deg": NaN, "focal_length_px": Infinity, "width": "wide", "height": true, "depth": [1], "worker": 3}'
    (config.output.dir / "odd.jpg.json").write_text(odd)
    response = client_for(config).get("/gallery/results.json")

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    [card] = json.loads(response.data, parse_constant=refuse)["results"]
    assert card["source"] == "odd.jpg"
    assert card["fov_deg"] is card["focal_length_px"] is card["width"] is card["height"] is card["host"] is None
    assert card["depth"] == {"min": None, "max": None, "median": None, "unit": None}


def test_a_clip_is_a_card_with_its_numbers_named_newest_by_redis_and_its_videos_served_with_ranges(
    config: Config, compute, redis_client: Redis
) -> None:
    """A photo, then a clip (36 frames, its 35 mm focal length in its metadata), then a clip no decoder
    reads, through the real producer and worker: the list of newest results in Redis names the clip once
    its assemble job is done, and the gallery, reading that list, shows the clip's numbers and serves the
    clip and its depth preview as files a <video> can seek in."""
    watch = config.producer.watch
    compute(write_jpeg(watch / "photo.jpg"))
    compute(write_clip(watch / "trips" / "walk.mp4", width=64, height=48, frames=36, focal_35mm=26))
    compute(write_undecodable_clip(watch / "alien.mov"))
    newest = [s.decode() for s in redis_client.lrange(recent_key(config.queue.name), 0, -1)]
    assert newest[:2] == ["alien.mov", "trips/walk.mp4"] and newest[-1] == "photo.jpg"

    def recent(n: int) -> list[str]:
        return [s.decode() for s in redis_client.lrange(recent_key(config.queue.name), 0, n - 1)]

    client = make_app(config, recent=recent).test_client()
    failed, card, photo = client.get("/gallery/results.json").get_json()["results"]
    meta = sidecar(config, "trips/walk.mp4")
    assert (card["source"], card["kind"], photo["source"], photo["kind"]) == (
        "trips/walk.mp4",
        "clip",
        "photo.jpg",
        "result",
    )
    assert (card["frames"], card["frame_count"], card["every_nth"], card["fps"]) == (36, 36, 1, 30.0)
    assert (card["width"], card["height"]) == (64, 48)
    assert card["focal_length_source"] == "metadata" and card["focal_length_35mm"] == pytest.approx(26)
    assert card["focal_length_px"] == meta["focal_length_px"] and card["fov_deg"] == meta["fov_deg"]
    assert card["depth"] == {k: meta["depth"][k] for k in ("min", "max", "median", "unit")}
    assert card["hosts"] == [{"host": meta["workers"][0]["host"], "frames": 36}]
    assert card["thumb_url"] is None and "preview_url" not in card and "result_url" not in card
    # The failed clip: its error, and the clip itself rather than a thumbnail a video has none of.
    assert (failed["source"], failed["kind"], failed["thumb_url"]) == ("alien.mov", "error", None)
    assert failed["clip_url"].startswith("/gallery/clip/alien.mov?v=")

    stored = {
        card["video_url"]: (config.output.dir / "trips" / "walk.mp4.preview.mp4").read_bytes(),
        card["clip_url"]: (watch / "trips" / "walk.mp4").read_bytes(),
    }
    for url, data in stored.items():
        whole = client.get(url)
        assert whole.status_code == 200 and whole.mimetype == "video/mp4" and whole.data == data, url
        assert whole.headers["Accept-Ranges"] == "bytes"
        part = client.get(url, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.data == data[100:200], url
        assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        tail = client.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.data == data[-10:]
    assert client.get(failed["clip_url"]).mimetype == "video/quicktime"
    for url in (
        "/gallery/clip/photo.jpg",  # not a clip: the clip route serves clips only
        "/gallery/clip/../inbox/trips/walk.mp4",
        "/gallery/clip/trips/none.mp4",
        "/gallery/clip-preview/photo.jpg",
        "/gallery/clip-preview/../out/trips/walk.mp4.preview.mp4",
    ):
        assert client.get(url, follow_redirects=True).status_code == 404, url


def test_the_listing_is_cached_between_refreshes(config: Config, compute) -> None:
    client = client_for(config, refresh_s=3600)
    assert client.get("/gallery/results.json").get_json()["results"] == []
    compute(write_jpeg(config.producer.watch / "late.jpg"))
    assert client.get("/gallery/results.json").get_json()["results"] == []
    assert [r["source"] for r in client_for(config).get("/gallery/results.json").get_json()["results"]] == ["late.jpg"]


def test_thumbnails_are_small_upright_jpegs(config: Config, compute) -> None:
    # Orientation 6: stored landscape, seen portrait.
    photo = write_jpeg(config.producer.watch / "big.jpg", width=1200, height=800, orientation=6)
    compute(photo)
    client = client_for(config)
    thumb = client.get("/gallery/thumb/big.jpg")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    assert jpeg_size(thumb.data) == (213, 320)
    preview = client.get("/gallery/preview/big.jpg")
    assert preview.status_code == 200 and preview.mimetype == "image/jpeg"
    # The stored preview is upright and at most the model's side (the tiny model's 128), so no smaller.
    assert jpeg_size(preview.data) == (85, 128)
    with Image.open(config.output.dir / "big.jpg.preview.png") as stored:
        assert stored.size == (85, 128)


def test_thumbnails_are_cached_until_the_photo_changes(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []
    real = gallery._jpeg_thumbnail
    monkeypatch.setattr(gallery, "_jpeg_thumbnail", lambda path, px: made.append(path) or real(path, px))
    photo = write_jpeg(config.producer.watch / "p.jpg", seed=1)
    client = client_for(config)
    first = client.get("/gallery/thumb/p.jpg").data
    assert client.get("/gallery/thumb/p.jpg").data == first and len(made) == 1
    write_jpeg(photo, seed=2)
    set_mtime(photo, 1_700_000_000)
    assert client.get("/gallery/thumb/p.jpg").data != first and len(made) == 2


def test_heic_thumbnail(config: Config) -> None:
    import pillow_heif

    if not pillow_heif.libheif_info()["HEIF"]:
        pytest.skip("this pillow_heif build has no HEIC encoder to make a test photo with")
    Image.new("RGB", (640, 480), (200, 40, 40)).save(config.producer.watch / "IMG_1.HEIC", format="HEIF")
    response = client_for(config).get("/gallery/thumb/IMG_1.HEIC")
    assert response.status_code == 200 and jpeg_size(response.data) == (320, 240)


def test_an_undecodable_photo_is_415_and_a_missing_one_404(config: Config) -> None:
    (config.producer.watch / "junk.jpg").write_text("not a photo")
    client = client_for(config)
    assert client.get("/gallery/thumb/junk.jpg").status_code == 415
    assert client.get("/gallery/thumb/gone.jpg").status_code == 404
    assert client.get("/gallery/preview/junk.jpg").status_code == 404


def test_paths_out_of_the_roots_are_404(config: Config, compute, tmp_path: Path) -> None:
    watch, out = config.producer.watch, config.output.dir
    outside = write_jpeg(tmp_path / "secret.jpg")
    write_jpeg(watch / "sub" / "ok.jpg")
    compute(write_jpeg(watch / "inside.jpg"))
    (watch / "link-out.jpg").symlink_to(outside)
    (watch / "dir-out").symlink_to(tmp_path)
    (watch / "link-in.jpg").symlink_to(watch / "sub" / "ok.jpg")
    (out / "escape.jpg.preview.png").symlink_to(outside)
    client = client_for(config)
    for url in (
        "/gallery/thumb/../secret.jpg",
        "/gallery/thumb/%2E%2E/secret.jpg",
        "/gallery/thumb/sub/../../secret.jpg",
        "/gallery/thumb/%2F" + str(outside).lstrip("/"),
        "/gallery/thumb/" + str(outside),
        "/gallery/thumb/sub//../secret.jpg",
        "/gallery/thumb/./sub/ok.jpg",
        "/gallery/thumb/link-out.jpg",
        "/gallery/thumb/dir-out/secret.jpg",
        "/gallery/preview/escape.jpg",
        "/gallery/preview/../inbox/inside.jpg",
        "/gallery/thumb/sub",
    ):
        # Doubled slashes are merged by a redirect first; wherever it leads must be refused too.
        assert client.get(url, follow_redirects=True).status_code == 404, url
    # Links that stay inside the root are fine.
    assert client.get("/gallery/thumb/link-in.jpg").status_code == 200
    assert client.get("/gallery/preview/inside.jpg").status_code == 200


def test_importing_the_gallery_keeps_numpy_out() -> None:
    subprocess.run(
        [sys.executable, "-c", "import depthq.ops.gallery, sys; assert 'numpy' not in sys.modules, 'numpy imported'"],
        cwd=REPO,
        check=True,
    )


def _closed_form_distance(camera: dict[str, Any], z: float, a: tuple[int, int], b: tuple[int, int]) -> float:
    """Two pixels of a constant-depth map: both at z, so only their x and y differ."""
    return z * math.hypot((b[0] - a[0]) / camera["fx"], (b[1] - a[1]) / camera["fy"])


def test_measure_gives_the_3d_distance_from_the_full_map_and_the_camera(config: Config, compute) -> None:
    compute(write_jpeg(config.producer.watch / "m.jpg", width=400, height=300))
    camera = sidecar(config, "m.jpg")["camera"]
    client = client_for(config)
    answer = client.get("/gallery/measure/m.jpg?a=10,20&b=390,280").get_json()
    z = expected_depth(400, 300)
    assert answer["a"]["depth_m"] == pytest.approx(z, rel=1e-6) and answer["b"]["depth_m"] == pytest.approx(z, rel=1e-6)
    assert answer["a"]["point_m"] == pytest.approx(
        [(10 - camera["cx"]) * z / camera["fx"], (20 - camera["cy"]) * z / camera["fy"], z], rel=1e-6
    )
    assert answer["distance_m"] == pytest.approx(_closed_form_distance(camera, z, (10, 20), (390, 280)), rel=1e-6)
    for bad in ("a=400,0&b=0,0", "a=1&b=0,0", "b=0,0", "a=x,y&b=0,0", "a=-1,0&b=0,0"):
        assert client.get(f"/gallery/measure/m.jpg?{bad}").status_code == 400
    assert client.get("/gallery/measure/nothing.jpg?a=0,0&b=1,1").status_code == 404
    assert client.get("/gallery/measure/../m.jpg?a=0,0&b=1,1").status_code == 404


def test_the_hover_grid_is_the_map_every_step_pixels(config: Config, compute) -> None:
    """Read without numpy (the dashboard never loads it), equal to numpy's reading of the same file."""
    compute(write_jpeg(config.producer.watch / "g.jpg", width=600, height=200))
    grid = client_for(config).get("/gallery/depth/g.jpg").get_json()
    depth = np.load(config.output.dir / "g.jpg.depth.npy")
    step = grid["step"]
    assert (grid["width"], grid["height"], step) == (600, 200, 3)  # the long side within 256
    np.testing.assert_allclose(np.array(grid["rows"]), depth[::step, ::step], atol=5e-4)
    assert DepthMap.open(config.output.dir / "g.jpg.depth.npy").at(599, 199) == float(depth[199, 599])


def test_the_result_page_links_its_photo_preview_and_endpoints(config: Config, compute) -> None:
    compute(write_jpeg(config.producer.watch / "r.jpg", width=400, height=300))
    client = client_for(config)
    card = client.get("/gallery/results.json").get_json()["results"][0]
    assert card["result_url"] == "/gallery/result/r.jpg"
    page = client.get(card["result_url"]).get_data(as_text=True)
    assert "/gallery/photo/r.jpg" in page and "/gallery/depth/r.jpg" in page and "/gallery/measure/r.jpg" in page
    photo = client.get("/gallery/photo/r.jpg")
    assert photo.status_code == 200 and jpeg_size(photo.data) == (400, 300)  # under VIEW_PX: not enlarged
    assert client.get("/gallery/result/none.jpg").status_code == 404


# --- in a browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def served(config: Config) -> Iterator[str]:
    """The gallery on a real socket, polling fast so a new result shows within a second."""
    server = make_server("127.0.0.1", 0, make_app(config, refresh_s=0.5), threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="gallery-http", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/gallery/"
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


def test_the_page_shows_results_as_they_land(
    config: Config, compute, browser: Any, served: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    watch = config.producer.watch
    compute(write_jpeg(watch / "trip" / "first.jpg", width=400, height=300, seed=3, focal_35mm=28))
    first = sidecar(config, "trip/first.jpg")
    zone = "Pacific/Auckland"
    context = browser.new_context(timezone_id=zone, locale="en-GB", viewport={"width": 1280, "height": 800})
    page = context.new_page()
    crashes: list[str] = []
    page.on("pageerror", lambda exc: crashes.append(str(exc)))
    page.on("dialog", lambda dialog: crashes.append(f"a dialog opened: {dialog.message}") or dialog.dismiss())
    refused: list[str] = []  # any request the page made that the server refused (a 415 for a bad photo's thumb)
    page.on(
        "response",
        lambda response: refused.append(f"{response.status} {response.url}") if response.status >= 400 else None,
    )
    page.goto(served)

    card = page.locator("article.card").first
    expect(card.locator(".name")).to_have_text("trip/first.jpg")
    expect(card.locator(".fov")).to_have_text(f"{first['fov_deg']:.1f}°")
    expect(card.locator(".focal")).to_have_text(f"{first['focal_length_px']:.0f} px (exif)")
    expect(card.locator(".host")).to_have_text(first["worker"]["host"])
    local = datetime.fromisoformat(first["created_at"]).astimezone(ZoneInfo(zone))
    expect(card.locator("time")).to_have_text(local.strftime("%d/%m/%Y, %H:%M:%S"))
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('article.card img')];"
        " return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        timeout=10_000,
    )

    # New results appear in the open page, with no reload: the marker would not survive one.
    page.evaluate("window.__sameDocument = true")
    odd = '<img src=x onerror=alert(1)> "quoted" 😀.jpg'
    broken = watch / "broken.jpg"
    broken.write_text("not a photo")
    compute(write_jpeg(watch / odd, width=300, height=400, seed=4))
    compute(broken)
    cards = page.locator("article.card")
    expect(cards).to_have_count(3, timeout=10_000)
    expect(cards.nth(0)).to_contain_text("broken.jpg")
    expect(cards.nth(0).locator(".badge")).to_have_text("failed")
    expect(cards.nth(0).locator(".message")).to_contain_text("broken.jpg")
    expect(cards.nth(1).locator(".name")).to_have_text(odd)
    assert cards.nth(1).locator(".name img").count() == 0  # the name stayed text
    expect(cards.nth(2).locator(".name")).to_have_text("trip/first.jpg")
    page.wait_for_function(
        "() => [...document.querySelectorAll('article.card.result img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=10_000,
    )
    assert page.evaluate("window.__sameDocument") is True
    assert not crashes
    assert cards.nth(0).locator("img").count() == 2 and not cards.nth(0).locator("img[src]").count()
    assert refused == []

    shot = tmp_path / "gallery.png"
    page.screenshot(path=str(shot), full_page=True)
    context.close()
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.width >= 1000 and img.height >= 300
        colors = img.convert("RGB").getcolors(maxcolors=100_000)
        assert colors is None or len(colors) > 50, "the screenshot is blank"
    if os.environ.get("TEST_ARTIFACTS"):
        artifacts = Path(os.environ["TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "gallery.png")


def test_a_clip_plays_beside_its_depth_preview_and_both_seek(
    config: Config, compute, browser: Any, served: str, tmp_path: Path
) -> None:
    """The clip's card in a browser: both videos load from the server's range responses and seek, and
    the card shows the clip's numbers as its sidecar has them."""
    from playwright.sync_api import expect

    compute(write_clip(config.producer.watch / "walk.mp4", width=64, height=48, frames=30, focal_35mm=26))
    meta = sidecar(config, "walk.mp4")
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    crashes: list[str] = []
    page.on("pageerror", lambda exc: crashes.append(str(exc)))
    statuses: dict[str, list[int]] = {}
    page.on("response", lambda response: statuses.setdefault(response.url.split("?")[0], []).append(response.status))
    page.goto(served)

    card = page.locator("article.card.clip")
    expect(card.locator(".name")).to_have_text("clipwalk.mp4")  # the badge, then the name
    expect(card.locator(".frames")).to_have_text("30")
    expect(card.locator(".fps")).to_have_text("30 fps")
    expect(card.locator(".focal")).to_have_text(f"{meta['focal_length_px']:.0f} px (metadata)")
    expect(card.locator(".focal35")).to_have_text("26 mm")
    expect(card.locator(".range")).to_have_text(f"{meta['depth']['min']:.2f} m \u2013 {meta['depth']['max']:.2f} m")
    expect(card.locator(".hosts")).to_have_text(f"{meta['workers'][0]['host']} (30)")
    videos = card.locator("video")
    expect(videos).to_have_count(2)
    assert card.locator("img").count() == 0
    page.wait_for_function(
        "() => [...document.querySelectorAll('article.card.clip video')].every(v => v.readyState >= 1)",
        timeout=10_000,
    )
    for i in range(2):
        seeked = videos.nth(i).evaluate(
            """async (v) => {
                const at = v.duration / 2;
                v.currentTime = at;
                await new Promise((done) => v.addEventListener("seeked", done, { once: true }));
                return { at, now: v.currentTime, width: v.videoWidth, height: v.videoHeight, duration: v.duration };
            }"""
        )
        assert seeked["now"] == pytest.approx(seeked["at"], abs=0.05)
        assert seeked["duration"] == pytest.approx(1.0, abs=0.05)  # 30 frames at 30 fps
        assert (seeked["width"], seeked["height"]) == (64, 48)
    for route in ("clip", "clip-preview"):
        answered = statuses[served + route + "/walk.mp4"]
        assert 206 in answered and all(s in (200, 206) for s in answered), (route, answered)
    assert not crashes
    shot = tmp_path / "gallery-clip.png"
    card.screenshot(path=str(shot))
    context.close()
    if os.environ.get("TEST_ARTIFACTS"):
        artifacts = Path(os.environ["TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "gallery-clip.png")


def test_the_result_page_measures_between_two_clicked_pixels(
    config: Config, compute, browser: Any, served: str, tmp_path: Path
) -> None:
    """Hover shows the depth under the pointer; two clicks show the 3D distance the closed form gives."""
    from playwright.sync_api import expect

    compute(write_jpeg(config.producer.watch / "room.jpg", width=400, height=300, seed=5))
    camera = sidecar(config, "room.jpg")["camera"]
    z = expected_depth(400, 300)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    crashes: list[str] = []
    page.on("pageerror", lambda exc: crashes.append(str(exc)))
    page.goto(served)
    page.locator("article.card .foot a.open").first.click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.view img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=10_000,
    )
    photo = page.locator("#photo")
    box = photo.bounding_box()
    assert box is not None

    def at(u: int, v: int) -> tuple[float, float]:
        """The first whole CSS pixel inside photo pixel (u, v): Chromium's mouse events land on whole
        pixels, and a photo shown at its own size (never enlarged) has one CSS pixel per pixel."""
        return math.ceil(box["x"] + u * box["width"] / 400), math.ceil(box["y"] + v * box["height"] / 300)

    expect(page.locator("body")).to_have_attribute("data-grid", "ready", timeout=10_000)
    page.mouse.move(*at(200, 150))
    expect(page.locator("#hover")).to_contain_text("(200, 150) at ")
    assert float(page.locator("#hover").get_attribute("data-meters")) == pytest.approx(z, rel=0.01)
    a, b = (40, 30), (360, 270)
    page.mouse.click(*at(*a))
    page.mouse.click(*at(*b))
    distance = page.locator("#distance")
    expect(distance).to_have_attribute("data-meters", re.compile(r"^[0-9.]+$"), timeout=10_000)
    assert float(distance.get_attribute("data-meters")) == pytest.approx(
        _closed_form_distance(camera, z, a, b), rel=0.01
    )
    assert float(distance.inner_text().removesuffix(" m")) == pytest.approx(
        _closed_form_distance(camera, z, a, b), rel=0.01
    )
    expect(page.locator("#point-a")).to_contain_text("(40, 30)")
    expect(page.locator("#point-b")).to_contain_text("(360, 270)")
    assert page.locator(".view .mark").count() == 4  # A and B on the photo and on the depth
    assert not crashes
    shot = tmp_path / "measure.png"
    page.screenshot(path=str(shot), full_page=True)
    context.close()
    if os.environ.get("TEST_ARTIFACTS"):
        artifacts = Path(os.environ["TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "measure.png")


def test_the_measuring_page_fits_the_window_and_marks_the_pointer_on_both_images(
    config: Config, compute, browser: Any, served: str, tmp_path: Path
) -> None:
    """A portrait photo fits below the readouts in a 1000-px window, a small one is shown no larger than
    its pixels, and the pointer over either image is marked at the same place on the other."""
    from playwright.sync_api import expect

    watch = config.producer.watch
    compute(write_jpeg(watch / "tall.jpg", width=3000, height=4000, seed=6), write_jpeg(watch / "small.jpg", seed=7))
    window = {"width": 1280, "height": 1000}
    context = browser.new_context(viewport=window)
    page = context.new_page()
    crashes: list[str] = []
    page.on("pageerror", lambda exc: crashes.append(str(exc)))
    for source in ("tall.jpg", "small.jpg"):
        page.goto(served + "result/" + source)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.view img')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=10_000,
        )
        boxes = {name: page.locator(f"#{name}").bounding_box() for name in ("photo", "depth")}
        readouts = page.locator(".readout").bounding_box()
        assert boxes["photo"] is not None and boxes["depth"] is not None and readouts is not None
        for name, box in boxes.items():
            assert readouts["y"] + readouts["height"] <= box["y"], (source, name, box)  # the readouts on top
            assert box["y"] + box["height"] <= window["height"], (source, name, box)
            assert box["x"] >= 0 and box["x"] + box["width"] <= window["width"], (source, name, box)
        assert boxes["photo"]["width"] == boxes["depth"]["width"] > 0
        assert boxes["photo"]["height"] == boxes["depth"]["height"] > 0
        photo = page.evaluate(
            "(() => { const i = document.getElementById('photo'); return [i.naturalWidth, i.naturalHeight]; })()"
        )
        if source == "small.jpg":
            assert tuple(photo) == (64, 48)  # write_jpeg's default size
            for box in boxes.values():  # neither enlarged past the photo's pixels
                assert box["width"] <= photo[0] and box["height"] <= photo[1]
        else:
            assert tuple(photo) == (768, 1024)  # within VIEW_PX
            assert boxes["photo"]["height"] >= 0.6 * window["height"]  # fitted, not shrunk to a stamp

        for over, other in (("photo", "depth"), ("depth", "photo")):
            at, seen = (0.3, 0.7), boxes[over]
            page.mouse.move(seen["x"] + at[0] * seen["width"], seen["y"] + at[1] * seen["height"])
            dot = page.locator(f".view:has(#{other}) .twin .dot")
            expect(dot).to_be_visible()
            expect(page.locator(f".view:has(#{over}) .twin")).to_be_hidden()  # the pointer itself is there
            mark, twin = dot.bounding_box(), boxes[other]
            assert mark is not None
            assert mark["x"] + mark["width"] / 2 == pytest.approx(twin["x"] + at[0] * twin["width"], abs=1)
            assert mark["y"] + mark["height"] / 2 == pytest.approx(twin["y"] + at[1] * twin["height"], abs=1)
            if source == "tall.jpg" and over == "photo":
                shot = tmp_path / "measuring-page.png"
                page.screenshot(path=str(shot))
                if os.environ.get("TEST_ARTIFACTS"):
                    artifacts = Path(os.environ["TEST_ARTIFACTS"])
                    artifacts.mkdir(parents=True, exist_ok=True)
                    shutil.copy(shot, artifacts / "measuring-page.png")
        page.mouse.move(1, 1)
        expect(page.locator(".twin:visible")).to_have_count(0)
    assert not crashes
    context.close()
