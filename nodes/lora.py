"""LoRA loader nodes: a LoRA / LyCORIS file from the loras folder as weight patches on the UNet and CLIP handles.

Files are listed from ComfyUI's models/loras inside ComfyUI and <models_dir>/loras headless (nodes/paths.py).
The loaded model is never changed: the outputs are copies of the input handles that carry one more patch
(sd_core/lora.py), so the same loader can feed a LoRA branch and a plain branch, and chained loaders stack in
order. Strength 0 returns the input unchanged.
"""
from __future__ import annotations

from . import paths
from .types import GLASS_CLIP, GLASS_UNET, GlassCLIP, GlassUNet, NodeInputError

CATEGORY = "Glass Diffusion/loaders"
STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
BUILTIN_NAME = "glass-tiny-bar (built-in)"  # the LoRA this repository trains for glass-tiny (sd_core/lora_train.py)


def builtin_file():
    from ..sd_core import builtin
    return builtin.BUILTIN_DIR / "glass-tiny-bar.safetensors"


def lora_names() -> list[str]:
    """The loaders' choices: the built-in LoRA (when shipped) first, then the loras folder's files."""
    return ([BUILTIN_NAME] if builtin_file().is_file() else []) + paths.list_files("loras")


def lora_file(name):
    """The file behind a LoRA choice, or None."""
    if name == BUILTIN_NAME:
        return builtin_file() if builtin_file().is_file() else None
    return paths.full_path("loras", name) if isinstance(name, str) else None


def _lora_path(node: str, lora_name):
    path = lora_file(lora_name)
    if path is None:
        where = "ComfyUI's models/loras" if paths.comfy_folder_paths() else str(paths.folder("loras"))
        raise NodeInputError(node, "lora_name", f"no file {lora_name!r} in {where}")
    return path


def _strength(node: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
        raise NodeInputError(node, name, f"must be a number in -100..100, got {value!r}")
    return float(value)


def apply_lora(node: str, unet: GlassUNet, clip, lora_name, strength_model, strength_clip):
    """(unet, clip) handles with the file's patches added (clip may be None)."""
    from ..sd_core.lora import LoraError, load_lora
    if not isinstance(unet, GlassUNet):
        raise NodeInputError(node, "unet", f"expected a GLASS_UNET (from a Glass loader), got {type(unet).__name__}")
    if clip is not None and not isinstance(clip, GlassCLIP):
        raise NodeInputError(node, "clip", f"expected a GLASS_CLIP (from a Glass loader), got {type(clip).__name__}")
    sm = _strength(node, "strength_model", strength_model)
    sc = _strength(node, "strength_clip", strength_clip)
    path = _lora_path(node, lora_name)
    if sm == 0 and sc == 0:
        return unet, clip
    try:
        unet_patch, clip_patch = load_lora(path, unet.model.unet, clip.model if clip is not None else None, sm, sc)
    except LoraError as e:
        raise NodeInputError(node, "lora_name", str(e)) from e
    if unet_patch is not None and sm != 0:
        unet = unet.with_patches(unet.model.patches + (unet_patch,))
    if clip is not None and clip_patch is not None and sc != 0:
        clip = clip.with_patches(clip.patches + (clip_patch,))
    return unet, clip


class GlassLoraLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet": (GLASS_UNET, {"tooltip": "The UNet to patch (from a checkpoint loader or another LoRA loader)."}),
            "clip": (GLASS_CLIP, {"tooltip": "The text encoder to patch."}),
            "lora_name": (lora_names(), {"tooltip": "A LoRA / LyCORIS file (kohya, LoCon, LoHa, LoKr, DoRA, "
                          f"diffusers / PEFT) from the loras folder, or {BUILTIN_NAME!r}: it teaches the built-in "
                          "glass-tiny the shape word 'bar'."}),
            "strength_model": ("FLOAT", {**STRENGTH, "tooltip": "How strongly the UNet is patched; 0 leaves it "
                               "as it is, negative values invert the LoRA."}),
            "strength_clip": ("FLOAT", {**STRENGTH, "tooltip": "How strongly the text encoder is patched."}),
        }}

    RETURN_TYPES = (GLASS_UNET, GLASS_CLIP)
    RETURN_NAMES = ("unet", "clip")
    OUTPUT_TOOLTIPS = ("The UNet with the LoRA applied (the loaded model itself is unchanged).",
                       "The text encoder with the LoRA applied.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a LoRA file to the UNet and text encoder, as ComfyUI's LoraLoader does. Chain several "
                   "to stack them; other branches of the graph keep the plain model.")

    def load(self, unet, clip, lora_name, strength_model=1.0, strength_clip=1.0):
        return apply_lora("GlassLoraLoader", unet, clip, lora_name, strength_model, strength_clip)


class GlassLoraLoaderModelOnly:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet": (GLASS_UNET, {"tooltip": "The UNet to patch."}),
            "lora_name": (lora_names(), {"tooltip": "A LoRA / LyCORIS file from the loras folder (or the "
                          "built-in one)."}),
            "strength_model": ("FLOAT", {**STRENGTH, "tooltip": "How strongly the UNet is patched; 0 leaves it "
                               "as it is."}),
        }}

    RETURN_TYPES = (GLASS_UNET,)
    RETURN_NAMES = ("unet",)
    OUTPUT_TOOLTIPS = ("The UNet with the LoRA applied (the loaded model itself is unchanged).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies a LoRA file to the UNet only (its text-encoder keys are ignored)."

    def load(self, unet, lora_name, strength_model=1.0):
        return (apply_lora("GlassLoraLoaderModelOnly", unet, None, lora_name, strength_model, 0.0)[0],)


NODE_CLASS_MAPPINGS = {"GlassLoraLoader": GlassLoraLoader, "GlassLoraLoaderModelOnly": GlassLoraLoaderModelOnly}
NODE_DISPLAY_NAME_MAPPINGS = {"GlassLoraLoader": "Load LoRA (Glass)",
                              "GlassLoraLoaderModelOnly": "Load LoRA, UNet only (Glass)"}
