"""Run a Core ML package's MIL program on the CPU, op by op: what `depthq models check` uses off macOS.

Core ML's runtime exists only on macOS, but the program inside a `.mlpackage` loads anywhere through
coremltools' MIL reader. Executing it shows whether the package computes what the torch model it came
from computes: a lowering that changed an op's meaning (a resize's corner alignment, a conv's padding,
palettized weights decoded wrong) shows as wrong depth here, before any Mac serves it.

How each op runs:
- ops coremltools can evaluate (its `value_inference`, about every op but convolutions and resizes) are
  rebuilt with its public MIL builder on constant inputs, which runs that evaluator;
- `conv`, `conv_transpose`, `crop`, `upsample_bilinear` and the weight-decompression ops
  (`constexpr_lut_to_dense`, `constexpr_affine_dequantize`) are implemented here from the MIL op
  specification, not from coremltools' lowering, so a wrong lowering cannot hide behind itself;
- so is `gelu`, for speed: coremltools evaluates its exact mode with Python's `math.erf` one element
  at a time (`np.vectorize`), which at DepthPro's full size is two billion calls and, per op, an
  object array of 83 million Python floats;
- and `layer_norm` and `softmax`, which reduce over a row: coremltools' evaluators reduce in the
  program's dtype, and a float16 layer_norm's sum of squares overflows to inf once a 1024-wide row's
  spread passes ~8 (trained ViTs have such activations), collapsing the output to beta; here they
  reduce in float32 and round the result, as a GPU's or Neural Engine's normalisation does not overflow;
- an op neither knows stops the run, naming the op and where it is.

Each op runs in the dtype the program declares: a float16 program keeps every value in float16, as
Core ML's GPU and Neural Engine do; the ops that sum many products (conv, conv_transpose, linear,
matmul) accumulate in float32 and round their result to float16, as those units accumulate wider than
they store. `float32=True` runs every op in float32 instead, to tell the program's precision from its
meaning. Values no later op reads are dropped as soon as the op that last reads them ran: at DepthPro's
full size the activations alone would not fit otherwise.

For checking only: the worker never imports this; Linux workers serve with torch.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The ops implemented here rather than by coremltools' evaluators (which have none for them, or, for
# the constexpr ops, decode through the same library whose output is under test).
OWN_OPS = (
    "conv",
    "conv_transpose",
    "crop",
    "upsample_bilinear",
    "constexpr_lut_to_dense",
    "constexpr_affine_dequantize",
    "gelu",
    "layer_norm",
    "softmax",
)
# Ops that sum many products: in a float16 program they take float16 operands and accumulate in float32.
_ACCUMULATING = frozenset({"conv", "conv_transpose", "linear", "matmul"})


class UnknownOpError(RuntimeError):
    """The program holds an op this executor cannot run: nothing was compared."""


@dataclass
class ExecutionStats:
    """What one `predict` did: for the check's report and `bench convert`."""

    ops: int = 0
    seconds: float = 0.0
    # The most bytes the live values (inputs, activations; not the weights) held at once.
    peak_live_bytes: int = 0
    by_source: Counter[str] = field(default_factory=Counter)


