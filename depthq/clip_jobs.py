"""How a video clip travels as jobs: its chunk jobs and its one assemble job, and the names they share.

The producer cuts a clip into chunk jobs of `video.chunk_frames` computed frames each, on the same
queues and lanes as photos, and one assemble job that depends on all of them (rq's `depends_on` with
`allow_failure`, so Redis keeps the fan-in and the assemble runs once every chunk has ended, well or
not). Any worker takes any of them. A chunk job stages its frames' depth, each at the frame's own focal
length, in the clip's staging folder beside the outputs, and writes its chunk record last; the assemble
job picks the clip's one focal length from the records, rescales each frame to it, writes the outputs
and the clip sidecar last, and removes the staging folder.

Every job of a clip carries the same `ClipPart` facts (what the probe found) in `JobPayload.clip`, so
no job has to probe the clip again. A clip the producer refuses (its probe failed, or it is too long)
still gets one job, part "refused", under the assemble job's id, which records the producer's reason as
the clip's error file on a worker, as a photo the producer cannot read does.

Job ids: the clip's content and model (`contract.job_id`), and its name, since copies of a clip are not
shared the way copies of a photo are (each is computed); then `-cNNNNN` for chunk N, `-clip` for the
assemble. Kept free of numpy and PyAV: the watcher imports it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from depthq.clip_sidecar import DEPTH_FOLDER_SUFFIX, PREVIEW_SUFFIX
from depthq.contract import PayloadError, job_id, output_base, output_path, safe_relative

ClipPartKind = Literal["chunk", "assemble", "refused"]
PARTS: tuple[ClipPartKind, ...] = ("chunk", "assemble", "refused")
# The record a chunk job writes last in the staging folder: its presence says the chunk's frames are staged.
CHUNK_RECORD = "chunk-{:05d}.json"
# A staged frame: its depth at its own focal length, float32 .npy, numbered as the output files are.
STAGED_FRAME = "{:06d}.npy"
# The staging folder's name: hidden (the watcher and the gallery pass dot-names by), one per clip version.
STAGING_MARK = ".chunks-"
# The end of a clip's assemble job's id; its chunk jobs' ids end in -cNNNNN.
_ASSEMBLE_SUFFIX = "-clip"


def upright_size(width: int, height: int, rotation: int) -> tuple[int, int]:
    """(width, height) in pixels of a stored frame once turned by `rotation` degrees: what the depth maps
    and the preview are."""
    return (height, width) if rotation in (90, 270) else (width, height)


@dataclass(frozen=True)
class ClipPart:
    """Which part of a clip a job is, and the clip as the producer probed it.

    `index` is the chunk's number from 0 (the assemble's and a refusal's is 0); `start` the clip's
    display index of the chunk's first frame and `count` how many frames it computes (every
    `every_nth`-th from `start`). `chunks` and `frames` are the clip's chunk count and computed frames.
    `width` x `height` are the stored frame's pixels and `rotation` the degrees that stand it upright;
    `fps` the exact rate "num/den"; `focal_35mm` the container's 35 mm equivalent in mm, or None.
    `message` is a refusal's reason (part "refused" only).
    """

    part: ClipPartKind
    index: int
    start: int
    count: int
    chunks: int
    frames: int
    every_nth: int
    width: int
    height: int
    rotation: int
    fps: str
    frame_count: int
    frame_count_exact: bool
    focal_35mm: float | None = None
    message: str | None = None
    # The redis transport sends a chunk its own slice of the clip (`producer.clip_slicer`), whose frame 0
    # is the clip's frame `offset`, shown at `offset_time_s`; 0 where the worker reads the whole clip.
    offset: int = 0
    offset_time_s: float = 0.0

    @property
    def frame_rate(self) -> Fraction:
        return Fraction(self.fps)

    @property
    def upright_width(self) -> int:
        return upright_size(self.width, self.height, self.rotation)[0]

    @property
    def upright_height(self) -> int:
        return upright_size(self.width, self.height, self.rotation)[1]

    @property
    def last(self) -> int:
        """The clip's display index of this chunk's last frame."""
        return self.start + (max(self.count, 1) - 1) * self.every_nth

    @property
    def first_number(self) -> int:
        """The output number (from 1) of this chunk's first frame."""
        return self.start // self.every_nth + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ClipPart:
        """A payload's `clip`, checked as strictly as the rest of the payload (`PayloadError`)."""
        if not isinstance(data, dict):
            raise PayloadError(f"a clip job's `clip` must be an object, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise PayloadError(f"a clip job's `clip` has unknown fields {sorted(unknown)}")
        try:
            part = cls(**data)
        except TypeError as exc:
            raise PayloadError(f"a clip job's `clip` is incomplete: {exc}") from None
        ints = (part.index, part.start, part.count, part.chunks, part.frames, part.every_nth, part.frame_count)
        if part.part not in PARTS or any(not isinstance(v, int) or v < 0 for v in ints):
            raise PayloadError(f"a clip job's `clip` is not a part of a clip: {data}")
        try:
            rate = Fraction(part.fps)
        except (TypeError, ValueError, ZeroDivisionError):
            raise PayloadError(f"a clip job's fps {part.fps!r} is not a rate num/den") from None
        if part.part != "refused" and (
            part.every_nth < 1 or part.chunks < 1 or rate <= 0 or part.rotation not in (0, 90, 180, 270)
        ):
            raise PayloadError(f"a clip job's `clip` is not a part of a clip: {data}")
        return part


# The redis transport: a result's file kinds for a clip. A staged file (a frame's depth, a chunk's
# record) is "staged:<first 12 hex digits of the clip's sha256>:<name in the staging folder>"; the
# assemble job's request to the collector is ASSEMBLE_KIND.
STAGED_PREFIX = "staged:"
ASSEMBLE_KIND = "assemble"


def staged_kind(sha256: str, name: str) -> str:
    return f"{STAGED_PREFIX}{sha256[:12]}:{name}"


def parse_staged_kind(kind: str) -> tuple[str, str] | None:
    """(sha256 prefix, name) of a staged file's kind; None for any other kind, or a name that would
    leave the staging folder."""
    if not kind.startswith(STAGED_PREFIX):
        return None
    sha, _, name = kind[len(STAGED_PREFIX) :].partition(":")
    ok = len(sha) == 12 and all(c in "0123456789abcdef" for c in sha)
    if not ok or not name or "/" in name or name.startswith(".") or not name.endswith((".npy", ".json")):
        return None
    return sha, name


def source_tag(source: str) -> str:
    """The 8 hex digits that stand for a clip's name in its job ids."""
    return hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def describe(source: str, part: ClipPart) -> str:
    """A clip's job as rq-dashboard's job list and page and a worker's log name it: the clip, and which
    part of it. Frames are the clip's own, from 0: "walk.mp4: chunk 2/5, frames 16-31"."""
    if part.part == "chunk":
        step = f" step {part.every_nth}" if part.every_nth > 1 else ""
        return f"{source}: chunk {part.index + 1}/{part.chunks}, frames {part.start}-{part.last}{step}"
    if part.part == "assemble":
        return f"{source}: assemble {part.chunks} chunk(s), {part.frames} frames"
    return f"{source}: refused by the producer"


def clip_job_base(sha256: str, model: str, source: str) -> str:
    """The id every job of this clip version starts with: content and model, as a photo's, and its name."""
    return f"{job_id(sha256, model)}-{source_tag(source)}"


def chunk_job_id(base: str, index: int) -> str:
    return f"{base}-c{index:05d}"


def assemble_job_id(base: str) -> str:
    return f"{base}{_ASSEMBLE_SUFFIX}"


def is_clip_job(jid: str) -> bool:
    """Whether a job id is one of a clip's (for the views that show chunks: status, dashboard)."""
    return is_assemble_job(jid) or (len(jid) > 7 and jid[-7:-5] == "-c" and jid[-5:].isdigit())


def is_assemble_job(jid: str) -> bool:
    """Whether a job id is a clip's assemble job (or the producer's refusal, which takes its id)."""
    return jid.endswith(_ASSEMBLE_SUFFIX)


def chunk_job_ids(assemble_id: str, chunks: int) -> list[str]:
    """The chunk jobs an assemble job waits on, in order: what `producer.clip_enqueue` named them."""
    base = assemble_id.removesuffix(_ASSEMBLE_SUFFIX)
    return [chunk_job_id(base, index) for index in range(chunks)]


def computed_frames(frame_count: int, every_nth: int) -> int:
    """How many frames a clip of `frame_count` gives with every n-th computed: frames 0, n, 2n, ..."""
    return math.ceil(frame_count / every_nth)


def plan_chunks(frame_count: int, every_nth: int, chunk_frames: int) -> list[tuple[int, int]]:
    """(start display index, computed frames) of each chunk, in order, covering the whole clip."""
    frames = computed_frames(frame_count, every_nth)
    return [(first * every_nth, min(chunk_frames, frames - first)) for first in range(0, frames, chunk_frames)]


def depth_folder(output_root: Path, source: str) -> Path:
    """`<clip>.depth/`: the clip's depth files, `%06d.exr` (or `.npy`) from 000001."""
    rel = safe_relative(source)
    return output_root.joinpath(*rel.parts[:-1], output_base(rel.name) + DEPTH_FOLDER_SUFFIX)


def preview_path(output_root: Path, source: str) -> Path:
    """`<clip>.preview.mp4`."""
    rel = safe_relative(source)
    return output_root.joinpath(*rel.parts[:-1], output_base(rel.name) + PREVIEW_SUFFIX)


def staging_folder(output_root: Path, source: str, sha256: str) -> Path:
    """Where one version of a clip (by content) stages its chunks until the assemble: hidden, beside the
    outputs, so no reader takes a staged frame for a result."""
    sidecar = output_path(output_root, source, "json")
    return sidecar.parent / f".{output_base(safe_relative(source).name)}{STAGING_MARK}{sha256[:12]}"


def is_staging_name(name: str) -> bool:
    """Whether a name in the output tree is a clip's staging folder (for the audit)."""
    return name.startswith(".") and STAGING_MARK in name


def staging_parts(name: str) -> tuple[str, str] | None:
    """A staging folder's name taken apart: (the clip's output base, the first 12 hex digits of the
    content's sha256), or None for another name."""
    if not is_staging_name(name):
        return None
    base, _, sha12 = name[1:].rpartition(STAGING_MARK)
    return (base, sha12) if base and len(sha12) == 12 else None


def staging_key(jid: str) -> tuple[str, str] | None:
    """(content's sha256 to 12 hex digits, name tag) of a clip's job: the staging folder it writes to,
    whatever the model (the folder's name has none). None for a photo's job."""
    if not is_clip_job(jid):
        return None
    parts = jid.split("-")
    return (parts[0][:12], parts[2]) if len(parts) == 4 else None
