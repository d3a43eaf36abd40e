"""Latent nodes: empty latent, upscale, noise mask, pick from a batch. LATENT = ComfyUI's dict
{"samples": [B, 4, H/8, W/8] unscaled, "noise_mask"?: [B, 1, H, W], "batch_index"?: list[int]}."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .types import LATENT, MASK, NodeInputError, node_inputs
from .notes import note

CATEGORY = "Glass Diffusion/latent"
MAX_RESOLUTION = 16384
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic"]
CROP_METHODS = ["disabled", "center"]
EMPTY_MASK = ("the mask is empty (all 0: nothing marked to repaint; an image with no transparent pixels gives this), "
              "so inpainting will leave the picture as it is")


def check_latent(node: str, name: str, latent) -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise NodeInputError(node, name, "expected a LATENT (a dict with a 'samples' tensor)")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise NodeInputError(node, name, f"expected samples [B, C, H/8, W/8], got {tuple(samples.shape)}")
    return samples


def check_mask(node: str, name: str, mask) -> torch.Tensor:
    from ..sd_core.pixels import check_mask as check
    with node_inputs(node):
        return check(mask, name)


def note_rounding(node: str, width: int, height: int) -> None:
    """A note when a size in pixels is not a multiple of 8: the latent (1/8 of it) covers the size rounded down."""
    for name, v in (("width", width), ("height", height)):
        if v % 8:
            note(node, name, f"{v} px is not a multiple of 8; the latent is {v // 8} wide, so the picture will be "
                             f"{v // 8 * 8} px")


def resize(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, height, width]; crop='center' first cuts the sides to the new aspect ratio."""
    if crop == "center":
        old_h, old_w = samples.shape[-2:]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = round((old_w - old_w * new_aspect / old_aspect) / 2) if old_aspect > new_aspect else 0
        y = round((old_h - old_h * old_aspect / new_aspect) / 2) if old_aspect < new_aspect else 0
        samples = samples[..., y:old_h - y, x:old_w - x]
    return F.interpolate(samples, size=(height, width), mode=method)


class GlassEmptyLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "Image width in pixels (the latent is width/8 wide)."}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "Image height in pixels (the latent is height/8 high)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "Number of images; each gets its own noise from the one seed."}),
        }}

    RETURN_TYPES = (LATENT,)
    OUTPUT_TOOLTIPS = ("A batch of zero latents [B, 4, H/8, W/8].",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "A batch of empty (zero) latents to start text-to-image sampling from."

    def generate(self, width, height, batch_size=1):
        for name, v in (("width", width), ("height", height)):
            if v < 8:
                raise NodeInputError("GlassEmptyLatent", name, f"must be at least 8 pixels, got {v}")
        if batch_size < 1:
            raise NodeInputError("GlassEmptyLatent", "batch_size", f"must be at least 1, got {batch_size}")
        note_rounding("GlassEmptyLatent", width, height)
        return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8)},)