def load_program(package: Path) -> tuple[Any, Any]:
    """The package's spec and its MIL program, through coremltools' reader (no Core ML needed)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise UnknownOpError(f"{package}: not an ML program ({spec.WhichOneof('Type')}); only ML programs execute here")
    program = load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    return spec, program


class ProgramExecutor:
    """A package's main function, ready to run on feeds shaped like Core ML's (`MLModel.predict`)."""

    def __init__(self, package: Path, float32: bool = False):
        self.package = Path(package)
        self.float32 = float32
        self.spec, program = load_program(self.package)
        self.function = program.functions["main"]
        self.opset = self.function.opset_version
        self.operations = list(self.function.operations)
        self.output_names = [var.name for var in self.function.outputs]
        # The index of the last op that reads each value: after it, the value is dropped.
        self._last_read: dict[str, int] = {}
        for index, op in enumerate(self.operations):
            for var in _input_vars(op):
                self._last_read[var.name] = index
        for name in self.output_names:
            self._last_read[name] = len(self.operations)
        self._image_inputs = {
            item.name: item.type.imageType for item in self.spec.description.input if item.type.HasField("imageType")
        }
        self.stats = ExecutionStats()

    def op_types(self) -> Counter[str]:
        return Counter(op.op_type for op in self.operations)

    @property
    def precision(self) -> str:
        """float16 when any op of the program computes in float16 (a FLOAT16 conversion), else float32."""
        from coremltools.converters.mil.mil import types

        for op in self.operations:
            if op.op_type != "const" and any(getattr(v, "dtype", None) == types.fp16 for v in op.outputs):
                return "float16"
        return "float32"

    def predict(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the program on `feed` (name -> PIL image or array), returning its outputs by name."""
        started = time.perf_counter()
        stats = ExecutionStats()
        values: dict[str, np.ndarray] = {}
        for name, var in self.function.inputs.items():
            if name not in feed:
                raise KeyError(f"{self.package}: the feed has no input {name!r} (it has {sorted(feed)})")
            values[name] = self._cast(self._input_array(name, feed[name]), var.dtype)
        live = sum(v.nbytes for v in values.values())
        for index, op in enumerate(self.operations):
            if op.op_type == "const":
                continue  # read where used: a weight is never copied into the live values
            try:
                results, source = self._run(op, values)
            except UnknownOpError:
                raise
            except Exception as exc:
                raise RuntimeError(f"{self.package}: op {index} ({op.op_type} {op.name!r}) failed: {exc}") from exc
            stats.ops += 1
            stats.by_source[source] += 1
            for var, value in zip(op.outputs, results, strict=True):
                value = self._cast(np.asarray(value), var.dtype)
                if tuple(value.shape) != tuple(var.shape):
                    raise RuntimeError(
                        f"{self.package}: op {index} ({op.op_type} {op.name!r}) gave shape {value.shape}, "
                        f"the program declares {var.shape}"
                    )
                values[var.name] = value
                live += value.nbytes
            stats.peak_live_bytes = max(stats.peak_live_bytes, live)
            for var in op.outputs:  # an output nothing reads (a split's unused part) goes at once
                if var.name not in self._last_read:
                    live -= values.pop(var.name).nbytes
            for var in _input_vars(op):
                if self._last_read.get(var.name) == index and var.name in values:
                    live -= values.pop(var.name).nbytes
        stats.seconds = time.perf_counter() - started
        self.stats = stats
        return {name: values[name] for name in self.output_names}

    # --- inputs and dtypes -------------------------------------------------------------------------

    def _input_array(self, name: str, value: Any) -> np.ndarray:
        """An image input as Core ML takes it: (1, C, H, W) pixel values 0..255, in the declared order."""
        image_type = self._image_inputs.get(name)
        if image_type is None:
            return np.asarray(value)
        import coremltools as ct

        pixels = np.asarray(value, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if (pixels.shape[1], pixels.shape[0]) != (image_type.width, image_type.height):
            raise ValueError(
                f"{self.package}: input {name!r} takes {image_type.width}x{image_type.height} images, "
                f"not {pixels.shape[1]}x{pixels.shape[0]}"
            )
        if image_type.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.BGR:
            pixels = pixels[:, :, ::-1]
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])

    def _np_dtype(self, dtype: Any) -> Any:
        from coremltools.converters.mil.mil import types

        np_dtype = np.dtype(types.nptype_from_builtin(dtype))
        if self.float32 and np_dtype == np.float16:
            return np.dtype(np.float32)
        return np_dtype

    def _cast(self, value: np.ndarray, dtype: Any) -> np.ndarray:
        want = self._np_dtype(dtype)
        return value if value.dtype == want else value.astype(want)

    def _value(self, var: Any, values: Mapping[str, np.ndarray]) -> Any:
        if var.name in values:
            return _scalar(values[var.name])
        if var.op is not None and var.op.op_type == "const":
            val = var.val
            if isinstance(val, np.ndarray) or np.isscalar(val):
                return _scalar(self._cast(np.asarray(val), var.dtype)) if not isinstance(val, str) else val
            return val
        raise RuntimeError(f"{self.package}: value {var.name!r} is read before any op made it")

    # --- running one op ----------------------------------------------------------------------------

    def _run(self, op: Any, values: Mapping[str, np.ndarray]) -> tuple[list[Any], str]:
        args: dict[str, Any] = {}
        for name, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                args[name] = tuple(self._value(v, values) for v in var)
            else:
                args[name] = self._value(var, values)
        own = _OWN.get(op.op_type)
        if own is not None:
            wide = self._widened(op, args)
            return [own(wide)], "depthq"
        if op.op_type == "cast" and self.float32 and str(args["dtype"]) == "fp16":
            return [args["x"]], "depthq"  # the float32 mode keeps float32 where the program narrows
        if op.op_type in _ACCUMULATING:
            args = self._widened(op, args)
        return self._evaluate(op, args), "coremltools"

    def _widened(self, op: Any, args: dict[str, Any]) -> dict[str, Any]:
        """float16 operands as float32: the op accumulates wide; its result is rounded to its dtype."""
        if op.op_type not in _ACCUMULATING:
            return args
        return {
            k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float16 else v
            for k, v in args.items()
        }

    def _evaluate(self, op: Any, args: dict[str, Any]) -> list[Any]:
        """coremltools' own evaluator for this op: the op rebuilt by its builder on constant inputs."""
        from coremltools.converters.mil.mil import Builder as mb
        from coremltools.converters.mil.mil import Function

        build = getattr(mb, op.op_type, None)
        if build is None:
            raise self._unknown(op)
        with Function({}, opset_version=self.opset):
            made = build(**args, name="evaluated")
        outputs = made if isinstance(made, (list, tuple)) else [made]
        results = [out.val for out in outputs]
        if any(result is None for result in results):
            raise self._unknown(op)
        return results

    def _unknown(self, op: Any) -> UnknownOpError:
        index = self.operations.index(op)
        return UnknownOpError(
            f"{self.package}: op {index} of {len(self.operations)}, {op.op_type} ({op.name!r}), has no evaluator "
            f"in coremltools and none here ({', '.join(OWN_OPS)}); this package cannot be checked off a Mac "
            "until worker/mil_executor.py implements it"
        )


