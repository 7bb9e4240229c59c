"""depthq/sidecar.py: the one type every side writes and reads a result's sidecar through."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

from depthq.camera import pinhole
from depthq.sidecar import Sidecar

README = Path(__file__).resolve().parents[1] / "README.md"


def _computed() -> Sidecar:
    return Sidecar(
        source="day/a.jpg",
        sha256="ab" * 32,
        source_stat={"size": 10, "mtime": 20},
        width=64,
        height=48,
        fov_deg=60.0,
        fov_vertical_deg=46.8,
        focal_length_px=55.4,
        focal_length_source="model",
        focal_length_35mm=None,
        fov_model_deg=60.0,
        camera=pinhole(55.4, 64, 48),
        depth={"unit": "m", "min": 1.0, "max": 9.0, "median": 3.0},
        model={"name": "DepthPro", "backend": "torch", "device": "cpu"},
        worker={"host": "h", "name": "w"},
    )


def test_the_written_keys_are_readmes_output_section_key_for_key() -> None:
    """Every key a sidecar is written with is documented in README's Output section."""
    copy = _computed().for_photo("day/b.jpg", "job-1", {"total": 1.0}, {"size": 10, "mtime": 21}, "day/a.jpg")
    written = copy.to_dict()
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `<file>.json` |"))
    documented = set(re.findall(r"`([a-z_0-9]+)`", row.split("|")[2]))
    assert set(written) <= documented, set(written) - documented
    assert written["source"] == "day/b.jpg" and written["copied_from"] == "day/a.jpg"
    assert written["depth"]["file"] == "b.jpg.depth.npy" and written["source_stat"] == {"size": 10, "mtime": 21}
    assert "warnings" not in written  # only when there are any
    warned = replace(_computed(), warnings=("w",)).for_photo("a.jpg", "j", {}, None).to_dict()
    assert warned["warnings"] == ["w"] and set(warned) <= documented
    assert json.loads(json.dumps(written)) == written


def test_what_is_written_reads_back_the_same() -> None:
    sidecar = _computed().for_photo("day/a.jpg", "job-1", {"total": 1.0}, {"size": 10, "mtime": 20})
    again = Sidecar.from_dict(json.loads(json.dumps(sidecar.to_dict())))
    assert again == sidecar
    assert again is not None and again.camera == pinhole(55.4, 64, 48) and again.copied_from is None


def test_a_hand_edited_sidecar_reads_leniently() -> None:
    """Wrong types and non-finite numbers read as None, never as a crash or a NaN for the browser."""
    odd = Sidecar.from_dict(
        {"source": "x.jpg", "width": "wide", "height": True, "fov_deg": math.nan, "depth": [], "warnings": [1, "w"]}
    )
    assert odd is not None
    assert (odd.width, odd.height, odd.fov_deg, odd.depth, odd.warnings) == (None, None, None, {}, ("w",))
    assert Sidecar.from_dict([1, 2]) is None and Sidecar.from_dict({"width": 3}) is None
    named = Sidecar.from_dict({"width": 3}, source="by-its-file-name.jpg")
    assert named is not None and named.source == "by-its-file-name.jpg" and named.width == 3


def test_the_model_asked_for_is_the_requested_one_when_another_ran() -> None:
    ran = _computed()
    assert ran.requested_model == "DepthPro"
    other = Sidecar.from_dict({**ran.to_dict(), "model": {"name": "B", "source": "models/b", "requested": "models/a"}})
    assert other is not None and other.requested_model == "models/a"


def test_a_sidecar_of_another_kind_is_no_photos() -> None:
    """A clip's `<clip>.json` sits where a photo's would; no photo reader may take it for a photo's result.
    A photo's sidecar has no `kind`, and a `kind` of the wrong type is read as missing, as any field is."""
    photo = _computed().to_dict()
    assert Sidecar.from_dict({**photo, "kind": "clip"}) is None
    assert Sidecar.from_dict({**photo, "kind": "clip"}, source="day/a.mov") is None
    assert Sidecar.from_dict({**photo, "kind": "photo"}) is not None
    assert Sidecar.from_dict({**photo, "kind": 3}) is not None
