"""ControlNet nodes: load a ControlNet, apply it to a positive/negative conditioning pair (ComfyUI's
ControlNetApplyAdvanced inputs), and control-image preprocessors that take and give IMAGEs.

The control rides on our CONDITIONING entries under the key `glass_control` (sd_core.controlnet.CONTROL_KEY):
ComfyUI's conditioning nodes copy entry dicts, so they pass it through, and ComfyUI's own samplers never read
it. Glass samplers add the residuals (times strength) inside [start_percent, end_percent], in the same batch as
the positive/negative UNet call. ControlNet files are listed from ComfyUI's models/controlnet (headless:
<models_dir>/controlnet); the list starts with the built-in "glass-tiny silhouette (built-in)" ControlNet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import comfy_memory, paths
from .latent import check_mask
from .loaders import DTYPE_CHOICES, DTYPE_TOOLTIP
from .types import CONDITIONING, IMAGE, MASK, NodeInputError

CATEGORY = "Glass Diffusion/controlnet"
SHAPES = ["circle", "square", "triangle"]  # sd_core.control_images.SHAPES (sd_core is imported lazily, when a node runs)
GLASS_CONTROL_NET = "GLASS_CONTROL_NET"
MAX_STRENGTH = 10.0


@dataclass
class GlassControlNet:
    """A loaded ControlNet (GLASS_CONTROL_NET)."""
    model: torch.nn.Module  # sd_core.controlnet.ControlNet
    source: str = ""

    def __repr__(self) -> str:  # never the module tree in error reports
        p = next(self.model.parameters())
        return f"GlassControlNet({self.source or 'unnamed'}, {p.device.type} {str(p.dtype).removeprefix('torch.')})"


def _builtin():
    from ..sd_core import builtin
    return builtin


def controlnet_names() -> list[str]:
    """The built-in ControlNet (where the package ships it) first, then the controlnet folder's files."""
    builtin = _builtin()
    files = [n for n in paths.list_files("controlnet") if n != builtin.CONTROLNET_NAME]
    return ([builtin.CONTROLNET_NAME] if builtin.CONTROLNET.is_file() else []) + files


