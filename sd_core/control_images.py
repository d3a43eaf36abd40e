"""Control-image preprocessors in plain torch (no downloads): Canny edges, invert, mask -> image, a drawn shape.

Images here are ComfyUI IMAGEs, [B, H, W, 3] float in 0..1; masks are [B, H, W] (or [H, W]) in 0..1.
"""
import math

import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """[B, 1, H, W] blurred with a separable Gaussian (radius 2 sigma, reflected borders)."""
    r = max(1, math.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.device)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))  # along W
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))  # along H


def canny(image: torch.Tensor, low_threshold: float = 0.4, high_threshold: float = 0.8, sigma: float = 1.0) -> torch.Tensor:
    """Canny edges of an IMAGE [B, H, W, 3] -> IMAGE [B, H, W, 3] (white edges on black).

    Luma, Gaussian blur (sigma), Sobel gradient, non-maximum suppression along the gradient direction, then
    hysteresis: pixels with strength >= high_threshold are edges, and so are pixels >= low_threshold connected
    to them (8-neighbourhood). Strength is scaled so that a sharp black-to-white step has strength ~1."""
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"need 0 <= low_threshold <= high_threshold, got {low_threshold}, {high_threshold}")
    x = image.movedim(-1, 1).float()  # (B, 3, H, W)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (B, 1, H, W)
    if gray.shape[-1] < 3 or gray.shape[-2] < 3:
        raise ValueError(f"image {gray.shape[-1]}x{gray.shape[-2]} is too small for edge detection (3x3 at least)")
    gray = _gaussian_blur(gray, sigma) if sigma > 0 else gray
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device) / 8.0  # slope
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))  # (B, 1, H, W) d/dx
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))  # d/dy
    # a unit step blurred by sigma has a peak slope 1 / (sqrt(2 pi) sigma): scale that to 1
    mag = torch.sqrt(gx * gx + gy * gy) * (math.sqrt(2 * math.pi) * sigma if sigma > 0 else 2.0)

    # non-maximum suppression: keep pixels not smaller than both neighbours along the gradient (4 directions)
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    direction = ((angle + 22.5) // 45).long() % 4  # 0: horizontal gradient, 1: 45 deg, 2: vertical, 3: 135 deg
    m = F.pad(mag, (1, 1, 1, 1))
    H, W = mag.shape[-2:]

    def shifted(dy, dx):
        return m[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    offsets = ((0, 1), (1, 1), (1, 0), (1, -1))  # (dy, dx) along the gradient for each direction
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for d, (dy, dx) in enumerate(offsets):
        local = (mag >= shifted(dy, dx)) & (mag >= shifted(-dy, -dx))
        keep |= (direction == d) & local
    mag = mag * keep

    strong = mag >= high_threshold
    candidate = mag >= low_threshold
    edges = strong
    for _ in range(H * W):  # hysteresis: grow strong edges through connected candidates until nothing changes
        grown = (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0) & candidate
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.float().expand(-1, 3, -1, -1).movedim(1, -1).contiguous()  # (B, H, W, 3)


def invert(image: torch.Tensor) -> torch.Tensor:
    """1 - image (white edges on black <-> black on white)."""
    return 1.0 - image


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """MASK [B, H, W] or [H, W] -> IMAGE [B, H, W, 3]: the mask as grey levels (1 = white)."""
    mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
    return mask.float().clamp(0, 1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


def shape_mask(shape: str, width: int, height: int, x: float, y: float, size: float) -> torch.Tensor:
    """MASK [1, height, width]: a filled shape centred at pixel (x, y) with half extent `size` pixels
    (circle: radius; square: half side; triangle: apex up, base 2*size wide), edges 2x2 supersampled."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    ss = 2
    yy, xx = torch.meshgrid((torch.arange(height * ss) + 0.5) / ss, (torch.arange(width * ss) + 0.5) / ss,
                            indexing="ij")  # pixel-centre coordinates, (2H, 2W)
    if shape == "circle":
        inside = (xx - x) ** 2 + (yy - y) ** 2 <= size * size
    elif shape == "square":
        inside = ((xx - x).abs() <= size) & ((yy - y).abs() <= size)
    else:
        t = (yy - (y - size)) / (2 * size)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & ((xx - x).abs() <= t * size)
    return inside.float().reshape(height, ss, width, ss).mean(dim=(1, 3)).unsqueeze(0)  # (1, H, W)
