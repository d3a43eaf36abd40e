"""The checkpoint container: UNet + VAE + text encoder under the single-file checkpoint's prefixes.

`StableDiffusion(cfg, family).state_dict()` has exactly the model keys of the family's `.safetensors` file
(SD 1.x: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`), so a
file loads with one `load_state_dict` after the family's declared key transforms (schedule buffers such as
`betas` are left to the loader to drop). `family` is a `sd_core.family.ModelFamily` row: the facts the weights
alone do not tell (prediction type, schedule, latent format, text recipe).
"""
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from .clip import CLIPTextConfig, CLIPTextModel
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig


@dataclass(frozen=True)
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)

    @classmethod
    def sd15(cls, inpainting: bool = False) -> "SDConfig":
        return cls(UNetConfig(in_channels=9 if inpainting else 4), CLIPTextConfig(), VAEConfig())

    @classmethod
    def tiny(cls, inpainting: bool = False) -> "SDConfig":
        return cls(UNetConfig.tiny(in_channels=9 if inpainting else 4), CLIPTextConfig.tiny(), VAEConfig.tiny())

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return {name: asdict(sub) for name, sub in (("unet", self.unet), ("clip", self.clip), ("vae", self.vae))}

    @classmethod
    def from_dict(cls, d: dict) -> "SDConfig":
        def build(kind, values):
            known = {f for f in kind.__dataclass_fields__}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        return cls(build(UNetConfig, d.get("unet", {})), build(CLIPTextConfig, d.get("clip", {})),
                   build(VAEConfig, d.get("vae", {})))


class DiffusionWrapper(nn.Module):
    """`model.` level of the checkpoint: holds the UNet as `diffusion_model`."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class FrozenCLIPEmbedder(nn.Module):
    """`cond_stage_model.` level of the checkpoint: holds the text encoder as `transformer`."""

    def __init__(self, clip: CLIPTextModel):
        super().__init__()
        self.transformer = clip


class StableDiffusion(nn.Module):
    def __init__(self, config: SDConfig, family):
        super().__init__()
        if family is None or not hasattr(family, "prediction"):
            raise TypeError(f"StableDiffusion needs a ModelFamily (sd_core.family), got {family!r}")
        self._config = config
        self.family = family
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        self.cond_stage_model = FrozenCLIPEmbedder(CLIPTextModel(config.clip))

    @property
    def config(self) -> SDConfig:
        return self._config

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def clip(self) -> CLIPTextModel:
        return self.cond_stage_model.transformer
