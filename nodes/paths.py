"""Model, input and output folders.

Inside ComfyUI these are ComfyUI's own (``folder_paths``), so the loaders list the files of the user's
models/checkpoints, models/vae, models/embeddings, models/loras. Headless they come from the runtime settings
(nodes/runtime.py): a models folder of the same layout (``checkpoints/``, ``vae/``, ``embeddings/``, ``loras/``),
an input folder and an output folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from . import shipped

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FOLDER_KINDS = ("checkpoints", "vae", "embeddings", "loras", "controlnet")


def comfy_folder_paths():
    """ComfyUI's folder_paths module, or None outside ComfyUI."""
    try:
        import folder_paths  # ComfyUI's top-level module; absent headless
    except ImportError:
        return None
    return folder_paths if hasattr(folder_paths, "get_filename_list") else None


def _settings():
    """The headless runtime settings (nodes/runtime.py)."""
    from .runtime import get_settings
    return get_settings()


def _setting_dir(name: str, env: str, default: str) -> Path:
    """A folder from the runtime settings; for folders the settings lack (temp), the environment or default."""
    value = getattr(_settings(), name, None)
    if value is None:
        value = os.environ.get(env, default)
    return Path(value).expanduser().resolve()


def models_dir() -> Path:
    return _setting_dir("models_dir", "GLASS_DIFFUSION_MODELS", "models")


def output_dir() -> Path:
    fp = comfy_folder_paths()
    if fp is not None:
        return Path(fp.get_output_directory())
    return _setting_dir("output_dir", "GLASS_DIFFUSION_OUTPUT", "output")


def input_dir() -> Path:
    fp = comfy_folder_paths()
    if fp is not None:
        return Path(fp.get_input_directory())
    return _setting_dir("input_dir", "GLASS_DIFFUSION_INPUT", "input")


def temp_dir() -> Path:
    """Previews. Headless: the settings' temp_dir if any, else a folder in the system temp dir."""
    fp = comfy_folder_paths()
    if fp is not None:
        return Path(fp.get_temp_directory())
    import tempfile
    return _setting_dir("temp_dir", "GLASS_DIFFUSION_TEMP", os.path.join(tempfile.gettempdir(), "glass-diffusion"))


def device_and_dtype(dtype_choice: str = "auto"):
    """(torch.device, torch.dtype) for new models: ComfyUI's device inside ComfyUI, the runtime settings
    headless. dtype_choice 'auto' = fp16 on CUDA, fp32 elsewhere (or the settings' dtype headless)."""
    import torch
    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if comfy_folder_paths() is not None:
        import comfy.model_management as mm
        device = mm.get_torch_device()
        try:  # honours ComfyUI's --force-fp32 / --force-fp16 and the GPU's abilities
            auto = torch.float16 if mm.should_use_fp16(device) else torch.float32
        except Exception:
            auto = torch.float16 if device.type == "cuda" else torch.float32
    else:
        settings = _settings()
        device = settings.torch_device()
        auto = settings.torch_dtype(device)
    return device, named.get(dtype_choice, auto)


def vae_dtype(dtype_choice: str, dtype):
    """The VAE's dtype: as chosen, except that 'auto' never runs the VAE in fp16 (SD 1.x VAE decodes can
    overflow there; ComfyUI also keeps it in bf16/fp32): fp16 becomes fp32."""
    import torch
    return torch.float32 if dtype_choice == "auto" and dtype == torch.float16 else dtype


def folder(kind: str) -> Path:
    """The headless folder for a model kind: <models_dir>/<kind>."""
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown model folder kind {kind!r} (expected one of {FOLDER_KINDS})")
    return models_dir() / kind


def list_files(kind: str) -> list[str]:
    """Model files of a kind, as names relative to their folder ('sub/model.safetensors'), sorted."""
    fp = comfy_folder_paths()
    if fp is not None:
        try:
            return sorted(fp.get_filename_list(kind))
        except KeyError:  # a folder kind this ComfyUI does not know
            return []
    root = folder(kind)
    if not root.is_dir():
        return []
    names = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS]
    return sorted(names)


def full_path(kind: str, name: str) -> Optional[Path]:
    """The file behind a name from list_files, or None if there is no such file."""
    fp = comfy_folder_paths()
    if fp is not None:
        p = fp.get_full_path(kind, name)
        return Path(p) if p else None
    root = folder(kind)
    p = Path(os.path.normpath(root / name))  # '..' removed; symlinked model files are fine
    if root not in p.parents or not p.is_file():  # never leave the models folder
        return None
    return p


def embeddings_dir() -> Optional[str]:
    """The (first) embeddings folder, for `embedding:name` in prompts."""
    fp = comfy_folder_paths()
    if fp is not None:
        try:
            dirs = fp.get_folder_paths("embeddings")
        except KeyError:
            return None
        return dirs[0] if dirs else None
    d = folder("embeddings")
    return str(d) if d.is_dir() else None


def list_input_images() -> list[str]:
    """The input folder's images, plus the images the shipped workflows load (nodes/shipped.py)."""
    root = input_dir()
    names = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS] \
        if root.is_dir() else []
    return sorted(set(names) | set(shipped.input_names()))


class OutsideFolderError(ValueError):
    """A file name that would leave the folder it must be in ('..', an absolute path); says nothing about
    whether such a file exists."""


ANNOTATIONS = (" [input]", " [output]", " [temp]")


def _annotated_root(name: str) -> tuple[str, Path, str]:
    """(name without its annotation, the folder it names, the folder's kind) for LoadImage-style names."""
    for tag, get in zip(ANNOTATIONS, (input_dir, output_dir, temp_dir)):
        if name.endswith(tag):
            return name[: -len(tag)], Path(get()), tag.strip(" []")
    return name, Path(input_dir()), "input"


def inside(root: Path, name: str) -> Path:
    """``root / name`` with '..' removed, when that stays inside root; else OutsideFolderError. The check is
    on the names, not on resolved links, so a symlink the user placed inside the folder keeps working."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise OutsideFolderError(f"{name!r} is not a file name")
    root = Path(os.path.abspath(root))
    p = Path(os.path.normpath(root / name))
    if os.path.isabs(name) or root not in p.parents:
        raise OutsideFolderError(f"{name!r} is not a name inside the folder (no absolute paths, no '..')")
    return p


def annotated_image_path(name: str) -> Path:
    """As _annotated_image_path; a plain name the input folder lacks that names an image of the shipped workflows
    (nodes/shipped.py) is that packaged file, so the shipped workflows run with an empty input folder."""
    path = _annotated_image_path(name)
    return path if path.is_file() else (shipped.find_input(name) or path)


def _annotated_image_path(name: str) -> Path:
    """Resolve an image name as LoadImage does: 'x.png' (or 'sub/x.png') is in the input folder; 'x.png [output]'
    and 'x.png [temp]' name the output and temp folders. Inside ComfyUI these are ComfyUI's folders.
    OutsideFolderError for a name that leaves its folder (headless and inside ComfyUI alike)."""
    base, root, _ = _annotated_root(name) if isinstance(name, str) else (name, Path(input_dir()), "input")
    return inside(root, base)


def annotated_folder(name: str) -> tuple[str, Path]:
    """(kind, folder) an image name refers to: ('input', <input folder>) for a plain name."""
    _, root, kind = _annotated_root(name) if isinstance(name, str) else ("", Path(input_dir()), "input")
    return kind, root
