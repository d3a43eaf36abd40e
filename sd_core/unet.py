"""The LDM UNet of SD 1.x / 2.x with its timestep embedding; the families differ only in `UNetConfig`.

Attribute names follow the original LDM checkpoint (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`, ...).
Every block takes `(x, emb, context)` so a UNet stage is a plain sequence of blocks. The network predicts
whatever it was trained on (eps or v); `ModelSampling` interprets the output.

Config deltas between the families (SD 1.x -> SD 2.x): `context_dim` 768 -> 1024, `num_heads` 8 -> `head_dim` 64,
`use_linear_proj` (the spatial transformers' proj_in / proj_out are linear layers, not 1x1 convs) and
`attention_fp32` (attention computed in float32 whatever the weights' dtype). `transformer_depth` may be one
depth for every attention level or one per level (SDXL: 0, 2, 10), `transformer_depth_middle` the middle
block's (None: the deepest level's).
"""
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention_maps
from .attention import attention
from .speed import memory_format_of


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting models: latent + mask + masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with a spatial transformer; the middle block always has one
    num_heads: int = 8  # heads per attention layer, unless head_dim is set
    transformer_depth: Union[int, tuple] = 1  # one depth for all levels, or one per level
    context_dim: int = 768
    norm_groups: int = 32
    head_dim: Optional[int] = None  # SD 2.x: 64 channels per head (heads = channels / head_dim)
    use_linear_proj: bool = False  # SD 2.x: linear proj_in / proj_out
    attention_fp32: bool = False  # SD 2.x: attention in float32 (fp16 overflows)
    transformer_depth_middle: Optional[int] = None  # None: the depth of the last attention level

    def heads(self, channels: int) -> int:
        return channels // self.head_dim if self.head_dim else self.num_heads

    def depth(self, level: int) -> int:
        d = self.transformer_depth
        return d[level] if isinstance(d, tuple) else d

    def middle_depth(self) -> int:
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return self.depth(max(self.attention_levels)) if self.attention_levels else self.depth(0)

    @classmethod
    def tiny(cls, **kw) -> "UNetConfig":
        return cls(**{**dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                             attention_levels=(1,), num_heads=2, context_dim=32, norm_groups=8), **kw})


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim] float32, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, 1) * (1, dim/2) -> (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim) with dim even
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ConvIn(nn.Conv2d):
    """input_blocks.0.0: the first 3x3 conv, with the block signature."""

    def forward(self, x, emb=None, context=None):
        return super().forward(x)


class ResBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(cfg.norm_groups, c_in, eps=1e-5), nn.SiLU(),
                                       nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(nn.GroupNorm(cfg.norm_groups, c_out, eps=1e-5), nn.SiLU(),
                                        nn.Dropout(0.0), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb, context=None):
        h = self.in_layers(x)  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, E) -> (B, Cout, 1, 1), broadcast over H, W
        h = self.out_layers(h)  # (B, Cout, H, W)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Self attention when context is None, else queries from x and keys/values from context."""

    def __init__(self, dim: int, context_dim: int, heads: int, fp32: bool = False):
        super().__init__()
        self.heads, self.fp32 = heads, fp32
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        # None unless attention maps are being recorded (never inside a torch.compile graph)
        recorder = None if context is None or torch.compiler.is_compiling() else attention_maps.recording()
        context = x if context is None else context  # (B, Lk, Dc)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, Lq, D), 2 x (B, Lk, D)
        if recorder is not None:  # on the side: the output below is computed exactly as without it
            recorder.observe(q, k, context, self.heads)
        return self.to_out(attention(q, k, v, self.heads, upcast=self.fp32))  # (B, Lq, D)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)  # (B, L, D) -> 2 x (B, L, inner)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)  # (B, L, D) -> (B, L, D)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, fp32: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, fp32)  # self attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, fp32)  # cross attention on the text
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))  # (B, HW, C)
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, cfg: UNetConfig, channels: int, depth: int):
        super().__init__()
        self.linear = cfg.use_linear_proj
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        proj = nn.Linear if self.linear else lambda c_in, c_out: nn.Conv2d(c_in, c_out, 1)
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(channels, cfg.context_dim, cfg.heads(channels), cfg.attention_fp32)
            for _ in range(depth)])
        self.proj_out = proj(channels, channels)

    def forward(self, x, emb=None, context=None):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)  # 1x1 conv: (B, C, H, W)
        h = h.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        if self.linear:
            h = self.proj_in(h)  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, HW, C)
        if self.linear:
            h = self.proj_out(h)  # (B, HW, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W)
        return x + (h if self.linear else self.proj_out(h))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.op(x)  # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None, context=None, size=None):
        # size: the skip connection's spatial size, so odd latent sizes round-trip through down/upsampling
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x)


class UNetBlock(nn.Sequential):
    """A sequence of blocks, each called as block(x, emb, context)."""

    def forward(self, x, emb, context, out_size=None):
        for layer in self:
            x = layer(x, emb, context, size=out_size) if isinstance(layer, Upsample) else layer(x, emb, context)
        return x


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        chans = [mc * m for m in cfg.channel_mult]
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # down path; remember the channel count of every skip connection
        self.input_blocks = nn.ModuleList([UNetBlock(ConvIn(cfg.in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc
        for level, c in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(cfg, ch, c, emb_dim)]
                ch = c
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(cfg, ch, cfg.depth(level)))
                self.input_blocks.append(UNetBlock(*layers))
                skips.append(ch)
            if level < len(chans) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skips.append(ch)

        self.middle_block = UNetBlock(ResBlock(cfg, ch, ch, emb_dim), SpatialTransformer(cfg, ch, cfg.middle_depth()),
                                      ResBlock(cfg, ch, ch, emb_dim))

        # up path: num_res_blocks + 1 blocks per level, each concatenating one skip connection
        self.output_blocks = nn.ModuleList()
        for level, c in reversed(list(enumerate(chans))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(cfg, ch + skips.pop(), c, emb_dim)]
                ch = c
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(cfg, ch, cfg.depth(level)))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(nn.GroupNorm(cfg.norm_groups, ch, eps=1e-5), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, control=None) -> torch.Tensor:
        """x [B, Cin, h, w], timesteps [B] (float, fractional allowed), context [B, T, context_dim] -> eps [B, Cout, h, w].
        control: optional ControlNet residuals (sd_core.controlnet.ControlResiduals: `.skips`, one per input
        block, added to the skip connections; `.middle`, added to the middle block's output)."""
        dtype = self.time_embed[0].weight.dtype
        t = timesteps.to(x.device).reshape(-1).expand(x.shape[0])  # a single timestep is used for the whole batch
        t_emb = timestep_embedding(t, self.config.model_channels).to(dtype)  # (B,) -> (B, mc), computed in float32
        emb = self.time_embed(t_emb)  # (B, mc) -> (B, 4 mc)
        context = context.to(dtype)

        # computed in the memory format of the weights (NHWC after speed.apply(channels_last)): no per-op conversions
        h, hs = x.to(dtype, memory_format=memory_format_of(self.input_blocks[0][0].weight)), []
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:  # the encoder path itself is unchanged; only what the decoder reads is
            h = h + control.middle.to(dtype)
            hs = [s + r.to(dtype) for s, r in zip(hs, control.skips, strict=True)]
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)  # (B, C, H, W) + (B, Cskip, H, W) -> (B, C + Cskip, H, W)
            h = block(h, emb, context, out_size=hs[-1].shape[-2:] if hs else None)
        return self.out(h).contiguous()  # (B, C0, h, w) -> (B, Cout, h, w), returned in the default layout
