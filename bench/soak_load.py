"""The soak's load: files written into the watched folder the ways users and their tools write them.

Each pattern is something a real copy does that the producer must read right: a plain write, a slow
network copy (chunks with pauses shorter than `producer.settle_ms`, which is what the producer
promises to wait out), a browser's `x.jpg.part` renamed into place, rsync's hidden `.x.jpg.XXXXXX`
renamed into place, `cp -p` keeping an old mtime (also over a finished photo, with new content), a
burst of dozens at once, byte-identical copies of finished and of still-queued photos, new content
under a finished photo's name, photos moved or deleted while still queued, names in NFC and NFD,
with emoji and CJK, names from 200 to 255 bytes (the file system's limit, extension included), and
about 2.5 % bad files (empty, truncated JPEGs, text named .jpg), and now and then a video clip
(20 to 60 frames of noise, renamed into place from `.part`), which becomes chunk jobs and an assemble.

Photos are small JPEGs (32 to 400 px a side) of random noise, so the tiny model keeps up on two
cores and no two photos share content unless the soak copied one on purpose. Everything written is
recorded in the `Ledger`, which is what the end-state checks hold the service to.
"""

from __future__ import annotations

import io
import itertools
import os
import queue
import random
import shutil
import string
import threading
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from PIL import Image

from bench.soak_record import Entry, Ledger, Timeline
from depthq.contract import finished_kind

# Subfolders of the watched folder that files go into ("" is the folder itself).
FOLDERS = ("", "cam-a", "cam-b/2026-05-01", "trip/day 1", "Ünïcødé", "東京", "deep/a/b/c")
STEMS = ("IMG", "DSC", "photo", "Scan", "PXL")
EXTENSIONS = (".jpg", ".jpg", ".jpg", ".JPG", ".jpeg")
# Unicode stems, each written in NFC or NFD (two different names on Linux file systems).
UNICODE_STEMS = ("Café Zürich", "Ångström façade", "naïve résumé", "🌄 sunrise 🏔️", "東京タワー", "서울 야경", "Ελλάδα")
# Ops and how often each is picked (a burst writes dozens of files, the others one or two).
WEIGHTS = {
    "plain": 20,
    "slow": 6,
    "part": 8,
    "rsync": 8,
    "old-mtime": 5,
    "old-mtime-over": 3,
    "burst": 1.5,
    "copy-done": 4,
    "copy-queued": 3,
    "overwrite": 4,
    "move-queued": 3,
    "move-done": 1,
    "delete-queued": 3,
    "unicode": 6,
    "long-name": 3,
    "clip": 1,
}
# Every this-many-th new file is a bad one: about 8 in 10 files are new content (the rest are copies,
# moves, overwrites), so about 2.5 % of all files.
BAD_EVERY = 32
BAD_KINDS = ("empty", "truncated", "text")
MIN_SIDE, MAX_SIDE = 32, 400
# Clips: small, a few chunks each, so the tiny model keeps up; a clip for a fault is longer, so that a
# worker can be caught in the middle of one of its chunks.
CLIP_FRAMES = (20, 60)
FAULT_CLIP_FRAMES = 160
NAME_MAX = 255  # bytes, the limit of ext4, tmpfs and most others
LONG_MIN = 200
# A photo counts as "recent" (likely still queued) this long after it was written.
RECENT_S = 3.0
SLOW_WRITERS = 3


def jpeg(seed: int, width: int, height: int) -> bytes:
    """A JPEG of random noise: unique content per seed, and no two seeds compress to the same bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_noise_clip(path: Path, seed: int, frames: int, width: int, height: int) -> None:
    """`frames` frames of seeded noise as H.264 in MP4: unique content per seed."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            rgb = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def long_name(rng: random.Random, n: int, byte_length: int, extension: str = ".jpg") -> str:
    """A name of exactly `byte_length` bytes in UTF-8, extension included, mixing 1-, 2- and 3-byte characters."""
    head = f"long-{n:05d}-"
    budget = byte_length - len(head.encode()) - len(extension.encode())
    chars: list[str] = []
    while budget > 0:
        c = rng.choice(("a", "b", "x", "é", "ü", "日", "本", "-"))
        size = len(c.encode())
        if size > budget:
            c, size = rng.choice(string.ascii_lowercase), 1
        chars.append(c)
        budget -= size
    name = head + "".join(chars) + extension
    assert len(name.encode()) == byte_length, name
    return name


