"""worker/mil_executor.py against torch: each op it runs, over the parameters a lowering can get wrong.

Every check converts small torch modules with coremltools, exactly as `depthq convert` does (traced,
ML program, macOS 13), runs the package with `ProgramExecutor` and compares with torch. Variants of one
op sit side by side in one module (one conversion, one output each) and are compared one test id at a
time. Each case also asserts the MIL ops it lowered to, so a case cannot pass by testing another op.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function
from torch import nn

from worker.mil_executor import OWN_OPS, ProgramExecutor, UnknownOpError, load_program

# float32 programs: torch's float64 result within float32 rounding (the sums run in another order).
F32_RTOL, F32_ATOL = 1e-5, 1e-6


@dataclass(frozen=True)
class Case:
    """One variant: a module reading one of its family's inputs, and the MIL ops it must lower to."""

    id: str
    module: nn.Module | None = None  # None: one output of its family's `whole` module
    input: str = ""
    lowering: tuple[str, ...] = ()
    pad_type: str | None = None  # for convolutions: the pad_type the conversion must produce


@dataclass(frozen=True)
class Family:
    inputs: dict[str, tuple[int, ...]]
    cases: list[Case]
    # float16 programs: max |got - want| <= fp16_atol * max |want| (see each family for why)
    fp16_atol: float
    # One module for all the cases, where they are its outputs rather than side-by-side modules.
    whole: nn.Module | None = None

    def module(self) -> nn.Module:
        return self.whole if self.whole is not None else Branches(self)


class Branches(nn.Module):
    """The family's cases side by side: one output per case, in order."""

    def __init__(self, family: Family):
        super().__init__()
        self.names = list(family.inputs)
        self.reads = [self.names.index(case.input) for case in family.cases]
        self.branches = nn.ModuleList(case.module for case in family.cases)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(branch(inputs[i]) for branch, i in zip(self.branches, self.reads, strict=True))


