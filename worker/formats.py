"""The bytes of each depth output file: npy, TIFF, PNG16, the PLY point cloud and the OpenEXR depth.

The stores (`worker/store.py`) decide where the bytes go, a folder or Redis; this module decides what
they are, so both transports write the same files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import OpenEXR
from PIL import Image
from plyfile import PlyData, PlyElement

from depthq.camera import Camera, back_project

# The PLY's vertex layout: OpenCV camera frame in meters, then the photo's colour.
PLY_VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


@dataclass(frozen=True)
class Scene:
    """What a point cloud needs beside the depth: the photo's colours, its camera and the PLY settings.

    `rgb` is the upright photo, uint8; it may be a reduced decode (worker.fast_decode), whose pixels
    are then looked up at the nearest position. `model_side` is the model's output side in pixels:
    the grid is no finer than it, since the full-size map is only its bilinear resize.
    """

    rgb: np.ndarray
    camera: Camera
    model_side: int
    max_points: int
    max_depth_m: float


def npy_bytes(depth: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, depth.astype(np.float32, copy=False))
    return buf.getvalue()


def tiff_bytes(depth: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(depth.astype(np.float32)).save(buf, format="TIFF")
    return buf.getvalue()


def png16_bytes(depth: np.ndarray) -> bytes:
    """uint16 millimetres, saturating at 65.535 m."""
    mm = np.clip(np.rint(depth * 1000.0), 0, 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(mm).save(buf, format="PNG")
    return buf.getvalue()


def exr_bytes(depth: np.ndarray) -> bytes:
    """One float32 channel `Z` in meters, ZIP-compressed: the depth pass Nuke, Blender and Houdini read."""
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    channels = {"Z": np.ascontiguousarray(depth, dtype=np.float32)}
    buf = io.BytesIO()
    with OpenEXR.File(header, channels) as exr:
        exr.write(buf)
    return buf.getvalue()


def grid_steps(width: int, height: int, model_side: int, max_points: int) -> tuple[int, int]:
    """Pixel steps (across, down) of the PLY's grid: the model's output grid, coarsened to the cap.

    The model sees a model_side x model_side square whatever the photo's shape, so each axis has its
    own step. Coarsening scales both by the same factor, so the cloud keeps its proportions.
    """
    step_x, step_y = max(1, math.ceil(width / model_side)), max(1, math.ceil(height / model_side))
    while math.ceil(width / step_x) * math.ceil(height / step_y) > max_points:
        count = math.ceil(width / step_x) * math.ceil(height / step_y)
        grow = max(math.sqrt(count / max_points), 1.0 + 1e-9)
        step_x = max(step_x + 1, math.ceil(step_x * grow))
        step_y = max(step_y + 1, math.ceil(step_y * grow))
    return step_x, step_y


def point_cloud(depth: np.ndarray, scene: Scene) -> np.ndarray:
    """The depth map back-projected on the grid of `grid_steps`, as PLY vertices; sky and anything past
    `max_depth_m` (or not finite) is left out."""
    height, width = depth.shape
    step_x, step_y = grid_steps(width, height, scene.model_side, scene.max_points)
    us = np.arange(0, width, step_x)
    vs = np.arange(0, height, step_y)
    z = depth[::step_y, ::step_x]
    keep = np.isfinite(z) & (z > 0) & (z <= scene.max_depth_m)
    rows, cols = np.nonzero(keep)
    u = us[cols].astype(np.float32)
    v = vs[rows].astype(np.float32)
    x, y, zs = back_project(u, v, z[rows, cols], scene.camera)
    rgb_h, rgb_w = scene.rgb.shape[:2]
    colour = scene.rgb[(vs[rows] * rgb_h) // height, (us[cols] * rgb_w) // width]
    vertices = np.empty(rows.size, dtype=PLY_VERTEX)
    vertices["x"], vertices["y"], vertices["z"] = x, y, zs
    vertices["red"], vertices["green"], vertices["blue"] = colour[:, 0], colour[:, 1], colour[:, 2]
    return vertices


def ply_bytes(depth: np.ndarray, scene: Scene) -> bytes:
    """Binary little-endian PLY of the point cloud, written by plyfile; the camera is in its comments."""
    cam = scene.camera
    comments = [
        "depthq point cloud: meters, camera frame x right, y down, z forward (OpenCV)",
        f"camera pinhole fx {cam.fx!r} fy {cam.fy!r} cx {cam.cx!r} cy {cam.cy!r} width {cam.width} height {cam.height}",
    ]
    element = PlyElement.describe(point_cloud(depth, scene), "vertex")
    buf = io.BytesIO()
    PlyData([element], text=False, byte_order="<", comments=comments).write(buf)
    return buf.getvalue()


def extra_files(depth: np.ndarray, formats: Iterable[str], scene: Scene | None) -> dict[str, bytes]:
    """The optional outputs asked for. A PLY needs a scene; without a focal length (a meters-only model
    on a photo with no EXIF focal length) there is no camera, and so no PLY."""
    wanted = set(formats)
    encoders = {"tiff": tiff_bytes, "png16": png16_bytes, "exr": exr_bytes}
    files = {kind: encode(depth) for kind, encode in encoders.items() if kind in wanted}
    if "ply" in wanted and scene is not None:
        files["ply"] = ply_bytes(depth, scene)
    return files
