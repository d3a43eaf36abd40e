"""VAE nodes: encode, decode, tiled encode / decode, encode for inpainting (the work is sd_core.pixels').

IMAGE [B, H, W, 3] in 0..1 <-> VAE input [B, 3, H, W] in -1..1. LATENTs are the unscaled VAE latent
(the family's scale factor belongs to sampling). Encoding takes the mean of the latent distribution, as ComfyUI.
"""
from __future__ import annotations

from . import comfy_memory, progress
from .latent import EMPTY_MASK, check_latent
from .notes import note
from .types import GLASS_VAE, IMAGE, LATENT, MASK, GlassVAE, NodeInputError, node_inputs

CATEGORY = "Glass Diffusion/vae"


def check_vae(node: str, vae) -> GlassVAE:
    if not isinstance(vae, GlassVAE):
        raise NodeInputError(node, "vae", f"expected a GLASS_VAE (from a Glass loader), got {type(vae).__name__}")
    return vae


def _tile_progress(count: int):
    """on_tile callback for sd_core.pixels' tiled functions: a progress bar (and Cancel) when there are tiles."""
    if count <= 1:
        return None, None
    bar = progress.ProgressBar(count, desc="tiles")
    return bar, lambda: bar.update(1)


def note_crop(node: str, pixels, multiple: int):
    """A note when an IMAGE [B, H, W, C] is not a multiple of `multiple` pixels: encoding keeps its centre."""
    h, w = pixels.shape[1] // multiple * multiple, pixels.shape[2] // multiple * multiple
    if (h, w) != tuple(pixels.shape[1:3]):
        note(node, "pixels", f"{pixels.shape[2]}x{pixels.shape[1]} px is not a multiple of {multiple}; "
                             f"the centre {w}x{h} px are encoded")
    return pixels


class GlassVAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": (IMAGE, {"tooltip": "The images to encode (cropped to a multiple of 8 pixels)."}),
            "vae": (GLASS_VAE, {"tooltip": "The autoencoder."}),
        }}

    RETURN_TYPES = (LATENT,)
    OUTPUT_TOOLTIPS = ("The (unscaled) latent, for image-to-image.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes images into latents (the mean of the VAE's latent distribution)."

    def encode(self, pixels, vae):
        from ..sd_core import pixels as px
        node = "GlassVAEEncode"
        vae = check_vae(node, vae)
        comfy_memory.use(vae.model)  # inside ComfyUI: loaded by its model management
        with node_inputs(node):
            pixels = px.crop_to_multiple(note_crop(node, px.check_image(pixels, "pixels", vae.downscale),
                                                   vae.downscale), vae.downscale)
        return ({"samples": px.encode_pixels(vae.model, pixels)},)


class GlassVAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": (LATENT, {"tooltip": "The latent to decode."}),
            "vae": (GLASS_VAE, {"tooltip": "The autoencoder."}),
        }}

    RETURN_TYPES = (IMAGE,)
    OUTPUT_TOOLTIPS = ("The decoded images, [B, H, W, 3] in 0..1.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Decodes latents into images."

    def decode(self, samples, vae):
        from ..sd_core import pixels as px
        node = "GlassVAEDecode"
        vae = check_vae(node, vae)
        comfy_memory.use(vae.model)  # inside ComfyUI: loaded by its model management
        return (px.decode_latent(vae.model, check_latent(node, "samples", samples)),)


def _tile_inputs(default_tile: int, step: int):
    return {
        "tile_size": ("INT", {"default": default_tile, "min": 64, "max": 4096, "step": step,
                              "tooltip": "Tile size in pixels; smaller tiles use less memory."}),
        "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32,
                            "tooltip": "Overlap between tiles in pixels, blended to hide seams (at most a quarter of the tile)."}),
    }


class GlassVAEEncodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": (IMAGE, {"tooltip": "The images to encode."}),
            "vae": (GLASS_VAE, {"tooltip": "The autoencoder."}),
            **_tile_inputs(512, 64),
        }}

    RETURN_TYPES = (LATENT,)
    OUTPUT_TOOLTIPS = ("The (unscaled) latent.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes large images tile by tile, to fit in less memory."

    def encode(self, pixels, vae, tile_size, overlap):
        from ..sd_core import pixels as px
        node = "GlassVAEEncodeTiled"
        vae = check_vae(node, vae)
        comfy_memory.use(vae.model)  # inside ComfyUI: loaded by its model management
        with node_inputs(node):
            note_crop(node, px.check_image(pixels), vae.downscale)
            bar, on_tile = _tile_progress(px.tiles_of(px.check_image(pixels).shape, tile_size, overlap,
                                                      vae.downscale, pixel_space=True))
            try:
                return ({"samples": px.encode_tiled(vae.model, pixels, tile_size, overlap, on_tile)},)
            finally:
                if bar is not None:
                    bar.close()


class GlassVAEDecodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": (LATENT, {"tooltip": "The latent to decode."}),
            "vae": (GLASS_VAE, {"tooltip": "The autoencoder."}),
            **_tile_inputs(512, 32),
        }}

    RETURN_TYPES = (IMAGE,)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Decodes large latents tile by tile, to fit in less memory."

    def decode(self, samples, vae, tile_size, overlap):
        from ..sd_core import pixels as px
        node = "GlassVAEDecodeTiled"
        vae = check_vae(node, vae)
        comfy_memory.use(vae.model)  # inside ComfyUI: loaded by its model management
        z = check_latent(node, "samples", samples)
        with node_inputs(node):
            bar, on_tile = _tile_progress(px.tiles_of(z.shape, tile_size, overlap, vae.downscale, pixel_space=False))
            try:
                return (px.decode_tiled(vae.model, z, tile_size, overlap, on_tile),)
            finally:
                if bar is not None:
                    bar.close()


class GlassVAEEncodeForInpaint:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": (IMAGE, {"tooltip": "The image to inpaint."}),
            "vae": (GLASS_VAE, {"tooltip": "The autoencoder."}),
            "mask": (MASK, {"tooltip": "1 = repaint. The masked pixels are set to grey before encoding."}),
            "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1, "tooltip":
                             "Grow the noise mask by this many pixels, to hide the seam."}),
        }}

    RETURN_TYPES = (LATENT,)
    OUTPUT_TOOLTIPS = ("The latent of the image with the masked area greyed out, with the (grown) noise mask: "
                       "the input a 9-channel inpainting UNet expects.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Prepares inpainting with a 9-channel inpainting checkpoint: greys out the masked pixels, "
                   "encodes, and attaches the mask (as VAEEncodeForInpaint).")

    def encode(self, pixels, vae, mask, grow_mask_by=6):
        from ..sd_core import pixels as px
        node = "GlassVAEEncodeForInpaint"
        vae = check_vae(node, vae)
        comfy_memory.use(vae.model)  # inside ComfyUI: loaded by its model management
        if hasattr(mask, "any") and not mask.any():  # a MASK tensor with nothing to repaint
            note(node, "mask", EMPTY_MASK)
        with node_inputs(node):
            note_crop(node, px.check_image(pixels), vae.downscale)
            pixels, noise_mask = px.prepare_inpaint(pixels, mask, vae.downscale, grow_mask_by)
        return ({"samples": px.encode_pixels(vae.model, pixels), "noise_mask": noise_mask},)


NODE_CLASS_MAPPINGS = {"GlassVAEEncode": GlassVAEEncode, "GlassVAEDecode": GlassVAEDecode,
                       "GlassVAEEncodeTiled": GlassVAEEncodeTiled, "GlassVAEDecodeTiled": GlassVAEDecodeTiled,
                       "GlassVAEEncodeForInpaint": GlassVAEEncodeForInpaint}
NODE_DISPLAY_NAME_MAPPINGS = {"GlassVAEEncode": "VAE Encode (Glass)", "GlassVAEDecode": "VAE Decode (Glass)",
                              "GlassVAEEncodeTiled": "VAE Encode Tiled (Glass)",
                              "GlassVAEDecodeTiled": "VAE Decode Tiled (Glass)",
                              "GlassVAEEncodeForInpaint": "VAE Encode for Inpainting (Glass)"}
