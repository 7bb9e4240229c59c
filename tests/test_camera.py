"""The camera in every sidecar: the constant-head model's closed-form focal length, principal point at
the centre of the upright photo, for landscape, portrait (EXIF orientation 6) and EXIF-focal photos."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
from redis import Redis

from depthq.camera import Camera, back_project, pinhole
from depthq.config import Config
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from testkit.tiny_model import FOV_DEG
from worker.backends import Backend
from worker.worker import build_worker


def _focal_from_fov(width: int) -> float:
    return 0.5 * width / math.tan(math.radians(FOV_DEG / 2))


@pytest.mark.parametrize(
    ("stored", "orientation", "focal_35mm", "upright", "focal"),
    [
        ((80, 60), None, None, (80, 60), _focal_from_fov(80)),
        # Stored landscape, shown portrait: the camera is the upright photo's.
        ((80, 60), 6, None, (60, 80), _focal_from_fov(60)),
        ((90, 60), None, 26, (90, 60), 26 * math.hypot(90, 60) / math.hypot(36, 24)),
    ],
    ids=["landscape", "portrait-exif-6", "exif-focal"],
)
def test_sidecar_camera_is_the_closed_form_pinhole(
    make_config: Callable[..., Config],
    redis_client: Redis,
    tiny_backend: Backend,
    stored: tuple[int, int],
    orientation: int | None,
    focal_35mm: int | None,
    upright: tuple[int, int],
    focal: float,
) -> None:
    config = make_config()
    photo = write_jpeg(
        config.producer.watch / "p.jpg",
        width=stored[0],
        height=stored[1],
        orientation=orientation,
        focal_35mm=focal_35mm,
    )
    Enqueuer(config, redis_client).submit(photo)
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    sidecar = json.loads((config.output.dir / "p.jpg.json").read_text())
    width, height = upright
    assert (sidecar["width"], sidecar["height"]) == upright
    camera = sidecar["camera"]
    assert camera["model"] == "pinhole"
    assert camera["fx"] == pytest.approx(focal, rel=1e-9) and camera["fy"] == camera["fx"]
    assert (camera["cx"], camera["cy"]) == ((width - 1) / 2, (height - 1) / 2)
    assert (camera["width"], camera["height"]) == upright
    assert camera["fx"] == sidecar["focal_length_px"]
    assert Camera.from_dict(camera) == pinhole(focal, width, height)


def test_back_projection_is_opencvs_pinhole_for_floats() -> None:
    camera = pinhole(100.0, 201, 101)
    assert back_project(100.0, 50.0, 3.0, camera) == (0.0, 0.0, 3.0)  # the centre is on the axis
    x, y, z = back_project(150.0, 0.0, 2.0, camera)
    assert (x, y, z) == (pytest.approx(1.0), pytest.approx(-1.0), 2.0)  # right of and above the centre


@pytest.mark.parametrize("bad", [None, {}, {"model": "fisheye"}, {"model": "pinhole", "fx": "a"}])
def test_a_missing_or_malformed_camera_reads_as_none(bad: object) -> None:
    assert Camera.from_dict(bad) is None
