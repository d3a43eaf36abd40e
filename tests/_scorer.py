"""Pixel-statistics scorer for pictures of the toy grammar (used to judge the built-in tiny model).

For an RGB image: the background colour is the median of the border pixels; foreground pixels are those
far from it; the largest 4-connected foreground region is "the shape". Its colour is the palette colour
nearest to its median colour, its position the 3x3 grid cell holding its bounding-box centre, and its
shape follows from how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2).
"""
from typing import Optional

import numpy as np
from scipy import ndimage

from glass_diffusion.sd_core.toy_data import COLOURS

PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[c] for c in PALETTE_NAMES], np.float32)  # (K, 3)
FG_THRESHOLD = 60.0  # RGB distance from the background colour that counts as foreground


def nearest_colour(rgb) -> str:
    d = np.linalg.norm(PALETTE - np.asarray(rgb, np.float32)[None], axis=1)  # (K,)
    return PALETTE_NAMES[int(d.argmin())]


def analyse(image) -> dict:
    """image: uint8 [H, W, 3] (numpy or PIL). Returns colour, shape, row, col, background, fill, area and
    centre (x, y of the bounding box's centre, pixels; None when no shape is found)."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    H, W, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)  # (3,)
    fg = np.linalg.norm(img - bg, axis=-1) > FG_THRESHOLD  # (H, W)
    out = {"background": nearest_colour(bg), "colour": None, "shape": None, "row": None, "col": None,
           "fill": 0.0, "area": 0, "centre": None}
    labels, n = ndimage.label(fg)
    if n == 0:
        return out
    areas = np.bincount(labels.ravel())[1:]
    region = labels == (int(areas.argmax()) + 1)
    area = int(region.sum())
    if area < max(6, H * W // 400):  # specks are not a shape
        return out
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = area / float((y1 - y0) * (x1 - x0))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    out.update(
        colour=nearest_colour(np.median(img[region], axis=0)),
        shape="square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle",
        row=min(int(cy / (H / 3.0)), 2), col=min(int(cx / (W / 3.0)), 2),
        fill=fill, area=area, centre=(float(cx), float(cy)))
    return out


def score(image, want: dict) -> dict:
    """Compares analyse(image) with the attributes `want` (keys colour, shape, row, col; None = unchecked)."""
    got = analyse(image)
    res = {"got": got}
    res["colour"] = got["colour"] == want["colour"] if want.get("colour") else None
    res["shape"] = got["shape"] == want["shape"] if want.get("shape") else None
    res["position"] = ((got["row"], got["col"]) == (want["row"], want["col"])
                       if want.get("row") is not None else None)
    return res


def summarise(results) -> dict:
    """Fraction correct per attribute over a list of score() results (attributes not asked are skipped)."""
    out = {}
    for key in ("colour", "position", "shape"):
        vals = [r[key] for r in results if r[key] is not None]
        out[key] = sum(vals) / len(vals) if vals else float("nan")
    out["n"] = len(results)
    return out


def scene_want(scene) -> dict:
    return {"colour": scene.colour, "shape": scene.shape, "row": scene.row, "col": scene.col}


def accuracy_table(images, scenes) -> Optional[dict]:
    return summarise([score(img, scene_want(s)) for img, s in zip(images, scenes)])


def diversity(images_by_seed) -> float:
    """How much pictures of one prompt differ between seeds: images_by_seed is uint8 [S, N, H, W, 3] (S >= 2
    seeds, the same N prompts in each); the mean absolute pixel difference (0..255, over pixels and channels)
    between the pictures of each prompt, averaged over the N prompts and the S * (S - 1) / 2 pairs of seeds."""
    imgs = np.asarray(images_by_seed, dtype=np.float32)
    S = imgs.shape[0]
    assert S >= 2 and imgs.ndim == 5, imgs.shape
    return float(np.mean([np.abs(imgs[i] - imgs[j]).mean() for i in range(S) for j in range(i + 1, S)]))


def centre_spread(images_by_seed) -> float:
    """Mean distance in pixels between the shape centres (analyse()["centre"]) that different seeds give for
    the same prompt (layout as diversity(); pairs where either picture has no shape are skipped)."""
    S, N = len(images_by_seed), len(images_by_seed[0])
    centres = [[analyse(images_by_seed[s][n])["centre"] for n in range(N)] for s in range(S)]
    d = [float(np.hypot(a[0] - b[0], a[1] - b[1])) for n in range(N) for i in range(S) for j in range(i + 1, S)
         for a, b in [(centres[i][n], centres[j][n])] if a is not None and b is not None]
    return float(np.mean(d)) if d else float("nan")
