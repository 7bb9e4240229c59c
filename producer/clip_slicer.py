"""Cut one chunk job's share out of a video clip, still compressed, for the redis transport (issue 25).

Over redis the workers share no disk, so the watcher sends each chunk its own frames, never the whole
clip. It sends them losslessly by construction: the clip's own compressed packets, remuxed (stream copy)
into a small standalone container, never decoded and re-encoded. The model therefore sees exactly the
pixels it would have seen decoding the whole clip, and the watcher host never decodes a frame (it runs
here, so PyAV packets only: nothing loads numpy).

Which packets: from the keyframe the worker's own seek lands on for the chunk's first frame (the same
seek as `worker.clip_frames`, so both sides start at the same keyframe), through the last packet, in
decoding order, whose frame is one of the chunk's, or lies between them. Every frame the decoder needs
for those comes before it in decoding order, so nothing after it is sent. To know which packet is that
last one with B-frames (a frame shown before another but decoded after it), the slicer reads on, without
sending, to the next keyframe past the chunk, and through the leading pictures an open GOP puts after it;
so it reads at most one GOP more than it sends. What a chunk costs beyond its own frames is the frames
between the keyframe and its first frame (on average half a GOP: that is the codec's, any seek pays it),
and the container's few hundred bytes.

The slice cannot keep the clip's numbering by itself: FFmpeg's demuxers start a video stream's clock at
its first frame (a QuickTime edit list is read that way too), so decoded alone the slice numbers its
keyframe 0. Hence the small header on `SlicedChunk`: `first_index` and `first_time_s` say where the
slice's frame 0 is in the clip. A worker decodes `chunk_frames(data, start - first_index, count,
every_nth)` and adds them back. The slicer checks, packet by packet, that this numbering is the clip's
(same timestamps, same frame rate reading); a clip where it is not (a variable frame rate the short slice
reads differently) is refused with a ClipError rather than sent with frames misnumbered.

Audio, subtitles and other streams are dropped: the worker reads the video only.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
from av.container import InputContainer
from av.packet import Packet
from av.video.stream import VideoStream

from depthq.clips import FrameClock, video_stream
from producer.clip_probe import FIX_EXPORT, ClipError, ffmpeg_refusal

_FIX_REMUX = "re-encode it at a constant frame rate (ffmpeg -i CLIP -fps_mode cfr OUT.mp4)"


@dataclass(frozen=True)
class SlicedChunk:
    """One chunk's packets, in a standalone container, and where they sit in the clip.

    `data` is a QuickTime file for a QuickTime/MP4 clip (its time base kept) and Matroska otherwise.
    Decoded on its own it numbers its first frame (its keyframe) 0 at time 0; that frame is the clip's
    display index `first_index`, shown at `first_time_s` seconds from the clip's first frame. So frame
    `i` of the slice is frame `first_index + i` of the clip, shown at `first_time_s + time` seconds.
    `packets` and `packet_bytes` are the compressed frames it carries (the rest of `data` is container)."""

    data: bytes
    first_index: int
    first_time_s: float
    packets: int
    packet_bytes: int


def slice_chunk(path: Path | str, start: int, count: int, every_nth: int = 1) -> SlicedChunk:
    """The packets a decoder needs for frames start, start + every_nth, ... (`count` of them) of the
    clip at `path`, remuxed without decoding. A chunk reaching past the clip's end gets what the clip
    has (the worker reports the shortfall, as it would decoding the clip itself).

    Raises ClipError, naming the file, for a clip whose packets cannot be read or whose slice would not
    keep its numbering; a file gone or unreadable raises its OSError (the folder's state, not the clip's)."""
    if start < 0 or count < 1 or every_nth < 1:
        raise ValueError(f"a chunk needs start >= 0, count >= 1, every_nth >= 1; got {start}, {count}, {every_nth}")
    path = Path(path)
    last = start + (count - 1) * every_nth
    try:
        with av.open(str(path), metadata_errors="replace") as container:
            stream = _video_stream(container, path)
            clock = _clock(stream, path)
            packets = _chunk_packets(container, stream, clock, start, last, path)
            # Read before muxing: mux() rebases a packet's timestamps to the slice's time base.
            stamps = [p.pts for p in packets]
            packet_bytes = sum(p.size for p in packets)
            data = _remux(container, stream, packets)
    except av.error.FFmpegError as exc:
        raise ffmpeg_refusal(
            path, f"read its packets for frames {start} to {last}", "damaged or cut short", exc
        ) from None
    first_pts = min(stamps)
    first_index = clock.index(first_pts)
    _check_numbering(data, stamps, clock, first_index, path)
    return SlicedChunk(
        data=data,
        first_index=first_index,
        first_time_s=float(clock.seconds(first_pts)),
        packets=len(stamps),
        packet_bytes=packet_bytes,
    )


def _clock(stream: VideoStream, path: Path) -> FrameClock:
    """How the worker numbers the stream's frames (`depthq.clips.FrameClock`)."""
    clock = FrameClock.of(stream)
    if clock is None:
        raise ClipError(f"{path}: its frame rate is unknown; {_FIX_REMUX}")
    return clock