class Load:
    """Writes files at `files_per_min` in a thread of its own until `stop()`; faults may ask for a burst."""

    def __init__(
        self,
        ledger: Ledger,
        timeline: Timeline,
        output: Path,
        seed: int,
        files_per_min: float,
        settle_ms: int,
    ) -> None:
        self.ledger = ledger
        self.timeline = timeline
        self.output = output
        self.rng = random.Random(seed)
        self.files_per_s = files_per_min / 60.0
        # Pauses of a slow writer stay under the settle time, as the producer's promise asks.
        self.max_pause_s = max(0.02, 0.6 * settle_ms / 1000.0)
        self.errors: list[str] = []
        self.written = 0
        self._seeds = itertools.count(seed * 1_000_000 + 1)
        self._names = itertools.count(1)
        self._counter_lock = threading.Lock()
        self._stop = threading.Event()
        self._bursts: queue.Queue[int] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._slow_slots = threading.BoundedSemaphore(SLOW_WRITERS)
        self._slow_threads: list[threading.Thread] = []
        self._recent: list[tuple[float, str]] = []
        self._new_files = 0

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="soak-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop writing and wait for every writer, slow ones included, to finish its file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for t in self._slow_threads:
            t.join(timeout=60)

    def burst_now(self, n: int) -> None:
        """Ask for a burst of `n` photos at once (a fault wants work in flight)."""
        self._bursts.put(n)

    def _run(self) -> None:
        started = time.monotonic()
        ops = list(WEIGHTS)
        weights = [WEIGHTS[o] for o in ops]
        while not self._stop.is_set():
            try:
                n = self._bursts.get_nowait()
                op: str | None = "burst"
            except queue.Empty:
                n, op = 0, None
            if op is None:
                due = self.written - self.files_per_s * (time.monotonic() - started)
                if due >= 0:
                    self._stop.wait(min(1.0, (due + 1) / self.files_per_s))
                    continue
                op = self.rng.choices(ops, weights)[0]
            try:
                self.written += self._do(op, n)
            except Exception as exc:  # the harness's own failure: reported, and the load goes on
                self.errors.append(f"{op}: {type(exc).__name__}: {exc}")
                self.timeline.add(f"load error in {op}: {exc}")
        self.timeline.add(f"load stopped: {self.written} files written")

    def _do(self, op: str, n: int = 0) -> int:
        handler: Callable[..., int] = getattr(self, "_" + op.replace("-", "_"))
        return handler(n) if op == "burst" else handler()

    # ------------------------------------------------------------------ content and names

    def _seed(self) -> int:
        with self._counter_lock:
            return next(self._seeds)

    def _n(self) -> int:
        with self._counter_lock:
            return next(self._names)

    def _photo(self, rng: random.Random, not_size: int | None = None) -> bytes:
        while True:
            data = jpeg(self._seed(), rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE))
            if len(data) != not_size:  # new content under an old name must differ in size or mtime
                return data

    def _bad(self, kind: str, rng: random.Random) -> bytes:
        if kind == "empty":
            return b""
        if kind == "text":
            return b"this is not a photo, whatever its name says\n" * rng.randint(1, 50)
        whole = self._photo(rng)
        return whole[: int(len(whole) * rng.uniform(0.3, 0.7))]

    def _content(self, rng: random.Random) -> tuple[bytes, bool]:
        """New content for a new name: a photo, or every BAD_EVERY-th time a bad file, of each kind in turn."""
        with self._counter_lock:
            self._new_files += 1
            n = self._new_files
        if n % BAD_EVERY == 0:
            return self._bad(BAD_KINDS[(n // BAD_EVERY) % len(BAD_KINDS)], rng), True
        return self._photo(rng), False

    def _name(self, rng: random.Random, folder: str | None = None) -> str:
        folder = rng.choice(FOLDERS) if folder is None else folder
        name = f"{rng.choice(STEMS)}_{self._n():05d}{rng.choice(EXTENSIONS)}"
        return f"{folder}/{name}" if folder else name

    def _path(self, rel: str) -> Path:
        path = self.ledger.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _record(self, rel: str, pattern: str, bad: bool) -> Entry:
        entry = self.ledger.record(rel, pattern, bad, self.timeline.now())
        with self._counter_lock:
            cutoff = time.monotonic() - RECENT_S
            self._recent = [(t, r) for t, r in self._recent if t >= cutoff] + [(time.monotonic(), rel)]
        return entry

    def _done(self, entry: Entry) -> bool:
        """Whether the service has finished this photo's current content (its sidecar records it)."""
        if entry.bad:
            return False
        try:
            st = self.ledger.path(entry.rel).stat()
        except OSError:
            return False
        return finished_kind(self.output, entry.rel, st) == "json"

    def _done_photo(self, entry: Entry) -> bool:
        """A finished photo: what the photo patterns copy, overwrite and move (under photo names; a clip
        copied to a name ending .jpg is a bad photo, whatever the ledger would think)."""
        return entry.pattern != "clip" and self._done(entry)

    def _queued(self, entry: Entry) -> bool:
        """Written moments ago and not finished yet: very likely still in the queue (a photo: the photo
        patterns move and delete these under photo names)."""
        with self._counter_lock:
            recent = {rel for _, rel in self._recent}
        return entry.rel in recent and entry.pattern != "clip" and not self._done(entry)

    # ------------------------------------------------------------------ patterns

    def _write_new(self, pattern: str, write: Callable[[Path, bytes], None], rel: str | None = None) -> int:
        rel = rel or self._name(self.rng)
        data, bad = self._content(self.rng)
        self.ledger.claim(rel)
        try:
            write(self._path(rel), data)
            self._record(rel, pattern, bad)
        finally:
            self.ledger.release(rel)
        return 1

    def _plain(self) -> int:
        return self._write_new("plain", lambda path, data: path.write_bytes(data))

    def _slow(self) -> int:
        """A network copy: one open file growing in chunks, with pauses, on a thread of its own."""
        if not self._slow_slots.acquire(blocking=False):
            return self._plain()
        rng = random.Random(self.rng.random())
        rel = self._name(rng)
        data, bad = self._content(rng)
        self.ledger.claim(rel)

        def write() -> None:
            try:
                chunks = max(1, rng.randint(3, 8))
                step = len(data) // chunks + 1
                with self._path(rel).open("wb") as f:
                    for i in range(0, max(len(data), 1), step):
                        f.write(data[i : i + step])
                        f.flush()
                        time.sleep(rng.uniform(0.02, self.max_pause_s))  # the writer's own pace
                self._record(rel, "slow", bad)
            except Exception as exc:
                self.errors.append(f"slow: {type(exc).__name__}: {exc}")
            finally:
                self.ledger.release(rel)
                self._slow_slots.release()

        t = threading.Thread(target=write, name="soak-slow-writer", daemon=True)
        self._slow_threads = [s for s in self._slow_threads if s.is_alive()] + [t]
        t.start()
        return 1

    def _part(self) -> int:
        """A browser's download: `x.jpg.part`, renamed to `x.jpg` once whole."""

        def write(path: Path, data: bytes) -> None:
            part = path.with_name(path.name + ".part")
            part.write_bytes(data)
            part.rename(path)

        return self._write_new("part", write)

    def _rsync(self) -> int:
        """rsync: a hidden `.x.jpg.XXXXXX` beside it, its mtime set to the source's (-a), then renamed."""
        old = self.rng.random() < 0.5
        when = time.time() - self.rng.uniform(86400, 5 * 365 * 86400)
        suffix = "".join(self.rng.choices(string.ascii_letters + string.digits, k=6))

        def write(path: Path, data: bytes) -> None:
            tmp = path.with_name(f".{path.name}.{suffix}")
            tmp.write_bytes(data)
            if old:
                os.utime(tmp, (when, when))
            tmp.rename(path)

        return self._write_new("rsync", write)

    def _old_mtime(self) -> int:
        """`cp -p`: a new file that keeps its source's old mtime."""
        when = time.time() - self.rng.uniform(86400, 5 * 365 * 86400)

        def write(path: Path, data: bytes) -> None:
            path.write_bytes(data)
            os.utime(path, (when, when))

        return self._write_new("old-mtime", write)

    def _old_mtime_over(self) -> int:
        """`cp -p` of another photo over a finished one: new content, and an mtime older than the old one's."""
        entry = self.ledger.pick(self.rng, self._done_photo)
        if entry is None:
            return self._old_mtime()
        data = self._photo(self.rng, not_size=entry.size)
        when = float(int(entry.mtime) - self.rng.randint(86400, 5 * 365 * 86400))
        path = self.ledger.path(entry.rel)
        path.write_bytes(data)
        os.utime(path, (when, when))
        self._record(entry.rel, "old-mtime-over", False)
        return 1

    def _burst(self, n: int = 0) -> int:
        """Dozens at once, as fast as they can be written: a card reader's import, a folder dropped in."""
        n = n or self.rng.randint(20, 50)
        folder = self.rng.choice(FOLDERS)
        if self.rng.random() < 0.5:  # into a folder of its own, made as the burst begins
            folder = "/".join(part for part in (folder, f"burst-{self._n():05d}") if part)
        for _ in range(n):
            self._write_new("burst", lambda path, data: path.write_bytes(data), self._name(self.rng, folder))
        return n

    def _copy_done(self) -> int:
        """A byte-identical copy of a finished photo under another name."""
        entry = self.ledger.pick(self.rng, self._done_photo)
        if entry is None:
            return self._plain()
        rel = self._name(self.rng)
        shutil.copyfile(self.ledger.path(entry.rel), self._path(rel))
        self._record(rel, "copy-done", False)
        return 1

    def _copy_queued(self) -> int:
        """A new photo, and at once a byte-identical copy of it under another name."""
        rel = self._name(self.rng)
        data = self._photo(self.rng)
        self._path(rel).write_bytes(data)
        self._record(rel, "copy-queued", False)
        copy = self._name(self.rng)
        shutil.copyfile(self.ledger.path(rel), self._path(copy))
        self._record(copy, "copy-queued", False)
        return 2

    def _overwrite(self) -> int:
        """New content under a finished photo's name (a re-export, an edit saved over the original)."""
        entry = self.ledger.pick(self.rng, self._done_photo)
        if entry is None:
            return self._plain()
        self.ledger.path(entry.rel).write_bytes(self._photo(self.rng, not_size=entry.size))
        self._record(entry.rel, "overwrite", False)
        return 1

    def _queued_entry(self) -> Entry | None:
        """A photo that is still queued: one written moments ago and not done, else a new one now."""
        entry = self.ledger.pick(self.rng, self._queued)
        if entry is not None:
            return entry
        self._plain()
        return self.ledger.pick(self.rng, self._queued, tries=1000)

    def _move(self, entry: Entry, pattern: str) -> int:
        new = self._name(self.rng)
        self.ledger.path(entry.rel).rename(self._path(new))
        self.ledger.forget(entry.rel, f"moved to {new}")
        self._record(new, pattern, entry.bad)
        return 1

    def _move_queued(self) -> int:
        entry = self._queued_entry()
        return 0 if entry is None else self._move(entry, "move-queued")

    def _move_done(self) -> int:
        entry = self.ledger.pick(self.rng, self._done_photo)
        return self._plain() if entry is None else self._move(entry, "move-done")

    def _delete_queued(self) -> int:
        entry = self._queued_entry()
        if entry is None:
            return 0
        self.ledger.path(entry.rel).unlink()
        self.ledger.forget(entry.rel, "deleted")
        return 0

    def _unicode(self) -> int:
        """A name in NFC or NFD; now and then both at once, two files that look alike."""
        stem = self.rng.choice(UNICODE_STEMS)
        folder = self.rng.choice(FOLDERS)
        n = self._n()
        forms = ("NFC", "NFD") if self.rng.random() < 0.3 else (self.rng.choice(("NFC", "NFD")),)
        for form in forms:
            name = unicodedata.normalize(form, f"{stem} {n:05d}.jpg")
            self._write_new(
                "unicode", lambda path, data: path.write_bytes(data), f"{folder}/{name}" if folder else name
            )
        return len(forms)

    def _clip(self) -> int:
        self._write_clip(self.rng.randint(*CLIP_FRAMES))
        return 1

    def _write_clip(self, frames: int) -> str:
        """A video clip (H.264 in MP4 of random noise), written as `.part` and renamed into place; its name."""
        rng = self.rng
        rel = f"{rng.choice(FOLDERS[:3])}/CLIP_{self._n():05d}.mp4".lstrip("/")
        seed = self._seed()
        width, height = rng.randrange(64, 161, 2), rng.randrange(48, 121, 2)
        self.ledger.claim(rel)
        try:
            path = self._path(rel)
            part = path.with_name(path.name + ".part")
            write_noise_clip(part, seed, frames, width, height)
            part.rename(path)
            self._record(rel, "clip", False)
        finally:
            self.ledger.release(rel)
        return rel

    def clip_now(self) -> str:
        """Write a long clip at once (a fault wants a worker in the middle of one of its chunks); its name."""
        return self._write_clip(FAULT_CLIP_FRAMES)

    def _long_name(self) -> int:
        """A name of 200 to 255 bytes, extension included: up to the file system's own limit."""
        length = self.rng.choice(
            (LONG_MIN, 230, 240, 250, NAME_MAX - 1, NAME_MAX, self.rng.randint(LONG_MIN, NAME_MAX))
        )
        folder = self.rng.choice(FOLDERS)
        name = long_name(self.rng, self._n(), length)
        return self._write_new(
            "long-name", lambda path, data: path.write_bytes(data), f"{folder}/{name}" if folder else name
        )

    # ------------------------------------------------------------------ probes

    def probe(self, label: str) -> str:
        """A photo dropped now by the caller (a fault measuring recovery); recorded like any other."""
        rel = f"probes/probe-{self._n():05d}-{label}.jpg"
        data = jpeg(self._seed(), 64, 48)
        self.ledger.claim(rel)
        try:
            self._path(rel).write_bytes(data)
            self.ledger.record(rel, "probe", False, self.timeline.now())
        finally:
            self.ledger.release(rel)
        return rel
