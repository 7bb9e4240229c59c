"""Tiny DepthPro checkpoints built on the spot (no download): the real architecture, a few KB of weights.

With `constant_head`, the depth head's last conv outputs `inverse_depth` everywhere and the FOV head
outputs `fov_deg`, so metric depth has a closed form: depth = f_px / (inverse_depth * W).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import DepthProConfig, DepthProForDepthEstimation

# 32 / 0.25: the input side the model asks for, small enough for a fast CPU test.
TINY_INPUT_SIZE = 128
# What the constant head outputs by default.
INVERSE_DEPTH = 0.25
FOV_DEG = 60.0


def expected_depth(width: int, height: int, focal_35mm: float | None = None) -> float:
    """The closed form of metric depth (meters) for the constant head, as ml-depth-pro computes it."""
    if focal_35mm:
        f_px = focal_35mm * math.hypot(width, height) / math.hypot(36, 24)
    else:
        f_px = 0.5 * width / math.tan(math.radians(FOV_DEG / 2))
    return f_px / (INVERSE_DEPTH * width)


def tiny_config() -> DepthProConfig:
    sub = {
        "model_type": "dinov2",
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "patch_size": 16,
        "image_size": 32,
    }
    return DepthProConfig(
        patch_size=32,
        fusion_hidden_size=16,
        intermediate_hook_ids=[1, 0],
        intermediate_feature_dims=[8, 8],
        scaled_images_ratios=[0.25, 0.5, 1],
        scaled_images_overlap_ratios=[0.0, 0.5, 0.25],
        scaled_images_feature_dims=[16, 16, 8],
        merge_padding_value=1,
        num_fov_head_layers=1,
        use_fov_model=True,
        image_model_config=dict(sub),
        patch_model_config=dict(sub),
        fov_model_config=dict(sub),
    )


def build_tiny_model(
    folder: Path,
    constant_head: bool = True,
    inverse_depth: float = INVERSE_DEPTH,
    fov_deg: float = FOV_DEG,
    with_fov: bool = True,
) -> Path:
    torch.manual_seed(0)
    config = tiny_config()
    config.use_fov_model = with_fov
    model = DepthProForDepthEstimation(config, use_fov_model=with_fov).eval()
    if constant_head:
        with torch.no_grad():
            last = model.head.layers[-2]  # Conv2d(32 -> 1), followed by ReLU
            last.weight.zero_()
            last.bias.fill_(inverse_depth)
            if with_fov:
                fov_last = model.fov_model.head.layers[-1]
                fov_last.weight.zero_()
                fov_last.bias.fill_(fov_deg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


# The released DepthPro's geometry (apple/DepthPro-hf's config): 1536 input, 384-px patches at three
# scales with these overlaps (35 patches: 5x5 + 3x3 + 1), DINOv2 encoders with 16-px patches at 384.
RELEASED_INPUT_SIZE = 1536
RELEASED_GEOMETRY = {
    "patch_size": 384,
    "scaled_images_ratios": [0.25, 0.5, 1],
    "scaled_images_overlap_ratios": [0.0, 0.5, 0.25],
    "merge_padding_value": 3,
    "num_fov_head_layers": 2,
}


def released_geometry_config() -> DepthProConfig:
    """The released geometry with the smallest widths that still build: converts in seconds.

    Whatever grows with the input or the patch size (the patch split, resizes, the attention over 577
    tokens) is as large as in the real model; only the channel widths and depths are tiny.
    """
    sub = {
        "model_type": "dinov2",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "mlp_ratio": 1,
        "patch_size": 16,
        "image_size": 384,
    }
    return DepthProConfig(
        **RELEASED_GEOMETRY,
        # The fusion stage takes 3 scales and 2 hooks; the FOV head halves fusion_hidden_size per layer.
        fusion_hidden_size=8,
        intermediate_hook_ids=[0, 0],
        intermediate_feature_dims=[4, 4],
        scaled_images_feature_dims=[4, 4, 4],
        use_fov_model=True,
        image_model_config=dict(sub),
        patch_model_config=dict(sub),
        fov_model_config=dict(sub),
    )


def build_released_geometry_model(folder: Path, seed: int = 0, plausible: bool = False) -> Path:
    """Random weights (so preprocessing and every resize show in the output) at the released geometry.

    `plausible` rescales the two heads' last layers so that, like DepthPro's, the canonical inverse
    depth is positive everywhere (1 +- 0.15 across a photo) and the FOV a camera's (about 60 degrees,
    varying with the photo): relative depth errors and FOV errors then mean what they mean for the
    released weights, while every pixel still depends on the whole network."""
    torch.manual_seed(seed)
    model = DepthProForDepthEstimation(released_geometry_config(), use_fov_model=True).eval()
    if plausible:
        make_plausible(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def make_plausible(model: DepthProForDepthEstimation) -> None:
    """Scale each head's last layer to an output of the wanted mean and spread (measured on one input)."""
    size = RELEASED_INPUT_SIZE
    x = torch.linspace(-1, 1, size)
    scene = torch.stack([x[None, :].expand(size, size), x[:, None].expand(size, size), (x[None, :] * x[:, None])])[None]
    depth_last = model.head.layers[-2]
    fov_last = model.fov_model.head.layers[-1]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        depth_last.register_forward_hook(lambda _m, _i, out: seen.__setitem__("depth", out.detach())),
        fov_last.register_forward_hook(lambda _m, _i, out: seen.__setitem__("fov", out.detach())),
    ]
    with torch.no_grad():
        model(pixel_values=scene)
        for hook in hooks:
            hook.remove()
        for layer, key, mean, spread in ((depth_last, "depth", 1.0, 0.15), (fov_last, "fov", 60.0, 5.0)):
            out = seen[key] - layer.bias.reshape(1, -1, 1, 1)
            # The FOV head answers one number per photo: its size, not its spread, sets the scale.
            size_now = float(out.std()) if out.numel() > 1 else float(out.abs().mean())
            scale = spread / max(size_now, 1e-6)
            layer.weight.mul_(scale)
            layer.bias.fill_(mean - scale * float(out.mean()))
