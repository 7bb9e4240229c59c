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

from collections.abc import Callable
from dataclasses import dataclass, field
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
_WIDTH_INPUT_NAMES = {"originalwidth", "originalwidths"}
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
    # The spec's user-defined metadata (depthq's conversions record source and compression there).
    metadata: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def metric(self) -> bool:
        return self.kind != "normalized_inverse_depth"

    @property
    def label(self) -> str:
        """What a user is told the model gives, in `depthq models list`."""
        if self.kind == "canonical":
            if self.fov_output:
                return "canonical inverse depth + FOV: full metric"
            return "canonical inverse depth, no FOV"
        if self.kind == "meters":
            return "meters + FOV" if self.fov_output else "meters, no FOV"
        return "normalized inverse depth: relative only, refused for meters"


def _elements(feature: FeatureInfo) -> int:
    """How many numbers the feature holds; 0 when the spec leaves its shape open."""
    count = 1
    for dim in feature.shape:
        count *= dim
    return count if feature.shape else 0


def _is_map(feature: FeatureInfo) -> bool:
    """A depth map: at least two dimensions, the last two larger than 1, one channel at most."""
    shape = feature.shape
    return len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1 and _elements(feature) == shape[-1] * shape[-2]


def _may_be(feature: FeatureInfo, test: Callable[[FeatureInfo], bool]) -> bool:
    """A named feature must have the shape its name implies, where the spec gives one at all."""
    return not feature.shape or test(feature)


def _listing(inputs: list[FeatureInfo], outputs: list[FeatureInfo]) -> str:
    return f"inputs [{'; '.join(map(str, inputs))}], outputs [{'; '.join(map(str, outputs))}]"


def detect_contract(spec: Any, source: str) -> CoreMLContract:
    """Read the I/O of a Core ML spec. Raises ModelUnavailableError naming `source` if it is no DepthPro.

    Names are matched first, in every spelling the published exports use (`image` / `pixel_values`,
    `originalWidth` / `original_widths`, `depthMeters` / `depth_meters`, `normalizedInverseDepth` /
    `normalized_inverse_depth`, ...), and each match must have the shape its meaning implies. Where
    the names say nothing, the shapes decide: a map beside a single number is DepthPro's raw pair,
    canonical inverse depth and FOV. Anything else is refused with the spec's whole I/O, so the user
    can see what the model is.
    """
    inputs = [feature_info(f) for f in spec.description.input]
    outputs = [feature_info(f) for f in spec.description.output]

    def refuse(why: str) -> ModelUnavailableError:
        return ModelUnavailableError(
            f"{source}: {why}; its spec has {_listing(inputs, outputs)}. depthq runs DepthPro exports that "
            "output canonical inverse depth (+ FOV) or meters; `depthq models convert` makes one"
        )

    pictures = [f for f in inputs if len(f.shape) == 4 and f.shape[:2] == (1, 3)]
    if len(pictures) != 1:
        raise refuse("no single RGB input (1 x 3 x H x W)" if not pictures else "more than one RGB input")
    picture = pictures[0]
    _, _, height, width = picture.shape
    if height != width:
        raise refuse(f"input {picture.name} is {width}x{height}, and DepthPro takes a square")
    others = [f for f in inputs if f is not picture]
    widths = [f for f in others if _elements(f) == 1 or (_key(f.name) in _WIDTH_INPUT_NAMES and not f.shape)]
    if len(others) > 1 or len(widths) != len(others):
        raise refuse("an input depthq cannot feed (only the photo and its width are known)")
    width_input = widths[0] if widths else None

    by_key = {_key(f.name): f for f in outputs}
    fovs = [f for k, f in by_key.items() if k in _FOV_NAMES and _may_be(f, lambda f: _elements(f) == 1)]
    found = [
        (f, kind)
        for names, kind in (
            (_CANONICAL_NAMES, "canonical"),
            (_METERS_NAMES, "meters"),
            (_NORMALIZED_NAMES, "normalized_inverse_depth"),
        )
        for k, f in by_key.items()
        if k in names
    ]
    if found and not _may_be(found[0][0], _is_map):
        raise refuse(f"output {found[0][0].name} is named as depth but is no depth map")
    if not found:
        maps = [f for f in outputs if _is_map(f)]
        scalars = [f for f in outputs if _elements(f) == 1]
        if len(maps) == 1 and len(scalars) == 1 and len(outputs) == 2:
            found, fovs = [(maps[0], "canonical")], scalars
        else:
            raise refuse("no output is named as depth, and the shapes are not DepthPro's map and FOV")
    depth, kind = found[0]
    fov = fovs[0] if fovs else None
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
        depth_output=depth.name,
        fov_output=fov.name if fov else None,
        width_input=width_input.name if width_input else None,
        metadata=dict(spec.description.metadata.userDefined),
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
