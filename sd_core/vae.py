"""KL autoencoder (f=8) of SD 1.x. The 0.18215 latent scale is NOT applied here."""
from dataclasses import dataclass


@dataclass(frozen=True)
class VAEConfig:
    image_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per level in the encoder; the decoder has one more
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # applied by sampling code, never by the VAE

    @classmethod
    def tiny(cls, **kw) -> "VAEConfig":
        return cls(**{**dict(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                             norm_groups=8), **kw})
