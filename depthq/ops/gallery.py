"""The results gallery: the latest depth results as cards, beside rq-dashboard in `depthq dashboard`.

Which photos are newest comes from the bounded list workers keep in Redis (`contract.recent_key`), so
an open page costs a few stats, not a listing of an output tree of a million files (~9 s). What a card
shows comes from the output folder alone: it shows what the store holds, not what the queue believes.
Only while that list is empty (a new Redis) is the tree listed, as before. It runs on the producer
side: Pillow and pillow_heif, never numpy or torch.

A video clip's card (its sidecar says `kind: "clip"`) plays the clip beside its depth preview
(`<clip>.preview.mp4`). Both are served as files, with range requests, which a browser's <video> needs
to seek.
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import json
import logging
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pillow_heif
from flask import Blueprint, Response, abort, jsonify, render_template, request, send_file, url_for
from PIL import Image, ImageOps, UnidentifiedImageError

from depthq.camera import back_project
from depthq.clip_jobs import preview_path
from depthq.clip_sidecar import ClipSidecar
from depthq.contract import ERROR_SUFFIX, OUTPUT_SUFFIXES, PayloadError, output_path, safe_relative
from depthq.depthmap import DepthMap
from depthq.sidecar import Sidecar, number, section, text

log = logging.getLogger(__name__)

pillow_heif.register_heif_opener()

# Long side of a thumbnail, in pixels: a card is about this wide on a laptop screen.
THUMB_PX = 320
# Long side of the photo and the preview on a result's measuring page: two of them side by side.
VIEW_PX = 1024
# Long side of the depth grid a measuring page hovers over (~200 KB of JSON); clicks read exact pixels.
HOVER_GRID_PX = 256
_THUMB_QUALITY = 80
# About 1,500 thumbnails of ~20 KB: a few screens of gallery for every open tab, in a bounded footprint.
_THUMB_CACHE_BYTES = 32 * 1024 * 1024
# Full decodes at once (a 48 MP preview PNG is ~150 MB decoded and takes ~2 s; it has no draft mode),
# so a first look at a gallery of big photos bounds memory and leaves threads for the page's polls.
_DECODE_SLOTS = 4
# Corrupt sidecars are warned about once per version, not on every refresh of every open tab.
_WARNED_MAX = 1024

_SIDECAR_SUFFIX = OUTPUT_SUFFIXES["json"]
# What a browser is told each clip container is (an unknown one is sent as bytes, and may still play).
_VIDEO_TYPES = {
    "mp4": "video/mp4",
    "m4v": "video/mp4",
    "mov": "video/quicktime",
    "mkv": "video/x-matroska",
    "webm": "video/webm",
    "avi": "video/x-msvideo",
}
_DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError)


@dataclass(frozen=True)
class _Found:
    """A sidecar or error file seen by the scan; `mtime_ns` orders results and versions their URLs."""

    mtime_ns: int
    path: Path
    source: str
    kind: str  # "result" or "error"


class _ThumbCache:
    """LRU of encoded JPEGs. Keys carry the file's mtime and size, so a replaced photo misses by itself."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, int, int], data: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self._max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


def _scan(output_dir: Path) -> Iterator[_Found]:
    """Sidecars and error files with their mtimes, lazily, so `heapq.nlargest` keeps only `2 x size` of them.

    Cost: one directory read per folder plus one stat per `*.json`; the depth maps and previews are
    listed but never stat'ed, and no file is opened. On a local disk that is well under a second for
    100,000 results; on a network share it is one round trip per stat, which is why the listing is
    cached (see `gallery_blueprint`). Hidden names (the store's temporary files) and symlinked folders
    are skipped: the store never makes either, and following links could leave the root or loop.
    """
    stack = [output_dir]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue  # no result written yet, or a folder removed while we looked
        except OSError as exc:
            log.warning("gallery: cannot list %s (%s)", folder, exc.strerror)
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                if not name.endswith(_SIDECAR_SUFFIX) or not entry.is_file(follow_symlinks=False):
                    continue
                mtime_ns = entry.stat(follow_symlinks=False).st_mtime_ns
            except OSError:
                continue  # gone between the listing and the stat: a rewrite in progress
            kind, suffix = ("error", ERROR_SUFFIX) if name.endswith(ERROR_SUFFIX) else ("result", _SIDECAR_SUFFIX)
            path = Path(entry.path)
            rel = path.relative_to(output_dir).as_posix()
            yield _Found(mtime_ns=mtime_ns, path=path, source=rel[: -len(suffix)], kind=kind)