class GlassControlNetLoader:
    @classmethod
    def INPUT_TYPES(cls):
        builtin = _builtin()
        return {"required": {
            "control_net_name": (controlnet_names(), {"tooltip":
                                 "An SD 1.x / 2.x ControlNet file (LDM control_model.* or diffusers layout) from the "
                                 f"controlnet folder, or the built-in {builtin.CONTROLNET_NAME!r} for the built-in "
                                 "model: its control image is a white silhouette of the shape on black."}),
            "weight_dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    RETURN_TYPES = (GLASS_CONTROL_NET,)
    RETURN_NAMES = ("control_net",)
    OUTPUT_TOOLTIPS = ("The ControlNet, for Apply ControlNet (Glass).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a ControlNet for Glass Diffusion's models (SD 1.x; SD 2.x where the UNet supports it)."

    def load(self, control_net_name, weight_dtype="auto"):
        from ..sd_core.controlnet import load_controlnet
        builtin = _builtin()
        node = "GlassControlNetLoader"
        if weight_dtype not in DTYPE_CHOICES:
            raise NodeInputError(node, "weight_dtype", f"{weight_dtype!r} is not one of {DTYPE_CHOICES}")
        if control_net_name == builtin.CONTROLNET_NAME:
            path = builtin.CONTROLNET
        else:
            path = paths.full_path("controlnet", control_net_name)
            if path is None:
                where = "ComfyUI's models/controlnet" if paths.comfy_folder_paths() else str(paths.folder("controlnet"))
                raise NodeInputError(node, "control_net_name", f"no file {control_net_name!r} in {where}")
        device, dtype = paths.device_and_dtype(weight_dtype)
        net = load_controlnet(path, device=device, dtype=dtype)  # CheckpointError names the file
        comfy_memory.register(net, lambda: load_controlnet(path, device="cpu", dtype=dtype).state_dict(), "control")
        return (GlassControlNet(net, source=control_net_name),)


def _check_percent(node, name, value) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise NodeInputError(node, name, f"must be in 0..1, got {value!r}")
    return v


class GlassControlNetApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": (CONDITIONING, {"tooltip": "The positive conditioning to guide with the control image."}),
            "negative": (CONDITIONING, {"tooltip": "The negative conditioning (the control applies to it too, as "
                                                   "in ComfyUI)."}),
            "control_net": (GLASS_CONTROL_NET, {"tooltip": "From Load ControlNet (Glass)."}),
            "image": (IMAGE, {"tooltip": "The control image, [B, H, W, 3] in 0..1: one image, or one per latent. "
                                         "Any size: it is centre-cropped and resized (nearest-exact) to the image "
                                         "size being sampled, as ComfyUI does."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_STRENGTH, "step": 0.01, "tooltip":
                                   "Multiplies every residual the ControlNet adds. 0 leaves the conditioning as it is."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                        "Where in the sampling (0 = first step) the control starts to apply."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                      "Where in the sampling (1 = last step) it stops."}),
        }}

    RETURN_TYPES = (CONDITIONING, CONDITIONING)
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The positive conditioning carrying the control.", "The negative conditioning carrying it.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Guides the layout with a control image (ComfyUI's Apply ControlNet inputs). Chain several: "
                   "their residuals add up.")

    def apply(self, positive, negative, control_net, image, strength=1.0, start_percent=0.0, end_percent=1.0):
        from ..sd_core.controlnet import apply_control, check_conditioning_width, check_image
        node = "GlassControlNetApply"
        if not isinstance(control_net, GlassControlNet):
            raise NodeInputError(node, "control_net", f"expected a GLASS_CONTROL_NET (from Load ControlNet (Glass)), "
                                                      f"got {type(control_net).__name__}")
        width = control_net.model.config.unet.context_dim
        for name, cond in (("positive", positive), ("negative", negative)):
            try:
                check_conditioning_width(cond, width, name)
            except ValueError as e:
                raise NodeInputError(node, name, f"{e} (the ControlNet's text width is {width})") from None
        try:
            hint = check_image(image)
        except ValueError as e:
            raise NodeInputError(node, "image", str(e)) from None
        s = float(strength)
        if not (math.isfinite(s) and 0.0 <= s <= MAX_STRENGTH):
            raise NodeInputError(node, "strength", f"must be a number in 0..{MAX_STRENGTH:g}, got {strength!r}")
        start, end = _check_percent(node, "start_percent", start_percent), _check_percent(node, "end_percent", end_percent)
        if start > end:
            raise NodeInputError(node, "start_percent", f"{start} is after end_percent {end}: the control would never apply")
        if s == 0.0:
            return (positive, negative)
        shared = {}  # positive and negative share one application per earlier chain, so they batch together
        return (apply_control(positive, control_net.model, hint, s, start, end, shared),
                apply_control(negative, control_net.model, hint, s, start, end, shared))


def _image(node, image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise NodeInputError(node, "image", f"expected an IMAGE tensor [B, H, W, 3], got "
                                            f"{getattr(image, 'shape', type(image).__name__)}")
    if not torch.isfinite(image).all():
        raise NodeInputError(node, "image", "contains NaN or infinite values")
    return image[..., :3].float()


class GlassCannyEdges:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": (IMAGE, {"tooltip": "Any IMAGE (e.g. from Load Image)."}),
            "low_threshold": ("FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01, "tooltip":
                                        "Weaker edges are kept only where they connect to strong ones "
                                        "(1 = a sharp black-to-white edge)."}),
            "high_threshold": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01, "tooltip":
                                         "Edges at least this strong are always kept."}),
        }}

    RETURN_TYPES = (IMAGE,)
    OUTPUT_TOOLTIPS = ("White one-pixel edges on black, [B, H, W, 3].",)
    FUNCTION = "edges"
    CATEGORY = CATEGORY + "/preprocessors"
    DESCRIPTION = "Canny edge detection in torch (for canny ControlNets)."

    def edges(self, image, low_threshold=0.4, high_threshold=0.8):
        from ..sd_core.control_images import canny
        node = "GlassCannyEdges"
        image = _image(node, image)
        if float(low_threshold) > float(high_threshold):
            raise NodeInputError(node, "low_threshold", f"{low_threshold} is above high_threshold {high_threshold}")
        try:
            return (canny(image, float(low_threshold), float(high_threshold)),)
        except ValueError as e:
            raise NodeInputError(node, "image", str(e)) from None


class GlassInvertImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (IMAGE, {"tooltip": "Any IMAGE."})}}

    RETURN_TYPES = (IMAGE,)
    OUTPUT_TOOLTIPS = ("1 - image.",)
    FUNCTION = "invert"
    CATEGORY = CATEGORY + "/preprocessors"
    DESCRIPTION = "Inverts an image (black lines on white <-> white on black, as ControlNets expect)."

    def invert(self, image):
        return (1.0 - _image("GlassInvertImage", image),)


class GlassMaskToControlImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": (MASK, {"tooltip": "A MASK [B, H, W] (e.g. Load Image's alpha, or Shape Mask)."})}}

    RETURN_TYPES = (IMAGE,)
    OUTPUT_TOOLTIPS = ("The mask as an image: 1 = white, [B, H, W, 3].",)
    FUNCTION = "convert"
    CATEGORY = CATEGORY + "/preprocessors"
    DESCRIPTION = "Turns a mask into a control image (white where the mask is 1), e.g. a silhouette."

    def convert(self, mask):
        node = "GlassMaskToControlImage"
        mask = check_mask(node, "mask", mask)
        if mask.ndim == 4:
            mask = mask.reshape(-1, *mask.shape[-2:])
        if not torch.isfinite(mask).all():
            raise NodeInputError(node, "mask", "contains NaN or infinite values")
        from ..sd_core.control_images import mask_to_image
        return (mask_to_image(mask),)


class GlassShapeMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "shape": (SHAPES, {"tooltip": "The shape to draw."}),
            "width": ("INT", {"default": 64, "min": 8, "max": 8192, "step": 8, "tooltip": "Mask width in pixels."}),
            "height": ("INT", {"default": 64, "min": 8, "max": 8192, "step": 8, "tooltip": "Mask height in pixels."}),
            "x": ("FLOAT", {"default": 32.0, "min": -8192.0, "max": 8192.0, "step": 1.0,
                            "tooltip": "Centre, pixels from the left."}),
            "y": ("FLOAT", {"default": 32.0, "min": -8192.0, "max": 8192.0, "step": 1.0,
                            "tooltip": "Centre, pixels from the top."}),
            "size": ("FLOAT", {"default": 10.0, "min": 0.5, "max": 8192.0, "step": 0.5, "tooltip":
                               "Half extent in pixels (circle: radius; square: half side)."}),
        }}

    RETURN_TYPES = (MASK,)
    OUTPUT_TOOLTIPS = ("[1, height, width]: 1 inside the shape.",)
    FUNCTION = "draw"
    CATEGORY = CATEGORY + "/preprocessors"
    DESCRIPTION = "Draws one filled shape as a MASK (a silhouette for the built-in ControlNet, or a quick mask)."

    def draw(self, shape, width=64, height=64, x=32.0, y=32.0, size=10.0):
        from ..sd_core.control_images import shape_mask
        node = "GlassShapeMask"
        if shape not in SHAPES:
            raise NodeInputError(node, "shape", f"{shape!r} is not one of {SHAPES}")
        for name, v in (("x", x), ("y", y), ("size", size)):
            if not math.isfinite(float(v)):
                raise NodeInputError(node, name, f"must be finite, got {v!r}")
        if float(size) <= 0:
            raise NodeInputError(node, "size", f"must be > 0, got {size!r}")
        return (shape_mask(shape, int(width), int(height), float(x), float(y), float(size)),)


NODE_CLASS_MAPPINGS = {
    "GlassControlNetLoader": GlassControlNetLoader,
    "GlassControlNetApply": GlassControlNetApply,
    "GlassCannyEdges": GlassCannyEdges,
    "GlassInvertImage": GlassInvertImage,
    "GlassMaskToControlImage": GlassMaskToControlImage,
    "GlassShapeMask": GlassShapeMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GlassControlNetLoader": "Load ControlNet (Glass)",
    "GlassControlNetApply": "Apply ControlNet (Glass)",
    "GlassCannyEdges": "Canny Edges (Glass)",
    "GlassInvertImage": "Invert Image (Glass)",
    "GlassMaskToControlImage": "Mask to Control Image (Glass)",
    "GlassShapeMask": "Shape Mask (Glass)",
}
