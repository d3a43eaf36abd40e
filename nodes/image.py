"""Image nodes: load (image + mask from alpha), save (PNG with ComfyUI's metadata), preview."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from . import infotext, outputs, paths
from .types import IMAGE, MASK, NodeInputError

CATEGORY = "Glass Diffusion/image"


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE item [H, W, 3] (0..1) -> 8-bit RGB."""
    array = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def load_image_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A file -> (IMAGE [F, H, W, 3], MASK [F, H, W]); mask = 1 - alpha, zeros (64x64) without alpha.
    Frames of another size than the first are skipped (animated files)."""
    images, masks, size = [], [], None
    with Image.open(path) as img:
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode.startswith("I;16"):  # 16-bit greyscale PNGs open as I;16 in recent Pillow
                frame = frame.convert("I")
            if frame.mode == "I":  # 16-bit greyscale: 0..65535 -> about 0..255 before the 8-bit RGB convert
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            size = size or rgb.size
            if rgb.size != size:
                continue
            images.append(torch.from_numpy(np.array(rgb, dtype=np.float32) / 255.0))  # (H, W, 3)
            if "A" in frame.getbands():
                alpha = np.array(frame.getchannel("A"), dtype=np.float32) / 255.0
            elif frame.mode == "P" and "transparency" in frame.info:
                alpha = np.array(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
            else:
                alpha = None
            masks.append(1.0 - torch.from_numpy(alpha) if alpha is not None else torch.zeros(64, 64))
            if img.format == "MPO":
                break
    if len({tuple(m.shape) for m in masks}) > 1:  # some frames without alpha: their 64x64 zeros fit no size
        masks = [m if m.shape == images[0].shape[:2] else torch.zeros(images[0].shape[:2]) for m in masks]
    return torch.stack(images), torch.stack(masks)  # (F, H, W, 3), (F, H, W)


def _expand_prefix(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    for key, value in (("%width%", width), ("%height%", height), ("%year%", now.tm_year),
                       ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"),
                       ("%hour%", f"{now.tm_hour:02}"), ("%minute%", f"{now.tm_min:02}"),
                       ("%second%", f"{now.tm_sec:02}")):
        prefix = prefix.replace(key, str(value))
    return prefix


def next_counter(folder: Path, name: str) -> int:
    """1 + the largest N among files '<name>_NNNNN_*' in folder (ComfyUI's numbering), or 1."""
    pattern = re.compile(re.escape(name) + r"_(\d+)_", re.IGNORECASE)
    numbers = [int(m.group(1)) for f in (os.listdir(folder) if folder.is_dir() else [])
               if (m := pattern.match(f))]
    return max(numbers, default=0) + 1


def _metadata_disabled() -> bool:
    """ComfyUI's --disable-metadata flag (inside ComfyUI only)."""
    if paths.comfy_folder_paths() is None:
        return False
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    return bool(getattr(args, "disable_metadata", False))


def output_target(node: str, filename_prefix: str, root: Path, width: int, height: int) -> tuple:
    """(folder, name, subfolder) for files '<name>_NNNNN_<suffix>' named by a filename_prefix under root (made if
    missing); NodeInputError(node, 'filename_prefix') when the prefix names nothing or leaves the folder."""
    problem = check_prefix(filename_prefix)
    if problem is not None:
        raise NodeInputError(node, "filename_prefix", problem)
    root = Path(root).resolve()
    prefix = _expand_prefix(filename_prefix, width, height)
    target = (root / os.path.normpath(prefix)).resolve()
    if target == root:
        raise NodeInputError(node, "filename_prefix",
                             f"{filename_prefix!r} names no file; give a prefix such as 'Glass'")
    if root not in target.parents:
        raise NodeInputError(node, "filename_prefix", f"{filename_prefix!r} points outside the folder {root}")
    folder, name = target.parent, target.name
    subfolder = "" if folder == root else folder.relative_to(root).as_posix()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a subfolder should be, no permission, ...
        raise NodeInputError(node, "filename_prefix", f"cannot make the folder {folder}: "
                                                      f"{e.strerror or type(e).__name__}") from None
    return folder, name, subfolder


def save_images(images: torch.Tensor, filename_prefix: str, root: Path, *, node: str, prompt=None,
                extra_pnginfo=None, compress_level: int = 4, folder_type: str = "output",
                unique_id=None) -> list[dict]:
    """Write each image as '<prefix>_<NNNNN>_.png' under root, never replacing a file; returns the ui entries.

    tEXt chunks as ComfyUI writes them: 'prompt' = JSON of the API graph, then one chunk per
    extra_pnginfo key (in practice 'workflow' = the UI graph), and AUTOMATIC1111's 'parameters' text for
    the sampler feeding node unique_id (nodes/infotext.py). The files are staged in the run's output
    transaction (nodes/outputs.py) and appear only when the whole run succeeds; without one (inside
    ComfyUI) in a transaction of this call: they appear when it returns, all or none.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise NodeInputError(node, "images", f"expected an IMAGE tensor [B, H, W, 3], got "
                                             f"{getattr(images, 'shape', type(images).__name__)}")
    folder, name, subfolder = output_target(node, filename_prefix, root, images.shape[2], images.shape[1])

    metadata = PngInfo()
    if _metadata_disabled():
        prompt, extra_pnginfo = None, None
    if prompt is not None:
        metadata.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        metadata.add_text(key, json.dumps(value))
    parameters = infotext.a1111_parameters(prompt, unique_id, images.shape[2], images.shape[1])
    if parameters:
        metadata.add_text("parameters", parameters)

    results = []
    with contextlib.ExitStack() as stack:
        txn = outputs.current()
        if txn is None:  # inside ComfyUI: this call's own transaction
            txn = stack.enter_context(outputs.transaction())
        counter = next_counter(folder, name)
        for batch_number, image in enumerate(images):
            if image.shape[-1] == 1:
                image = image.expand(-1, -1, 3)
            pil = image_to_pil(image[..., :3])
            entry = {"filename": None, "subfolder": subfolder, "type": folder_type}
            number = txn.stage(folder, name.replace("%batch_num%", str(batch_number)), counter,
                               lambda f, pil=pil: pil.save(f, format="PNG", pnginfo=metadata, compress_level=compress_level),
                               entry)
            results.append(entry)
            counter = number + 1
    return results


class GlassLoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": (paths.list_input_images(), {"image_upload": True, "tooltip":
                      "An image from the input folder. Its alpha channel becomes the mask."}),
        }}

    RETURN_TYPES = (IMAGE, MASK)
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The image, [B, H, W, 3] in 0..1.",
                       "1 - alpha: 1 where the image is transparent (the area to repaint); zeros if it has no alpha.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads an image from the input folder, with a mask taken from its alpha channel (1 - alpha)."

    def load(self, image):
        path = image_path("GlassLoadImage", image)
        try:
            return load_image_file(path)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise NodeInputError("GlassLoadImage", "image", f"cannot read {path} as an image: "
                                                            f"{type(e).__name__}: {e}") from None

    @classmethod
    def IS_CHANGED(cls, image):
        try:
            path = paths.annotated_image_path(image)
        except paths.OutsideFolderError:
            return ""
        if not path.is_file():
            return ""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        if image is None:  # linked: checked when it runs
            return True
        try:
            image_path("GlassLoadImage", image)
        except NodeInputError as e:
            return str(e)
        return True


def image_path(node: str, name) -> Path:
    """The file behind a LoadImage name, inside its folder; NodeInputError naming the folder otherwise. A name
    that leaves the folder is refused without looking at the disk, so nothing is told about other paths."""
    try:
        path = paths.annotated_image_path(name)
    except paths.OutsideFolderError as e:
        kind, _ = paths.annotated_folder(name)
        raise NodeInputError(node, "image", f"{e}: images are read from the {kind} folder only") from None
    if not path.is_file():
        kind, root = paths.annotated_folder(name)
        hint = " (headless: --input DIR or GLASS_DIFFUSION_INPUT)" if kind == "input" and not paths.comfy_folder_paths() else ""
        raise NodeInputError(node, "image", f"no such image file {name!r} in the {kind} folder {root}{hint}")
    return path


MAX_PREFIX_DEPTH = 16  # subfolders in a filename_prefix
MAX_NAME_BYTES = 255 - len("_00000_.png") - 8  # a file name's limit on common file systems, less our numbering
_PLACEHOLDER_WIDTH = {"%width%": 5, "%height%": 5, "%year%": 4, "%month%": 2, "%day%": 2, "%hour%": 2,
                      "%minute%": 2, "%second%": 2, "%batch_num%": 4}


def check_prefix(prefix) -> str | None:
    """Why a filename_prefix cannot name files inside the output folder, or None: checked before any work."""
    if not isinstance(prefix, str):
        return f"expected a string, got {type(prefix).__name__}"
    if any(ord(c) < 32 for c in prefix):
        return "contains a control character (a newline, a NUL byte, ...)"
    if not prefix.strip() or os.path.normpath(prefix) in (".", ""):
        return f"{prefix!r} names no file; give a prefix such as 'Glass'"
    if os.path.isabs(prefix) or os.path.normpath(prefix).split(os.sep)[0] == "..":
        return f"{prefix!r} points outside the output folder"
    parts = [p for p in os.path.normpath(prefix).split(os.sep) if p]
    if len(parts) > MAX_PREFIX_DEPTH + 1:
        return f"has {len(parts) - 1} subfolder levels; at most {MAX_PREFIX_DEPTH}"
    for part in parts:
        longest = part
        for key, width in _PLACEHOLDER_WIDTH.items():
            longest = longest.replace(key, "9" * width)
        if len(longest.encode("utf-8")) > MAX_NAME_BYTES:
            return (f"the name {part[:40]!r}... is {len(longest.encode('utf-8'))} bytes; a file or folder "
                    f"name may have at most {MAX_NAME_BYTES} here (255 less the numbering)")
    return None


class GlassSaveImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": (IMAGE, {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "Glass", "tooltip":
                                    "File name prefix; may contain a subfolder and %width%, %height%, %year%, %month%, "
                                    "%day%, %hour%, %minute%, %second%, %batch_num%. Files are numbered "
                                    "<prefix>_00001_.png and never overwritten."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves images as numbered PNG files in the output folder, with the workflow in the file "
                   "(drag a saved PNG into ComfyUI to get its workflow back).")

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix="Glass"):
        problem = None if filename_prefix is None else check_prefix(filename_prefix)  # None: a link
        return True if problem is None else problem

    def save(self, images, filename_prefix="Glass", prompt=None, extra_pnginfo=None, unique_id=None):
        results = save_images(images, filename_prefix, paths.output_dir(), node="GlassSaveImage",
                              prompt=prompt, extra_pnginfo=extra_pnginfo, unique_id=unique_id)
        return {"ui": {"images": results}}


class GlassPreviewImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"images": (IMAGE, {"tooltip": "The images to preview."})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "preview"
    CATEGORY = CATEGORY
    DESCRIPTION = "Shows images without keeping them: they go to the temporary folder."

    def preview(self, images, prompt=None, extra_pnginfo=None):
        suffix = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        results = save_images(images, "GlassPreview" + suffix, paths.temp_dir(), node="GlassPreviewImage",
                              prompt=prompt, extra_pnginfo=extra_pnginfo, compress_level=1, folder_type="temp")
        return {"ui": {"images": results}}


NODE_CLASS_MAPPINGS = {"GlassLoadImage": GlassLoadImage, "GlassSaveImage": GlassSaveImage,
                       "GlassPreviewImage": GlassPreviewImage}
NODE_DISPLAY_NAME_MAPPINGS = {"GlassLoadImage": "Load Image (Glass)", "GlassSaveImage": "Save Image (Glass)",
                              "GlassPreviewImage": "Preview Image (Glass)"}
