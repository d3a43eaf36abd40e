"""Our own model-object types, passed between Glass nodes.

ComfyUI's MODEL / CLIP / VAE are ComfyUI classes, so our objects carry their own type names: the editor
then refuses to wire a Glass UNet into a ComfyUI KSampler (which would crash). IMAGE, MASK, LATENT,
CONDITIONING and SIGMAS are plain tensors / dicts / lists in ComfyUI's exact formats (see README).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# Socket type names (permanent: saved workflows name them in their links).
GLASS_UNET = "GLASS_UNET"
GLASS_CLIP = "GLASS_CLIP"
GLASS_VAE = "GLASS_VAE"
GLASS_SAMPLER = "GLASS_SAMPLER"
# ComfyUI's own data types, shared as-is.
IMAGE, MASK, LATENT, CONDITIONING, SIGMAS = "IMAGE", "MASK", "LATENT", "CONDITIONING", "SIGMAS"


class NodeInputError(ValueError):
    """A node input is invalid. The message names the node and the input."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"{node}: input '{input_name}': {message}")
        self.node, self.input_name = node, input_name


def _describe(module: torch.nn.Module) -> str:
    """Device and dtype of a module's weights, for short reprs."""
    p = next(module.parameters(), None)
    return "no weights" if p is None else f"{p.device.type} {str(p.dtype).removeprefix('torch.')}"


@dataclass
class GlassUNet:
    """The denoising UNet of a checkpoint with its noise schedule (GLASS_UNET)."""
    model: torch.nn.Module            # sd_core.unet.UNetModel
    model_sampling: Any               # sd_core.schedules.ModelSampling
    scaling_factor: float = 0.18215   # latent scale applied when sampling starts / undone at the end
    source: str = ""                  # file it came from (for messages)

    def __repr__(self) -> str:  # ComfyUI puts str(input) in error reports: never the whole module tree
        return f"GlassUNet({self.source or 'unnamed'}, {self.in_channels}-channel, {_describe(self.model)})"

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    @property
    def is_inpaint(self) -> bool:
        """A 9-channel inpainting UNet (latent + mask + masked-image latent)."""
        return self.in_channels == 9

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


@dataclass
class GlassCLIP:
    """The CLIP text encoder, its tokenizer and encode settings (GLASS_CLIP)."""
    model: torch.nn.Module            # sd_core.clip.CLIPTextModel
    tokenizer: Any                    # sd_core.tokenizer.CLIPTokenizer
    clip_skip: int = -1               # -1 = last layer, -2 = penultimate (final LayerNorm applied)
    embeddings_dir: Optional[str] = None
    source: str = ""

    def __repr__(self) -> str:
        return f"GlassCLIP({self.source or 'unnamed'}, clip_skip={self.clip_skip}, {_describe(self.model)})"

    def with_clip_skip(self, clip_skip: int) -> "GlassCLIP":
        """A copy with another clip skip; the weights are shared, not copied."""
        return dataclasses.replace(self, clip_skip=clip_skip)


@dataclass
class GlassVAE:
    """The autoencoder (GLASS_VAE). LATENTs stay unscaled: the scaling factor is the samplers' business."""
    model: torch.nn.Module            # sd_core.vae.AutoencoderKL
    downscale: int = 8
    source: str = ""

    def __repr__(self) -> str:
        return f"GlassVAE({self.source or 'unnamed'}, {_describe(self.model)})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


@dataclass
class GlassSampler:
    """A sampler choice (GLASS_SAMPLER): a name from sd_core.samplers plus its options."""
    name: str
    options: dict = field(default_factory=dict)
