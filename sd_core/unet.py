"""SD 1.x UNet (eps prediction) with its timestep embedding."""
from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting models: latent + mask + masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with a spatial transformer; the middle block always has one
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32

    @classmethod
    def tiny(cls, **kw) -> "UNetConfig":
        return cls(**{**dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                             attention_levels=(1,), num_heads=2, context_dim=32, norm_groups=8), **kw})