def _scalar(value: Any) -> Any:
    """A 0-d array as a numpy scalar, as coremltools' builder takes it: the reader gives scalar consts
    as 0-d arrays, which an op's type inference (resize_bilinear's target sizes) cannot hash."""
    return value[()] if isinstance(value, np.ndarray) and value.ndim == 0 else value


def _input_vars(op: Any) -> Iterable[Any]:
    for var in op.inputs.values():
        if isinstance(var, (list, tuple)):
            yield from var
        else:
            yield var


# --- the ops implemented here, from the MIL op specification --------------------------------------


def _arg(args: Mapping[str, Any], name: str, default: Any) -> Any:
    """An optional input: the spec's default where the op leaves it out or the reader gives None."""
    value = args.get(name)
    return default if value is None else value


def _ints(value: Any, default: int, count: int) -> list[int]:
    if value is None:
        return [default] * count
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _conv(args: Mapping[str, Any]) -> np.ndarray:
    """`conv` (iOS15+): x (N, C_in, *D), weight (C_out, C_in/groups, *K), pad_type valid|same|same_lower|custom."""
    import torch
    import torch.nn.functional as F

    x, weight = args["x"], args["weight"]
    dims = x.ndim - 2
    strides = _ints(args.get("strides"), 1, dims)
    dilations = _ints(args.get("dilations"), 1, dims)
    groups = int(_arg(args, "groups", 1))
    pads = _conv_pads(
        str(_arg(args, "pad_type", "valid")), args.get("pad"), x.shape[2:], weight.shape[2:], strides, dilations
    )
    tx = torch.from_numpy(np.ascontiguousarray(x))
    # torch's F.pad takes the last dimension first.
    flat: list[int] = []
    for before, after in reversed(pads):
        flat += [before, after]
    if any(flat):
        tx = F.pad(tx, flat)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    bias = args.get("bias")
    with torch.no_grad():
        out = conv(
            tx,
            torch.from_numpy(np.ascontiguousarray(weight)),
            None if bias is None else torch.from_numpy(np.ascontiguousarray(bias)),
            stride=strides,
            dilation=dilations,
            groups=groups,
        )
    return out.numpy()


def _conv_pads(
    pad_type: str, pad: Any, size: tuple[int, ...], kernel: tuple[int, ...], strides: list[int], dilations: list[int]
) -> list[tuple[int, int]]:
    """(before, after) per spatial dimension. `same` gives ceil(in / stride) outputs, with the odd
    element of the padding after (`same_lower`: before), as TensorFlow and ONNX define them."""
    dims = len(size)
    if pad_type == "valid":
        return [(0, 0)] * dims
    if pad_type == "custom":
        values = _ints(pad, 0, 2 * dims)
        return [(values[2 * i], values[2 * i + 1]) for i in range(dims)]
    if pad_type not in ("same", "same_lower"):
        raise UnknownOpError(f"conv: pad_type {pad_type!r} is not in the MIL specification")
    pads = []
    for n, k, s, d in zip(size, kernel, strides, dilations, strict=True):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if pad_type == "same" else (large, small))
    return pads


