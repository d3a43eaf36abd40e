"""Helpers for the checkpoint tests: tiny random models and raw checkpoint files with chosen quirks."""
import functools
from pathlib import Path

import torch
from safetensors.torch import save_file

from glass_diffusion.sd_core.model import SDConfig, StableDiffusion
from glass_diffusion.sd_core.family import SD1, SD1_INPAINT

DATA = Path(__file__).parent / "data"


def tiny_model(seed: int = 0, inpainting: bool = False) -> StableDiffusion:
    """A tiny StableDiffusion whose every float tensor (norms included) is random, so copies are checkable."""
    torch.manual_seed(seed)
    model = StableDiffusion(SDConfig.tiny(inpainting=inpainting), SD1_INPAINT if inpainting else SD1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def tiny_state(seed: int = 0, inpainting: bool = False) -> dict:
    """The raw (file-layout) state dict of tiny_model: fp32 model keys, int64 position_ids (a fresh copy)."""
    return {k: v.clone() for k, v in _tiny_state(seed, inpainting).items()}


@functools.lru_cache(maxsize=None)
def _tiny_state(seed: int, inpainting: bool) -> dict:
    return tiny_model(seed, inpainting).state_dict()


def write(path: Path, state: dict, metadata: dict = None, wrap: bool = False) -> Path:
    """Write a raw checkpoint file: .safetensors via safetensors, anything else via torch.save."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": state, "global_step": 470000, "epoch": 6} if wrap else state, path)
    return path


def read_tsv(path: Path = DATA / "sd15_checkpoint_keys.tsv") -> dict:
    """{key: (shape tuple, dtype name)} from the SD 1.5 layout table."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows[key] = (tuple(int(x) for x in shape.strip("[]").split(",") if x), dtype)
    return rows


# One re-entrant lock for every full-size test (a second, non-re-entrant one could deadlock a run
# that takes it while the parity fixture holds it).
from _parity_util import fullsize_lock  # noqa: E402,F401
