"""KL autoencoder (f=8) of SD 1.x. The 0.18215 latent scale is NOT applied here.

Attribute names follow the original LDM checkpoint (`encoder.down.N.block.M`, `mid.attn_1.q`, ...).
"""
import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .speed import memory_format_of


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


def Norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) over latents [B, C, h, w]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, 2C, h, w) -> 2 x (B, C, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # noise is drawn on the generator's device (so a seed means the same noise everywhere), then moved
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = Norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, Cout, H, W)
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self attention over the H*W positions; q/k/v/proj_out are 1x1 convolutions."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = Norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, C, H, W) -> (B, HW, C)
        h = attention(q, k, v, heads=1)  # (B, HW, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # pad right and bottom by one: (B, C, H, W) -> (B, C, H+1, W+1)
        return self.conv(x)  # -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x)


class MidBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cfg, c_in if i == 0 else c_out, c_out)
                                    for i in range(cfg.num_res_blocks)])
        if downsample:
            self.downsample = Downsample(c_out)


class DecoderLevel(nn.Module):
    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cfg, c_in if i == 0 else c_out, c_out)
                                    for i in range(cfg.num_res_blocks + 1)])
        if upsample:
            self.upsample = Upsample(c_out)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.image_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList([
            EncoderLevel(cfg, chans[max(i - 1, 0)], c, downsample=i < len(chans) - 1) for i, c in enumerate(chans)])
        self.mid = MidBlock(cfg, chans[-1])
        self.norm_out = Norm(cfg, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, 3, H, W) -> (B, C0, H, W)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # halves H and W
        h = self.mid(h)  # (B, Cn, H/8, W/8)
        return self.conv_out(F.silu(self.norm_out(h)))  # -> (B, 2 * latent, H/8, W/8): mean and logvar


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(cfg, chans[-1])
        # up.i works at the resolution of down.i; it is run from the last level to the first
        self.up = nn.ModuleList([
            DecoderLevel(cfg, chans[min(i + 1, len(chans) - 1)], c, upsample=i > 0) for i, c in enumerate(chans)])
        self.norm_out = Norm(cfg, chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, latent, h, w) -> (B, Cn, h, w)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # doubles H and W
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C0, 8h, 8w) -> (B, 3, 8h, 8w)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: [B, 3, H, W] in -1..1 (H, W multiples of 8) -> posterior over unscaled latents [B, 4, H/8, W/8]."""
        x = x.to(self.quant_conv.weight.dtype, memory_format=memory_format_of(self.encoder.conv_in.weight))
        return DiagonalGaussian(self.quant_conv(self.encoder(x)).contiguous())  # run in the weights' dtype and layout

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: unscaled latents [B, 4, h, w] -> image [B, 3, 8h, 8w], roughly -1..1 (not clamped)."""
        dtype = self.post_quant_conv.weight.dtype
        z = z.to(dtype, memory_format=memory_format_of(self.decoder.conv_in.weight))
        out = self.decoder(self.post_quant_conv(z))  # run in the weights' dtype and layout
        if dtype == torch.float16 and not torch.isfinite(out).all():
            out = self._decode_fp32(z)  # fp16 activations of real SD VAEs can overflow: redo this call in fp32
        return out.contiguous()

    def _decode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        """decode with a temporary float32 copy of the decoder (freed afterwards)."""
        post_quant_conv, decoder = copy.deepcopy(self.post_quant_conv).float(), copy.deepcopy(self.decoder).float()
        return decoder(post_quant_conv(z.float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).mode())