# Error types that say the photo itself cannot be decoded or read: the page asks no thumbnail of them
# (each would be a 415 in the browser's console).
UNSHOWABLE_ERRORS = frozenset({"bad_input", "refused"})


def _card(found: _Found, record: dict[str, Any], is_clip: Callable[[str], bool]) -> dict[str, Any] | None:
    """What the page shows of one record: typed fields only, so nothing else from the file reaches it.
    A clip's result (`kind: "clip"`) is a card of its own kind; a clip's error file shows the clip
    itself, never a thumbnail, which a video has none of."""
    card: dict[str, Any] = {
        "source": found.source,
        "kind": found.kind,
        "version": found.mtime_ns,
        "modified_at": datetime.fromtimestamp(found.mtime_ns / 1e9, UTC).isoformat(),
        "created_at": text(record.get("created_at")),
        "thumb_url": url_for(".thumb", source=found.source, v=found.mtime_ns),
    }
    if found.kind == "error":
        error = section(record, "error")
        card["error"] = {"type": text(error.get("type")), "message": text(error.get("message"))}
        if card["error"]["type"] in UNSHOWABLE_ERRORS:
            # The worker could not decode or read it: neither can the thumbnailer, so ask for nothing.
            card["thumb_url"] = None
        if is_clip(found.source):
            card.update(thumb_url=None, clip_url=url_for(".clip", source=found.source, v=found.mtime_ns))
        return card
    clip = ClipSidecar.from_dict(record, source=found.source)
    if clip is not None:
        return _clip_card(card, found, clip)
    sidecar = Sidecar.from_dict(record, source=found.source)
    if sidecar is None:
        return None
    depth = sidecar.depth
    card.update(
        preview_url=url_for(".preview", source=found.source, v=found.mtime_ns),
        result_url=url_for(".result", source=found.source),
        width=number(sidecar.width),
        height=number(sidecar.height),
        fov_deg=sidecar.fov_deg,
        focal_length_px=sidecar.focal_length_px,
        focal_length_source=sidecar.focal_length_source,
        depth={
            "min": number(depth.get("min")),
            "max": number(depth.get("max")),
            "median": number(depth.get("median")),
            "unit": text(depth.get("unit")),
        },
        host=text(sidecar.worker.get("host")),
        worker=text(sidecar.worker.get("name")),
        model={key: text(sidecar.model.get(key)) for key in ("name", "backend", "device")},
        copied_from=sidecar.copied_from,
        warnings=list(sidecar.warnings),
    )
    return card


def _clip_card(card: dict[str, Any], found: _Found, clip: ClipSidecar) -> dict[str, Any]:
    """A clip's card: the clip and its depth preview as videos, and the clip's numbers."""
    hosts: dict[str, int] = {}
    for worker in clip.workers:
        if worker.get("host"):
            hosts[worker["host"]] = hosts.get(worker["host"], 0) + (worker.get("frames") or 0)
    depth = clip.depth
    card.update(
        kind="clip",
        thumb_url=None,
        clip_url=url_for(".clip", source=found.source, v=found.mtime_ns),
        video_url=url_for(".clip_preview", source=found.source, v=found.mtime_ns),
        width=clip.width,
        height=clip.height,
        frames=clip.frames_computed,
        frame_count=clip.frame_count,
        every_nth=clip.every_nth,
        fps=clip.fps,
        fov_deg=clip.fov_deg,
        focal_length_px=clip.focal_length_px,
        focal_length_source=clip.focal_length_source,
        focal_length_35mm=clip.focal_length_35mm,
        depth={key: depth.get(key) for key in ("min", "max", "median", "unit")},
        hosts=[{"host": host, "frames": frames} for host, frames in sorted(hosts.items())],
        model={key: text(clip.model.get(key)) for key in ("name", "backend", "device")},
        warnings=list(clip.warnings),
    )
    return card


