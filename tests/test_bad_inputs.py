"""Every kind of bad or odd input, through the real producer and worker: correct depth, or a clear
<file>.error.json naming the file. The worker keeps serving, and nothing is retried in a loop."""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image
from redis import Redis

from depthq.config import Config
from producer.enqueue import Enqueuer
from testkit.photos import png_with_size, write_jpeg
from testkit.tiny_model import expected_depth
from tests.endstate import assert_end_state
from worker.backends import Backend
from worker.worker import build_worker, load_backend

pillow_heif.register_heif_opener()


def _rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _truncated(path: Path) -> None:
    data = write_jpeg(path, width=64, height=48).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _animated_webp(path: Path) -> None:
    frames = [_rgb(40, 30, seed) for seed in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _palette_with_transparency(path: Path) -> None:
    img = _rgb(40, 30).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 0
    img.save(path, transparency=0)


# name -> (how to make it, expected: "depth" with (width, height), or "error" with a message fragment)
KINDS: dict[str, tuple[Callable[[Path], None], tuple[str, object]]] = {
    "empty.jpg": (lambda p: p.write_bytes(b""), ("error", "empty (0 bytes)")),
    "truncated.jpg": (_truncated, ("error", "damaged or incomplete")),
    "text.jpg": (lambda p: p.write_text("not a photo\n" * 20), ("error", "not an image")),
    "bomb.png": (lambda p: p.write_bytes(png_with_size(50_000, 50_000)), ("error", "worker.max_image_pixels")),
    "cmyk.jpg": (lambda p: _rgb(40, 30).convert("CMYK").save(p), ("depth", (40, 30))),
    "sixteen.png": (
        lambda p: Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(p),
        ("depth", (40, 30)),
    ),
    "palette.png": (_palette_with_transparency, ("depth", (40, 30))),
    "animated.webp": (_animated_webp, ("depth", (40, 30))),
    "photo.HEIC": (lambda p: _rgb(56, 40).save(p, format="HEIF"), ("depth", (56, 40))),
    "one-pixel.png": (lambda p: _rgb(1, 1).save(p), ("depth", (1, 1))),
    "panorama.jpg": (lambda p: _rgb(4000, 3).save(p), ("depth", (4000, 3))),
    "my photo 📷 " + unicodedata.normalize("NFD", "café") + ".jpg": (
        lambda p: _rgb(30, 20).save(p),
        ("depth", (30, 20)),
    ),
}
for _orientation in range(1, 9):
    KINDS[f"orientation-{_orientation}.jpg"] = (
        lambda p, o=_orientation: write_jpeg(p, width=64, height=48, orientation=o),
        ("depth", (48, 64) if _orientation >= 5 else (64, 48)),
    )


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> Backend:
    from depthq.config import load_config

    return load_backend(load_config(environ={}, overrides={"model": {"path": str(tiny_model), "device": "cpu"}}))[0]


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(worker={"retry_backoff_s": [0]})


def _run(config: Config, redis_client: Redis, backend: Backend) -> None:
    build_worker(config, redis_client, backend).work(burst=True)


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_ends_as_depth_or_a_clear_error(
    name: str, config: Config, redis_client: Redis, backend: Backend
) -> None:
    make, (outcome, detail) = KINDS[name]
    photo = config.producer.watch / name
    make(photo)
    enqueuer = Enqueuer(config, redis_client)
    enqueuer.submit(photo)
    write_jpeg(config.producer.watch / "zz-next.jpg", seed=99)  # queued behind it: the worker must go on
    enqueuer.submit(config.producer.watch / "zz-next.jpg")
    _run(config, redis_client, backend)
    out = config.output.dir
    if outcome == "depth":
        width, height = detail  # type: ignore[misc]
        meta = json.loads((out / f"{name}.json").read_text())
        assert meta["source"] == name and (meta["width"], meta["height"]) == (width, height)
        np.testing.assert_allclose(np.load(out / f"{name}.depth.npy"), expected_depth(width, height), rtol=1e-5)
        assert not (out / f"{name}.error.json").exists()
    else:
        error = json.loads((out / f"{name}.error.json").read_text())
        assert error["source"] == name and error["error"]["message"].startswith(name)
        assert str(detail) in error["error"]["message"]
        assert not (out / f"{name}.json").exists()
        assert enqueuer.submit(photo).outcome == "done"  # recorded once: no retry loop on rescans
    assert (out / "zz-next.jpg.json").exists()
    assert_end_state(config, redis_client, bad=[name] if outcome == "error" else [])


def test_symlink_out_of_the_root_gets_an_error_file_and_its_target_is_never_read(
    config: Config, redis_client: Redis, backend: Backend, tmp_path: Path
) -> None:
    secret = write_jpeg(tmp_path / "private" / "secret.jpg")
    (config.producer.watch / "link.jpg").symlink_to(secret)
    enqueuer = Enqueuer(config, redis_client)
    enqueuer.submit(config.producer.watch / "link.jpg")
    _run(config, redis_client, backend)
    error = json.loads((config.output.dir / "link.jpg.error.json").read_text())
    assert "outside the watch root" in error["error"]["message"]
    assert not (config.output.dir / "link.jpg.json").exists()
    assert enqueuer.submit(config.producer.watch / "link.jpg").outcome == "done"
    assert_end_state(config, redis_client, bad=["link.jpg"])


def test_folder_named_like_a_photo_is_a_folder(config: Config, redis_client: Redis, backend: Backend) -> None:
    from producer.readiness import Eligibility

    inner = write_jpeg(config.producer.watch / "x.jpg" / "inner.jpg")
    eligible = Eligibility.of(config)
    assert list(eligible.scan(config.producer.watch)) == [inner]
    Enqueuer(config, redis_client).submit(inner)
    _run(config, redis_client, backend)
    assert (config.output.dir / "x.jpg" / "inner.jpg.json").exists()
    assert not (config.output.dir / "x.jpg.error.json").exists()
    assert_end_state(config, redis_client)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files; run as a normal user to check this")
def test_unreadable_file_gets_an_error_file(config: Config, redis_client: Redis, backend: Backend) -> None:
    photo = write_jpeg(config.producer.watch / "locked.jpg")
    photo.chmod(0)
    Enqueuer(config, redis_client).submit(photo)
    _run(config, redis_client, backend)
    error = json.loads((config.output.dir / "locked.jpg.error.json").read_text())
    assert "permission denied" in error["error"]["message"]
    assert_end_state(config, redis_client, bad=["locked.jpg"])
