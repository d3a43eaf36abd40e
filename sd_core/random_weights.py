"""Seeded random weights for any network of this package: for tests, and for benchmarks on the full SD shapes
without a download (the same FLOPs and memory as a real checkpoint)."""
import math

import torch

from .family import family_of_config
from .model import SDConfig, StableDiffusion


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fast seeded random weights: variance-preserving normal weights, norm scales near 1, small biases.

    Works on a module made with `to_empty` (uninitialised memory): every parameter is written and the only
    buffer, CLIP's position_ids, is reset.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "embedding" in name:
            p.normal_(0.0, 0.02, generator=g)
        elif p.ndim == 0:  # a scalar (OpenCLIP's logit_scale): CLIP's trained value
            p.fill_(math.log(100.0))
        elif p.ndim == 1 and name.endswith("weight"):  # GroupNorm / LayerNorm scale
            p.normal_(1.0, 0.1, generator=g)
        elif p.ndim == 1:  # biases
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
    for name, b in module.named_buffers():
        assert name.endswith("position_ids"), f"unexpected buffer {name}: random_init_ must set it"
        b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return module


def build_random(config: SDConfig, seed: int = 0, family=None) -> StableDiffusion:
    """A StableDiffusion of `config` with seeded random weights (fp32, CPU, eval mode), built without a
    first default initialisation (meta device, then `to_empty`). family: its ModelFamily (None: the one the
    config's structure names, `family.family_of_config`)."""
    with torch.device("meta"):
        model = StableDiffusion(config, family or family_of_config(config))
    model = model.to_empty(device="cpu")
    return random_init_(model, seed).eval()
