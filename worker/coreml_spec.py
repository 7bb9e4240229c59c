"""What a Core ML DepthPro says about itself: its inputs and outputs, read from the spec, and what they mean.

Core ML DepthPro exports differ in what they output, so the contract is read from the spec's I/O
names and types, never from a file name:
- canonical inverse depth + FOV (what `depthq models convert` makes): the full metric math, shared
  with the torch backend;
- depth in meters (the hub's DepthPro*.mlpackage): used as given; no FOV, so the focal length comes
  from EXIF or stays unknown;
- normalized inverse depth: relative only, never meters, so refused for metric output.

Reading a spec needs coremltools but no Core ML runtime, so this works on Linux, where `depthq models
list` and the tests read the same contract the Mac's backend acts on. It imports no numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from worker.errors import ModelUnavailableError

# What a model's depth output means; the catalog labels its entries with the same words.
OutputKind = Literal["canonical", "meters", "normalized_inverse_depth"]

MANIFEST = "Manifest.json"

# Output names seen in Core ML DepthPro exports, compared lower-case without underscores.
_CANONICAL_NAMES = {"canonicalinversedepth", "inversedepth"}
_METERS_NAMES = {"depthmeters", "depth", "metricdepth"}
_NORMALIZED_NAMES = {"normalizedinversedepth"}
_FOV_NAMES = {"fovdeg", "fov", "fieldofview", "viewangle"}
_WIDTH_INPUT_NAMES = {"originalwidth"}
_CHANNELS = {"RGB": 3, "BGR": 3, "GRAYSCALE": 1, "GRAYSCALE_FLOAT16": 1}


def _key(name: str) -> str:
    return name.replace("_", "").lower()


@dataclass(frozen=True)
class FeatureInfo:
    """One model input or output as the spec declares it, e.g. image RGB (1, 3, 1536, 1536)."""

    name: str
    type: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.name}: {self.type}" + (f" [{dims}]" if dims else "")

    @property
    def is_image(self) -> bool:
        return self.type.startswith("image")


def feature_info(feature: Any) -> FeatureInfo:
    """One spec feature (a protobuf FeatureDescription) as name, type and shape (N, C, H, W for images)."""
    kind = feature.type.WhichOneof("Type")
    if kind == "imageType":
        image = feature.type.imageType
        color = image.ColorSpace.Name(image.colorSpace)
        shape = (1, _CHANNELS.get(color, 0), int(image.height), int(image.width))
        return FeatureInfo(feature.name, f"image {color}", shape)
    if kind == "multiArrayType":
        array = feature.type.multiArrayType
        dtype = array.ArrayDataType.Name(array.dataType).lower()
        return FeatureInfo(feature.name, f"multiarray {dtype}", tuple(int(d) for d in array.shape))
    return FeatureInfo(feature.name, (kind or "unknown").removesuffix("Type"), ())


@dataclass(frozen=True)
class CoreMLContract:
    """How to talk to one Core ML model: which input takes the picture, which outputs mean what."""

    kind: OutputKind
    image_input: str
    input_is_image: bool
    input_size: int
    depth_output: str
    fov_output: str | None
    width_input: str | None

    @property
    def metric(self) -> bool:
        return self.kind != "normalized_inverse_depth"

    @property
    def label(self) -> str:
        """What a user is told the model gives, in `depthq models list`."""
        if self.kind == "canonical":
            return (
                "canonical inverse depth + FOV: full metric" if self.fov_output else "canonical inverse depth, no FOV"
            )
        if self.kind == "meters":
            return "meters + FOV" if self.fov_output else "meters, no FOV"
        return "normalized inverse depth: relative only, refused for meters"


def detect_contract(spec: Any, source: str) -> CoreMLContract:
    """Read the I/O of a Core ML spec. Raises ModelUnavailableError naming `source` if it is no DepthPro."""
    inputs = [feature_info(f) for f in spec.description.input]
    outputs = {_key(o.name): o.name for o in spec.description.output}
    picture = None
    width_input = None
    for feature in inputs:
        if _key(feature.name) in _WIDTH_INPUT_NAMES:
            width_input = feature.name
        elif len(feature.shape) == 4 and feature.shape[1] == 3 and picture is None:
            picture = feature
    if picture is None:
        names = [f.name for f in inputs]
        raise ModelUnavailableError(f"{source}: no image input (3 x H x W) among inputs {names}; not a DepthPro model")
    _, _, height, width = picture.shape
    if height != width:
        raise ModelUnavailableError(f"{source}: input {picture.name} is {width}x{height}; DepthPro takes a square")
    fov = next((outputs[k] for k in outputs if k in _FOV_NAMES), None)
    found = [
        (k, kind)
        for names, kind in (
            (_CANONICAL_NAMES, "canonical"),
            (_METERS_NAMES, "meters"),
            (_NORMALIZED_NAMES, "normalized_inverse_depth"),
        )
        for k in outputs
        if k in names
    ]
    if not found:
        raise ModelUnavailableError(
            f"{source}: outputs {sorted(outputs.values())} name no depth "
            "(expected canonical_inverse_depth, depthMeters or normalizedInverseDepth)"
        )
    key, kind = found[0]
    if kind == "meters" and fov is not None:
        # Older exports (ml-depth-pro's export scripts) call DepthPro's raw outputs depth_meters and
        # view_angle: a depth output that comes with a FOV is canonical inverse depth, still to be
        # scaled by W / f_px. A model that really outputs meters has no use for a FOV output.
        kind = "canonical"
    return CoreMLContract(
        kind=kind,  # type: ignore[arg-type]
        image_input=picture.name,
        input_is_image=picture.is_image,
        input_size=height,
        depth_output=outputs[key],
        fov_output=fov,
        width_input=width_input,
    )


def read_spec(path: Path) -> Any:
    """The model's protobuf spec; skip_model_load reads it without compiling, so this works on Linux."""
    if path.suffix == ".mlpackage" and not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {path} (an interrupted copy?)")
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def read_contract(path: Path) -> CoreMLContract:
    """The contract of an .mlpackage / .mlmodel, read from its spec (works on Linux too)."""
    if path.suffix == ".mlmodelc":
        raise ModelUnavailableError(
            f"model.coreml_path: {path} is compiled, so its I/O cannot be read; point it at the .mlpackage "
            "(depthq keeps the compiled form in models/.compiled itself)"
        )
    if not path.exists():
        raise ModelUnavailableError(
            f"model.coreml_path: {path} does not exist; run `depthq models download` or `depthq models convert`"
        )
    try:
        spec = read_spec(path)
    except Exception as exc:
        raise ModelUnavailableError(f"model.coreml_path: {path} is not a readable Core ML model ({exc})") from None
    return detect_contract(spec, str(path))