class _Listing:
    """The latest results, rescanned at most every `ttl_s` however many tabs poll.

    One lock makes it single-flight: while one request scans, the others wait for its answer instead of
    starting scans of their own. Fewer than `size` cards are shown when some of the newest files are
    unreadable: the rest of the archive is not opened to make up for them.
    """

    def __init__(
        self,
        output_dir: Path,
        size: int,
        ttl_s: float,
        recent: Callable[[int], list[str]] | None = None,
        is_clip: Callable[[str], bool] = lambda source: False,
    ) -> None:
        self.output_dir = output_dir
        self.recent = recent
        self.is_clip = is_clip
        self.size = size
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._cards: list[dict[str, Any]] = []
        self._warned: set[tuple[str, int]] = set()

    def latest(self) -> list[dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                self._cards = self._collect()
                self._at = time.monotonic()
            return self._cards

    def _collect(self) -> list[dict[str, Any]]:
        # A photo has at most two records (a result and a newer failure of a replaced photo), so the
        # newest 2 x size files name at least `size` photos; only those are opened.
        named = self._named_recently()
        found = named if named else _scan(self.output_dir)
        newest = heapq.nlargest(2 * self.size, found, key=lambda f: f.mtime_ns)
        cards: list[dict[str, Any]] = []
        seen: set[str] = set()
        for found in newest:
            if found.source in seen:
                continue  # an older record of a photo already shown
            record = self._read(found)
            if record is None:
                continue
            found = self._named(found, record)
            if found.source in seen:
                continue
            card = _card(found, record, self.is_clip)
            if card is None:
                continue
            seen.add(found.source)
            cards.append(card)
            if len(cards) == self.size:
                break
        return cards

    def _named_recently(self) -> list[_Found]:
        """The sidecars and error files of the photos the workers named last: a stat each, no listing."""
        if self.recent is None:
            return []
        try:
            sources = list(dict.fromkeys(self.recent(4 * self.size)))
        except Exception as exc:  # Redis away: the tree listing still shows the results
            log.warning("gallery: no list of the newest results (%s); listing the output folder", exc)
            return []
        found: list[_Found] = []
        for source in sources:
            for kind, suffix_kind in (("result", "json"), ("error", "error")):
                try:
                    path = output_path(self.output_dir, source, suffix_kind)
                    found.append(_Found(path.stat().st_mtime_ns, path, source, kind))
                except (OSError, PayloadError):
                    continue  # not written yet (redis transport), removed, or a name that is not ours
        return found

    def _read(self, found: _Found) -> dict[str, Any] | None:
        try:
            found.source.encode("utf-8")
            safe_relative(found.source)
            record = json.loads(found.path.read_bytes())
        except (OSError, ValueError, PayloadError) as exc:
            self._warn_once(found, f"gallery: skipping {found.path}: {exc}")
            return None
        if not isinstance(record, dict):
            self._warn_once(found, f"gallery: skipping {found.path}: not a JSON object")
            return None
        return record

    def _named(self, found: _Found, record: dict[str, Any]) -> _Found:
        """The photo a record belongs to: the listing's name, or, for a name too long to keep whole in
        its outputs' names (`contract.output_base`), the record's own `source`, once it checks out."""
        source = text(record.get("source"))
        if source is None or source == found.source:
            return found
        try:
            if output_path(self.output_dir, source, "json" if found.kind == "result" else "error") == found.path:
                return dataclasses.replace(found, source=source)
        except PayloadError:
            pass
        return found

    def _warn_once(self, found: _Found, message: str) -> None:
        key = (str(found.path), found.mtime_ns)
        if key in self._warned:
            return
        if len(self._warned) >= _WARNED_MAX:
            self._warned.clear()
        self._warned.add(key)
        log.warning("%s", message)


def _inside(root: Path, path: Path) -> Path:
    """Resolved before the check, so a symlink inside the root that points out of it is refused too."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        abort(404)
    if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
        abort(404)
    return resolved


def _jpeg_thumbnail(path: Path, px: int = THUMB_PX) -> bytes:
    """Upright JPEG, long side at most `px`.

    `draft` lets libjpeg decode at 1/2 to 1/8 scale and pillow_heif pick an embedded HEIC thumbnail,
    so a 48 MP JPEG costs about 0.1 s instead of a full decode (PNG has no such shortcut).
    """
    with warnings.catch_warnings():
        # Pillow still refuses real bombs (DecompressionBombError); the warning band is a camera's range.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.draft("RGB", (px, px))
            upright = ImageOps.exif_transpose(img)
            if upright.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
                # 16-bit and float images would clip to white in a plain convert; scale them to 8 bits.
                upright = upright.convert("I").point(lambda v: v / 257).convert("L")
            upright.thumbnail((px, px))
            rgb = upright.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=_THUMB_QUALITY, optimize=True)
    return buf.getvalue()


def _served_width(width: int, height: int, px: int) -> float:
    """The width, in pixels, of a `width` x `height` photo as `_jpeg_thumbnail(..., px)` serves it: the
    measuring page never shows it wider, which would only enlarge it into blur."""
    return width * min(1.0, px / max(width, height, 1))


def gallery_blueprint(
    output_dir: Path,
    watch_root: Path,
    size: int,
    refresh_s: float,
    recent: Callable[[int], list[str]] | None = None,
    clip_extensions: Iterable[str] = (),
) -> Blueprint:
    """The gallery's routes, to mount at `/gallery`. `refresh_s` is how often an open page polls for
    new results; the listing is cached for half of it, so any number of tabs cost one look.
    `recent(n)` names the n photos with the newest outputs (Redis); without it the tree is listed.
    `clip_extensions` (`video.extensions`) are the files served as clips, and only they."""
    clip_suffixes = {e.lower().lstrip(".") for e in clip_extensions}

    def is_clip(source: str) -> bool:
        return PurePosixPath(source).suffix.lower().lstrip(".") in clip_suffixes

    listing = _Listing(output_dir, size, refresh_s / 2, recent, is_clip)
    cache = _ThumbCache(_THUMB_CACHE_BYTES)
    decode_slots = threading.BoundedSemaphore(_DECODE_SLOTS)
    bp = Blueprint("gallery", __name__, template_folder="templates")

    def payload() -> dict[str, Any]:
        return {
            "generated_at": datetime.now(UTC).isoformat(),
            "refresh_s": refresh_s,
            "size": size,
            "results": listing.latest(),
        }

    def thumbnail_response(root: Path, path: Path, px: int = THUMB_PX) -> Response:
        real = _inside(root, path)
        try:
            st = real.stat()
        except OSError:
            abort(404)
        key = (f"{real}@{px}", st.st_mtime_ns, st.st_size)
        data = cache.get(key)
        if data is None:
            try:
                with decode_slots:
                    data = _jpeg_thumbnail(real, px)
            except (FileNotFoundError, PermissionError):
                abort(404)
            except _DECODE_ERRORS as exc:
                log.info("gallery: no thumbnail for %s (%s)", real, exc)
                return Response("cannot decode this image", 415, mimetype="text/plain")
            cache.put(key, data)
        response = Response(data, mimetype="image/jpeg")
        # URLs carry the record's version (?v=mtime), so a browser may keep what it fetched.
        response.headers["Cache-Control"] = "private, max-age=86400"
        return response

    def relative(source: str) -> tuple[str, ...]:
        try:
            return safe_relative(source).parts
        except PayloadError:
            abort(404)

    def video_response(root: Path, path: Path) -> Response:
        """The file itself, with range requests (a <video> seeks by them) and its container's type."""
        real = _inside(root, path)
        mimetype = _VIDEO_TYPES.get(real.suffix.lower().lstrip("."), "application/octet-stream")
        response = send_file(real, mimetype=mimetype, conditional=True)
        # URLs carry the result's version (?v=mtime), as thumbnails' do.
        response.headers["Cache-Control"] = "private, max-age=86400"
        return response

    @bp.get("/")
    def page() -> str:
        return render_template("gallery.html", initial=payload(), results_url=url_for(".results"))

    @bp.get("/results.json")
    def results() -> Response:
        response = jsonify(payload())
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.get("/thumb/<path:source>")
    def thumb(source: str) -> Response:
        return thumbnail_response(watch_root, watch_root.joinpath(*relative(source)))

    @bp.get("/clip/<path:source>")
    def clip(source: str) -> Response:
        """A clip from the watched folder, as it is: a browser plays what its codecs allow."""
        if not is_clip(source):
            abort(404)
        return video_response(watch_root, watch_root.joinpath(*relative(source)))

    @bp.get("/clip-preview/<path:source>")
    def clip_preview(source: str) -> Response:
        """A clip's depth preview, `<clip>.preview.mp4` (H.264)."""
        relative(source)
        return video_response(output_dir, preview_path(output_dir, source))

    @bp.get("/preview/<path:source>")
    def preview(source: str) -> Response:
        relative(source)
        return thumbnail_response(output_dir, output_path(output_dir, source, "preview"))

    def stored(source: str) -> tuple[Sidecar, DepthMap]:
        """A result's sidecar and depth map, both inside the output folder, or 404."""
        relative(source)
        try:
            record = json.loads(_inside(output_dir, output_path(output_dir, source, "json")).read_bytes())
            depth_map = DepthMap.open(_inside(output_dir, output_path(output_dir, source, "npy")))
        except (OSError, ValueError) as exc:  # DepthMapError is a ValueError, as is bad JSON
            log.info("gallery: no depth map to measure for %s (%s)", source, exc)
            abort(404)
        sidecar = Sidecar.from_dict(record, source=source)
        if sidecar is None:
            abort(404)
        return sidecar, depth_map

    @bp.get("/result/<path:source>")
    def result(source: str) -> str:
        record, depth_map = stored(source)
        version = int(_inside(output_dir, output_path(output_dir, source, "json")).stat().st_mtime_ns)
        return render_template(
            "result.html",
            source=source,
            width=depth_map.width,
            height=depth_map.height,
            has_camera=record.camera is not None,
            natural_width=_served_width(depth_map.width, depth_map.height, VIEW_PX),
            photo_url=url_for(".photo", source=source, v=version),
            preview_url=url_for(".preview_large", source=source, v=version),
            depth_url=url_for(".depth", source=source, v=version),
            measure_url=url_for(".measure", source=source),
            gallery_url=url_for(".page"),
        )

    @bp.get("/photo/<path:source>")
    def photo(source: str) -> Response:
        return thumbnail_response(watch_root, watch_root.joinpath(*relative(source)), VIEW_PX)

    @bp.get("/preview-large/<path:source>")
    def preview_large(source: str) -> Response:
        relative(source)
        return thumbnail_response(output_dir, output_path(output_dir, source, "preview"), VIEW_PX)

    @bp.get("/depth/<path:source>")
    def depth(source: str) -> Response:
        """The map on a coarse grid, meters to the millimetre: what the page shows under the pointer."""
        _, depth_map = stored(source)
        step, rows = depth_map.grid(HOVER_GRID_PX)
        response = jsonify(
            {
                "unit": "m",
                "width": depth_map.width,
                "height": depth_map.height,
                "step": step,
                "rows": [[round(d, 3) if math.isfinite(d) else None for d in row] for row in rows],
            }
        )
        response.headers["Cache-Control"] = "private, max-age=86400"  # the URL carries the version
        return response

    @bp.get("/measure/<path:source>")
    def measure(source: str) -> Response:
        """The straight-line 3D distance between pixels `a` and `b` ("u,v" each), from the full map's
        exact depths and the sidecar's camera, through the same back-projection as the PLY."""
        record, depth_map = stored(source)
        camera = record.camera
        if camera is None:
            return Response("this result has no camera (no focal length was known)", 409, mimetype="text/plain")
        points = []
        for name in ("a", "b"):
            try:
                u, v = (int(n) for n in request.args.get(name, "").split(","))
                z = depth_map.at(u, v)
            except (ValueError, IndexError):
                return Response(f"{name} must be a pixel 'u,v' inside the photo", 400, mimetype="text/plain")
            if not math.isfinite(z):
                return Response(f"no depth at {name}", 422, mimetype="text/plain")
            x, y, z = back_project(u, v, z, camera)
            points.append({"u": u, "v": v, "depth_m": z, "point_m": [x, y, z]})
        distance = math.dist(points[0]["point_m"], points[1]["point_m"])
        return jsonify({"a": points[0], "b": points[1], "distance_m": distance})

    return bp
