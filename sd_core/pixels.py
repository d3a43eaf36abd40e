"""Pixels <-> latents: VAE encode / decode of ComfyUI IMAGEs, tiled encode / decode, inpainting preparation.

IMAGE [B, H, W, 3] in 0..1 <-> VAE input [B, 3, H, W] in -1..1. Latents here are the unscaled VAE latent (the
family's scale factor belongs to sampling). Encoding takes the mean of the latent distribution, as ComfyUI.
`vae` is an sd_core.vae.AutoencoderKL; results are float32 on the CPU.
"""
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import ParamError


def downscale(vae) -> int:
    """Pixels per latent cell (8 for SD)."""
    return 2 ** (len(vae.config.channel_mult) - 1)


def check_image(pixels, name="pixels", multiple: int = 8) -> torch.Tensor:
    """The RGB part of an IMAGE [B, H, W, >=3] at least `multiple` px on each side; ParamError(name) otherwise."""
    if not torch.is_tensor(pixels) or pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise ParamError(name, f"expected an IMAGE tensor [B, H, W, 3], got "
                               f"{getattr(pixels, 'shape', type(pixels).__name__)}")
    if pixels.shape[1] < multiple or pixels.shape[2] < multiple:
        raise ParamError(name, f"image {pixels.shape[2]}x{pixels.shape[1]} is smaller than {multiple} px")
    return pixels[..., :3]


def check_mask(mask, name="mask") -> torch.Tensor:
    if not torch.is_tensor(mask) or mask.ndim not in (2, 3, 4):
        raise ParamError(name, f"expected a MASK tensor [B, H, W] or [H, W], got "
                               f"{getattr(mask, 'shape', type(mask).__name__)}")
    return mask