class GlassLatentUpscale:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": (LATENT, {"tooltip": "The latent to resize."}),
            "upscale_method": (UPSCALE_METHODS, {"tooltip": "Interpolation mode."}),
            "width": ("INT", {"default": 1024, "min": 0, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "Target width in pixels; 0 keeps the aspect ratio from height."}),
            "height": ("INT", {"default": 1024, "min": 0, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "Target height in pixels; 0 keeps the aspect ratio from width."}),
            "crop": (CROP_METHODS, {"tooltip": "'center' cuts the sides to the new aspect ratio first."}),
        }}

    RETURN_TYPES = (LATENT,)
    OUTPUT_TOOLTIPS = ("The resized latent (noise mask and batch indices kept).",)
    FUNCTION = "upscale"
    CATEGORY = CATEGORY
    DESCRIPTION = "Resizes a latent, e.g. for a hires-fix second pass. Sizes are in pixels (latent = pixels/8)."

    def upscale(self, samples, upscale_method, width, height, crop):
        node = "GlassLatentUpscale"
        x = check_latent(node, "samples", samples)
        if upscale_method not in UPSCALE_METHODS:
            raise NodeInputError(node, "upscale_method", f"{upscale_method!r} is not one of {UPSCALE_METHODS}")
        if crop not in CROP_METHODS:
            raise NodeInputError(node, "crop", f"{crop!r} is not one of {CROP_METHODS}")
        if width == 0 and height == 0:
            return (samples,)
        h, w = x.shape[-2:]
        if width == 0:
            width = round(w * height / h)  # keep the aspect ratio
        elif height == 0:
            height = round(h * width / w)
        width, height = max(64, width), max(64, height)
        note_rounding(node, width, height)
        out = dict(samples)
        out["samples"] = resize(x, width // 8, height // 8, upscale_method, crop)
        return (out,)


class GlassSetNoiseMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": (LATENT, {"tooltip": "The latent to inpaint."}),
            "mask": (MASK, {"tooltip": "1 = repaint, 0 = keep. Any size: it is resized to the latent when sampling."}),
        }}

    RETURN_TYPES = (LATENT,)
    OUTPUT_TOOLTIPS = ("The latent with a noise mask: sampling changes only the masked area.",)
    FUNCTION = "set_mask"
    CATEGORY = CATEGORY
    DESCRIPTION = "Limits sampling to the masked area (inpainting with an ordinary 4-channel model)."

    def set_mask(self, samples, mask):
        check_latent("GlassSetNoiseMask", "samples", samples)
        mask = check_mask("GlassSetNoiseMask", "mask", mask)
        if not mask.any():
            note("GlassSetNoiseMask", "mask", EMPTY_MASK)
        out = dict(samples)
        out["noise_mask"] = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
        return (out,)


class GlassLatentFromBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": (LATENT, {"tooltip": "A batch of latents."}),
            "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095, "tooltip": "First latent to take (0-based)."}),
            "length": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "How many latents to take."}),
        }}

    RETURN_TYPES = (LATENT,)
    OUTPUT_TOOLTIPS = ("The picked latents; they remember their batch index, so re-sampling them gets the same noise.",)
    FUNCTION = "pick"
    CATEGORY = CATEGORY
    DESCRIPTION = "Picks latents out of a batch (e.g. the one seed of a batch you want to refine)."

    def pick(self, samples, batch_index, length):
        x = check_latent("GlassLatentFromBatch", "samples", samples)
        start = min(x.shape[0] - 1, batch_index)
        length = min(x.shape[0] - start, length)
        out = dict(samples)
        out["samples"] = x[start:start + length].clone()
        if "noise_mask" in samples:
            masks = samples["noise_mask"]
            if masks.shape[0] == 1:
                out["noise_mask"] = masks.clone()
            else:
                if masks.shape[0] < x.shape[0]:
                    masks = masks.repeat(math.ceil(x.shape[0] / masks.shape[0]), *([1] * (masks.ndim - 1)))[:x.shape[0]]
                out["noise_mask"] = masks[start:start + length].clone()
        old = samples.get("batch_index")
        out["batch_index"] = list(range(start, start + length)) if old is None else list(old[start:start + length])
        return (out,)


NODE_CLASS_MAPPINGS = {"GlassEmptyLatent": GlassEmptyLatent, "GlassLatentUpscale": GlassLatentUpscale,
                       "GlassSetNoiseMask": GlassSetNoiseMask, "GlassLatentFromBatch": GlassLatentFromBatch}
NODE_DISPLAY_NAME_MAPPINGS = {"GlassEmptyLatent": "Empty Latent (Glass)", "GlassLatentUpscale": "Upscale Latent (Glass)",
                              "GlassSetNoiseMask": "Set Noise Mask (Glass)", "GlassLatentFromBatch": "Latent From Batch (Glass)"}