def _video_stream(container: InputContainer, path: Path) -> VideoStream:
    """The video stream the worker decodes (`depthq.clips.video_stream`)."""
    stream = video_stream(container)
    if stream is None:
        raise ClipError(f"{path}: has no video stream; {FIX_EXPORT}")
    return stream


def _chunk_packets(
    container: InputContainer, stream: VideoStream, clock: FrameClock, start: int, last: int, path: Path
) -> list[Packet]:
    """The packets, in decoding order, from the keyframe the worker's seek lands on through the last one
    whose frame is at most `last`. The ones read past that are held, not sent, until the read ends: at
    the next keyframe past `last`, once a packet after it is also past it (an open GOP's leading
    pictures, decoded after that keyframe but shown before it, may still be the chunk's)."""
    if start > 0:
        container.seek(clock.seek_target(start), backward=True, any_frame=False, stream=stream)
    sent: list[Packet] = []
    held: list[Packet] = []
    next_key: int | None = None  # the index of the keyframe past the chunk, once read
    for packet in _packets(container, stream):
        if packet.pts is None:
            raise ClipError(f"{path}: a packet after frame {start} has no timestamp; {_FIX_REMUX}")
        if not sent and not packet.is_keyframe:
            continue  # the decoder would show nothing before the keyframe
        index = clock.index(packet.pts)
        if next_key is not None and index > next_key:
            break
        if packet.is_keyframe and index > last and next_key is None:
            next_key = index
        if index <= last:
            sent += held
            sent.append(packet)
            held = []
        else:
            held.append(packet)
    if not sent:
        raise ClipError(f"{path}: has no video packet from frame {start} on; {FIX_EXPORT}")
    return sent


def _packets(container: InputContainer, stream: VideoStream) -> Iterator[Packet]:
    """The stream's packets, less the empty one demux() ends with (a decoder's flush, not a frame)."""
    for packet in container.demux(stream):
        if packet.size:
            yield packet


def _remux(container: InputContainer, stream: VideoStream, packets: list[Packet]) -> bytes:
    """The packets, unchanged (timestamps, codec extradata and display matrix kept), in a container of
    the clip's own kind where that keeps its time base: QuickTime for QuickTime, else Matroska."""
    kind = "mov" if "mov" in container.format.name.split(",") else "matroska"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=kind) as out:
        copy = out.add_stream_from_template(stream)
        for packet in packets:
            packet.stream = copy
            out.mux(packet)
    return buffer.getvalue()


def _check_numbering(data: bytes, stamps: list[int], clock: FrameClock, first_index: int, path: Path) -> None:
    """Refuse a slice whose frames the worker would number differently from the clip's. Reads the slice's
    packets back (no decoding): each must be shown at the same moment, and the slice's own numbering,
    offset by `first_index`, must give it the clip's index."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        own = _clock(stream, path)
        back = [p.pts for p in _packets(container, stream)]
    first = min(stamps)
    for stamp, pts in zip(stamps, back, strict=False):
        same_time = pts is not None and own.seconds(pts) == clock.seconds(stamp) - clock.seconds(first)
        if not same_time or first_index + own.index(pts) != clock.index(stamp):
            raise ClipError(
                f"{path}: a slice of it would misnumber frame {clock.index(stamp)} (its frame rate, "
                f"{float(clock.fps):g} on average, is read as {float(own.fps):g} in a short slice: a variable "
                f"frame rate); {_FIX_REMUX}"
            )
    if len(back) != len(stamps):
        raise ClipError(f"{path}: its slice reads back {len(back)} of {len(stamps)} packets; {_FIX_REMUX}")