def crop_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crop [B, H, W, C] to a multiple of `multiple` pixels (as ComfyUI's VAE encode)."""
    h, w = (pixels.shape[1] // multiple) * multiple, (pixels.shape[2] // multiple) * multiple
    y, x = (pixels.shape[1] % multiple) // 2, (pixels.shape[2] % multiple) // 2
    return pixels[:, y:y + h, x:x + w]


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] (0..1, H and W multiples of the downscale) -> unscaled latent [B, C, H/8, W/8]."""
    p = next(vae.parameters())
    x = pixels[..., :3].movedim(-1, 1).to(p.device, p.dtype) * 2.0 - 1.0  # (B, H, W, 3) -> (B, 3, H, W), -1..1
    return vae.encode(x).mode().float().cpu()


@torch.no_grad()
def decode_latent(vae, samples: torch.Tensor) -> torch.Tensor:
    """Unscaled latent [B, C, h, w] -> IMAGE [B, 8h, 8w, 3] in 0..1."""
    p = next(vae.parameters())
    x = vae.decode(samples.to(p.device, p.dtype)).float()
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).contiguous().cpu()  # (B, 3, H, W) -> (B, H, W, 3)


# ---- tiles ---------------------------------------------------------------------------------------------------
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


def _starts(size: int, tile: int, overlap: int) -> list:
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(n)})


def tile_count(shape, tile: int, overlap: int) -> int:
    return len(_starts(shape[2], tile, overlap)) * len(_starts(shape[3], tile, overlap))


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float, out_channels: int,
          on_tile: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Apply fn (NCHW -> NC'(H*scale)(W*scale)) tile by tile over x [B, C, H, W], feathering the overlaps.
    on_tile() runs after each tile (progress; raise from it to cancel)."""
    B, _, H, W = x.shape
    out = torch.zeros(B, out_channels, round(H * scale), round(W * scale))
    weight = torch.zeros(1, 1, out.shape[2], out.shape[3])
    ys, xs = _starts(H, tile, overlap), _starts(W, tile, overlap)
    for y in ys:
        for x0 in xs:
            part = fn(x[:, :, y:y + tile, x0:x0 + tile]).float().cpu()
            if on_tile is not None:
                on_tile()
            th, tw = part.shape[-2:]
            oy, ox, ov = round(y * scale), round(x0 * scale), round(overlap * scale)
            wy = _ramp(th, min(ov, th // 2), y == ys[0], y == ys[-1])
            wx = _ramp(tw, min(ov, tw // 2), x0 == xs[0], x0 == xs[-1])
            w = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, th, tw)
            out[:, :, oy:oy + th, ox:ox + tw] += part * w
            weight[:, :, oy:oy + th, ox:ox + tw] += w
    return out / weight


def check_tiles(tile_size: int, overlap: int, d: int) -> tuple:
    """(tile, overlap) in pixels: the tile a multiple of d (at least 2d), the overlap at most a quarter tile."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 2 * d or tile_size % d:
        raise ParamError("tile_size", f"must be a multiple of {d} pixels (at least {2 * d}), got {tile_size}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ParamError("overlap", f"must be an integer >= 0, got {overlap}")
    return tile_size, min(overlap, tile_size // 4) // d * d


def encode_tiled(vae, pixels: torch.Tensor, tile_size: int, overlap: int, on_tile=None) -> torch.Tensor:
    """IMAGE -> unscaled latent, tile by tile (tile_size and overlap in pixels)."""
    d = downscale(vae)
    tile, overlap = check_tiles(tile_size, overlap, d)
    x = crop_to_multiple(check_image(pixels, "pixels", d), d).movedim(-1, 1)  # (B, H, W, 3) -> (B, 3, H, W)
    fn = lambda t: encode_pixels(vae, t.movedim(1, -1))  # noqa: E731
    return tiled(fn, x, tile, overlap, 1.0 / d, vae.config.latent_channels, on_tile)


def decode_tiled(vae, samples: torch.Tensor, tile_size: int, overlap: int, on_tile=None) -> torch.Tensor:
    """Unscaled latent -> IMAGE, tile by tile (tile_size and overlap in pixels)."""
    d = downscale(vae)
    tile, overlap = check_tiles(tile_size, overlap, d)
    fn = lambda t: decode_latent(vae, t).movedim(-1, 1)  # noqa: E731
    image = tiled(fn, samples, tile // d, overlap // d, float(d), 3, on_tile)  # (B, 3, H, W)
    return image.movedim(1, -1).clamp(0, 1).contiguous()


def tiles_of(shape, tile_size: int, overlap: int, d: int, pixel_space: bool) -> int:
    """How many tiles encode_tiled (pixel_space, shape [B, H, W, 3]) or decode_tiled (shape [B, C, h, w]) runs."""
    tile, overlap = check_tiles(tile_size, overlap, d)
    if pixel_space:
        return tile_count((shape[0], 3, shape[1] // d * d, shape[2] // d * d), tile, overlap)
    return tile_count(shape, tile // d, overlap // d)


# ---- inpainting ------------------------------------------------------------------------------------------------
def grow_mask(mask: torch.Tensor, grow_mask_by: int) -> torch.Tensor:
    """mask [B, 1, H, W] rounded and dilated by a grow_mask_by x grow_mask_by box (ComfyUI's padding)."""
    if grow_mask_by == 0:
        return mask
    kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
    return F.conv2d(mask.round(), kernel, padding=math.ceil((grow_mask_by - 1) / 2)).clamp(0, 1)


def prepare_inpaint(pixels: torch.Tensor, mask: torch.Tensor, multiple: int, grow_mask_by: int = 6) -> tuple:
    """VAEEncodeForInpaint's preparation: (pixels [B, h, w, 3] cropped to a multiple of `multiple` with the
    masked pixels set to grey 0.5, noise_mask [B, 1, h, w] grown by grow_mask_by px and rounded)."""
    pixels = check_image(pixels, "pixels", multiple)
    mask = check_mask(mask).float()
    if isinstance(grow_mask_by, bool) or not isinstance(grow_mask_by, int) or not 0 <= grow_mask_by <= 64:
        raise ParamError("grow_mask_by", f"must be an integer in 0..64, got {grow_mask_by!r}")
    H, W = pixels.shape[1:3]
    m = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=(H, W), mode="bilinear")  # (Bm, 1, H, W)
    h, w = H // multiple * multiple, W // multiple * multiple
    y, x = (H % multiple) // 2, (W % multiple) // 2
    pixels, m = pixels[:, y:y + h, x:x + w].clone(), m[:, :, y:y + h, x:x + w]
    grown = grow_mask(m, grow_mask_by)
    keep = (1.0 - m.round()).squeeze(1)[..., None]  # (Bm, h, w, 1)
    if keep.shape[0] != pixels.shape[0] and keep.shape[0] == 1:
        keep = keep.expand(pixels.shape[0], -1, -1, -1)
    pixels = (pixels - 0.5) * keep + 0.5  # masked pixels -> grey 0.5
    return pixels, grown[:, :, :h, :w].round()
