"""The output store: every file atomic (temp file in the same folder, then rename), the JSON last.

Readers, and the producer's "is it done?" check, see either nothing or a whole file. The sidecar JSON
is written after the data files, so its presence means the whole set is there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from producer.contract import output_path

_PNG16_MAX_M = 65.535


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _tiff(depth: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(depth.astype(np.float32)).save(buf, format="TIFF")
    return buf.getvalue()


def _png16(depth: np.ndarray) -> bytes:
    """uint16 millimetres, saturating at 65.535 m."""
    mm = np.clip(np.rint(depth * 1000.0), 0, 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(mm).save(buf, format="PNG")
    return buf.getvalue()


class OutputStore:
    def __init__(self, root: Path):
        self.root = root

    def path(self, source: str, kind: str) -> Path:
        return output_path(self.root, source, kind)

    def write_data(self, source: str, depth: np.ndarray, preview: bytes, formats: Iterable[str]) -> None:
        """Everything but the sidecar. Callers write the sidecar after, so it can carry the write time."""
        wanted = set(formats)
        atomic_write(self.path(source, "npy"), lambda f: np.save(f, depth.astype(np.float32, copy=False)))
        atomic_bytes(self.path(source, "preview"), preview)
        if "tiff" in wanted:
            atomic_bytes(self.path(source, "tiff"), _tiff(depth))
        if "png16" in wanted:
            atomic_bytes(self.path(source, "png16"), _png16(depth))

    def write_sidecar(self, source: str, sidecar: dict[str, Any]) -> None:
        """The last file of a set: its presence tells readers the set is complete."""
        atomic_bytes(self.path(source, "json"), json_bytes(sidecar))
        # A success supersedes an earlier failure of the same photo.
        self.path(source, "error").unlink(missing_ok=True)

    def write_result(
        self, source: str, depth: np.ndarray, preview: bytes, sidecar: dict[str, Any], formats: Iterable[str]
    ) -> None:
        self.write_data(source, depth, preview, formats)
        self.write_sidecar(source, sidecar)

    def read_result(self, source: str) -> tuple[np.ndarray, bytes, dict[str, Any]] | None:
        """The stored depth, preview and sidecar of `source`, or None if any is missing or unreadable."""
        try:
            sidecar = json.loads(self.path(source, "json").read_text(encoding="utf-8"))
            depth = np.load(self.path(source, "npy"), allow_pickle=False)
            preview = self.path(source, "preview").read_bytes()
        except (OSError, ValueError):
            return None
        return depth, preview, sidecar

    def write_error(self, source: str, error: dict[str, Any]) -> Path:
        path = self.path(source, "error")
        atomic_bytes(path, json_bytes(error))
        return path