def _conv_transpose(args: Mapping[str, Any]) -> np.ndarray:
    """`conv_transpose`: weight (C_in, C_out/groups, *K). The full transposed convolution, then the
    output window the spec defines: `pad` cut from each side, or `output_shape` from pad-before on
    (a window reaching past the full result holds the bias alone, as torch's output_padding does)."""
    import torch
    import torch.nn.functional as F

    x, weight = args["x"], args["weight"]
    dims = x.ndim - 2
    strides = _ints(args.get("strides"), 1, dims)
    dilations = _ints(args.get("dilations"), 1, dims)
    groups = int(_arg(args, "groups", 1))
    pad_type = str(_arg(args, "pad_type", "valid"))
    kernel = weight.shape[2:]
    full_size = [
        (n - 1) * s + (k - 1) * d + 1 for n, k, s, d in zip(x.shape[2:], kernel, strides, dilations, strict=True)
    ]
    if pad_type == "same":
        wanted = [n * s for n, s in zip(x.shape[2:], strides, strict=True)]
        befores = [max(f - w, 0) // 2 for f, w in zip(full_size, wanted, strict=True)]
    else:
        pads = _ints(args.get("pad"), 0, 2 * dims) if pad_type == "custom" else [0] * (2 * dims)
        befores = [pads[2 * i] for i in range(dims)]
        wanted = [full_size[i] - pads[2 * i] - pads[2 * i + 1] for i in range(dims)]
    if args.get("output_shape") is not None:
        wanted = _ints(args["output_shape"], 0, dims + 2)[2:]
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    with torch.no_grad():
        full = conv(
            torch.from_numpy(np.ascontiguousarray(x)),
            torch.from_numpy(np.ascontiguousarray(weight)),
            None,
            stride=strides,
            dilation=dilations,
            groups=groups,
        ).numpy()
    out = np.zeros(full.shape[:2] + tuple(wanted), dtype=full.dtype)
    src = tuple(slice(b, min(b + w, f)) for b, w, f in zip(befores, wanted, full_size, strict=True))
    dst = tuple(slice(0, s.stop - s.start) for s in src)
    out[(slice(None), slice(None), *dst)] = full[(slice(None), slice(None), *src)]
    bias = args.get("bias")
    if bias is not None:
        out += np.asarray(bias, dtype=out.dtype).reshape((1, -1) + (1,) * dims)
    return out


def _crop(args: Mapping[str, Any]) -> np.ndarray:
    """`crop` (iOS15): crop_height[0] rows off the top and crop_height[1] off the bottom of axis -2,
    crop_width likewise off the left and right of axis -1. torch's ConvTranspose2d with output_padding
    lowers to conv_transpose then this."""
    x = args["x"]
    top, bottom = _ints(args["crop_height"], 0, 2)
    left, right = _ints(args["crop_width"], 0, 2)
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


def _resize_axis(x: np.ndarray, axis: int, size_out: int, align_corners: bool, half_pixel_centers: bool) -> np.ndarray:
    """Linear interpolation along one axis at the spec's grid points, clamped to the input."""
    size_in = x.shape[axis]
    index = np.arange(size_out, dtype=np.float64)
    if align_corners:
        grid = index * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros(size_out)
    else:
        spacing = size_in / size_out
        grid = index * spacing + (0.5 * spacing - 0.5 if half_pixel_centers else 0.0)
    grid = np.clip(grid, 0, size_in - 1)
    low = np.floor(grid).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    frac = (grid - low).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = size_out
    frac = frac.reshape(shape)
    return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


def _upsample_bilinear(args: Mapping[str, Any]) -> np.ndarray:
    """`upsample_bilinear` (iOS16): output floor(H * scale), floor(W * scale); grid spacing recomputed
    from the sizes; align_corners (default True) and half_pixel_centers (default not align_corners)."""
    x = args["x"]
    align = bool(_arg(args, "align_corners", True))
    half = bool(_arg(args, "half_pixel_centers", not align))
    scale_h = float(_arg(args, "scale_factor_height", 1))
    scale_w = float(_arg(args, "scale_factor_width", 1))
    out_h, out_w = math.floor(x.shape[-2] * scale_h), math.floor(x.shape[-1] * scale_w)
    wide = x.astype(np.float32)
    wide = _resize_axis(wide, x.ndim - 2, out_h, align, half)
    return _resize_axis(wide, x.ndim - 1, out_w, align, half)


def _gelu(args: Mapping[str, Any]) -> np.ndarray:
    """`gelu` (iOS15): EXACT 0.5 x (1 + erf(x / sqrt(2))), TANH_APPROXIMATION
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), SIGMOID_APPROXIMATION x sigmoid(1.702 x).
    Computed in float32 and rounded to the op's dtype by the caller, as one float16 op would be."""
    import torch

    x = torch.from_numpy(np.asarray(args["x"], dtype=np.float32))
    mode = str(args.get("mode") or "EXACT")
    with torch.no_grad():
        if mode == "EXACT":
            out = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
        elif mode == "TANH_APPROXIMATION":
            out = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        elif mode == "SIGMOID_APPROXIMATION":
            out = x * torch.sigmoid(1.702 * x)
        else:
            raise UnknownOpError(f"gelu: mode {mode!r} is not in the MIL specification")
    return out.numpy()


def _layer_norm(args: Mapping[str, Any]) -> np.ndarray:
    """`layer_norm` (iOS15): gamma (x - E[x]) / sqrt(Var[x] + epsilon) + beta over `axes` (default all),
    the variance a population's. Reduced in float32; the caller rounds the result to the op's dtype."""
    x = np.asarray(args["x"], dtype=np.float32)
    axes = tuple(sorted({int(a) % x.ndim for a in np.atleast_1d(_arg(args, "axes", range(x.ndim)))}))
    centred = x - x.mean(axis=axes, keepdims=True)
    out = centred / np.sqrt(np.square(centred).mean(axis=axes, keepdims=True) + np.float32(_arg(args, "epsilon", 1e-5)))
    normalized = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if args.get("gamma") is not None:
        out *= np.asarray(args["gamma"], dtype=np.float32).reshape(normalized)
    if args.get("beta") is not None:
        out += np.asarray(args["beta"], dtype=np.float32).reshape(normalized)
    return out


def _softmax(args: Mapping[str, Any]) -> np.ndarray:
    """`softmax` (iOS15) along `axis` (default -1), less the row's maximum first. Summed in float32."""
    x = np.asarray(args["x"], dtype=np.float32)
    axis = int(_arg(args, "axis", -1))
    out = np.exp(x - x.max(axis=axis, keepdims=True))
    out /= out.sum(axis=axis, keepdims=True)
    return out


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Indices packed one byte at a time from the least significant bit up, as the spec lays them out."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: nbits * count]
    weights = (1 << np.arange(nbits, dtype=np.uint16)).astype(np.uint16)
    return (bits.reshape(count, nbits).astype(np.uint16) * weights).sum(axis=1)


def _lut_to_dense(args: Mapping[str, Any]) -> np.ndarray:
    """`constexpr_lut_to_dense` (iOS16): lut[indices] reshaped, indices n_bits = log2(len(lut)) each."""
    lut = np.asarray(args["lut"])
    shape = tuple(int(v) for v in np.asarray(args["shape"]).reshape(-1))
    nbits = round(math.log2(lut.size))
    return lut[_unpack_bits(args["indices"], nbits, int(np.prod(shape)))].reshape(shape)


def _affine_dequantize(args: Mapping[str, Any]) -> np.ndarray:
    """`constexpr_affine_dequantize` (iOS16): scale * (quantized - zero_point), scale and zero_point
    scalars or vectors along `axis`."""
    data = np.asarray(args["quantized_data"])
    scale = np.asarray(args["scale"])
    zero = np.asarray(args["zero_point"])
    axis = int(args["axis"]) % data.ndim
    shape = [1] * data.ndim
    shape[axis] = -1
    scale = scale.reshape(shape) if scale.ndim == 1 else scale
    zero = zero.reshape(shape) if zero.ndim == 1 else zero
    return (scale.astype(np.float32) * (data.astype(np.float32) - zero.astype(np.float32))).astype(scale.dtype)


_OWN: dict[str, Callable[[Mapping[str, Any]], np.ndarray]] = {
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "crop": _crop,
    "upsample_bilinear": _upsample_bilinear,
    "constexpr_lut_to_dense": _lut_to_dense,
    "constexpr_affine_dequantize": _affine_dequantize,
    "gelu": _gelu,
    "layer_norm": _layer_norm,
    "softmax": _softmax,
}
