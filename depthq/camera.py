"""The camera a depth result describes: a pinhole with fx = fy = the focal length, principal point at
the centre, as ml-depth-pro assumes, in pixels of the upright photo.

Pixel (u, v) is the centre of column u and row v, counted from 0 (OpenCV's convention), so the centre
of a W x H photo is ((W - 1) / 2, (H - 1) / 2). Depth is measured along the optical axis: it is z, not
the distance to the camera. The camera frame is OpenCV's: x right, y down, z forward, in meters.

Kept free of numpy: the worker back-projects whole maps with it (numpy arrays go through the same
arithmetic), and the dashboard's gallery measures single points with plain floats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

# A float or an array type with float arithmetic (numpy's ndarray): back_project serves both.
N = TypeVar("N")


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics in pixels; `width` x `height` is the upright photo they apply to."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    model: str = "pinhole"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Camera | None:
        """The sidecar's `camera`, or None when it is missing or malformed (an older or hand-made file)."""
        if not isinstance(data, dict) or data.get("model") != "pinhole":
            return None
        try:
            camera = cls(
                fx=float(data["fx"]),
                fy=float(data["fy"]),
                cx=float(data["cx"]),
                cy=float(data["cy"]),
                width=int(data["width"]),
                height=int(data["height"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        usable = all(math.isfinite(v) for v in (camera.fx, camera.fy, camera.cx, camera.cy))
        return camera if usable and camera.fx > 0 and camera.fy > 0 else None


def pinhole(focal_length_px: float, width: int, height: int) -> Camera:
    """ml-depth-pro's camera: square pixels, principal point at the centre of the upright photo."""
    return Camera(
        fx=float(focal_length_px),
        fy=float(focal_length_px),
        cx=(width - 1) / 2.0,
        cy=(height - 1) / 2.0,
        width=width,
        height=height,
    )


def back_project(u: N, v: N, z: N, camera: Camera) -> tuple[N, N, N]:
    """Pixel (u, v) at depth z (meters along the optical axis) -> (x, y, z) in meters, camera frame.

    The one back-projection of depthq: the PLY writer feeds it arrays, the gallery's measuring floats.
    """
    x = (u - camera.cx) * z / camera.fx  # type: ignore[operator]
    y = (v - camera.cy) * z / camera.fy  # type: ignore[operator]
    return x, y, z