class Fn(nn.Module):
    """A functional op as a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class PadThen(nn.Module):
    def __init__(self, pad: tuple[int, ...], then: nn.Module):
        super().__init__()
        self.pad, self.then = pad, then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then(F.pad(x, self.pad))


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build().eval()


def _conv_case(id: str, build: Callable[[], nn.Module], input: str, pad_type: str, *, padded: bool = False) -> Case:
    return Case(id, _seeded(build, 0), input, ("pad", "conv") if padded else ("conv",), pad_type)


C2, C1 = nn.Conv2d, nn.Conv1d
# x2: odd height, even width, so strides leave remainders and 'same' pads differ per axis.
CONV = Family(
    inputs={"x2": (1, 4, 9, 10), "x1": (2, 4, 11)},
    cases=[
        _conv_case("conv2d_k3_valid", lambda: C2(4, 6, 3), "x2", "valid"),
        _conv_case("conv2d_k3_pad1", lambda: C2(4, 6, 3, padding=1), "x2", "custom"),
        _conv_case("conv2d_k1", lambda: C2(4, 6, 1), "x2", "valid"),
        _conv_case("conv2d_k3_stride2_pad1", lambda: C2(4, 6, 3, stride=2, padding=1), "x2", "custom"),
        _conv_case("conv2d_k4_stride3", lambda: C2(4, 6, 4, stride=3), "x2", "valid"),
        _conv_case("conv2d_k2x5_stride2x3_pad0x2", lambda: C2(4, 6, (2, 5), (2, 3), (0, 2)), "x2", "custom"),
        _conv_case("conv2d_k3_dilation2_pad2", lambda: C2(4, 6, 3, padding=2, dilation=2), "x2", "custom"),
        _conv_case(
            "conv2d_k3_dilation2x3_pad1x0", lambda: C2(4, 6, 3, padding=(1, 0), dilation=(2, 3)), "x2", "custom"
        ),
        # torch's padding='same' converts to pad_type 'same'; for even (dilated) kernels torch puts the odd
        # padding element after, which is what the executor's 'same' does (TensorFlow's and ONNX's rule).
        # The MIL docstring's formula puts it before, contradicting its own 'same_lower'; which one Core
        # ML itself follows only a Mac can settle (`depthq models check` there compares Core ML's output).
        _conv_case("conv2d_same_k3", lambda: C2(4, 6, 3, padding="same"), "x2", "same"),
        _conv_case("conv2d_same_k4", lambda: C2(4, 6, 4, padding="same"), "x2", "same"),
        _conv_case(
            "conv2d_same_k2x4_dilation1x3", lambda: C2(4, 6, (2, 4), padding="same", dilation=(1, 3)), "x2", "same"
        ),
        _conv_case("conv2d_groups2", lambda: C2(4, 6, 3, padding=1, groups=2), "x2", "custom"),
        _conv_case("conv2d_depthwise_x2", lambda: C2(4, 8, 3, padding=1, groups=4), "x2", "custom"),
        _conv_case("conv2d_depthwise_stride2_nobias", lambda: C2(4, 4, 3, 2, groups=4, bias=False), "x2", "valid"),
        _conv_case("conv2d_nobias", lambda: C2(4, 6, 3, padding=1, bias=False), "x2", "custom"),
        # An asymmetric F.pad stays a MIL `pad` op (no coremltools pass folds it into the conv); the conv's
        # own asymmetric custom pad is tested on a MIL program below.
        _conv_case("conv2d_fpad_1_2_0_3", lambda: PadThen((1, 2, 0, 3), C2(4, 6, 3)), "x2", "valid", padded=True),
        _conv_case("conv1d_k3_pad1", lambda: C1(4, 6, 3, padding=1), "x1", "custom"),
        _conv_case("conv1d_k5_stride2_dilation2_pad3", lambda: C1(4, 6, 5, 2, 3, dilation=2), "x1", "custom"),
        _conv_case("conv1d_same_k4", lambda: C1(4, 6, 4, padding="same"), "x1", "same"),
        _conv_case("conv1d_same_k3_dilation3", lambda: C1(4, 6, 3, padding="same", dilation=3), "x1", "same"),
        _conv_case("conv1d_groups2_nobias", lambda: C1(4, 6, 3, groups=2, bias=False), "x1", "valid"),
        _conv_case("conv1d_depthwise_stride3", lambda: C1(4, 4, 3, 3, groups=4), "x1", "valid"),
    ],
    # Inputs, weights and each output are rounded to float16 (2**-11 relative each); the sums are float32.
    # Measured: 5.9e-4 of the largest output.
    fp16_atol=2e-3,
)


def _deconv_case(id: str, build: Callable[[], nn.Module], input: str, lowering: tuple[str, ...]) -> Case:
    return Case(id, _seeded(build, 0), input, lowering)


T2, T1 = nn.ConvTranspose2d, nn.ConvTranspose1d
DECONV = Family(
    inputs={"x2": (1, 4, 5, 6), "x1": (2, 4, 7)},
    cases=[
        _deconv_case("deconv2d_k2_stride2", lambda: T2(4, 6, 2, 2), "x2", ("conv_transpose",)),
        _deconv_case("deconv2d_k3_stride1", lambda: T2(4, 6, 3), "x2", ("conv_transpose",)),
        _deconv_case("deconv2d_k3_stride2_pad1", lambda: T2(4, 6, 3, 2, 1), "x2", ("conv_transpose",)),
        _deconv_case(
            "deconv2d_k5_stride3_pad2_nobias", lambda: T2(4, 6, 5, 3, 2, bias=False), "x2", ("conv_transpose",)
        ),
        # output_padding lowers to conv_transpose (no padding, output_shape) then `crop`.
        _deconv_case(
            "deconv2d_k3_stride2_pad1_outpad1", lambda: T2(4, 6, 3, 2, 1, 1), "x2", ("conv_transpose", "crop")
        ),
        _deconv_case(
            "deconv2d_k3_stride2x3_pad1x2_outpad1x2",
            lambda: T2(4, 6, 3, (2, 3), (1, 2), (1, 2)),
            "x2",
            ("conv_transpose", "crop"),
        ),
        _deconv_case(
            "deconv2d_k3_stride2_pad2_dilation2_outpad1",
            lambda: T2(4, 6, 3, 2, 2, 1, dilation=2),
            "x2",
            ("conv_transpose", "crop"),
        ),
        # output_padding above the padding: a `pad` after the input, conv_transpose, then `crop`.
        _deconv_case(
            "deconv2d_k3_stride3_pad1_outpad2", lambda: T2(4, 6, 3, 3, 1, 2), "x2", ("pad", "conv_transpose", "crop")
        ),
        _deconv_case("deconv2d_groups2", lambda: T2(4, 6, 3, 2, 1, groups=2), "x2", ("conv_transpose",)),
        _deconv_case(
            "deconv2d_depthwise_k4_stride2_pad1_nobias",
            lambda: T2(4, 4, 4, 2, 1, groups=4, bias=False),
            "x2",
            ("conv_transpose",),
        ),
        # ConvTranspose1d's output_padding lowers to slice_by_index instead of crop.
        _deconv_case(
            "deconv1d_k3_stride2_pad1_outpad1", lambda: T1(4, 6, 3, 2, 1, 1), "x1", ("conv_transpose", "slice_by_index")
        ),
        _deconv_case(
            "deconv1d_k5_stride3_pad2_dilation2", lambda: T1(4, 6, 5, 3, 2, dilation=2), "x1", ("conv_transpose",)
        ),
        _deconv_case("deconv1d_groups2", lambda: T1(4, 6, 3, 2, groups=2), "x1", ("conv_transpose",)),
    ],
    # As conv: float16 inputs, weights and outputs, float32 sums. Measured: 5.8e-4.
    fp16_atol=2e-3,
)


def _resize(id: str, input: str, **kwargs: Any) -> Case:
    return Case(id, Fn(lambda x: F.interpolate(x, mode="bilinear", **kwargs)), input, ("upsample_bilinear",))


# x: 12x8, so every scale below gives a whole output size; x_odd: 5x7, for sizes that do not divide.
# `size=` lowers to upsample_bilinear too, with scale out/in (plus 1e-4 where it does not divide, so the
# floor lands on the size); the spec recomputes the grid spacing from the sizes, as torch does for size=.
# Not covered: align_corners=False with a scale giving a fractional size, which coremltools refuses to
# convert, and resize_bilinear, which no torch interpolate lowers to (the executor refuses it by name).
RESIZE = Family(
    inputs={"x": (1, 3, 12, 8), "x_odd": (1, 2, 5, 7)},
    cases=[
        *(
            _resize(
                f"scale{scale}_{'aligned' if align else 'halfpixel'}".replace(".", "p"),
                "x",
                scale_factor=scale,
                align_corners=align,
            )
            for scale in (0.25, 0.5, 1.5, 2, 3)
            for align in (False, True)
        ),
        _resize("scale2x0p5_halfpixel", "x", scale_factor=(2, 0.5), align_corners=False),
        _resize("scale1p5_aligned_fractional_size", "x_odd", scale_factor=1.5, align_corners=True),
        _resize("size7x5_halfpixel", "x", size=(7, 5), align_corners=False),
        _resize("size7x5_aligned", "x", size=(7, 5), align_corners=True),
        _resize("size17x11_halfpixel", "x_odd", size=(17, 11), align_corners=False),
        _resize("size17x11_aligned", "x_odd", size=(17, 11), align_corners=True),
        _resize("size3x2_halfpixel", "x_odd", size=(3, 2), align_corners=False),
    ],
    # float16 inputs interpolated in float32, the result rounded: two roundings of up to 2**-11 of the
    # largest input, which a downscaled output's largest can fall short of. Measured: 5.5e-4.
    fp16_atol=2e-3,
)


class Block(nn.Module):
    """The coremltools-evaluated ops DepthPro's ViT and decoder use, in one transformer-like block."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 32)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = torch.cat([a, b], dim=1)
        q, k, v = self.qkv(self.norm(x)).split(16, dim=-1)
        q, k, v = (t.reshape(2, 10, 2, 8).transpose(1, 2) for t in (q, k, v))
        # 0.25: exact in float16 too, so the float32-mode check below sees no rounded constant.
        attention = (torch.matmul(q, k.transpose(-1, -2)) * 0.25).softmax(-1)
        x = x + self.proj(torch.matmul(attention, v).transpose(1, 2).reshape(2, 10, 16))
        y = F.gelu(self.fc(x)) + (torch.relu(x) * (x > 0).to(x.dtype)).repeat(1, 1, 2)
        return y[:, 1:, ::2], y[:, :1, :].squeeze(1)


