"""The checkpoint container: UNet + VAE + text encoder under the single-file checkpoint's prefixes.

`StableDiffusion(cfg, family).state_dict()` has exactly the model keys of the family's `.safetensors` file
(SD 1.x: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`; SD 2.x
holds its OpenCLIP text encoder as `cond_stage_model.model.*`, chosen by the type of `cfg.clip`), so a
file loads with one `load_state_dict` after the family's declared key transforms (schedule buffers such as
`betas` are left to the loader to drop). `family` is a `sd_core.family.ModelFamily` row: the facts the weights
alone do not tell (prediction type, schedule, latent format, text recipe).
"""
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from .clip import CLIPTextConfig, CLIPTextModel
from .open_clip import FrozenOpenCLIPEmbedder, OpenCLIPTextConfig
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig


TEXT_CONFIGS = {c.__name__: c for c in (CLIPTextConfig, OpenCLIPTextConfig)}  # SDConfig.clip's kinds


@dataclass(frozen=True)
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)  # or OpenCLIPTextConfig (SD 2.x)
    vae: VAEConfig = field(default_factory=VAEConfig)

    @classmethod
    def sd15(cls, inpainting: bool = False) -> "SDConfig":
        return cls(UNetConfig(in_channels=9 if inpainting else 4), CLIPTextConfig(), VAEConfig())

    @classmethod
    def tiny(cls, inpainting: bool = False) -> "SDConfig":
        return cls(UNetConfig.tiny(in_channels=9 if inpainting else 4), CLIPTextConfig.tiny(), VAEConfig.tiny())

    @classmethod
    def sd2(cls, inpainting: bool = False) -> "SDConfig":
        """SD 2.x (512 base, 768-v, and with inpainting=True the 9-channel inpainting model: the same shapes)."""
        unet = UNetConfig(in_channels=9 if inpainting else 4, context_dim=1024, head_dim=64, use_linear_proj=True,
                          attention_fp32=True)
        return cls(unet, OpenCLIPTextConfig(), VAEConfig())

    @classmethod
    def tiny_sd2(cls, inpainting: bool = False) -> "SDConfig":
        unet = UNetConfig.tiny(in_channels=9 if inpainting else 4, context_dim=32, head_dim=16, use_linear_proj=True,
                               attention_fp32=True)
        return cls(unet, OpenCLIPTextConfig.tiny(), VAEConfig.tiny())

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists); a text encoder other than CLIP-L names its config class."""
        d = {name: asdict(sub) for name, sub in (("unet", self.unet), ("clip", self.clip), ("vae", self.vae))}
        if not isinstance(self.clip, CLIPTextConfig):
            d["text_encoder"] = type(self.clip).__name__
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SDConfig":
        def build(kind, values):
            known = {f for f in kind.__dataclass_fields__}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        kind = d.get("text_encoder", CLIPTextConfig.__name__)
        if kind not in TEXT_CONFIGS:
            raise ValueError(f"unknown text_encoder {kind!r}; known: {sorted(TEXT_CONFIGS)}")
        return cls(build(UNetConfig, d.get("unet", {})), build(TEXT_CONFIGS[kind], d.get("clip", {})),
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

    @property
    def encoder(self) -> CLIPTextModel:
        return self.transformer


class StableDiffusion(nn.Module):
    def __init__(self, config: SDConfig, family):
        super().__init__()
        if family is None or not hasattr(family, "prediction"):
            raise TypeError(f"StableDiffusion needs a ModelFamily (sd_core.family), got {family!r}")
        self._config = config
        self.family = family
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        self.cond_stage_model = FrozenOpenCLIPEmbedder(config.clip) if isinstance(config.clip, OpenCLIPTextConfig) \
            else FrozenCLIPEmbedder(CLIPTextModel(config.clip))

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
        """The text encoder (CLIPTextModel, or OpenCLIPTextModel for SD 2.x)."""
        return self.cond_stage_model.encoder
