"""The model handle: one object that carries a denoising network and every fact sampling needs about it.

`DiffusionModel(unet, family, sampling, latent_format, patches=(), rescale_cfg=0.0, source="")`
- `unet`: the network, `forward(x_in, timesteps[B], context, **extra) -> eps | v` with a `.config` that has
  `in_channels` and `context_dim` (sd_core.unet.UNetModel, or a test double);
- `family`: its `sd_core.family.ModelFamily` row: there is no default, a handle without one cannot be built;
- `sampling`: the `ModelSampling` the sampler runs on (the family's own, or an override such as
  ModelSamplingDiscrete's v-prediction / zero-terminal-SNR);
- `latent_format`: the family's `LatentFormat`, with the checkpoint's own scale factor where it has one;
- `patches`: weight patches applied around every UNet call (LoRA), in order; empty for a plain checkpoint;
- `rescale_cfg`: RescaleCFG's multiplier (0 = plain classifier-free guidance).

Handles are frozen: `with_patches` / `with_sampling` / `replace` give a copy that shares the network's weights
(nothing is copied), so one loaded checkpoint can feed differently patched or re-scheduled branches of a graph.
`apply` is the one place the UNet is called; `denoise` wraps it in the sampling algebra (x, sigma -> x0).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .family import LatentFormat, ModelFamily
from .schedules import ModelSampling


@dataclass(frozen=True, eq=False)
class DiffusionModel:
    unet: torch.nn.Module
    family: ModelFamily
    sampling: ModelSampling
    latent_format: LatentFormat
    patches: tuple = ()
    rescale_cfg: float = 0.0
    source: str = ""  # the file it came from (for messages)

    def __post_init__(self):
        for name, kind in (("family", ModelFamily), ("sampling", ModelSampling), ("latent_format", LatentFormat)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise TypeError(f"a model handle needs a {kind.__name__} as {name}, got {type(value).__name__} "
                                f"(no default picks a model family)")
        if not isinstance(self.patches, tuple):
            raise TypeError(f"patches must be a tuple, got {type(self.patches).__name__}")

    @classmethod
    def build(cls, unet: torch.nn.Module, family: ModelFamily, *, scale_factor: float | None = None,
              source: str = "") -> "DiffusionModel":
        """The handle of `unet` with its family's sampling and latent format (scale_factor: the checkpoint's
        own latent scale, when it differs from the family's)."""
        if not isinstance(family, ModelFamily):
            raise TypeError(f"a model handle needs a ModelFamily, got {type(family).__name__}")
        latent = family.latent if scale_factor is None else dataclasses.replace(family.latent,
                                                                                scale_factor=float(scale_factor))
        return cls(unet, family, family.model_sampling(), latent, source=source)

    @classmethod
    def from_checkpoint(cls, model, source: str = "") -> "DiffusionModel":
        """The handle of a loaded `StableDiffusion` (its UNet, family and VAE latent scale)."""
        return cls.build(model.unet, model.family, scale_factor=model.config.vae.scaling_factor, source=source)

    # ---- copies sharing the weights
    def replace(self, **changes) -> "DiffusionModel":
        return dataclasses.replace(self, **changes)

    def with_patches(self, patches) -> "DiffusionModel":
        return dataclasses.replace(self, patches=tuple(patches))

    def with_sampling(self, sampling: ModelSampling) -> "DiffusionModel":
        return dataclasses.replace(self, sampling=sampling)

    # ---- facts
    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def context_dim(self) -> int:
        return self.unet.config.context_dim

    @property
    def is_inpaint(self) -> bool:
        """A 9-channel inpainting UNet (latent + mask + masked-image latent)."""
        return self.in_channels == self.latent_format.channels + 5

    @property
    def scaling_factor(self) -> float:
        return self.latent_format.scale_factor

    @property
    def device(self) -> torch.device:
        p = next(self.unet.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.unet.parameters(), None)
        return p.dtype if p is not None else torch.float32

    # ---- evaluation
    def apply(self, x_in: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, **extra) -> torch.Tensor:
        """The raw network output for an already scaled input (the one place the UNet is called)."""
        unet = self.unet
        if self.patches:  # LoRA: a copy-on-write view with the patched weights, computed once per handle
            from .lora import view_for
            unet = view_for(self, self.unet, self.patches)
        return unet(x_in, timesteps, context, **extra)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, concat=None,
                dtype: torch.dtype | None = None, **extra) -> torch.Tensor:
        """x0 estimate for x [N, C, h, w] at noise levels sigma [N] (the k-diffusion variable x = x0 + sigma eps).
        concat: extra input channels [N, Cc, h, w] (9-channel inpainting); dtype: the UNet's weight dtype."""
        ms = self.sampling
        inp = ms.calculate_input(sigma, x)
        if concat is not None:
            inp = torch.cat([inp, concat.to(inp.dtype)], dim=1)  # (N, C, h, w) + (N, Cc, h, w) -> (N, C + Cc, h, w)
        t = ms.timestep(sigma).to(x.device, torch.float32)
        dtype = dtype or x.dtype
        out = self.apply(inp.to(dtype), t, context.to(dtype), **extra)
        return ms.calculate_denoised(sigma, out.to(x.dtype), x)

    def __repr__(self) -> str:  # ComfyUI puts str(input) in error reports: never the whole module tree
        return (f"{type(self).__name__}({self.source or 'unnamed'}, {self.family.label}, {self.in_channels}-channel, "
                f"{_describe(self.unet)})")


def _describe(module: torch.nn.Module) -> str:
    """Device and dtype of a module's weights, for short reprs."""
    p = next(module.parameters(), None)
    return "no weights" if p is None else f"{p.device.type} {str(p.dtype).removeprefix('torch.')}"
