"""The 3D outputs through a real worker: the PLY read back with plyfile, the EXR with OpenEXR, against
the constant-head model's closed form and the photo's own pixels."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
from plyfile import PlyData
from redis import Redis

from depthq.camera import pinhole
from depthq.config import Config
from producer.collector import Collector
from producer.enqueue import Enqueuer
from testkit.photos import write_jpeg
from testkit.tiny_model import expected_depth
from tests.endstate import assert_end_state
from worker.backends import Backend
from worker.formats import Scene, grid_steps, point_cloud
from worker.images import load_image
from worker.worker import build_worker


def _run(config: Config, redis_client: Redis, backend: Backend, width: int, height: int) -> np.ndarray:
    """Computes f.jpg; returns the upright photo's pixels as the worker decoded them."""
    photo = write_jpeg(config.producer.watch / "f.jpg", width=width, height=height)
    Enqueuer(config, redis_client).submit(photo)
    build_worker(config, redis_client, backend).work(burst=True, with_scheduler=False)
    return load_image(photo.read_bytes(), "f.jpg", 10**8).rgb


def test_ply_points_are_the_back_projected_depth_with_the_photos_colours(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    config = make_config(output={"formats": ["ply"], "ply_max_points": 1000})
    rgb = _run(config, redis_client, tiny_backend, 300, 200)
    sidecar = json.loads((config.output.dir / "f.jpg.json").read_text())
    camera = sidecar["camera"]
    ply = PlyData.read(str(config.output.dir / "f.jpg.points.ply"))
    assert ply.header.splitlines()[1] == "format binary_little_endian 1.0"
    vertex = ply["vertex"].data
    assert vertex.dtype.names == ("x", "y", "z", "red", "green", "blue")
    assert [vertex.dtype[n] for n in vertex.dtype.names] == [np.dtype("<f4")] * 3 + [np.dtype("u1")] * 3
    # The model's 128-px grid is 3 x 2 px here (5,000 points); the cap coarsens it evenly.
    steps = grid_steps(300, 200, tiny_backend.input_size, 1000)
    assert 0 < len(vertex) <= 1000 and len(vertex) == len(range(0, 300, steps[0])) * len(range(0, 200, steps[1]))
    z = expected_depth(300, 200)
    np.testing.assert_allclose(vertex["z"], z, rtol=1e-5)
    u = vertex["x"] * camera["fx"] / vertex["z"] + camera["cx"]
    v = vertex["y"] * camera["fy"] / vertex["z"] + camera["cy"]
    ui, vi = np.rint(u).astype(int), np.rint(v).astype(int)
    np.testing.assert_allclose(u, ui, atol=1e-3)  # every point sits on a pixel of the grid
    np.testing.assert_allclose(v, vi, atol=1e-3)
    assert set(ui) == set(range(0, 300, steps[0])) and set(vi) == set(range(0, 200, steps[1]))
    np.testing.assert_allclose(vertex["x"], (ui - camera["cx"]) * z / camera["fx"], rtol=1e-5, atol=1e-6)
    colours = np.stack([vertex["red"], vertex["green"], vertex["blue"]], axis=1)
    np.testing.assert_array_equal(colours, rgb[vi, ui])
    assert_end_state(config, redis_client)


def test_ply_leaves_out_points_past_the_depth_limit() -> None:
    camera = pinhole(50.0, 4, 2)
    depth = np.array([[1.0, 2.0, 150.0, np.inf], [3.0, 100.0, 100.5, 1e4]], dtype=np.float32)
    rgb = np.arange(4 * 2 * 3, dtype=np.uint8).reshape(2, 4, 3)
    vertex = point_cloud(depth, Scene(rgb, camera, model_side=4, max_points=100, max_depth_m=100.0))
    np.testing.assert_array_equal(vertex["z"], [1.0, 2.0, 3.0, 100.0])
    np.testing.assert_array_equal(vertex["red"], rgb[[0, 0, 1, 1], [0, 1, 0, 1], 0])


@pytest.mark.parametrize(
    ("size", "side", "cap", "steps"),
    [
        ((4032, 3024), 1536, 2_500_000, (3, 2)),  # 12 MP: the model's grid, 1344 x 1512
        ((3024, 4032), 1536, 2_500_000, (2, 3)),
        ((100, 50), 1536, 10**6, (1, 1)),  # never finer than the photo
        ((4032, 3024), 1536, 1_000_000, (5, 3)),
    ],
)
def test_the_grid_is_the_models_coarsened_to_the_cap(
    size: tuple[int, int], side: int, cap: int, steps: tuple[int, int]
) -> None:
    assert grid_steps(*size, side, cap) == steps
    assert -(-size[0] // steps[0]) * -(-size[1] // steps[1]) <= cap


def test_exr_is_the_depth_map_as_channel_z(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    config = make_config(output={"formats": ["exr"]})
    _run(config, redis_client, tiny_backend, 60, 40)
    depth = np.load(config.output.dir / "f.jpg.depth.npy")
    # The bindings drop the channels when the file closes: read them inside.
    with OpenEXR.File(str(config.output.dir / "f.jpg.depth.exr")) as exr:
        names = list(exr.channels())
        z = exr.channels()["Z"].pixels.copy()
        compression = exr.header()["compression"]
    assert names == ["Z"]
    assert z.dtype == np.float32 and z.shape == (40, 60)
    np.testing.assert_array_equal(z, depth)
    assert compression == OpenEXR.ZIP_COMPRESSION
    assert_end_state(config, redis_client)


def test_the_redis_transport_carries_the_3d_files(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend, tmp_path: Path
) -> None:
    producer_config = make_config(transport={"mode": "redis"}, output={"formats": ["ply", "exr"]})
    worker_config = make_config(
        producer={"watch": str(tmp_path / "worker-has-no-inbox")},
        output={"dir": str(tmp_path / "worker-has-no-output"), "ply_max_points": 500},
    )
    photo = write_jpeg(producer_config.producer.watch / "r.jpg", width=80, height=60)
    Enqueuer(producer_config, redis_client).submit(photo)
    build_worker(worker_config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    collector = Collector(producer_config, redis_client)
    collector.ensure_group()
    assert collector.collect_new() == 1
    out = producer_config.output.dir
    depth = np.load(out / "r.jpg.depth.npy")
    vertex = PlyData.read(str(out / "r.jpg.points.ply"))["vertex"].data
    assert 0 < len(vertex) <= 500  # the worker's own cap
    np.testing.assert_allclose(vertex["z"], expected_depth(80, 60), rtol=1e-5)
    with OpenEXR.File(str(out / "r.jpg.depth.exr")) as exr:
        np.testing.assert_array_equal(exr.channels()["Z"].pixels, depth)
    assert not list(out.glob(".*.tmp"))
    assert_end_state(producer_config, redis_client)


def test_copies_get_the_same_3d_files(
    make_config: Callable[..., Config], redis_client: Redis, tiny_backend: Backend
) -> None:
    """An alias written beside its original, and a later copy taken from the store, both with PLY and EXR."""
    config = make_config(output={"formats": ["ply", "exr"]})
    a = write_jpeg(config.producer.watch / "a.jpg", width=40, height=30)
    (config.producer.watch / "b.jpg").write_bytes(a.read_bytes())
    enq = Enqueuer(config, redis_client)
    assert enq.submit(a).outcome == "enqueued" and enq.submit(config.producer.watch / "b.jpg").outcome == "aliased"
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    (config.producer.watch / "c.jpg").write_bytes(a.read_bytes())
    assert enq.submit(config.producer.watch / "c.jpg").outcome == "copy"
    build_worker(config, redis_client, tiny_backend).work(burst=True, with_scheduler=False)
    out = config.output.dir
    assert (
        json.loads((out / "c.jpg.json").read_text())["camera"] == json.loads((out / "a.jpg.json").read_text())["camera"]
    )
    for suffix in (".points.ply", ".depth.exr"):
        original = (out / f"a.jpg{suffix}").read_bytes()
        assert (out / f"b.jpg{suffix}").read_bytes() == original == (out / f"c.jpg{suffix}").read_bytes()
    assert_end_state(config, redis_client)