EVALUATED_OPS = {"mul", "add", "cast", "slice_by_index", "concat", "reshape", "transpose", "layer_norm", "linear"}
EVALUATED_OPS |= {"matmul", "softmax", "gelu", "split", "relu", "squeeze"}


BLOCK = Family(
    inputs={"a": (2, 6, 16), "b": (2, 4, 16)},
    cases=[Case("tokens"), Case("first_token")],
    # Every op's result is rounded to float16 (2**-11 relative), ~12 ops in a row, softmax and
    # layer_norm included. Measured: 5.6e-4 of the largest output.
    fp16_atol=3e-3,
    whole=_seeded(Block, 0),
)

FAMILIES: dict[str, Family] = {"conv": CONV, "conv_transpose": DECONV, "upsample_bilinear": RESIZE, "block": BLOCK}


# --- converting and running --------------------------------------------------------------------------


@dataclass
class Converted:
    package: Path
    feed: dict[str, np.ndarray]
    want: dict[str, np.ndarray]
    executor: ProgramExecutor
    got: dict[str, np.ndarray]


def _inputs(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


def _convert(
    module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], precision: str, path: Path | None
) -> Any:
    traced = torch.jit.trace(module.eval(), tuple(inputs.values()))
    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name=name, shape=x.shape, dtype=np.float32) for name, x in inputs.items()],
        outputs=[ct.TensorType(name=name, dtype=np.float32) for name in outputs],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32 if precision == "float32" else ct.precision.FLOAT16,
        minimum_deployment_target=ct.target.macOS13,
        skip_model_load=True,
    )
    if path is not None:
        model.save(str(path))
    return model


