"""Procedural scenes for the built-in tiny model: one flat shape on a flat background, with a caption.

Everything is drawn on the fly from a seed, so the training set needs no download and any picture can
be re-drawn exactly. Captions come from a small grammar:

    "a [small|large] <colour> <shape> [<position>] [on a <colour> background]"

e.g. "a small red circle at the top left on a blue background". A few colour-shape pairs are never
drawn (HELD_OUT); prompts naming them test whether the model composes what it has learnt.
"""
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

COLOURS = {  # name -> sRGB; well separated so a pixel statistic can tell them apart
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 8, "large": 12}  # half extent in pixels at 64x64 (scaled with the image)
JITTER = 5  # the shape's centre moves up to this many pixels (at 64x64) from its cell's centre, in x and in y
MARGIN = 1  # ... but the shape stays at least this many pixels inside the picture
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITION_PHRASES = {  # (row, col) -> phrase
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
# colour-shape pairs never drawn in training
HELD_OUT = frozenset({("red", "triangle"), ("yellow", "square"), ("blue", "circle"), ("white", "triangle")})


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    row: int
    col: int
    background: str
    dx: int = 0  # jitter of the centre, pixels at 64x64
    dy: int = 0

    def caption(self, say_size: bool = True, say_position: bool = True, say_background: bool = True) -> str:
        words = ["an" if (self.size if say_size else self.colour)[0] in "aeiou" else "a"]
        if say_size:
            words.append(self.size)
        words += [self.colour, self.shape]
        if say_position:
            words.append(POSITION_PHRASES[(self.row, self.col)])
        if say_background:
            words.append(f"on {'an' if self.background[0] in 'aeiou' else 'a'} {self.background} background")
        return " ".join(words)


def grammar_words() -> List[str]:
    """Every word a caption can contain (the tiny tokenizer's vocabulary is built from these)."""
    words = {"a", "an", "on", "background"} | set(COLOURS) | set(SHAPES) | set(SIZES)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A random scene; held_out=False never returns a HELD_OUT colour-shape pair, True only those."""
    colours = list(COLOURS)
    while True:
        colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
        if ((colour, shape) in HELD_OUT) == held_out:
            break
    background = colour
    while background == colour:
        background = colours[rng.integers(len(colours))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    row, col = int(rng.integers(3)), int(rng.integers(3))
    dx, dy = (_inside(int(d), cell, SIZES[size]) for d, cell in zip(rng.integers(-JITTER, JITTER + 1, size=2),
                                                                    (col, row)))
    return Scene(colour, shape, size, row, col, background, dx, dy)


def _inside(d: int, cell: int, r: int) -> int:
    """The jitter d of a shape of half extent r in grid cell `cell`, clamped to keep it MARGIN px inside."""
    centre = 12 + 20 * cell
    return max(MARGIN + r - centre, min(64 - MARGIN - r - centre, d))


def random_caption(scene: Scene, rng: np.random.Generator, p_drop: float = 0.15) -> str:
    """The scene's caption with size, position and background each left out with probability p_drop."""
    keep = rng.random(3) >= p_drop
    return scene.caption(say_size=bool(keep[0]), say_position=bool(keep[1]), say_background=bool(keep[2]))


def shape_centre(scene: Scene, resolution: int = 64) -> Tuple[float, float]:
    s = resolution / 64.0
    cx = (12 + 20 * scene.col + scene.dx) * s  # cell centres at 12, 32, 52 (of 64)
    cy = (12 + 20 * scene.row + scene.dy) * s
    return cx, cy


def draw(scene: Scene, resolution: int = 64) -> np.ndarray:
    """The scene as a uint8 [H, W, 3] image (hard edges, 2x2 supersampled)."""
    ss = 2
    n = resolution * ss
    cx, cy = (v * ss for v in shape_centre(scene, resolution))
    r = SIZES[scene.size] * resolution / 64.0 * ss
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5  # pixel centres
    if scene.shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif scene.shape == "square":
        inside = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    elif scene.shape == "triangle":  # apex up, base at the bottom, as wide as it is tall
        t = (yy - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    img = np.empty((n, n, 3), np.float32)
    img[:] = COLOURS[scene.background]
    img[inside] = COLOURS[scene.colour]
    img = img.reshape(resolution, ss, resolution, ss, 3).mean(axis=(1, 3))  # (n, n, 3) -> (H, W, 3)
    return np.round(img).astype(np.uint8)


def make_batch(seed, n: int, resolution: int = 64, held_out: bool = False, p_drop: float = 0.15
               ) -> Tuple[np.ndarray, List[str], List[Scene]]:
    """n scenes from `seed` (an int or a sequence of ints): images uint8 [n, H, W, 3], captions, scenes."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, held_out) for _ in range(n)]
    captions = [random_caption(s, rng, p_drop) for s in scenes]
    images = np.stack([draw(s, resolution) for s in scenes])
    return images, captions, scenes


def to_tensor(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float32 torch [N, 3, H, W] in -1..1 (the VAE's input range)."""
    import torch
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def parse_prompt(prompt: str) -> dict:
    """Attributes a grammar prompt asks for: colour, shape, size, row, col, background (None if unsaid)."""
    words = prompt.lower().replace(",", " ").split()
    out: dict = {"colour": None, "shape": None, "size": None, "row": None, "col": None, "background": None}
    text = " ".join(words)
    if "background" in words:
        i = words.index("background")
        out["background"] = words[i - 1] if i > 0 and words[i - 1] in COLOURS else None
        text = " ".join(words[: max(i - 3, 0)])  # drop "on a <colour> background"
    for w in text.split():
        if w in COLOURS and out["colour"] is None:
            out["colour"] = w
        elif w in SHAPES:
            out["shape"] = w
        elif w in SIZES:
            out["size"] = w
    for (row, col), phrase in sorted(POSITION_PHRASES.items(), key=lambda kv: -len(kv[1])):
        if phrase in text:
            out["row"], out["col"] = row, col
            break
    return out


def evaluation_scenes(n: int, seed: int = 1234, held_out: bool = False) -> List[Scene]:
    """A fixed list of scenes for scoring a model (a different stream from training)."""
    rng = np.random.default_rng([seed, 99, int(held_out)])
    return [random_scene(rng, held_out) for _ in range(n)]
