"""VAE nodes: encode, decode, tiled encode / decode, encode for inpainting.

IMAGE [B, H, W, 3] in 0..1 <-> VAE input [B, 3, H, W] in -1..1. LATENTs are the unscaled VAE latent
(the 0.18215 factor belongs to sampling). Encoding takes the mean of the latent distribution, as ComfyUI.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import progress
from .latent import check_mask
from .types import GLASS_VAE, IMAGE, LATENT, MASK, GlassVAE, NodeInputError

CATEGORY = "Glass Diffusion/vae"


def check_vae(node: str, vae) -> GlassVAE:
    if not isinstance(vae, GlassVAE):
        raise NodeInputError(node, "vae", f"expected a GLASS_VAE (from a Glass loader), got {type(vae).__name__}")
    return vae


def check_image(node: str, name: str, pixels, multiple: int = 8) -> torch.Tensor:
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise NodeInputError(node, name, f"expected an IMAGE tensor [B, H, W, 3], got "
                                         f"{getattr(pixels, 'shape', type(pixels).__name__)}")
    if pixels.shape[1] < multiple or pixels.shape[2] < multiple:
        raise NodeInputError(node, name, f"image {pixels.shape[2]}x{pixels.shape[1]} is smaller than {multiple} px")
    return pixels[..., :3]


def crop_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crop [B, H, W, C] to a multiple of `multiple` pixels (as ComfyUI's VAE encode)."""
    h, w = (pixels.shape[1] // multiple) * multiple, (pixels.shape[2] // multiple) * multiple
    y, x = (pixels.shape[1] % multiple) // 2, (pixels.shape[2] % multiple) // 2
    return pixels[:, y:y + h, x:x + w]


@torch.no_grad()
def encode_pixels(vae: GlassVAE, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] (0..1, H and W multiples of 8) -> unscaled latent [B, 4, H/8, W/8] (CPU, float32)."""
    x = pixels.movedim(-1, 1).to(vae.device, vae.dtype) * 2.0 - 1.0  # (B, H, W, 3) -> (B, 3, H, W), -1..1
    return vae.model.encode(x).mode().float().cpu()


@torch.no_grad()
def decode_latent(vae: GlassVAE, samples: torch.Tensor) -> torch.Tensor:
    """Unscaled latent [B, 4, h, w] -> IMAGE [B, 8h, 8w, 3] in 0..1 (CPU, float32)."""
    x = vae.model.decode(samples.to(vae.device, vae.dtype)).float()
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).contiguous().cpu()  # (B, 3, H, W) -> (B, H, W, 3)


def _ramp(n: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    """1-D blend weights of a tile: rising over `overlap` at inner edges, 1 elsewhere."""
    w = torch.ones(n)
    if overlap > 0:
        r = (torch.arange(overlap) + 0.5) / overlap
        if not first:
            w[:overlap] = r
        if not last:
            w[n - overlap:] = r.flip(0)
    return w


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(n)})


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float, out_channels: int) -> torch.Tensor:
    """Apply fn (NCHW -> NC'(H*scale)(W*scale)) tile by tile over x [B, C, H, W], feathering the overlaps."""
    B, _, H, W = x.shape
    out = torch.zeros(B, out_channels, round(H * scale), round(W * scale))
    weight = torch.zeros(1, 1, out.shape[2], out.shape[3])
    ys, xs = _starts(H, tile, overlap), _starts(W, tile, overlap)
    bar = progress.ProgressBar(len(ys) * len(xs), desc="tiles") if len(ys) * len(xs) > 1 else None
    for y in ys:
        for x0 in xs:
            part = fn(x[:, :, y:y + tile, x0:x0 + tile]).float().cpu()
            if bar is not None:
                bar.update(1)  # also where Cancel is honoured
            th, tw = part.shape[-2:]
            oy, ox, ov = round(y * scale), round(x0 * scale), round(overlap * scale)
            wy = _ramp(th, min(ov, th // 2), y == ys[0], y == ys[-1])
            wx = _ramp(tw, min(ov, tw // 2), x0 == xs[0], x0 == xs[-1])
            w = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, th, tw)
            out[:, :, oy:oy + th, ox:ox + tw] += part * w
            weight[:, :, oy:oy + th, ox:ox + tw] += w
    return out / weight


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
        node = "GlassVAEEncode"
        vae = check_vae(node, vae)
        pixels = crop_to_multiple(check_image(node, "pixels", pixels, vae.downscale), vae.downscale)
        return ({"samples": encode_pixels(vae, pixels)},)


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
        from .latent import check_latent
        node = "GlassVAEDecode"
        vae = check_vae(node, vae)
        return (decode_latent(vae, check_latent(node, "samples", samples)),)


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
        node = "GlassVAEEncodeTiled"
        vae = check_vae(node, vae)
        d = vae.downscale
        pixels = crop_to_multiple(check_image(node, "pixels", pixels, d), d)
        tile, overlap = _tile_and_overlap(node, tile_size, overlap, d)
        x = pixels.movedim(-1, 1)  # (B, H, W, 3) -> (B, 3, H, W)
        fn = lambda t: encode_pixels(vae, t.movedim(1, -1))
        return ({"samples": tiled(fn, x, tile, overlap, 1.0 / d, 4)},)


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
        from .latent import check_latent
        node = "GlassVAEDecodeTiled"
        vae = check_vae(node, vae)
        z = check_latent(node, "samples", samples)
        d = vae.downscale
        tile, overlap = _tile_and_overlap(node, tile_size, overlap, d)
        fn = lambda t: decode_latent(vae, t).movedim(-1, 1)
        image = tiled(fn, z, tile // d, overlap // d, float(d), 3)  # (B, 3, H, W)
        return (image.movedim(1, -1).clamp(0, 1).contiguous(),)


def _tile_and_overlap(node: str, tile_size: int, overlap: int, d: int) -> tuple[int, int]:
    if tile_size < 2 * d or tile_size % d:
        raise NodeInputError(node, "tile_size", f"must be a multiple of {d} pixels, got {tile_size}")
    if overlap < 0:
        raise NodeInputError(node, "overlap", f"must be >= 0, got {overlap}")
    overlap = min(overlap, tile_size // 4) // d * d
    return tile_size, overlap


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
        node = "GlassVAEEncodeForInpaint"
        vae = check_vae(node, vae)
        pixels = check_image(node, "pixels", pixels, vae.downscale)
        mask = check_mask(node, "mask", mask).float()
        if not 0 <= grow_mask_by <= 64:
            raise NodeInputError(node, "grow_mask_by", f"must be in 0..64, got {grow_mask_by}")
        H, W = pixels.shape[1:3]
        m = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=(H, W), mode="bilinear")  # (B, 1, H, W)
        d = vae.downscale
        h, w = H // d * d, W // d * d
        y, x = (H % d) // 2, (W % d) // 2
        pixels, m = pixels[:, y:y + h, x:x + w].clone(), m[:, :, y:y + h, x:x + w]
        if grow_mask_by == 0:
            grown = m
        else:
            kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
            grown = F.conv2d(m.round(), kernel, padding=math.ceil((grow_mask_by - 1) / 2)).clamp(0, 1)
        keep = (1.0 - m.round()).squeeze(1)[..., None]  # (B, h, w, 1)
        if keep.shape[0] != pixels.shape[0] and keep.shape[0] == 1:
            keep = keep.expand(pixels.shape[0], -1, -1, -1)
        pixels = (pixels - 0.5) * keep + 0.5  # masked pixels -> grey 0.5
        samples = encode_pixels(vae, pixels)
        return ({"samples": samples, "noise_mask": grown[:, :, :h, :w].round()},)


NODE_CLASS_MAPPINGS = {"GlassVAEEncode": GlassVAEEncode, "GlassVAEDecode": GlassVAEDecode,
                       "GlassVAEEncodeTiled": GlassVAEEncodeTiled, "GlassVAEDecodeTiled": GlassVAEDecodeTiled,
                       "GlassVAEEncodeForInpaint": GlassVAEEncodeForInpaint}
NODE_DISPLAY_NAME_MAPPINGS = {"GlassVAEEncode": "VAE Encode (Glass)", "GlassVAEDecode": "VAE Decode (Glass)",
                              "GlassVAEEncodeTiled": "VAE Encode Tiled (Glass)",
                              "GlassVAEDecodeTiled": "VAE Decode Tiled (Glass)",
                              "GlassVAEEncodeForInpaint": "VAE Encode for Inpainting (Glass)"}