def _save_program(program: Any, path: Path) -> Path:
    """A MIL program built here, saved as a float32 package (the op names stay as given)."""
    ct.convert(
        program,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.macOS13,
        skip_model_load=True,
    ).save(str(path))
    return path


def _run(
    package: Path, feed: dict[str, np.ndarray], float32: bool = False
) -> tuple[ProgramExecutor, dict[str, np.ndarray]]:
    executor = ProgramExecutor(package, float32=float32)
    return executor, executor.predict(feed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mil-executor")


@pytest.fixture(scope="module")
def converted(folder: Path) -> Callable[[str, str], Converted]:
    """family, precision -> that family converted once and run once (per module)."""
    cache: dict[tuple[str, str], Converted] = {}

    def get(family_name: str, precision: str) -> Converted:
        key = (family_name, precision)
        if key not in cache:
            family = FAMILIES[family_name]
            inputs = _inputs(family.inputs)
            names = [case.id for case in family.cases]
            module = family.module()
            package = folder / f"{family_name}-{precision}.mlpackage"
            _convert(module, inputs, names, precision, package)
            want = _reference(module, list(inputs.values()))
            feed = {name: x.numpy() for name, x in inputs.items()}
            executor, got = _run(package, feed)
            cache[key] = Converted(package, feed, dict(zip(names, want, strict=True)), executor, got)
        return cache[key]

    return get


def _reference(module: nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """torch's outputs computed in float64: float32 torch is itself off by up to ~1e-5 relative (its
    align_corners grid steps are float32), which would blur what the float32 check can see."""
    with torch.no_grad():
        return [out.numpy() for out in copy.deepcopy(module).double()(*(x.double() for x in inputs))]


def _lowering(executor: ProgramExecutor, output: str) -> list[Any]:
    """The ops from a program input to `output`, first to last, following each op's `x`; casts left out."""
    var = next(var for var in executor.function.outputs if var.name == output)
    ops = []
    while var.op is not None and var.op.op_type != "const":
        ops.append(var.op)
        var = var.op.inputs["x"]
    return [op for op in reversed(ops) if op.op_type != "cast"]


def _max_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, f"shape {got.shape}, torch gives {want.shape}"
    return float(np.abs(got.astype(np.float64) - want).max())


def _assert_matches(got: np.ndarray, want: np.ndarray, precision: str, family: Family, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape}, torch gives {want.shape}"
    assert np.isfinite(got).all(), what
    if precision == "float32":
        np.testing.assert_allclose(got, want, rtol=F32_RTOL, atol=F32_ATOL, err_msg=what)
    else:
        scale = float(np.abs(want).max())
        error = _max_error(got, want)
        assert error <= family.fp16_atol * scale, f"{what}: max error {error:.3g} over {family.fp16_atol} x {scale:.3g}"


def _case_params(family: Family) -> list[Any]:
    return [
        pytest.param(case, precision, id=f"{case.id}-{precision}")
        for case in family.cases
        for precision in ("float32", "float16")
    ]


# --- the ops implemented in mil_executor.py -----------------------------------------------------------


@pytest.mark.parametrize(("case", "precision"), _case_params(CONV))
def test_conv_matches_torch(converted: Callable[[str, str], Converted], case: Case, precision: str) -> None:
    run = converted("conv", precision)
    ops = _lowering(run.executor, case.id)
    assert [op.op_type for op in ops] == list(case.lowering)
    assert ops[-1].inputs["pad_type"].val == case.pad_type
    _assert_matches(run.got[case.id], run.want[case.id], precision, CONV, case.id)


@pytest.mark.parametrize(("case", "precision"), _case_params(DECONV))
def test_conv_transpose_matches_torch(converted: Callable[[str, str], Converted], case: Case, precision: str) -> None:
    run = converted("conv_transpose", precision)
    assert [op.op_type for op in _lowering(run.executor, case.id)] == list(case.lowering)
    _assert_matches(run.got[case.id], run.want[case.id], precision, DECONV, case.id)


@pytest.mark.parametrize(("case", "precision"), _case_params(RESIZE))
def test_upsample_bilinear_matches_torch(
    converted: Callable[[str, str], Converted], case: Case, precision: str
) -> None:
    run = converted("upsample_bilinear", precision)
    assert [op.op_type for op in _lowering(run.executor, case.id)] == list(case.lowering)
    _assert_matches(run.got[case.id], run.want[case.id], precision, RESIZE, case.id)


def test_own_ops_run_here_and_the_rest_in_coremltools(converted: Callable[[str, str], Converted]) -> None:
    run = converted("conv_transpose", "float16")
    by_source = run.executor.stats.by_source
    assert {"crop", "conv_transpose"} <= set(OWN_OPS)
    # conv_transpose and crop here; cast, pad and slice_by_index by coremltools' evaluators.
    assert by_source["depthq"] == sum(run.executor.op_types()[op] for op in ("conv_transpose", "crop"))
    assert by_source["coremltools"] == sum(run.executor.op_types()[op] for op in ("cast", "pad", "slice_by_index"))
    assert run.executor.stats.ops == by_source.total()


def _conv_reference(x: np.ndarray, weight: np.ndarray, pads: list[tuple[int, int]], stride: int) -> np.ndarray:
    flat = [p for before_after in reversed(pads) for p in before_after]
    return F.conv2d(F.pad(torch.from_numpy(x), flat), torch.from_numpy(weight), stride=stride).numpy()


def test_conv_pads_as_the_spec_says_where_torch_cannot_ask(folder: Path) -> None:
    """pad_type custom with asymmetric pads, same_lower, and same with a stride: no torch conversion
    produces them, so a MIL program does. custom: pad[2i], pad[2i+1] before and after axis i;
    same_lower: extra element before ("on the top/left"); same with stride: ceil(in / stride) outputs,
    the extra element after (see the 'same' note on CONV)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 9, 10), dtype=np.float32)
    weight = rng.standard_normal((5, 3, 4, 4), dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS16)
    def program(x: Any) -> Any:
        custom = mb.conv(x=x, weight=weight, pad_type="custom", pad=[1, 2, 0, 3], name="custom")
        lower = mb.conv(x=x, weight=weight, pad_type="same_lower", name="same_lower")
        same = mb.conv(x=x, weight=weight, pad_type="same", strides=[2, 2], name="same_stride2")
        return custom, lower, same

    executor, got = _run(_save_program(program, folder / "conv-pads.mlpackage"), {"x": x})
    assert executor.op_types()["conv"] == 3
    want = {
        "custom": _conv_reference(x, weight, [(1, 2), (0, 3)], 1),
        # k=4, stride 1: 3 pad elements per axis, 2 of them before.
        "same_lower": _conv_reference(x, weight, [(2, 1), (2, 1)], 1),
        # 9 rows -> 5: (5 - 1) * 2 + 4 - 9 = 3 pad elements, 1 before; 10 columns -> 5: 2, 1 before.
        "same_stride2": _conv_reference(x, weight, [(1, 2), (1, 1)], 2),
    }
    assert got["same_stride2"].shape[2:] == (math.ceil(9 / 2), math.ceil(10 / 2))
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=F32_RTOL, atol=F32_ATOL, err_msg=name)


def test_upsample_bilinear_samples_the_grid_the_spec_draws(folder: Path) -> None:
    """The spec's own examples: input [0, 1] (so each output is its grid point) resized to 5 and 6."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 1, 1, 2))], opset_version=ct.target.iOS16)
    def program(x: Any) -> Any:
        return tuple(
            mb.upsample_bilinear(
                x=x,
                scale_factor_height=1.0,
                scale_factor_width=scale,
                align_corners=align,
                half_pixel_centers=half,
                name=name,
            )
            for name, scale, align, half in [
                ("to5_aligned", 2.5, True, None),
                ("to5_unaligned", 2.5, False, None),
                ("to6_aligned", 3.0, True, None),
                ("to6_unaligned", 3.0, False, None),
                # align_corners and half_pixel_centers both False: TensorFlow's legacy grid, i * in / out,
                # which the spec draws for resize_bilinear's DEFAULT mode.
                ("to5_legacy", 2.5, False, False),
            ]
        )

    _, got = _run(_save_program(program, folder / "upsample-grid.mlpackage"), {"x": np.array([[[[0.0, 1.0]]]])})
    want = {
        "to5_aligned": [0, 0.25, 0.5, 0.75, 1],
        "to5_unaligned": [0, 0.1, 0.5, 0.9, 1],
        "to6_aligned": [0, 0.2, 0.4, 0.6, 0.8, 1],
        "to6_unaligned": [0, 0, 1 / 3, 2 / 3, 1, 1],
        "to5_legacy": [0, 0.4, 0.8, 1, 1],
    }
    for name, grid in want.items():
        np.testing.assert_allclose(got[name].reshape(-1), grid, rtol=0, atol=F32_ATOL, err_msg=name)


# --- weight compression -------------------------------------------------------------------------------


class Compressible(nn.Module):
    """A conv and a linear whose weights pass coremltools' 2048-element threshold. Their element counts
    (2223 and 3015) times 1, 2, 4 or 6 bits leave a partial last byte; 6 bits also straddle bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(13, 19, 3)
        self.linear = nn.Linear(67, 45)
        with torch.no_grad():
            for layer in (self.conv, self.linear):
                # Off centre, so that the zero points of the "linear" modes are not 0.
                layer.weight += layer.weight.abs().max() / 3

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), self.linear(y)


COMPRESSIONS: dict[str, Any] = {
    **{f"palettize_uniform_{n}bit": cto.OpPalettizerConfig(mode="uniform", nbits=n) for n in (1, 2, 4, 6, 8)},
    "quantize_symmetric_int8_per_channel": cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"),
    "quantize_uint8_zero_point_per_channel": cto.OpLinearQuantizerConfig(mode="linear", dtype="uint8"),
    "quantize_int8_zero_point_per_channel": cto.OpLinearQuantizerConfig(mode="linear", dtype="int8"),
    "quantize_int8_zero_point_per_tensor": cto.OpLinearQuantizerConfig(
        mode="linear", dtype="int8", granularity="per_tensor"
    ),
}


@pytest.fixture(scope="module")
def compressible(folder: Path) -> Callable[[str], tuple[nn.Module, dict[str, torch.Tensor], Any]]:
    """precision -> (the torch module, its inputs, the uncompressed Core ML model)."""
    cache: dict[str, tuple[nn.Module, dict[str, torch.Tensor], Any]] = {}

    def get(precision: str) -> tuple[nn.Module, dict[str, torch.Tensor], Any]:
        if precision not in cache:
            module = _seeded(Compressible, 3)
            inputs = _inputs({"x": (1, 13, 6, 7), "y": (2, 5, 67)})
            cache[precision] = (module, inputs, _convert(module, inputs, ["conv", "linear"], precision, None))
        return cache[precision]

    return get


def _spec_decode(op: Any) -> np.ndarray:
    """The op's weight decoded from its inputs as the MIL spec words it, written for this test alone."""
    if op.op_type == "constexpr_lut_to_dense":
        lut, shape = op.lut.val, tuple(int(n) for n in op.shape.val)
        nbits = int(math.log2(lut.size))
        # Bits fill each byte from its least significant up, then the next byte: one little-endian number.
        stream = int.from_bytes(op.indices.val.astype(np.uint8).tobytes(), "little")
        count = math.prod(shape)
        assert op.indices.val.size == math.ceil(count * nbits / 8)
        indices = [(stream >> (i * nbits)) & ((1 << nbits) - 1) for i in range(count)]
        return lut[np.array(indices)].reshape(shape)
    data = op.quantized_data.val
    along = [1] * data.ndim
    along[int(op.axis.val)] = -1
    scale, zero = op.scale.val, op.zero_point.val
    scale = scale.reshape(along) if scale.ndim else scale
    zero = zero.reshape(along) if zero.ndim else zero
    return scale.astype(np.float64) * (data.astype(np.float64) - zero.astype(np.float64))


@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_compressed_weights_decode_as_coremltools_does(
    compressible: Callable[[str], tuple[nn.Module, dict[str, torch.Tensor], Any]],
    folder: Path,
    compression: str,
    precision: str,
) -> None:
    module, inputs, model = compressible(precision)
    config = cto.OptimizationConfig(global_config=COMPRESSIONS[compression])
    compress = cto.palettize_weights if compression.startswith("palettize") else cto.linear_quantize_weights
    package = folder / f"{compression}-{precision}.mlpackage"
    compress(model, config).save(str(package))

    _, program = load_program(package)
    constexpr = [op for op in program.functions["main"].operations if op.op_type.startswith("constexpr")]
    want_type = "constexpr_lut_to_dense" if compression.startswith("palettize") else "constexpr_affine_dequantize"
    assert [op.op_type for op in constexpr] == [want_type, want_type], "both weights must be compressed"
    decoded: dict[tuple[int, ...], np.ndarray] = {}
    for op in constexpr:
        # coremltools' own decompression, checked against the spec's wording, is the expectation.
        theirs = op.materialized_val_inference()
        # A look-up is exact; a dequantization may round once more or less in the weight's dtype.
        exact = op.op_type == "constexpr_lut_to_dense"
        rtol = 0 if exact else float(np.finfo(theirs.dtype).eps)
        np.testing.assert_allclose(theirs, _spec_decode(op), rtol=rtol, atol=0, err_msg=op.name)
        if op.op_type == "constexpr_lut_to_dense":
            assert op.lut.val.size == 2 ** int(compression.split("_")[2].removesuffix("bit"))
        else:
            assert op.quantized_data.val.dtype == (np.uint8 if "uint8" in compression else np.int8)
            assert op.scale.val.ndim == (0 if "per_tensor" in compression else 1)
            assert np.any(op.zero_point.val != 0) == ("zero_point" in compression)
        decoded[theirs.shape] = theirs.astype(np.float64)

    feed = {name: x.numpy() for name, x in inputs.items()}
    executor, got = _run(package, feed)
    assert executor.op_types()[want_type] == 2
    ops = {"conv": (F.conv2d, module.conv), "linear": (F.linear, module.linear)}
    for name, (fn, layer) in ops.items():
        x = inputs["x" if name == "conv" else "y"]
        weight = decoded[tuple(layer.weight.shape)]
        with torch.no_grad():
            x, w, b = x.double(), layer.weight.double(), layer.bias.double()
            error_bound = fn(x.abs(), (torch.from_numpy(weight) - w).abs()).numpy()
            # A float16 program holds the bias in float16 too (not compressed: too small).
            exact = fn(x, torch.from_numpy(weight), b.half().double() if precision == "float16" else b).numpy()
            original = fn(x, w, b).numpy()
        if precision == "float32":
            # The executor's decoding against coremltools': the same weights give the same sums.
            np.testing.assert_allclose(got[name], exact, rtol=F32_RTOL, atol=F32_ATOL, err_msg=name)
        else:
            # float16 input and output roundings, as CONV's.
            assert _max_error(got[name], exact) <= CONV.fp16_atol * float(np.abs(exact).max()), name
        # And against torch's uncompressed layer, within what the compression moved each output:
        # sum |x| |w - w_decoded| (plus the float16 roundings).
        slack = CONV.fp16_atol * float(np.abs(original).max()) if precision == "float16" else F32_ATOL
        assert np.all(np.abs(got[name] - original) <= error_bound + slack), name


# --- the ops coremltools evaluates ---------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_evaluated_ops_match_torch(converted: Callable[[str, str], Converted], precision: str) -> None:
    run = converted("block", precision)
    types = run.executor.op_types()
    assert set(types) >= EVALUATED_OPS, sorted(types)
    # gelu is depthq's (coremltools evaluates its exact mode one element at a time); the rest coremltools'.
    assert run.executor.stats.by_source["depthq"] == sum(n for op, n in types.items() if op in OWN_OPS)
    assert run.executor.stats.by_source["coremltools"] > 0
    for case in BLOCK.cases:
        _assert_matches(run.got[case.id], run.want[case.id], precision, BLOCK, case.id)


@pytest.mark.parametrize("family", ["block", "conv"])
def test_float32_mode_keeps_float32_in_a_float16_program(
    converted: Callable[[str, str], Converted], family: str
) -> None:
    """float32=True: only the program's float16 weights stay rounded; nothing computed is."""
    run = converted(family, "float16")
    executor, got = _run(run.package, run.feed, float32=True)
    assert executor.stats.by_source["coremltools"] > 0
    # The weights as the float16 program holds them; the inputs and all arithmetic unrounded.
    module = copy.deepcopy(FAMILIES[family].module())
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(parameter.half().float())
    want = _reference(module, [torch.from_numpy(v) for v in run.feed.values()])
    for name, value in zip(run.want, want, strict=True):
        np.testing.assert_allclose(got[name], value, rtol=F32_RTOL, atol=F32_ATOL, err_msg=name)
        assert got[name].dtype == np.float32
        # ... where the float16 run, on the same program, is off by float16 roundings.
        assert _max_error(got[name], value) * 10 < _max_error(run.got[name], value), name


@pytest.mark.parametrize("op_type", ["resize_nearest_neighbor", "resize_bilinear"])
def test_an_op_it_cannot_run_names_itself(folder: Path, op_type: str) -> None:
    """Neither has a coremltools evaluator or an implementation here. resize_bilinear is refused rather
    than implemented: no torch interpolate lowers to it (size= gives upsample_bilinear), so nothing here
    could check an implementation against torch."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 4, 4))], opset_version=ct.target.iOS16)
    def program(x: Any) -> Any:
        resize = getattr(mb, op_type)
        return resize(x=mb.relu(x=x), target_size_height=8, target_size_width=8, name="the_resize")

    executor = ProgramExecutor(_save_program(program, folder / f"unknown-{op_type}.mlpackage"))
    assert op_type not in OWN_OPS
    assert executor.op_types()[op_type] == 1
    with pytest.raises(UnknownOpError, match=rf"{op_type} \('the_resize'\), has no evaluator"):
        executor.predict({"x": np.ones((1, 2, 4, 4), dtype=np.float32)})


class WideRows(nn.Module):
    """A ViT's row reductions at DepthPro's width, on activations as large as a trained model's."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(1024)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm(x), (x * 0.5).softmax(-1)


def test_float16_row_reductions_do_not_overflow_on_large_activations(folder: Path) -> None:
    """Rows 1024 wide with a spread of 20: their sum of squares (~4e5) is past float16's largest
    (65504). coremltools' float16 layer_norm evaluator overflows there and returns beta for the whole
    row; the executor reduces in float32, so a trained float16 package is judged on its meaning."""
    module = _seeded(WideRows, 0)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 1024, generator=generator) * 20
    package = folder / "wide-rows-float16.mlpackage"
    _convert(module, {"x": x}, ["normed", "weights"], "float16", package)
    executor, got = _run(package, {"x": x.numpy()})
    assert {"layer_norm", "softmax"} <= set(executor.op_types())
    want = dict(zip(["normed", "weights"], _reference(module, [x]), strict=True))
    for name in want:
        assert np.isfinite(got[name]).all(), name
        # one rounding of the float16 input (std 20: steps of 2**-6) and one of the result
        assert _max_error(got[name], want[name]) <= 5e-3 * float(np.abs(want[name]).max()), name
    # What coremltools' own evaluator makes of the same float16 row: the overflow this test guards against.
    with Function({}, opset_version=ct.target.macOS13):
        evaluated = mb.layer_norm(x=x[0].numpy().astype(np.float16), axes=[-1], epsilon=np.float16(1e-5)).val
    assert not np.isfinite(evaluated).all() or np.abs(evaluated).max() == 0
