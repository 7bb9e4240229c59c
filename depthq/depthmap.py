"""A stored `.depth.npy` read with the standard library: single pixels, and a coarse grid of the map.

The dashboard's gallery measures on it, and the dashboard never imports numpy (a watcher host stays
light; tests/test_layout.py checks). The worker writes these maps with `np.save`: format 1.0,
little-endian float32, C order, shape (H, W). Only that is read; anything else is refused.
"""

from __future__ import annotations

import ast
import math
import struct
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

_MAGIC = b"\x93NUMPY"
_FLOAT32 = 4


class DepthMapError(ValueError):
    """A file that is not a depth map as the worker writes it."""


@dataclass(frozen=True)
class DepthMap:
    """Where a stored map's pixels are: `offset` is the byte where row 0 starts."""

    path: Path
    width: int
    height: int
    offset: int

    @classmethod
    def open(cls, path: Path) -> DepthMap:
        """Reads and checks the header only (about 128 bytes), never the 48 MB of a 12 MP map."""
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 10 or head[:6] != _MAGIC:
                raise DepthMapError(f"{path} is not a .npy file")
            major = head[6]
            if major == 1:
                length, start = struct.unpack("<H", head[8:10])[0], 10
            elif major in (2, 3):
                length, start = struct.unpack("<I", head[8:12])[0], 12
            else:
                raise DepthMapError(f"{path}: .npy format {major} is unknown")
            f.seek(start)
            try:
                header = ast.literal_eval(f.read(length).decode("latin-1"))
            except (ValueError, SyntaxError) as exc:
                raise DepthMapError(f"{path}: unreadable .npy header ({exc})") from None
        shape = header.get("shape") if isinstance(header, dict) else None
        if (
            header.get("descr") != "<f4"
            or header.get("fortran_order") is not False
            or not isinstance(shape, tuple)
            or len(shape) != 2
            or not all(isinstance(n, int) and n > 0 for n in shape)
        ):
            raise DepthMapError(f"{path}: not a float32 (H, W) depth map: {header!r}")
        depth_map = cls(path=path, width=shape[1], height=shape[0], offset=start + length)
        if path.stat().st_size < depth_map.offset + depth_map.width * depth_map.height * _FLOAT32:
            raise DepthMapError(f"{path} is shorter than its header says (cut off?)")
        return depth_map

    def at(self, u: int, v: int) -> float:
        """Depth in meters at pixel (u, v): column u, row v, from 0."""
        if not (0 <= u < self.width and 0 <= v < self.height):
            raise IndexError(f"pixel ({u}, {v}) is outside the {self.width} x {self.height} map")
        with self.path.open("rb") as f:
            f.seek(self.offset + (v * self.width + u) * _FLOAT32)
            return struct.unpack("<f", f.read(_FLOAT32))[0]

    def grid(self, max_side: int) -> tuple[int, list[list[float]]]:
        """Every step-th pixel of every step-th row, step = the one that keeps the long side within
        `max_side`: (step, rows). Reads only those rows: about 3 MB of a 12 MP map for 256."""
        step = max(1, math.ceil(max(self.width, self.height) / max_side))
        row_bytes = self.width * _FLOAT32
        rows: list[list[float]] = []
        with self.path.open("rb") as f:
            for v in range(0, self.height, step):
                f.seek(self.offset + v * row_bytes)
                row = array("f")
                row.frombytes(f.read(row_bytes))
                if sys.byteorder != "little":
                    row.byteswap()
                rows.append(row[::step].tolist())
        return step, rows
