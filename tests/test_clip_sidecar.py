"""depthq/clip_sidecar.py: a video clip's `<clip>.json`, made one way, read back leniently, never a photo's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from depthq.camera import pinhole
from depthq.clip_sidecar import NO_FOV_METADATA_FOCAL, NO_FOV_NO_FOCAL, ClipSidecar, FrameDepth
from depthq.contract import finished_kind, output_path, source_stamp
from depthq.files import atomic_bytes, json_bytes
from depthq.sidecar import Sidecar

REPO = Path(__file__).resolve().parents[1]
# The order a clip's sidecar is written in: readers and diffs see the same file every time.
KEYS = [
    "kind",
    "source",
    "sha256",
    "source_stat",
    "width",
    "height",
    "rotation",
    "fps",
    "fps_exact",
    "frame_count",
    "frame_count_exact",
    "every_nth",
    "frames_computed",
    "fov_deg",
    "fov_vertical_deg",
    "focal_length_px",
    "focal_length_source",
    "focal_length_35mm",
    "frame_fov_deg",
    "frame_fov_spread",
    "camera",
    "depth",
    "preview",
    "model",
    "workers",
    "warnings",
    "timings_ms",
    "frame_timings_ms",
    "job_id",
    "created_at",
]


def _assemble(**changes: Any) -> ClipSidecar:
    """A portrait iPhone clip at 29.97 frames/s, every 2nd of its 7 frames computed by two workers."""
    values: dict[str, Any] = {
        "source": "day/IMG_0001.MOV",
        "sha256": "cd" * 32,
        "stamp": {"size": 1000, "mtime": 1700000000},
        "width": 36,
        "height": 64,
        "rotation": 270,
        "fps": Fraction(30000, 1001),
        "frame_count": 7,
        "frame_count_exact": True,
        "every_nth": 2,
        "focal_length_px": 30.0,
        "focal_length_source": "median of frames' FOV",
        "focal_length_35mm": None,
        "fov_deg": 61.9,
        "fov_vertical_deg": 93.6,
        "frame_fov_deg": [61.0, None, 62.0, 63.5],
        "frame_fov_spread": {"frames": 3, "median_deg": 62.0, "min_deg": 61.0, "max_deg": 63.5, "iqr_deg": 1.25},
        "frame_depth": [
            FrameDepth(1.0, 9.0, 3.0),
            FrameDepth(0.5, 8.0, 2.0),
            FrameDepth(2.0, 12.0, 4.0),
            FrameDepth(1.5, 7.0, 5.0),
        ],
        "depth_format": "exr",
        "model": {"name": "DepthPro", "backend": "torch", "device": "cuda"},
        "workers": [("gpu-b", "w1", 2), ("gpu-a", "w0", 1), ("gpu-b", "w1", 1)],
        "chunk_timings_ms": [
            {"queue_wait": 5.0, "decode": 4.0, "inference": 100.0, "postprocess": 8.0, "write": 2.0},
            {"queue_wait": 15.0, "decode": 4.0, "inference": 100.0, "postprocess": 8.0, "write": 2.0, "total": 9.0},
        ],
        "assemble_ms": 50.0,
        "total_ms": 400.0,
        "job_id": "clip-job-1",
    }
    values.update(changes)
    return ClipSidecar.assemble(**values)


def test_what_is_assembled_is_written_in_order_and_reads_back_the_same() -> None:
    sidecar = _assemble()
    written = sidecar.to_dict()
    assert list(written) == [k for k in KEYS if k != "warnings"]  # only when there are any
    again = ClipSidecar.from_dict(json.loads(json_bytes(written)))  # allow_nan=False: JSON-safe
    assert again == sidecar
    assert again is not None and again.frame_rate == Fraction(30000, 1001)
    assert written["kind"] == "clip" and written["fps_exact"] == "30000/1001"
    assert written["fps"] == pytest.approx(29.97, abs=1e-3)
    assert written["frames_computed"] == 4 and written["frame_fov_deg"] == [61.0, None, 62.0, 63.5]
    assert written["camera"] == pinhole(30.0, 36, 64).to_dict()
    # min and max over every frame; the median is the median of the frames' medians.
    assert written["depth"] == {
        "unit": "m",
        "min": 0.5,
        "max": 12.0,
        "median": 3.5,
        "folder": "IMG_0001.MOV.depth",
        "files": "%06d.exr",
        "format": "exr",
    }
    assert written["preview"] == "IMG_0001.MOV.preview.mp4"
    assert written["workers"] == [
        {"host": "gpu-a", "name": "w0", "frames": 1},
        {"host": "gpu-b", "name": "w1", "frames": 3},
    ]
    # Stage times summed over the chunk jobs (a chunk's own `total` is not a stage), per-frame means of the work.
    assert written["timings_ms"] == {
        "queue_wait": 20.0,
        "decode": 8.0,
        "inference": 200.0,
        "postprocess": 16.0,
        "write": 4.0,
        "assemble": 50.0,
        "total": 400.0,
    }
    assert written["frame_timings_ms"] == {"decode": 2.0, "inference": 50.0, "postprocess": 4.0, "write": 1.0}
    warned = _assemble(warnings=["the clip ended after frame 5; frame 6 was not computed"]).to_dict()
    assert list(warned) == KEYS and warned["warnings"] == ["the clip ended after frame 5; frame 6 was not computed"]


def test_a_long_clip_name_gives_its_outputs_the_photos_shortened_name() -> None:
    long_name = "v" * 240 + ".mov"
    written = _assemble(source=long_name, depth_format="npy").to_dict()
    assert written["source"] == long_name
    assert written["depth"]["folder"].endswith(".mov.depth") and "~" in written["depth"]["folder"]
    assert written["preview"].endswith(".mov.preview.mp4") and len(written["preview"].encode()) < 255
    assert written["depth"]["files"] == "%06d.npy" and written["depth"]["format"] == "npy"


def test_a_hand_edited_clip_sidecar_reads_leniently() -> None:
    """Wrong types and non-finite numbers read as None (or are left out), never as a crash or a NaN."""
    odd = ClipSidecar.from_dict(
        {
            "kind": "clip",
            "source": "a.mov",
            "width": "wide",
            "height": True,
            "rotation": 45,
            "fps": math.nan,
            "fps_exact": "30000/0",
            "frame_count": -3,
            "frame_count_exact": "yes",
            "frame_fov_deg": [60.0, "x", math.inf, None],
            "frame_fov_spread": {"frames": 3, "median_deg": math.nan},
            "camera": {"model": "pinhole", "fx": math.nan},
            "depth": {"unit": "m", "min": "0", "max": math.inf, "median": 2.0, "folder": 7},
            "workers": [{"host": "h", "name": 1, "frames": 2.5}, "w"],
            "timings_ms": {"total": math.nan, "decode": 4.0},
            "warnings": [1, "w"],
        }
    )
    assert odd is not None
    assert (odd.width, odd.height, odd.rotation, odd.fps, odd.fps_exact) == (None, None, None, None, None)
    assert (odd.frame_count, odd.frame_count_exact, odd.frame_rate) == (None, None, None)
    assert odd.frame_fov_deg == (60.0, None, None, None)  # positions kept: entry k is depth file k + 1
    assert (odd.frame_fov_spread, odd.camera) == (None, None)
    assert odd.depth == {"unit": "m", "median": 2.0}
    assert odd.workers == ({"host": "h", "name": None, "frames": None},)
    assert (odd.timings_ms, odd.warnings) == ({"decode": 4.0}, ("w",))
    assert ClipSidecar.from_dict([1]) is None and ClipSidecar.from_dict({"kind": "clip"}) is None
    named = ClipSidecar.from_dict({"kind": "clip"}, source="by-its-file-name.mov")
    assert named is not None and named.source == "by-its-file-name.mov"


def test_a_model_without_fov_keeps_per_frame_depth_and_says_so() -> None:
    """The hub's meters exports give no FOV: no focal length, no camera, and a warning, unless the clip's
    metadata has a focal length, which is then reported (and the depth still is the model's own)."""
    none = [None, None, None, None]
    alone = _assemble(
        focal_length_px=None,
        focal_length_source=None,
        fov_deg=None,
        fov_vertical_deg=None,
        frame_fov_deg=none,
        frame_fov_spread=None,
    ).to_dict()
    assert (alone["focal_length_px"], alone["focal_length_source"], alone["camera"]) == (None, None, None)
    assert (alone["fov_deg"], alone["frame_fov_spread"], alone["frame_fov_deg"]) == (None, None, none)
    assert alone["warnings"] == [NO_FOV_NO_FOCAL]
    assert NO_FOV_NO_FOCAL.startswith("per-frame depth: the model gives no FOV")
    assert ClipSidecar.from_dict(json.loads(json_bytes(alone))) is not None

    metadata = _assemble(
        focal_length_source="metadata", focal_length_35mm=26.0, frame_fov_deg=none, frame_fov_spread=None
    ).to_dict()
    assert metadata["focal_length_source"] == "metadata" and metadata["camera"] is not None
    assert metadata["focal_length_35mm"] == 26.0 and metadata["warnings"] == [NO_FOV_METADATA_FOCAL]
    assert "warnings" not in _assemble(focal_length_source="metadata", focal_length_35mm=26.0).to_dict()


def test_the_workers_clip_focal_fits_the_builder_as_plain_values() -> None:
    """What `worker.clip_camera` chooses goes in as floats and a dict, so depthq imports nothing of it."""
    from worker.clip_camera import clip_focal_px

    for fovs, focal_35mm in (([61.0, None, 62.0, 63.5], None), ([61.0, None, 62.0, 63.5], 26.0), ([None] * 4, None)):
        clip = clip_focal_px(36, 64, fovs, focal_35mm)
        written = _assemble(
            focal_length_px=clip.f_px,
            focal_length_source=clip.source,
            focal_length_35mm=focal_35mm,
            fov_deg=clip.fov_deg,
            fov_vertical_deg=clip.fov_vertical_deg,
            frame_fov_deg=clip.frame_fov_deg,
            frame_fov_spread=None if clip.spread is None else asdict(clip.spread),
        ).to_dict()
        assert (written["focal_length_px"], written["focal_length_source"]) == (clip.f_px, clip.source)
        assert written["frame_fov_spread"] == (None if clip.spread is None else asdict(clip.spread))
        assert ("warnings" in written) == (clip.spread is None)


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"frame_fov_deg": [61.0]}, "must align"),
        ({"frame_depth": []}, "at least one computed frame"),
        ({"frame_depth": [FrameDepth(1.0, math.nan, 2.0)] * 4}, "not a finite number"),
        ({"focal_length_source": None}, "no source"),
        ({"focal_length_source": "exif"}, "none of"),
        ({"frame_fov_deg": [None] * 4}, "no frame has an estimate"),
        ({"rotation": 45}, "geometry"),
        ({"depth_format": "tiff"}, "not 'tiff'"),
    ],
)
def test_assemble_refuses_what_is_no_clips_result(changes: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        _assemble(**changes)


def test_no_photo_reader_takes_a_clip_sidecar_for_a_photos_nor_the_reverse() -> None:
    clip = _assemble().to_dict()
    assert Sidecar.from_dict(clip) is None
    assert Sidecar.from_dict(clip, source="day/IMG_0001.MOV") is None
    photo = {k: v for k, v in clip.items() if k != "kind"}
    assert Sidecar.from_dict(photo) is not None
    assert ClipSidecar.from_dict(photo) is None


def test_a_clip_is_done_when_its_sidecar_records_exactly_this_file(tmp_path: Path) -> None:
    """`finished_kind` reads only `source_stat` from `<clip>.json`: a clip is judged done as a photo is."""
    watched, output = tmp_path / "in", tmp_path / "out"
    clip = watched / "day" / "IMG_0001.MOV"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"\0" * 1000)
    os.utime(clip, (1700000000, 1700000000))
    st = clip.stat()
    assert finished_kind(output, "day/IMG_0001.MOV", st) is None
    path = output_path(output, "day/IMG_0001.MOV", "json")
    assert path == output / "day" / "IMG_0001.MOV.json"
    path.parent.mkdir(parents=True)
    atomic_bytes(path, json_bytes(_assemble(stamp=source_stamp(st)).to_dict()))
    assert finished_kind(output, "day/IMG_0001.MOV", st) == "json"
    os.utime(clip, (1700000100, 1700000100))  # replaced by another clip of the same size
    assert finished_kind(output, "day/IMG_0001.MOV", clip.stat()) is None


def test_the_clip_sidecar_loads_no_numpy_av_or_worker() -> None:
    """depthq/ is shared with the watcher and the dashboard, which never load numpy or the worker."""
    probe = (
        "import sys, depthq.clip_sidecar\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('numpy', 'av', 'torch', 'coremltools', 'worker', 'producer'))) or 'none')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "none"
