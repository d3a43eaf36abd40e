"""Helpers for the node and workflow tests: a temporary models folder holding tiny checkpoints written by the
real exporter (sd_core.checkpoint.save_checkpoint), each with a matching test vocabulary beside it, an input
folder with an RGBA test image, and the runtime settings pointed at them."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glass_diffusion.nodes import runtime
from glass_diffusion.nodes.example_workflows import CHECKPOINT, INPAINT_CHECKPOINT, INPUT_IMAGE, SD2_V_CHECKPOINT
from glass_diffusion.sd_core.checkpoint import save_checkpoint
from glass_diffusion.sd_core.model import SDConfig, StableDiffusion
from glass_diffusion.sd_core.tokenizer import read_vocabulary, vocab_from_merges
from glass_diffusion.sd_core.family import SD1, SD1_INPAINT, SD2
from glass_diffusion.sd_core.random_weights import build_random

DATA = Path(__file__).parent / "data"
SMALL_BPE = DATA / "text_small_bpe.txt"
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
VAE_FILE = "tiny_vae.safetensors"


def tiny_sd(seed: int, inpainting: bool = False) -> StableDiffusion:
    """A tiny model with small random weights everywhere (zero-initialised layers too), so outputs vary."""
    torch.manual_seed(seed)
    model = StableDiffusion(SDConfig.tiny(inpainting=inpainting), SD1_INPAINT if inpainting else SD1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_vocabulary(folder: Path, vocab_size: int) -> Path:
    """A vocab.json + merges.txt folder with exactly vocab_size tokens (the tests' small BPE, cut to fit):
    512 byte tokens, then merges, then the start and end tokens (ids vocab_size - 2, vocab_size - 1)."""
    _, merges = read_vocabulary(SMALL_BPE)
    merges = merges[:vocab_size - 512 - 2]
    vocab = vocab_from_merges(merges)
    assert len(vocab) == vocab_size
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def save_tiny(path: Path, seed: int, inpainting: bool = False) -> Path:
    model = tiny_sd(seed, inpainting)
    save_checkpoint(model, path, dtype=torch.float32)
    write_vocabulary(path.with_name(path.stem + ".tokenizer"), model.config.clip.vocab_size)
    return path


def rgba_image(size: int = 64) -> Image.Image:
    """An RGBA picture: colour gradients, alpha 0 (= mask 1) in a centred square."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    alpha = np.full((size, size), 255, np.uint8)
    alpha[size // 4:3 * size // 4, size // 4:3 * size // 4] = 0
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


@dataclass
class TinyEnv:
    root: Path
    models: Path
    input: Path

    def output(self, name: str) -> Path:
        d = self.root / "outputs" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextlib.contextmanager
    def settings(self, output: Path):
        """Runtime settings (models, input, output folders) pointed at this environment, CPU fp32."""
        with runtime.settings_override(models_dir=self.models, input_dir=self.input, output_dir=output,
                                       device="cpu", dtype="fp32"):
            yield


_ENV: TinyEnv | None = None


def save_tiny_sd2(path: Path, seed: int) -> Path:
    """A tiny SD 2.x checkpoint (OpenCLIP text tower; too few blocks for the v heuristic: loaded as 512-eps)."""
    model = build_random(SDConfig.tiny_sd2(), seed=seed, family=SD2)
    save_checkpoint(model, path, dtype=torch.float32)
    write_vocabulary(path.with_name(path.stem + ".tokenizer"), model.config.clip.vocab_size)
    return path


def tiny_env(tmp_path_factory) -> TinyEnv:
    """Build once per test session: models/checkpoints/{CHECKPOINT, INPAINT_CHECKPOINT, SD2_V_CHECKPOINT}
    (+ .tokenizer/ folders),
    models/vae/tiny_vae.safetensors, input/example.png."""
    global _ENV
    if _ENV is None:
        root = tmp_path_factory.mktemp("glass_nodes")
        models = root / "models"
        (models / "checkpoints").mkdir(parents=True)
        (models / "vae").mkdir()
        (models / "embeddings").mkdir()
        save_tiny(models / "checkpoints" / CHECKPOINT, seed=1)
        save_tiny(models / "checkpoints" / INPAINT_CHECKPOINT, seed=2, inpainting=True)
        save_tiny_sd2(models / "checkpoints" / SD2_V_CHECKPOINT, seed=4)
        save_checkpoint(tiny_sd(3), models / "vae" / VAE_FILE, dtype=torch.float32)
        inp = root / "input"
        inp.mkdir()
        rgba_image().save(inp / INPUT_IMAGE)
        _ENV = TinyEnv(root, models, inp)
    return _ENV


# Per-workflow overrides that point the shipped workflows (built-in model, 64 px, 12-20 steps) at the tiny random
# test checkpoints and shrink them to 2-3 steps.
TINY = {"Checkpoint.ckpt_name": CHECKPOINT}
TINY_OVERRIDES = {
    "text_to_image": {**TINY, "Sampler.steps": 2},
    "image_to_image": {**TINY, "Sampler.steps": 3},
    "inpaint_noise_mask": {**TINY, "Sampler.steps": 2},
    "inpaint_9channel": {"Sampler.steps": 2},  # its checkpoint is INPAINT_CHECKPOINT already
    "hires_fix": {**TINY, "First Pass.steps": 2, "Upscale.width": 96, "Upscale.height": 96,
                  "Second Pass.steps": 2, "Decode.tile_size": 64, "Decode.overlap": 32},
    "step_by_step": {**TINY, "Schedule.steps": 3, "Steps 0-4.end_step": 1, "Steps 4-8.start_step": 1,
                     "Steps 4-8.end_step": 2, "Steps 8-12.start_step": 2, "Steps 8-12.end_step": 3,
                     "UNet Predict.step": 1},
    "prompt_weighting": {**TINY, "Sampler (comfy).steps": 2, "Sampler (a1111).steps": 2},
    "clip_skip": {**TINY, "Sampler (-1).steps": 2, "Sampler (-2).steps": 2},
    "batch_of_seeds": {**TINY, "Sampler.steps": 2},
    "lora": {"Sampler (LoRA).steps": 2, "Sampler (plain).steps": 2},  # the built-in LoRA needs glass-tiny
    "controlnet": {"Sampler.steps": 2},  # the built-in model: the built-in ControlNet is made for it
    "sd2_v_rescale_cfg": {"Sampler.steps": 2, "Empty Latent.width": 64, "Empty Latent.height": 64},  # tiny SD 2.x
    "attention_maps": {**TINY, "Attention Maps.steps": 2},
    "step_film": {**TINY, "Step Film.steps": 2},
}
# (number of PNG files saved, their pixel size: width = height, or (width, height)) per workflow at the tiny
# overrides (as shipped, on the built-in model, the same except hires_fix: 128 px, and SHIPPED_COUNTS)
EXPECTED_FILES = {
    "text_to_image": (1, 64), "image_to_image": (1, 64), "inpaint_noise_mask": (1, 64), "inpaint_9channel": (1, 64),
    "hires_fix": (1, 96), "step_by_step": (4, 64), "prompt_weighting": (2, 64), "clip_skip": (2, 64),
    "batch_of_seeds": (4, 64), "lora": (2, 64), "controlnet": (1, 64), "sd2_v_rescale_cfg": (1, 64),
    "attention_maps": (5, 64),  # the picture and 4 heat-maps
    "step_film": (2, (260, 166)),  # one frame per step: two 128 px panels, a 4 px gap, a 38 px caption
}
SHIPPED_COUNTS = {"step_film": 10}  # files saved as shipped where the tiny overrides save fewer


def pixel_size(size) -> tuple:
    """An EXPECTED_FILES size as (width, height)."""
    return (size, size) if isinstance(size, int) else tuple(size)


def saved_pngs(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*.png"))


def leftovers(folder: Path) -> list[Path]:
    """Temp files a save left behind (there must be none)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(".tmp"))
