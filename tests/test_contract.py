from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from depthq.contract import (
    JobPayload,
    PayloadError,
    is_finished,
    job_id,
    output_path,
    safe_relative,
    source_stamp,
)


@pytest.mark.parametrize("bad", ["../x.jpg", "/etc/passwd", "a/../../x.jpg", "", "./x.jpg", "a//b.jpg", "a\\b.jpg"])
def test_sources_outside_the_root_are_refused(bad: str) -> None:
    with pytest.raises(PayloadError):
        safe_relative(bad)


def test_output_names_keep_the_full_input_name(tmp_path: Path) -> None:
    assert output_path(tmp_path, "trip/IMG_1.HEIC", "json") == tmp_path / "trip" / "IMG_1.HEIC.json"
    assert output_path(tmp_path, "IMG_1.HEIC", "npy") == tmp_path / "IMG_1.HEIC.depth.npy"
    assert output_path(tmp_path, "IMG_1.HEIC", "preview") == tmp_path / "IMG_1.HEIC.preview.png"
    assert output_path(tmp_path, "IMG_1.HEIC", "error") == tmp_path / "IMG_1.HEIC.error.json"


def test_job_id_depends_on_content_and_model_only() -> None:
    sha = "ab" * 32
    assert job_id(sha, "m1") == job_id(sha, "m1")
    assert job_id(sha, "m1") != job_id(sha, "m2")
    assert job_id(sha, "m1") != job_id("cd" * 32, "m1")


def test_payload_round_trip_and_validation() -> None:
    p = JobPayload(source="a/b.jpg", size=3, mtime=1.5, sha256="00", model="m")
    assert JobPayload.from_dict(p.to_dict()) == p
    with pytest.raises(PayloadError, match="version"):
        JobPayload.from_dict({**p.to_dict(), "v": 99})
    with pytest.raises(PayloadError, match="unknown fields"):
        JobPayload.from_dict({**p.to_dict(), "cmd": "rm -rf"})
    with pytest.raises(PayloadError):
        JobPayload.from_dict({**p.to_dict(), "source": "../../etc/x.jpg"})
    with pytest.raises(PayloadError, match="outputs"):
        JobPayload.from_dict({**p.to_dict(), "outputs": ["exe"]})
    with pytest.raises(PayloadError):
        JobPayload.from_dict(["not", "a", "dict"])


def test_is_finished_means_a_result_recorded_for_exactly_this_file(tmp_path: Path) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"first photo")
    out = tmp_path / "out"
    out.mkdir()
    assert not is_finished(out, "a.jpg", photo.stat())
    output_path(out, "a.jpg", "json").write_text(json.dumps({"source_stat": source_stamp(photo.stat())}))
    assert is_finished(out, "a.jpg", photo.stat())
    # Replaced by another photo that keeps an older mtime (cp -p, rsync): not done.
    old = photo.stat().st_mtime - 3600
    photo.write_bytes(b"another photo!")
    os.utime(photo, (old, old))
    assert not is_finished(out, "a.jpg", photo.stat())
    # A recorded error for this exact file counts as done too (it is not retried on every rescan).
    output_path(out, "a.jpg", "error").write_text(json.dumps({"source_stat": source_stamp(photo.stat())}))
    assert is_finished(out, "a.jpg", photo.stat())
    output_path(out, "a.jpg", "error").write_text("{not json")
    assert not is_finished(out, "a.jpg", photo.stat())
