"""The built-in tiny model "glass-tiny": a Stable Diffusion 1.x-architecture model trained by this repository
(sd_core/train_tiny.py) on procedural scenes (sd_core/toy_data.py). See MODEL_CARD.md.

It lets Glass Diffusion make a picture with no downloaded checkpoint, and gives the tests a model whose
outputs can be judged. It only knows the toy grammar ("a small red circle at the top left on a blue
background") and works at 64x64 pixels.
"""
from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent
NAME = "glass-tiny (built-in)"  # how checkpoint loaders list it
CHECKPOINT = BUILTIN_DIR / "glass-tiny.safetensors"
VOCABULARY = BUILTIN_DIR / "glass-tiny-bpe.txt"  # its own CLIP-format BPE merges; ids follow from the merges
MODEL_CARD = BUILTIN_DIR / "MODEL_CARD.md"
# a ControlNet for glass-tiny, trained by sd_core/train_controlnet.py: control image = the shape's silhouette
CONTROLNET_NAME = "glass-tiny silhouette (built-in)"  # how ControlNet loaders list it
CONTROLNET = BUILTIN_DIR / "glass-tiny-silhouette-controlnet.safetensors"
CONTROLNET_CARD = BUILTIN_DIR / "CONTROLNET_CARD.md"
RESOLUTION = 64  # native width and height in pixels (latent 8x8)
DEFAULTS = {"width": 64, "height": 64, "steps": 20, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal"}
EXAMPLE_PROMPTS = (
    "a red circle in the center on a blue background",
    "a small yellow triangle at the top left on a black background",
    "a large green square at the bottom right on a white background",
    "a purple circle on the left on an orange background",
)


def is_builtin(name_or_path) -> bool:
    """True for the listed name, "glass-tiny", or the shipped file's path."""
    s = str(name_or_path)
    return s in (NAME, "glass-tiny", "glass-tiny.safetensors") or Path(s).resolve() == CHECKPOINT


def load(device="cpu", dtype=None):
    """(StableDiffusion model, CLIPTokenizer) of the built-in model."""
    from ..checkpoint import load_checkpoint
    from ..tokenizer import CLIPTokenizer

    return load_checkpoint(CHECKPOINT, device=device, dtype=dtype), CLIPTokenizer(VOCABULARY)
